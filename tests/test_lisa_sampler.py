"""LISA's layer sampler: deterministic per (seed, interval), resumable, weighted, never touching global RNG."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from lightning_peft.methods.lisa import LayerSampler

UNIFORM_SEED7 = [[0, 1, 2], [0, 7, 8], [3, 5, 8]]  # LayerSampler(10, 3, 1, seed=7) before weighted sampling changed


def test_same_draw_within_an_interval_and_across_instances() -> None:
    a, b = LayerSampler(10, 3, interval=4, seed=7), LayerSampler(10, 3, interval=4, seed=7)
    for step in range(40):
        assert a.active(step) == b.active(step) == a.active(step - step % 4)
        assert len(set(a.active(step))) == 3 and all(0 <= i < 10 for i in a.active(step))
    assert a.is_switch(8) and not a.is_switch(9) and a.interval_index(9) == 2
    assert len({tuple(a.active(4 * k)) for k in range(10)}) > 1, "the active set never changes"
    other_seed = LayerSampler(10, 3, 4, seed=8)
    assert [other_seed.active(4 * k) for k in range(10)] != [a.active(4 * k) for k in range(10)]


def test_resume_replays_and_global_rng_is_untouched() -> None:
    torch.manual_seed(1)
    expected = torch.rand(2)
    torch.manual_seed(1)
    straight = [LayerSampler(6, 2, 3, seed=0).active(s) for s in range(30)]
    resumed = LayerSampler(6, 2, 3, seed=0)
    resumed.load_state_dict(LayerSampler(6, 2, 3, seed=0).state_dict())
    assert [resumed.active(s) for s in range(15, 30)] == straight[15:]
    assert torch.equal(torch.rand(2), expected)


def test_uniform_and_weighted_frequencies() -> None:
    uniform = Counter(i for k in range(2000) for i in LayerSampler(4, 1, 1, seed=3).active(k))
    assert all(400 < uniform[i] < 600 for i in range(4)), uniform
    weighted = Counter(
        i for k in range(2000) for i in LayerSampler(4, 1, 1, seed=3, probabilities=[0, 1, 1, 2]).active(k)
    )
    assert weighted[0] == 0 and 800 < weighted[3] < 1200, weighted


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_blocks": 4, "n_layers": 0, "interval": 1}, "n_layers"),
        ({"n_blocks": 4, "n_layers": 5, "interval": 1}, "n_layers"),
        ({"n_blocks": 4, "n_layers": 1, "interval": 0}, "interval"),
        ({"n_blocks": 2, "n_layers": 1, "interval": 1, "probabilities": [1.0]}, "entries"),
        ({"n_blocks": 2, "n_layers": 1, "interval": 1, "probabilities": [1.0, -1.0]}, "non-negative"),
        ({"n_blocks": 3, "n_layers": 2, "interval": 1, "probabilities": [1.0, 0.0, 0.0]}, "fewer than"),
    ],
)
def test_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LayerSampler(**kwargs)


def test_a_checkpoint_from_another_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="n_layers: checkpoint 3 vs now 2"):
        LayerSampler(8, 2, 5).load_state_dict(LayerSampler(8, 3, 5).state_dict())


def inclusion_frequencies(sampler: LayerSampler, intervals: int) -> list[float]:
    counts = Counter(i for k in range(intervals) for i in sampler.active(k * sampler.interval))
    return [counts[i] / intervals for i in range(sampler.n_blocks)]


@pytest.mark.parametrize(
    ("weights", "n_layers", "expected"),
    [
        ([4, 2, 1, 1], 2, [1.0, 0.5, 0.25, 0.25]),  # the sequential draws gave [0.81, 0.57, 0.31, 0.31]
        ([1, 2, 3, 4], 2, [0.2, 0.4, 0.6, 0.8]),  # nothing capped
        ([3, 1, 1, 1, 0], 2, [1.0, 1 / 3, 1 / 3, 1 / 3, 0.0]),  # capped exactly at 1, a zero weight
        ([8, 6, 1, 1, 1, 1], 3, [1.0, 1.0, 0.25, 0.25, 0.25, 0.25]),  # capping in two rounds
        ([0, 1, 1, 2], 1, [0.0, 0.25, 0.25, 0.5]),  # one block: the normalised weights
    ],
)
def test_weighted_inclusion_is_proportional_to_the_weights_capped_at_one(weights, n_layers, expected) -> None:
    sampler = LayerSampler(len(weights), n_layers, interval=3, seed=11, probabilities=weights)
    frequencies = inclusion_frequencies(sampler, 6000)  # binomial s.d. <= 0.0065 per block
    assert frequencies == pytest.approx(expected, abs=0.025), frequencies
    for k in range(300):  # exactly n_layers distinct blocks, never a zero-weight one, capped ones always
        active = sampler.active(3 * k)
        assert len(set(active)) == n_layers == len(active)
        assert all(expected[i] > 0 for i in active) and all(i in active for i, p in enumerate(expected) if p == 1)
    assert sampler.inclusion.tolist() == pytest.approx(expected, abs=1e-12)
    assert float(sampler.inclusion.sum()) == pytest.approx(n_layers)


def test_weighted_draws_are_seeded_per_interval_and_leave_the_global_rng_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a = LayerSampler(6, 2, 4, seed=9, probabilities=[1, 2, 3, 1, 2, 3])
    b = LayerSampler(6, 2, 4, seed=9, probabilities=[2, 4, 6, 2, 4, 6])  # only the ratios matter
    draws = [a.active(s) for s in range(80)]
    assert draws == [b.active(s) for s in range(80)] and all(draws[s] == draws[s - s % 4] for s in range(80))
    assert len({tuple(d) for d in draws}) > 3
    assert [LayerSampler(6, 2, 4, seed=10, probabilities=[1, 2, 3, 1, 2, 3]).active(s) for s in range(80)] != draws
    assert torch.equal(torch.rand(3), expected)


def test_uniform_draws_are_unchanged() -> None:
    # pinned from the sampler as it was (torch.randperm from the (seed, interval) generator): same blocks per seed
    assert [LayerSampler(10, 3, 1, seed=7).active(k) for k in range(3)] == UNIFORM_SEED7


def test_a_weighted_checkpoint_of_the_sequential_sampler_is_refused() -> None:
    old = LayerSampler(4, 2, 5, probabilities=[4, 2, 1, 1]).state_dict()
    del old["sampling"]
    with pytest.raises(ValueError, match="one after another"):
        LayerSampler(4, 2, 5, probabilities=[4, 2, 1, 1]).load_state_dict(old)
    uniform = LayerSampler(4, 2, 5).state_dict()
    del uniform["sampling"]
    LayerSampler(4, 2, 5).load_state_dict(uniform)  # uniform draws did not change: still accepted
