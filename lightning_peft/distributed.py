"""The one door to other ranks: every cross-rank decision of lightning-peft goes through here.

Callbacks and method cores never call ``torch.distributed`` themselves. They either make a choice
from identical inputs on every rank (a generator from :func:`seeded_generator`, seeded by
``(seed, step)``; no global RNG is touched), or make it on rank 0 and :func:`broadcast_object` /
:func:`broadcast_tensor` it, or combine per-rank values with :func:`all_reduce`. Without an
initialised process group every function is the single-process identity, so the same code runs
on one process, under DDP, and under FSDP2 (``ModelParallelStrategy``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

__all__ = [
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
    "rank_zero_only",
    "seeded_generator",
    "stable_seed",
    "unwrapped_class",
]

T = TypeVar("T")
_MASK64 = (1 << 64) - 1


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


def stable_seed(seed: int, step: int) -> int:
    """A 63-bit seed mixed from ``(seed, step)`` with splitmix64: the same on every rank, machine and run."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def seeded_generator(seed: int, step: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` seeded from ``(seed, step)``, for random choices all ranks must agree on.

    Every rank that asks for the same ``(seed, step)`` draws the same numbers, with no communication,
    and a resumed run draws what the uninterrupted run would have drawn. The global RNG is untouched.

    Example:
        >>> a = torch.randperm(10, generator=seeded_generator(0, 5))
        >>> b = torch.randperm(10, generator=seeded_generator(0, 5))
        >>> bool((a == b).all())
        True
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(stable_seed(seed, step))
    return gen
