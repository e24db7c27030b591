"""Finding the backbone a callback adapts inside a ``LightningModule``."""

from __future__ import annotations

from torch import nn

from lightning_peft.backbones import Preset, detect_preset, find_backbone

__all__ = ["resolve_backbone"]


def resolve_backbone(module: nn.Module, path: str | None = None) -> tuple[nn.Module, str, Preset | None]:
    """The module a callback works on, its dotted path inside ``module``, and its family preset.

    Args:
        module: usually the ``LightningModule``.
        path: dotted attribute path of the backbone (``"model"``, ``"net.encoder"``); None to detect the
            first submodule of a known family, or fall back to ``module`` itself.

    Raises:
        ValueError: ``path`` does not name a submodule; the message lists the top-level children.
    """
    if path:
        try:
            root = module.get_submodule(path)
        except AttributeError as err:
            children = ", ".join(name for name, _ in module.named_children()) or "none"
            raise ValueError(
                f"backbone={path!r} is not a submodule of {type(module).__name__}; its children are: {children}"
            ) from err
        return root, path, detect_preset(root)
    found = find_backbone(module)
    if found is None:
        return module, "", None
    name, preset = found
    return (module.get_submodule(name) if name else module), name, preset
