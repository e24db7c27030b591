"""What every method callback offers the rest of the library (the zoo publisher, the CLI, the pictures)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_peft.callbacks.backbone import resolve_backbone

__all__ = ["MethodCallback"]


class MethodCallback(Callback):
    """Base of the method callbacks (``LoRA``, ``AdaLoRA``, ``LISA``, ``ID3``, ``SaRA``).

    A subclass sets ``method`` and ``backbone`` and implements :meth:`save`,
    :meth:`hyperparameters` and :meth:`base_fingerprint`. It inherits ``on_fit_end``: when
    ``save_dir`` is set the result is saved there (every rank gathers, rank 0 writes) with the
    method's pictures, which are also logged where a logger takes images.
    """

    method = "method"
    backbone: str | None = None
    save_dir: str | None = None
    saved_to: Path | None = None

    def save(self, root: nn.Module, path: str | Path) -> Path | None:
        """Gather the result on every rank and write it from rank 0 (a collective). Returns the folder on rank 0."""
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, Any]:
        """The method's settings, JSON-able, for the zoo manifest and the model card."""
        raise NotImplementedError

    def base_fingerprint(self, root: nn.Module) -> dict[str, Any]:
        """The fingerprint of the base weights the result applies to (a collective under sharding)."""
        raise NotImplementedError

    def schedule(self) -> dict[str, Any]:
        """What the method decided during training, for the zoo manifest (e.g. LISA's layer counts)."""
        return {}

    def write_pictures(self, folder: Path) -> list[Path]:
        """Write the method's pictures of what it decided into ``folder`` (rank 0). Returns their paths."""
        return []

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_dir is None:
            return
        root, _, _ = resolve_backbone(pl_module, self.backbone)
        self.saved_to = self.save(root, self.save_dir)
        if self.saved_to is None:  # not rank 0
            return
        for picture in self.write_pictures(self.saved_to):
            for logger in trainer.loggers:
                if hasattr(logger, "log_image"):
                    logger.log_image(key=f"{self.method}/{picture.stem}", images=[str(picture)])
        rank_zero_info(f"{type(self).__name__}: result saved to {self.saved_to.resolve()}")
