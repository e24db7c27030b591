"""The one door to other ranks: every cross-rank decision of lightning-peft goes through here.

Callbacks and method cores never call ``torch.distributed`` themselves. They either make a choice
from identical inputs on every rank (a generator from :func:`seeded_generator`, seeded by
``(seed, step)``; no global RNG is touched), or make it on rank 0 and :func:`broadcast_object` /
:func:`broadcast_tensor` it, or combine per-rank values with :func:`all_reduce`. Without an
initialised process group every function is the single-process identity, so the same code runs
on one process, under DDP, and under FSDP2 (``ModelParallelStrategy``).

Why one file of about 500 lines: it is the one module allowed to name ``torch.distributed`` (a check flags any
other file that does), and everything left here does: the process group queries, the collectives and their
coalesced buckets, :class:`GradientReducer` (the asynchronous bucketed all-reduce of gradients),
:func:`load_optimizer_state` (``torch.distributed.checkpoint``) and the FSDP2 helpers (``DTensor``,
``fully_shard``). A package ``distributed/`` would break that rule's simple form. What does not talk to other ranks
lives elsewhere: :func:`seeded_generator` and :func:`stable_seed` are :mod:`lightning_peft.seeding` (re-exported
here).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

from lightning_peft.seeding import seeded_generator, stable_seed

__all__ = [
    "GradientReducer",
    "all_reduce",
    "all_reduce_coalesced",
    "barrier",
    "broadcast_coalesced",
    "broadcast_object",
    "broadcast_tensor",
    "full_tensor",
    "get_rank",
    "get_world_size",
    "is_distributed",
    "is_dtensor",
    "is_sharded",
    "load_optimizer_state",
    "mark_replicated",
    "rank_zero_only",
    "reduce_replicated_grads",
    "replicated_params",
    "shard",
    "seeded_generator",
    "shutdown",
    "stable_seed",
    "unwrapped_class",
]

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank_zero_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Run ``fn`` on global rank 0 only (file writes, uploads, prints); other ranks get None."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> T | None:
        return fn(*args, **kwargs) if get_rank() == 0 else None

    return wrapped


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Destroy the process groups a finished multi-process run left behind (no-op on one process).

    torch asks every program to call ``destroy_process_group`` before it exits; without it, gloo's worker
    threads can still be alive while the interpreter finalises and abort the process (``terminate called
    without an active exception``), so a fit that succeeded exits non-zero. Call it only after the run
    succeeded: after an error, another rank may still wait in a collective and destroying would hang.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _backend_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (any picklable object; for small decisions, not weights)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensor(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s values; returns it."""
    if not is_distributed():
        return tensor
    device = _backend_device()
    buf = tensor if tensor.device == device else tensor.to(device)
    dist.broadcast(buf, src=src)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def all_reduce(tensor: torch.Tensor, op: Literal["sum", "mean", "max", "min"] = "sum") -> torch.Tensor:
    """Combine ``tensor`` across ranks in place (``mean`` divides the sum by the world size); returns it."""
    if op not in ("sum", "mean", "max", "min"):
        raise ValueError(f"op must be one of 'sum', 'mean', 'max', 'min', got {op!r}")
    if not is_distributed():
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    device = _backend_device()
    buf = tensor if tensor.device == device else tensor.to(device)
    dist.all_reduce(buf, op=ops[op])
    if op == "mean":
        buf.div_(get_world_size())
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive groups of one dtype and device, each at most ``bucket_bytes`` (a bigger tensor goes alone)."""
    groups: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        last = groups[-1] if groups else None
        if last is None or last[0].dtype != t.dtype or last[0].device != t.device or size + nbytes > bucket_bytes:
            groups.append([t])
            size = nbytes
        else:
            last.append(t)
            size += nbytes
    return groups


def _coalesced(tensors: list[torch.Tensor], collective: Callable[[torch.Tensor], Any], bucket_bytes: int) -> None:
    """Run an in-place ``collective`` on flat buckets packed from ``tensors``, then unpack into them."""
    for bucket in _buckets(tensors, bucket_bytes):
        if len(bucket) == 1:
            collective(bucket[0])
            continue
        flat = torch.cat([t.reshape(-1) for t in bucket])
        collective(flat)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        del flat  # free this bucket before the next one is packed: one bucket alive at a time


def all_reduce_coalesced(
    tensors: list[torch.Tensor], op: Literal["sum", "mean"] = "mean", bucket_bytes: int = 32 << 20
) -> None:
    """All-reduce many tensors in place with few collectives: packed into flat buckets of ``bucket_bytes``.

    Every rank must pass tensors of the same shapes and dtypes in the same order. The temporary
    memory is one bucket, not the sum of the tensors.
    """
    if is_distributed() and tensors:
        _coalesced(tensors, lambda t: all_reduce(t, op), bucket_bytes)


def broadcast_coalesced(tensors: list[torch.Tensor], src: int = 0, bucket_bytes: int = 32 << 20) -> None:
    """Overwrite many tensors in place with rank ``src``'s values, packed into flat buckets."""
    if is_distributed() and tensors:
        _coalesced(tensors, lambda t: broadcast_tensor(t, src), bucket_bytes)


class GradientReducer:
    """Asynchronous mean all-reduce of many parameters' gradients, in flat buckets launched in a fixed order.

    The parameters are packed, in the order given, into buckets of one dtype and device of at most
    ``bucket_bytes`` (as :func:`all_reduce_coalesced` does). Every rank must build its reducer from the same
    parameters in the same order: bucket ``i`` is then the same tensors everywhere, and since the buckets are
    launched in order only (bucket ``i`` after buckets ``< i``), the collectives match across ranks whichever
    rank's gradients arrive first.

    One reduction: :meth:`start`, then :meth:`ready` for each parameter whose gradient is complete (from a
    ``register_post_accumulate_grad_hook`` hook: a bucket is launched as soon as it and every bucket before it
    are complete, while the backward goes on), then :meth:`finish`, which launches the buckets not launched yet,
    waits for all of them and writes the means back into ``param.grad``. A gradient missing on this rank
    (the parameter was unused in its forward) counts as zeros; one missing on every rank stays ``None`` (one
    small all-reduce of a presence vector tells). The gradients are copied into the buckets when a bucket is
    launched, so ``param.grad`` holds this rank's own gradient until :meth:`finish` overwrites it.

    Every rank gets the same bytes: the sum is all-reduced and each rank divides it by the world size.
    Without a process group of several ranks nothing is sent and the gradients stay as they are.

    Args:
        params: the parameters whose gradients are reduced, in the same order on every rank.
        bucket_bytes: the largest bucket (a bigger tensor goes alone).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> reducer = GradientReducer([w], bucket_bytes=1 << 20)
        >>> reducer.start()
        >>> w.grad = torch.full((3,), 2.0)
        >>> reducer.ready(w), reducer.complete
        (1, True)
        >>> reducer.finish()
        0
        >>> w.grad.tolist()
        [2.0, 2.0, 2.0]
    """

    def __init__(self, params: list[torch.nn.Parameter], bucket_bytes: int) -> None:
        self.params = list(params)
        self.buckets: list[list[torch.nn.Parameter]] = _buckets(self.params, bucket_bytes)  # type: ignore[arg-type,assignment]
        self._bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self.active = False
        self._missing: list[int] = []
        self._flats: list[tuple[torch.Tensor, Any]] = []

    def start(self) -> None:
        """Begin a reduction: no bucket is launched and no gradient is counted as ready yet."""
        self._missing = [len(bucket) for bucket in self.buckets]
        self._flats = []
        self.active = True

    @property
    def complete(self) -> bool:
        """Whether every bucket of this reduction has been launched."""
        return len(self._flats) == len(self.buckets)

    def ready(self, param: torch.nn.Parameter) -> int:
        """``param``'s gradient is complete: launch its bucket, and those after it, once they and all before are.

        Returns the number of buckets launched now (0 for a parameter the reducer does not hold).

        Raises:
            RuntimeError: ``param``'s bucket was already sent, or the reduction has finished (its gradient changed
                after it was complete, e.g. a second backward in one reduction).
        """
        index = self._bucket_of.get(id(param))
        if index is None:
            return 0
        if not self.active or index < len(self._flats):
            raise RuntimeError(
                "a gradient was accumulated again after its bucket was all-reduced (two backward passes in one "
                "optimizer step?): reduce synchronously instead (SelectiveDDPStrategy(overlap=False))"
            )
        self._missing[index] -= 1
        launched = 0
        while not self.complete and self._missing[len(self._flats)] <= 0:
            self._launch()
            launched += 1
        return launched

    def finish(self) -> int:
        """Launch the buckets not launched yet, wait for all, and write the means into ``param.grad``.

        Returns the number of buckets launched now; nothing happens (0) when the reduction is not active.
        """
        if not self.active:
            return 0
        self.active = False
        launched = len(self.buckets) - len(self._flats)
        if not is_distributed():
            self._flats = []
            return launched
        while not self.complete:
            self._launch()
        present = torch.tensor([p.grad is not None for p in self.params], dtype=torch.float32)
        all_reduce(present, "sum")
        anywhere = dict(zip(map(id, self.params), present.tolist(), strict=True))
        world = get_world_size()
        for bucket, (flat, work) in zip(self.buckets, self._flats, strict=True):
            work.wait()
            flat.div_(world)
            offset = 0
            for p in bucket:
                mean = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                if not anywhere[id(p)]:
                    p.grad = None
                elif p.grad is None:
                    p.grad = mean.to(p.device, copy=True)
                else:
                    p.grad.copy_(mean)
        self._flats = []
        return launched

    def _launch(self) -> None:
        """Pack the next bucket (zeros for a missing gradient) and start its all-reduce (sum) without waiting."""
        bucket = self.buckets[len(self._flats)]
        if not is_distributed():
            self._flats.append((torch.empty(0), None))
            return
        device = _backend_device()
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket]
        flat = torch.cat(parts).to(device)
        self._flats.append((flat, dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)))


def load_optimizer_state(
    path: Any, key: str, optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter]
) -> list[str]:
    """Read the optimizer state of just ``params`` from a distributed checkpoint folder into ``optimizer.state``.

    ``ModelParallelStrategy`` saves optimizer ``i`` under ``key="optimizer_<i>"``, each parameter's state as
    ``<key>.state.<name>.<state>`` (``name`` as in the LightningModule's ``named_parameters``). Only these entries
    are read (a ``DTensor`` parameter's state into a ``DTensor`` of the same sharding); a parameter the checkpoint
    holds no state for is left as it is. A collective: every rank calls it with the same names.

    Returns:
        The names whose state was loaded; ``[]`` when ``path`` is not a distributed checkpoint folder.
    """
    from pathlib import Path

    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not (Path(path) / ".metadata").is_file():
        return []
    entries = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    template: dict[str, torch.Tensor] = {}
    where: dict[str, tuple[torch.nn.Parameter, str]] = {}
    for name, param in params.items():
        prefix = f"{key}.state.{name}."
        for entry, meta in entries.items():
            state_name = entry[len(prefix) :]
            if not entry.startswith(prefix) or "." in state_name or not isinstance(meta, TensorStorageMetadata):
                continue
            dtype = meta.properties.dtype
            if tuple(meta.size) == tuple(param.shape) and param.dim() > 0:  # exp_avg & co.: sharded like the param
                template[entry] = torch.zeros_like(param, dtype=dtype)
            else:  # a step counter or another small plain tensor
                template[entry] = torch.zeros(tuple(meta.size), dtype=dtype)
            where[entry] = (param, state_name)
    if not template:
        return []
    load(template, checkpoint_id=str(path))
    loaded = set()
    for entry, tensor in template.items():
        param, state_name = where[entry]
        optimizer.state[param][state_name] = tensor
        loaded.add(entry[len(key) + len(".state.") :].rsplit(".", 1)[0])
    return sorted(loaded)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded ``DTensor`` (FSDP2) gathered into a plain full tensor; any other tensor as it is.

    Gathering is a collective: call it on every rank.
    """
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def unwrapped_class(module: torch.nn.Module) -> type:
    """The model's own class: FSDP2's ``fully_shard`` swaps in a generated ``FSDP<Name>`` subclass."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return type(module)
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


# ------------------------------------------------------------------------------------------------ FSDP2
#: attribute of a parameter that must stay whole on every rank under FSDP2 (set by :func:`mark_replicated`)
_REPLICATED = "_lightning_peft_replicated"
#: attribute of a module :func:`shard` sharded: the parameters it left whole, whose gradients we average
_KEPT_WHOLE = "_lightning_peft_kept_whole"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def mark_replicated(params: Any) -> None:
    """Ask :func:`shard` to keep these parameters whole (replicated) on every rank instead of sharding them.

    For small tensors a method must see whole on every rank (AdaLoRA's triplets, the sparse bank): they are left
    out of FSDP2 (its ``ignored_params``), and their gradients are averaged by :func:`reduce_replicated_grads`.
    """
    for param in params:
        setattr(param, _REPLICATED, True)


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a shard of a parameter FSDP2 manages)."""
    return hasattr(tensor, "full_tensor") and hasattr(tensor, "_local_tensor")


def shard(
    module: torch.nn.Module,
    mesh: Any = None,
    block_path: str | None = None,
    reshard_after_forward: bool = True,
    param_dtype: str | None = None,
    reduce_dtype: str | None = None,
) -> torch.nn.Module:
    """Shard ``module`` with FSDP2: ``fully_shard`` on each repeated block, then on ``module`` itself.

    Call it from ``configure_model`` under Lightning's ``ModelParallelStrategy`` (after the method callbacks
    injected their adapters in ``setup``)::

        def configure_model(self):
            lightning_peft.shard(self.model, self.device_mesh)

    The blocks are the backbone preset's (``block_path`` overrides, as for LISA). Parameters marked by
    :func:`mark_replicated` (AdaLoRA's adapters, the sparse methods' bank) are kept whole on every rank; the
    method callbacks average their gradients themselves. The ``lightning_peft.tasks`` modules call this for
    you whenever the strategy gives them a device mesh, so a recipe only names the strategy.

    Args:
        module: what to shard, usually the backbone (``self.model``).
        mesh: a 1-D ``DeviceMesh`` of the data-parallel ranks, or Lightning's ``self.device_mesh`` (its
            ``"data_parallel"`` dimension is used). None: FSDP2's default (all ranks).
        block_path: dotted path of the block list inside ``module``; default the preset's.
        reshard_after_forward: free the gathered weights after each block's forward (FSDP2's default, less
            memory) or keep them until the backward (fewer all-gathers).
        param_dtype: ``"bfloat16"``/``"float16"``/``"float32"``: compute dtype of the gathered weights
            (FSDP2's ``MixedPrecisionPolicy``); None keeps the parameters' dtype.
        reduce_dtype: dtype of the gradient reduce-scatter; None follows ``param_dtype``.

    Returns:
        ``module``, sharded in place.

    Raises:
        NotImplementedError: the mesh has a tensor-parallel dimension larger than 1, or this torch has no
            ``fully_shard`` with ``ignored_params`` (torch >= 2.7).
        ValueError: an unknown dtype name.
    """
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError as err:  # pragma: no cover - old torch
        raise NotImplementedError("lightning_peft.shard needs torch.distributed.fsdp.fully_shard (FSDP2)") from err
    from lightning_peft.backbones import find_blocks  # here: backbones sits above this module

    names = getattr(mesh, "mesh_dim_names", None) or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise NotImplementedError(
            "lightning-peft shards data-parallel only: use ModelParallelStrategy(tensor_parallel_size=1); tensor "
            "parallelism would split the adapters' and the sparse methods' tensors across ranks"
        )
    if "data_parallel" in names:
        mesh = mesh["data_parallel"]
    for name in (param_dtype, reduce_dtype):
        if name is not None and name not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or None, got {name!r}")
    policy = MixedPrecisionPolicy(
        param_dtype=_DTYPES[param_dtype] if param_dtype else None,
        reduce_dtype=_DTYPES[reduce_dtype] if reduce_dtype else None,
    )
    whole = [p for p in module.parameters() if getattr(p, _REPLICATED, False)]
    options: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward, "mp_policy": policy}
    if whole:
        options["ignored_params"] = set(whole)
    for block in find_blocks(module, block_path).modules:
        fully_shard(block, **options)
    fully_shard(module, **options)
    module.__dict__[_KEPT_WHOLE] = whole
    return module


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``fully_shard`` has been applied to ``module`` itself."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


def replicated_params(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters :func:`shard` kept whole somewhere inside ``module`` (empty if nothing was sharded)."""
    return [p for m in module.modules() for p in m.__dict__.get(_KEPT_WHOLE, ())]


def reduce_replicated_grads(module: torch.nn.Module) -> None:
    """Average the gradients of the parameters :func:`shard` kept whole, across ranks (FSDP2 leaves them alone).

    Call it once per optimizer step, after the backward and before anything reads those gradients
    (``on_before_optimizer_step``); nothing happens on one process or when nothing was kept whole.
    """
    grads = [p.grad for p in replicated_params(module) if p.grad is not None]
    all_reduce_coalesced(grads, "mean")
