"""The SSF callback in real Lightning fits on CPU: what trains, save → zoo → load, resume, bad input, 2 ranks."""

from __future__ import annotations

import os

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_helpers import FamilyModule, moved_key, quiet_trainer, run_two_ranks
from tiny_models import FAMILIES, forward

from lightning_peft import SSF, ZooPublisher, zoo
from lightning_peft.adapters import TargetNotFoundError, load_adapter
from lightning_peft.adapters.ssf import ssf_layers

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def ssf_state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if ".ssf_" in k}


def test_fit_trains_only_ssf_and_the_head_and_the_result_loads_from_the_zoo(tmp_path) -> None:
    module = FamilyModule("vit", n_batches=3)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    callback = SSF(modules_to_save=["head"], save_dir=str(tmp_path / "adapter"))
    publisher = ZooPublisher(name="tiny-ssf", root=str(tmp_path / "zoo"), base_model="tiny-vit")
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[callback, publisher])
    trainer.fit(module)

    assert len(callback.adapted) == 14  # patch embed + 6 per block x 2 + final norm
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert all(".ssf_" in n or n.startswith("model.head.") for n in trainable)
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in module.parameters() if p.requires_grad}
    after = module.state_dict()
    for key, value in before.items():  # every base tensor is bit-for-bit untouched
        if not key.startswith("model.head."):
            torch.testing.assert_close(after[moved_key(key, callback)], value, rtol=0, atol=0)
    assert all((layer.ssf_scale != 1).any() for _, layer in ssf_layers(module.model)), "SSF did not train"
    saved = tmp_path / "adapter"
    assert {"adapter_model.safetensors", "adapter_config.json", "lightning_peft.json", "ssf_scale_shift.png"} <= {
        p.name for p in saved.iterdir()
    }
    module.model.eval()
    for loader in ("folder", "zoo"):
        fresh = FAMILIES["vit"](seed=0).eval()
        if loader == "folder":
            load_adapter(fresh, saved)
        else:
            manifest = zoo.load(fresh, "tiny-ssf", zoo=zoo.LocalZoo(tmp_path / "zoo"))
            assert manifest["method"] == "ssf" and manifest["schedule"]["scale_change"]
        torch.testing.assert_close(forward("vit", fresh), forward("vit", module.model))
    with pytest.raises(zoo.FingerprintMismatchError):
        zoo.load(FAMILIES["vit"](seed=1), "tiny-ssf", zoo=zoo.LocalZoo(tmp_path / "zoo"))


def test_any_model_by_target_modules() -> None:
    module = FamilyModule("mlp", n_batches=2)
    callback = SSF(target_modules=["fc1", "fc2"])
    quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[callback]).fit(module)
    assert callback.adapted == [f"model.blocks.{i}.fc{j}" for i in range(3) for j in (1, 2)]


def test_resume_continues_exactly(tmp_path) -> None:
    def run(max_epochs: int, ckpt_path: str | None = None, save: bool = False) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        module = FamilyModule("vit", n_batches=4)
        callbacks = [SSF(init="normal", modules_to_save=["head"])]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, filename="last", save_last=False))
        trainer = quiet_trainer(
            max_epochs=max_epochs, limit_val_batches=0, callbacks=callbacks, enable_checkpointing=save
        )
        trainer.fit(module, ckpt_path=ckpt_path)
        assert trainer.global_step == 4 * max_epochs
        return ssf_state(module)

    straight = run(4)
    run(2, save=True)
    resumed = run(4, ckpt_path=str(tmp_path / "last.ckpt"))
    assert straight.keys() == resumed.keys() and straight
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)
    trainer = quiet_trainer(max_epochs=5, limit_val_batches=0, callbacks=[SSF(init="identity")])
    with pytest.raises(ValueError, match="init"):
        trainer.fit(FamilyModule("vit", n_batches=4), ckpt_path=tmp_path / "last.ckpt")


def test_bad_arguments_fail_before_training(tmp_path) -> None:
    with pytest.raises(ValueError, match="init"):
        SSF(init="ones")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        SSF(target_modules=[])
    module = FamilyModule("vit", n_batches=2)
    out = tmp_path / "adapter"
    trainer = quiet_trainer(max_epochs=1, callbacks=[SSF(target_modules=["q_proj"], save_dir=str(out))])
    with pytest.raises(TargetNotFoundError, match="attn.qkv"):
        trainer.fit(module)
    assert trainer.global_step == 0 and not out.exists() and not list(ssf_layers(module))
    with pytest.raises(ValueError, match="target_modules must be given"):
        quiet_trainer(max_epochs=1, callbacks=[SSF()]).fit(FamilyModule("mlp", n_batches=2))
    with pytest.raises(ValueError, match="no default targets for the hf-llama family"):
        quiet_trainer(max_epochs=1, callbacks=[SSF()]).fit(FamilyModule("llama", n_batches=2))
    llama = FamilyModule("llama", n_batches=2)
    with pytest.raises(TypeError, match="q_proj: .*bias=False"):
        quiet_trainer(max_epochs=1, callbacks=[SSF(target_modules=["q_proj"])]).fit(llama)
    assert not list(ssf_layers(llama))


def test_a_second_fit_reuses_the_layers_and_other_settings_are_refused() -> None:
    module = FamilyModule("vit", n_batches=2)
    quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[SSF()]).fit(module)
    n = len(list(ssf_layers(module)))
    quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[SSF()]).fit(module)
    assert len(list(ssf_layers(module))) == n
    with pytest.raises(ValueError, match="other settings"):
        quiet_trainer(max_epochs=1, callbacks=[SSF(target_modules=["qkv"])]).fit(module)


def test_strategies_other_than_data_parallel_are_refused_by_name() -> None:
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    from lightning_peft.callbacks.ssf import _check_strategy

    _check_strategy(DDPStrategy())
    _check_strategy(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))  # FSDP2: tested in test_fsdp2
    with pytest.raises(NotImplementedError, match="tensor_parallel_size=2"):
        _check_strategy(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2))
    with pytest.raises(NotImplementedError, match="FSDPStrategy"):
        _check_strategy(FSDPStrategy())


@pytest.mark.slow
def test_plain_ddp_keeps_both_ranks_identical(tmp_path) -> None:
    states, logs = run_two_ranks("ddp_lora.py", tmp_path, "ssf")
    assert logs[0]["step"] == logs[1]["step"] == 8
    assert set(logs[0]["seeds"][:4]).isdisjoint(logs[1]["seeds"][:4]), "ranks saw the same data"
    assert states[0].keys() == states[1].keys() and any(".ssf_scale" in k for k in states[0])
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0, msg=f"{key} differs across ranks")
    moved = [k for k in states[0] if ".ssf_scale" in k and not torch.allclose(states[0][k], torch.ones(1))]
    assert moved, "SSF did not train"
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    key = moved[0]
    torch.testing.assert_close(saved["base_model.model." + key.removeprefix("model.")], states[0][key])
    published = zoo.LocalZoo(tmp_path / "zoo")  # ZooPublisher: gathered on both ranks, published once by rank 0
    assert len(published.revisions("ddp-vit")) == 1
