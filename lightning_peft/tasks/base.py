"""What the ready-made tasks share: tensor-split data modules, classification steps, AdamW over what trains."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import distributed
from lightning_peft.callbacks.checkpoints import ExplainCheckpointLoading
from lightning_peft.tasks.loading import ResumableDataLoader

__all__ = ["ClassifierSteps", "ShardedByStrategy", "TensorSplitDataModule", "TrainableAdamW"]


class TensorSplitDataModule(pl.LightningDataModule):
    """A data module whose ``setup`` fills ``train_set`` / ``val_set``; test uses the validation split.

    Subclasses set ``batch_size``, ``num_workers`` and ``val_batch_size`` (and ``seed``, which also seeds the
    training order) and build the two datasets in ``setup``. The loaders are
    :class:`~lightning_peft.tasks.loading.ResumableDataLoader` s: a run killed mid-epoch and resumed from its
    checkpoint continues with the batches it had not seen, in the order the uninterrupted run had.
    """

    train_set: TensorDataset | None = None
    val_set: TensorDataset | None = None
    batch_size: int = 32
    val_batch_size: int = 256
    num_workers: int = 0
    seed: int = 0

    def _loader(self, dataset: TensorDataset | None, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run; the Trainer calls it before loading data")
        # resumable mid-epoch, shuffled by (seed, epoch): a run killed mid-epoch and resumed sees what it would have
        return ResumableDataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, seed=self.seed, num_workers=self.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class ShardedByStrategy:
    """``configure_model``: under ``ModelParallelStrategy`` (FSDP2) shard ``self.model`` with
    :func:`lightning_peft.shard` (its blocks, then itself); under any other strategy do nothing. So a recipe
    trains sharded by naming the strategy alone."""

    def configure_model(self) -> None:
        mesh = getattr(self, "device_mesh", None)  # set by ModelParallelStrategy only
        model = getattr(self, "model", None)
        if mesh is None or model is None or distributed.is_sharded(model):
            return  # not sharded training, or sharded already (a second fit/validate of the same module)
        distributed.shard(model, mesh)
        units = sum(distributed.is_sharded(m) for m in model.modules())
        name = distributed.unwrapped_class(model).__name__  # fully_shard swaps in an FSDP<Name> class
        rank_zero_info(f"{type(self).__name__}: sharded {name} with FSDP2 ({units - 1} blocks + the root)")


class TrainableAdamW(ExplainCheckpointLoading, ShardedByStrategy):
    """``configure_optimizers``: AdamW over the parameters that require grad *when it runs* (after a callback's
    ``setup`` chose them; LISA relies on it). Needs ``lr`` and ``weight_decay`` attributes. ``load_from_checkpoint``
    of a method run's training checkpoint explains what to do (:class:`ExplainCheckpointLoading`)."""

    lr: float
    weight_decay: float

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]  # type: ignore[attr-defined]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


class ClassifierSteps(TrainableAdamW):
    """Cross-entropy train/val/test steps on ``(*inputs, labels)`` batches, logging ``<stage>_loss`` and ``_acc``."""

    def _step(self, batch: tuple[torch.Tensor, ...], stage: str) -> torch.Tensor:
        *inputs, y = batch
        logits = self(*inputs)  # type: ignore[operator]
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(-1) == y).float().mean()
        self.log(f"{stage}_loss", loss, prog_bar=stage != "train", sync_dist=stage != "train")  # type: ignore[attr-defined]
        self.log(f"{stage}_acc", acc, prog_bar=True, sync_dist=stage != "train")  # type: ignore[attr-defined]
        return loss

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._step(batch, "test")
