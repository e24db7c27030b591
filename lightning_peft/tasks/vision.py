"""Image classification with any timm model."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import timm
import torch

from lightning_peft.tasks.base import ClassifierSteps

__all__ = ["ImageClassifier"]


class ImageClassifier(ClassifierSteps, pl.LightningModule):
    """A timm backbone with a classification head, trained with cross-entropy.

    The backbone lives at ``self.model`` (the callbacks find it there by itself). Only parameters that
    require grad are given to the optimizer, so a PEFT callback's freezing is respected.

    Args:
        model_name: a ``timm.create_model`` name, e.g. ``"vit_tiny_patch16_224"``.
        num_classes: size of the new head.
        pretrained: load timm's pretrained weights (needs the network or a local HF cache).
        model_kwargs: extra ``timm.create_model`` arguments (``img_size``, ``patch_size``, ``in_chans``, ``depth``...).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.

    Example:
        >>> m = ImageClassifier("vit_tiny_patch16_224", num_classes=10, model_kwargs={"img_size": 8, "patch_size": 2,
        ...     "in_chans": 1, "depth": 2})
        >>> m(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        num_classes: int = 10,
        pretrained: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr, self.weight_decay = lr, weight_decay
        kwargs = model_kwargs or {}
        self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
