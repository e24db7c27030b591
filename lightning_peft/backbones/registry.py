"""The one table of backbone presets, how a family module adds to it, and the lookups that read it.

A family module (``vit.py``, ``llm.py``, ...) calls :func:`register` once per family, saying which
classes (timm, diffusers) or ``model_type`` values (transformers) belong to it. Detection never
imports those libraries: it reads class names, their ``__module__`` and ``model.config.model_type``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch import nn

from lightning_peft.backbones.blocks import Blocks, generic_blocks, resolve_blocks, try_blocks

__all__ = [
    "PRESETS",
    "Preset",
    "default_target_modules",
    "detect_preset",
    "find_backbone",
    "find_blocks",
    "register",
]


@dataclass(frozen=True)
class Preset:
    """Defaults for one backbone family.

    Args:
        family: Family name, e.g. ``"timm-vit"`` or ``"hf-llama"``.
        target_modules: Default LoRA targets with peft list semantics: each entry matches a module
            name exactly or as a ``".suffix"``.
        block_paths: Candidate dotted paths (relative to the model) of the ``nn.ModuleList`` of
            repeated blocks, tried in order; ``"a+b"`` concatenates several.
        always_on: Dotted names of modules or parameters that LISA keeps trainable. Not every name
            exists in every variant of the family; filter them with :func:`resolve_always_on`.
        head: The task head module name(s), if any; also filter them with :func:`resolve_always_on`.
        groups: The parameter groups inside a block that HFT halves, ``(category, entries)`` pairs (attention,
            feed-forward, norms); entries match module names relative to the block with peft list semantics.
            Entries a variant of the family lacks match nothing.
    """

    family: str
    target_modules: tuple[str, ...]
    block_paths: tuple[str, ...]
    always_on: tuple[str, ...]
    head: tuple[str, ...] = ()
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()


_PRESETS: dict[str, tuple[Preset, ...]] = {}

PRESETS: Mapping[str, tuple[Preset, ...]] = MappingProxyType(_PRESETS)
"""Every known family and its layouts (several when module names changed between releases)."""

_CLASS_FAMILIES: dict[str, dict[str, str]] = {}  # library -> class name -> family, libraries in registration order
_MODEL_TYPE_FAMILIES: dict[str, str] = {}  # transformers ``config.model_type`` -> family


def register(
    *layouts: Preset, library: str | None = None, classes: Iterable[str] = (), model_types: Iterable[str] = ()
) -> None:
    """Add a family to :data:`PRESETS` and say which models belong to it.

    Args:
        layouts: The family's presets, the usual layout first (one per set of module names, when a
            library renamed its modules between releases); all of one ``family``.
        library: The top-level package that defines ``classes`` (``"timm"``, ``"diffusers"``).
        classes: Class names of ``library`` whose instances (and subclasses') are of this family.
        model_types: ``model.config.model_type`` values of ``transformers`` models of this family.

    Raises:
        ValueError: no layout, layouts of several families, a family already registered, or
            ``classes`` without ``library``.
    """
    families = {preset.family for preset in layouts}
    if len(families) != 1:
        raise ValueError(f"register() takes the layouts of one family, got {sorted(families) or 'none'}")
    (family,) = families
    if family in _PRESETS:
        raise ValueError(f"backbone family {family!r} is registered already")
    classes = tuple(classes)
    if classes and library is None:
        raise ValueError(f"register({family!r}): classes={classes!r} need the library that defines them")
    _PRESETS[family] = layouts
    if library is not None:
        _CLASS_FAMILIES.setdefault(library, {}).update(dict.fromkeys(classes, family))
    _MODEL_TYPE_FAMILIES.update(dict.fromkeys(model_types, family))


def _class_family(model: nn.Module, library: str, families: Mapping[str, str]) -> str | None:
    """Family of the first class in ``type(model).__mro__`` named in ``families`` and defined in ``library``."""
    for cls in type(model).__mro__:
        family = families.get(cls.__name__)
        if family is not None and cls.__module__.split(".")[0] == library:
            return family
    return None


def _is_hf_pretrained(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel``, without importing transformers."""
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.split(".")[0] == "transformers"
        for cls in type(model).__mro__
    )


def _family(model: nn.Module) -> str | None:
    for library, families in _CLASS_FAMILIES.items():
        family = _class_family(model, library, families)
        if family is not None:
            return family
    if _is_hf_pretrained(model):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return _MODEL_TYPE_FAMILIES.get(model_type) if isinstance(model_type, str) else None
    return None


def detect_preset(model: nn.Module) -> Preset | None:
    """Return the preset of the family ``model`` (the root itself) belongs to.

    timm and diffusers models are recognised by class (``VisionTransformer`` and its subclasses,
    ``UNet2DConditionModel``, ``DiTTransformer2DModel``, ``Transformer2DModel``,
    ``PixArtTransformer2DModel``), transformers models by ``model.config.model_type``, whatever
    their head class. Nothing is imported. When a family has several layouts, the first whose block
    path exists in ``model`` is returned (the first layout if none does).

    Args:
        model: The model root, not a wrapper around it (see :func:`find_backbone`).

    Returns:
        The preset, or ``None`` if the family is unknown.
    """
    family = _family(model)
    if family is None:
        return None
    layouts = _PRESETS[family]
    for preset in layouts:
        if any(try_blocks(model, path) is not None for path in preset.block_paths):
            return preset
    return layouts[0]


def find_backbone(module: nn.Module) -> tuple[str, Preset] | None:
    """Find the first submodule of ``module`` (``module`` itself included) that a preset knows.

    Args:
        module: Any module, typically a ``LightningModule`` that holds the backbone as an attribute.

    Returns:
        ``(dotted name, preset)``, the name being ``""`` for ``module`` itself, or ``None``.
    """
    for name, sub in module.named_modules():
        preset = detect_preset(sub)
        if preset is not None:
            return name, preset
    return None


def default_target_modules(model: nn.Module) -> tuple[str, ...] | None:
    """Return the preset's default ``target_modules`` for the model root, or ``None`` if unknown.

    Args:
        model: The model root.

    Returns:
        The target entries (peft list semantics), or ``None``.
    """
    preset = detect_preset(model)
    return None if preset is None else preset.target_modules


def find_blocks(model: nn.Module, path: str | None = None) -> Blocks:
    """Find the repeated blocks of ``model``.

    With ``path``, that dotted path must name an ``nn.ModuleList`` or ``nn.Sequential`` (several
    paths may be joined with ``"+"``; in a joined path a plain module counts as one block and a
    ``None`` attribute is skipped). Without it, the detected preset's ``block_paths`` are tried in
    order; for an unknown model (or when no candidate exists) the largest ``nn.ModuleList`` of at
    least two children of one type that hold parameters is taken, ties broken by parameter count
    (an ``nn.Sequential`` only if no ``nn.ModuleList`` qualifies).

    Args:
        model: The model root.
        path: Dotted path of the block list, relative to ``model``, e.g. ``"model.layers"``.

    Returns:
        The blocks with their full dotted names.

    Raises:
        ValueError: ``path`` does not exist or is not a ``ModuleList``/``Sequential``; the message
            says what was found and lists the ModuleLists of the model.
        NoBlocksError: ``path`` is ``None`` and no block list could be found.

    Example:
        >>> from torch import nn
        >>> find_blocks(nn.Sequential(nn.Linear(2, 2), nn.ModuleList(nn.Linear(2, 2) for _ in range(2))), "1").names
        ('1.0', '1.1')
    """
    if path is not None:
        return resolve_blocks(model, path)
    preset = detect_preset(model)
    for candidate in preset.block_paths if preset is not None else ():
        blocks = try_blocks(model, candidate)
        if blocks is not None:
            return blocks
    return generic_blocks(model)
