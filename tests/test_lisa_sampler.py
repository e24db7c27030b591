"""LISA's layer sampler: deterministic per (seed, interval), resumable, weighted, never touching global RNG."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from lightning_peft.methods.lisa import LayerSampler


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
