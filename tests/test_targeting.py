"""Target matching: peft's semantics, dry run, and errors that say what could have matched."""

from __future__ import annotations

import pytest
from torch import nn

from lightning_peft.adapters import LoRAConfig, TargetNotFoundError, dry_run, inject_adapters, match_targets


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.kv = nn.Linear(8, 16)
        self.proj = nn.Linear(8, 8)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.blocks = nn.ModuleList([nn.ModuleDict({"attn": Attn(), "norm": nn.LayerNorm(8)}) for _ in range(2)])
        self.head = nn.Linear(8, 4)


def test_regex_is_fullmatched() -> None:
    assert match_targets(Net(), r"blocks\.\d+\.attn\.qkv").matched == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    with pytest.raises(TargetNotFoundError):
        match_targets(Net(), r"qkv")  # re.search would find it; fullmatch must not


def test_list_matches_exact_name_or_dotted_suffix() -> None:
    m = match_targets(Net(), ["kv", "blocks.1.attn.proj"])
    assert m.matched == ["blocks.0.attn.kv", "blocks.1.attn.kv", "blocks.1.attn.proj"]  # "kv" is not a suffix of "qkv"
    assert match_targets(Net(), ["head"]).matched == ["head"]


def test_exclude_wins_in_both_forms() -> None:
    m = match_targets(Net(), ["qkv", "proj"], exclude_modules=["blocks.0.attn.qkv"])
    assert "blocks.0.attn.qkv" not in m.matched and m.excluded == ["blocks.0.attn.qkv"]
    m = match_targets(Net(), ["qkv"], exclude_modules=r"blocks\.1\..*")
    assert m.matched == ["blocks.0.attn.qkv"]


def test_all_linear_leaves_out_the_output_layer() -> None:
    m = match_targets(Net(), "all-linear")
    assert "head" not in m.matched and "stem" not in m.matched
    assert len(m.matched) == 6


def test_no_match_lists_candidates() -> None:
    with pytest.raises(TargetNotFoundError) as err:
        match_targets(Net(), ["q_proj"])
    msg = str(err.value)
    assert "q_proj" in msg and "blocks.0.attn.qkv" in msg and "'qkv'" in msg


def test_unsupported_types_are_reported_not_adapted() -> None:
    m = match_targets(Net(), ["attn", "qkv"])
    assert ("blocks.0.attn", "Attn") in m.skipped
    assert m.matched == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    with pytest.raises(TargetNotFoundError, match="unsupported types"):
        match_targets(Net(), ["norm"])


def test_unused_list_entries_are_reported() -> None:
    m = match_targets(Net(), ["qkv", "typo_proj"])
    assert m.unused_entries == ["typo_proj"]
    assert "typo_proj" in m.summary()


def test_dry_run_changes_nothing() -> None:
    net = Net()
    before = [n for n, _ in net.named_modules()]
    text = dry_run(net, ["qkv"])
    assert "2 module(s) matched" in text and "blocks.1.attn.qkv  (Linear)" in text
    assert [n for n, _ in net.named_modules()] == before


@pytest.mark.parametrize("bad", [[], "", "(unclosed", 3])
def test_bad_target_values(bad: object) -> None:
    with pytest.raises((ValueError, TargetNotFoundError)):
        match_targets(Net(), bad)  # type: ignore[arg-type]


def test_failed_injection_leaves_model_untouched() -> None:
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="modules_to_save"):
        inject_adapters(net, LoRAConfig(r=2, target_modules=["qkv"], modules_to_save=["classifier"]))
    assert list(net.state_dict()) == list(before)
    assert all(p.requires_grad for p in net.parameters())
