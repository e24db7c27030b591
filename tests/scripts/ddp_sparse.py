"""A sparse method (ID3, SaRA or SpIEL) under 2 CPU processes with ``ddp_selective``; each rank writes its whole state.

Run as ``python tests/scripts/ddp_sparse.py OUT_DIR METHOD`` with METHOD ``id3``, ``sara`` or ``spiel``. Each
rank perturbs its weights differently before fit and sees other batches, so equal results prove the
strategy and the method kept the ranks in step (weights, indices, slots, bank).
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

import lightning_peft  # noqa: E402


class Record(Callback):
    def __init__(self, out: Path, method) -> None:
        self.out, self.method, self.seeds, self.active = out, method, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seeds += [int(s) for s in batch]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.active.append(sum(layer.active_count() for _, layer in self.method.layers(pl_module)))

    def on_fit_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        state = {k: v.detach().contiguous() for k, v in pl_module.state_dict().items()}
        save_file(state, str(self.out / f"rank{rank}.safetensors"))
        log = {"seeds": self.seeds, "active": self.active, "step": trainer.global_step}
        if hasattr(self.method, "moved"):  # SpIEL: (completed steps, entries moved) of each update
            log["moved"] = [list(m) for m in self.method.moved]
        (self.out / f"rank{rank}.json").write_text(json.dumps(log))


def main() -> None:
    out, method = Path(sys.argv[1]), sys.argv[2]
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    family = "unet" if method == "sara" else "llama"
    module = FamilyModule(family, n_batches=12, lr=1e-2)
    with torch.no_grad():  # a different start on each rank: only the strategy's broadcast makes them equal
        for p in module.parameters():
            p.add_(0.01 * rank)
    if method == "id3":
        callback = lightning_peft.ID3(budget=120, total_steps=4, save_dir=str(out / "delta"))
    elif method == "spiel":
        callback = lightning_peft.SpIEL(
            budget=120, reselection_steps=3, accumulation_steps=1, drop_fraction=0.5, save_dir=str(out / "delta")
        )
    else:
        callback = lightning_peft.SaRA(fraction=0.1, rank_penalty=0.1, reselect_at=3, save_dir=str(out / "delta"))
    trainer = quiet_trainer(
        strategy="ddp_selective",
        devices=2,
        max_epochs=1,
        limit_val_batches=0,
        callbacks=[callback, Record(out, callback)],
    )
    trainer.fit(module)
    end_ranks()


if __name__ == "__main__":
    main()
