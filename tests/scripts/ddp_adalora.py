"""2-process CPU DDP fit with the AdaLoRA callback; each rank records its allocator at every step.

Run as ``python tests/scripts/ddp_adalora.py OUT_DIR``; Lightning's ``ddp`` strategy relaunches this
script for rank 1. Each rank seeds differently before injection (the strategy broadcasts rank 0's
adapters) and trains on its own half of the data, so identical masks prove that the scores were
computed from synchronised gradients, not that both ranks happened to see the same thing.

Writes ``rank{r}.json`` (seeds seen; per optimizer step: budget, masks, EMA sums) and
``rank{r}.safetensors`` (the rank's adapter tensors after the final shrink); rank 0 also writes the
adapter folder ``adapter/``.
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

from lightning_peft import AdaLoRA  # noqa: E402


class Record(Callback):
    """Placed after AdaLoRA: sees the allocator after it masked for the step."""

    def __init__(self, out: Path) -> None:
        self.out, self.seeds, self.steps = out, [], []

    @staticmethod
    def _adalora(trainer) -> AdaLoRA:
        return next(c for c in trainer.callbacks if isinstance(c, AdaLoRA))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seeds += [int(s) for s in batch]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        alloc = self._adalora(trainer).allocator
        state = alloc.state_dict()
        self.steps.append(
            {
                "step": trainer.global_step,
                "budget": int(alloc.budget),
                "masks": [[bool(x) for x in m.tolist()] for m in alloc.masks],
                "ema": [float(state["exp_avg_ipt"].double().sum()), float(state["exp_avg_unc"].double().sum())],
            }
        )

    def on_fit_end(self, trainer, pl_module) -> None:  # after AdaLoRA's on_fit_end: the layers are shrunk
        rank = trainer.global_rank
        state = {k: v.detach().contiguous() for k, v in pl_module.state_dict().items() if ".lora_" in k}
        save_file(state, str(self.out / f"rank{rank}.safetensors"))
        (self.out / f"rank{rank}.json").write_text(json.dumps({"seeds": self.seeds, "steps": self.steps}))


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(int(os.environ.get("LOCAL_RANK", "0")))  # different adapter init on each rank
    module = FamilyModule("vit", n_batches=16, lr=5e-2)  # 8 batches per rank: 8 optimizer steps
    callbacks = [
        AdaLoRA(r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, backbone="model", save_dir=str(out / "adapter")),
        Record(out),
    ]
    trainer = quiet_trainer(strategy="ddp", devices=2, max_epochs=1, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module)
    end_ranks()


if __name__ == "__main__":
    main()
