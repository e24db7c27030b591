"""A LightningModule around any tiny model of ``tiny_models``, with deterministic synthetic batches."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from tiny_models import FAMILIES, example_inputs, forward
from torch.utils.data import DataLoader, Dataset


class SeedDataset(Dataset):
    """Item ``i`` is the seed of batch ``i``; the module turns it into model inputs (any family)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class FamilyModule(pl.LightningModule):
    """``self.model`` is ``FAMILIES[name]``; the loss drives its output towards zero (every layer gets a gradient)."""

    def __init__(self, name: str = "vit", seed: int = 0, lr: float = 1e-2, n_batches: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = FAMILIES[name](seed=seed)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        out = torch.cat([forward(self.hparams.name, self.model, batch=2, seed=int(s)) for s in batch])
        loss = out.float().pow(2).mean()
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        out = forward(self.hparams.name, self.model, batch=2, seed=1000 + int(batch[0]))
        self.log("val_loss", out.float().pow(2).mean(), sync_dist=True)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(SeedDataset(self.hparams.n_batches), batch_size=1, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(SeedDataset(2), batch_size=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


class TrainableWatch(pl.Callback):
    """At every optimizer step: what requires grad, what has a gradient, which parameters have optimizer state."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.steps.append(
            {
                "step": trainer.global_step,
                "trainable": {n for n, p in pl_module.named_parameters() if p.requires_grad},
                "with_grad": {n for n, p in pl_module.named_parameters() if p.grad is not None},
                "state": {names[id(p)] for p in optimizer.state},
            }
        )


class PairModule(FamilyModule):
    """Batch ``k`` holds the seeds both DDP ranks trained on at step ``k``: one process sees what they saw together."""

    def __init__(self, seeds: list[list[int]], **kwargs) -> None:
        super().__init__(**kwargs)
        self.pairs = [list(pair) for pair in zip(*seeds, strict=True)]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.pairs, batch_size=None, shuffle=False)


def quiet_trainer(**kwargs) -> pl.Trainer:
    """A CPU trainer with no progress bar, summary, logger or checkpointing unless asked for."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def run_two_ranks(script: str, out, *args: str, timeout: int = 300) -> tuple[list[dict], list[dict]]:
    """Run ``tests/scripts/<script> OUT ARGS...`` (it launches 2 ranks) and read what each rank wrote.

    Returns ``(states, logs)``: per rank, the tensors of ``rank<r>.safetensors`` and the dict of ``rank<r>.json``
    (empty when the script wrote none, e.g. when the fit was refused).
    """
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    scripts = Path(__file__).parent / "scripts"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(scripts / script), str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=scripts.parents[1],
    )
    assert proc.returncode == 0, f"exit code {proc.returncode}\n" + proc.stdout[-3000:] + proc.stderr[-5000:]
    out = Path(out)
    states = [
        load_file(out / f"rank{r}.safetensors") if (out / f"rank{r}.safetensors").exists() else {} for r in (0, 1)
    ]
    logs = [json.loads((out / f"rank{r}.json").read_text()) if (out / f"rank{r}.json").exists() else {} for r in (0, 1)]
    return states, logs


def moved_key(key: str, callback) -> str:
    """Where a base weight's key lands after a callback's injection (``x.weight`` -> ``x.base_layer.weight``)."""
    root = f"{callback.backbone_path}." if callback.backbone_path else ""
    for layer in callback.adapted:
        prefix = f"{root}{layer}."
        if key.startswith(prefix):
            return f"{prefix}base_layer.{key[len(prefix) :]}"
    return key


__all__ = ["FamilyModule", "SeedDataset", "example_inputs", "moved_key", "quiet_trainer", "run_two_ranks"]


def end_ranks() -> None:
    """End a multi-rank test script: meet the other ranks, destroy the process groups, exit without finalisation.

    Each rank calls this last, after it wrote what the test reads. ``destroy_process_group`` alone did not
    stop an intermittent ``terminate called without an active exception`` abort at interpreter exit (CI, once in
    ~800 tests, torch 2.14.1 + gloo: worker threads still alive while the interpreter tears down, cf.
    pytorch/pytorch#179291); ``os._exit`` skips that finalisation, so the exit code is the script's own.
    """
    import os
    import sys

    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
