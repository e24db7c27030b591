"""What a model holds, found without knowing its family: its repeated blocks and which names it has.

:func:`lightning_peft.backbones.find_blocks` tries a preset's paths with :func:`try_blocks` and falls
back to :func:`generic_blocks` (the largest list of same-type blocks); :func:`resolve_always_on`
keeps the preset names a model has.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from torch import nn

__all__ = [
    "Blocks",
    "NoBlocksError",
    "generic_blocks",
    "outside_params",
    "resolve_always_on",
    "resolve_blocks",
    "try_blocks",
]


@dataclass(frozen=True)
class Blocks:
    """The repeated blocks of a model, in forward order.

    Args:
        path: The dotted path of the block list; several joined by ``"+"`` when they were
            concatenated, e.g. ``"down_blocks+mid_block+up_blocks"``.
        names: Full dotted name of each block relative to the model, e.g. ``("blocks.0", ...)``.
        modules: The block modules, aligned with ``names``.
    """

    path: str
    names: tuple[str, ...]
    modules: tuple[nn.Module, ...]

    def __len__(self) -> int:
        """Number of blocks."""
        return len(self.modules)


class NoBlocksError(ValueError):
    """Raised when the repeated blocks of a model cannot be found without help."""


def resolve_always_on(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Keep the names that exist in ``model`` as a module or a parameter.

    Args:
        model: The model the names are relative to.
        names: Dotted module or parameter names, e.g. a preset's ``always_on`` or ``head``.

    Returns:
        The existing names, in the given order, without duplicates.
    """
    existing = {name for name, _ in model.named_modules()}
    existing.update(name for name, _ in model.named_parameters(remove_duplicate=False))
    kept: list[str] = []
    for name in names:
        if name in existing and name not in kept:
            kept.append(name)
    return kept


_LISTS = (nn.ModuleList, nn.Sequential)


def _get(model: nn.Module, path: str) -> tuple[object, str | None]:
    """Follow ``path`` attribute by attribute; return ``(object, None)`` or ``(None, what went wrong)``."""
    obj: object = model
    walked: list[str] = []
    for part in path.split("."):
        if not isinstance(obj, nn.Module):
            return None, f"'{'.'.join(walked)}' is {type(obj).__name__}, not a module"
        if part not in obj._modules and not hasattr(obj, part):
            where = f"'{'.'.join(walked)}' ({type(obj).__name__})" if walked else f"the model ({type(obj).__name__})"
            return None, f"{where} has no attribute '{part}'"
        obj = obj._modules[part] if part in obj._modules else getattr(obj, part)
        walked.append(part)
    return obj, None


def resolve_blocks(model: nn.Module, path: str) -> Blocks:
    """Resolve an explicit (possibly ``"+"``-joined) block path; raise ``ValueError`` if it does not fit."""
    pieces = [piece.strip() for piece in path.split("+")]
    if not all(pieces):
        raise ValueError(f"block_path={path!r} has an empty piece. {_lists_hint(model)}")
    names: list[str] = []
    modules: list[nn.Module] = []
    for piece in pieces:
        obj, error = _get(model, piece)
        if error is not None:
            raise ValueError(f"block_path={path!r} does not exist: {error}. {_lists_hint(model)}")
        if isinstance(obj, _LISTS):
            names.extend(f"{piece}.{key}" for key in obj._modules)
            modules.extend(obj._modules.values())  # type: ignore[arg-type]
        elif obj is None and len(pieces) > 1:
            continue  # e.g. a UNet built with mid_block_type=None
        elif isinstance(obj, nn.Module) and len(pieces) > 1:
            names.append(piece)
            modules.append(obj)
        else:
            found = "None" if obj is None else type(obj).__name__
            raise ValueError(
                f"block_path={path!r} must name an nn.ModuleList or nn.Sequential of blocks, "
                f"but {piece!r} is a {found}. {_lists_hint(model)}"
            )
    if not modules:
        raise ValueError(f"block_path={path!r} holds no blocks. {_lists_hint(model)}")
    return Blocks(path="+".join(pieces), names=tuple(names), modules=tuple(modules))


def try_blocks(model: nn.Module, path: str) -> Blocks | None:
    """Resolve a preset candidate path; ``None`` if any of its pieces is missing."""
    try:
        return resolve_blocks(model, path)
    except ValueError:
        return None


def _child_types(container: nn.Module) -> str:
    types = list(dict.fromkeys(type(child).__name__ for child in container.children()))
    if not types:
        return "empty"
    return types[0] if len(types) == 1 else "mixed: " + ", ".join(types)


def _module_lists(model: nn.Module) -> Iterator[tuple[str, nn.ModuleList]]:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            yield name, module


def _lists_hint(model: nn.Module) -> str:
    seen = [f"{name or '<root>'} (len {len(lst)}, {_child_types(lst)})" for name, lst in _module_lists(model)]
    return "ModuleLists in the model: " + ("; ".join(seen) if seen else "none") + "."


def generic_blocks(model: nn.Module) -> Blocks:
    """The largest container of >= 2 same-type children that hold parameters; ModuleLists first.

    Raises:
        NoBlocksError: no container qualifies; the message lists the ModuleLists of the model.
    """
    best: tuple[tuple[int, int, int], str, nn.Module] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, _LISTS) or not name:
            continue
        children = list(module.children())
        if len(children) < 2 or len({type(child) for child in children}) != 1:
            continue
        n_params = sum(p.numel() for p in module.parameters())
        if n_params == 0:
            continue
        key = (int(isinstance(module, nn.ModuleList)), len(children), n_params)
        if best is None or key > best[0]:
            best = (key, name, module)
    if best is None:
        raise NoBlocksError(
            f"Could not find the repeated blocks of {type(model).__name__}: no nn.ModuleList (or nn.Sequential) "
            f"with at least 2 children of one type that hold parameters. {_lists_hint(model)} "
            'Pass block_path="dotted.path.to.ModuleList" to name the list of blocks.'
        )
    _, name, module = best
    return Blocks(
        path=name,
        names=tuple(f"{name}.{key}" for key in module._modules),
        modules=tuple(module._modules.values()),  # type: ignore[arg-type]
    )


def outside_params(root: nn.Module, inside: set[int]) -> list[str]:
    """The fewest dotted names (modules whole, else single parameters) covering every parameter whose id is not in
    ``inside``: what LISA and HFT train always on a model no preset knows."""
    names: list[str] = []

    def walk(prefix: str, module: nn.Module) -> None:
        names.extend(prefix + n for n, p in module.named_parameters(recurse=False) if id(p) not in inside)
        for child_name, child in module.named_children():
            ids = {id(p) for p in child.parameters()}
            if not ids:
                continue
            if ids.isdisjoint(inside):
                names.append(prefix + child_name)
            else:
                walk(f"{prefix}{child_name}.", child)

    walk("", root)
    return names
