"""A module fitted again: a refused fit leaves it as it was; adapters of other settings are refused, not trained.

Issue 12, item 1. Each refusal is raised in a hook that runs after the callback changed the module (``on_fit_start``
for AdaLoRA and ID3, ``on_train_start`` for SaRA); the module must come out exactly as it went in.
"""

from __future__ import annotations

import pytest
import torch
from lit_helpers import FamilyModule, quiet_trainer
from torch import nn

from lightning_peft import ID3, AdaLoRA, LoRA, SaRA
from lightning_peft.adapters import (
    LoRAConfig,
    adapter_layers,
    inject_adapters,
    load_adapter,
    read_adapter_config,
    remove_adapters,
)
from lightning_peft.adapters.sparse import sparse_bank, sparse_layers

LLAMA = ["q_proj", "v_proj"]


def snapshot(module: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    """Every parameter's value and ``requires_grad``, by name."""
    return {n: (p.detach().clone(), p.requires_grad) for n, p in module.named_parameters()}


def assert_as_before(module: nn.Module, before: dict[str, tuple[torch.Tensor, bool]]) -> None:
    after = snapshot(module)
    assert after.keys() == before.keys()  # no adapter parameter left, no base weight renamed
    for name, (value, flag) in before.items():
        assert torch.equal(after[name][0], value), name
        assert after[name][1] == flag, name
    assert not list(adapter_layers(module)) and not list(sparse_layers(module)) and sparse_bank(module) is None


def fit(module: nn.Module, callback, **kwargs) -> None:
    quiet_trainer(limit_val_batches=0, callbacks=[callback], **{"max_epochs": 1, **kwargs}).fit(module)


# ------------------------------------------------------------------------------------------ refusals restore
def test_adalora_schedule_refused_at_fit_start_restores_the_module_and_a_corrected_fit_saves_a_true_adapter(
    tmp_path,
) -> None:
    module = FamilyModule("vit", n_batches=8)
    before = snapshot(module)
    with pytest.raises(ValueError, match="total_step"):
        fit(module, AdaLoRA(r=4, target_r=2, tinit=3, tfinal=3), max_steps=5)
    assert_as_before(module, before)

    out = tmp_path / "adapter"
    fit(module, AdaLoRA(r=6, target_r=3, tinit=1, tfinal=1, target_modules=["qkv"], save_dir=str(out)), max_steps=5)
    config = read_adapter_config(out)
    assert config["init_r"] == 6 and config["target_modules"] == sorted(n for n, _ in adapter_layers(module.model))
    fresh = FamilyModule("vit", n_batches=8)
    load_adapter(fresh.model, out)  # the saved config describes the saved tensors
    for (_, a), (_, b) in zip(adapter_layers(fresh.model), adapter_layers(module.model), strict=True):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_E, b.lora_E)


def test_id3_refused_at_fit_start_restores_the_module() -> None:
    module = FamilyModule("llama", n_batches=2)
    before = snapshot(module)
    with pytest.raises(ValueError, match="finite"):
        fit(module, ID3(budget=50, target_modules=LLAMA), max_epochs=-1)
    assert_as_before(module, before)
    fit(module, ID3(budget=50, target_modules=LLAMA))  # and a good fit runs on it
    assert sparse_bank(module).used == 50


def test_sara_refused_at_train_start_restores_the_weights_and_flags() -> None:
    module = FamilyModule("llama", n_batches=2)
    module.model.lm_head.requires_grad_(False)  # a flag the user set: restored as it was, not as the default
    before = snapshot(module)
    with pytest.raises(ValueError, match="reselect_at"):
        fit(module, SaRA(fraction=0.1, reselect_at=50, target_modules=LLAMA))
    assert_as_before(module, before)


def test_a_failure_after_training_started_keeps_what_was_learned() -> None:
    class Boom(FamilyModule):
        def training_step(self, batch, batch_idx):
            if self.global_step == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    module = Boom("vit", n_batches=4)
    with pytest.raises(RuntimeError, match="boom"):
        fit(module, LoRA(r=2, init="nonzero"))
    assert len(list(adapter_layers(module))) > 0  # two optimizer steps of training are not thrown away


# ------------------------------------------------------------------------------------------ a second fit
def test_lora_second_fit_with_another_rank_or_targets_is_refused_and_changes_nothing() -> None:
    module = FamilyModule("vit", n_batches=2)
    fit(module, LoRA(r=8))
    trained = snapshot(module)
    with pytest.raises(ValueError, match=r"other settings.*r: earlier 8, now 16|'r': 8"):
        fit(module, LoRA(r=16))
    with pytest.raises(ValueError, match="target_modules"):
        fit(module, LoRA(r=8, target_modules=["qkv"]))
    after = snapshot(module)
    assert after.keys() == trained.keys() and all(torch.equal(after[k][0], v) for k, (v, _) in trained.items())


def test_lora_second_fit_with_the_same_settings_by_a_new_callback_reuses_and_saves_a_loadable_adapter(
    tmp_path,
) -> None:
    module = FamilyModule("vit", n_batches=2)
    fit(module, LoRA(r=2, init="nonzero"))
    n = len(list(adapter_layers(module)))
    fit(module, LoRA(r=2, init="nonzero", save_dir=str(tmp_path / "a")))
    assert len(list(adapter_layers(module))) == n
    fresh = FamilyModule("vit")
    load_adapter(fresh.model, tmp_path / "a")
    for (_, a), (_, b) in zip(adapter_layers(fresh.model), adapter_layers(module.model), strict=True):
        assert torch.equal(a.lora_B, b.lora_B)


def test_adapters_injected_by_hand_are_not_silently_trained_by_a_callback() -> None:
    module = FamilyModule("vit", n_batches=2)
    inject_adapters(module.model, LoRAConfig(r=4, target_modules=["qkv"]))
    with pytest.raises(ValueError, match="no lightning-peft callback set up"):
        fit(module, LoRA(r=8))
    remove_adapters(module.model)
    fit(module, LoRA(r=8))  # the way out the message names


def test_adalora_on_a_lora_module_is_refused() -> None:
    module = FamilyModule("vit", n_batches=4)
    fit(module, LoRA(r=4))
    with pytest.raises(ValueError, match="method: earlier 'lora', now 'adalora'"):
        fit(module, AdaLoRA(r=4, target_r=2, total_step=4))


def test_sparse_second_fit_with_another_budget_is_refused_the_same_resumes_nothing_new() -> None:
    module = FamilyModule("llama", n_batches=2)
    fit(module, ID3(budget=40, target_modules=LLAMA))
    with pytest.raises(ValueError, match="budget: earlier 40, now 80"):
        fit(module, ID3(budget=80, target_modules=LLAMA))
    with pytest.raises(ValueError, match="already has 40 entries unmasked"):  # same settings, not a resume
        fit(module, ID3(budget=40, target_modules=LLAMA))
    with pytest.raises(ValueError, match="method: earlier 'id3', now 'sara'"):
        fit(module, SaRA(fraction=0.1, target_modules=LLAMA))


def test_sara_second_fit_with_the_same_settings_keeps_training_the_same_entries() -> None:
    module = FamilyModule("llama", n_batches=2)
    sara = SaRA(fraction=0.1, target_modules=LLAMA)
    fit(module, sara)
    chosen = {n: layer.active_indices(p).clone() for n, layer in sparse_layers(module) for p in layer.param_names}
    fit(module, SaRA(fraction=0.1, target_modules=LLAMA))
    again = {n: layer.active_indices(p) for n, layer in sparse_layers(module) for p in layer.param_names}
    assert chosen.keys() == again.keys() and all(torch.equal(chosen[k], again[k]) for k in chosen)


def test_the_restore_point_holds_no_parameter_alive() -> None:
    """Under FSDP2 every parameter is replaced when the model is sharded, after setup; a restore point that held
    the originals would keep each rank's whole unsharded weights in memory until training starts."""
    import gc
    import weakref

    from lightning_peft.callbacks.base import restorer

    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    net[1].requires_grad_(False)
    undo = restorer(net, lambda: None)
    old = weakref.ref(net[0].weight)
    net[0].weight = nn.Parameter(torch.zeros(4, 4))  # what fully_shard does to every parameter
    net[0].weight.requires_grad_(False)
    gc.collect()
    assert old() is None
    undo()  # restores by name, on the parameters the module holds now
    assert net[0].weight.requires_grad and not net[1].weight.requires_grad
