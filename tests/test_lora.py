"""The LoRA layer and its plumbing on a table of tiny models of every family (non-identity init)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import FAMILIES, forward
from torch import nn

from lightning_peft.adapters import (
    AdapterMismatchError,
    LoRAConfig,
    LoRALayer,
    adapter_layers,
    count_parameters,
    disable_adapters,
    inject_adapters,
    load_adapter,
    merge_adapters,
    remove_adapters,
    save_adapter,
    unmerge_adapters,
)
from lightning_peft.backbones import default_target_modules

NAMES = sorted(FAMILIES)
MLP_TARGETS = ["fc1", "fc2"]


def targets_for(name: str, model: nn.Module) -> list[str]:
    preset = default_target_modules(model)
    return list(preset) if preset else MLP_TARGETS


def build(name: str, seed: int = 0, init: str = "nonzero", r: int = 4, **kw) -> tuple[nn.Module, LoRAConfig]:
    model = FAMILIES[name](seed=seed)
    config = LoRAConfig(r=r, alpha=8, target_modules=targets_for(name, model), init=init, **kw)
    torch.manual_seed(seed + 100)
    inject_adapters(model, config)
    return model.eval(), config


@pytest.mark.parametrize("name", NAMES)
def test_identity_init_keeps_output_and_nonzero_changes_it(name: str) -> None:
    base = FAMILIES[name](seed=0).eval()
    reference = forward(name, base)
    identity, _ = build(name, init="kaiming")
    torch.testing.assert_close(forward(name, identity), reference)
    changed, _ = build(name, init="nonzero")
    assert not torch.allclose(forward(name, changed), reference, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_only_adapters_train_and_remove_restores_the_model(name: str) -> None:
    base = FAMILIES[name](seed=0).eval()
    reference, keys = forward(name, base), list(base.state_dict())
    model, config = build(name)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in trainable)
    assert len(trainable) == 2 * len(list(adapter_layers(model)))
    removed = remove_adapters(model)
    assert len(removed) == len(trainable) // 2 and not list(adapter_layers(model))
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(forward(name, model), reference)


@pytest.mark.parametrize("name", NAMES)
def test_merge_unmerge_are_inverses(name: str) -> None:
    model, _ = build(name)
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in adapter_layers(model)}
    out = forward(name, model)
    merge_adapters(model)
    assert all(layer.merged for _, layer in adapter_layers(model))
    torch.testing.assert_close(forward(name, model), out, atol=1e-4, rtol=1e-4)
    unmerge_adapters(model)
    for n, layer in adapter_layers(model):
        torch.testing.assert_close(layer.base_layer.weight, weights[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(forward(name, model), out)


@pytest.mark.parametrize("name", NAMES)
def test_disable_gives_the_base_model(name: str) -> None:
    reference = forward(name, FAMILIES[name](seed=0).eval())
    model, _ = build(name)
    with disable_adapters(model):
        torch.testing.assert_close(forward(name, model), reference)
    assert not torch.allclose(forward(name, model), reference, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_merge_and_remove_keeps_the_adapted_output(name: str) -> None:
    model, _ = build(name)
    out = forward(name, model)
    remove_adapters(model, merge=True)
    assert not list(adapter_layers(model))
    torch.testing.assert_close(forward(name, model), out, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name: str, tmp_path) -> None:
    model, config = build(name, seed=0)
    out = forward(name, model)
    save_adapter(model, tmp_path / "adapter", config)
    # into a fresh base: layers are injected from adapter_config.json, then loaded
    fresh = FAMILIES[name](seed=0).eval()
    assert load_adapter(fresh, tmp_path / "adapter") is not None
    torch.testing.assert_close(forward(name, fresh), out)
    # into a model that already has (different) adapters of the same shape
    other, _ = build(name, seed=0, init="nonzero")
    for _, layer in adapter_layers(other):
        layer.reset_parameters("nonzero")
    assert not torch.allclose(forward(name, other), out, atol=1e-4)
    load_adapter(other, tmp_path / "adapter")
    torch.testing.assert_close(forward(name, other), out)


def test_modules_to_save_are_trained_and_saved(tmp_path) -> None:
    model, config = build("vit", modules_to_save=["head"])
    assert all(p.requires_grad for p in model.head.parameters())
    with torch.no_grad():
        model.head.weight.add_(1.0)
    out = forward("vit", model)
    save_adapter(model, tmp_path, config)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["head"] and cfg["peft_type"] == "LORA"
    fresh = FAMILIES["vit"](seed=0).eval()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(forward("vit", fresh), out)


def test_wrong_model_is_refused_and_left_unchanged(tmp_path) -> None:
    model, config = build("vit")
    save_adapter(model, tmp_path / "vit", config)
    llama = FAMILIES["llama"](seed=0)
    keys = list(llama.state_dict())
    with pytest.raises(AdapterMismatchError, match="does not have"):
        load_adapter(llama, tmp_path / "vit")
    assert list(llama.state_dict()) == keys


def test_other_rank_is_refused_naming_the_tensor(tmp_path) -> None:
    model, config = build("llama", r=4)
    save_adapter(model, tmp_path, config)
    other, _ = build("llama", r=2)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterMismatchError, match=r"lora_A\.weight.*shape \(4, \d+\).*\(2, \d+\)"):
        load_adapter(other, tmp_path)
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_other_architecture_same_names_is_refused(tmp_path) -> None:
    model, config = build("mlp")
    save_adapter(model, tmp_path, config)
    wide = FAMILIES["mlp"](seed=0)
    wide.blocks[0].fc1 = nn.Linear(16, 48)
    with pytest.raises(AdapterMismatchError, match="shape"):
        load_adapter(wide, tmp_path)
    assert not list(adapter_layers(wide))  # the failed load took its injected layers back out


def test_pickle_and_garbage_files_are_refused(tmp_path) -> None:
    model, _ = build("mlp")
    pt = tmp_path / "adapter.bin"
    torch.save({"x": torch.zeros(1)}, pt)
    with pytest.raises(ValueError, match="safetensors"):
        load_adapter(model, pt)
    with pytest.raises(FileNotFoundError, match="pickle"):
        load_adapter(model, tmp_path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_adapter(model, bad)


def test_unknown_tensor_is_refused(tmp_path) -> None:
    model, config = build("mlp")
    save_adapter(model, tmp_path, config)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.blocks.0.fc1.lora_C.weight"] = torch.zeros(1)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterMismatchError, match="lora_C"):
        load_adapter(model, tmp_path)


def test_save_is_atomic(tmp_path, monkeypatch) -> None:
    model, config = build("mlp")
    save_adapter(model, tmp_path, config)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    for _, layer in adapter_layers(model):
        layer.reset_parameters("nonzero")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lightning_peft.adapters.serialization.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path, config)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, "rank"),
        ({"r": -2}, "rank"),
        ({"r": 2.5}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"init": "zeros"}, "init"),
    ],
)
def test_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kwargs)


def test_scaling_and_count() -> None:
    assert LoRAConfig(r=4, alpha=8).scaling == 2.0
    assert LoRAConfig(r=4, alpha=8, use_rslora=True).scaling == 4.0
    net = nn.Sequential(nn.Linear(10, 10))
    inject_adapters(net, LoRAConfig(r=2, target_modules=["0"]))
    assert count_parameters(net) == (40, 150)


def test_dropout_is_applied_in_training_only() -> None:
    torch.manual_seed(0)
    layer = LoRALayer(nn.Linear(8, 8), r=4, scaling=1.0, dropout=0.5, init="nonzero")
    x = torch.randn(4, 8)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_grouped_conv_is_a_clear_error() -> None:
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(TypeError, match="grouped"):
        inject_adapters(net, LoRAConfig(r=2, target_modules=["0"]))
    assert isinstance(net[0], nn.Conv2d)


def test_double_injection_is_refused() -> None:
    model, config = build("mlp")
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_adapters(model, config)


CONV_TARGETS = ["conv_in", "conv1", "conv2", "downsamplers.0.conv", "conv_out"]  # 3x3 kernels, stride 1 and 2


def test_conv2d_lora_merge_save_load_on_a_unet(tmp_path) -> None:
    model = FAMILIES["unet"](seed=0).eval()
    config = LoRAConfig(r=3, alpha=6, target_modules=CONV_TARGETS, init="nonzero")
    torch.manual_seed(5)
    adapted = inject_adapters(model, config)
    assert {type(layer.base_layer) for _, layer in adapter_layers(model)} == {nn.Conv2d}
    assert any(layer.base_layer.stride == (2, 2) for _, layer in adapter_layers(model))
    out = forward("unet", model)
    assert not torch.allclose(out, forward("unet", FAMILIES["unet"](seed=0).eval()), atol=1e-4)
    save_adapter(model, tmp_path, config)
    merge_adapters(model)  # the merged kernel computes what the two-conv path computed
    torch.testing.assert_close(forward("unet", model), out, atol=1e-4, rtol=1e-4)
    fresh = FAMILIES["unet"](seed=0).eval()
    load_adapter(fresh, tmp_path)
    assert [n for n, _ in adapter_layers(fresh)] == adapted
    torch.testing.assert_close(forward("unet", fresh), out)


def test_conv2d_lora_matches_peft(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    model = FAMILIES["unet"](seed=0).eval()
    config = LoRAConfig(r=3, alpha=6, target_modules=CONV_TARGETS, init="nonzero")
    torch.manual_seed(5)
    inject_adapters(model, config)
    save_adapter(model, tmp_path, config)
    theirs = peft.PeftModel.from_pretrained(FAMILIES["unet"](seed=0), tmp_path).eval()
    torch.testing.assert_close(forward("unet", theirs), forward("unet", model), atol=1e-5, rtol=1e-5)
