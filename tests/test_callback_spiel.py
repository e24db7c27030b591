"""The SpIEL callback on tiny models: O(budget) training, drop-and-regrow in the bank, resume, save, bad input, DDP."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lit_helpers import FamilyModule, quiet_trainer, run_two_ranks
from safetensors.torch import load_file
from tiny_models import forward

from lightning_peft import SpIEL
from lightning_peft.adapters import load_adapter
from lightning_peft.adapters.sparse import BANK_NAME, sparse_layers
from lightning_peft.methods.spiel import SpIELSelector


def fit(module, callbacks, **kwargs):
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=callbacks, **kwargs)
    trainer.fit(module)
    return trainer


def bank_name(module) -> str:
    return next(n for n, _ in module.named_parameters() if n.endswith(f"{BANK_NAME}.values"))


class Snapshot(Callback):
    """At the batch start of ``step`` (placed before SpIEL: before its update; after it: after): the whole state."""

    def __init__(self, spiel: SpIEL, step: int) -> None:
        self.spiel, self.step, self.taken = spiel, step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step or self.taken is not None:
            return
        bank = self.spiel.bank_of(pl_module)
        state = trainer.optimizers[0].state[bank.values]
        layers = {}
        for name, layer in self.spiel.layers(pl_module):
            layer.sync()  # what a forward would show
            indices, delta = layer.delta("weight")
            layers[name] = {
                "weight": layer.base_layer.weight.detach().clone(),
                "active": layer.active_indices("weight").clone(),
                "slots": layer.active_slots("weight").clone(),
                "delta": dict(zip(indices.tolist(), delta.tolist(), strict=True)),
            }
        sel = self.spiel.selector
        self.taken = {
            "values": bank.values.detach().clone(),
            "exp_avg": state["exp_avg"].clone() if state else None,  # no state before the first step
            "exp_avg_sq": state["exp_avg_sq"].clone() if state else None,
            "layers": layers,
            "candidates": {k: (i.clone(), g.clone()) for k, (i, g) in sel.candidates.items()},
        }


class Every(Callback):
    """At every optimizer step: which parameters have a gradient and how many entries each tensor trains."""

    def __init__(self, spiel: SpIEL) -> None:
        self.spiel, self.with_grad, self.counts = spiel, [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.with_grad.append({n for n, p in pl_module.named_parameters() if p.grad is not None})
        self.counts.append(
            {f"{n}:weight": la.active_indices("weight").numel() for n, la in self.spiel.layers(pl_module)}
        )


# ----------------------------------------------------------------------------------------------- fit


def test_the_budget_stays_constant_and_the_state_o_budget() -> None:
    module = FamilyModule("llama", n_batches=14)
    base = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    spiel = SpIEL(budget=300, reselection_steps=4, accumulation_steps=2, drop_fraction=0.5)
    every = Every(spiel)
    trainer = fit(module, [spiel, every])
    assert [m for m, _ in spiel.moved] == [2, 6, 10] and all(n > 0 for _, n in spiel.moved)
    assert spiel.budget_count == sum(spiel.counts.values()) <= 300
    assert every.counts == [spiel.counts] * 14  # every tensor trains exactly its count at every step
    bank = bank_name(module)
    assert every.with_grad == [{bank}] * 14  # the bank is the only parameter with a gradient
    state = trainer.optimizers[0].state
    assert [{k: tuple(v.shape) for k, v in s.items() if v.dim()} for s in state.values()] == [
        {"exp_avg": (spiel.budget_count,), "exp_avg_sq": (spiel.budget_count,)}
    ]
    # the bookkeeping holds exactly the current entries (dropped ones are forgotten), and every other entry, the
    # dropped ones included, is bit-identical to the base
    layers = dict(spiel.layers(module))
    for name, layer in layers.items():
        weight = layer.base_layer.weight.detach().reshape(-1)
        kept = layer.indices("weight")
        assert kept.numel() == spiel.counts[f"{name}:weight"] == layer.active_count(), name
        untouched = torch.ones_like(weight, dtype=torch.bool)
        untouched[kept] = False
        assert torch.equal(weight[untouched], base[f"{name}.weight"].reshape(-1)[untouched]), name


def test_an_update_drops_back_to_the_base_and_grows_from_zero_as_the_rule_says() -> None:
    module = FamilyModule("llama", n_batches=8)
    base = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    spiel = SpIEL(budget=300, reselection_steps=4, accumulation_steps=2, drop_fraction=0.5, total_steps=8)
    pre, post = Snapshot(spiel, 6), Snapshot(spiel, 6)  # the second update (completed = 6, p = 0.5 * (1 - 6/8))
    fit(module, [pre, spiel, post])
    a, b = pre.taken, post.taken
    assert a["candidates"] and not b["candidates"], "the window's gradients were not used up"
    p = 0.5 * (1 - 6 / 8)
    rule = SpIELSelector(4, 2, 0.5, "linear", 8)
    rule.candidates = a["candidates"]
    moved = 0
    for name, old in a["layers"].items():
        new = b["layers"][name]
        key = f"{name}:weight"
        drop, grow = rule.regrow(key, old["active"], a["values"][old["slots"]], p)
        assert drop.numel() == int(spiel.counts[key] * p) > 0
        expected = set(old["active"].tolist()) - set(drop.tolist()) | set(grow.tolist())
        assert set(new["active"].tolist()) == expected, f"{name}: not the rule's selection"
        assert new["active"].numel() == old["active"].numel() == spiel.counts[key]
        old_slot = dict(zip(old["active"].tolist(), old["slots"].tolist(), strict=True))
        new_slot = dict(zip(new["active"].tolist(), new["slots"].tolist(), strict=True))
        flat_base = base[f"{name}.weight"].reshape(-1)
        for i in drop.tolist():  # dropped: the weight is the pretrained value again, the entry forgotten
            assert old["delta"][i] != 0
            assert new["weight"].reshape(-1)[i] == flat_base[i] and i not in new["delta"]
        for i in grow.tolist():  # grown: zero value, zero moments, weight at the base value
            s = new_slot[i]
            assert b["values"][s] == 0 and b["exp_avg"][s] == 0 == b["exp_avg_sq"][s]
            assert new["weight"].reshape(-1)[i] == flat_base[i]
        for i in set(old_slot) & set(new_slot):  # stayed: value and moments follow the entry
            for field in ("values", "exp_avg", "exp_avg_sq"):
                assert b[field][new_slot[i]] == a[field][old_slot[i]], f"{name}[{i}]: {field} lost"
        moved += drop.numel()
    assert moved > 20, "few entries moved: a weak test"
    assert spiel.moved[1] == (6, moved)


class Grads(Callback):
    """Each micro-batch's dense gradient of every target weight in the first step, from a copy SpIEL never sees."""

    def __init__(self, family: str, micro: int) -> None:
        self.family, self.micro, self.dense = family, micro, []

    def on_fit_start(self, trainer, pl_module) -> None:  # before any selection; SpIEL's deltas are all zero at step 0
        if self.dense:
            return
        clone = copy.deepcopy(pl_module.model)
        clone.requires_grad_(True)
        for seed in range(self.micro):  # FamilyModule's batch i is seed i; Lightning divides each loss by `micro`
            clone.zero_grad()
            out = forward(self.family, clone, batch=2, seed=seed)
            (out.float().pow(2).mean() / self.micro).backward()
            self.dense.append(
                {f"{n}:weight": la.base_layer.weight.grad.detach().clone() for n, la in sparse_layers(clone)}
            )


@pytest.mark.parametrize("micro", [1, 2])
def test_the_window_scores_the_dense_gradient_of_the_step(micro: int) -> None:
    """The first micro-batch's |g| picks each tensor's candidates; every micro-batch's g is summed at them."""
    module = FamilyModule("llama", n_batches=4 * micro)
    spiel = SpIEL(budget=300, reselection_steps=3, accumulation_steps=1, drop_fraction=0.5)
    grads, pre = Grads("llama", micro), Snapshot(spiel, 1)
    fit(module, [grads, pre, spiel], accumulate_grad_batches=micro)
    candidates = pre.taken["candidates"]
    assert candidates.keys() == grads.dense[0].keys() == set(spiel.counts)
    for key, (indices, values) in candidates.items():
        first = grads.dense[0][key].reshape(-1)
        total = sum(g[key].reshape(-1) for g in grads.dense)
        k = spiel.counts[key]
        assert indices.numel() == k
        torch.testing.assert_close(first[indices].abs().sort(descending=True).values, first.abs().topk(k).values)
        torch.testing.assert_close(values, total[indices], rtol=1e-5, atol=1e-8, msg=key)


# ----------------------------------------------------------------------------------------------- resume


class StopAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


def test_resume_is_exact(tmp_path) -> None:
    """Interrupted at step 5, inside an accumulation window (steps 3..5, update at 6), with two micro-batches a step."""

    def run(ckpt=None, root=None):
        module = FamilyModule("llama", n_batches=10)
        spiel = SpIEL(budget=300, reselection_steps=4, accumulation_steps=2, drop_fraction=0.5, seed=3)
        callbacks = [spiel] + ([ModelCheckpoint(dirpath=root, save_last=True), StopAfterFirstEpoch()] if root else [])
        trainer = quiet_trainer(
            max_epochs=2,
            limit_val_batches=0,
            accumulate_grad_batches=2,
            callbacks=callbacks,
            enable_checkpointing=bool(root),
        )
        trainer.fit(module, ckpt_path=ckpt)
        return module, spiel, trainer.global_step

    straight, spiel_a, steps = run()
    _, spiel_i, interrupted = run(root=tmp_path)
    resumed, spiel_b, total = run(ckpt=str(tmp_path / "last.ckpt"))
    assert (steps, interrupted, total) == (10, 5, 10)
    assert spiel_i.selector.candidates, "the interruption was not inside a window: a weak test"
    assert spiel_a.moved == spiel_b.moved and len(spiel_a.moved) == 2
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{key} differs after resume")


def test_resume_with_another_configuration_is_refused(tmp_path) -> None:
    module = FamilyModule("llama", n_batches=4)
    callbacks = [SpIEL(budget=100, reselection_steps=3, accumulation_steps=1), ModelCheckpoint(dirpath=tmp_path)]
    quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=callbacks, enable_checkpointing=True).fit(module)
    ckpt = next(tmp_path.glob("*.ckpt"))
    other = quiet_trainer(
        max_epochs=2,
        limit_val_batches=0,
        callbacks=[SpIEL(budget=100, reselection_steps=3, accumulation_steps=1, seed=5)],
    )
    with pytest.raises(ValueError, match="seed: checkpoint 0 vs now 5"):
        other.fit(FamilyModule("llama", n_batches=4), ckpt_path=str(ckpt))


# ----------------------------------------------------------------------------------------------- save / load


def test_saved_delta_reproduces_the_model(tmp_path) -> None:
    spiel = SpIEL(budget=300, reselection_steps=3, accumulation_steps=1, save_dir=str(tmp_path))
    module = FamilyModule("llama", n_batches=7)
    fit(module, [spiel])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["method"] == "spiel" and config["delta_format"] == "sparse"
    assert config["hyperparameters"]["budget_count"] == spiel.budget_count
    assert (tmp_path / "spiel_density.png").stat().st_size > 1000
    saved = load_file(tmp_path / "adapter_model.safetensors")
    kept = sum(v.numel() for k, v in saved.items() if k.endswith(".values"))
    held = sum(la.indices("weight").numel() for _, la in spiel.layers(module))
    assert all(bool((v != 0).all()) for k, v in saved.items() if k.endswith(".values"))
    assert spiel.moved and all(n > 0 for _, n in spiel.moved), "nothing moved: a weak test"
    assert kept <= spiel.budget_count == held, "dropped entries were kept (in the layers or the file)"
    fresh = FamilyModule("llama")
    with torch.no_grad():
        assert not torch.equal(forward("llama", fresh.model, 2, 5), forward("llama", module.model, 2, 5))
    load_adapter(fresh.model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(
            forward("llama", fresh.model, 2, 5), forward("llama", module.model, 2, 5), rtol=0, atol=0
        )


def test_zoo_entry_of_a_spiel_run_loads_onto_the_base(tmp_path) -> None:
    from lightning_peft import ZooPublisher, zoo

    spiel = SpIEL(budget=300, reselection_steps=3, accumulation_steps=1, modules_to_save=["lm_head"])
    module = FamilyModule("llama", n_batches=5)
    fit(module, [spiel, ZooPublisher(name="spiel-llama", root=str(tmp_path / "zoo"), base_model="tiny-llama")])
    assert len(spiel.moved) == 2
    local = zoo.LocalZoo(tmp_path / "zoo")
    base = FamilyModule("llama").model
    manifest = zoo.load(base, "spiel-llama", zoo=local)
    assert manifest["method"] == "spiel" and manifest["schedule"]["moved"] == [list(m) for m in spiel.moved]
    with torch.no_grad():
        torch.testing.assert_close(forward("llama", base, 2, 5), forward("llama", module.model, 2, 5), rtol=0, atol=0)
    with pytest.raises(zoo.FingerprintMismatchError):
        zoo.load(FamilyModule("llama", seed=1).model, "spiel-llama", zoo=local)


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 0}, "budget must be a count >= 1"),
        ({"budget": True}, "budget must be a count >= 1"),
        ({"budget": 1.5}, r"budget as a fraction must be in \(0, 1\)"),
        ({"budget": 10**9}, "exceeds the"),
        ({"budget": 3}, "gives no tensor an entry"),
        ({"reselection_steps": 2}, "reselection_steps must be >= 3"),
        ({"accumulation_steps": 0}, "accumulation_steps must be in"),
        ({"reselection_steps": 5, "accumulation_steps": 4}, r"\[1, 3\]"),
        ({"drop_fraction": 0.0}, "drop_fraction must be in"),
        ({"drop_fraction": 2.0}, "drop_fraction must be in"),
        ({"decay": "step"}, "decay must be 'linear' or 'cosine'"),
        ({"total_steps": 1, "accumulation_steps": 2}, "leaves no update"),
        ({"total_steps": 0}, "total_steps must be an int >= 1"),
        ({"total_steps": 2.5}, "total_steps must be an int >= 1"),
        ({"seed": "0"}, "seed must be an int"),
        ({"accumulation_steps": 5}, "shorter than accumulation_steps=5"),
        ({"target_modules": ["no_such_layer"]}, "no_such_layer"),
        ({"modules_to_save": ["no_such_module"]}, "no_such_module"),
    ],
)
def test_bad_input_is_refused_before_training(kwargs, message) -> None:
    module = FamilyModule("llama", n_batches=4)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
    with pytest.raises(ValueError, match=message):
        trainer.callbacks.append(SpIEL(**kwargs))
        trainer.fit(module)
    assert trainer.global_step == 0
    after = {n.replace(".base_layer.", "."): p for n, p in module.model.named_parameters() if BANK_NAME not in n}
    assert after.keys() == before.keys()
    assert all(torch.equal(p, before[n]) for n, p in after.items()), "the model changed"


def test_a_refusal_at_train_start_restores_the_weights_and_flags() -> None:
    module = FamilyModule("llama", n_batches=3)
    module.model.lm_head.requires_grad_(False)  # a flag the user set: restored as it was
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in module.named_parameters()}
    with pytest.raises(ValueError, match="shorter than accumulation_steps=5"):
        fit(module, [SpIEL(budget=100, accumulation_steps=5)])
    after = {n: (p.detach().clone(), p.requires_grad) for n, p in module.named_parameters()}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n][0], v) and after[n][1] == f for n, (v, f) in before.items())
    assert not list(sparse_layers(module))


def test_a_second_fit_with_the_same_settings_starts_from_the_entries_the_first_left() -> None:
    module = FamilyModule("llama", n_batches=4)
    first = SpIEL(budget=200, reselection_steps=3, accumulation_steps=1)
    fit(module, [first])
    left = {n: la.active_indices("weight").sort().values for n, la in first.layers(module)}
    second = SpIEL(budget=200, reselection_steps=3, accumulation_steps=1)
    start = Snapshot(second, 0)
    fit(module, [second, start])
    assert {n: v["active"].sort().values.tolist() for n, v in start.taken["layers"].items()} == {
        n: v.tolist() for n, v in left.items()
    }


# ----------------------------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_ddp_selective_ranks_move_the_same_entries(tmp_path) -> None:
    ranks, logs = run_two_ranks("ddp_sparse.py", tmp_path, "spiel")
    assert logs[0]["step"] == logs[1]["step"] == 6
    assert set(logs[0]["seeds"]).isdisjoint(logs[1]["seeds"]), "ranks saw the same data: not a real DDP test"
    assert logs[0]["active"] == logs[1]["active"] and len(set(logs[0]["active"])) == 1 and logs[0]["active"][0] > 0
    assert (
        logs[0]["moved"] == logs[1]["moved"] and len(logs[0]["moved"]) == 2 and all(n > 0 for _, n in logs[0]["moved"])
    )
    slots = [k for k in ranks[0] if k.endswith("sparse_weight_slots")]
    assert slots and not any(bool((ranks[0][k] < 0).any()) for k in slots), "dropped entries were not forgotten"
    for key in ranks[0]:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0, msg=f"{key} differs across ranks")
    assert (tmp_path / "delta" / "adapter_model.safetensors").is_file()
