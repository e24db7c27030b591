"""LoRA layers: a frozen base layer plus a trainable low-rank update ``B @ A * scaling``.

One wrapper class serves ``nn.Linear``, ``nn.Conv2d`` and transformers' ``Conv1D`` (GPT-2): the
layer kind only decides how the low-rank path is applied and how ``B @ A`` is shaped into a weight
delta. The forward is the hot path of every training step, so it is one extra
``(dropout(x) @ A.T * scaling) @ B.T`` path (the scaling is applied on the rank-``r`` intermediate,
the smallest tensor) and a single flag check; there is no per-step bookkeeping.

Parameters are named ``lora_A`` (``r x in``; ``r x in x kh x kw`` for a conv) and ``lora_B``
(``out x r``; ``out x r x 1 x 1`` for a conv): the shapes of peft's ``lora_A.weight`` /
``lora_B.weight``, so conversion to peft's format is a renaming only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

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

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("kaiming", "gaussian", "nonzero"):
            raise ValueError(f"init must be 'kaiming', 'gaussian' or 'nonzero', got {self.init!r}")
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
        return LoRALayer(base_layer, r=self.r, scaling=self.scaling, dropout=self.dropout, init=self.init)


class LoRALayer(nn.Module):
    """``base(x) + B(A(dropout(x))) * scaling`` around a frozen ``nn.Linear``, ``nn.Conv2d`` or ``Conv1D``.

    Args:
        base_layer: the layer to adapt; kept as ``self.base_layer`` and never modified except by :meth:`merge`.
        r: rank.
        scaling: factor on the low-rank path.
        dropout: dropout probability on the adapter input.
        init: see :class:`LoRAConfig`.

    Raises:
        TypeError: the layer type has no LoRA form (only Linear, Conv2d with ``groups=1``, Conv1D).

    Example:
        >>> layer = LoRALayer(nn.Linear(4, 3), r=2, scaling=1.0)
        >>> tuple(layer.lora_A.shape), tuple(layer.lora_B.shape)
        ((2, 4), (3, 2))
    """

    def __init__(
        self, base_layer: nn.Module, r: int, scaling: float, dropout: float = 0.0, init: InitKind = "kaiming"
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.scaling = scaling
        self.kind = _kind(base_layer)
        weight = self._base_weight()
        shape = tuple(weight.shape)
        a_shape: tuple[int, ...]
        b_shape: tuple[int, ...]
        if self.kind == "linear":
            a_shape, b_shape = (r, shape[1]), (shape[0], r)
        elif self.kind == "conv1d":  # transformers Conv1D stores (in, out)
            a_shape, b_shape = (r, shape[0]), (shape[1], r)
        else:
            a_shape, b_shape = (r, *shape[1:]), (shape[0], r, 1, 1)
        # stride, padding, dilation of the base conv, read once (not on every forward)
        self._conv: tuple[Any, Any, Any] | None = None
        if isinstance(base_layer, nn.Conv2d):
            self._conv = (base_layer.stride, base_layer.padding, base_layer.dilation)
        self._make_parameters(a_shape, b_shape, weight)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        self.reset_parameters(init)

    def _make_parameters(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], weight: torch.Tensor) -> None:
        self.lora_A = nn.Parameter(torch.empty(a_shape, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.empty(b_shape, device=weight.device, dtype=weight.dtype))

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
        x = self.lora_dropout(x)
        if self._conv is not None:
            h = F.conv2d(x, self.lora_A, None, *self._conv)
            return out + F.conv2d(h * self.scaling, self.lora_B)
        return out + F.linear(F.linear(x, self.lora_A) * self.scaling, self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """``B @ A * scaling`` shaped like the base weight (computed in float32, returned in the weight's dtype)."""
        a, b = self.lora_A.float(), self.lora_B.float()
        delta = (b.flatten(1) @ a.flatten(1)) * self.scaling
        if self.kind == "conv1d":
            delta = delta.T
        weight = self._base_weight()
        return delta.reshape(weight.shape).to(weight.dtype)

    def _base_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        assert isinstance(weight, torch.Tensor)
        return weight

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight; the forward then costs only the base layer. Idempotent."""
        if not self.merged:
            self._base_weight().add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Exact inverse of :meth:`merge` (within floating-point rounding of the weight's dtype). Idempotent."""
        if self.merged:
            self._base_weight().sub_(self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        return f"kind={self.kind}, r={self.r}, scaling={self.scaling:g}, merged={self.merged}, disabled={self.disabled}"


def _kind(layer: nn.Module) -> str:
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
    raise TypeError(f"no LoRA layer for {type(layer).__name__}; supported: nn.Linear, nn.Conv2d, transformers Conv1D")
