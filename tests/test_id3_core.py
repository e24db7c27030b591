"""ID³'s unmasker: the schedule, the exact global top-k from per-tensor candidates, the score, errors, state."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_peft.adapters.sparse import inject_sparse, sparse_layers
from lightning_peft.methods.id3 import Unmasker

# ----------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    ("budget", "steps", "expected"),
    [
        (8, 4, [2, 2, 2, 2]),
        (10, 4, [3, 3, 2, 2]),  # B % T extra entries go to the first steps
        (3, 5, [1, 1, 1, 0, 0]),  # B < T: the last steps add nothing
        (1, 1, [1]),
        (7, 1, [7]),
    ],
)
def test_schedule_counts_and_total(budget: int, steps: int, expected: list[int]) -> None:
    unmasker = Unmasker(budget, steps, total_params=100)
    assert [unmasker.schedule(t) for t in range(steps)] == expected
    assert [unmasker.schedule(t) for t in range(steps, steps + 5)] == [0] * 5  # nothing after T
    assert unmasker.cumulative(-1) == 0
    running = 0
    for t in range(steps + 5):
        running += unmasker.schedule(t)
        assert unmasker.cumulative(t) == running <= budget
    assert unmasker.cumulative(steps - 1) == budget == unmasker.cumulative(10 * steps)
    assert unmasker.wants_gradients(0) and not unmasker.wants_gradients(steps)
    with pytest.raises(ValueError, match="from 0"):
        unmasker.schedule(-1)


# ----------------------------------------------------------------------------------------------- score


def test_score_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    grad, weight = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    for eps, exp in [(1e-8, 1.0), (1e-3, 0.5), (0.1, 2.0)]:
        expected = grad.abs() / (eps + weight.abs()) ** exp
        torch.testing.assert_close(Unmasker(3, 2, 20, eps=eps, exp=exp).score(grad, weight), expected.reshape(-1))
    torch.testing.assert_close(Unmasker(3, 2, 20, exp=0).score(grad, weight), grad.abs().reshape(-1))
    half = Unmasker(3, 2, 20).score(grad.to(torch.bfloat16), weight.to(torch.bfloat16))
    assert half.dtype == torch.float32


# ----------------------------------------------------------------------------------------------- global top-k


def _brute_force(unmasker: Unmasker, tensors: dict, chosen: dict, n: int) -> dict[str, list[int]]:
    """Concatenate every score (model-sized, as the reference does) and take the top n by (score, key, index)."""
    rows = []
    for key in sorted(tensors):
        grad, weight = tensors[key]
        score = unmasker.score(grad, weight)
        for i, s in enumerate(score.tolist()):
            if i not in chosen[key]:
                s = -1.0 if not math.isfinite(s) else s
                rows.append((-s, key, i))
    rows.sort()
    out: dict[str, list[int]] = {}
    for _, key, i in rows[:n]:
        out.setdefault(key, []).append(i)
    return {k: sorted(v) for k, v in out.items()}


@pytest.mark.parametrize(("eps", "exp"), [(1e-8, 1.0), (1e-2, 0.5), (1e-3, 0.0)])
def test_global_top_k_equals_brute_force_and_masks_only_grow(eps: float, exp: float) -> None:
    gen = torch.Generator().manual_seed(7)
    shapes = {"a.weight": (7, 3), "b.weight": (50,), "c.bias": (4,), "d.weight": (2, 3, 3, 3)}
    total = sum(math.prod(s) for s in shapes.values())
    unmasker = Unmasker(budget=60, total_steps=9, total_params=total, eps=eps, exp=exp)
    chosen: dict[str, set[int]] = {k: set() for k in shapes}
    for step in range(12):
        tensors = {k: (torch.randn(s, generator=gen), torch.randn(s, generator=gen)) for k, s in shapes.items()}
        if step == 2:
            tensors["b.weight"][0][3] = float("nan")  # an overflowed entry is never preferred
        n = unmasker.schedule(step)
        expected = _brute_force(unmasker, tensors, chosen, n)
        for key in reversed(sorted(shapes)):  # observation order does not matter
            grad, weight = tensors[key]
            done = torch.tensor(sorted(chosen[key]), dtype=torch.long)
            unmasker.observe(key, grad, weight, done)
        picked = unmasker.select(step)
        assert {k: v.tolist() for k, v in picked.items()} == expected
        assert sum(v.numel() for v in picked.values()) == n
        for key, index in picked.items():
            assert not (set(index.tolist()) & chosen[key])  # never re-picks a chosen entry
            chosen[key].update(index.tolist())
            torch.testing.assert_close(unmasker.selected_grads[key], tensors[key][0].reshape(-1)[index])
        if step == 2:
            assert 3 not in chosen["b.weight"]
    assert sum(len(v) for v in chosen.values()) == 60 == unmasker.unmasked
    assert unmasker.next_step == 12


@pytest.mark.parametrize("seed", range(4))
def test_running_top_k_is_exact_with_many_ties_small_budgets_and_any_order(seed: int) -> None:
    """The running pool (merge, then filter by its n-th best) equals the brute force under heavy ties."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {f"{name}.weight": (int(torch.randint(1, 300, (1,), generator=gen)),) for name in "pqrstuvw"}
    total = sum(s[0] for s in shapes.values())
    budget = total // 2
    unmasker = Unmasker(budget=budget, total_steps=7, total_params=total, exp=0.0)
    chosen: dict[str, set[int]] = {k: set() for k in shapes}
    for step in range(8):
        # integer gradients in a small range: most scores tie with many others, in every tensor
        tensors = {k: (torch.randint(-3, 4, s, generator=gen).float(), torch.ones(s)) for k, s in shapes.items()}
        n = unmasker.schedule(step)
        expected = _brute_force(unmasker, tensors, chosen, n)
        order = [list(shapes)[i] for i in torch.randperm(len(shapes), generator=gen).tolist()]
        for key in order:
            done = torch.tensor(sorted(chosen[key]), dtype=torch.long)
            unmasker.observe(key, *tensors[key], done)
        picked = {k: v.tolist() for k, v in unmasker.select(step).items()}
        assert picked == expected, step
        for key, index in picked.items():
            chosen[key].update(index)
    assert sum(len(v) for v in chosen.values()) == budget


def test_ties_break_by_key_then_index() -> None:
    unmasker = Unmasker(budget=5, total_steps=1, total_params=12, exp=0.0)
    for key in ("z", "m", "a"):
        unmasker.observe(key, torch.ones(4), torch.ones(4), torch.tensor([1]) if key == "a" else None)
    picked = unmasker.select(0)
    assert {k: v.tolist() for k, v in picked.items()} == {"a": [0, 2, 3], "m": [0, 1]}


def test_exhausted_tensor_and_repeated_observe() -> None:
    unmasker = Unmasker(budget=6, total_steps=2, total_params=7)
    unmasker.observe("small", torch.ones(2), torch.ones(2), torch.tensor([0, 1]))  # nothing left to pick
    unmasker.observe("big", torch.zeros(5), torch.ones(5))
    unmasker.observe("big", torch.arange(5.0), torch.ones(5))  # the last call replaces the first
    assert {k: v.tolist() for k, v in unmasker.select(0).items()} == {"big": [2, 3, 4]}
    assert unmasker.select(1) == {}  # nothing observed: nothing chosen
    assert unmasker.unmasked == 3


def test_observe_after_the_schedule_is_free_and_stale_candidates_are_refused() -> None:
    unmasker = Unmasker(budget=2, total_steps=1, total_params=4)
    unmasker.observe("w", torch.ones(4), torch.ones(4), step=5)  # nothing to unmask at step 5
    assert unmasker.select(5) == {}
    unmasker.observe("w", torch.ones(4), torch.ones(4), step=0)
    with pytest.raises(ValueError, match=r"observed for step\(s\) \[0\]"):
        unmasker.select(1)
    with pytest.raises(ValueError, match="elements"):
        unmasker.observe("w", torch.ones(4), torch.ones(3), step=0)
    with pytest.raises(ValueError, match="int64"):
        unmasker.observe("w", torch.ones(4), torch.ones(4), torch.tensor([0.0]), step=0)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        unmasker.observe("w", torch.ones(4), torch.ones(4), torch.tensor([4]), step=0)


# ----------------------------------------------------------------------------------------------- errors and state


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 0}, "budget must be a positive integer"),
        ({"budget": -3}, "budget must be a positive integer"),
        ({"budget": 2.5}, "budget must be a positive integer"),
        ({"budget": 101}, "exceeds the 100 elements"),
        ({"total_steps": 0}, "total_steps"),
        ({"total_params": 0}, "total_params"),
        ({"eps": 0.0}, "eps must be a finite number > 0"),
        ({"eps": -1e-3}, "eps must be"),
        ({"eps": float("inf")}, "eps must be"),
        ({"exp": -0.5}, "exp must be a finite number >= 0"),
        ({"exp": float("nan")}, "exp must be"),
    ],
)
def test_bad_configuration(kwargs: dict, message: str) -> None:
    config = {"budget": 10, "total_steps": 5, "total_params": 100, **kwargs}
    with pytest.raises(ValueError, match=message):
        Unmasker(**config)


def test_state_dict_round_trip_and_refusal() -> None:
    unmasker = Unmasker(10, 4, 100, eps=1e-3, exp=0.5)
    unmasker.observe("w", torch.randn(100), torch.randn(100))
    unmasker.select(0)
    state = unmasker.state_dict()
    resumed = Unmasker(10, 4, 100, eps=1e-3, exp=0.5)
    resumed.load_state_dict(state)
    assert resumed.next_step == 1 and resumed.unmasked == 3 and resumed.state_dict() == state
    for field, value in [("budget", 12), ("total_steps", 5), ("total_params", 90), ("eps", 1e-8), ("exp", 1.0)]:
        with pytest.raises(ValueError, match=f"{field}: checkpoint"):
            resumed.load_state_dict({**state, field: value})
    assert resumed.next_step == 1


# ----------------------------------------------------------------------------------------------- with the sparse core


def test_id3_on_sparse_layers_equals_dense_masked_id3() -> None:
    """The unmasker fed by SparseDeltaLayer.grad_hook, new entries trained in the step that chose them.

    Reference: ID³ on dense trainable weights (score the full gradient, choose, mask the gradient, AdamW).
    """
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
    targets = {"0": ("weight", "bias"), "2": ("weight",)}
    keys = ["0.weight", "0.bias", "2.weight"]
    total = 30 + 6 + 12
    budget, steps, lr = 11, 4, 0.05

    model = copy.deepcopy(base)
    bank = inject_sparse(model, targets, capacity=budget)
    layers = dict(sparse_layers(model))
    unmasker = Unmasker(budget, steps, total, eps=1e-3, exp=1.0)
    opt = torch.optim.AdamW([bank.values], lr=lr, weight_decay=0.0, foreach=False)

    def hook(layer, name, grad):  # type: ignore[no-untyped-def]
        module = next(k for k, v in layers.items() if v is layer)
        weight = getattr(layer.base_layer, name)
        unmasker.observe(f"{module}.{name}", grad, weight, layer.indices(name))

    for layer in layers.values():
        layer.grad_hook = hook

    dense = copy.deepcopy(base)
    params = {"0.weight": dense[0].weight, "0.bias": dense[0].bias, "2.weight": dense[2].weight}
    dense[2].bias.requires_grad_(False)
    masks = {k: torch.zeros(p.numel(), dtype=torch.bool) for k, p in params.items()}
    dense_opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0, foreach=False)
    reference = Unmasker(budget, steps, total, eps=1e-3, exp=1.0)

    gen = torch.Generator().manual_seed(1)
    for step in range(steps + 2):
        x, y = torch.randn(8, 5, generator=gen), torch.randn(8, 2, generator=gen)
        if not unmasker.wants_gradients(step):
            for layer in layers.values():
                layer.grad_hook = None
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        picked = unmasker.select(step)
        for key, index in picked.items():
            module, name = key.split(".")
            slots = layers[module].add(name, index)
            bank.values.grad[slots] = unmasker.selected_grads[key]
        opt.step()

        dense_opt.zero_grad()
        nn.functional.mse_loss(dense(x), y).backward()
        n = reference.schedule(step)
        scores = torch.cat([reference.score(params[k].grad, params[k]).masked_fill(masks[k], -math.inf) for k in keys])
        if n:
            top = torch.topk(scores, n).indices
            offset = 0
            for k in keys:
                size = masks[k].numel()
                masks[k][top[(top >= offset) & (top < offset + size)] - offset] = True
                offset += size
        for k, p in params.items():
            p.grad.view(-1)[~masks[k]] = 0.0
        dense_opt.step()

        for k in keys:
            module, name = k.split(".")
            assert set(layers[module].indices(name).tolist()) == set(masks[k].nonzero().squeeze(1).tolist()), (step, k)

    assert bank.used == budget
    with torch.no_grad():
        model(torch.zeros(1, 5))
    for k in keys:
        module, name = k.split(".")
        torch.testing.assert_close(getattr(layers[module].base_layer, name), params[k], atol=1e-6, rtol=0)
