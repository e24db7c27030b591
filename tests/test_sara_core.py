"""SaRA's core: selection by fraction / threshold against brute force, the nuclear norm's gradient, penalty draws."""

from __future__ import annotations

import pytest
import torch

from lightning_peft.methods.sara import SaRASelector, nuclear_norm_grad

# ----------------------------------------------------------------------------------------------- selection


def brute_smallest(weight: torch.Tensor, k: int) -> list[int]:
    """The ``k`` entries of smallest ``|w|``, ties by position, sorted: by plain Python sorting."""
    flat = weight.reshape(-1).tolist()
    ranked = sorted(range(len(flat)), key=lambda i: (abs(flat[i]), i))
    return sorted(ranked[:k])


def tied_weight() -> torch.Tensor:
    """Many exact ties in |w| (values from a small set, both signs), so position must break them."""
    gen = torch.Generator().manual_seed(3)
    levels = torch.tensor([0.0, 0.25, -0.25, 0.5, -0.5, 1.0, -1.0, 2.0])
    return levels[torch.randint(0, len(levels), (6, 7), generator=gen)]


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.25, 0.5, 0.73, 0.99])
@pytest.mark.parametrize("kind", ["randn", "ties", "conv"])
def test_fraction_picks_the_smallest_entries_like_a_brute_force_sort(fraction: float, kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = {
        "randn": lambda: torch.randn(9, 11, generator=gen),
        "ties": tied_weight,
        "conv": lambda: torch.randn(4, 3, 3, 3, generator=gen),
    }[kind]()
    k = round(fraction * weight.numel())
    picked = SaRASelector(fraction=fraction).select(weight)
    assert picked.dtype == torch.long and picked.dim() == 1
    assert picked.tolist() == brute_smallest(weight, k)
    assert SaRASelector(fraction=fraction).count(weight) == k


def test_ties_are_resolved_by_position_and_sign_does_not_matter() -> None:
    weight = torch.tensor([0.5, -0.1, 0.1, -0.5, 0.1, 0.0, -0.0, 3.0])
    # |w|: 0.5 .1 .1 .5 .1 0 0 3 -> order 5, 6, 1, 2, 4, 0, 3, 7
    assert SaRASelector(fraction=0.25).select(weight).tolist() == [5, 6]
    assert SaRASelector(fraction=0.375).select(weight).tolist() == [1, 5, 6]
    assert SaRASelector(fraction=0.5).select(weight).tolist() == [1, 2, 5, 6]
    assert SaRASelector(fraction=0.625).select(weight).tolist() == [1, 2, 4, 5, 6]
    # a large negative weight is large: never picked before the small positive ones
    assert 3 not in SaRASelector(fraction=0.7).select(weight).tolist()


def test_threshold_picks_exactly_the_entries_below_it() -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(13, 17, generator=gen)
    weight[0, :3] = torch.tensor([0.3, -0.3, 0.2999])  # exactly at the threshold is not below it
    for t in (0.05, 0.3, 1.0, 10.0):
        expected = (weight.abs() < t).reshape(-1).nonzero().squeeze(1).tolist()
        sel = SaRASelector(threshold=t)
        assert sel.select(weight).tolist() == expected
        assert sel.count(weight) == len(expected)
    picked = SaRASelector(threshold=0.3).select(weight).tolist()
    assert 0 not in picked and 1 not in picked and 2 in picked
    assert SaRASelector(threshold=1e-9).select(weight).numel() == 0


@pytest.mark.parametrize("limit", [0, 1, 5, 40, 10_000])
def test_limit_keeps_the_smallest(limit: int) -> None:
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(10, 10, generator=gen)
    by_threshold = SaRASelector(threshold=0.8)
    n = by_threshold.count(weight)
    assert 40 < n < 100, "the threshold should select a middle share for this test to bite"
    assert by_threshold.select(weight, limit=limit).tolist() == brute_smallest(weight, min(n, limit))
    by_fraction = SaRASelector(fraction=0.3)
    assert by_fraction.select(weight, limit=limit).tolist() == brute_smallest(weight, min(30, limit))


def test_selection_is_sorted_and_handles_low_precision() -> None:
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(50, 20, generator=gen)
    picked = SaRASelector(fraction=0.37).select(weight)
    assert torch.equal(picked, picked.sort().values) and picked.unique().numel() == picked.numel()
    half = weight.to(torch.bfloat16)
    assert SaRASelector(fraction=0.2).select(half).tolist() == brute_smallest(half.float(), 200)


# ----------------------------------------------------------------------------------------------- nuclear norm


def test_nuclear_norm_value_and_gradient_match_autograd_for_a_full_rank_matrix() -> None:
    gen = torch.Generator().manual_seed(0)
    for shape in [(6, 9), (9, 6), (7, 7)]:
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        value, grad = nuclear_norm_grad(x.float())
        x.requires_grad_(True)
        nuc = torch.linalg.matrix_norm(x, "nuc")
        (expected,) = torch.autograd.grad(nuc, x)
        torch.testing.assert_close(value.double(), nuc.detach(), rtol=1e-5, atol=1e-5)
        assert grad.shape == shape and grad.dtype == torch.float32
        torch.testing.assert_close(grad, expected.float(), rtol=0, atol=1e-5)


def test_nuclear_norm_gradient_of_a_rank_deficient_matrix_is_the_minimum_norm_subgradient() -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, 2, generator=gen), torch.randn(2, 6, generator=gen)
    x = a @ b  # rank 2 in 8 x 6
    value, grad = nuclear_norm_grad(x)
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    torch.testing.assert_close(value.double(), s.sum(), rtol=1e-5, atol=1e-5)
    expected = (u[:, :2] @ vh[:2]).float()  # U V^T over the non-zero singular values only
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-5)
    # zero on the null directions: nothing in the left/right null spaces of x
    left_null, right_null = u[:, 2:].float(), vh[2:].float()
    assert float((left_null.T @ grad).abs().max()) < 1e-5
    assert float((grad @ right_null.T).abs().max()) < 1e-5
    # the subgradient has Frobenius norm sqrt(rank), not sqrt(min side)
    assert abs(float(grad.norm()) - 2**0.5) < 1e-4
    # and it is a subgradient: <g, x> = ||x||_* with spectral norm 1
    assert abs(float((grad * x).sum()) - float(value)) < 1e-4
    assert abs(float(torch.linalg.matrix_norm(grad, 2)) - 1.0) < 1e-5


def test_nuclear_norm_of_zero_and_of_a_diagonal() -> None:
    value, grad = nuclear_norm_grad(torch.zeros(3, 4))
    assert float(value) == 0.0 and torch.equal(grad, torch.zeros(3, 4))
    value, grad = nuclear_norm_grad(torch.diag(torch.tensor([3.0, -2.0, 0.0])))
    assert float(value) == pytest.approx(5.0)
    torch.testing.assert_close(grad, torch.diag(torch.tensor([1.0, -1.0, 0.0])), rtol=0, atol=1e-6)


def test_nuclear_norm_of_a_conv_weight_is_taken_as_out_by_rest() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 2, 2, generator=gen, dtype=torch.float64)
    value, grad = nuclear_norm_grad(x.float())
    assert grad.shape == x.shape
    matrix = x.reshape(5, 12).clone().requires_grad_(True)
    nuc = torch.linalg.matrix_norm(matrix, "nuc")
    (expected,) = torch.autograd.grad(nuc, matrix)
    torch.testing.assert_close(value.double(), nuc.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.reshape(5, 12), expected.float(), rtol=0, atol=1e-5)
    # a different reshape (out*in x kh*kw) would give another norm: the test can tell them apart
    other = torch.linalg.matrix_norm(x.reshape(15, 4), "nuc")
    assert abs(float(other) - float(nuc.detach())) > 1e-3


# ----------------------------------------------------------------------------------------------- penalty draws


def test_penalty_draws_depend_on_seed_and_step_only() -> None:
    sel = SaRASelector(fraction=0.1, matrices=3, seed=5)
    draws = [sel.penalty_matrices(step, 20) for step in range(12)]
    assert draws == [SaRASelector(fraction=0.1, matrices=3, seed=5).penalty_matrices(s, 20) for s in range(12)]
    for draw in draws:
        assert len(draw) == 3 and draw == sorted(set(draw)) and all(0 <= i < 20 for i in draw)
    assert len({tuple(d) for d in draws}) > 6, "the draws barely change across steps"
    other_seed = [SaRASelector(fraction=0.1, matrices=3, seed=6).penalty_matrices(s, 20) for s in range(12)]
    assert other_seed != draws
    # the global RNG plays no part
    torch.manual_seed(123)
    first = sel.penalty_matrices(4, 20)
    torch.manual_seed(456)
    assert sel.penalty_matrices(4, 20) == first == draws[4]


def test_penalty_every_skips_steps_and_never_draws_more_than_eligible() -> None:
    sel = SaRASelector(fraction=0.1, matrices=4, every=3)
    for step in range(10):
        draw = sel.penalty_matrices(step, 10)
        assert (len(draw) == 4) == (step % 3 == 0)
        assert draw or step % 3 != 0
    assert sel.penalty_matrices(0, 2) == [0, 1]
    assert sel.penalty_matrices(3, 0) == []
    assert SaRASelector(fraction=0.1, matrices=1).penalty_matrices(7, 1) == [0]


def test_eligible_by_shape_and_min_dim() -> None:
    sel = SaRASelector(fraction=0.1)
    assert not sel.eligible((10,)) and not sel.eligible(torch.Size([]))
    assert sel.eligible((1, 10)) and sel.eligible((32, 4, 3, 3))
    strict = SaRASelector(fraction=0.1, min_dim=65)
    assert not strict.eligible((64, 128)) and not strict.eligible((128, 64))
    assert strict.eligible((65, 65)) and strict.eligible((128, 17, 2, 2))  # a conv weight: rest = 68
    assert not strict.eligible((128, 16, 2, 2))  # rest = 64


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fraction": 0.1, "threshold": 0.1}, "exactly one"),
        ({}, "exactly one"),
        ({"fraction": 0.0}, r"fraction must be in \(0, 1\)"),
        ({"fraction": 1.0}, r"fraction must be in \(0, 1\)"),
        ({"fraction": 1.5}, r"fraction must be in \(0, 1\)"),
        ({"fraction": -0.1}, r"fraction must be in \(0, 1\)"),
        ({"fraction": float("nan")}, r"fraction must be in \(0, 1\)"),
        ({"threshold": 0.0}, "threshold must be > 0"),
        ({"threshold": -1.0}, "threshold must be > 0"),
        ({"threshold": float("nan")}, "threshold must be > 0"),
        ({"fraction": 0.1, "matrices": 0}, "matrices"),
        ({"fraction": 0.1, "every": 0}, "every"),
        ({"fraction": 0.1, "min_dim": 0}, "min_dim"),
    ],
)
def test_bad_settings_are_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        SaRASelector(**kwargs)


def test_state_round_trip_and_refusal_names_the_field() -> None:
    sel = SaRASelector(fraction=0.2, matrices=2, every=3, min_dim=4, seed=9)
    same = SaRASelector(fraction=0.2, matrices=2, every=3, min_dim=4, seed=9)
    same.load_state_dict(sel.state_dict())
    assert same.state_dict() == sel.state_dict()
    for field, value in [("fraction", 0.3), ("matrices", 1), ("every", 1), ("min_dim", 1), ("seed", 0)]:
        other = {**sel.state_dict(), field: value}
        with pytest.raises(ValueError, match=rf"{field}: checkpoint {value!r} vs now"):
            sel.load_state_dict(other)
    with pytest.raises(ValueError, match="threshold"):
        SaRASelector(threshold=0.1).load_state_dict({**sel.state_dict(), "fraction": None, "threshold": 0.2})


# ----------------------------------------------------------------------------------------------- penalty strength


def reference_penalty_grad(matrix: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """sjtuplayer/SaRA ``optim/adamw2.py``: ``(lambda_rank * nuclear_norm(param * mask)).backward()`` into ``param``."""
    param = matrix.clone().double().requires_grad_(True)
    u, s, v = torch.svd(param * mask.double())
    (lam * s.sum()).backward()
    return param.grad


def test_one_drawn_matrix_gets_the_reference_strength_and_more_draws_keep_it() -> None:
    lam, gen = 5e-4, torch.Generator().manual_seed(0)
    masks = [torch.rand(12, 9, generator=gen) < 0.4 for _ in range(6)]
    deltas = [torch.randn(12, 9, generator=gen) * m for m in masks]  # a fixed ΔW on each matrix's trained entries
    one = SaRASelector(fraction=0.4, matrices=1)
    for step in range(4):
        (i,) = one.penalty_matrices(step, len(deltas))
        _, grad = nuclear_norm_grad(deltas[i])
        ours = lam * one.penalty_scale(1) * grad[masks[i]]
        torch.testing.assert_close(ours.double(), reference_penalty_grad(deltas[i], masks[i], lam)[masks[i]])
    # k matrices a step: each gets 1/k of it, so the total strength per step stays the reference's one matrix
    for k in (2, 3, 6):
        assert SaRASelector(fraction=0.4, matrices=k).penalty_scale(k) * k == pytest.approx(1.0)
