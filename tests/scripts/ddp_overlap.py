"""``ddp_selective`` with and without overlap, several fits in the same 2 CPU processes; each rank writes all.

Run as ``python tests/scripts/ddp_overlap.py OUT_DIR``. Lightning's ``ddp`` launcher starts rank 1 at the
first fit; the later fits reuse both processes and the process group. The runs (``RUNS``):

* ``lisa_overlap`` / ``lisa_sync``: LISA switching blocks every optimizer step, ``accumulate_grad_batches=2``,
  tiny buckets (many of them), ``overlap=True`` / ``False``;
* ``lora_overlap`` / ``lora_sync``: LoRA, plus layers outside the backbone used by rank 0 only and by no rank
  at odd steps (``WithUnused``);
* ``manual``: manual optimization under ``overlap=True``.

Per run and rank: every parameter (``<run>/<name>`` in ``rank<r>.safetensors``) and, in ``rank<r>.json``, the
strategy's ``reduction_counts`` after every backward and at every optimizer step, with what required grad and
what had a gradient then. Each rank perturbs its weights differently before each fit, so equal results prove the
strategy synchronised them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lit_helpers import FamilyModule, end_ranks, quiet_trainer  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

from lightning_peft import LISA, LoRA  # noqa: E402
from lightning_peft.strategies import SelectiveDDPStrategy  # noqa: E402

RUNS = ("lisa_overlap", "lisa_sync", "lora_overlap", "lora_sync", "manual")


class WithUnused(FamilyModule):
    """Adds, outside the backbone, ``extra`` (used by rank 0 only) and ``sometimes`` (used by both ranks at even
    steps, by none at odd ones). They come first in ``parameters()``, so last in the backward-ordered buckets: at
    even steps rank 0 has every gradient when its backward ends, rank 1 has not."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.extra = nn.Linear(4, 1)
        self.sometimes = nn.Linear(4, 1)
        self._modules["model"] = self._modules.pop("model")

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.global_rank == 0:
            loss = loss + self.extra(torch.ones(1, 4)).pow(2).sum()
        if batch_idx % 2 == 0:
            loss = loss + self.sometimes(torch.ones(1, 4)).pow(2).sum()
        return loss


class Manual(FamilyModule):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        opt.step()


class Record(Callback):
    """The strategy's counts after each backward and at each optimizer step, with the trainable and graded names."""

    def __init__(self) -> None:
        self.backwards: list[dict] = []
        self.steps: list[dict] = []

    def on_after_backward(self, trainer, pl_module) -> None:
        self.backwards.append(dict(trainer.strategy.reduction_counts))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append(
            {
                "counts": dict(trainer.strategy.reduction_counts),
                "trainable": sorted(n for n, p in pl_module.named_parameters() if p.requires_grad),
                "with_grad": sorted(n for n, p in pl_module.named_parameters() if p.grad is not None),
            }
        )


def fit(run: str, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    torch.manual_seed(rank)  # a different LoRA init on each rank: only the strategy's broadcast makes them equal
    module_cls = {"lora": WithUnused, "manual": Manual}.get(run.split("_")[0], FamilyModule)
    module = module_cls(name="llama", n_batches=16 if run.startswith("lisa") else 8, lr=1e-2)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.01 * rank)
    method = LISA(n_layers=1, interval=1, seed=0) if run.startswith("lisa") else LoRA(r=2, alpha=4, init="nonzero")
    record = Record()
    strategy = SelectiveDDPStrategy(overlap=not run.endswith("_sync"), bucket_cap_mb=0.004)  # buckets of ~1k floats
    trainer = quiet_trainer(
        strategy=strategy,
        devices=2,
        max_epochs=1,
        limit_val_batches=0,
        accumulate_grad_batches=2 if run.startswith("lisa") else 1,
        callbacks=[method, record],
    )
    trainer.fit(module)
    state = {f"{run}/{k}": v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    return state, {"backwards": record.backwards, "steps": record.steps, "step": trainer.global_step}


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    states: dict[str, torch.Tensor] = {}
    logs: dict[str, dict] = {}
    for run in RUNS:
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        state, logs[run] = fit(run, rank)
        states.update(state)
    save_file(states, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps(logs))
    end_ranks()


if __name__ == "__main__":
    main()
