"""ResumableDataLoader: seeded order per epoch, resumes mid-epoch (also twice), epoch ends, DDP's sampler swap."""

from __future__ import annotations

import itertools

import torch
from torch.utils.data import BatchSampler, DistributedSampler, SequentialSampler

from lightning_peft.tasks.loading import ResumableDataLoader, SeededShuffleSampler, SkippingBatchSampler

DATA = list(range(23))


def batches(loader, n: int | None = None) -> list[list[int]]:
    """The first ``n`` batches (all without ``n``), pulling no more than that, as Lightning does with a sized loader."""
    return [batch.tolist() for batch in itertools.islice(loader, n)]


def test_order_is_seeded_per_epoch_and_ignores_the_global_rng() -> None:
    loader = ResumableDataLoader(DATA, batch_size=4, shuffle=True, seed=7)
    torch.manual_seed(0)
    first = batches(loader)
    torch.manual_seed(123)
    assert batches(loader) == first  # same epoch, same order, whatever the global RNG
    loader.batch_sampler.sampler.set_epoch(1)
    second = batches(loader)
    assert second != first and sorted(sum(second, [])) == DATA
    assert batches(ResumableDataLoader(DATA, batch_size=4, shuffle=True, seed=8)) != first


def test_resume_mid_epoch_twice_continues_where_each_run_stopped() -> None:
    whole = batches(ResumableDataLoader(DATA, batch_size=3, shuffle=True, seed=1))
    run1 = ResumableDataLoader(DATA, batch_size=3, shuffle=True, seed=1)
    seen = batches(run1, 2)
    run2 = ResumableDataLoader(DATA, batch_size=3, shuffle=True, seed=1)
    run2.load_state_dict(run1.state_dict())
    seen += batches(run2, 3)
    assert run2.state_dict()["delivered"] == 5  # counts from the start of the epoch, not from the resume
    run3 = ResumableDataLoader(DATA, batch_size=3, shuffle=True, seed=1)
    run3.load_state_dict(run2.state_dict())
    seen += batches(run3)
    assert seen == whole


def test_state_saved_at_an_epochs_end_starts_the_next_epoch_afresh() -> None:
    loader = ResumableDataLoader(DATA, batch_size=5)
    batches(loader)
    again = ResumableDataLoader(DATA, batch_size=5)
    again.load_state_dict(loader.state_dict())
    assert batches(again) == batches(loader)


def test_skipped_batches_are_not_loaded() -> None:
    loaded = []

    class Recording(list):
        def __getitem__(self, i):
            loaded.append(i)
            return super().__getitem__(i)

    loader = ResumableDataLoader(Recording(DATA), batch_size=4)
    loader.load_state_dict({"delivered": 3})
    assert batches(loader)[0] == [12, 13, 14, 15]
    assert min(loaded) == 12


def test_rebuilt_with_a_distributed_sampler_as_lightning_does_under_ddp_it_still_skips() -> None:
    def rank_loader(rank: int) -> ResumableDataLoader:
        sampler = DistributedSampler(DATA, num_replicas=2, rank=rank, shuffle=True, seed=0)
        return ResumableDataLoader(DATA, batch_sampler=SkippingBatchSampler(sampler, 3, False))

    whole = batches(rank_loader(1))
    first = rank_loader(1)
    part = batches(first, 2)
    resumed = rank_loader(1)
    resumed.load_state_dict(first.state_dict())
    assert part + batches(resumed) == whole


def test_a_batch_sampler_that_cannot_skip_still_resumes() -> None:
    plain = BatchSampler(SequentialSampler(DATA), 4, False)
    loader = ResumableDataLoader(DATA, batch_sampler=plain)
    loader.load_state_dict({"delivered": 2})
    assert batches(loader)[0] == [8, 9, 10, 11]


def test_the_sampler_is_a_random_sampler_so_lightning_shuffles_under_ddp() -> None:
    from torch.utils.data import RandomSampler

    assert isinstance(SeededShuffleSampler(DATA), RandomSampler)
