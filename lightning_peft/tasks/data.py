"""Small real data sets that ship with a package, for runs that need no network."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from lightning_peft._deps import require
from lightning_peft.tasks.base import TensorSplitDataModule

__all__ = ["DigitsDataModule"]


class DigitsDataModule(TensorSplitDataModule):
    """scikit-learn's handwritten digits (1,797 real 8x8 grey images, 10 classes) as image tensors.

    The split is fixed by ``seed`` (stratified), so every rank and every run sees the same sets.

    Args:
        batch_size: samples per batch.
        val_fraction: share of the images held out for validation (and test).
        image_size: side of the square images given to the model (bilinear resize from 8; 8 keeps them as they are).
        channels: 1 (grey) or 3 (grey repeated, for models pretrained on RGB).
        seed: seed of the split.
        num_workers: DataLoader workers.

    Raises:
        ImportError: scikit-learn is not installed (``pip install scikit-learn``).
    """

    val_batch_size = 256

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        image_size: int = 8,
        channels: int = 1,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.save_hyperparameters()
        self.batch_size, self.val_fraction, self.num_workers = batch_size, val_fraction, num_workers
        self.image_size, self.channels, self.seed = image_size, channels, seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        digits = require("sklearn.datasets", "DigitsDataModule").load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        x = (x - 0.5) / 0.5
        if self.image_size != 8:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = x.repeat(1, self.channels, 1, 1)
        y = torch.tensor(digits.target, dtype=torch.long)
        gen = torch.Generator().manual_seed(self.seed)
        val_idx, train_idx = [], []
        for c in range(10):  # stratified split
            idx = torch.nonzero(y == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=gen)]
            n_val = round(len(idx) * self.val_fraction)
            val_idx.append(idx[:n_val])
            train_idx.append(idx[n_val:])
        tr, va = torch.cat(train_idx), torch.cat(val_idx)
        self.train_set, self.val_set = TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va])
