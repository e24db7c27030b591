"""Put adapters into any ``nn.Module``, take them out, merge them, and freeze the rest.

Injection replaces each matched layer ``parent.<name>`` by a :class:`LoRALayer` that holds the
original as ``base_layer`` (so a base weight ``blocks.0.attn.qkv.weight`` becomes
``blocks.0.attn.qkv.base_layer.weight``, as in peft). :func:`remove_adapters` restores the exact
original module objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lightning_peft.adapters.lora import LoRAConfig, LoRALayer
from lightning_peft.adapters.targeting import match_targets

__all__ = [
    "adapter_layers",
    "count_parameters",
    "disable_adapters",
    "inject_adapters",
    "mark_trainable",
    "merge_adapters",
    "remove_adapters",
    "set_adapters_enabled",
    "unmerge_adapters",
]


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """``(name, layer)`` of every LoRA layer in ``model``, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _check_modules_to_save(model: nn.Module, names: list[str]) -> None:
    existing = dict(model.named_modules())
    missing = [n for n in names if n not in existing]
    if missing:
        tops = ", ".join(n for n, _ in model.named_children())
        raise ValueError(
            f"modules_to_save {missing} not found in {type(model).__name__}; top-level modules are: {tops}"
        )


def modules_to_save_tensors(
    model: nn.Module, modules_to_save: list[str] | tuple[str, ...], prefix: str, adapter_prefix: str
) -> dict[str, torch.Tensor]:
    """The full parameters of ``modules_to_save`` (detached), named ``<prefix><module>.<param>``.

    A wrapped layer's base weights (``base_layer.``) and its adapter tensors (named with ``adapter_prefix``, e.g.
    ``lora_``) are the adapter's own and left out. Shared by the LoRA/AdaLoRA and SSF savers.
    """
    out: dict[str, torch.Tensor] = {}
    for module_name in modules_to_save:
        for pname, param in model.get_submodule(module_name).named_parameters():
            if ".base_layer." in f".{pname}" or f".{adapter_prefix}" in f".{pname}":
                continue
            out[f"{prefix}{module_name}.{pname}"] = param.detach()
    return out


def inject_adapters(model: nn.Module, config: LoRAConfig, freeze: bool = True) -> list[str]:
    """Wrap every layer matched by ``config.target_modules`` in a :class:`LoRALayer`, in place.

    All checks (targets, types, ``modules_to_save``) run before the model is changed, so a bad
    config leaves the model untouched.

    Args:
        model: the root module; target names are relative to it.
        config: the LoRA hyper-parameters and targets.
        freeze: also call :func:`mark_trainable` (base frozen; adapters and ``modules_to_save`` trainable).

    Returns:
        The dotted names of the adapted layers.

    Raises:
        TargetNotFoundError: no target matched (the message lists candidates).
        ValueError: a ``modules_to_save`` name does not exist, or the model already has LoRA layers.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> inject_adapters(net, LoRAConfig(r=2, target_modules=["0"]))
        ['0']
    """
    if any(True for _ in adapter_layers(model)):
        raise ValueError(
            f"{type(model).__name__} already has LoRA layers; call remove_adapters() before injecting again"
        )
    match = match_targets(model, config.target_modules, config.exclude_modules)
    _check_modules_to_save(model, config.modules_to_save)
    modules = dict(model.named_modules())
    # Build every layer first: a TypeError (unsupported layer) leaves the model unchanged.
    layers = {name: config.make_layer(modules[name]) for name in match.matched}
    for name, layer in layers.items():
        _set_submodule(model, name, layer)
    if freeze:
        mark_trainable(model, config.modules_to_save)
    return match.matched


def mark_trainable(model: nn.Module, modules_to_save: list[str] | tuple[str, ...] = ()) -> None:
    """Freeze every parameter of ``model`` except LoRA parameters and those of ``modules_to_save``."""
    for name, param in model.named_parameters():
        param.requires_grad_(_is_trainable_name(name, modules_to_save))


def _is_trainable_name(name: str, modules_to_save: list[str] | tuple[str, ...]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf.startswith("lora_") or any(name.startswith(m + ".") for m in modules_to_save)


def remove_adapters(model: nn.Module, merge: bool = False) -> list[str]:
    """Replace every LoRA layer by its base layer, optionally merging the update in first.

    Args:
        model: the root module.
        merge: fold ``B @ A * scaling`` into the base weight before unwrapping (for inference without
            the adapter's cost); otherwise the base layer is restored as it was.

    Returns:
        The names of the layers that were unwrapped.

    Raises:
        RuntimeError: ``merge=True`` and a base layer is quantized (nothing is changed; see
            :meth:`LoRALayer.check_merge`).
    """
    if merge:
        _check_merge(model)
    return unwrap_layers(model, adapter_layers(model), merge)


def unwrap_layers(model: nn.Module, layers: Iterable[tuple[str, nn.Module]], merge: bool) -> list[str]:
    """Put each wrapping layer's ``base_layer`` back in its place, merged into it first (``merge``) or not; the names.

    Shared by LoRA's :func:`remove_adapters` and SSF's ``remove_ssf``: any layer with ``merge``/``unmerge`` and a
    ``base_layer``.
    """
    names = []
    for name, layer in list(layers):
        if merge:
            layer.merge()  # type: ignore[operator]
        else:
            layer.unmerge()  # type: ignore[operator]
        _set_submodule(model, name, layer.base_layer)  # type: ignore[arg-type]
        names.append(name)
    return names


def merge_adapters(model: nn.Module) -> None:
    """Merge every LoRA layer's update into its base weight (the adapters stay, inactive until unmerged).

    Raises:
        RuntimeError: a base layer is quantized (bitsandbytes 4-bit/8-bit); nothing is merged then. Merge onto
            a floating-point copy of the base instead (see :meth:`LoRALayer.check_merge`).
    """
    _check_merge(model)
    for _, layer in adapter_layers(model):
        layer.merge()


def _check_merge(model: nn.Module) -> None:
    """Refuse before any layer merges, so a model with one quantized layer is not left half merged."""
    for name, layer in adapter_layers(model):
        if not layer.merged:
            try:
                layer.check_merge()
            except RuntimeError as err:
                raise RuntimeError(f"{name}: {err}") from None


def unmerge_adapters(model: nn.Module) -> None:
    """Undo :func:`merge_adapters`."""
    for _, layer in adapter_layers(model):
        layer.unmerge()


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch the low-rank path of every LoRA layer on or off (a merged layer must be unmerged to disable it)."""
    for name, layer in adapter_layers(model):
        if layer.merged and not enabled:
            raise RuntimeError(f"{name} is merged; unmerge_adapters() before disabling adapters")
        layer.disabled = not enabled


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model without adapters inside a ``with`` block."""
    previous = {name: layer.disabled for name, layer in adapter_layers(model)}
    set_adapters_enabled(model, False)
    try:
        yield
    finally:
        for name, layer in adapter_layers(model):
            layer.disabled = previous.get(name, False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared parameters counted once)."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total
