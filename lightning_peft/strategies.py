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
step it all-reduces (mean) the gradients of exactly the parameters that require grad *now*, packed
into flat buckets (``bucket_cap_mb``), before ``on_before_optimizer_step`` hooks, gradient clipping
and the update. So

* whatever is trainable at this step is synchronised, whenever it became trainable;
* frozen parameters cost no gradient memory and no communication;
* with gradient accumulation gradients are reduced once per optimizer step, on the micro-batch that
  ends the accumulation (DDP reduces every micro-batch unless ``no_sync`` is used);
* the model starts identical on every rank: rank 0's parameters and buffers are broadcast when the
  strategy sets up (what DDP does when it wraps), and buffers again after every optimizer step when
  ``broadcast_buffers`` (DDP broadcasts them before every forward).

With ``overlap=True`` (the default) communication overlaps the backward pass, as DDP's does: a
``register_post_accumulate_grad_hook`` hook on each trainable parameter counts its gradient as
complete, and each bucket's asynchronous all-reduce is launched as soon as it and every bucket before
it are complete (buckets in reverse parameter order, the same on every rank, launched in that order
only, so the collectives match across ranks). When every bucket was sent, the backward's final
autograd callback (as DDP's) waits for the results and writes the means back, so ``on_after_backward``
sees them; when some gradient is missing on this rank (an unused parameter) that happens right after
the backward closure instead: the buckets not sent yet go with zeros for the missing gradients, and a
gradient missing on every rank stays ``None``. The buckets are rebuilt whenever the set of trainable
parameters changes (LISA's switches). The hooks do nothing outside the backward of the micro-batch
that ends an accumulation; manual optimization reduces synchronously after the backward, as
``overlap=False`` always does. A parameter whose gradient is accumulated twice in one backward
(shared across a reentrant activation-checkpointing boundary) is an error under ``overlap=True``,
as under DDP.

Any lightning-peft method runs under it; LISA requires it for multi-process training.

Use ``Trainer(strategy=SelectiveDDPStrategy(), devices=2)`` or ``strategy="ddp_selective"`` (the
name is registered when ``lightning_peft.callbacks`` or this module is imported).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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

__all__ = [
    "SelectiveDDPStrategy",
    "check_data_parallel_only",
    "check_dynamic_strategy",
    "check_same_base_on_every_rank",
    "check_sharded",
    "is_model_parallel",
]

_DEFAULT_TIMEOUT = timedelta(minutes=30)


class SelectiveDDPStrategy(DDPStrategy):
    """Multi-process data parallelism that synchronises whatever requires grad at each optimizer step.

    Args:
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin,
        process_group_backend, timeout, start_method: as for Lightning's ``DDPStrategy``.
        broadcast_buffers: broadcast rank 0's buffers after every optimizer step (BatchNorm statistics).
        bucket_cap_mb: size of the flat buffers gradients are packed into for the all-reduce.
        overlap: all-reduce each bucket while the backward goes on (asynchronously, from gradient hooks); the
            buckets in flight hold a flat copy of the trainable gradients until the backward ends (as DDP's
            buckets do). ``False`` reduces after the backward, synchronously, one bucket alive at a time.

    Raises:
        ValueError: ``bucket_cap_mb`` is not a finite number > 0, or ``overlap`` is not a bool.

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
        overlap: bool = True,
    ) -> None:
        if not _is_real(bucket_cap_mb) or not math.isfinite(bucket_cap_mb) or bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb must be a finite number > 0, got {bucket_cap_mb!r}")
        if not isinstance(overlap, bool):
            raise ValueError(f"overlap must be True or False, got {overlap!r}")
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
        self.overlap = overlap
        #: the overlapped reduction of the current trainable set, its signature and its gradient hooks
        self.reducer: distributed.GradientReducer | None = None
        self._signature: tuple[int, ...] = ()
        self._hooks: list[Any] = []
        self._armed = False  # inside the closure of an overlapped optimizer step
        self._queued = False  # the backward's final callback will finish the reduction
        #: what the reductions did so far: buckets launched from the gradient hooks while the backward ran
        #: (``"in_backward"``) and after it (``"after_backward"``), reductions finished by the backward's final
        #: callback (``"finished_in_backward"``) and synchronous reductions (``"synchronous"``: ``overlap=False``,
        #: manual optimization, parameters that became trainable during the step)
        counts = ("in_backward", "after_backward", "finished_in_backward", "synchronous")
        self.reduction_counts = dict.fromkeys(counts, 0)

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
        return self._reduce_params(_trainable(optimizer))

    def _reduce_params(self, params: list[nn.Parameter]) -> int:
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
        overlapped = (
            self.overlap
            and distributed.is_distributed()
            and getattr(self.lightning_module, "automatic_optimization", False)
        )

        def closure_then_reduce() -> Any:
            result = closure()
            self.reduction_counts["synchronous"] += 1
            self.reduce_gradients(optimizer)
            return result

        def closure_overlapping_reduce() -> Any:
            # Lightning runs the backward of the micro-batch that ends an accumulation inside this closure, and
            # those of the others outside any optimizer step: the hooks are armed for this backward only
            params = _trainable(optimizer)
            reducer = self._arm(params)
            try:
                result = closure()
            finally:
                self._armed = False
                self.reduction_counts["after_backward"] += reducer.finish()  # 0 if the backward finished it
            armed = set(map(id, params))
            late = [p for p in _trainable(optimizer) if id(p) not in armed]
            if late:  # became trainable during the step (the same on every rank): not in any bucket
                self.reduction_counts["synchronous"] += 1
                self._reduce_params(late)
            return result

        step_closure = closure_overlapping_reduce if overlapped else closure_then_reduce
        output = super().optimizer_step(optimizer, step_closure, model, **kwargs)
        if self.broadcast_buffers and self.model is not None:
            distributed.broadcast_coalesced(_unsynced_buffers(self.model), src=0, bucket_bytes=self.bucket_bytes)
        return output

    def _arm(self, params: list[nn.Parameter]) -> distributed.GradientReducer:
        """The reducer of ``params``, started; rebuilt with new hooks when the trainable set changed."""
        signature = tuple(map(id, params))
        if self.reducer is None or signature != self._signature:
            self._remove_hooks()
            self.reducer = distributed.GradientReducer(params[::-1], self.bucket_bytes)  # backward order, like DDP
            self._signature = signature
            self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in params]
        self.reducer.start()
        self._armed, self._queued = True, False
        return self.reducer

    def _grad_ready(self, param: torch.Tensor) -> None:
        reducer = self.reducer
        if reducer is None or not self._armed:
            return  # a backward outside an optimizer step's closure: accumulating, validation, manual
        self.reduction_counts["in_backward"] += reducer.ready(param)  # type: ignore[arg-type]
        if not self._queued:  # look again when this backward is done
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)  # type: ignore[attr-defined]

    def _backward_done(self) -> None:
        """The backward's final callback: finish, so ``on_after_backward`` sees the means, if every bucket is sent.

        Otherwise some gradient is still missing on this rank: an unused parameter (the closure finishes after the
        backward) or a nested backward (reentrant activation checkpointing) that ends before the outer one, whose
        next hook queues this callback again.
        """
        self._queued = False
        if self.reducer is not None and self.reducer.active and self.reducer.complete:
            self.reducer.finish()
            self.reduction_counts["finished_in_backward"] += 1

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks, self.reducer, self._signature = [], None, ()

    @override
    def teardown(self) -> None:
        self._remove_hooks()
        super().teardown()


def _trainable(optimizer: Optimizer) -> list[nn.Parameter]:
    """The optimizer's parameters that require grad now, in its order (the same on every rank)."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


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


# ----------------------------------------------------------------------------- FSDP2 preconditions
def is_model_parallel(strategy: object) -> bool:
    """Whether ``strategy`` is Lightning's ``ModelParallelStrategy`` (FSDP2), by name (no import of it needed)."""
    return type(strategy).__name__ == "ModelParallelStrategy"


def check_data_parallel_only(strategy: object, who: str) -> None:
    """Refuse ``ModelParallelStrategy`` with tensor parallelism (``lightning_peft.shard`` shards data-parallel only)."""
    size = getattr(strategy, "_tensor_parallel_size", 1)
    if is_model_parallel(strategy) and isinstance(size, int) and size > 1:
        raise NotImplementedError(
            f"{who} under ModelParallelStrategy runs data-parallel FSDP2 only, got tensor_parallel_size={size}: "
            "tensor parallelism splits every block across ranks along other dimensions than FSDP2's, and "
            "lightning_peft.shard refuses it. Use ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)."
        )


def check_same_base_on_every_rank(base: dict[str, Any], who: str) -> None:
    """FSDP2 shards each rank's own copy (no broadcast, unlike DDP): the ranks must start from the same weights."""
    if not distributed.is_distributed():
        return
    same = torch.tensor([float(distributed.broadcast_object(base["sha256"]) == base["sha256"])])
    if distributed.all_reduce(same, "min").item() < 1:
        raise ValueError(
            f"{who} under ModelParallelStrategy: the ranks hold different base weights before sharding (their "
            "fingerprints differ). fully_shard keeps each rank's own slice of its own copy, so the sharded model "
            "would be a mix of them and the saved delta would not apply to any of them. Build or load the same "
            "weights on every rank (e.g. from_pretrained, or seed the initialisation)."
        )


def check_sharded(names: dict[int, str], params: Sequence[nn.Parameter], who: str) -> None:
    """Under several FSDP2 ranks every parameter the callback trains must be managed by FSDP2 (a ``DTensor``)."""
    if not distributed.is_distributed():
        return
    plain = [names.get(id(p), "?") for p in params if not distributed.is_dtensor(p)]
    if plain:
        raise ValueError(
            f"{who} under ModelParallelStrategy: {len(plain)} parameter(s) it trains are not sharded by FSDP2 (first: "
            f"{plain[0]}); nothing would average their gradients across ranks, so the ranks would drift apart. "
            "Call lightning_peft.shard(self.model, self.device_mesh) in configure_model (it shards every block, then "
            "the root), as the lightning_peft.tasks modules do."
        )
