"""The HFT callback: the frozen half keeps its pre-trained values, the trained half and the always-on modules move,
optimizer state goes with a group that freezes, saving, the zoo, resume, refusals, DDP."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_helpers import FamilyModule, PairModule, quiet_trainer, run_two_ranks
from lit_helpers import TrainableWatch as Watch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from lightning_peft import HFT
from lightning_peft.adapters import load_adapter
from lightning_peft.methods.hft import HalfSelector

ALWAYS = ("model.model.embed_tokens.", "model.model.norm.", "model.lm_head.")
N_UNITS = 18  # 2 tiny Llama blocks of 4 attention matrices, 3 feed-forward matrices and 2 norms


def fit(module, callbacks, **kwargs):
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=callbacks, **kwargs)
    trainer.fit(module)
    return trainer


def unit_params(hft: HFT, units) -> set[str]:
    """Full names (in the LightningModule) of the parameters of the given units."""
    return {f"model.{n}" for i in units for n in hft._unit_params[i]}


def test_within_a_round_the_frozen_half_keeps_its_pretrained_values_bit_for_bit() -> None:
    hft, watch = HFT(seed=3), Watch()
    module = FamilyModule("llama", n_batches=6)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    fit(module, [hft, watch])
    assert len(hft.unit_names) == N_UNITS and hft.categories == ["attention", "feed_forward", "norm"]
    selector = HalfSelector([[4, 3, 2], [4, 3, 2]], seed=3)
    active = selector.active(0)
    assert hft.history == [(0, active)] and len(active) == 9  # one round: (2 + 1.5 + 1) per block
    trained = unit_params(hft, active)
    frozen = unit_params(hft, set(range(N_UNITS)) - set(active))
    always = {n for n in before if n.startswith(ALWAYS)}
    assert trained and frozen and not trained & frozen and trained | frozen | always == set(before)
    for record in watch.steps:
        assert record["trainable"] == record["with_grad"] == trained | always
        assert record["state"] <= record["trainable"]
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trained | always, "a frozen group moved, or a trained one did not"
    assert hft.counts == [6 if i in active else 0 for i in range(N_UNITS)]


def test_groups_switch_every_interval_and_release_gradients_and_optimizer_state() -> None:
    hft, watch = HFT(interval=2, seed=0), Watch()
    module = FamilyModule("llama", n_batches=8)
    trainer = fit(module, [hft, watch])
    selector = HalfSelector([[4, 3, 2], [4, 3, 2]], interval=2, seed=0)
    assert hft.history == [(k, selector.active(k)) for k in range(0, 8, 2)]
    assert len({tuple(a) for _, a in hft.history}) == 4, "the halves never changed: a weak test"
    always = {n for n, _ in module.named_parameters() if n.startswith(ALWAYS)}
    for record in watch.steps:
        expected = unit_params(hft, selector.active(record["step"])) | always
        assert record["trainable"] == record["with_grad"] == expected
        if record["step"] % 2 == 1:  # the second step of a round: state exists for exactly what trains
            assert record["state"] == expected
        assert record["state"] <= expected  # a group that went frozen kept no optimizer state
    frozen = [p for n, p in module.named_parameters() if not p.requires_grad]
    final = {id(p) for p in trainer.optimizers[0].state}
    assert frozen and all(id(p) not in final and p.grad is None for p in frozen)
    assert hft.counts == [sum(2 for k in range(0, 8, 2) if i in selector.active(k)) for i in range(N_UNITS)]


class ZeroGradKept(FamilyModule):
    """``zero_grad(set_to_none=False)``: gradients stay allocated between steps unless the callback drops them."""

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer) -> None:
        optimizer.zero_grad(set_to_none=False)


def test_a_group_that_goes_frozen_drops_its_gradient_even_when_zero_grad_keeps_them() -> None:
    hft, watch = HFT(interval=2, seed=0), Watch()
    module = ZeroGradKept("llama", n_batches=8)
    fit(module, [hft, watch])
    selector = HalfSelector([[4, 3, 2], [4, 3, 2]], interval=2, seed=0)
    always = {n for n, _ in module.named_parameters() if n.startswith(ALWAYS)}
    for record in watch.steps:
        assert record["with_grad"] == unit_params(hft, selector.active(record["step"])) | always


def test_other_families_and_odd_groups() -> None:
    """ViT (2 + 2 + 2 per block) and GPT-2 (fused c_attn) from their presets: exactly half of each block trains."""
    for family in ("vit", "gpt2"):
        hft = HFT(seed=1)
        module = FamilyModule(family, n_batches=2)
        before = {n: p.detach().clone() for n, p in module.named_parameters()}
        fit(module, [hft])
        assert hft.categories == ["attention", "feed_forward", "norm"]
        assert len(hft.active) * 2 == len(hft.unit_names)
        changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
        assert changed >= unit_params(hft, hft.active)
        assert not changed & unit_params(hft, set(range(len(hft.unit_names))) - set(hft.active))


def test_a_model_no_preset_knows_needs_groups_and_then_halves_them() -> None:
    module = FamilyModule("mlp", n_batches=2)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    with pytest.raises(ValueError, match=r"groups=.*fc1, fc2"):
        fit(module, [HFT()])
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())
    hft = HFT(groups={"feed_forward": ["fc1", "fc2"]}, seed=0)
    fit(module, [hft])
    assert hft.always_on_names == ["model.embed", "model.head"] and hft.categories == ["feed_forward"]
    assert [len(x) for x in hft.selector.trained(0)[0]] == [1]  # of fc1 and fc2, one per block
    trained = {n for i in hft.active for n in hft._unit_params[i]}  # no preset: the backbone is the module itself
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert len(trained) == 6 and changed == trained | {
        n for n in before if n.startswith(("model.embed.", "model.head."))
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"interval": 0}, "interval"),
        ({"interval": -3}, "interval"),
        ({"interval": True}, "interval"),
        ({"groups": {}}, "groups must map"),
        ({"groups": {"attention": []}}, "groups must map"),
        ({"groups": {"attention": "q_proj"}}, "groups must map"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        HFT(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"groups": {"attention": ["q_proj"], "nothing": ["no_such_module"]}},
            r"\['nothing'\] match no module.*q_proj",
        ),
        ({"groups": {"nothing": ["no_such_module"]}}, "match no module"),
        ({"groups": {"a": ["q_proj"], "b": ["q_proj"]}}, "equally well"),
        ({"block_path": "model.nope"}, "nope"),
        ({"always_on": ["model.embed_tokens", "head_that_is_not_there"]}, "head_that_is_not_there"),
    ],
)
def test_bad_input_is_refused_before_training(kwargs, message) -> None:
    module = FamilyModule("llama", n_batches=2)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in module.named_parameters()}
    hft = HFT(**kwargs)
    with pytest.raises(ValueError, match=message):
        fit(module, [hft])
    assert all(torch.equal(p, before[n][0]) and p.requires_grad == before[n][1] for n, p in module.named_parameters())
    assert hft.selector is None and hft.unit_names == []


def test_plain_ddp_is_refused_like_lisa() -> None:
    from lightning.pytorch.strategies import DDPStrategy

    hft = HFT()
    with pytest.raises(NotImplementedError, match="HFT under strategy='ddp' fails.*ddp_selective"):
        hft._check_strategy(DDPStrategy())


def test_saved_delta_holds_what_trained_and_reproduces_the_model(tmp_path) -> None:
    hft = HFT(seed=0, save_dir=str(tmp_path / "delta"))
    module = FamilyModule("llama", n_batches=3)
    fit(module, [hft])
    tensors = load_file(tmp_path / "delta" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "delta" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LIGHTNING_PEFT_DELTA" and config["delta_format"] == "dense"
    assert config["method"] == "hft"
    trained = {n.removeprefix("model.") for n in unit_params(hft, hft.active)}
    always = {n.removeprefix("model.") for n, _ in module.named_parameters() if n.startswith(ALWAYS)}
    assert set(tensors) == trained | always, "a frozen group was saved, or a trained one left out"
    assert (tmp_path / "delta" / "hft_groups.png").stat().st_size > 1000
    manifest = json.loads((tmp_path / "delta" / "lightning_peft.json").read_text())
    assert manifest["method"] == "hft" and manifest["schedule"]["steps_trained"] == hft.counts
    fresh = FamilyModule("llama", n_batches=3)  # same seed: the base weights
    load_adapter(fresh.model, tmp_path / "delta")
    for (name, a), b in zip(module.named_parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_zoo_entry_of_an_hft_run_loads_onto_the_base_only(tmp_path) -> None:
    from lightning_peft import ZooPublisher, zoo

    module = FamilyModule("llama", n_batches=2)
    fit(module, [HFT(seed=0), ZooPublisher(name="hft-llama", root=str(tmp_path / "zoo"), base_model="tiny-llama")])
    local = zoo.LocalZoo(tmp_path / "zoo")
    base = FamilyModule("llama").model
    manifest = zoo.load(base, "hft-llama", zoo=local)
    assert manifest["method"] == "hft" and sum(manifest["schedule"]["steps_trained"]) == 2 * 9
    for (name, a), b in zip(module.model.named_parameters(), base.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    with pytest.raises(zoo.FingerprintMismatchError):
        zoo.load(FamilyModule("llama", seed=1).model, "hft-llama", zoo=local)


def test_resume_replays_the_same_halves_and_weights(tmp_path) -> None:
    def run(epochs, ckpt=None, root=None):
        module = FamilyModule("llama", n_batches=5)
        hft = HFT(interval=3, seed=4)
        callbacks = [hft] + ([ModelCheckpoint(dirpath=root, save_last=True)] if root is not None else [])
        trainer = quiet_trainer(
            max_epochs=epochs, limit_val_batches=0, callbacks=callbacks, enable_checkpointing=root is not None
        )
        trainer.fit(module, ckpt_path=ckpt)
        assert trainer.global_step == 5 * epochs
        return module, hft

    straight, a = run(2)
    run(1, root=tmp_path)
    resumed, b = run(2, ckpt=str(tmp_path / "last.ckpt"))  # resumes at step 5, inside the round of steps 3-5
    assert a.history == b.history and a.counts == b.counts and len(a.history) == 4
    for (name, x), y in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=f"{name} differs after resume")


def test_resume_with_another_configuration_is_refused(tmp_path) -> None:
    trainer = quiet_trainer(
        max_steps=2, limit_val_batches=0, callbacks=[HFT(seed=0)], enable_checkpointing=True, default_root_dir=tmp_path
    )
    trainer.fit(FamilyModule("llama", n_batches=4))
    ckpt = str(next(tmp_path.rglob("*.ckpt")))
    fresh = FamilyModule("llama", n_batches=4)
    flags = {n: p.requires_grad for n, p in fresh.named_parameters()}
    other = quiet_trainer(max_steps=4, limit_val_batches=0, callbacks=[HFT(seed=1)])
    with pytest.raises(ValueError, match="seed"):
        other.fit(fresh, ckpt_path=ckpt)
    assert {n: p.requires_grad for n, p in fresh.named_parameters()} == flags


@pytest.mark.slow
def test_ddp_selective_keeps_ranks_identical_and_equals_one_process(tmp_path) -> None:
    ranks, logs = run_two_ranks("ddp_scheduled.py", tmp_path, "ddp_selective", "hft")
    assert logs[0]["step"] == logs[1]["step"] == 8
    assert set(logs[0]["seeds"]).isdisjoint(logs[1]["seeds"]), "ranks saw the same data: not a real DDP test"
    selector = HalfSelector([[4, 3, 2], [4, 3, 2]], interval=2, seed=0)
    first = set(selector.active(0))
    assert any(set(selector.active(k)) - first for k in range(2, 8, 2)), "no group unfrozen later: a weak test"
    for a, b in zip(logs[0]["steps"], logs[1]["steps"], strict=True):
        assert a["trainable"] == b["trainable"] and a["with_grad"] == b["with_grad"]
    for key in ranks[0]:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0, msg=f"{key} differs across ranks")
    single = PairModule([log["seeds"] for log in logs], name="llama", lr=1e-2)
    fit(single, [HFT(interval=2, seed=0)])
    state = single.state_dict()
    for key, value in ranks[0].items():
        torch.testing.assert_close(value, state[key], rtol=1e-4, atol=1e-5, msg=f"{key}: DDP differs from 1 process")
    assert (tmp_path / "delta" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_plain_ddp_is_refused_with_the_fix(tmp_path) -> None:
    _ = run_two_ranks("ddp_scheduled.py", tmp_path, "ddp", "hft")
    assert "ddp_selective" in (tmp_path / "error0.txt").read_text()
    assert not (tmp_path / "rank0.safetensors").exists()


def test_a_bert_with_the_benchmarks_groups(tmp_path) -> None:
    """MiniLM's layout (what benchmarks/quality.py trains): "attention.output.*" against "output.*", longest wins."""
    import sys
    from pathlib import Path

    from transformers import BertConfig

    from lightning_peft.tasks import SentenceClassifier

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from quality import HFT_GROUPS

    BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24
    ).save_pretrained(tmp_path)
    module = SentenceClassifier(model_name=str(tmp_path), pretrained=False, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randint(0, 40, (4, 6), generator=gen), torch.ones(4, 6, dtype=torch.long), torch.tensor([0, 1, 0, 1]))
        for _ in range(2)
    ]
    hft = HFT(groups=HFT_GROUPS, backbone="model", seed=0)
    quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[hft]).fit(
        module, train_dataloaders=DataLoader(batches, batch_size=None)
    )
    assert hft.categories == ["attention", "feed_forward", "norm"]  # nothing left over in a BERT layer
    first = [n.split("layer.0.", 1)[1] for n in hft.unit_names if ".layer.0." in n]
    assert first == [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
        "attention.output.LayerNorm",
        "output.LayerNorm",
    ]
    assert len(hft.active) == 8 and hft.always_on_names == ["encoder.embeddings", "classifier"]
