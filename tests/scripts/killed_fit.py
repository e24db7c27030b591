"""A fit on the project's own data module that can be SIGKILLed mid-epoch and resumed from its last checkpoint.

``python tests/scripts/killed_fit.py OUT METHOD MODE`` with ``METHOD`` in ``lora``, ``adalora`` (the latter with
``accumulate_grad_batches=2``), ``lisa``, ``hft``, ``id3``, ``sara``, ``ssf``, ``spiel`` and ``MODE``:

* ``straight``: the whole run; writes ``OUT/result.safetensors`` (what trains) and ``OUT/result.json``.
* ``kill``: the same run with a checkpoint every ``EVERY`` optimizer steps (``OUT/ckpt/last.ckpt``); at optimizer step
  ``KILL_AT``, on the second micro-batch of the accumulation window (mid-epoch, mid-window), the process sends itself
  SIGKILL: no hook, no ``finally`` runs, as when a job is preempted.
* ``resume``: the run again from ``OUT/ckpt/last.ckpt`` to the end; writes the same files as ``straight``.

With ``ADAPTER_ONLY=1`` the checkpoints are written by :class:`lightning_peft.callbacks.AdapterCheckpoints` (what
trains only); the resumed run builds a fresh model, whose base weights fill in the rest.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lightning_peft import HFT, ID3, LISA, SSF, AdaLoRA, LoRA, SaRA, SpIEL  # noqa: E402
from lightning_peft.callbacks import AdapterCheckpoints  # noqa: E402
from lightning_peft.tasks import DigitsDataModule, ImageClassifier  # noqa: E402

EPOCHS, EVERY, KILL_AT = 2, 5, 33  # 45 batches an epoch: the checkpoint at step 30 is mid-epoch either way


class Killer(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        mid_window = trainer.accumulate_grad_batches == 1 or batch_idx % trainer.accumulate_grad_batches == 1
        if trainer.global_step == KILL_AT and mid_window:
            os.kill(os.getpid(), signal.SIGKILL)


class Record(Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.labels = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.labels.append(int(batch[1][:4].sum()))  # a fingerprint of each batch trained on, in order

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().contiguous() for k, v in pl_module.state_dict().items()}  # the whole model
        save_file(state, str(self.out / "result.safetensors"))
        info: dict = {"step": trainer.global_step, "labels": self.labels}
        ada = next((c for c in trainer.callbacks if isinstance(c, AdaLoRA)), None)
        if ada is not None and ada.allocator is not None:
            info["history"] = [list(map(int, h)) for h in ada.allocator.history]
        (self.out / "result.json").write_text(json.dumps(info))


def main() -> None:
    out, method, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    module = ImageClassifier(
        "vit_tiny_patch16_224",
        model_kwargs={"img_size": 8, "patch_size": 4, "in_chans": 1, "depth": 2, "embed_dim": 32, "num_heads": 2},
        lr=1e-2,
    )
    accumulate = int(os.environ.get("ACCUMULATE", 2 if method == "adalora" else 1))
    peft: Callback
    if method == "lora":
        peft = LoRA(r=2, init="nonzero", modules_to_save=["head"])
    elif method == "adalora":
        peft = AdaLoRA(r=4, target_r=2, tinit=3, tfinal=3, deltaT=1, modules_to_save=["head"])
    elif method == "lisa":
        peft = LISA(n_layers=1, interval=4, always_on=["head"])
    elif method == "hft":
        peft = HFT(interval=8, seed=1, always_on=["head"])  # the checkpoint at step 30 is inside round 24-31
    elif method == "ssf":
        peft = SSF(init="normal", modules_to_save=["head"])
    elif method == "id3":
        peft = ID3(budget=300, total_steps=40, modules_to_save=["head"])
    elif method == "spiel":  # the checkpoint at step 30 is inside the window of steps 29..31 (update at 32)
        peft = SpIEL(budget=300, reselection_steps=6, accumulation_steps=2, modules_to_save=["head"])
    else:
        peft = SaRA(fraction=0.1, reselect_at=20, rank_penalty=0.01, modules_to_save=["head"])
    callbacks: list[Callback] = [peft, Record(out)]
    if os.environ.get("ADAPTER_ONLY") == "1":
        callbacks.append(AdapterCheckpoints())
    if mode != "straight":
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=EVERY, save_last=True))
    if mode == "kill":
        callbacks.append(Killer())
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=EPOCHS,
        accumulate_grad_batches=accumulate,
        limit_val_batches=0,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=mode != "straight",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = DigitsDataModule(batch_size=32, seed=3)
    trainer.fit(module, datamodule=data, ckpt_path=str(out / "ckpt" / "last.ckpt") if mode == "resume" else None)


if __name__ == "__main__":
    main()
