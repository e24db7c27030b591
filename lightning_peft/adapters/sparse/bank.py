"""``SparseDeltaBank``: the one flat trainable tensor of fixed size that holds every active sparse delta."""

from __future__ import annotations

import torch
from torch import nn

from lightning_peft.adapters.sparse.shards import _sample


class SparseDeltaBank(nn.Module):
    """One flat trainable tensor of fixed size holding every active sparse delta, and its free-slot bookkeeping.

    Args:
        capacity: number of slots (the largest number of entries trained at once), ``> 0``.
        dtype: floating dtype of ``values`` (float32 by default, whatever the weights' dtype).
        device: where ``values`` lives (the weights' device).

    Raises:
        ValueError: ``capacity`` is not a positive integer or ``dtype`` is not floating.

    Example:
        >>> bank = SparseDeltaBank(4)
        >>> bank.allocate(3)
        tensor([0, 1, 2])
        >>> bank.release(torch.tensor([1]))
        >>> bank.allocate(2), bank.used
        (tensor([1, 3]), 4)
    """

    in_use: torch.Tensor

    def __init__(
        self, capacity: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"the sparse budget (capacity) must be a positive integer, got {capacity!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"the sparse bank holds trainable values and needs a floating dtype, got {dtype}")
        self.capacity = capacity
        self.values = nn.Parameter(torch.zeros(capacity, dtype=dtype, device=device))
        self.register_buffer("in_use", torch.zeros(capacity, dtype=torch.bool, device=device))
        self._used = 0  # mirrors in_use.sum(), kept on the host
        self._low = 0  # every slot below it is in use

    @property
    def used(self) -> int:
        """Number of slots in use."""
        return self._used

    @property
    def free(self) -> int:
        """Number of free slots."""
        return self.capacity - self._used

    @torch.no_grad()
    def allocate(self, n: int) -> torch.Tensor:
        """Take the ``n`` lowest free slots; their values are zero.

        Raises:
            ValueError: fewer than ``n`` slots are free.
        """
        device = self.in_use.device
        if n <= 0:
            return torch.empty(0, dtype=torch.long, device=device)
        if n > self.free:
            raise ValueError(
                f"the sparse budget (capacity {self.capacity}) is full: {self._used} slots are in use and {n} more "
                "were asked for; retire entries first or inject with a larger capacity"
            )
        block = self.in_use[self._low : self._low + n]
        if block.numel() == n and not bool(block.any()):  # the common case: the free slots are a tail
            slots = torch.arange(self._low, self._low + n, device=device)
        else:
            slots = (~self.in_use[self._low :]).nonzero().squeeze(1)[:n] + self._low
        self.in_use[slots] = True
        self.values.index_fill_(0, slots, 0.0)
        self._used += n
        self._low = int(slots[-1]) + 1
        return slots

    @torch.no_grad()
    def release(self, slots: torch.Tensor) -> None:
        """Zero the values at ``slots`` and mark them free.

        Reset the optimizer's state at these slots too (:func:`reset_optimizer_slots`).

        Raises:
            ValueError: a slot is out of range, repeated, or not in use.
        """
        slots = torch.as_tensor(slots, dtype=torch.long, device=self.in_use.device).reshape(-1)
        if slots.numel() == 0:
            return
        if int(slots.min()) < 0 or int(slots.max()) >= self.capacity:
            raise ValueError(f"slots must be in [0, {self.capacity}), got {_sample(slots)}...")
        if slots.unique().numel() != slots.numel() or not bool(self.in_use[slots].all()):
            raise ValueError("release() got a slot twice or a slot that is not in use")
        self.values.index_fill_(0, slots, 0.0)
        self.in_use[slots] = False
        self._used -= slots.numel()
        self._low = min(self._low, int(slots.min()))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        self._used = int(self.in_use.sum())
        free = (~self.in_use).nonzero()
        self._low = int(free[0]) if free.numel() else self.capacity

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, used={self._used}, dtype={self.values.dtype}"
