"""AdaLoRA core: the rank allocator against peft's, its schedule and state, the regulariser, SVD layer, config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import FAMILIES
from torch import nn

from lightning_peft.adapters import adapter_layers, inject_adapters, merge_adapters, unmerge_adapters
from lightning_peft.adapters.svd import AdaLoRAConfig, SVDLoRALayer
from lightning_peft.methods.adalora import RankAllocator

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MLP_TARGETS = ["embed", "fc1", "fc2", "head"]
KINDS = ("lora_A", "lora_E", "lora_B")
SCHEDULE = {"tinit": 2, "tfinal": 3, "deltaT": 2, "total_step": 16}
TOTAL = SCHEDULE["total_step"]
FINAL = TOTAL - SCHEDULE["tfinal"]  # 13: the step at which the rank pattern freezes


def _inject(model: nn.Module, config: AdaLoRAConfig, seed: int = 0) -> RankAllocator:
    """Inject with a seeded adapter init (the global RNG is left alone) and build the allocator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 100)
        inject_adapters(model, config)
    return RankAllocator(list(adapter_layers(model)), config, total_step=config.total_step or TOTAL)


def _mlp(seed: int = 0, r: int = 4, target_r: int = 1, targets: list[str] | None = None, **kw):
    model = FAMILIES["mlp"](seed=seed)
    config = AdaLoRAConfig(r=r, target_r=target_r, alpha=2 * r, target_modules=targets or MLP_TARGETS, **SCHEDULE, **kw)
    return model, _inject(model, config, seed)


def _fake_step(alloc: RankAllocator, g: torch.Generator, scale: float = 0.01) -> None:
    """What an optimizer step leaves behind: a small random change of every adapter value and a random gradient."""
    for layer in alloc.layers:
        for kind in KINDS:
            p = getattr(layer, kind)
            with torch.no_grad():
                p.add_(torch.randn(p.shape, generator=g) * scale)
            p.grad = torch.randn(p.shape, generator=g)


def _train(alloc: RankAllocator, steps: range, g: torch.Generator) -> None:
    for step in steps:
        _fake_step(alloc, g)
        if alloc.wants_importance(step):
            assert alloc.update_importance()
        alloc.allocate(step)


# ------------------------------------------------------------------------------------------- 1. peft equivalence
def test_rank_allocator_matches_peft_step_by_step() -> None:
    peft = pytest.importorskip("peft")
    model = FAMILIES["llama"](seed=0)
    config = AdaLoRAConfig(r=6, target_r=2, alpha=12, target_modules=LLAMA_TARGETS, beta1=0.85, beta2=0.85, **SCHEDULE)
    alloc = _inject(model, config)
    layers = list(adapter_layers(model))
    assert len(layers) == 14 and alloc.init_bgt == 84 and alloc.target_bgt == 28

    peft_model = peft.get_peft_model(
        FAMILIES["llama"](seed=0),
        peft.AdaLoraConfig(
            init_r=6,
            target_r=2,
            lora_alpha=12,
            target_modules=LLAMA_TARGETS,
            beta1=0.85,
            beta2=0.85,
            lora_dropout=0.0,
            **SCHEDULE,
        ),
    )
    inner = peft_model.base_model.model  # the names the peft allocator keys its EMAs with
    theirs = peft_model.base_model.rankallocator
    pairs = []  # (our parameter, peft's parameter, peft's name)
    for name, layer in layers:
        peft_layer = inner.get_submodule(name)
        for kind in KINDS:
            ours, other = getattr(layer, kind), getattr(peft_layer, kind)["default"]
            assert ours.shape == other.shape
            with torch.no_grad():
                other.copy_(ours)
            pairs.append((ours, other, f"{name}.{kind}.default"))
    assert (theirs.init_bgt, theirs.target_bgt) == (alloc.init_bgt, alloc.target_bgt)

    g = torch.Generator().manual_seed(1234)
    masked_steps = []
    for step in range(TOTAL):
        for ours, other, _ in pairs:  # identical values and gradients at the time of both calls
            delta = torch.randn(ours.shape, generator=g) * 0.01
            grad = torch.randn(ours.shape, generator=g)
            with torch.no_grad():
                ours.add_(delta)
                other.add_(delta)
            ours.grad, other.grad = grad.clone(), grad.clone()
        assert alloc.budget_schedule(step) == theirs.budget_schedule(step), step
        if alloc.wants_importance(step):
            assert alloc.update_importance()
        if alloc.allocate(step) is not None:
            masked_steps.append(step)
        peft_model.base_model.update_and_allocate(step)

        if step < FINAL:  # peft drops its EMAs (reset_ipt) when the pattern freezes
            ema = alloc.ema()
            for name, _ in layers:
                for kind in KINDS:
                    ipt, unc = ema[name][kind]
                    key = f"{name}.{kind}.default"
                    torch.testing.assert_close(ipt, theirs.exp_avg_ipt[key], atol=1e-6, rtol=1e-5, msg=f"ipt {key}")
                    torch.testing.assert_close(unc, theirs.exp_avg_unc[key], atol=1e-6, rtol=1e-5, msg=f"unc {key}")
        else:
            assert theirs.exp_avg_ipt == {}
        for ours, other, key in pairs:
            if ".lora_E." in key:  # equal E values after masking: the same triplets were switched off
                torch.testing.assert_close(ours.detach(), other.detach(), atol=1e-6, rtol=0, msg=f"{key} at {step}")
        if step in masked_steps and step <= FINAL:
            pattern = peft_model.peft_config["default"].rank_pattern
            for (name, _), mask in zip(layers, alloc.masks, strict=True):
                assert mask.tolist() == pattern[f"{name}.lora_E.default"], (name, step)
            assert sum(int(m.sum()) for m in alloc.masks) == alloc.budget_schedule(step)[0]

    assert masked_steps == [4, 6, 8, 10, 12, 13]
    assert [s for s, _ in alloc.history] == masked_steps
    assert alloc.rank_pattern is not None
    pattern = {k.removesuffix(".default"): v for k, v in peft_model.peft_config["default"].rank_pattern.items()}
    ours_pattern = {f"{name}.lora_E": m.tolist() for (name, _), m in zip(layers, alloc.rank_pattern, strict=True)}
    assert ours_pattern == pattern
    ranks = [sum(v) for v in pattern.values()]
    assert sum(ranks) == 28 and len(set(ranks)) > 1  # a non-uniform allocation: the comparison is meaningful


# ------------------------------------------------------------------------------------------------- 2. schedule
def test_budget_schedule_exact_values() -> None:
    _, alloc = _mlp()  # 8 layers x r=4 -> 32, target 8 x 1 = 8; cubic decay over steps 2..13
    assert (alloc.init_bgt, alloc.target_bgt) == (32, 8)
    # int((32 - 8) * (1 - (t - 2) / 11) ** 3 + 8): t=3 -> 24 * 1000/1331 = 18.03 -> 26; t=4 -> 24 * 729/1331 = 13.14
    # -> 21; t=5 -> 24 * 512/1331 = 9.23 -> 17; t=6 -> 24 * 343/1331 = 6.18 -> 14; t=8 -> 24 * 125/1331 = 2.25 -> 10
    expected = {0: 32, 1: 32, 2: 32, 3: 26, 4: 21, 5: 17, 6: 14, 8: 10, 13: 8, 14: 8, 15: 8}
    for step, budget in expected.items():
        assert alloc.budget_schedule(step)[0] == budget, step
    for step in range(TOTAL):
        budget, due = alloc.budget_schedule(step)
        if step <= 2:
            assert (budget, due) == (32, False)
        elif step > FINAL:
            assert (budget, due) == (8, True)
        else:
            formula = int((32 - 8) * (1 - (step - 2) / (TOTAL - 3 - 2)) ** 3 + 8)
            assert (budget, due) == (formula, step % 2 == 0), step
    budgets = [alloc.budget_schedule(s)[0] for s in range(TOTAL)]
    assert budgets == sorted(budgets, reverse=True)


def test_allocate_masks_every_delta_t_to_the_budget_and_reapplies_the_frozen_pattern() -> None:
    _, alloc = _mlp()
    g = torch.Generator().manual_seed(0)
    returned = {}
    for step in range(FINAL + 1):
        _fake_step(alloc, g)
        assert alloc.wants_importance(step) == (step < FINAL)
        if alloc.wants_importance(step):
            assert alloc.update_importance()
        result = alloc.allocate(step)
        returned[step] = result
        if result is None:
            continue
        assert result == alloc.budget_schedule(step)[0] == alloc.budget
        kept = sum(int(m.sum()) for m in alloc.masks)
        assert kept == result, step  # random scores: no ties at the threshold
        for layer, mask in zip(alloc.layers, alloc.masks, strict=True):
            assert bool((layer.lora_E.view(-1)[~mask] == 0).all())
            assert bool((layer.lora_E.view(-1)[mask] != 0).all())
        assert sum(alloc.ranks().values()) == kept
    assert {s for s, r in returned.items() if r is not None} == {4, 6, 8, 10, 12, 13}
    assert alloc.history == [(s, returned[s]) for s in (4, 6, 8, 10, 12, 13)]
    assert alloc.rank_pattern is not None and sum(int(m.sum()) for m in alloc.rank_pattern) == 8
    frozen = [m.clone() for m in alloc.rank_pattern]

    for step in (FINAL + 1, FINAL + 2):
        _fake_step(alloc, g)  # the optimizer revives masked E entries ...
        assert any(bool((layer.lora_E.view(-1)[~m] != 0).any()) for layer, m in zip(alloc.layers, frozen, strict=True))
        kept_values = [layer.lora_E.detach().view(-1)[m].clone() for layer, m in zip(alloc.layers, frozen, strict=True)]
        assert not alloc.wants_importance(step)
        assert alloc.allocate(step) is None  # ... and the frozen pattern switches them off again
        for layer, m, kept in zip(alloc.layers, frozen, kept_values, strict=True):
            assert bool((layer.lora_E.view(-1)[~m] == 0).all())
            torch.testing.assert_close(layer.lora_E.detach().view(-1)[m], kept, atol=0, rtol=0)
        assert all(torch.equal(a, b) for a, b in zip(alloc.rank_pattern, frozen, strict=True))
    assert len(alloc.history) == 6


# ----------------------------------------------------------------------------------------- 3. update_importance
@pytest.mark.parametrize("bad", ["none", "inf", "nan"])
def test_update_importance_skips_missing_or_non_finite_gradients(bad: str) -> None:
    _, alloc = _mlp()
    g = torch.Generator().manual_seed(1)
    _fake_step(alloc, g)
    assert alloc.update_importance() and alloc.updates == 1
    _fake_step(alloc, g)
    before = (alloc._exp_avg_ipt.clone(), alloc._exp_avg_unc.clone())
    victim = alloc.layers[3].lora_B
    if bad == "none":
        victim.grad = None
    else:
        victim.grad[1, 0] = float(bad)
    assert alloc.update_importance() is False
    assert alloc.updates == 1
    torch.testing.assert_close(alloc._exp_avg_ipt, before[0], atol=0, rtol=0)
    torch.testing.assert_close(alloc._exp_avg_unc, before[1], atol=0, rtol=0)
    victim.grad = torch.randn(victim.shape, generator=g)
    assert alloc.update_importance() and alloc.updates == 2
    assert not torch.equal(alloc._exp_avg_ipt, before[0])


# ---------------------------------------------------------------------------------------------- 4. state round trip
def _snapshot(alloc: RankAllocator) -> dict:
    return {
        "ipt": alloc._exp_avg_ipt.clone(),
        "unc": alloc._exp_avg_unc.clone(),
        "masks": [m.clone() for m in alloc.masks],
        "pattern": None if alloc.rank_pattern is None else [m.clone() for m in alloc.rank_pattern],
        "E": [layer.lora_E.detach().clone() for layer in alloc.layers],
        "history": list(alloc.history),
        "budget": alloc.budget,
        "updates": alloc.updates,
    }


def _assert_same(a: dict, b: dict) -> None:
    torch.testing.assert_close(a["ipt"], b["ipt"], atol=0, rtol=0)
    torch.testing.assert_close(a["unc"], b["unc"], atol=0, rtol=0)
    assert all(torch.equal(x, y) for x, y in zip(a["masks"], b["masks"], strict=True))
    assert (a["pattern"] is None) == (b["pattern"] is None)
    if a["pattern"] is not None:
        assert all(torch.equal(x, y) for x, y in zip(a["pattern"], b["pattern"], strict=True))
    assert all(torch.equal(x, y) for x, y in zip(a["E"], b["E"], strict=True))
    assert (a["history"], a["budget"], a["updates"]) == (b["history"], b["budget"], b["updates"])


@pytest.mark.parametrize("split", [5, 9, 14])  # during the decay (before / after a masking step) and when frozen
def test_state_dict_round_trip_continues_identically(split: int) -> None:
    model, alloc = _mlp()
    _train(alloc, range(split), torch.Generator().manual_seed(2))
    state = alloc.state_dict()
    assert (state["rank_pattern"] is None) == (split <= FINAL)
    saved = _snapshot(alloc)

    resumed_model, resumed = _mlp()
    resumed_model.load_state_dict(model.state_dict())  # the checkpoint's weights, as Lightning restores them
    resumed.load_state_dict(state)
    _assert_same(_snapshot(resumed), saved)

    _train(alloc, range(split, TOTAL), torch.Generator().manual_seed(3))
    _train(resumed, range(split, TOTAL), torch.Generator().manual_seed(3))
    _assert_same(_snapshot(resumed), _snapshot(alloc))
    assert [s for s, _ in resumed.history] == [4, 6, 8, 10, 12, 13]

    # the state is a copy: training on did not change it
    torch.testing.assert_close(state["exp_avg_ipt"], saved["ipt"], atol=0, rtol=0)
    assert state["history"] == [list(h) for h in saved["history"]]


@pytest.mark.parametrize("other", ["targets", "r"])
def test_load_state_dict_refuses_other_adapters(other: str) -> None:
    _, alloc = _mlp()
    _train(alloc, range(3), torch.Generator().manual_seed(4))
    state = alloc.state_dict()
    _, mismatched = _mlp(targets=["fc1", "fc2"]) if other == "targets" else _mlp(r=3)
    with pytest.raises(ValueError, match="does not match"):
        mismatched.load_state_dict(state)


# ------------------------------------------------------------------------------------------- 5. orthogonal grad
class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(6, 5)
        self.d = nn.Conv2d(3, 4, 3, padding=1)


def _orth_setup(weight: float = 0.3):
    model = _Mixed()
    config = AdaLoRAConfig(
        r=4, target_r=2, alpha=8, target_modules=["a", "b", "c", "d"], orth_reg_weight=weight, **SCHEDULE
    )
    alloc = _inject(model, config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in alloc.layers:  # far from orthogonal, so the gradient is not tiny
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.5)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.5)
    return alloc


def _reference_penalty(alloc: RankAllocator, weight: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``weight * mean`` of ``||A Aᵀ - I||_F`` and ``||Bᵀ B - I||_F`` and its gradients, by autograd."""
    leaves, norms = [], []
    for layer in alloc.layers:
        a = layer.lora_A.detach().clone().requires_grad_(True)
        b = layer.lora_B.detach().clone().requires_grad_(True)
        leaves += [a, b]
        a2, b2 = a.flatten(1), b.flatten(1)
        norms.append(torch.linalg.matrix_norm(a2 @ a2.T - torch.eye(a2.shape[0])))
        norms.append(torch.linalg.matrix_norm(b2.T @ b2 - torch.eye(b2.shape[1])))
    loss = weight * torch.stack(norms).mean()
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("start", ["zeros", "none"])
def test_add_orthogonal_grad_equals_autograd(start: str) -> None:
    alloc = _orth_setup(weight=0.3)
    for layer in alloc.layers:
        for kind in KINDS:
            p = getattr(layer, kind)
            p.grad = torch.zeros_like(p) if start == "zeros" else None
    expected_value, expected_grads = _reference_penalty(alloc, 0.3)
    value = alloc.add_orthogonal_grad()
    assert value == pytest.approx(float(expected_value), rel=1e-5)
    got = [p.grad for layer in alloc.layers for p in (layer.lora_A, layer.lora_B)]
    for g_ours, g_ref in zip(got, expected_grads, strict=True):
        assert g_ours is not None and g_ours.shape == g_ref.shape
        torch.testing.assert_close(g_ours, g_ref, atol=1e-6, rtol=1e-5)
    if start == "zeros":
        assert all(bool((layer.lora_E.grad == 0).all()) for layer in alloc.layers)
    # an explicit weight overrides the config's, and gradients accumulate
    value2 = alloc.add_orthogonal_grad(weight=0.6)
    assert value2 == pytest.approx(2 * float(expected_value), rel=1e-5)
    got2 = [p.grad for layer in alloc.layers for p in (layer.lora_A, layer.lora_B)]
    for g_ours, g_ref in zip(got2, expected_grads, strict=True):
        torch.testing.assert_close(g_ours, 3 * g_ref, atol=3e-6, rtol=1e-5)


def test_add_orthogonal_grad_with_zero_weight_changes_nothing() -> None:
    alloc = _orth_setup(weight=0.0)
    g = torch.Generator().manual_seed(6)
    for layer in alloc.layers:
        layer.lora_A.grad = torch.randn(layer.lora_A.shape, generator=g)
        layer.lora_B.grad = None
    before = [layer.lora_A.grad.clone() for layer in alloc.layers]
    assert alloc.add_orthogonal_grad() == 0.0
    assert alloc.add_orthogonal_grad(weight=0) == 0.0
    for layer, grad in zip(alloc.layers, before, strict=True):
        torch.testing.assert_close(layer.lora_A.grad, grad, atol=0, rtol=0)
        assert layer.lora_B.grad is None


# -------------------------------------------------------------------------------------------------- 6. SVD layer
def _randomise(layer: SVDLoRALayer, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for kind in KINDS:
            p = getattr(layer, kind)
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _conv2d() -> nn.Conv2d:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Conv2d(3, 4, 3, stride=2, padding=1)


def _linear() -> nn.Linear:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Linear(6, 5)


def _gpt2_conv1d() -> nn.Module:
    return FAMILIES["gpt2"](seed=0).transformer.h[0].attn.c_attn  # Conv1D(32 -> 96), weight stored (in, out)


LAYERS = {
    "linear": (_linear, (4, 6)),
    "conv2d": (_conv2d, (2, 3, 9, 9)),
    "conv1d": (_gpt2_conv1d, (2, 4, 32)),
}


def _apply_delta(kind: str, base: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    if kind == "linear":
        return F.linear(x, delta)
    if kind == "conv2d":
        return F.conv2d(x, delta, None, base.stride, base.padding, base.dilation)
    return x @ delta  # Conv1D: y = x @ W + b with W (in, out)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_svd_layer_delta_weight_matches_forward_and_merge_round_trips(kind: str) -> None:
    make, x_shape = LAYERS[kind]
    base = make()
    layer = SVDLoRALayer(base, r=3, scaling=0.7)
    assert layer.kind == kind and tuple(layer.lora_E.shape) == (3, 1)
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x))  # E = 0 at init: the identity update
        _randomise(layer)
        out, reference = layer(x), base(x)
        delta = layer.delta_weight()
        assert delta.shape == base.weight.shape
        assert not torch.allclose(out, reference, atol=1e-3)
        torch.testing.assert_close(out - reference, _apply_delta(kind, base, x, delta), atol=1e-5, rtol=1e-5)
        weight = base.weight.clone()
        layer.merge()
        layer.merge()  # idempotent
        torch.testing.assert_close(base.weight, weight + delta, atol=0, rtol=0)
        torch.testing.assert_close(layer(x), out, atol=1e-5, rtol=1e-5)
        layer.unmerge()
        layer.unmerge()
        torch.testing.assert_close(base.weight, weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer(x), out, atol=1e-6, rtol=1e-6)


def test_merge_round_trip_on_tiny_gpt2_conv1d() -> None:
    from tiny_models import forward

    model = FAMILIES["gpt2"](seed=0).eval()
    reference = forward("gpt2", model)
    config = AdaLoRAConfig(r=4, target_r=2, alpha=8, target_modules=["c_attn", "c_proj", "c_fc"])
    _inject(model, config)
    layers = list(adapter_layers(model))
    assert layers and all(layer.kind == "conv1d" for _, layer in layers)
    with torch.no_grad():
        torch.testing.assert_close(forward("gpt2", model), reference)
        for i, (_, layer) in enumerate(layers):
            _randomise(layer, seed=i)
            layer.lora_A.mul_(0.2)
        out = forward("gpt2", model)
        assert not torch.allclose(out, reference, atol=1e-3)
        merge_adapters(model)
        torch.testing.assert_close(forward("gpt2", model), out, atol=1e-4, rtol=1e-4)
        unmerge_adapters(model)
        torch.testing.assert_close(forward("gpt2", model), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_shrink_drops_switched_off_triplets_without_changing_the_output(kind: str) -> None:
    make, x_shape = LAYERS[kind]
    base = make()
    layer = SVDLoRALayer(base, r=5, scaling=0.7)
    _randomise(layer)
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        layer.lora_E[[1, 3]] = 0.0
        out = layer(x)
        old = {kind_: getattr(layer, kind_) for kind_ in KINDS}
        keep = layer.lora_E.view(-1) != 0
        expected = {k: v.detach().clone() for k, v in old.items()}
        layer.shrink(keep)
        assert layer.r == 3 and layer.kept == [True, False, True, False, True]
        assert layer.scaling == 0.7
        for kind_ in KINDS:
            new = getattr(layer, kind_)
            assert isinstance(new, nn.Parameter) and new is not old[kind_] and new.requires_grad
        torch.testing.assert_close(layer.lora_A, expected["lora_A"][[0, 2, 4]], atol=0, rtol=0)
        torch.testing.assert_close(layer.lora_E, expected["lora_E"][[0, 2, 4]], atol=0, rtol=0)
        torch.testing.assert_close(layer.lora_B, expected["lora_B"][:, [0, 2, 4]], atol=0, rtol=0)
        assert tuple(layer.lora_E.shape) == (3, 1) and layer.lora_B.shape[1] == 3
        params = dict(layer.named_parameters())
        assert all(params[k] is getattr(layer, k) for k in KINDS)
        torch.testing.assert_close(layer(x), out, atol=1e-6, rtol=1e-6)

        # a second shrink maps its keep onto the original triplets
        layer.lora_E[1] = 0.0
        out = layer(x)
        layer.shrink(torch.tensor([True, False, True]))
        assert layer.r == 2 and layer.kept == [True, False, False, False, True]
        torch.testing.assert_close(layer(x), out, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "kind",
    [
        "conv1d",
        "conv2d",
        "linear",
    ],
)
def test_shrink_to_zero_ranks_leaves_the_base_layer(kind: str) -> None:
    make, x_shape = LAYERS[kind]
    base = make()
    layer = SVDLoRALayer(base, r=3, scaling=0.7)
    _randomise(layer)
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        layer.shrink(torch.tensor([True, False, True]))
        layer.shrink(torch.zeros(2, dtype=torch.bool))
        assert layer.r == 0 and layer.kept == [False] * 3
        assert layer.lora_A.shape[0] == 0 and tuple(layer.lora_E.shape) == (0, 1) and layer.lora_B.shape[1] == 0
        torch.testing.assert_close(layer.delta_weight(), torch.zeros_like(base.weight), atol=0, rtol=0)
        layer.merge()  # merging an empty update leaves the weight as it was
        torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)
        layer.unmerge()
        torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)


def test_shrink_refuses_a_wrong_keep_or_a_merged_layer() -> None:
    layer = SVDLoRALayer(_linear(), r=3, scaling=1.0)
    with pytest.raises(ValueError, match="rank 3"):
        layer.shrink(torch.ones(4, dtype=torch.bool))
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.shrink(torch.ones(3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------- 7. config
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 4, "target_r": 5}, "target_r=5 is larger than the initial rank r=4"),
        ({"target_r": -1}, "target_r must be an integer >= 0"),
        ({"tinit": 5, "tfinal": 5, "total_step": 10}, r"tinit \(5\) \+ tfinal \(5\) must be smaller than total_step"),
        ({"tinit": 6, "tfinal": 5, "total_step": 10}, "must be smaller than total_step"),
        ({"tinit": -1}, "tinit and tfinal must be >= 0"),
        ({"beta1": 0.0}, r"beta1 must be in \(0, 1\)"),
        ({"beta1": 1.0}, r"beta1 must be in \(0, 1\)"),
        ({"beta1": -0.5}, r"beta1 must be in \(0, 1\)"),
        ({"beta1": 1.5}, r"beta1 must be in \(0, 1\)"),
        ({"beta2": 0.0}, r"beta2 must be in \(0, 1\)"),
        ({"beta2": 1.0}, r"beta2 must be in \(0, 1\)"),
        ({"beta2": -0.1}, r"beta2 must be in \(0, 1\)"),
        ({"beta2": 2.0}, r"beta2 must be in \(0, 1\)"),
        ({"deltaT": 0}, "deltaT must be >= 1"),
        ({"deltaT": -3}, "deltaT must be >= 1"),
        ({"orth_reg_weight": -0.1}, "orth_reg_weight must be >= 0"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    base = {"r": 4, "target_r": 2, "target_modules": ["fc1"]}
    with pytest.raises(ValueError, match=message):
        AdaLoRAConfig(**{**base, **kwargs})


def test_config_defaults_and_schedule_checked_against_the_trainers_total_step() -> None:
    config = AdaLoRAConfig(r=4, target_r=4, target_modules=["fc1"], tinit=3, tfinal=3)
    assert config.init == "gaussian" and config.scaling == config.alpha / 4 and config.total_step is None
    model = FAMILIES["mlp"](seed=0)
    with torch.random.fork_rng(devices=[]):
        inject_adapters(model, config)
    layers = list(adapter_layers(model))
    with pytest.raises(ValueError, match="must be smaller than total_step"):
        RankAllocator(layers, config, total_step=6)
    assert RankAllocator(layers, config, total_step=7).total_step == 7
    with pytest.raises(ValueError, match="at least one"):
        RankAllocator([], config, total_step=7)
