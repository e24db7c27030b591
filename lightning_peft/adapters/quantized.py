"""Quantized base layers: which ones LoRA adapts (bitsandbytes 4-bit and 8-bit Linear) and which it refuses.

QLoRA-style training keeps the frozen base in a quantized form and trains floating-point adapters
beside it. A LoRA layer around a bitsandbytes ``Linear4bit`` (nf4 or fp4, and its ``LinearNF4`` /
``LinearFP4`` subclasses) or ``Linear8bitLt`` takes its adapter shapes from the layer's
``in_features`` / ``out_features`` (the packed weight has another shape), creates the adapters in
float32 (:func:`adapter_dtype`), and calls the base forward as it is.

Merging into a quantized base is refused (:meth:`LoRALayer.check_merge
<lightning_peft.adapters.lora.LoRALayer.check_merge>`): the sum would have to be re-quantized,
which rounds the update and the whole block's other weights anew, so neither the merged model nor an
unmerge is exact. Merge onto a floating-point copy of the base instead (load the base without
quantization, ``load_adapter``, ``merge_adapters``).

Other quantized layers (torchao tensor-subclass weights, HQQ, GPTQ/AWQ-style packed modules, quanto,
EETQ, AQLM, any layer whose weight is not floating point) are refused with a message that names what
is supported. Detection reads class names and modules only: bitsandbytes is never imported here.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SUPPORTED", "adapter_dtype", "bnb_kind", "check_quantization", "quantization_of"]

#: bitsandbytes classes a LoRA layer can wrap (subclasses included), and what they hold
_BNB_LAYERS = {"Linear4bit": "4-bit", "Linear8bitLt": "8-bit"}
#: in words, for messages
SUPPORTED = "bitsandbytes Linear4bit (nf4/fp4) and Linear8bitLt"
#: top-level packages whose modules or weight tensors are quantized layers we have no adapter for
_QUANT_PACKAGES = (
    "torchao",
    "hqq",
    "auto_gptq",
    "gptqmodel",
    "awq",
    "quanto",
    "optimum.quanto",
    "eetq",
    "aqlm",
    "vptq",
    "compressed_tensors",
    "fp_quant",
)
#: attributes that GPTQ/AWQ/HQQ-style modules keep their packed weights in
_PACKED_ATTRS = ("qweight", "W_q", "qzeros")


def _package(cls: type) -> str:
    return cls.__module__.split(".", 1)[0]


def _from_quant_package(cls: type) -> bool:
    return any(cls.__module__ == p or cls.__module__.startswith(p + ".") for p in _QUANT_PACKAGES)


def bnb_kind(module: nn.Module) -> str | None:
    """``"4-bit"`` or ``"8-bit"`` for a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (or a subclass), else None."""
    for cls in type(module).__mro__:
        if cls.__name__ in _BNB_LAYERS and _package(cls) == "bitsandbytes":
            return _BNB_LAYERS[cls.__name__]
    return None


def quantization_of(module: nn.Module) -> str | None:
    """What quantizes ``module``, in words (``"bitsandbytes 4-bit"``, ``"HQQLinear (hqq)"``, ...), or None.

    Example:
        >>> print(quantization_of(nn.Linear(2, 2)))
        None
    """
    kind = bnb_kind(module)
    if kind is not None:
        return f"bitsandbytes {kind}"
    for cls in type(module).__mro__:
        if _from_quant_package(cls):
            return f"{cls.__name__} ({_package(cls)})"
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        if _from_quant_package(type(weight)):
            return f"a weight of type {type(weight).__name__} ({_package(type(weight))})"
        if not (weight.is_floating_point() or weight.is_complex()):
            return f"a weight of dtype {str(weight.dtype).removeprefix('torch.')}"
    for attr in _PACKED_ATTRS:
        if isinstance(getattr(module, attr, None), torch.Tensor):
            return f"{type(module).__name__} with a packed {attr!r}"
    return None


def check_quantization(module: nn.Module, name: str = "") -> str | None:
    """The bitsandbytes kind of a supported quantized layer, None for a floating-point one.

    Raises:
        TypeError: ``module`` is quantized in a way no adapter exists for; the message names what is supported.

    Example:
        >>> print(check_quantization(nn.Linear(2, 2)))
        None
    """
    kind = bnb_kind(module)
    if kind is not None:
        return kind
    what = quantization_of(module)
    if what is None:
        return None
    where = f"{name} ({type(module).__name__})" if name else type(module).__name__
    raise TypeError(
        f"{where} is a quantized layer ({what}) that lightning-peft has no adapter for; quantized bases are supported "
        f"as {SUPPORTED} (load the model with transformers' BitsAndBytesConfig, or unquantized), or leave this layer "
        "out with exclude_modules"
    )


def adapter_dtype(base_layer: nn.Module, autocast_adapter_dtype: bool = True) -> torch.dtype:
    """The dtype a LoRA layer's adapters get around ``base_layer``.

    That is the base's floating-point dtype (for a quantized base, its ``compute_dtype`` when set, else its
    bias dtype, else float32), promoted from float16/bfloat16 to float32 when ``autocast_adapter_dtype``
    (peft's default: adapters train in full precision beside a half-precision base).

    Example:
        >>> adapter_dtype(nn.Linear(2, 2).bfloat16()), adapter_dtype(nn.Linear(2, 2).bfloat16(), False)
        (torch.float32, torch.bfloat16)
    """
    weight = getattr(base_layer, "weight", None)
    dtype: torch.dtype | None = None
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        dtype = weight.dtype
    else:
        compute = getattr(base_layer, "compute_dtype", None)
        bias = getattr(base_layer, "bias", None)
        if isinstance(compute, torch.dtype) and compute.is_floating_point:
            dtype = compute
        elif isinstance(bias, torch.Tensor) and bias.is_floating_point():
            dtype = bias.dtype
    if dtype is None or (autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16)):
        return torch.float32
    return dtype
