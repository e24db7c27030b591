"""LISA or HFT (the scheduled selections) under 2 CPU processes; each rank writes every parameter for the test.

Run as ``python tests/scripts/ddp_scheduled.py OUT_DIR [STRATEGY] [METHOD]`` (STRATEGY ``ddp_selective`` by
default; with ``ddp`` the script records the error the method raises; ``ddp_unchecked`` and ``ddp_find_unused``
bypass LISA's refusal and run plain DDP without and with ``find_unused_parameters``; METHOD ``lisa`` by default, or
``hft``). Each rank perturbs its weights differently before fit, so equal results prove the strategy synchronised
them, and each rank sees other batches. ``interval=2`` redraws every two steps: blocks (groups) frozen at the start
train later, the case where a strategy that registered only the first trainable set would leave them unsynchronised.
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

from lightning_peft import HFT, LISA  # noqa: E402


class Record(Callback):
    """Per rank: the batch seeds, the trainable set at every step, the optimizer's state size, final weights."""

    def __init__(self, out: Path) -> None:
        self.out, self.seeds, self.steps = out, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seeds += [int(s) for s in batch]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        trainable = sorted(n for n, p in pl_module.named_parameters() if p.requires_grad)
        with_grad = sorted(n for n, p in pl_module.named_parameters() if p.grad is not None)
        self.steps.append(
            {"step": trainer.global_step, "trainable": trainable, "with_grad": with_grad, "state": len(optimizer.state)}
        )

    def on_fit_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        state = {k: v.detach().contiguous() for k, v in pl_module.state_dict().items()}
        save_file(state, str(self.out / f"rank{rank}.safetensors"))
        log = {"seeds": self.seeds, "steps": self.steps, "step": trainer.global_step}
        (self.out / f"rank{rank}.json").write_text(json.dumps(log))


def main() -> None:
    out = Path(sys.argv[1])
    strategy = sys.argv[2] if len(sys.argv) > 2 else "ddp_selective"
    method = sys.argv[3] if len(sys.argv) > 3 else "lisa"
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    module = FamilyModule("llama", n_batches=16, lr=1e-2)
    with torch.no_grad():  # a different start on each rank: only the strategy's broadcast makes them equal
        for p in module.parameters():
            p.add_(0.01 * rank)
    save_dir = str(out / "delta")
    callback = HFT(interval=2, seed=0, save_dir=save_dir) if method == "hft" else LISA(1, 2, seed=0, save_dir=save_dir)
    if strategy in ("ddp_unchecked", "ddp_find_unused"):  # what plain DDP really does, the refusal bypassed
        from lightning.pytorch.strategies import DDPStrategy

        import lightning_peft.callbacks.lisa as lisa_module

        lisa_module.check_dynamic_strategy = lambda *args, **kwargs: None
        strategy = DDPStrategy(find_unused_parameters=strategy == "ddp_find_unused")
    trainer = quiet_trainer(
        strategy=strategy, devices=2, max_epochs=1, limit_val_batches=0, callbacks=[callback, Record(out)]
    )
    try:
        trainer.fit(module)
    except (NotImplementedError, RuntimeError) as err:
        (out / f"error{rank}.txt").write_text(str(err))
    end_ranks()


if __name__ == "__main__":
    main()
