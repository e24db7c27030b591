"""LoRA and AdaLoRA on quantized bases (QLoRA-style): bitsandbytes 4-bit and 8-bit Linear, on CPU.

bitsandbytes runs on CPU (a layer is quantized when it is moved to a device, here ``.to("cpu")``); the
tests that need it skip where it is not installed, and the CUDA kernel check skips without CUDA. The
refusals of other quantized layers need no quantization library at all.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from lit_helpers import FamilyModule, quiet_trainer
from tiny_models import FAMILIES, forward
from torch import nn

from lightning_peft import AdaLoRA, LoRA
from lightning_peft.adapters import (
    AdaLoRAConfig,
    LoRAConfig,
    LoRALayer,
    adapter_layers,
    inject_adapters,
    load_adapter,
    merge_adapters,
    remove_adapters,
    save_adapter,
)
from lightning_peft.adapters.targeting import match_targets
from lightning_peft.zoo.entry import fingerprint

KINDS = ["nf4", "fp4", "int8"]


@pytest.fixture(scope="module")
def bnb():
    with warnings.catch_warnings():  # it warns that the optional `kernels` package is missing
        warnings.simplefilter("ignore")
        return pytest.importorskip("bitsandbytes")


def quantized_linear(bnb, kind: str, linear: nn.Linear, device: str = "cpu") -> nn.Module:
    """``linear`` as a bitsandbytes layer, quantized from its weights (as transformers' BitsAndBytesConfig does)."""
    bias = linear.bias is not None
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=bias, compute_dtype=torch.float32, quant_type=kind
        )
    layer.load_state_dict(linear.state_dict())
    return layer.to(device)  # quantizes


def quantize(bnb, model: nn.Module, kind: str, skip: tuple[str, ...] = ("lm_head",), device: str = "cpu") -> nn.Module:
    """Every ``nn.Linear`` of ``model`` (but ``skip``) replaced by its quantized form, in place."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] not in skip:
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, child, quantized_linear(bnb, kind, module, device))
    return model


def reference_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


def quantized_mlp(bnb, kind: str, seed: int = 0) -> nn.Module:
    """A 16 -> 32 -> 16 -> 4 MLP whose first two layers are quantized (the head stays float)."""
    model = reference_mlp(seed)
    model[0] = quantized_linear(bnb, kind, model[0])
    model[2] = quantized_linear(bnb, kind, model[2])
    return model


def make_config(method: str, **kw) -> LoRAConfig:
    if method == "adalora":
        return AdaLoRAConfig(r=4, target_r=2, target_modules=["0", "2"], init="nonzero", total_step=10, **kw)
    return LoRAConfig(r=4, alpha=8, target_modules=["0", "2"], init="nonzero", **kw)


def train_changes_output(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    """A few AdamW steps on the trainable parameters change the model's output."""
    before = model(x).detach()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert not torch.allclose(model(x), before, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "adalora"])
@pytest.mark.parametrize("kind", KINDS)
def test_adapters_on_a_quantized_base_are_float32_and_train_alone(bnb, kind: str, method: str) -> None:
    model = quantized_mlp(bnb, kind)
    packed = {n: t.clone() for n, t in model.state_dict().items()}
    assert not model[0].weight.is_floating_point()  # really quantized
    inject_adapters(model, make_config(method))
    for _, layer in adapter_layers(model):
        base = layer.base_layer
        assert layer.quantized == ("8-bit" if kind == "int8" else "4-bit")
        assert tuple(layer.lora_A.shape) == (4, base.in_features)  # from the features, not the packed weight
        assert tuple(layer.lora_B.shape) == (base.out_features, 4)
        assert all(p.dtype == torch.float32 for p in layer.parameters(recurse=False))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1].startswith("lora_") for n in trainable)
    train_changes_output(model, torch.randn(5, 16, generator=torch.Generator().manual_seed(0)))
    after = {n.replace(".base_layer.", "."): t for n, t in model.state_dict().items() if ".lora_" not in n}
    for name, tensor in packed.items():  # the quantized base is untouched, byte for byte
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["lora", "adalora"])
@pytest.mark.parametrize("kind", KINDS)
def test_saved_adapter_loads_onto_a_freshly_quantized_base(bnb, kind: str, method: str, tmp_path) -> None:
    model = quantized_mlp(bnb, kind)
    config = make_config(method)
    inject_adapters(model, config)
    if method == "adalora":  # a pruned rank pattern travels too
        for _, layer in adapter_layers(model):
            layer.shrink(torch.tensor([True, False, True, True]))
    save_adapter(model, tmp_path / "adapter", config)
    fresh = quantized_mlp(bnb, kind)
    # quantizing the same weights again gives the same fingerprint (the zoo's check before loading)
    assert fingerprint(fresh) == fingerprint(model) == fingerprint(quantized_mlp(bnb, kind))
    assert fingerprint(fresh) != fingerprint(quantized_mlp(bnb, kind, seed=1))
    load_adapter(fresh, tmp_path / "adapter")
    assert all(layer.lora_A.dtype == torch.float32 for _, layer in adapter_layers(fresh))
    x = torch.randn(5, 16)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_into_a_quantized_base_is_refused_and_changes_nothing(bnb, kind: str) -> None:
    model = quantized_mlp(bnb, kind)
    inject_adapters(model, LoRAConfig(r=2, target_modules=["0", "2", "4"], init="nonzero"))  # "4" is float
    state = {n: t.clone() for n, t in model.state_dict().items()}
    for call in (merge_adapters, lambda m: remove_adapters(m, merge=True)):
        with pytest.raises(RuntimeError, match=r"cannot merge LoRA into a quantized base.*floating-point copy"):
            call(model)
        assert not any(layer.merged for _, layer in adapter_layers(model))  # not half merged: "4" was not either
        assert len(list(adapter_layers(model))) == 3
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(tensor, state[name], rtol=0, atol=0)


def test_merge_onto_a_float_copy_of_the_base_is_the_way(bnb, tmp_path) -> None:
    """The documented workflow: train on the quantized base, merge into the float base it was quantized from."""
    model = quantized_mlp(bnb, "nf4")
    config = make_config("lora")
    inject_adapters(model, config)
    save_adapter(model, tmp_path / "adapter", config)
    float_base = reference_mlp()
    load_adapter(float_base, tmp_path / "adapter")
    x = torch.randn(5, 16)
    adapted = float_base(x)
    merge_adapters(float_base)
    torch.testing.assert_close(float_base(x), adapted, atol=1e-5, rtol=1e-5)


def test_the_compute_dtype_is_used_when_asked(bnb) -> None:
    linear = nn.Linear(16, 8)
    layer = bnb.nn.Linear4bit(16, 8, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.load_state_dict(linear.state_dict())
    layer = layer.to("cpu")
    assert LoRALayer(layer, r=2, scaling=1.0).lora_A.dtype == torch.float32
    kept = LoRALayer(layer, r=2, scaling=1.0, autocast_adapter_dtype=False)
    assert kept.lora_A.dtype == kept.lora_B.dtype == torch.bfloat16
    out = kept(torch.randn(3, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (3, 8)


@pytest.mark.parametrize("callback", ["lora", "adalora"])
def test_fit_on_a_quantized_llama(bnb, callback: str, tmp_path) -> None:
    """A Lightning fit with the callback on a tiny Llama whose projections are 4-bit (the QLoRA set-up)."""
    module = FamilyModule("llama", n_batches=4)
    quantize(bnb, module.model, "nf4")
    base = {n: t.clone() for n, t in module.model.state_dict().items()}
    save_dir = str(tmp_path / "adapter")
    cb = LoRA(r=4, alpha=8, init="gaussian", save_dir=save_dir) if callback == "lora" else None
    if cb is None:
        cb = AdaLoRA(r=4, target_r=2, tinit=1, tfinal=1, deltaT=1, save_dir=save_dir)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[cb])
    trainer.fit(module)

    layers = dict(adapter_layers(module.model))
    assert layers and all(layer.quantized == "4-bit" for layer in layers.values())
    assert all(p.dtype == torch.float32 for layer in layers.values() for p in layer.parameters(recurse=False))
    assert any(layer.lora_B.abs().sum() > 0 for layer in layers.values())
    if callback == "lora":  # AdaLoRA's shrink at the end of fit makes new, smaller parameters
        opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        assert opt_params == {id(p) for p in module.parameters() if p.requires_grad}
    after = {n.replace(".base_layer.", "."): t for n, t in module.model.state_dict().items() if ".lora_" not in n}
    for name, tensor in base.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0)
    # train mode (the tiny Llama has no dropout): in eval mode bitsandbytes repacks a 4-bit weight for its CPU
    # kernel, which needs in_features to be a multiple of its block size (64; this Llama is 32 wide)
    fresh = quantize(bnb, FAMILIES["llama"](seed=0), "nf4")
    load_adapter(fresh, save_dir)
    torch.testing.assert_close(forward("llama", fresh), forward("llama", module.model), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bitsandbytes CUDA kernels need a GPU")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_kernels_train_and_round_trip(bnb, kind: str, tmp_path) -> None:
    def build() -> nn.Module:
        model = reference_mlp()
        for i in (0, 2):
            model[i] = quantized_linear(bnb, kind, model[i], device="cuda")
        return model.cuda()

    model = build()
    config = make_config("lora")
    inject_adapters(model, config)
    assert all(layer.lora_A.is_cuda and layer.lora_A.dtype == torch.float32 for _, layer in adapter_layers(model))
    x = torch.randn(5, 16, device="cuda")
    train_changes_output(model, x)
    save_adapter(model, tmp_path / "adapter", config)
    fresh = build()
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


# ----------------------------------------------------------------- other quantized layers are refused by name
class HQQLinear(nn.Module):
    """Stands in for hqq's ``HQQLinear`` (no ``nn.Linear``; packed weights in ``W_q``)."""

    __module__ = "hqq.core.quantize"

    def __init__(self) -> None:
        super().__init__()
        self.in_features, self.out_features = 4, 4
        self.register_buffer("W_q", torch.zeros(8, 1, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class AffineQuantizedTensor(torch.Tensor):
    """Stands in for a torchao tensor subclass (it reports a float dtype)."""

    __module__ = "torchao.dtypes.affine_quantized_tensor"


def torchao_linear() -> nn.Linear:
    linear = nn.Linear(4, 4)
    linear.weight = nn.Parameter(linear.weight.detach().as_subclass(AffineQuantizedTensor), requires_grad=False)
    return linear


def int8_linear() -> nn.Linear:
    """A GPTQ/AWQ-like layer that kept ``nn.Linear`` but holds an integer weight."""
    linear = nn.Linear(4, 4)
    linear.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    return linear


@pytest.mark.parametrize(
    ("make", "what"),
    [(HQQLinear, r"HQQLinear \(hqq\)"), (torchao_linear, r"a weight of type AffineQuantizedTensor \(torchao\)"),
     (int8_linear, r"a weight of dtype int8")],
)  # fmt: skip
@pytest.mark.parametrize("targets", [["q"], "all-linear"])
def test_other_quantized_layers_are_refused_naming_what_is_supported(make, what: str, targets) -> None:
    model = nn.Sequential()
    model.add_module("q", make())
    model.add_module("v", nn.Linear(4, 4))
    model.add_module("head", nn.Linear(4, 2))
    state = {n: t.clone() for n, t in model.state_dict().items()}
    message = rf"q \(\w+\) is a quantized layer \({what}\).*bitsandbytes Linear4bit \(nf4/fp4\) and Linear8bitLt"
    for config in (LoRAConfig(r=2, target_modules=targets), AdaLoRAConfig(r=2, target_r=1, target_modules=targets)):
        with pytest.raises(TypeError, match=message):
            inject_adapters(model, config)
    assert not list(adapter_layers(model)) and list(model.state_dict()) == list(state)
    with pytest.raises(TypeError, match="bitsandbytes Linear4bit"):
        LoRALayer(make(), r=2, scaling=1.0)
    assert match_targets(model, ["v"]).matched == ["v"]  # other layers of the model stay adaptable


@pytest.mark.parametrize("callback", ["id3", "sara"])
def test_sparse_methods_refuse_a_quantized_base_with_what_to_use(bnb, callback: str) -> None:
    from lightning_peft import ID3, SaRA

    module = FamilyModule("llama", n_batches=2)
    quantize(bnb, module.model, "nf4")
    cb = ID3(budget=10, total_steps=2) if callback == "id3" else SaRA(fraction=0.1)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[cb])
    with pytest.raises(ValueError, match=r"quantized \(bitsandbytes 4-bit\).*LoRA or AdaLoRA"):
        trainer.fit(module)
