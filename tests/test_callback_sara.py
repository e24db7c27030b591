"""The SaRA callback on tiny diffusion models: selection, O(selected) training, penalty, re-selection, resume, DDP."""

from __future__ import annotations

import json
import os

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lit_helpers import FamilyModule, quiet_trainer, run_two_ranks
from safetensors.torch import load_file
from tiny_models import forward

from lightning_peft import SaRA
from lightning_peft.adapters import load_adapter
from lightning_peft.adapters.sparse import BANK_NAME, sparse_layers
from lightning_peft.strategies import check_dynamic_strategy


def fit(module, callbacks, **kwargs):
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=callbacks, **kwargs)
    trainer.fit(module)
    return trainer


def smallest(weight: torch.Tensor, fraction: float) -> torch.Tensor:
    """Brute force: the ``round(fraction * numel)`` flat positions of smallest ``|w|`` (ties by position), sorted."""
    flat = weight.detach().reshape(-1).tolist()
    k = round(fraction * len(flat))
    return torch.tensor(sorted(sorted(range(len(flat)), key=lambda i: (abs(flat[i]), i))[:k]), dtype=torch.long)


def bank_name(module) -> str:
    return next(n for n, _ in module.named_parameters() if n.endswith(f"{BANK_NAME}.values"))


def selected(sara: SaRA, module) -> dict[str, torch.Tensor]:
    """``{"<layer>.<param>": sorted active flat positions}``."""
    return {
        f"{name}.{p}": layer.active_indices(p).sort().values.clone()
        for name, layer in sara.layers(module)
        for p in layer.param_names
    }


def output(family: str, model) -> torch.Tensor:
    with torch.no_grad():
        return forward(family, model, batch=2, seed=123)


class Watch(Callback):
    """The selection at train start; at every optimizer step, which parameters have a gradient."""

    def __init__(self, sara: SaRA) -> None:
        self.sara, self.start, self.with_grad = sara, {}, []

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = selected(self.sara, pl_module.model)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.with_grad.append({n for n, p in pl_module.named_parameters() if p.grad is not None})


# ----------------------------------------------------------------------------------------------- fit


@pytest.mark.parametrize("family", ["unet", "dit"])
def test_fit_trains_exactly_the_smallest_entries_with_o_selected_state(family: str) -> None:
    module = FamilyModule(family, n_batches=3)
    base = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    sara = SaRA(fraction=0.1, rank_penalty=1e-3)
    watch = Watch(sara)
    trainer = fit(module, [sara, watch])
    assert sara.targets and all(f"{t}.weight" in base for t in sara.targets)
    # the selection at train start is the smallest 10% of every target weight, by a brute-force sort of the base
    assert sorted(watch.start) == sorted(f"{t}.weight" for t in sara.targets)
    for key, picked in watch.start.items():
        assert torch.equal(picked, smallest(base[key], 0.1)), f"{key}: another selection"
    n_selected = sum(v.numel() for v in watch.start.values())
    # only the bank has a gradient; the optimizer holds state for it alone, of its size
    bank = bank_name(module)
    assert watch.with_grad == [{bank}] * 3
    state = trainer.optimizers[0].state
    assert [{k: tuple(v.shape) for k, v in s.items() if v.dim()} for s in state.values()] == [
        {"exp_avg": (n_selected,), "exp_avg_sq": (n_selected,)}
    ]
    assert n_selected < 0.11 * sum(base[f"{t}.weight"].numel() for t in sara.targets)
    assert n_selected < 0.02 * sum(p.numel() for p in base.values())
    # the selected entries changed; every other entry of every tensor is bit-identical to the base
    layers = dict(sara.layers(module))
    for name, tensor in base.items():
        owner, _, pname = name.rpartition(".")
        if name in watch.start:
            after = layers[owner].base_layer.get_parameter(pname).detach().reshape(-1)
            picked = watch.start[name]
            touched = torch.zeros_like(after, dtype=torch.bool)
            touched[picked] = True
            assert torch.equal(after[~touched], tensor.reshape(-1)[~touched]), f"{name}: an unselected entry moved"
            assert bool((after[picked] != tensor.reshape(-1)[picked]).all()), f"{name}: a selected entry did not train"
        else:
            now = layers[owner].base_layer.get_parameter(pname) if owner in layers else module.model.get_parameter(name)
            assert torch.equal(now, tensor), f"{name} is not a target but changed"


# ----------------------------------------------------------------------------------------------- penalty


class ZeroLoss(FamilyModule):
    """The loss is ``0 * output``: the data gradient of every trained value is exactly zero."""

    def training_step(self, batch, batch_idx):
        return 0 * super().training_step(batch, batch_idx)


class Jolt(Callback):
    """Start the update at small random values (the penalty's gradient at ``ΔW = 0`` is zero)."""

    def __init__(self, sara: SaRA) -> None:
        self.sara = sara

    def on_train_start(self, trainer, pl_module) -> None:
        values = self.sara.bank_of(pl_module).values
        with torch.no_grad():
            values.copy_(0.01 * torch.randn(values.shape, generator=torch.Generator().manual_seed(0)))


class GradBefore(Callback):
    def __init__(self) -> None:
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grad = dict(pl_module.named_parameters())[bank_name(pl_module)].grad
        self.grads.append(None if grad is None else grad.clone())


class PenaltyCheck(Callback):
    """After SaRA's hook: the gradient it added, and what the nuclear norm's autograd gradient says it should be."""

    def __init__(self, sara: SaRA, lam: float) -> None:
        self.sara, self.lam = sara, lam
        self.added, self.expected, self.reported, self.estimate, self.scales, self.shapes = [], [], [], [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        bank = self.sara.bank_of(pl_module)
        eligible = self.sara.eligible(pl_module)
        picks = self.sara.selector.penalty_matrices(trainer.global_step, len(eligible))
        scale = 1 / len(picks)  # λ / drawn per drawn matrix: the reference's strength (optim/adamw2.py)
        expected = torch.zeros_like(bank.values, dtype=torch.float64)
        estimate = 0.0
        for i in picks:
            layer, pname = eligible[i]
            weight = layer.base_layer.get_parameter(pname)
            indices, values = layer.delta(pname)
            dense = torch.zeros(weight.numel(), dtype=torch.float64)
            dense[indices] = values.double()
            matrix = dense.view(weight.shape[0], -1).requires_grad_(True)
            s = torch.linalg.svdvals(matrix.detach())
            assert float(s[-1]) > 1e-3 * float(s[0]), "ΔW is rank-deficient: autograd's gradient is not unique"
            nuc = torch.linalg.matrix_norm(matrix, "nuc")
            (grad,) = torch.autograd.grad(nuc, matrix)
            expected[layer.active_slots(pname)] += self.lam * scale * grad.reshape(-1)[layer.active_indices(pname)]
            estimate += self.lam * scale * float(nuc.detach())
            self.shapes.append(tuple(weight.shape))
        self.added.append(bank.values.grad.clone())
        self.expected.append(expected.float())
        self.reported.append(self.sara.penalty)
        self.estimate.append(estimate)
        self.scales.append(len(eligible) / len(picks))


def test_penalty_gradient_is_lambda_scale_times_the_nuclear_norm_gradient_at_the_trained_entries() -> None:
    lam = 0.3
    sara = SaRA(fraction=0.5, rank_penalty=lam, penalty_matrices=3, target_modules=["attn1.to_q", "conv1"])
    before, check = GradBefore(), PenaltyCheck(sara, lam)
    module = ZeroLoss("unet", n_batches=3)
    fit(module, [before, sara, Jolt(sara), check])
    assert len(check.added) == 3
    assert any(len(s) == 4 for s in check.shapes), "no conv weight was penalised: a weak test"
    assert all(s > 1 for s in check.scales), "every eligible matrix was drawn: the scale is not tested"
    for step, (grad0, added, expected) in enumerate(zip(before.grads, check.added, check.expected, strict=True)):
        assert grad0 is not None and not bool(grad0.any()), "the data gradient is not zero"
        assert float(expected.abs().max()) > 1e-3, "no penalty gradient to compare"
        torch.testing.assert_close(added, expected, rtol=0, atol=1e-5, msg=f"step {step}")  # float32 SVD
        assert bool((added[expected == 0] == 0).all()), "gradient outside the drawn matrices' trained entries"
    assert check.reported == pytest.approx(check.estimate, rel=1e-5)


def test_the_default_penalty_strength_is_the_reference_one_matrix_per_step() -> None:
    """sjtuplayer/SaRA optim/adamw2.py: one random matrix a step gets ``λ · mask ⊙ U Vᵀ`` (not ``N`` times it)."""
    lam = 5e-4
    sara = SaRA(fraction=0.5, rank_penalty=lam, target_modules=["attn1.to_q", "attn1.to_k", "conv1"])
    check = PenaltyCheck(sara, lam)
    fit(ZeroLoss("unet", n_batches=3), [sara, Jolt(sara), check])
    assert all(ratio > 2 for ratio in check.scales), "few eligible matrices: the old N-times strength would pass"
    for added, expected in zip(check.added, check.expected, strict=True):  # expected: the reference's autograd
        assert float(expected.abs().max()) > 1e-6
        torch.testing.assert_close(added, expected, rtol=1e-4, atol=1e-9)


def nuclear_norm_of_update(lam: float) -> tuple[float, float]:
    """Sum of ‖ΔW‖_* over the target matrices, and the final loss, after 8 steps of the same data and seed."""
    sara = SaRA(fraction=0.1, rank_penalty=lam, penalty_matrices=100)
    module = FamilyModule("dit", n_batches=8)
    trainer = fit(module, [sara])
    total = 0.0
    for _, layer in sara.layers(module):
        weight = layer.base_layer.weight
        indices, values = layer.delta("weight")
        dense = torch.zeros(weight.numel())
        dense[indices] = values
        total += float(torch.linalg.matrix_norm(dense.view(weight.shape[0], -1), "nuc"))
    return total, float(trainer.callback_metrics["train_loss"])


def test_a_large_penalty_makes_the_update_lower_rank() -> None:
    free, _ = nuclear_norm_of_update(0.0)
    penalised, _ = nuclear_norm_of_update(1.0)
    assert free > 0
    assert penalised < 0.25 * free, f"‖ΔW‖_* {penalised:.4f} with the penalty vs {free:.4f} without"


# ----------------------------------------------------------------------------------------------- re-selection


class Snapshot(Callback):
    """Bank, optimizer state, selection and weights (as found, then synced) at the batch start of ``step``."""

    def __init__(self, sara: SaRA, step: int) -> None:
        self.sara, self.step, self.taken = sara, step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step or self.taken is not None:
            return
        bank = self.sara.bank_of(pl_module)
        state = trainer.optimizers[0].state[bank.values]
        layers = {}
        for name, layer in self.sara.layers(pl_module):
            raw = layer.base_layer.weight.detach().clone()
            layer.sync()  # what a forward would show (the weights are refreshed lazily)
            indices, delta = layer.delta("weight")
            layers[name] = {
                "raw": raw,
                "weight": layer.base_layer.weight.detach().clone(),
                "active": layer.active_indices("weight").clone(),
                "slots": layer.active_slots("weight").clone(),
                "delta": dict(zip(indices.tolist(), delta.tolist(), strict=True)),
            }
        self.taken = {
            "values": bank.values.detach().clone(),
            "exp_avg": state["exp_avg"].clone(),
            "exp_avg_sq": state["exp_avg_sq"].clone(),
            "layers": layers,
        }


def test_reselection_follows_the_current_weights_and_keeps_what_stays(tmp_path) -> None:
    sara = SaRA(fraction=0.1, rank_penalty=0.1, reselect_at=2, save_dir=str(tmp_path / "delta"))
    pre, post = Snapshot(sara, 2), Snapshot(sara, 2)  # just before SaRA's hook, and just after it
    module = FamilyModule("dit", n_batches=4)
    fit(module, [pre, sara, post])
    a, b = pre.taken, post.taken
    left_total = 0
    saved = load_file(tmp_path / "delta" / "adapter_model.safetensors")
    for name, old in a["layers"].items():
        new = b["layers"][name]
        # the weights are unchanged by re-selection (before any later update), with or without a sync
        assert torch.equal(new["raw"], old["weight"]), f"{name}: re-selection changed the weights"
        assert torch.equal(new["weight"], old["weight"])
        # the new active set is the smallest fraction of the current weights
        assert torch.equal(new["active"].sort().values, smallest(old["weight"], 0.1)), f"{name}: another selection"
        old_slot = dict(zip(old["active"].tolist(), old["slots"].tolist(), strict=True))
        new_slot = dict(zip(new["active"].tolist(), new["slots"].tolist(), strict=True))
        stayed, left = old_slot.keys() & new_slot.keys(), old_slot.keys() - new_slot.keys()
        joined = new_slot.keys() - old_slot.keys()
        left_total += len(left)
        assert stayed and any(a["exp_avg_sq"][old_slot[i]] != 0 for i in stayed)
        for i in stayed:  # value and both Adam moments follow the entry
            for key in ("values", "exp_avg", "exp_avg_sq"):
                assert b[key][new_slot[i]] == a[key][old_slot[i]], f"{name}[{i}]: {key} lost"
        for i in joined:  # newcomers start from zero
            assert b["values"][new_slot[i]] == 0 and b["exp_avg"][new_slot[i]] == 0 == b["exp_avg_sq"][new_slot[i]]
        for i in left:  # leavers keep what they learned in the delta, and in the saved file at the end
            assert old["delta"][i] != 0
            assert new["delta"][i] == old["delta"][i]
        indices, values = saved[f"{name}.weight.indices"].tolist(), saved[f"{name}.weight.values"].tolist()
        at_end = dict(zip(indices, values, strict=True))
        assert all(at_end[i] == old["delta"][i] for i in left), f"{name}: a retired entry's value moved after leaving"
        assert set(at_end) == old_slot.keys() | new_slot.keys()
    assert left_total > 20, "almost nothing left the selection: a weak test"
    assert sara.reselect_step == 2


def test_reselect_at_a_fraction_resolves_to_a_step() -> None:
    sara = SaRA(fraction=0.1, reselect_at=0.5)
    fit(FamilyModule("dit", n_batches=6), [sara])
    assert sara.reselect_step == 3


# ----------------------------------------------------------------------------------------------- resume


class StopAfterFirstEpoch(Callback):
    """Interrupt a run after its first epoch (the run keeps its length, so ``reselect_at`` stays inside it)."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


def test_resume_is_exact(tmp_path) -> None:
    def run(ckpt=None, root=None):
        module = FamilyModule("dit", n_batches=3)
        sara = SaRA(fraction=0.1, rank_penalty=0.2, penalty_matrices=2, reselect_at=4, seed=3)
        callbacks = [sara] + ([ModelCheckpoint(dirpath=root, save_last=True), StopAfterFirstEpoch()] if root else [])
        trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=callbacks, enable_checkpointing=bool(root))
        trainer.fit(module, ckpt_path=ckpt)
        return module, sara, trainer.global_step

    straight, sara_a, steps = run()
    _, _, interrupted = run(root=tmp_path)
    resumed, sara_b, total = run(ckpt=str(tmp_path / "last.ckpt"))
    assert (steps, interrupted, total) == (6, 3, 6)
    assert sara_a.reselect_step == sara_b.reselect_step == 4
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert any(bool((v < 0).any()) for k, v in a.items() if k.endswith("sparse_weight_slots")), "no entry retired"
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{key} differs after resume")


def test_resume_with_another_configuration_is_refused(tmp_path) -> None:
    module = FamilyModule("dit", n_batches=2)
    callbacks = [SaRA(fraction=0.1), ModelCheckpoint(dirpath=tmp_path, save_last=True)]
    quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=callbacks, enable_checkpointing=True).fit(module)
    other = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[SaRA(fraction=0.1, seed=5)])
    with pytest.raises(ValueError, match="seed: checkpoint 0 vs now 5"):
        other.fit(FamilyModule("dit", n_batches=2), ckpt_path=str(tmp_path / "last.ckpt"))


# ----------------------------------------------------------------------------------------------- save / load


def test_saved_delta_reproduces_the_model(tmp_path) -> None:
    sara = SaRA(fraction=0.1, rank_penalty=0.1, reselect_at=2, modules_to_save=["conv_out"], save_dir=str(tmp_path))
    module = FamilyModule("unet", n_batches=3)
    fit(module, [sara])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["method"] == "sara" and config["delta_format"] == "sparse"
    assert config["dense_tensors"] == ["conv_out.weight", "conv_out.bias"]
    assert config["hyperparameters"]["reselect_step"] == 2
    assert (tmp_path / "sara_density.png").stat().st_size > 1000
    fresh = FamilyModule("unet")
    assert not torch.equal(output("unet", fresh.model), output("unet", module.model))
    load_adapter(fresh.model, tmp_path)
    trained = dict(module.model.named_parameters())
    for name, param in fresh.model.named_parameters():
        owner, _, pname = name.rpartition(".")
        key = name if name in trained else f"{owner}.base_layer.{pname}"
        assert torch.equal(param, trained[key]), f"{name} differs after loading"
    torch.testing.assert_close(output("unet", fresh.model), output("unet", module.model), rtol=0, atol=0)


@pytest.mark.parametrize("modules_to_save", [None, ["proj_out_2"]])
def test_zoo_entry_of_a_sara_run_loads_onto_the_base(tmp_path, modules_to_save) -> None:
    from lightning_peft import ZooPublisher, zoo

    sara = SaRA(fraction=0.1, rank_penalty=0.1, reselect_at=2, modules_to_save=modules_to_save)
    module = FamilyModule("dit", n_batches=4)
    fit(module, [sara, ZooPublisher(name="sara-dit", root=str(tmp_path / "zoo"), base_model="tiny-dit")])
    local = zoo.LocalZoo(tmp_path / "zoo")
    base = FamilyModule("dit").model
    manifest = zoo.load(base, "sara-dit", zoo=local)
    assert manifest["method"] == "sara" and manifest["schedule"]["reselect_step"] == 2
    torch.testing.assert_close(output("dit", base), output("dit", module.model), rtol=0, atol=0)
    with pytest.raises(zoo.FingerprintMismatchError):
        zoo.load(FamilyModule("dit", seed=1).model, "sara-dit", zoo=local)


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 0.0}, "threshold must be > 0"),
        ({"threshold": -1.0}, "threshold must be > 0"),
        ({"fraction": 0.0}, r"fraction must be in \(0, 1\)"),
        ({"fraction": 1.5}, r"fraction must be in \(0, 1\)"),
        ({"rank_penalty": -0.1}, "rank_penalty must be >= 0"),
        ({"reselect_at": 0}, "reselect_at"),
        ({"reselect_at": True}, "reselect_at"),
        ({"reselect_at": 1.5}, r"reselect_at as a fraction must be in \(0, 1\)"),
        ({"reselect_at": 1000}, r"reselect_at=1000 is step 1000, outside this run of 4 optimizer steps"),
        ({"reselect_at": 4}, r"outside this run of 4 optimizer steps; use a step in \[1, 3\]"),
        ({"target_modules": ["no_such_layer"]}, "no_such_layer"),
        ({"modules_to_save": ["no_such_module"]}, "no_such_module"),
    ],
)
def test_bad_input_is_refused_before_training(kwargs, message) -> None:
    module = FamilyModule("dit", n_batches=4)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
    with pytest.raises(ValueError, match=message):
        trainer.callbacks.append(SaRA(**kwargs))
        trainer.fit(module)
    assert trainer.global_step == 0
    after = {n.replace(".base_layer.", "."): p for n, p in module.model.named_parameters() if BANK_NAME not in n}
    assert after.keys() == before.keys()
    assert all(torch.equal(p, before[n]) for n, p in after.items()), "the model changed"
    for _, layer in sparse_layers(module.model):  # a refusal at train start leaves nothing selected
        assert layer.selected_count() == 0


RECIPE = """
trainer:
  accelerator: cpu
  max_epochs: 1
  logger: false
  enable_checkpointing: false
  callbacks:
    - class_path: SaRA
      init_args:
        fraction: 0.1
        reselect_at: {reselect_at}
model:
  class_path: lit_helpers.FamilyModule
  init_args:
    name: dit
    n_batches: 4
"""


@pytest.mark.parametrize(("text", "expected"), [("3", 3), ("0.5", 0.5)])
def test_reselect_at_from_a_recipe_is_a_step_or_a_fraction(text, expected, monkeypatch, tmp_path) -> None:
    from lightning_peft.cli import build_cli

    (tmp_path / "sara.yaml").write_text(RECIPE.format(reselect_at=text))
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", str(tmp_path / "sara.yaml")], run=False)
    (sara,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, SaRA)]
    assert sara.reselect_at == expected and type(sara.reselect_at) is type(expected)  # YAML's 3 is a step, not 3.0
    cli.trainer.fit(cli.model)
    assert sara.reselect_step == (3 if isinstance(expected, int) else 2)


def test_a_threshold_that_selects_nothing_names_the_magnitudes() -> None:
    module = FamilyModule("dit", n_batches=2)
    weights = [m.weight for n, m in module.model.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    weights += [m.weight for n, m in module.model.named_modules() if n.endswith(("ff.net.0.proj", "ff.net.2"))]
    low = min(float(w.detach().abs().min()) for w in weights)
    high = max(float(w.detach().abs().max()) for w in weights)
    threshold = low / 2
    assert threshold > 0
    with pytest.raises(ValueError, match="selects nothing") as err:
        fit(module, [SaRA(threshold=threshold)])
    assert f"[{low:.3g}, {high:.3g}]" in str(err.value) and "fraction=" in str(err.value)
    assert not any(True for _ in sparse_layers(module.model))


def test_a_threshold_selects_every_entry_below_it_at_start_and_at_reselection() -> None:
    module = FamilyModule("dit", n_batches=3)
    base = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    sara = SaRA(threshold=0.01, reselect_at=2)
    watch, post = Watch(sara), Snapshot(sara, 2)
    fit(module, [sara, watch, post])
    assert sum(v.numel() for v in watch.start.values()) == sara.bank_of(module).capacity > 0
    for key, picked in watch.start.items():
        assert torch.equal(picked, (base[key].abs() < 0.01).reshape(-1).nonzero().squeeze(1)), key
    for name, layer in post.taken["layers"].items():
        below = (layer["weight"].abs() < 0.01).reshape(-1).nonzero().squeeze(1)
        assert torch.equal(layer["active"].sort().values, below), name
    after = sum(layer["active"].numel() for layer in post.taken["layers"].values())
    assert 0 < after < sara.bank_of(module).capacity, "no trained entry grew past the threshold: a weak test"


def test_plain_ddp_is_refused() -> None:
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    for strategy, message in ((DDPStrategy(), "ddp_selective"), (ModelParallelStrategy(), "does not support")):
        with pytest.raises(NotImplementedError, match=message):
            check_dynamic_strategy(strategy, "SaRA")


def test_plain_ddp_is_refused_by_the_callback_before_injecting() -> None:
    import torch.distributed as dist

    module = FamilyModule("dit", n_batches=2)
    environ = dict(os.environ)
    try:  # a one-process "ddp" run: SaRA's setup must refuse it before touching the model
        trainer = quiet_trainer(strategy="ddp", devices=1, max_epochs=1, limit_val_batches=0, callbacks=[SaRA()])
        with pytest.raises(NotImplementedError, match="SaRA under strategy='ddp'.*ddp_selective"):
            trainer.fit(module)
    finally:  # leave no process group or rendezvous variables to the tests that follow
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    assert not any(True for _ in sparse_layers(module.model))
    assert all(p.requires_grad for p in module.model.parameters())


# ----------------------------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_ddp_selective_ranks_choose_the_same_entries(tmp_path) -> None:
    ranks, logs = run_two_ranks("ddp_sparse.py", tmp_path, "sara")
    assert logs[0]["step"] == logs[1]["step"] == 6
    assert set(logs[0]["seeds"]).isdisjoint(logs[1]["seeds"]), "ranks saw the same data: not a real DDP test"
    assert logs[0]["active"] == logs[1]["active"] and len(set(logs[0]["active"])) == 1 and logs[0]["active"][0] > 0
    slots = [k for k in ranks[0] if k.endswith("sparse_weight_slots")]
    assert slots and any(bool((ranks[0][k] < 0).any()) for k in slots), "no entry was retired: re-selection untested"
    for key in ranks[0]:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0, msg=f"{key} differs across ranks")
    assert (tmp_path / "delta" / "adapter_model.safetensors").is_file()
