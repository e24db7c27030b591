"""Adapter dtype (peft's ``autocast_adapter_dtype``): float32 adapters beside a half-precision base, whatever casts it.

Lightning's ``precision="bf16-true"`` casts the module with ``.to(torch.bfloat16)`` in ``strategy.setup``,
after the callbacks injected the adapters in ``setup`` and before the optimizer is built; the adapters must
come out of that cast float32 and be the parameters the optimizer holds.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lit_helpers import FamilyModule, quiet_trainer
from safetensors import safe_open
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_peft import AdaLoRA, LoRA
from lightning_peft.adapters import AdaLoRAConfig, LoRAConfig, adapter_layers, inject_adapters, load_adapter

HALF = [torch.bfloat16, torch.float16]


def make_config(method: str, **kw) -> LoRAConfig:
    if method == "adalora":
        return AdaLoRAConfig(r=4, target_r=2, target_modules=["0", "2"], init="nonzero", **kw)
    return LoRAConfig(r=4, alpha=8, target_modules=["0", "2"], init="nonzero", **kw)


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))


def lora_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


class CountTo(TorchFunctionMode):
    """Counts ``Tensor.to`` calls (a dtype cast is a copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.to:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["lora", "adalora"])
@pytest.mark.parametrize("dtype", HALF)
def test_a_half_precision_base_gets_float32_adapters(method: str, dtype: torch.dtype) -> None:
    model = mlp().to(dtype)
    inject_adapters(model, make_config(method))
    assert all(p.dtype == torch.float32 for p in lora_params(model).values())
    off = mlp().to(dtype)
    inject_adapters(off, make_config(method, autocast_adapter_dtype=False))
    assert all(p.dtype == dtype for p in lora_params(off).values())


@pytest.mark.parametrize("method", ["lora", "adalora"])
@pytest.mark.parametrize("cast", ["to", "bfloat16", "half"])
def test_casting_the_module_leaves_the_adapters_float32_and_the_same_parameters(method: str, cast: str) -> None:
    model = mlp()
    inject_adapters(model, make_config(method))
    before = lora_params(model)
    values = {n: p.detach().clone() for n, p in before.items()}
    model[0](torch.randn(2, 8)).sum().backward()  # some adapters hold gradients
    target = torch.float16 if cast == "half" else torch.bfloat16
    model.to(target) if cast == "to" else getattr(model, cast)()
    after = lora_params(model)
    assert all(after[n] is p for n, p in before.items())  # an optimizer built earlier still holds them
    for name, param in after.items():
        assert param.dtype == torch.float32 and (param.grad is None or param.grad.dtype == torch.float32)
        torch.testing.assert_close(param.detach(), values[name], rtol=0, atol=0)  # no round trip through bf16
    assert all(layer.base_layer.weight.dtype == target for _, layer in adapter_layers(model))
    off = mlp()
    inject_adapters(off, make_config(method, autocast_adapter_dtype=False))
    off.to(target)
    assert all(p.dtype == target for p in lora_params(off).values())


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_the_forward_computes_in_the_adapter_dtype_and_returns_the_base_dtype(method: str) -> None:
    model = mlp()
    inject_adapters(model, make_config(method))
    layer = model[0]
    x = torch.randn(3, 8)
    float_out = layer(x)
    model.bfloat16()
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), float_out, atol=0.1, rtol=0.05)  # only the base ran in bf16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters(recurse=False))


def test_equal_dtypes_cost_no_cast_and_mixed_ones_two() -> None:
    model = mlp()
    inject_adapters(model, make_config("lora"))
    x = torch.randn(3, 8)
    with CountTo() as counter:
        model[0](x)
    assert counter.calls == 0  # the float32 hot path: no copy
    model.bfloat16()
    with CountTo() as counter:
        model[0](x.bfloat16())
    assert counter.calls == 2  # the input to float32, the update back to bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16), CountTo() as counter:
        model[0](x.bfloat16())
    assert counter.calls <= 1  # autocast casts the matmuls itself: the input is not copied to float32 first


@pytest.mark.parametrize("callback", ["lora", "adalora"])
@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_true_fit_trains_float32_adapters(callback: str, autocast: bool, tmp_path) -> None:
    module = FamilyModule("mlp", n_batches=4)
    kw = dict(target_modules=["fc1", "fc2"], backbone="model", save_dir=str(tmp_path / "adapter"))
    kw["autocast_adapter_dtype"] = autocast
    cb = LoRA(r=4, alpha=8, init="gaussian", **kw) if callback == "lora" else AdaLoRA(r=4, target_r=2, **kw)
    captured: dict[str, dict[str, torch.Tensor]] = {}

    class Capture(Callback):
        def on_fit_start(self, trainer, pl_module) -> None:  # after strategy.setup's cast, before training
            captured["start"] = {n: p.detach().clone() for n, p in lora_params(pl_module).items()}

    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, precision="bf16-true", callbacks=[cb, Capture()])
    trainer.fit(module)

    expected = torch.float32 if autocast else torch.bfloat16
    layers = dict(adapter_layers(module.model))
    assert layers and all(layer.base_layer.weight.dtype == torch.bfloat16 for layer in layers.values())
    params = lora_params(module)
    assert params and all(p.dtype == expected for p in params.values())
    assert all(t.dtype == expected for t in captured["start"].values())  # already so when training started
    if callback == "lora":
        opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        assert opt_params == {id(p) for p in module.parameters() if p.requires_grad}
        assert any(not torch.equal(params[n].detach(), v) for n, v in captured["start"].items()), "did not train"
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {expected}  # noqa: SIM118
    fresh = FamilyModule("mlp").model.to(torch.bfloat16)
    load_adapter(fresh, tmp_path / "adapter")
    assert all(p.dtype == torch.float32 for p in lora_params(fresh).values())  # a load keeps the default too
