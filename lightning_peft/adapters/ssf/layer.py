"""SSF's layer and its placement: :class:`SSFLayer` (``y = scale * base(x) + shift``), injection, merge, removal.

See :mod:`lightning_peft.adapters.ssf` for the method, the formulas and the deviations from the reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lightning_peft.adapters.inject import (
    _check_modules_to_save,
    _set_submodule,
    unwrap_layers,
)
from lightning_peft.adapters.quantized import quantization_of
from lightning_peft.adapters.targeting import is_conv1d, match_targets

SSF_TYPE = "LIGHTNING_PEFT_SSF"
_PREFIX = "base_model.model."
SSFInit = Literal["identity", "normal"]

#: the reference's placement in a timm ViT: after the patch embedding, qkv, proj, fc1, fc2, both norms of every block
#: and the final norm (``norm`` also matches ``patch_embed.norm``; where that is an ``nn.Identity`` it is skipped)
VIT_TARGETS = ("patch_embed.proj", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "norm1", "norm2", "norm")


@dataclass
class SSFConfig:
    """What SSF adapts and how it starts.

    Args:
        target_modules: regex, list of names/suffixes (see :mod:`.targeting`); Linear, Conv2d, Conv1D and LayerNorm
            layers are adapted, other matched types are skipped (a match of none is an error).
        exclude_modules: names never adapted, same forms.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a new ``head``).
        init: ``"identity"`` (scale 1, shift 0) or ``"normal"`` (the reference: scale ``N(1, 0.02)``, shift
            ``N(0, 0.02)``).

    Raises:
        ValueError: an unknown ``init``.
    """

    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    modules_to_save: list[str] = field(default_factory=list)
    init: SSFInit = "identity"

    def __post_init__(self) -> None:
        if self.init not in ("identity", "normal"):
            raise ValueError(f"SSF init must be 'identity' or 'normal', got {self.init!r}")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.modules_to_save = list(self.modules_to_save or [])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the fields."""
        return asdict(self)


def _kind(layer: nn.Module) -> str:
    """``"linear"``, ``"conv1d"``, ``"conv2d"`` or ``"norm"``; raises TypeError for what SSF cannot merge into."""
    what = quantization_of(layer)
    if what is not None:
        raise TypeError(
            f"SSF does not adapt quantized layers ({type(layer).__name__}, {what}): it merges into the weight"
        )
    if isinstance(layer, nn.LayerNorm):
        if layer.weight is None or layer.bias is None:
            raise TypeError(
                "SSF needs a LayerNorm with elementwise_affine=True and a bias, to merge the scale and shift into"
            )
        return "norm"
    if isinstance(layer, nn.Linear | nn.Conv2d) or is_conv1d(layer):
        if getattr(layer, "bias", None) is None:
            raise TypeError(
                f"SSF needs a bias on the {type(layer).__name__} it follows, to merge the shift into (this one has "
                "bias=False); exclude it with exclude_modules"
            )
        return "conv2d" if isinstance(layer, nn.Conv2d) else ("conv1d" if is_conv1d(layer) else "linear")
    raise TypeError(
        f"no SSF layer for {type(layer).__name__}; supported: nn.Linear, nn.Conv2d, transformers Conv1D, nn.LayerNorm"
    )


def _channels(layer: nn.Module, kind: str) -> int:
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    return int(weight.shape[1] if kind == "conv1d" else weight.shape[0])  # Conv1D stores (in, out)


class SSFLayer(nn.Module):
    """``ssf_scale * base(x) + ssf_shift`` over the output channels of a frozen layer.

    Args:
        base_layer: the layer to follow; kept as ``self.base_layer`` and changed only by :meth:`merge`.
        init: see :class:`SSFConfig`.

    Raises:
        TypeError: a layer type SSF has no merge for (see :func:`_kind`), or one without a bias.

    Example:
        >>> layer = SSFLayer(nn.Conv2d(3, 8, 2))
        >>> tuple(layer.ssf_scale.shape), layer.channel_dim
        ((8,), 1)
    """

    def __init__(self, base_layer: nn.Module, init: SSFInit = "identity") -> None:
        super().__init__()
        self.kind = _kind(base_layer)
        self.base_layer = base_layer
        weight = base_layer.weight
        assert isinstance(weight, torch.Tensor)
        n = _channels(base_layer, self.kind)
        self.ssf_scale = nn.Parameter(torch.ones(n, device=weight.device, dtype=weight.dtype))
        self.ssf_shift = nn.Parameter(torch.zeros(n, device=weight.device, dtype=weight.dtype))
        #: the output dimension that holds the channels (counted from the end: -1, or -3 for (B, C, H, W))
        self.channel_dim = 1 if self.kind == "conv2d" else -1
        self.merged = False
        self.disabled = False
        self.reset_parameters(init)

    def __getattr__(self, name: str) -> Any:
        """Attributes of the base layer read through the wrapper (``patch_embed.proj.in_channels``, as timm does)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    @torch.no_grad()
    def reset_parameters(self, init: SSFInit = "identity") -> None:
        """Scale 1 and shift 0 (``"identity"``), or the reference's ``N(1, 0.02)`` and ``N(0, 0.02)`` (``"normal"``)."""
        if init == "normal":
            nn.init.normal_(self.ssf_scale, mean=1.0, std=0.02)
            nn.init.normal_(self.ssf_shift, std=0.02)
        else:
            nn.init.ones_(self.ssf_scale)
            nn.init.zeros_(self.ssf_shift)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.merged or self.disabled:
            return out
        if self.kind == "conv2d":
            return out * self.ssf_scale.view(-1, 1, 1) + self.ssf_shift.view(-1, 1, 1)
        return out * self.ssf_scale + self.ssf_shift

    @torch.no_grad()
    def merge(self) -> None:
        """Fold scale and shift into the base weight and bias (``W' = diag(scale) W``, ``b' = scale*b + shift``)."""
        if self.merged:
            return
        scale, shift = self.ssf_scale, self.ssf_shift
        weight, bias = self.base_layer.weight, self.base_layer.bias
        assert isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)
        shape = (1, -1) if self.kind == "conv1d" else (-1,) + (1,) * (weight.dim() - 1)
        weight.mul_(scale.to(weight.dtype).view(shape))
        bias.mul_(scale.to(bias.dtype)).add_(shift.to(bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Inverse of :meth:`merge` (within rounding; a zero scale cannot be undone and is refused).

        Raises:
            RuntimeError: some scale is exactly zero.
        """
        if not self.merged:
            return
        scale, shift = self.ssf_scale, self.ssf_shift
        if bool((scale == 0).any()):
            raise RuntimeError("an SSF scale is 0: the merge cannot be undone; reload the base weights instead")
        weight, bias = self.base_layer.weight, self.base_layer.bias
        assert isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)
        shape = (1, -1) if self.kind == "conv1d" else (-1,) + (1,) * (weight.dim() - 1)
        bias.sub_(shift.to(bias.dtype)).div_(scale.to(bias.dtype))
        weight.div_(scale.to(weight.dtype).view(shape))
        self.merged = False

    def extra_repr(self) -> str:
        return f"kind={self.kind}, channels={self.ssf_scale.numel()}, merged={self.merged}"


def ssf_layers(model: nn.Module) -> Iterator[tuple[str, SSFLayer]]:
    """``(name, layer)`` of every SSF layer in ``model``, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, SSFLayer):
            yield name, module


def _supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | nn.Conv2d | nn.LayerNorm) or is_conv1d(module)


def _match(model: nn.Module, config: SSFConfig) -> list[str]:
    """Target names (Linear, Conv2d, Conv1D, LayerNorm). LayerNorms are added to what :func:`match_targets` finds."""
    norms = [
        n
        for n, m in model.named_modules()
        if n and isinstance(m, nn.LayerNorm) and _name_matches(n, config.target_modules, config.exclude_modules)
    ]
    try:
        found = match_targets(model, config.target_modules, config.exclude_modules).matched
    except ValueError:
        if not norms or config.target_modules == "all-linear":
            raise
        found = []  # only LayerNorms matched (match_targets knows no norm layers)
    chosen = set(found) | set(norms)
    return [n for n, _ in model.named_modules() if n in chosen]


def _name_matches(name: str, targets: Any, exclude: Any) -> bool:
    from lightning_peft.adapters.targeting import name_matches

    if targets == "all-linear":
        return False
    return name_matches(name, targets) and not name_matches(name, exclude)


def inject_ssf(model: nn.Module, config: SSFConfig, freeze: bool = True) -> list[str]:
    """Wrap every layer matched by ``config.target_modules`` in an :class:`SSFLayer`, in place.

    Every check runs before the model changes: a bad config leaves it untouched.

    Returns:
        The dotted names of the adapted layers.

    Raises:
        TargetNotFoundError: no target matched (the message lists candidates).
        TypeError: a matched layer SSF cannot merge into (no bias, quantized); the message names it.
        ValueError: a ``modules_to_save`` name does not exist, or the model already has SSF layers.
    """
    if any(True for _ in ssf_layers(model)):
        raise ValueError(f"{type(model).__name__} already has SSF layers; call remove_ssf() before injecting again")
    names = _match(model, config)
    _check_modules_to_save(model, config.modules_to_save)
    modules = dict(model.named_modules())
    layers = {}
    for name in names:
        try:
            layers[name] = SSFLayer(modules[name], config.init)
        except TypeError as err:
            raise TypeError(f"{name}: {err}") from None
    for name, layer in layers.items():
        _set_submodule(model, name, layer)
    if freeze:
        mark_ssf_trainable(model, config.modules_to_save)
    return names


def mark_ssf_trainable(model: nn.Module, modules_to_save: list[str] | tuple[str, ...] = ()) -> None:
    """Freeze every parameter of ``model`` except the SSF parameters and those of ``modules_to_save``."""
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        param.requires_grad_(leaf.startswith("ssf_") or any(name.startswith(m + ".") for m in modules_to_save))


def remove_ssf(model: nn.Module, merge: bool = False) -> list[str]:
    """Replace every SSF layer by its base layer, merging scale and shift into it first when ``merge``."""
    return unwrap_layers(model, ssf_layers(model), merge)


def merge_ssf(model: nn.Module) -> None:
    """Fold every SSF layer into its base layer (the layers stay, inactive until :meth:`SSFLayer.unmerge`)."""
    for _, layer in ssf_layers(model):
        layer.merge()
