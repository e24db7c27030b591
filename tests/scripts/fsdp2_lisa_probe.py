"""LISA under 2-process FSDP2, watched at every optimizer step: what trains, what FSDP2 reduce-scatters, what is held.

``python tests/scripts/fsdp2_lisa_probe.py OUT SPEC [VARIANT]`` (``SPEC``: the ``init_args`` of ``LISA`` as JSON)
trains the tiny Llama of ``fsdp2_fit.py`` (same module, data and ``lightning_peft.shard``) for its 8 steps and writes
``OUT/rank<R>.json``: per optimizer step the active blocks, the parameters that require grad, those whose *sharded*
gradient exists before the update, those FSDP2 reduce-scattered in that step's backward (recorded by wrapping
FSDP2's ``foreach_reduce``, which receives the parameters of one reduce-scatter), and the parameters holding
optimizer state before and after the update, with the number of state elements this rank holds.

``VARIANT``: ``noreshard`` shards with ``reshard_after_forward=False`` (the gathered blocks live from forward to
backward); ``bf16`` with ``param_dtype="bfloat16"`` (FSDP2 mixed precision, float32 reduce-scatter);
``unsharded`` leaves ``configure_model`` without ``shard``; ``unequal`` perturbs rank 1's weights before the fit;
``fullckpt`` trains one epoch with ``save_distributed_checkpoint=False``, saves a single-file checkpoint and resumes
from it. The last three write ``{"error": ...}`` to ``OUT/rank<R>.json``: the error the fit raised.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed.fsdp._fully_shard._fsdp_param_group as fsdp_param_group  # noqa: E402
from fsdp2_fit import EPOCHS, Module  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from lit_helpers import end_ranks, quiet_trainer  # noqa: E402

import lightning_peft  # noqa: E402

REDUCED: list[str] = []  # FQNs (relative to the sharded root, the backbone) reduce-scattered since the last reset
_foreach_reduce = fsdp_param_group.foreach_reduce


def _recording_foreach_reduce(fsdp_params, *args, **kwargs):
    REDUCED.extend(p._param_fqn for p in fsdp_params)
    return _foreach_reduce(fsdp_params, *args, **kwargs)


fsdp_param_group.foreach_reduce = _recording_foreach_reduce


def _local_numel(tensor: torch.Tensor) -> int:
    return int(getattr(tensor, "_local_tensor", tensor).numel())


class Probe(Callback):
    def __init__(self, out: Path, lisa: lightning_peft.LISA) -> None:
        self.out, self.lisa, self.steps = out, lisa, []

    def _state(self, trainer, backbone) -> tuple[list[str], int]:
        names = {id(p): n for n, p in backbone.named_parameters()}
        opt = trainer.optimizers[0]
        held = sorted(names[id(p)] for p, s in opt.state.items() if s)
        numel = sum(_local_numel(t) for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
        return held, numel

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        REDUCED.clear()  # LISA's own on_train_batch_start (the switch) runs before this callback's

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        backbone = pl_module.model
        held, numel = self._state(trainer, backbone)
        self.steps.append(
            {
                "step": trainer.global_step,
                "active": list(self.lisa.active),
                "trainable": sorted(n for n, p in backbone.named_parameters() if p.requires_grad),
                "with_grad": sorted(n for n, p in backbone.named_parameters() if p.grad is not None),
                "grads_sharded": all(
                    lightning_peft.distributed.is_dtensor(p.grad) for p in backbone.parameters() if p.grad is not None
                ),
                "reduced": sorted(set(REDUCED)),
                "state_before": held,
                "state_numel_before": numel,
            }
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        held, numel = self._state(trainer, pl_module.model)
        self.steps[-1].update(state_after=held, state_numel_after=numel)

    def on_fit_end(self, trainer, pl_module) -> None:
        backbone = pl_module.model
        names = [n for n, _ in backbone.named_parameters()]
        local = {n: _local_numel(p) for n, p in backbone.named_parameters()}
        log = {"steps": self.steps, "names": names, "local_numel": local, "block_names": self.lisa.block_names}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(log))


class Variant(Module):
    def __init__(self, variant: str) -> None:
        super().__init__(per_step=1)
        self.variant = variant

    def configure_model(self) -> None:
        if self.variant == "unsharded":
            return
        if self.variant == "noreshard" and not lightning_peft.distributed.is_sharded(self.model):
            lightning_peft.shard(self.model, self.device_mesh, reshard_after_forward=False)
        if self.variant == "bf16" and not lightning_peft.distributed.is_sharded(self.model):
            lightning_peft.shard(self.model, self.device_mesh, param_dtype="bfloat16", reduce_dtype="float32")
        super().configure_model()


def fit(out: Path, init_args: dict, variant: str, epochs: int = EPOCHS, ckpt: str | None = None):
    lisa = lightning_peft.LISA(**init_args)
    trainer = quiet_trainer(
        callbacks=[lisa, Probe(out, lisa)],
        max_epochs=epochs,
        limit_val_batches=0,
        use_distributed_sampler=False,
        strategy=ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=variant != "fullckpt"
        ),
        devices=2,
    )
    module = Variant(variant)
    if variant == "unequal" and int(os.environ.get("LOCAL_RANK", "0")) == 1:
        with torch.no_grad():
            next(module.model.parameters()).add_(1e-3)
    trainer.fit(module, ckpt_path=ckpt)
    return trainer


def main() -> None:
    out, init_args = Path(sys.argv[1]), json.loads(sys.argv[2])
    variant = sys.argv[3] if len(sys.argv) > 3 else ""
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        if variant == "fullckpt":
            first = fit(out, init_args, variant, epochs=1)
            first.save_checkpoint(out / "full.ckpt")
            fit(out, init_args, variant, ckpt=str(out / "full.ckpt"))
        else:
            fit(out, init_args, variant)
    except Exception as err:  # the refusals: recorded for the test
        if variant not in ("unsharded", "unequal", "fullckpt"):
            raise
        (out / f"rank{rank}.json").write_text(json.dumps({"error": f"{type(err).__name__}: {err}"}))
    end_ranks()


if __name__ == "__main__":
    main()
