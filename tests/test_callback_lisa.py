"""The LISA callback: sampled blocks train, frozen ones hold no gradient or optimizer state, resume, DDP."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_helpers import FamilyModule, PairModule, quiet_trainer, run_two_ranks
from lit_helpers import TrainableWatch as Watch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from lightning_peft import LISA
from lightning_peft.adapters import load_adapter
from lightning_peft.methods.lisa import LayerSampler
from lightning_peft.strategies import SelectiveDDPStrategy, check_dynamic_strategy

BLOCKS = ["model.model.layers.0", "model.model.layers.1"]
ALWAYS = ("model.model.embed_tokens.", "model.model.norm.", "model.lm_head.")


def block_of(name: str) -> int | None:
    for i, block in enumerate(BLOCKS):
        if name.startswith(block + "."):
            return i
    return None


def fit(module, callbacks, **kwargs):
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=callbacks, **kwargs)
    trainer.fit(module)
    return trainer


def test_active_blocks_follow_the_seeded_draws_and_only_they_train() -> None:
    lisa, watch = LISA(n_layers=1, interval=3, seed=7), Watch()
    module = FamilyModule("llama", n_batches=12)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    fit(module, [lisa, watch])
    sampler = LayerSampler(2, 1, 3, seed=7)
    assert [s["step"] for s in watch.steps] == list(range(12))
    assert lisa.history == [(k, sampler.active(k)) for k in range(0, 12, 3)]
    assert len({tuple(a) for _, a in lisa.history}) == 2, "the draws never switched block: a weak test"
    for record in watch.steps:
        active = sampler.active(record["step"])
        expected_blocks = {n for n in before if block_of(n) in active}
        always = {n for n in before if n.startswith(ALWAYS)}
        assert record["trainable"] == expected_blocks | always
        assert record["with_grad"] == record["trainable"]
        assert record["state"] <= record["trainable"]  # frozen blocks hold no optimizer state
    # a block trained exactly in its intervals; counts match the draws
    assert lisa.counts == [sum(1 for k in range(12) if i in sampler.active(k)) for i in range(2)]
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if block_of(n) is not None or n.startswith(ALWAYS)}


def test_optimizer_state_is_released_when_a_block_goes_frozen() -> None:
    lisa, watch = LISA(n_layers=1, interval=2, seed=0), Watch()
    module = FamilyModule("llama", n_batches=8)
    trainer = fit(module, [lisa, watch])
    sampler = LayerSampler(2, 1, 2, seed=0)
    switched = [k for k in range(2, 8, 2) if sampler.active(k) != sampler.active(k - 2)]
    assert switched, "no switch between different blocks in this run: pick another seed"
    for record in watch.steps[1:]:  # after the first step, state exists for exactly the trainable set
        if record["step"] in switched:  # state of the block just activated is created by this step
            continue
        assert record["state"] == record["trainable"]
    optimizer = trainer.optimizers[0]
    final = {id(p) for p in optimizer.state}
    frozen = [p for n, p in module.named_parameters() if block_of(n) is not None and not p.requires_grad]
    assert frozen and all(id(p) not in final and p.grad is None for p in frozen)
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    trainable_bytes = sum(p.numel() * 4 for p in module.parameters() if p.requires_grad)
    assert state_bytes <= 2 * trainable_bytes + 64 * len(optimizer.state)  # exp_avg + exp_avg_sq (+ step)


def test_switches_only_on_optimizer_step_boundaries_with_accumulation() -> None:
    lisa, watch = LISA(n_layers=1, interval=2, seed=0), Watch()
    fit(FamilyModule("llama", n_batches=16), [lisa, watch], accumulate_grad_batches=2)
    assert [s["step"] for s in watch.steps] == list(range(8))
    assert [s for s, _ in lisa.history] == [0, 2, 4, 6]
    assert sum(lisa.counts) == 8


def test_resume_replays_the_same_draws_and_weights(tmp_path) -> None:
    # 2 epochs of 5 steps straight vs 1 + checkpoint + 1; interval 3, so the resume lands inside an interval
    def run(epochs, ckpt=None, root=None):
        module = FamilyModule("llama", n_batches=5)
        lisa = LISA(n_layers=1, interval=3, seed=4)
        callbacks = [lisa]
        if root is not None:
            callbacks.append(ModelCheckpoint(dirpath=root, save_last=True))
        trainer = quiet_trainer(
            max_epochs=epochs, limit_val_batches=0, callbacks=callbacks, enable_checkpointing=root is not None
        )
        trainer.fit(module, ckpt_path=ckpt)
        assert trainer.global_step == 5 * epochs
        return module, lisa

    straight, lisa_a = run(2)
    run(1, root=tmp_path)
    resumed, lisa_b = run(2, ckpt=str(tmp_path / "last.ckpt"))
    assert lisa_a.history == lisa_b.history and lisa_a.counts == lisa_b.counts
    assert len({tuple(a) for _, a in lisa_a.history}) == 2, "the draws never switched block: a weak test"
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs after resume")


def two_step_checkpoint(tmp_path, module, interval: int) -> str:
    trainer = quiet_trainer(
        max_steps=2,
        limit_val_batches=0,
        callbacks=[LISA(n_layers=1, interval=interval)],
        enable_checkpointing=True,
        default_root_dir=tmp_path,
    )
    trainer.fit(module)
    return str(next(tmp_path.rglob("*.ckpt")))


def test_resume_with_another_configuration_is_refused(tmp_path) -> None:
    ckpt = two_step_checkpoint(tmp_path, FamilyModule("llama", n_batches=4), interval=2)
    other = quiet_trainer(max_steps=4, limit_val_batches=0, callbacks=[LISA(n_layers=1, interval=5)])
    with pytest.raises(ValueError, match="interval"):
        other.fit(FamilyModule("llama", n_batches=4), ckpt_path=str(ckpt))


def test_saved_delta_holds_only_changed_tensors_and_reproduces_the_model(tmp_path) -> None:
    lisa = LISA(n_layers=1, interval=100, seed=0, save_dir=str(tmp_path / "delta"))  # one block trains
    module = FamilyModule("llama", n_batches=4)
    fit(module, [lisa])
    tensors = load_file(tmp_path / "delta" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "delta" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LIGHTNING_PEFT_DELTA" and config["delta_format"] == "dense"
    trained = lisa.history[0][1][0]
    untouched = f"model.layers.{1 - trained}."
    assert any(k.startswith(f"model.layers.{trained}.") for k in tensors)
    assert not any(k.startswith(untouched) for k in tensors), "a block that never trained was saved"
    assert (tmp_path / "delta" / "lisa_layers.png").stat().st_size > 1000
    fresh = FamilyModule("llama", n_batches=4)  # same seed: the base weights
    load_adapter(fresh.model, tmp_path / "delta")
    for (name, a), b in zip(module.named_parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_zoo_entry_of_a_lisa_run_loads_onto_the_base(tmp_path) -> None:
    from lightning_peft import ZooPublisher, zoo

    lisa = LISA(n_layers=1, interval=2, seed=0)
    module = FamilyModule("llama", n_batches=4)
    fit(module, [lisa, ZooPublisher(name="lisa-llama", root=str(tmp_path / "zoo"), base_model="tiny-llama")])
    local = zoo.LocalZoo(tmp_path / "zoo")
    manifest = zoo.load(FamilyModule("llama").model, "lisa-llama", zoo=local)
    assert manifest["method"] == "lisa" and sum(manifest["schedule"]["steps_trained"]) == 4
    with pytest.raises(zoo.FingerprintMismatchError):
        zoo.load(FamilyModule("llama", seed=1).model, "lisa-llama", zoo=local)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_layers": 0}, "n_layers"),
        ({"n_layers": 3}, "n_layers must be between 1 and the number of blocks"),
        ({"interval": 0}, "interval"),
        ({"block_path": "model.nope"}, "nope"),
        ({"block_path": "model.norm"}, "ModuleList"),
        ({"always_on": ["model.embed_tokens", "head_that_is_not_there"]}, "head_that_is_not_there"),
    ],
)
def test_bad_input_is_refused_before_training(kwargs, message) -> None:
    module = FamilyModule("llama", n_batches=2)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    with pytest.raises(ValueError, match=message):
        fit(module, [LISA(**{"n_layers": 1, **kwargs})])
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())


class HeadOnly(FamilyModule):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.lm_head.parameters(), lr=1e-2)


def flags(module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in module.named_parameters()}


def test_an_optimizer_without_the_blocks_is_refused_and_the_module_is_given_back() -> None:
    module = HeadOnly("llama", n_batches=2)
    module.model.model.embed_tokens.requires_grad_(False)  # the user's own flags, not all True
    before = flags(module)
    lisa = LISA(n_layers=1)
    with pytest.raises(ValueError, match="optimizer lacks"):
        fit(module, [lisa])
    assert flags(module) == before, "the refusal left LISA's requires_grad flags on the module"
    assert lisa.sampler is None and lisa.block_names == [] and lisa._base is None
    # the same callback on the same module with a usable optimizer then sets up from scratch and trains
    module.__class__ = FamilyModule
    watch = Watch()
    fit(module, [lisa, watch])
    assert lisa.sampler is not None and sum(lisa.counts) == 2
    assert all(record["trainable"] >= {n for n in before if n.startswith(ALWAYS)} for record in watch.steps)


def test_a_refused_resume_gives_the_module_back(tmp_path) -> None:
    ckpt = two_step_checkpoint(tmp_path, FamilyModule("llama", n_batches=4), interval=2)
    fresh = FamilyModule("llama", n_batches=4)
    before = flags(fresh)
    lisa = LISA(n_layers=1, interval=5)
    other = quiet_trainer(max_steps=4, limit_val_batches=0, callbacks=[lisa])
    with pytest.raises(ValueError, match="interval"):
        other.fit(fresh, ckpt_path=ckpt)
    assert flags(fresh) == before and lisa.sampler is None


def test_a_second_fit_with_the_same_callback_continues_and_another_configuration_starts_afresh() -> None:
    module = FamilyModule("llama", n_batches=4)
    lisa = LISA(n_layers=1, interval=2, seed=0)
    fit(module, [lisa])
    base, first_history = lisa._base, list(lisa.history)
    fit(module, [lisa])  # identical: the same setup goes on (base fingerprint kept, counts add up)
    assert lisa._base is base and sum(lisa.counts) == 8 and lisa.history[: len(first_history)] == first_history
    lisa.n_layers, lisa.always_on = 2, ["model.norm"]  # another configuration on the same instance
    watch = Watch()
    fit(module, [lisa, watch])
    assert lisa.sampler is not None and lisa.sampler.n_layers == 2
    assert lisa.counts == [4, 4] and lisa._base is not base and lisa.always_on_names == ["model.norm"]
    names = list(flags(module))
    for record in watch.steps:  # the narrowed always-on set, not the first fit's: embeddings and head stay frozen
        expected = {n for n in names if block_of(n) is not None or n.startswith("model.model.norm.")}
        assert record["trainable"] == expected
    other = FamilyModule("llama", seed=1, n_batches=2)  # the same instance on another module: set up for it
    fit(other, [lisa])
    assert lisa._root() is other.model and sum(lisa.counts) == 4


def test_the_base_fingerprint_of_a_resumed_run_is_the_fresh_model_not_the_checkpoint(tmp_path) -> None:
    """Audit of state read before Lightning restores it: ``setup`` fingerprints the weights before the checkpoint's."""
    from lightning_peft.zoo.entry import fingerprint

    module = FamilyModule("llama", n_batches=4)
    ckpt = two_step_checkpoint(tmp_path, module, interval=3)
    fresh = FamilyModule("llama", n_batches=4)
    expected = fingerprint(fresh.model)
    lisa = LISA(n_layers=1, interval=3)
    quiet_trainer(max_steps=4, limit_val_batches=0, callbacks=[lisa]).fit(fresh, ckpt_path=ckpt)
    assert lisa._base == expected and expected != fingerprint(module.model)
    assert lisa.history == [(0, LayerSampler(2, 1, 3).active(0)), (3, LayerSampler(2, 1, 3).active(3))]


def test_plain_ddp_and_sharded_strategies_are_refused_with_what_really_happens() -> None:
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    with pytest.raises(NotImplementedError) as lisa_refusal:
        check_dynamic_strategy(DDPStrategy(), "LISA", trainable_changes=True)
    message = str(lisa_refusal.value)
    assert "parameters that were not used in producing the loss" in message
    assert "find_unused_parameters=True it trains correctly" in message and "gradient bucket for every block" in message
    assert "ddp_selective" in message and "silently" not in message and "never synchronised" not in message
    with pytest.raises(NotImplementedError) as sparse_refusal:  # ID3 and SaRA: one fixed bank, no drift
        check_dynamic_strategy(DDPStrategy(), "SaRA")
    message = str(sparse_refusal.value)
    assert "SaRA under strategy='ddp'" in message and "ddp_selective" in message
    assert "would train the same values" in message
    assert "silently" not in message and "never synchronised" not in message
    with pytest.raises(NotImplementedError, match="does not support"):
        check_dynamic_strategy(ModelParallelStrategy(), "LISA", trainable_changes=True)


def test_fsdp2_is_let_through_but_tensor_parallelism_is_refused_before_training() -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_peft.callbacks.lisa import _check_data_parallel_only

    check_dynamic_strategy(ModelParallelStrategy(), "LISA", trainable_changes=True, sharded_ok=True)  # what LISA asks
    _check_data_parallel_only(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    with pytest.raises(NotImplementedError, match="tensor_parallel_size=2") as refusal:
        _check_data_parallel_only(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2))
    assert "tensor_parallel_size=1" in str(refusal.value)


def test_a_model_no_preset_knows_trains_every_parameter_outside_the_blocks(tmp_path) -> None:
    from transformers import BertConfig

    from lightning_peft.tasks import SentenceClassifier

    BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
    ).save_pretrained(tmp_path)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randint(0, 40, (4, 6), generator=gen), torch.ones(4, 6, dtype=torch.long), torch.tensor([0, 1, 0, 1]))
        for _ in range(4)
    ]

    def run(**kwargs):
        module = SentenceClassifier(model_name=str(tmp_path), pretrained=False, lr=1e-2)
        before = {n: p.detach().clone() for n, p in module.named_parameters()}
        lisa = LISA(n_layers=1, interval=2, block_path="encoder.encoder.layer", backbone="model", **kwargs)
        trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[lisa])
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
        changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
        return lisa, changed

    lisa, changed = run()
    assert lisa.always_on_names == ["encoder.embeddings", "classifier"]
    assert {"model.classifier.weight", "model.classifier.bias"} <= changed, "the classifier head never trained"
    assert "model.encoder.embeddings.word_embeddings.weight" in changed
    trained_blocks = {i for i, c in enumerate(lisa.counts) if c > 0}
    assert {n for n in changed if ".layer." in n} == {
        n for n in changed if any(f"encoder.encoder.layer.{i}." in n for i in trained_blocks)
    }
    narrow, changed = run(always_on=["classifier"])  # always_on narrows the default
    assert narrow.always_on_names == ["classifier"]
    assert "model.classifier.weight" in changed and not any("embeddings" in n for n in changed)


@pytest.mark.slow
def test_ddp_selective_keeps_ranks_identical_and_equals_one_process(tmp_path) -> None:
    ranks, logs = run_two_ranks("ddp_scheduled.py", tmp_path)
    assert logs[0]["step"] == logs[1]["step"] == 8
    assert set(logs[0]["seeds"]).isdisjoint(logs[1]["seeds"]), "ranks saw the same data: not a real DDP test"
    sampler = LayerSampler(2, 1, 2, seed=0)
    assert len({tuple(sampler.active(k)) for k in range(0, 8, 2)}) == 2, "never switched: a weak test"
    for a, b in zip(logs[0]["steps"], logs[1]["steps"], strict=True):
        assert a["trainable"] == b["trainable"] and a["with_grad"] == b["with_grad"]
    for key in ranks[0]:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0, msg=f"{key} differs across ranks")
    # and the 2-rank result is the 1-process result on the same global batches
    single = PairModule([log["seeds"] for log in logs], name="llama", lr=1e-2)
    fit(single, [LISA(n_layers=1, interval=2, seed=0)])
    state = single.state_dict()
    for key, value in ranks[0].items():
        torch.testing.assert_close(value, state[key], rtol=1e-4, atol=1e-5, msg=f"{key}: DDP differs from 1 process")
    assert (tmp_path / "delta" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_plain_ddp_is_refused_with_the_fix(tmp_path) -> None:
    _ = run_two_ranks("ddp_scheduled.py", tmp_path, "ddp")
    assert "ddp_selective" in (tmp_path / "error0.txt").read_text()
    assert not (tmp_path / "rank0.safetensors").exists()


def test_selective_ddp_strategy_is_registered() -> None:
    trainer = quiet_trainer(strategy="ddp_selective", devices=1, max_steps=1)
    assert isinstance(trainer.strategy, SelectiveDDPStrategy)


@pytest.mark.slow
def test_what_the_refusal_says_is_what_plain_ddp_does(tmp_path) -> None:
    _, logs = run_two_ranks("ddp_scheduled.py", tmp_path / "plain", "ddp_unchecked")
    assert "parameters that were not used in producing the loss" in (tmp_path / "plain" / "error0.txt").read_text()
    ranks, logs = run_two_ranks("ddp_scheduled.py", tmp_path / "unused", "ddp_find_unused")
    assert logs[0]["step"] == logs[1]["step"] == 8  # with find_unused_parameters=True it trains, ranks equal
    for key in ranks[0]:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0, msg=f"{key} differs across ranks")
