"""The ID3 callback: step-by-step unmasking in a Lightning fit, against a dense masked reference; resume; DDP."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lit_helpers import FamilyModule, quiet_trainer, run_two_ranks
from safetensors.torch import load_file

from lightning_peft import ID3
from lightning_peft.adapters import load_adapter
from lightning_peft.adapters.sparse import sparse_layers
from lightning_peft.methods.id3 import Unmasker

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class NoDecay(FamilyModule):
    """AdamW without weight decay, so the sparse run and a dense masked run follow the same update rule."""

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr, weight_decay=0)


class Counts(Callback):
    """Active entries after every optimizer step, and how often a dense gradient was scored."""

    def __init__(self, id3: ID3) -> None:
        self.id3, self.active, self.hook_calls = id3, [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        layers = self.id3.layers(pl_module)
        self.active.append(sum(layer.active_count() for _, layer in layers))

    def on_train_start(self, trainer, pl_module) -> None:
        unmasker = self.id3.unmasker
        original = unmasker.observe

        def counting(*args, **kwargs):
            self.hook_calls += 1
            original(*args, **kwargs)

        unmasker.observe = counting


def fit(module, callbacks, **kwargs):
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=callbacks, **kwargs)
    trainer.fit(module)
    return trainer


def dense_reference(n_steps: int, budget: int, lr: float, eps: float, exp: float, total: int | None = None) -> dict:
    """ID³ as the reference runs it: dense gradients, a global top-n over unchosen entries, masked dense AdamW."""
    module = NoDecay("llama", n_batches=n_steps, lr=lr)
    model = module.model
    model.requires_grad_(False)
    weights = {n: m.weight for n, m in model.named_modules() if n.endswith(TARGETS)}
    for w in weights.values():
        w.requires_grad_(True)
    masks = {n: torch.zeros_like(w, dtype=torch.bool) for n, w in weights.items()}
    opt = torch.optim.AdamW(list(weights.values()), lr=lr, weight_decay=0)
    unmasker = Unmasker(budget, total or n_steps, sum(w.numel() for w in weights.values()), eps=eps, exp=exp)
    for step in range(n_steps):
        opt.zero_grad()
        module.training_step(torch.tensor([step]), step).backward()
        n_new = unmasker.schedule(step)
        if n_new:
            scores = {
                n: unmasker.score(w.grad, w).masked_fill(masks[n].view(-1), float("-inf")) for n, w in weights.items()
            }
            flat = torch.cat([scores[n] for n in sorted(scores)])
            picked = torch.topk(flat, n_new).indices
            offset = 0
            for n in sorted(scores):
                size = scores[n].numel()
                mine = picked[(picked >= offset) & (picked < offset + size)] - offset
                masks[n].view(-1)[mine] = True
                offset += size
        for n, w in weights.items():
            w.grad.mul_(masks[n])
        opt.step()
    return {f"model.{n}.weight": w.detach() for n, w in weights.items()} | {"masks": masks}


def test_unmasking_follows_the_schedule_and_matches_a_dense_masked_run() -> None:
    steps, budget = 6, 300
    id3 = ID3(budget=budget, eps=1e-3, exp=1.0)
    counts = Counts(id3)
    module = NoDecay("llama", n_batches=steps, lr=1e-2)
    trainer = fit(module, [id3, counts])
    unmasker = Unmasker(budget, steps, id3.total_params)
    assert counts.active == [unmasker.cumulative(t) for t in range(steps)]
    assert counts.active[-1] == budget
    state = trainer.optimizers[0].state
    assert [tuple(s["exp_avg"].shape) for s in state.values()] == [(budget,)], "optimizer state is not O(budget)"
    reference = dense_reference(steps, budget, lr=1e-2, eps=1e-3, exp=1.0)
    layers = dict(sparse_layers(module.model))
    for name, layer in layers.items():
        chosen = torch.zeros(layer.base_layer.weight.numel(), dtype=torch.bool)
        chosen[layer.indices("weight")] = True
        assert torch.equal(chosen, reference["masks"][name].view(-1)), f"{name}: other entries chosen"
        torch.testing.assert_close(layer.base_layer.weight, reference[f"model.{name}.weight"], rtol=0, atol=1e-6)


def test_scoring_runs_once_per_optimizer_step_with_accumulation() -> None:
    id3 = ID3(budget=64)
    counts = Counts(id3)
    fit(FamilyModule("llama", n_batches=8), [id3, counts], accumulate_grad_batches=2)
    n_tensors = len(id3.targets)
    # 4 optimizer steps, one scored micro-batch each, plus the first micro-batch (nothing else needs a gradient then)
    assert counts.hook_calls == 5 * n_tensors
    assert counts.active[1::2] == [Unmasker(64, 4, id3.total_params).cumulative(t) for t in range(4)]


def test_no_dense_scoring_after_the_budget_is_spent() -> None:
    id3 = ID3(budget=40, total_steps=2)
    counts = Counts(id3)
    fit(FamilyModule("llama", n_batches=6), [id3, counts])
    assert counts.hook_calls == 2 * len(id3.targets)
    assert counts.active == [20, 40, 40, 40, 40, 40]


def test_resume_is_exact(tmp_path) -> None:
    def run(epochs, ckpt=None, root=None):
        module = FamilyModule("llama", n_batches=4)
        id3 = ID3(budget=200, total_steps=6)
        callbacks = [id3] + ([ModelCheckpoint(dirpath=root, save_last=True)] if root else [])
        trainer = quiet_trainer(
            max_epochs=epochs, limit_val_batches=0, callbacks=callbacks, enable_checkpointing=bool(root)
        )
        trainer.fit(module, ckpt_path=ckpt)
        return module

    straight = run(2)
    run(1, root=tmp_path)
    resumed = run(2, ckpt=str(tmp_path / "last.ckpt"))
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{key} differs after resume")


def test_saved_delta_reproduces_the_model_and_holds_the_head(tmp_path) -> None:
    id3 = ID3(budget=0.02, modules_to_save=["head"], save_dir=str(tmp_path / "delta"))
    module = FamilyModule("vit", n_batches=4)
    fit(module, [id3])
    config = json.loads((tmp_path / "delta" / "adapter_config.json").read_text())
    assert config["delta_format"] == "sparse" and config["dense_tensors"] == ["head.weight", "head.bias"]
    tensors = load_file(tmp_path / "delta" / "adapter_model.safetensors")
    n_values = sum(v.numel() for k, v in tensors.items() if k.endswith(".values"))
    assert n_values == id3.budget_count
    assert (tmp_path / "delta" / "id3_density.png").stat().st_size > 1000
    fresh = FamilyModule("vit", n_batches=4)
    load_adapter(fresh.model, tmp_path / "delta")
    x = torch.randn(2, 1, 8, 8)
    from lightning_peft.adapters.sparse import remove_sparse

    remove_sparse(module.model, merge=True)
    torch.testing.assert_close(fresh.model(x), module.model(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 0}, "budget"),
        ({"budget": -3}, "budget"),
        ({"budget": 1.5}, r"fraction must be in \(0, 1\)"),
        ({"budget": True}, "budget"),
        ({"eps": 0.0}, "eps"),
        ({"exp": -1.0}, "exp"),
        ({"total_steps": 0}, "total_steps"),
        ({"parameters": ("scale",)}, "parameters"),
    ],
)
def test_bad_settings_are_refused_on_construction(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        ID3(**kwargs)


def test_bad_targets_and_budgets_are_refused_before_training() -> None:
    from lightning_peft.adapters import TargetNotFoundError

    module = FamilyModule("llama", n_batches=2)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    with pytest.raises(ValueError, match="exceeds"):
        fit(module, [ID3(budget=10**9)])
    with pytest.raises(TargetNotFoundError):
        fit(module, [ID3(budget=5, target_modules=["no_such_layer"])])
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())
    assert not any(True for _ in sparse_layers(module))


@pytest.mark.slow
def test_ddp_selective_ranks_choose_the_same_entries(tmp_path) -> None:
    ranks, logs = run_two_ranks("ddp_sparse.py", tmp_path, "id3")
    assert logs[0]["step"] == logs[1]["step"] == 6
    assert set(logs[0]["seeds"]).isdisjoint(logs[1]["seeds"]), "ranks saw the same data: not a real DDP test"
    assert logs[0]["active"] == logs[1]["active"] and logs[0]["active"][-1] == 120
    assert any(k.endswith("sparse_weight_indices") for k in ranks[0])
    for key in ranks[0]:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0, msg=f"{key} differs across ranks")
