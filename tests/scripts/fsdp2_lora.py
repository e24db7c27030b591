"""2-process CPU FSDP2 fit (``ModelParallelStrategy`` + ``fully_shard``, gloo) with the LoRA callback.

Run as ``python tests/scripts/fsdp2_lora.py OUT_DIR``; Lightning relaunches this script for rank 1.
The LoRA callback injects in ``setup``, before ``configure_model``, so the tiny Llama is built in
``__init__`` and only sharded in ``configure_model`` (each decoder layer, then the root).

Each rank seeds its global RNG differently before injection. FSDP2 does not broadcast weights when
it shards (unlike DDP): each rank keeps its own rows of its own initialisation, so the adapter the
ranks start from is the row-wise mix of their inits. Each rank writes (``rankR.safetensors``):

* ``local_init.<name>``: its adapter tensors right after injection, before sharding;
* ``init.<name>`` / ``final.<name>``: the gathered full adapter at fit start / fit end;
* ``logits``: the trained sharded model's output on fixed inputs (a forward is collective under FSDP2);

and ``rankR.json``: whether the LoRA parameters were DTensors, their shard shapes, the batch seeds
of every rank per step, and the global step. The test replays the training unsharded and compares.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from lit_helpers import FamilyModule, end_ranks, quiet_trainer  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tiny_models import forward  # noqa: E402

from lightning_peft import LoRA, ZooPublisher  # noqa: E402

FAMILY = "llama"
N_BATCHES = 8  # 4 steps per rank
LR = 5e-2
LOGIT_SEED = 123  # inputs of the final forward


class ShardedFamily(FamilyModule):
    """``FamilyModule`` whose tiny Llama is sharded with FSDP2 in ``configure_model``."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


def lora_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.model.named_parameters() if ".lora_" in k}


def gathered(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full adapter tensors on every rank (a collective for DTensors)."""
    out = {}
    for name, p in lora_params(module).items():
        t = p.detach()
        out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).clone().contiguous()
    return out


class Record(Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.seeds, self.tensors, self.info = out, [], {}, {}

    def setup(self, trainer, pl_module, stage) -> None:  # after LoRA.setup, before configure_model
        for name, p in lora_params(pl_module).items():
            self.tensors[f"local_init.{name}"] = p.detach().clone()

    def on_fit_start(self, trainer, pl_module) -> None:  # after sharding and optimizer setup
        params = lora_params(pl_module)
        self.info["dtensor"] = {k: type(p).__name__ == "DTensor" for k, p in params.items()}
        self.info["local_shapes"] = {k: list(getattr(p, "_local_tensor", p).shape) for k, p in params.items()}
        self.info["trainable"] = sorted(k for k, p in pl_module.named_parameters() if p.requires_grad)
        self.tensors.update({f"init.{k}": v for k, v in gathered(pl_module).items()})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seeds.append([int(s) for s in batch])

    def on_fit_end(self, trainer, pl_module) -> None:
        self.tensors.update({f"final.{k}": v for k, v in gathered(pl_module).items()})
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, self.seeds)
        self.info.update(seeds=every, step=trainer.global_step, world_size=dist.get_world_size())


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.manual_seed(rank)  # different adapter init on each rank
    module = ShardedFamily(FAMILY, n_batches=N_BATCHES, lr=LR)
    record = Record(out)
    callbacks = [
        LoRA(r=4, alpha=8, init="nonzero", save_dir=str(out / "adapter")),
        ZooPublisher(name="fsdp2", root=str(out / "zoo"), base_model="tiny-llama"),
        record,
    ]
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = quiet_trainer(
        strategy=strategy, accelerator="cpu", devices=2, max_epochs=1, limit_val_batches=0, callbacks=callbacks
    )
    trainer.fit(module)
    rank = trainer.global_rank
    with torch.no_grad():  # every rank takes part: FSDP2 all-gathers the layers' weights in the forward
        record.tensors["logits"] = forward(FAMILY, module.model, batch=2, seed=LOGIT_SEED).detach().clone()
    record.info["backend"] = dist.get_backend()
    save_file({k: v.contiguous() for k, v in record.tensors.items()}, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps(record.info))
    end_ranks()


if __name__ == "__main__":
    main()
