"""2-process CPU DDP fit with the LoRA (or SSF) callback; each rank writes its trained tensors for the test.

Run as ``python tests/scripts/ddp_lora.py OUT_DIR [lora|ssf]`` (plain ``ddp`` for both: a static trainable
set); Lightning's ``ddp`` strategy relaunches this script for rank 1. Each rank seeds differently before
injection, so equal results prove the strategy synchronised the adapters rather than both ranks happening
to start equal.
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

from lightning_peft import SSF, LoRA, ZooPublisher  # noqa: E402


class Record(Callback):
    """Writes the rank's adapter tensors at the end of fit and the batch seeds it trained on."""

    def __init__(self, out: Path) -> None:
        self.out, self.seeds = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seeds += [int(s) for s in batch]

    def on_fit_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        state = {
            k: v.detach().contiguous()
            for k, v in pl_module.state_dict().items()
            if ".lora_" in k or ".ssf_" in k or "head" in k
        }
        save_file(state, str(self.out / f"rank{rank}.safetensors"))
        (self.out / f"rank{rank}.json").write_text(json.dumps({"seeds": self.seeds, "step": trainer.global_step}))


def main() -> None:
    out = Path(sys.argv[1])
    method = sys.argv[2] if len(sys.argv) > 2 else "lora"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(int(os.environ.get("LOCAL_RANK", "0")))  # different adapter init on each rank
    module = FamilyModule("vit", n_batches=8, lr=5e-2)
    callbacks = [
        SSF(init="normal", modules_to_save=["head"], save_dir=str(out / "adapter"))
        if method == "ssf"
        else LoRA(r=4, alpha=8, init="nonzero", modules_to_save=["head"], save_dir=str(out / "adapter")),
        ZooPublisher(name="ddp-vit", root=str(out / "zoo"), base_model="tiny-vit"),
        Record(out),
    ]
    trainer = quiet_trainer(strategy="ddp", devices=2, max_epochs=2, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module)
    end_ranks()


if __name__ == "__main__":
    main()
