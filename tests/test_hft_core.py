"""HFT's pure-torch core: exactly half of every category per round, seeded draws, state refusal, block grouping."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_models import FAMILIES
from torch import nn

from lightning_peft.backbones import detect_preset, find_blocks
from lightning_peft.methods.hft import OTHER, HalfSelector, group_block

LLAMA = [4, 3, 2]  # attention q/k/v/o, feed-forward gate/up/down, two norms


@pytest.mark.parametrize("n_blocks", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("layout", [LLAMA, [2, 2, 2], [1, 5, 4], [3, 0, 2]])
def test_exactly_half_of_each_category_every_round(n_blocks: int, layout: list[int]) -> None:
    selector = HalfSelector([layout] * n_blocks, seed=3)
    for k in range(12):
        counts, members = selector.trained_counts(k), selector.trained(k)
        for c, n in enumerate(layout):
            per_block = [counts[b][c] for b in range(n_blocks)]
            assert [len(members[b][c]) for b in range(n_blocks)] == per_block
            assert all(len(set(members[b][c])) == len(members[b][c]) for b in range(n_blocks))
            assert all(0 <= m < n for b in range(n_blocks) for m in members[b][c])
            if n % 2 == 0:
                assert per_block == [n // 2] * n_blocks
            else:  # floor(B/2) blocks train ceil(n/2), the others floor(n/2): never more than half of the category
                assert sorted(per_block) == [n // 2] * (n_blocks - n_blocks // 2) + [n // 2 + 1] * (n_blocks // 2)
                assert sum(per_block) == (n * n_blocks) // 2
        assert len(selector.active(0 if selector.interval is None else k)) == sum(map(sum, counts))


def test_the_papers_llama_rule() -> None:
    """2 of 4 attention matrices per block; feed-forward 2 of 3 in half of the blocks and 1 in the others; 1 norm."""
    selector = HalfSelector([LLAMA] * 32, seed=0)
    counts = selector.trained_counts(0)
    assert all(c[0] == 2 and c[2] == 1 for c in counts)
    assert sorted(c[1] for c in counts) == [1] * 16 + [2] * 16


def test_draws_are_deterministic_per_seed_and_round_and_rounds_differ() -> None:
    a, b = HalfSelector([LLAMA] * 4, seed=5), HalfSelector([LLAMA] * 4, seed=5)
    assert [a.trained(k) for k in range(20)] == [b.trained(k) for k in range(20)]
    assert len({json.dumps(a.trained(k)) for k in range(20)}) >= 15, "rounds repeat the same half"
    assert a.trained(0) != HalfSelector([LLAMA] * 4, seed=6).trained(0)


def test_members_are_drawn_uniformly() -> None:
    selector = HalfSelector([LLAMA] * 2, seed=0)
    rounds = 400
    hits = torch.zeros(selector.n_units)
    for k in range(rounds):
        for b, block in enumerate(selector.trained(k)):
            for c, members in enumerate(block):
                for m in members:
                    hits[selector.offsets[b][c] + m] += 1
    share = hits / rounds
    assert ((share - 0.5).abs() < 0.1).all(), share  # every q, k, v, o, gate, up, down and norm: half the rounds


def test_rounds_follow_the_interval() -> None:
    one = HalfSelector([LLAMA] * 2, interval=None, seed=1)
    assert all(one.active(s) == one.active(0) for s in range(0, 500, 7))
    assert one.interval_index(10**6) == 0 and one.round_start(77) == 0
    every3 = HalfSelector([LLAMA] * 2, interval=3, seed=1)
    assert [every3.interval_index(s) for s in range(7)] == [0, 0, 0, 1, 1, 1, 2]
    assert every3.round_start(5) == 3
    assert every3.active(4) == every3.active(3) and every3.active(3) == sorted(every3.active(3))
    assert len({tuple(every3.active(3 * k)) for k in range(10)}) > 1


def test_the_global_rng_is_untouched_and_another_process_draws_the_same() -> None:
    """What makes every rank agree: the draw depends on (seed, round) only, not on the process or the global RNG."""
    saved = torch.get_rng_state()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    here = HalfSelector([LLAMA] * 3, interval=2, seed=9).active(4)
    assert torch.equal(torch.get_rng_state(), before), "the draw consumed the global RNG"
    torch.set_rng_state(saved)
    code = (
        "import torch, json; torch.manual_seed(999); torch.rand(50);"
        "from lightning_peft.methods.hft import HalfSelector;"
        "print(json.dumps(HalfSelector([[4, 3, 2]] * 3, interval=2, seed=9).active(4)))"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


def test_state_replays_and_refuses_another_configuration() -> None:
    selector = HalfSelector([LLAMA] * 2, interval=4, seed=2)
    state = selector.state_dict()
    HalfSelector([LLAMA] * 2, interval=4, seed=2).load_state_dict(state)  # same configuration: accepted
    for other, field in [
        (HalfSelector([LLAMA] * 2, interval=5, seed=2), "interval"),
        (HalfSelector([LLAMA] * 2, interval=4, seed=3), "seed"),
        (HalfSelector([LLAMA] * 3, interval=4, seed=2), "layout"),
        (HalfSelector([LLAMA] * 2, interval=None, seed=2), "interval"),
    ]:
        with pytest.raises(ValueError, match=field):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match="rule"):
        selector.load_state_dict({**state, "rule": "something-else"})


@pytest.mark.parametrize(
    ("layout", "interval", "message"),
    [
        ([], None, "at least one block"),
        ([[2, 2], [2]], None, "same categories"),
        ([[0, 0]], None, "every block"),
        ([[2]], 0, "interval"),
        ([[2]], True, "interval"),
    ],
)
def test_bad_configurations_are_refused(layout, interval, message) -> None:
    with pytest.raises(ValueError, match=message):
        HalfSelector(layout, interval=interval)


def test_group_block_sorts_a_llama_block_by_the_preset() -> None:
    model = FAMILIES["llama"](seed=0)
    preset = detect_preset(model)
    grouped = group_block(find_blocks(model).modules[0], dict(preset.groups))
    assert {c: list(m) for c, m in grouped.items()} == {
        "attention": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
        "feed_forward": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
        "norm": ["input_layernorm", "post_attention_layernorm"],
    }
    block = find_blocks(model).modules[0]
    listed = sorted(p for members in grouped.values() for params in members.values() for p in params)
    assert listed == sorted(n for n, _ in block.named_parameters())  # every parameter, once


def test_group_block_leftovers_longest_entry_and_ambiguity() -> None:
    block = nn.Module()
    block.attention = nn.ModuleDict({"query": nn.Linear(2, 2), "output": nn.ModuleDict({"dense": nn.Linear(2, 2)})})
    block.output = nn.ModuleDict({"dense": nn.Linear(2, 2)})
    block.scale = nn.Parameter(torch.ones(2))
    block.norm = nn.LayerNorm(2)
    grouped = group_block(block, {"attention": ["query", "attention.output.dense"], "feed_forward": ["output.dense"]})
    assert {c: list(m) for c, m in grouped.items()} == {
        "attention": ["attention.query", "attention.output.dense"],  # the longer entry wins
        "feed_forward": ["output.dense"],
        OTHER: ["scale", "norm"],
    }
    assert grouped[OTHER] == {"scale": ["scale"], "norm": ["norm.weight", "norm.bias"]}
    with pytest.raises(ValueError, match="equally well"):
        group_block(block, {"a": ["dense"], "b": ["dense"]})
