"""2-process CPU DDP fit whose ZooPublisher fails; each rank writes the error it got for the test to compare.

Run as ``python tests/scripts/ddp_zoo_faults.py OUT_DIR CASE``; Lightning's ``ddp`` strategy relaunches
this script for rank 1. ``CASE`` is ``setup`` (the Hub endpoint is a closed port: refused before
training) or ``publish`` (the local zoo root turns into a file at the end of fit: the publish fails
on rank 0). Every rank must raise the same error, and none may hang waiting for the other.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lightning.pytorch.callbacks import Callback  # noqa: E402
from lit_helpers import FamilyModule, end_ranks, quiet_trainer  # noqa: E402

from lightning_peft import LoRA, ZooPublisher  # noqa: E402


class BreakRoot(Callback):
    """At the end of fit, before the publisher, rank 0 replaces the (empty) zoo root by a file."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self.root.rmdir()
            self.root.write_text("not a folder")


def main() -> None:
    out, case = Path(sys.argv[1]), sys.argv[2]
    out.mkdir(parents=True, exist_ok=True)
    if case == "setup":
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = False
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        sock.close()
        callbacks = [LoRA(r=2), ZooPublisher(name="ddp-vit", zoo="hub", namespace="tester", endpoint=url)]
    else:
        root = out / "zoo"
        callbacks = [LoRA(r=2), BreakRoot(root), ZooPublisher(name="ddp-vit", root=str(root))]
    trainer = quiet_trainer(
        strategy="ddp", devices=2, max_epochs=1, limit_val_batches=0, callbacks=callbacks, default_root_dir=out
    )
    try:
        trainer.fit(FamilyModule("vit", n_batches=4))
        got = {"error": None}
    except Exception as err:  # noqa: BLE001 - what the test compares
        got = {"error": type(err).__name__, "message": str(err), "step": trainer.global_step}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(got))
    end_ranks()


if __name__ == "__main__":
    main()
