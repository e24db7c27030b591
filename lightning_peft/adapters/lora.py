"""LoRA layers: a frozen base layer plus a trainable low-rank update ``B @ A * scaling``.

One wrapper class serves ``nn.Linear``, ``nn.Conv2d`` and transformers' ``Conv1D`` (GPT-2): the
layer kind only decides how the low-rank path is applied and how ``B @ A`` is shaped into a weight
delta. The forward is the hot path of every training step, so it is one extra
``(dropout(x) @ A.T * scaling) @ B.T`` path (the scaling is applied on the rank-``r`` intermediate,
the smallest tensor) and a single flag check; there is no per-step bookkeeping.

Parameters are named ``lora_A`` (``r x in``; ``r x in x kh x kw`` for a conv) and ``lora_B``
(``out x r``; ``out x r x 1 x 1`` for a conv): the shapes of peft's ``lora_A.weight`` /
``lora_B.weight``, so conversion to peft's format is a renaming only.

Adapter dtype (peft's ``autocast_adapter_dtype``): beside a float16/bfloat16 base the adapters are
float32, and stay float32 when the model is cast later (``model.bfloat16()``, Lightning's
``precision="bf16-true"``); the forward casts the adapter's input to the adapter dtype and its output
back to the base output's dtype, which costs nothing when the dtypes agree. Quantized bases
(bitsandbytes 4-bit and 8-bit Linear) are described in :mod:`.quantized`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.adapters.quantized import SUPPORTED, adapter_dtype, bnb_kind, check_quantization, quantization_of
from lightning_peft.adapters.targeting import is_conv1d

__all__ = ["LoRAConfig", "LoRALayer", "InitKind"]

InitKind = Literal["kaiming", "gaussian", "nonzero"]


@dataclass
class LoRAConfig:
    """Hyper-parameters of LoRA adapters.

    Args:
        r: rank of the update (> 0).
        alpha: scaling numerator; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout on the adapter's input, in ``[0, 1)``.
        target_modules: regex, list of names/suffixes, or ``"all-linear"`` (see :mod:`.targeting`).
        exclude_modules: names never adapted, same forms.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a new ``head``).
        init: ``"kaiming"`` (peft's default: A Kaiming-uniform, B zero, so the model is unchanged at
            start), ``"gaussian"`` (A ~ N(0, 1/r), B zero), or ``"nonzero"`` (B random too, so the
            adapter changes the output from the start; for tests of save/load/merge).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        autocast_adapter_dtype: create the adapters in float32 beside a float16/bfloat16 (or quantized) base and
            keep them float32 when the model is cast to half precision later (peft's default); False: the base's
            dtype (a quantized base's compute dtype).

    Raises:
        ValueError: a value out of range; the message says which and what is allowed.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    modules_to_save: list[str] = field(default_factory=list)
    init: InitKind = "kaiming"
    use_rslora: bool = False
    autocast_adapter_dtype: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("kaiming", "gaussian", "nonzero"):
            raise ValueError(f"init must be 'kaiming', 'gaussian' or 'nonzero', got {self.init!r}")
        if not isinstance(self.autocast_adapter_dtype, bool):
            raise ValueError(f"autocast_adapter_dtype must be True or False, got {self.autocast_adapter_dtype!r}")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.modules_to_save = list(self.modules_to_save or [])

    @property
    def scaling(self) -> float:
        """The factor applied to ``B @ A``."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict:
        """Plain JSON-able dict of the fields."""
        return asdict(self)

    def make_layer(self, base_layer: nn.Module) -> LoRALayer:
        """The adapter layer this config puts around ``base_layer`` (a subclass config may return another kind)."""
        return self._layer_type()(
            base_layer,
            r=self.r,
            scaling=self.scaling,
            dropout=self.dropout,
            init=self.init,
            autocast_adapter_dtype=self.autocast_adapter_dtype,
        )

    def _layer_type(self) -> type[LoRALayer]:
        return LoRALayer


class LoRALayer(nn.Module):
    """``base(x) + B(A(dropout(x))) * scaling`` around a frozen ``nn.Linear``, ``nn.Conv2d`` or ``Conv1D``.

    The base may be a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (see :mod:`.quantized`): the adapters
    then take their shapes from its ``in_features`` / ``out_features`` and the base forward runs as it is.

    Args:
        base_layer: the layer to adapt; kept as ``self.base_layer`` and never modified except by :meth:`merge`.
        r: rank.
        scaling: factor on the low-rank path.
        dropout: dropout probability on the adapter input.
        init: see :class:`LoRAConfig`.
        autocast_adapter_dtype: see :class:`LoRAConfig`; also makes casts of the module to float16/bfloat16
            (``.to(dtype)``, ``.half()``, ``.bfloat16()``) leave the adapters float32, the same Parameter objects.

    Raises:
        TypeError: the layer type has no LoRA form (only Linear, Conv2d with ``groups=1``, Conv1D, and the
            bitsandbytes 4-bit and 8-bit Linear; other quantized layers are refused by name).

    Example:
        >>> layer = LoRALayer(nn.Linear(4, 3), r=2, scaling=1.0)
        >>> tuple(layer.lora_A.shape), tuple(layer.lora_B.shape)
        ((2, 4), (3, 2))
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        scaling: float,
        dropout: float = 0.0,
        init: InitKind = "kaiming",
        autocast_adapter_dtype: bool = True,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.scaling = scaling
        self.kind = _kind(base_layer)
        self.quantized = bnb_kind(base_layer)  # "4-bit" / "8-bit" (bitsandbytes) or None
        self.autocast_adapter_dtype = autocast_adapter_dtype
        weight = self._base_weight()
        a_shape: tuple[int, ...]
        b_shape: tuple[int, ...]
        if self.kind == "linear":  # from the features: a quantized base packs its weight into another shape
            shape: tuple[int, ...] = (int(base_layer.out_features), int(base_layer.in_features))  # type: ignore[arg-type]
            a_shape, b_shape = (r, shape[1]), (shape[0], r)
        elif self.kind == "conv1d":  # transformers Conv1D stores (in, out)
            shape = tuple(weight.shape)
            a_shape, b_shape = (r, shape[0]), (shape[1], r)
        else:
            shape = tuple(weight.shape)
            a_shape, b_shape = (r, *shape[1:]), (shape[0], r, 1, 1)
        self.weight_shape = shape  # the base weight's logical shape, that of delta_weight()
        # stride, padding, dilation of the base conv, read once (not on every forward)
        self._conv: tuple[Any, Any, Any] | None = None
        if isinstance(base_layer, nn.Conv2d):
            self._conv = (base_layer.stride, base_layer.padding, base_layer.dilation)
        self._make_parameters(a_shape, b_shape, weight.device, adapter_dtype(base_layer, autocast_adapter_dtype))
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        self.reset_parameters(init)

    def _make_parameters(
        self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
    ) -> None:
        self.lora_A = nn.Parameter(torch.empty(a_shape, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(b_shape, device=device, dtype=dtype))

    @torch.no_grad()
    def reset_parameters(self, init: InitKind = "kaiming") -> None:
        """(Re-)initialise A and B; with ``"kaiming"``/``"gaussian"`` the layer starts as the identity update."""
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init == "nonzero":
            nn.init.normal_(self.lora_B, std=0.1)
        else:
            nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.merged or self.disabled:
            return out
        a = self.lora_A
        if x.dtype is not a.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.dtype)  # e.g. bf16 activations into float32 adapters (autocast casts by itself)
        x = self.lora_dropout(x)
        if self._conv is not None:
            delta = F.conv2d(F.conv2d(x, a, None, *self._conv) * self.scaling, self.lora_B)
        else:
            delta = F.linear(F.linear(x, a) * self.scaling, self.lora_B)
        return out + (delta if delta.dtype is out.dtype else delta.to(out.dtype))  # `is`: dtypes are singletons

    def _apply(self, fn: Any, recurse: bool = True) -> LoRALayer:
        """Module casts go through here: with ``autocast_adapter_dtype`` a cast to float16/bfloat16 leaves the
        adapters (and their gradients) float32, moved to the new device only; the base layer is cast as asked."""
        if not self.autocast_adapter_dtype:
            return super()._apply(fn, recurse)
        mine = {id(t) for p in self._parameters.values() if p is not None for t in (p, p.grad) if t is not None}

        def keep_float32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if id(t) in mine and out.dtype in (torch.float16, torch.bfloat16) and t.is_floating_point():
                return t.detach().to(device=out.device, dtype=torch.float32)
            return out

        return super()._apply(keep_float32, recurse)

    def delta_weight(self) -> torch.Tensor:
        """``B @ A * scaling`` shaped like the base weight (computed in float32, returned in the weight's dtype).

        For a quantized base (whose weight is not floating point) it is returned in the adapters' dtype.
        """
        a, b = self.lora_A.float(), self.lora_B.float()
        delta = (b.flatten(1) @ a.flatten(1)) * self.scaling
        if self.kind == "conv1d":
            delta = delta.T
        return delta.reshape(self.weight_shape).to(self._delta_dtype())

    def _delta_dtype(self) -> torch.dtype:
        weight = self._base_weight()
        return weight.dtype if weight.is_floating_point() else self.lora_A.dtype

    def _base_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        assert isinstance(weight, torch.Tensor)
        return weight

    def check_merge(self) -> None:
        """Raise unless the update can be added into the base weight (it cannot into a quantized one).

        Raises:
            RuntimeError: the base weight is quantized; the message says how to merge onto a float copy instead.
        """
        if self._base_weight().is_floating_point():
            return
        what = quantization_of(self.base_layer) or f"a weight of dtype {self._base_weight().dtype}"
        raise RuntimeError(
            f"cannot merge LoRA into a quantized base layer ({type(self.base_layer).__name__}, {what}): the sum "
            "would have to be re-quantized, which rounds the update and the layer's other weights anew (lossy, "
            "and unmerge could not restore the base). Merge onto a floating-point copy of the base instead: load "
            "the base model unquantized (e.g. torch_dtype=torch.bfloat16, no quantization_config), "
            "load_adapter(model, folder), then merge_adapters(model); or keep the adapter unmerged"
        )

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight; the forward then costs only the base layer. Idempotent.

        Raises:
            RuntimeError: the base is quantized (see :meth:`check_merge`).
        """
        if not self.merged:
            self.check_merge()
            self._base_weight().add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Exact inverse of :meth:`merge` (within floating-point rounding of the weight's dtype). Idempotent."""
        if self.merged:
            self._base_weight().sub_(self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        quantized = f", base={self.quantized}" if self.quantized else ""
        return (
            f"kind={self.kind}, r={self.r}, scaling={self.scaling:g}, merged={self.merged}, "
            f"disabled={self.disabled}{quantized}"
        )


def _kind(layer: nn.Module) -> str:
    check_quantization(layer)  # a quantized layer we have no adapter for is refused by name, not by its shape
    if isinstance(layer, nn.Linear):
        return "linear"
    if is_conv1d(layer):
        return "conv1d"
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise TypeError(f"LoRA for a grouped Conv2d (groups={layer.groups}) is not supported; exclude this layer")
        if layer.padding_mode != "zeros":
            raise TypeError(f"LoRA for a Conv2d with padding_mode={layer.padding_mode!r} is not supported; exclude it")
        return "conv2d"
    raise TypeError(
        f"no LoRA layer for {type(layer).__name__}; supported: nn.Linear, nn.Conv2d, transformers Conv1D, {SUPPORTED}"
    )
