"""``SelectiveDDPStrategy``: data-parallel training whose trainable set may change while it trains.

PyTorch's ``DistributedDataParallel`` decides *when it wraps the model* which parameters it
synchronises: those with ``requires_grad=True`` at that moment, and it expects a gradient for every
one of them at every step. LISA leaves every block trainable until the optimizer and the wrapper
exist, then freezes all but the sampled ones, so under plain DDP the step after the first raises
"parameters that were not used in producing the loss". The usual escape,
``find_unused_parameters=True``, trains correctly but keeps a gradient bucket for every block
(model-sized memory on every rank) and all-reduces the frozen blocks' buckets every step.

This strategy keeps Lightning's DDP machinery (process launch, process group, distributed samplers,
``reduce``/``broadcast``/``barrier``) but does not wrap the model. Instead, inside every optimizer
step, right after the backward closure and before ``on_before_optimizer_step`` hooks, gradient
clipping and the update, it all-reduces (mean) the gradients of exactly the parameters that require
grad *now*, packed into flat buckets (``bucket_cap_mb``). So

* whatever is trainable at this step is synchronised, whenever it became trainable;
* frozen parameters cost no gradient memory and no communication;
* with gradient accumulation gradients are reduced once per optimizer step (DDP reduces every
  micro-batch unless ``no_sync`` is used);
* the model starts identical on every rank: rank 0's parameters and buffers are broadcast when the
  strategy sets up (what DDP does when it wraps), and buffers again after every optimizer step when
  ``broadcast_buffers`` (DDP broadcasts them before every forward).

The price is that communication does not overlap the backward pass as DDP's bucketed hooks do; on
CPU and for the small trainable sets of PEFT methods it is a small share of a step (see
``benchmarks/lisa_memory.py``). Any lightning-peft method runs under it; LISA requires it for
multi-process training.

Use ``Trainer(strategy=SelectiveDDPStrategy(), devices=2)`` or ``strategy="ddp_selective"`` (the
name is registered when ``lightning_peft.callbacks`` or this module is imported).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_peft import distributed

__all__ = ["SelectiveDDPStrategy", "check_dynamic_strategy"]

_DEFAULT_TIMEOUT = timedelta(minutes=30)


class SelectiveDDPStrategy(DDPStrategy):
    """Multi-process data parallelism that synchronises whatever requires grad at each optimizer step.

    Args:
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin,
        process_group_backend, timeout, start_method: as for Lightning's ``DDPStrategy``.
        broadcast_buffers: broadcast rank 0's buffers after every optimizer step (BatchNorm statistics).
        bucket_cap_mb: size of the flat buffers gradients are packed into for the all-reduce.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(strategy=SelectiveDDPStrategy(), accelerator="cpu", devices=1, logger=False)
    """

    strategy_name = "ddp_selective"

    def __init__(
        self,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = _DEFAULT_TIMEOUT,
        start_method: str = "popen",
        broadcast_buffers: bool = True,
        bucket_cap_mb: float = 32.0,
    ) -> None:
        if bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,  # type: ignore[arg-type]
        )
        self.broadcast_buffers = broadcast_buffers
        self.bucket_bytes = int(bucket_cap_mb * (1 << 20))

    @override
    def configure_ddp(self) -> None:
        """Do not wrap the model; start every rank from rank 0's parameters and buffers instead."""
        assert isinstance(self.model, nn.Module)
        with torch.no_grad():
            tensors = [p.data for p in self.model.parameters()] + list(self.model.buffers())
            distributed.broadcast_coalesced(tensors, src=0, bucket_bytes=self.bucket_bytes)

    def reduce_gradients(self, optimizer: Optimizer) -> int:
        """Average the gradients of the optimizer's parameters that require grad now, across ranks.

        A parameter whose gradient is missing on some ranks (unused in their forward) takes zeros
        there; one missing on every rank stays ``None``. Returns the number of gradients reduced.
        """
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        if not params or not distributed.is_distributed():
            return 0
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
        distributed.all_reduce(present, "sum")
        grads = []
        for p, anywhere in zip(params, present.tolist(), strict=True):
            if not anywhere:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        distributed.all_reduce_coalesced(grads, "mean", self.bucket_bytes)
        return len(grads)

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        def closure_then_reduce() -> Any:
            result = closure()
            self.reduce_gradients(optimizer)
            return result

        output = super().optimizer_step(optimizer, closure_then_reduce, model, **kwargs)
        if self.broadcast_buffers and self.model is not None:
            distributed.broadcast_coalesced(_unsynced_buffers(self.model), src=0, bucket_bytes=self.bucket_bytes)
        return output


def _unsynced_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Buffers that may differ across ranks: all but those of modules that declare ``buffers_in_sync``.

    A module sets ``buffers_in_sync = True`` when its buffers are identical on every rank by construction
    (the sparse delta layers' index bookkeeping, decided from averaged gradients): broadcasting them every
    step would cost O(trained entries) for nothing.
    """
    return [b for m in model.modules() if not getattr(m, "buffers_in_sync", False) for b in m.buffers(recurse=False)]


def check_dynamic_strategy(
    strategy: object, who: str, trainable_changes: bool = False, sharded_ok: bool = False
) -> None:
    """Refuse, before training, the strategies a method that changes what trains is not run under.

    One device and :class:`SelectiveDDPStrategy` are fine. What plain DDP does depends on the method
    (measured with 2 CPU processes, the refusal bypassed):

    * ``trainable_changes=True`` (LISA: blocks are frozen and unfrozen after DDP wrapped the model): DDP
      registered every block at wrap time; once some are frozen it raises "parameters that were not used
      in producing the loss" at the step after the first. With ``find_unused_parameters=True`` it trains
      correctly, but keeps a gradient bucket for every block on every rank and all-reduces the frozen
      blocks' buckets too.
    * ``trainable_changes=False`` (ID3, SaRA: one fixed-size bank of trained values, registered when DDP
      wraps the model): plain DDP trains correctly (the same weights as ``ddp_selective``), but broadcasts
      every buffer from rank 0 before each forward, the sparse layers' index bookkeeping included, which is
      identical on every rank by construction and which ``ddp_selective`` does not send. The refusal keeps
      these methods on the strategy their multi-process tests cover.

    Sharded strategies partition the tensors the methods index, freeze or release.

    Args:
        strategy: the trainer's strategy.
        who: the method's name, for the message.
        trainable_changes: whether the method changes which parameters require grad during training.
        sharded_ok: the method supports FSDP2 (Lightning's ``ModelParallelStrategy`` with data parallelism only;
            :func:`lightning_peft.shard` refuses tensor parallelism).

    Raises:
        NotImplementedError: naming what happens and the strategy to use instead.
    """
    from lightning.pytorch.strategies import SingleDeviceStrategy

    if isinstance(strategy, SelectiveDDPStrategy | SingleDeviceStrategy):
        return
    if sharded_ok and type(strategy).__name__ == "ModelParallelStrategy":
        return
    use = "Use strategy='ddp_selective' (lightning_peft.strategies.SelectiveDDPStrategy): it all-reduces exactly "
    if isinstance(strategy, DDPStrategy) and trainable_changes:
        raise NotImplementedError(
            f"{who} under strategy='ddp' fails: DDP registers the parameters that require grad when it wraps the "
            f"model (every block, so the optimizer holds them all), and once {who} freezes some of them DDP raises "
            "'parameters that were not used in producing the loss' after the first step. With "
            "find_unused_parameters=True it trains correctly but keeps a gradient bucket for every block on every "
            "rank and all-reduces the frozen ones too. "
            + use
            + "the gradients that are trainable at each step and nothing for frozen blocks."
        )
    if isinstance(strategy, DDPStrategy):
        raise NotImplementedError(
            f"{who} under strategy='ddp' is not supported: {who}'s multi-process tests run strategy='ddp_selective'. "
            "(Plain DDP would train the same values but broadcast every sparse layer's index buffers from rank 0 "
            "before each forward, although they are identical on every rank.) "
            + use
            + "the trained values' gradients and does not broadcast those buffers."
        )
    raise NotImplementedError(
        f"{who} does not support {type(strategy).__name__} yet (sharded strategies such as FSDP2's "
        "ModelParallelStrategy, FSDP and DeepSpeed partition the tensors this method freezes, selects or "
        "releases). Use one device, or strategy='ddp_selective' for several."
    )


if SelectiveDDPStrategy.strategy_name not in StrategyRegistry:
    StrategyRegistry.register(
        SelectiveDDPStrategy.strategy_name,
        SelectiveDDPStrategy,
        description="DDP without a wrapper: reduces the gradients of whatever requires grad at each optimizer step",
    )
