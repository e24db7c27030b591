"""SSF layers (pure torch): the reference's forward, merge = unmerged pair, save/load, export, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from export_helpers import read_back
from tiny_models import example_inputs, forward, tiny_gpt2, tiny_mlp, tiny_vit
from torch import nn

import lightning_peft
from lightning_peft.adapters import TargetNotFoundError, load_adapter
from lightning_peft.adapters.ssf import (
    VIT_TARGETS,
    SSFConfig,
    SSFLayer,
    inject_ssf,
    merge_ssf,
    remove_ssf,
    ssf_config,
    ssf_layers,
    ssf_state_dict,
    write_ssf,
)
from lightning_peft.zoo import fingerprint


def reference_ssf_ada(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """A faithful re-implementation of ``ssf_ada`` of dongzelian/SSF (models/vision_transformer.py)."""
    assert scale.shape == shift.shape
    if x.shape[-1] == scale.shape[0]:
        return x * scale + shift
    elif x.shape[1] == scale.shape[0]:
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    else:
        raise ValueError("the input tensor shape does not match the shape of the scale factor.")


def reference_init(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``init_ssf_scale_shift`` of the reference."""
    scale, shift = torch.ones(dim), torch.zeros(dim)
    nn.init.normal_(scale, mean=1, std=0.02)
    nn.init.normal_(shift, std=0.02)
    return scale, shift


LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), (3, 4, 6)),
    "conv2d": (lambda: nn.Conv2d(3, 5, 3, padding=1), (2, 3, 7, 6)),
    "layernorm": (lambda: nn.LayerNorm(5), (3, 4, 5)),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_forward_equals_the_reference_ssf_ada(kind: str) -> None:
    torch.manual_seed(0)
    make, shape = LAYERS[kind]
    base = make()
    layer = SSFLayer(copy.deepcopy(base), init="normal")
    x = torch.randn(shape)
    want = reference_ssf_ada(base(x), layer.ssf_scale, layer.ssf_shift)
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    assert not torch.allclose(want, base(x))  # a non-identity init: the check can fail


def test_normal_init_has_the_reference_distribution() -> None:
    torch.manual_seed(0)
    layer = SSFLayer(nn.Linear(4, 4000), init="normal")
    ref_scale, ref_shift = reference_init(4000)
    for ours, ref, mean in ((layer.ssf_scale.detach(), ref_scale, 1.0), (layer.ssf_shift.detach(), ref_shift, 0.0)):
        assert abs(float(ours.mean()) - mean) < 2e-3 and abs(float(ours.std()) - 0.02) < 2e-3
        assert abs(float(ref.std()) - float(ours.std())) < 2e-3
    ident = SSFLayer(nn.Linear(4, 3))
    assert torch.equal(ident.ssf_scale, torch.ones(3)) and torch.equal(ident.ssf_shift, torch.zeros(3))


@pytest.mark.parametrize("kind", [*sorted(LAYERS), "conv1d"])
def test_merged_layer_equals_the_unmerged_pair(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "conv1d":
        from transformers.pytorch_utils import Conv1D

        base, shape = Conv1D(5, 6), (3, 4, 6)
        nn.init.normal_(base.bias)
    else:
        make, shape = LAYERS[kind]
        base = make()
    if kind == "layernorm":
        with torch.no_grad():
            base.weight.normal_()
            base.bias.normal_()
    layer = SSFLayer(base, init="normal")
    with torch.no_grad():
        layer.ssf_scale.mul_(3.0)  # far from 1, so a merge that ignored the scale would fail
        layer.ssf_shift.add_(0.5)
    x = torch.randn(shape)
    unmerged = layer(x).detach()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    layer.merge()
    torch.testing.assert_close(base(x), unmerged, atol=1e-5, rtol=1e-5)  # the plain layer alone
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    for key, value in base.state_dict().items():
        torch.testing.assert_close(value, original[key], atol=1e-6, rtol=1e-5)


def test_vit_default_targets_follow_the_reference() -> None:
    model = tiny_vit()
    names = inject_ssf(model, SSFConfig(target_modules=list(VIT_TARGETS)))
    per_block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    assert names == ["patch_embed.proj", *(f"blocks.{i}.{p}" for i in (0, 1) for p in per_block), "norm"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.ssf_{w}" for n in names for w in ("scale", "shift")}
    # identity init: the model is unchanged
    torch.testing.assert_close(forward("vit", model), forward("vit", tiny_vit()), rtol=0, atol=0)


def test_save_load_onto_a_fresh_base_and_fingerprint(tmp_path) -> None:
    torch.manual_seed(0)
    model = tiny_vit()
    base_print = fingerprint(model)
    config = SSFConfig(target_modules=list(VIT_TARGETS), modules_to_save=["head"], init="normal")
    inject_ssf(model, config)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    assert fingerprint(model, exclude=["head"])["sha256"] == fingerprint(tiny_vit(), exclude=["head"])["sha256"]
    assert fingerprint(model)["tensors"].keys() == base_print["tensors"].keys()  # SSF tensors are not base tensors
    write_ssf(tmp_path / "a", ssf_state_dict(model, ["head"]), ssf_config(model, config))
    fresh = tiny_vit()
    assert load_adapter(fresh, tmp_path / "a") is None
    assert [n for n, _ in ssf_layers(fresh)] == [n for n, _ in ssf_layers(model)]
    torch.testing.assert_close(forward("vit", fresh), forward("vit", model), rtol=0, atol=0)
    load_adapter(fresh, tmp_path / "a")  # onto layers already there
    other = tiny_mlp()
    with pytest.raises(ValueError, match="does not have"):
        load_adapter(other, tmp_path / "a")
    assert not list(ssf_layers(other))


def test_a_file_that_does_not_fit_leaves_the_model_as_it_was(tmp_path) -> None:
    model = tiny_vit()
    config = SSFConfig(target_modules=["attn.qkv"])
    inject_ssf(model, config)
    tensors = ssf_state_dict(model)
    key = next(iter(tensors))
    tensors[key] = torch.ones(7)
    write_ssf(tmp_path / "a", tensors, ssf_config(model, config))
    fresh = tiny_vit()
    with pytest.raises(ValueError, match="shape"):
        load_adapter(fresh, tmp_path / "a")
    assert not list(ssf_layers(fresh))


def test_export_merges_and_timm_reads_it_back_without_lightning_peft(tmp_path) -> None:
    import timm

    torch.manual_seed(0)
    kwargs = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2)
    model = timm.create_model("vit_tiny_patch16_224", **kwargs)
    inject_ssf(model, SSFConfig(target_modules=list(VIT_TARGETS), init="normal"))
    with torch.no_grad():
        for _, layer in ssf_layers(model):
            layer.ssf_scale.mul_(1.5)
            layer.ssf_shift.add_(0.1)
    model.eval()
    with torch.no_grad():
        want = forward("vit", model)
    out = lightning_peft.export(model, tmp_path / "merged")
    assert list(ssf_layers(model))  # the trained model is left as it is (merged in a copy)
    (got,) = read_back([("timm", out, example_inputs("vit", model))], tmp_path)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    plain = timm.create_model("vit_tiny_patch16_224", **kwargs).eval()
    with torch.no_grad():
        assert not torch.allclose(forward("vit", plain), want, atol=1e-3)


def test_gpt2_conv1d_export_equals_the_trained_model(tmp_path) -> None:
    model = tiny_gpt2()
    inject_ssf(model, SSFConfig(target_modules=["c_attn", "c_fc", "ln_1"], init="normal"))
    model.eval()
    with torch.no_grad():
        want = forward("gpt2", model)
    merged = lightning_peft.exporting.merged_model(model)
    with torch.no_grad():
        torch.testing.assert_close(forward("gpt2", merged.eval()), want, atol=1e-5, rtol=1e-5)


def test_what_cannot_be_merged_is_refused_before_the_model_changes() -> None:
    net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"0: .*bias=False.*exclude"):
        inject_ssf(net, SSFConfig(target_modules=["0", "1"]))
    assert not list(ssf_layers(net)) and all(p.requires_grad for p in net.parameters())
    with pytest.raises(TypeError, match="elementwise_affine"):
        SSFLayer(nn.LayerNorm(4, elementwise_affine=False))
    with pytest.raises(TypeError, match="no SSF layer for ReLU"):
        SSFLayer(nn.ReLU())
    with pytest.raises(TargetNotFoundError):
        inject_ssf(tiny_mlp(), SSFConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="init"):
        SSFConfig(init="ones")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already has SSF layers"):
        model = tiny_mlp()
        inject_ssf(model, SSFConfig(target_modules=["fc1"]))
        inject_ssf(model, SSFConfig(target_modules=["fc1"]))


def test_remove_restores_the_original_modules_and_merge_ssf_keeps_outputs() -> None:
    model = tiny_mlp()
    originals = {n: m for n, m in model.named_modules() if n.endswith("fc1")}
    inject_ssf(model, SSFConfig(target_modules=["fc1"], init="normal"))
    want = forward("mlp", model).detach()
    merge_ssf(model)
    torch.testing.assert_close(forward("mlp", model), want, atol=1e-5, rtol=1e-5)
    remove_ssf(model)  # unmerges, then unwraps
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    torch.testing.assert_close(forward("mlp", model), forward("mlp", tiny_mlp()), atol=1e-5, rtol=1e-5)
