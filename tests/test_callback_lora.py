"""The LoRA callback in real Lightning fits on CPU: every family, resume, bad input."""

from __future__ import annotations

import os

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_helpers import FamilyModule, moved_key, quiet_trainer
from tiny_models import FAMILIES, forward

from lightning_peft import LoRA
from lightning_peft.adapters import TargetNotFoundError, adapter_layers, load_adapter

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def lora_state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if ".lora_" in k}


def _targets(name: str) -> list[str] | None:
    return ["fc1", "fc2"] if name == "mlp" else None  # the mlp has no preset


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_fit_trains_only_the_adapters(name: str, tmp_path) -> None:
    module = FamilyModule(name, n_batches=3)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    callback = LoRA(
        r=4,
        alpha=8,
        init="gaussian",
        target_modules=_targets(name),
        backbone="model",
        save_dir=str(tmp_path / "adapter"),
    )
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[callback])
    trainer.fit(module)

    assert callback.adapted, "no layer was adapted"
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in module.parameters() if p.requires_grad}
    assert all(n.rsplit(".", 1)[-1].startswith("lora_") for n, p in module.named_parameters() if p.requires_grad)
    after = module.state_dict()
    for key, value in before.items():  # every base tensor is bit-for-bit untouched
        torch.testing.assert_close(after[moved_key(key, callback)], value, rtol=0, atol=0)
    assert all(layer.lora_B.abs().sum() > 0 for _, layer in adapter_layers(module.model)), "adapters did not train"
    # the saved adapter reproduces the trained model on a fresh base
    fresh = FAMILIES[name](seed=0).eval()
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(forward(name, fresh), forward(name, module.model.eval()))


def test_resume_continues_exactly(tmp_path) -> None:
    def run(max_epochs: int, ckpt_path: str | None = None, save: bool = False) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        module = FamilyModule("vit", n_batches=4)
        callbacks = [LoRA(r=4, alpha=8)]  # no dropout: Lightning does not checkpoint the global RNG
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, filename="last", save_last=False))
        trainer = quiet_trainer(
            max_epochs=max_epochs, limit_val_batches=0, callbacks=callbacks, enable_checkpointing=save
        )
        trainer.fit(module, ckpt_path=ckpt_path)
        assert trainer.global_step == 4 * max_epochs
        return lora_state(module)

    straight = run(4)
    run(2, save=True)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert any(k.startswith("LoRA") for k in ckpt["callbacks"]), ckpt["callbacks"].keys()
    resumed = run(4, ckpt_path=str(tmp_path / "last.ckpt"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)


def test_resume_with_another_config_is_refused(tmp_path) -> None:
    module = FamilyModule("vit", n_batches=2)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[LoRA(r=4, alpha=8)])
    trainer.fit(module)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    other = LoRA(r=4, alpha=32)
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[other])
    # alpha does not change any shape, so only the callback's own check can catch it
    with pytest.raises(ValueError, match="alpha"):
        trainer.fit(FamilyModule("vit", n_batches=2), ckpt_path=tmp_path / "a.ckpt")


def test_targets_matching_nothing_fail_before_training_and_write_nothing(tmp_path) -> None:
    module = FamilyModule("vit", n_batches=2)
    out = tmp_path / "adapter"
    trainer = quiet_trainer(max_epochs=1, callbacks=[LoRA(target_modules=["q_proj"], save_dir=str(out))])
    with pytest.raises(TargetNotFoundError, match="attn.qkv"):
        trainer.fit(module)
    assert trainer.global_step == 0 and not out.exists()
    assert not list(adapter_layers(module))


def test_unknown_model_without_targets_asks_for_them() -> None:
    trainer = quiet_trainer(max_epochs=1, callbacks=[LoRA()])
    with pytest.raises(ValueError, match="target_modules must be given"):
        trainer.fit(FamilyModule("mlp", n_batches=2))


def test_backbone_path_is_checked() -> None:
    trainer = quiet_trainer(max_epochs=1, callbacks=[LoRA(backbone="encoder")])
    with pytest.raises(ValueError, match="children are: model"):
        trainer.fit(FamilyModule("vit", n_batches=2))


@pytest.mark.parametrize("kwargs", [{"r": 0}, {"alpha": -1.0}, {"dropout": 1.5}])
def test_bad_hyperparameters_fail_at_construction(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LoRA(**kwargs)


def test_second_fit_and_validate_reuse_the_adapters() -> None:
    module = FamilyModule("vit", n_batches=2)
    callback = LoRA(r=2, alpha=4)
    quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[callback]).fit(module)
    n_layers = len(list(adapter_layers(module)))
    quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[callback]).fit(module)
    quiet_trainer(callbacks=[callback]).validate(module, verbose=False)
    assert len(list(adapter_layers(module))) == n_layers


def test_state_keys_tell_apart_backbones_and_targets_but_not_ranks() -> None:
    assert LoRA(r=4, backbone="model").state_key != LoRA(r=4).state_key
    assert LoRA(target_modules=["qkv"]).state_key != LoRA(target_modules=["proj"]).state_key
    # the same slot for another r: resuming with it reaches the callback's check instead of being skipped silently
    assert LoRA(r=4).state_key == LoRA(r=8).state_key
