"""Any method callback on the tiny Llama: under 2-process FSDP2, or as the one-process reference run.

``python tests/scripts/fsdp2_fit.py OUT MODE SPEC`` where ``SPEC`` is JSON ``{"class": "AdaLoRA", "init_args": {...}}``
(a ``lightning_peft`` callback; ``save_dir`` is set to ``OUT/result``; an optional ``"family"`` picks another tiny
model than the Llama) and ``MODE`` is

* ``fsdp2``: 2 processes, ``ModelParallelStrategy`` + :func:`lightning_peft.shard` (the ``configure_model`` of
  ``lightning_peft.tasks``' modules does the same), ``EPOCHS`` epochs of 4 optimizer steps, one seed per rank per step;
* ``first``: the same with a checkpoint at the end of the first epoch (``OUT/ckpt.ckpt``, a distributed checkpoint:
  a folder); at the start of the second epoch every rank SIGKILLs itself (no hook runs, as in a preemption);
* ``resume``: the same from ``OUT/ckpt.ckpt`` to the end;
* ``single``: one unsharded process on the union of both ranks' batches per step (seeds ``[2k, 2k+1]``: what
  Lightning's ``DistributedSampler`` gives rank 0 and rank 1 at step ``k``), so the mean loss is the same.

Each process writes ``OUT/rank<R>.safetensors``: ``param.<name>`` every backbone parameter gathered in full at
the end of fit (after the method's own ``on_fit_end``), ``buffer.<name>`` the sparse methods' buffers (``sparse_`` in
the name: selected indices, slots, ...) and ``logits`` on fixed inputs; and ``OUT/rank<R>.pt``:
the method callback's ``state_dict()`` (its decisions: masks, draws, selections), ``schedule()``, the step and
whether each parameter was a DTensor.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lit_helpers import FamilyModule, SeedDataset, end_ranks, quiet_trainer  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tiny_models import forward  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import lightning_peft  # noqa: E402

FAMILY = "llama"  # the default; SPEC's "family" replaces it
N_SEEDS = 8  # 4 optimizer steps an epoch on 2 ranks (and on one process with 2 seeds a batch)
EPOCHS = 2
LR = 2e-2
LOGIT_SEED = 123


class Module(FamilyModule):
    """``FamilyModule`` on the tiny Llama, sharded by ``lightning_peft.shard`` when the strategy gives a mesh."""

    def __init__(self, per_step: int) -> None:
        super().__init__(FAMILY, n_batches=N_SEEDS, lr=LR)
        self.per_step = per_step

    def configure_model(self) -> None:
        if self.device_mesh is not None and not lightning_peft.distributed.is_sharded(self.model):
            lightning_peft.shard(self.model, self.device_mesh)

    def train_dataloader(self) -> DataLoader:
        if self.per_step == 2:  # one process: seeds 2k and 2k+1 at step k
            return DataLoader(SeedDataset(N_SEEDS), batch_size=2, shuffle=False)
        rank = self.trainer.global_rank  # each rank its own seeds (no DistributedSampler: it would shuffle)
        return DataLoader(list(range(rank, N_SEEDS, 2)), batch_size=1, shuffle=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:  # no decay: frozen-then-trained entries stay exact
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)


class Killer(Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            dist.barrier()  # the checkpoint of epoch 0 is complete on every rank
            os.kill(os.getpid(), signal.SIGKILL)


class Record(Callback):
    def __init__(self, out: Path, method: Callback) -> None:
        self.out, self.method, self.info = out, method, {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self.info["dtensor"] = {
            n: lightning_peft.distributed.is_dtensor(p) for n, p in pl_module.model.named_parameters()
        }

    def on_train_end(self, trainer, pl_module) -> None:  # before the methods' on_fit_end lets their cores go
        self.info["state"] = self.method.state_dict()

    def on_fit_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        tensors = {
            f"param.{n}": lightning_peft.distributed.full_tensor(p.detach()).clone().contiguous()
            for n, p in pl_module.model.named_parameters()
        }
        tensors.update(  # the sparse methods' decisions (indices, slots, ...) live in buffers, not in state_dict()
            {
                f"buffer.{n}": b.detach().clone().contiguous()
                for n, b in pl_module.model.named_buffers()
                if "sparse_" in n
            }
        )
        with torch.no_grad():  # collective under FSDP2: every rank runs it
            tensors["logits"] = forward(FAMILY, pl_module.model, batch=2, seed=LOGIT_SEED).detach().clone()
        save_file(tensors, str(self.out / f"rank{rank}.safetensors"))
        torch.save(
            {
                "schedule": self.method.schedule(),
                "step": trainer.global_step,
                "world_size": trainer.world_size,
                **self.info,
            },
            self.out / f"rank{rank}.pt",
        )


def main() -> None:
    global FAMILY
    out, mode, spec = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    FAMILY = spec.get("family", FAMILY)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(int(os.environ.get("LOCAL_RANK", "0")))  # ranks start unequal: the method must make them equal
    torch.set_num_threads(1)
    init_args = {**spec.get("init_args", {}), "save_dir": str(out / "result")}
    method = getattr(lightning_peft, spec["class"])(**init_args)
    sharded = mode != "single"
    module = Module(per_step=1 if sharded else 2)
    kwargs: dict = {
        "max_epochs": EPOCHS,
        "limit_val_batches": 0,
        "use_distributed_sampler": False,
    }
    if sharded:
        from lightning.pytorch.strategies import ModelParallelStrategy

        kwargs.update(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), devices=2)
    callbacks = [method, Record(out, method)]
    if mode == "first":
        callbacks += [ModelCheckpoint(dirpath=out, filename="ckpt", every_n_epochs=1, save_top_k=-1), Killer()]
        kwargs["enable_checkpointing"] = True
    trainer = quiet_trainer(callbacks=callbacks, **kwargs)
    trainer.fit(module, ckpt_path=str(out / "ckpt.ckpt") if mode == "resume" else None)
    end_ranks()


if __name__ == "__main__":
    main()
