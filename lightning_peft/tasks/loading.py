"""Data loaders that resume mid-epoch exactly: a seeded shuffle per epoch and a loader that remembers its place.

Lightning resumes a run in the middle of an epoch by restoring the loops' counters; the data is up to the
loader. A loader with ``state_dict`` / ``load_state_dict`` is given its saved state back before the first batch
after the resume (Lightning's ``_Stateful`` protocol, checked in ``FitLoop``); any other loader starts the epoch
again from its first batch, so a run resumed mid-epoch trains on the epoch's first batches twice and never sees
its last ones. And a plain ``DataLoader(shuffle=True)`` draws each epoch's order from the global RNG, which a
checkpoint does not hold: even the order differs after a resume.

:class:`ResumableDataLoader` fixes both: its order for epoch ``e`` is a permutation seeded by ``(seed, e)`` (the
same in every run, on every rank), it counts the batches it has delivered in the current epoch, and after
``load_state_dict`` its next epoch pass skips that many batches *by index* (no sample is loaded for a skipped
batch). Under DDP Lightning swaps in a ``DistributedSampler`` (seeded by epoch too) and rebuilds the batch
sampler from its class, so the skip still applies. The project's data modules use it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from lightning_peft.distributed import seeded_generator

__all__ = ["ResumableDataLoader", "SeededShuffleSampler", "SkippingBatchSampler"]


class SeededShuffleSampler(RandomSampler):
    """A new permutation every epoch, drawn from a generator seeded by ``(seed, epoch)``; the global RNG is untouched.

    A ``RandomSampler`` (so Lightning knows the loader shuffles and gives it a shuffling ``DistributedSampler`` under
    DDP). Lightning calls :meth:`set_epoch` at the start of each epoch.

    Example:
        >>> s = SeededShuffleSampler(range(5), seed=1)
        >>> first = list(s); s.set_epoch(1); second = list(s); s.set_epoch(0)
        >>> list(s) == first != second and sorted(second) == [0, 1, 2, 3, 4]
        True
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(len(self.data_source), generator=seeded_generator(self.seed, self.epoch)).tolist()


class SkippingBatchSampler(BatchSampler):
    """A ``BatchSampler`` whose next pass can start ``skip`` batches in (set by :class:`ResumableDataLoader`)."""

    def __init__(self, sampler: Sampler[int] | list[int], batch_size: int, drop_last: bool) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                yield batch


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that resumes mid-epoch where it stopped, with a seeded shuffle (see the module docstring).

    Args:
        dataset: any map-style dataset.
        batch_size: samples per batch.
        shuffle: a new seeded permutation every epoch (:class:`SeededShuffleSampler`); else in order.
        seed: seed of the permutations.
        drop_last: drop the last incomplete batch.
        **kwargs: other ``DataLoader`` arguments (``num_workers``, ``collate_fn``, ``pin_memory`` ...).

    Example:
        >>> loader = ResumableDataLoader(list(range(10)), batch_size=2)
        >>> it = iter(loader); _ = next(it); _ = next(it)
        >>> state = loader.state_dict()
        >>> again = ResumableDataLoader(list(range(10)), batch_size=2)
        >>> again.load_state_dict(state)
        >>> [b.tolist() for b in again]
        [[4, 5], [6, 7], [8, 9]]
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        sampler: Sampler | None = None,
        batch_sampler: Sampler | None = None,
        **kwargs: Any,
    ) -> None:
        if batch_sampler is None:  # built here; Lightning passes its own when it re-creates the loader under DDP
            if sampler is None:
                sampler = SeededShuffleSampler(dataset, seed) if shuffle else SequentialSampler(dataset)  # type: ignore[arg-type]
            batch_sampler = SkippingBatchSampler(sampler, batch_size, drop_last)
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self.seed = seed
        self.delivered = 0  # batches of the current epoch pass handed out (skipped ones included)
        self._resume_at = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skip, self._resume_at = self._resume_at, 0
        by_index = isinstance(self.batch_sampler, SkippingBatchSampler)
        if by_index:
            self.batch_sampler.skip = skip  # type: ignore[union-attr]
        iterator = super().__iter__()
        if not by_index:  # a batch sampler of the user's, which cannot skip: load and drop the batches
            for _ in range(skip):
                next(iterator)
        self.delivered = skip
        for batch in iterator:
            self.delivered += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The place in the current epoch: batches delivered so far."""
        return {"delivered": self.delivered, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next pass start after the ``delivered`` batches of the saved state (Lightning calls this once
        on a mid-epoch resume, before the epoch's first batch)."""
        delivered = int(state.get("delivered", 0))
        self._resume_at = delivered if delivered < len(self) else 0  # saved at an epoch's end: the next starts afresh
