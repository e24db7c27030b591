"""The AdaLoRA callback in real Lightning fits on CPU: pruning, peft interop, resume, accumulation, DDP, bad input."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lit_helpers import FamilyModule, moved_key, quiet_trainer
from tiny_models import FAMILIES, forward
from torch.utils.data import DataLoader

from lightning_peft import AdaLoRA
from lightning_peft.adapters import SVDLoRALayer, adapter_layers, load_adapter, read_adapter_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one intra-op thread is faster, and far faster on a busy machine (no oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def lora_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if ".lora_" in k}


def svd_layers(module: torch.nn.Module) -> list[tuple[str, SVDLoRALayer]]:
    layers = [(n, layer) for n, layer in adapter_layers(module) if isinstance(layer, SVDLoRALayer)]
    assert layers, "no SVD adapter layer"
    return layers


@dataclass
class Fitted:
    module: FamilyModule
    callback: AdaLoRA
    folder: Path
    before: dict[str, torch.Tensor]  # the module's state before injection
    metrics: dict[str, torch.Tensor]  # trainer.callback_metrics at the end


def fit_adalora(name: str, n_batches: int, folder: Path, **kwargs) -> Fitted:
    module = FamilyModule(name, n_batches=n_batches)
    config = dict(r=6, target_r=2, tinit=2, tfinal=2, deltaT=1, backbone="model")
    callback = AdaLoRA(**{**config, **kwargs}, save_dir=str(folder))
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[callback])
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer.fit(module)
    assert trainer.global_step == n_batches
    return Fitted(module, callback, folder, before, dict(trainer.callback_metrics))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One 12-step AdaLoRA fit per family, shared by the tests that only read its results."""
    cache: dict[str, Fitted] = {}

    def get(name: str) -> Fitted:
        if name not in cache:
            cache[name] = fit_adalora(name, n_batches=12, folder=tmp_path_factory.mktemp(f"adalora_{name}") / "adapter")
        return cache[name]

    return get


# ------------------------------------------------------------------------------------------------- fit
@pytest.mark.parametrize("name", ["llama", "vit"])
def test_fit_prunes_shrinks_saves_and_reloads(name: str, fitted) -> None:
    run = fitted(name)
    module, callback, folder = run.module, run.callback, run.folder
    layers = svd_layers(module.model)
    n_layers = len(layers)
    assert n_layers == len(callback.adapted) > 1

    # the frozen backbone is bit-for-bit untouched
    after = module.state_dict()
    for key, value in run.before.items():
        torch.testing.assert_close(after[moved_key(key, callback)], value, rtol=0, atol=0)

    # every layer was physically shrunk to the triplets it kept
    ranks = {}
    for layer_name, layer in layers:
        assert layer.kept is not None and len(layer.kept) == layer.init_r == 6, layer_name
        kept = sum(layer.kept)
        assert layer.r == kept, layer_name
        assert layer.lora_A.shape[0] == layer.lora_E.shape[0] == layer.lora_B.shape[1] == kept, layer_name
        ranks[layer_name] = kept
    assert sum(ranks.values()) == 2 * n_layers  # target_r x layers (no ties among float scores)
    assert len(set(ranks.values())) > 1, f"every layer kept the same rank: not adaptive ({ranks})"
    assert callback.allocator is None  # released after saving

    # the budget was logged and reached its target
    metrics = run.metrics
    assert float(metrics["adalora/budget"]) == 2 * n_layers
    assert float(metrics["adalora/kept_ranks"]) == 2 * n_layers

    # the picture and the adapter in peft's AdaLoRA format
    picture = folder / "adalora_ranks.png"
    assert picture.is_file() and picture.read_bytes()[:8] == PNG_MAGIC
    config = read_adapter_config(folder)
    assert config["peft_type"] == "ADALORA" and config["init_r"] == 6 and config["target_r"] == 2
    assert config["total_step"] == 12
    assert config["rank_pattern"] == {f"{n}.lora_E": layer.kept for n, layer in layers}

    # the saved adapter rebuilds the trained, shrunk model on a fresh base
    fresh = FAMILIES[name](seed=0).eval()
    load_adapter(fresh, folder)
    assert {n: layer.r for n, layer in svd_layers(fresh)} == ranks
    with torch.no_grad():
        torch.testing.assert_close(forward(name, fresh), forward(name, module.model.eval()))


# ---------------------------------------------------------------------------------------- peft interop
def test_trained_adapter_loads_in_peft(fitted) -> None:
    peft = pytest.importorskip("peft")
    run = fitted("llama")
    module, folder = run.module, run.folder
    loaded = peft.PeftModel.from_pretrained(FAMILIES["llama"](seed=0), str(folder)).eval()
    with torch.no_grad():
        ours = forward("llama", module.model.eval(), seed=3)
        theirs = forward("llama", loaded, seed=3)
    assert not torch.equal(ours, forward("llama", FAMILIES["llama"](seed=0).eval(), seed=3).detach()), (
        "the adapter changes nothing: the comparison would be vacuous"
    )
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_peft_adalora_adapter_loads_here(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    config = peft.AdaLoraConfig(
        init_r=4,
        target_r=2,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        total_step=10,
        init_lora_weights=False,
    )
    peft_model = peft.get_peft_model(FAMILIES["llama"](seed=0), config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    pattern = {
        "model.layers.0.self_attn.q_proj.lora_E": [True, False, True, True],
        "model.layers.1.self_attn.v_proj.lora_E": [False, True, False, False],
        "model.layers.1.mlp.down_proj.lora_E": [False, False, False, False],  # a layer pruned to rank 0
    }
    with torch.no_grad():  # what peft's RankAllocator does to pruned triplets: E = 0
        for key, keep in pattern.items():
            layer = peft_model.base_model.model.get_submodule(key.removesuffix(".lora_E"))
            layer.lora_E["default"][~torch.tensor(keep)] = 0.0
    peft_model.peft_config["default"].rank_pattern = pattern
    with torch.no_grad():
        expected = forward("llama", peft_model, seed=5)
    peft_model.save_pretrained(str(tmp_path))

    fresh = FAMILIES["llama"](seed=0).eval()
    injected = load_adapter(fresh, tmp_path)
    assert injected is not None and injected.r == 4 and injected.alpha == 8
    ranks = {n: layer.r for n, layer in svd_layers(fresh)}
    assert len(ranks) == 6
    assert ranks["model.layers.0.self_attn.q_proj"] == 3
    assert ranks["model.layers.1.self_attn.v_proj"] == 1
    assert ranks["model.layers.1.mlp.down_proj"] == 0
    assert ranks["model.layers.0.self_attn.v_proj"] == 4  # not in the rank pattern: full rank
    with torch.no_grad():
        ours = forward("llama", fresh, seed=5)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


# -------------------------------------------------------------------------------------------- resume
class Snapshot(Callback):
    """Keeps the allocator's state at the end of fit, before AdaLoRA releases it."""

    def __init__(self) -> None:
        self.alloc_state: dict | None = None

    def on_train_end(self, trainer, pl_module) -> None:
        ada = next(c for c in trainer.callbacks if isinstance(c, AdaLoRA))
        self.alloc_state = ada.allocator.state_dict()


def test_resume_continues_exactly(tmp_path) -> None:
    def run(max_epochs: int, ckpt_path: str | None = None, save: bool = False) -> tuple[dict, dict]:
        torch.manual_seed(0)
        module = FamilyModule("vit", n_batches=6)
        snapshot = Snapshot()
        # no dropout: Lightning does not checkpoint the global RNG; total_step fixed so both runs share the schedule
        callbacks = [AdaLoRA(r=4, target_r=2, tinit=2, tfinal=2, deltaT=1, total_step=12), snapshot]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, filename="mid", save_last=False))
        trainer = quiet_trainer(
            max_epochs=max_epochs, limit_val_batches=0, callbacks=callbacks, enable_checkpointing=save
        )
        trainer.fit(module, ckpt_path=ckpt_path)
        assert trainer.global_step == 6 * max_epochs
        return lora_state(module), snapshot.alloc_state

    straight, straight_alloc = run(2)
    _, mid_alloc = run(1, save=True)
    ckpt = torch.load(tmp_path / "mid.ckpt", weights_only=False)
    saved = next(v for k, v in ckpt["callbacks"].items() if k.startswith("AdaLoRA"))
    assert saved["allocator"]["history"] == [list(h) for h in mid_alloc["history"]]
    assert mid_alloc["history"] and mid_alloc["rank_pattern"] is None  # checkpointed in the middle of the decay
    resumed, resumed_alloc = run(2, ckpt_path=str(tmp_path / "mid.ckpt"))

    assert straight_alloc["history"] == resumed_alloc["history"]
    assert [s for s, _ in straight_alloc["history"]] == list(range(3, 11))  # decay 3..9, frozen at 10
    assert straight_alloc["updates"] == resumed_alloc["updates"] == 10  # importance stops when the pattern freezes
    for a, b in zip(straight_alloc["masks"], resumed_alloc["masks"], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight_alloc["rank_pattern"], resumed_alloc["rank_pattern"], strict=True):
        assert torch.equal(a, b)
    for key in ("exp_avg_ipt", "exp_avg_unc"):
        torch.testing.assert_close(resumed_alloc[key], straight_alloc[key], rtol=0, atol=1e-6)
    assert straight.keys() == resumed.keys() and any(k.endswith("lora_E") for k in straight)
    for key in straight:  # after the shrink: the same shapes and values
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)


# ------------------------------------------------------------------------------------ accumulation
class BatchedModule(FamilyModule):
    """FamilyModule with ``batch_size`` seeds per batch; the loss is the mean over equally sized samples."""

    def __init__(self, batch_size: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        from lit_helpers import SeedDataset

        return DataLoader(SeedDataset(self.hparams.n_batches), batch_size=self.batch_size, shuffle=False)


def test_gradient_accumulation_keeps_the_optimizer_step_schedule() -> None:
    def run(batch_size: int, accumulate: int) -> tuple[int, dict, dict]:
        torch.manual_seed(0)  # the same adapter initialisation in both runs
        module = BatchedModule(batch_size, name="vit", n_batches=40)
        snapshot = Snapshot()
        callback = AdaLoRA(r=4, target_r=2, tinit=2, tfinal=2, deltaT=2)
        trainer = quiet_trainer(
            max_epochs=1, limit_val_batches=0, accumulate_grad_batches=accumulate, callbacks=[callback, snapshot]
        )
        trainer.fit(module)
        return trainer.global_step, snapshot.alloc_state, lora_state(module)

    steps_acc, alloc_acc, lora_acc = run(batch_size=1, accumulate=4)
    steps_big, alloc_big, lora_big = run(batch_size=4, accumulate=1)
    assert steps_acc == steps_big == 10
    assert alloc_acc["total_step"] == alloc_big["total_step"] == 10  # optimizer steps, not micro-batches
    assert alloc_acc["history"] == alloc_big["history"]
    assert [s for s, _ in alloc_acc["history"]] == [4, 6, 8]  # every deltaT=2 steps of the decay, frozen at 8
    assert alloc_acc["updates"] == alloc_big["updates"] == 8
    for a, b in zip(alloc_acc["masks"], alloc_big["masks"], strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(alloc_acc["exp_avg_ipt"], alloc_big["exp_avg_ipt"], rtol=1e-3, atol=1e-9)
    assert lora_acc.keys() == lora_big.keys()
    for key in lora_acc:
        torch.testing.assert_close(lora_acc[key], lora_big[key], rtol=1e-4, atol=1e-5, msg=key)


# ---------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_masks_and_adapters_identical_on_both_ranks(tmp_path) -> None:
    from safetensors.torch import load_file
    from test_ddp import run_script

    run_script("ddp_adalora.py", tmp_path)
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [len(log["steps"]) for log in logs] == [8, 8]
    assert set(logs[0]["seeds"]).isdisjoint(logs[1]["seeds"]), "ranks saw the same data: not a real DDP test"
    for s0, s1 in zip(logs[0]["steps"], logs[1]["steps"], strict=True):
        assert s0["step"] == s1["step"]
        assert s0["budget"] == s1["budget"], s0["step"]
        assert s0["masks"] == s1["masks"], s0["step"]
        assert s0["ema"] == s1["ema"], s0["step"]
    budgets = [s["budget"] for s in logs[0]["steps"]]
    n_layers = len(logs[0]["steps"][0]["masks"])
    assert budgets[0] == 4 * n_layers and budgets[-1] == 2 * n_layers
    assert len(set(budgets)) > 2, budgets  # the budget decayed over several masking steps
    assert sum(sum(m) for m in logs[0]["steps"][-1]["masks"]) == 2 * n_layers

    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and any(k.endswith(".lora_E") for k in ranks[0])
    for key in ranks[0]:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0, msg=f"{key} differs across ranks")
    # rank 0 wrote the adapter once, with the shrunk, synchronised tensors
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for key, value in ranks[0].items():
        torch.testing.assert_close(saved["base_model.model." + key.removeprefix("model.")], value, rtol=0, atol=0)
    assert (tmp_path / "adapter" / "adalora_ranks.png").read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------------------------- FSDP2
def test_fsdp2_with_sharded_adapters_is_refused_before_training() -> None:
    """AdaLoRA runs under FSDP2 when lightning_peft.shard keeps its adapters whole (tests/test_fsdp2_methods.py); a
    plain fully_shard of the whole model shards them too, which scores cannot use: refused, naming the fix."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    class PlainSharded(FamilyModule):
        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.model, mesh=self.device_mesh["data_parallel"])

    env = dict(os.environ)
    module = PlainSharded("vit", n_batches=2)
    trainer = quiet_trainer(strategy=ModelParallelStrategy(), max_steps=2, callbacks=[AdaLoRA(r=4, target_r=2)])
    try:
        with pytest.raises(NotImplementedError, match=r"were sharded by FSDP2.*lightning_peft.shard"):
            trainer.fit(module)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)
    assert trainer.global_step == 0
    assert not list(adapter_layers(module))  # taken out again: the refusal came before training


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs",
    [
        {"r": 4, "target_r": 8},
        {"tinit": 10, "tfinal": 10, "total_step": 15},
        {"tinit": 5, "tfinal": 5, "total_step": 10},
        {"beta1": 1.0},
        {"deltaT": 0},
        {"orth_reg_weight": -1.0},
    ],
)
def test_bad_hyperparameters_fail_at_construction(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        AdaLoRA(**kwargs)


def test_schedule_longer_than_the_run_fails_before_training(tmp_path) -> None:
    module = FamilyModule("vit", n_batches=8)
    out = tmp_path / "adapter"
    trainer = quiet_trainer(
        max_steps=5, limit_val_batches=0, callbacks=[AdaLoRA(r=4, target_r=2, tinit=3, tfinal=3, save_dir=str(out))]
    )
    with pytest.raises(ValueError, match="total_step"):
        trainer.fit(module)
    assert trainer.global_step == 0 and not out.exists()


def test_infinite_run_without_total_step_fails() -> None:
    trainer = quiet_trainer(max_epochs=-1, limit_val_batches=0, callbacks=[AdaLoRA(r=4, target_r=2)])
    with pytest.raises(ValueError, match="finite"):
        trainer.fit(FamilyModule("vit", n_batches=2))
    assert trainer.global_step == 0


def test_total_step_shorter_than_the_run_warns_and_freezes() -> None:
    module = FamilyModule("vit", n_batches=6)
    callback = AdaLoRA(r=4, target_r=2, tinit=1, tfinal=1, total_step=4)
    snapshot = Snapshot()
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[callback, snapshot])
    with pytest.warns(UserWarning, match="total_step=4 is shorter than the 6"):
        trainer.fit(module)
    assert trainer.global_step == 6
    state = snapshot.alloc_state
    assert [s for s, _ in state["history"]] == [2, 3]  # decay at 2, frozen at 3 = total_step - tfinal
    assert state["updates"] == 3  # importance only for steps 0..2
    assert sum(int(m.sum()) for m in state["masks"]) == 2 * len(state["names"])
    assert all(torch.equal(a, b) for a, b in zip(state["masks"], state["rank_pattern"], strict=True))


def test_total_step_covering_the_run_does_not_warn() -> None:
    trainer = quiet_trainer(
        max_epochs=1, limit_val_batches=0, callbacks=[AdaLoRA(r=4, target_r=2, tinit=1, tfinal=1, total_step=3)]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(FamilyModule("vit", n_batches=3))
    assert not [w for w in caught if "AdaLoRA" in str(w.message)]


def test_resume_with_another_rank_is_refused(tmp_path) -> None:
    callbacks = [AdaLoRA(r=6, target_r=2, tinit=1, tfinal=1, total_step=8)]
    callbacks.append(ModelCheckpoint(dirpath=tmp_path, filename="mid", save_last=False))
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=callbacks, enable_checkpointing=True)
    trainer.fit(FamilyModule("vit", n_batches=4))
    assert (tmp_path / "mid.ckpt").is_file()

    other = AdaLoRA(r=4, target_r=2, tinit=1, tfinal=1, total_step=8)
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[other])
    # the model's weights are restored before any callback state: torch's own shape error names the tensors
    with pytest.raises(RuntimeError, match="size mismatch for model.blocks.0.attn.qkv.lora_A"):
        trainer.fit(FamilyModule("vit", n_batches=4), ckpt_path=tmp_path / "mid.ckpt")
    assert trainer.global_step == 0


def test_resume_with_another_schedule_is_refused(tmp_path) -> None:
    torch.manual_seed(0)
    callbacks = [AdaLoRA(r=4, target_r=2, tinit=1, tfinal=1, total_step=8)]
    callbacks.append(ModelCheckpoint(dirpath=tmp_path, filename="mid", save_last=False))
    quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=callbacks, enable_checkpointing=True).fit(
        FamilyModule("vit", n_batches=4)
    )
    other = AdaLoRA(r=4, target_r=1, tinit=1, tfinal=1, total_step=8)
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[other])
    with pytest.raises(ValueError, match="target_r: checkpoint 2 vs callback 1"):
        trainer.fit(FamilyModule("vit", n_batches=4), ckpt_path=tmp_path / "mid.ckpt")


def test_state_key_ignores_rank_so_a_changed_rank_reaches_the_check() -> None:
    assert AdaLoRA(r=4, target_r=2).state_key == AdaLoRA(r=6, target_r=2).state_key
    assert AdaLoRA(target_modules=["q_proj"]).state_key != AdaLoRA(target_modules=["v_proj"]).state_key


def test_resume_reports_the_total_step_it_uses(tmp_path) -> None:
    torch.manual_seed(0)
    callbacks = [AdaLoRA(r=4, target_r=2, tinit=1, tfinal=1)]  # total_step from the run: 3
    callbacks.append(ModelCheckpoint(dirpath=tmp_path, filename="mid", save_last=False))
    quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=callbacks, enable_checkpointing=True).fit(
        FamilyModule("vit", n_batches=3)
    )
    callback = AdaLoRA(r=4, target_r=2, tinit=1, tfinal=1, save_dir=str(tmp_path / "adapter"))  # the run is 6 now
    snapshot = Snapshot()
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[callback, snapshot])
    try:
        trainer.fit(FamilyModule("vit", n_batches=3), ckpt_path=tmp_path / "mid.ckpt")
    except ValueError as err:  # refusing the changed schedule is a fine answer too
        assert "total_step" in str(err)
        return
    used = snapshot.alloc_state["total_step"]
    assert read_adapter_config(tmp_path / "adapter")["total_step"] == used
    assert callback.config.total_step == used


def test_second_fit_with_a_layer_pruned_to_rank_zero() -> None:
    torch.manual_seed(0)
    module = FamilyModule("vit", n_batches=4)
    callback = AdaLoRA(r=4, target_r=2, tinit=1, tfinal=1, total_step=4)
    quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[callback]).fit(module)
    layers = svd_layers(module.model)
    n_layers = len(layers)
    first = layers[0][1]
    first.shrink(torch.zeros(first.r, dtype=torch.bool))  # a layer pruned away completely
    ranks_before = [layer.r for _, layer in layers]

    snapshot = Snapshot()
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[callback, snapshot])
    trainer.fit(module)
    assert trainer.global_step == 4
    assert len(svd_layers(module.model)) == n_layers
    assert snapshot.alloc_state["updates"] == 3  # importance measured at steps 0..2 despite the empty layer
    ranks_after = [layer.r for _, layer in svd_layers(module.model)]
    assert ranks_after[0] == 0 and all(a <= b for a, b in zip(ranks_after, ranks_before, strict=True))


def test_budget_and_ranks_per_layer_reach_the_logger(tmp_path) -> None:
    import csv

    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="run")
    callback = AdaLoRA(r=4, target_r=2, tinit=1, tfinal=1, total_step=6)
    quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[callback], logger=logger, log_every_n_steps=1).fit(
        FamilyModule("vit", n_batches=6)
    )
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert "adalora/budget" in columns
    rank_columns = sorted(c for c in columns if c.startswith("adalora/rank/"))
    assert "adalora/rank/blocks.0.attn.qkv" in rank_columns and len(rank_columns) == 8  # 2 blocks x 4 layers
    last = [float(r[c]) for r in rows for c in rank_columns if r.get(c)][-8:]
    assert sum(last) == 2 * 8  # the frozen final pattern holds target_r per layer on average


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True  # what EarlyStopping does


def test_a_run_stopped_before_the_schedule_ends_says_so(tmp_path) -> None:
    from lightning_peft import ZooPublisher, zoo

    callback = AdaLoRA(r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, save_dir=str(tmp_path / "adapter"))
    publisher = ZooPublisher(name="stopped", root=str(tmp_path / "zoo"), base_model="tiny-vit")
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[callback, publisher, StopAt(3)])
    with pytest.warns(UserWarning, match="stopped at step 3 of the 8 its schedule planned"):
        trainer.fit(FamilyModule("vit", n_batches=8))
    folder = Path(zoo.download("stopped", zoo=zoo.LocalZoo(tmp_path / "zoo")))
    schedule = json.loads((folder / "lightning_peft.json").read_text())["schedule"]
    assert schedule["finished"] is False and (schedule["stopped_at"], schedule["planned_steps"]) == (3, 8)
    card = (folder / "README.md").read_text()
    assert "stopped before the adalora schedule finished" in card and "step 3 of 8" in card
    # the save_dir's manifest says so too, and so does the card a push of it gets
    assert json.loads((tmp_path / "adapter" / "lightning_peft.json").read_text())["schedule"]["finished"] is False
    zoo.publish_folder(tmp_path / "adapter", "stopped-save-dir", zoo=zoo.LocalZoo(tmp_path / "zoo"))
    pushed = zoo.download("stopped-save-dir", zoo=zoo.LocalZoo(tmp_path / "zoo")) / "README.md"
    assert "stopped before the adalora schedule finished" in pushed.read_text()
    # a run that ends its schedule says it finished
    done = AdaLoRA(r=4, target_r=2, tinit=1, tfinal=1, total_step=3)
    quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[done]).fit(FamilyModule("vit", n_batches=3))
    assert done.schedule()["finished"] is True and "stopped_at" not in done.schedule()
