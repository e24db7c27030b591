"""The sparse delta core: gradients, O(k) state, optimizer equivalence, lazy merge, hooks, checkpoints, saving."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import FAMILIES, example_inputs, forward
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_peft.adapters.sparse import (
    SparseDeltaBank,
    SparseDeltaLayer,
    apply_sparse_delta,
    inject_sparse,
    remove_sparse,
    reset_optimizer_slots,
    sparse_bank,
    sparse_layers,
    sparse_state_dict,
)

# ----------------------------------------------------------------------------------------------- helpers


def _module(kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(6, 5)
    if kind == "conv2d":
        return nn.Conv2d(3, 4, kernel_size=3, padding=1)
    if kind == "conv1d":
        return Conv1D(5, 6)  # transformers: weight (in=6, out=5)
    if kind == "layernorm":
        return nn.LayerNorm(6)
    if kind == "embedding":
        return nn.Embedding(10, 6)
    raise KeyError(kind)


def _input(kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "conv2d":
        return torch.randn(2, 3, 5, 5, generator=gen)
    if kind == "embedding":
        return torch.randint(0, 10, (2, 7), generator=gen)
    return torch.randn(2, 3, 6, generator=gen)


def _pick(numel: int, n: int, seed: int) -> torch.Tensor:
    return torch.randperm(numel, generator=torch.Generator().manual_seed(seed))[:n]


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _grads(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.grad is not None]


# ----------------------------------------------------------------------------------------------- 1, 2: the gradient


@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv1d", "layernorm", "embedding"])
def test_bank_gradient_equals_dense_masked_gradient(kind: str) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    base = _module(kind)
    names = ("weight", "bias") if kind in ("linear", "conv2d", "layernorm") else ("weight",)
    model = nn.Sequential(copy.deepcopy(base))
    bank = inject_sparse(model, {"0": names}, capacity=40)
    layer = dict(sparse_layers(model))["0"]
    dense = copy.deepcopy(base)
    chosen = {}
    for i, name in enumerate(names):
        weight = getattr(base, name)
        chosen[name] = _pick(weight.numel(), min(7, weight.numel() - 1), seed=i)
        slots = layer.add(name, chosen[name])
        delta = torch.randn(slots.numel(), generator=gen)
        with torch.no_grad():
            bank.values[slots] = delta
            getattr(dense, name).view(-1)[chosen[name]] += delta
    x = _input(kind, gen)
    out, ref = model(x), dense(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    probe = torch.randn(ref.shape, generator=gen)
    (out * probe).sum().backward()
    (ref * probe).sum().backward()
    for name in names:
        slots = layer.active_slots(name)
        positions = layer.active_indices(name)
        torch.testing.assert_close(
            bank.values.grad[slots], getattr(dense, name).grad.view(-1)[positions], atol=1e-6, rtol=0
        )
    # O(k): the only gradient is the bank's, base weights have none
    assert _grads(model) == ["0.sparse_delta_bank.values"]
    assert bank.values.grad.shape == (40,)
    assert all(p.grad is None and not p.requires_grad for p in layer.base_layer.parameters())
    free = ~bank.in_use
    assert not bool(bank.values.grad[free].any())


def test_module_called_twice_accumulates_like_dense() -> None:
    torch.manual_seed(0)
    base = nn.Linear(4, 4)
    model = nn.Sequential(copy.deepcopy(base))
    bank = inject_sparse(model, {"0": ("weight",)}, capacity=8)
    layer = dict(sparse_layers(model))["0"]
    layer.add("weight", torch.tensor([0, 5, 15]))
    dense = copy.deepcopy(base)
    x = torch.randn(3, 4)
    model(model(x)).square().sum().backward()
    dense(dense(x)).square().sum().backward()
    torch.testing.assert_close(bank.values.grad[:3], dense.weight.grad.view(-1)[[0, 5, 15]], atol=1e-6, rtol=0)


def test_no_grad_forward_has_no_tap_and_bf16_weights_merge_from_base() -> None:
    torch.manual_seed(0)
    base = nn.Linear(4, 3).to(torch.bfloat16)
    original = base.weight.detach().clone()
    model = nn.Sequential(base)
    bank = inject_sparse(model, {"0": ("weight",)}, capacity=4)
    layer = dict(sparse_layers(model))["0"]
    slots = layer.add("weight", torch.tensor([1, 2]))
    with torch.no_grad():
        bank.values[slots] = torch.tensor([1e-3, 0.25])
        out = model(torch.randn(2, 4, dtype=torch.bfloat16))
    assert out.grad_fn is None
    expected = original.clone().view(-1)
    expected[[1, 2]] = (original.view(-1)[[1, 2]].float() + bank.values[slots]).to(torch.bfloat16)
    assert torch.equal(layer.base_layer.weight.view(-1), expected)
    # many tiny steps never accumulate rounding: the weight is recomputed from the pretrained value each time
    for _ in range(20):
        with torch.no_grad():
            bank.values[slots] += 1e-5
        model(torch.randn(2, 4, dtype=torch.bfloat16))
    expected[[1, 2]] = (original.view(-1)[[1, 2]].float() + bank.values[slots]).to(torch.bfloat16)
    assert torch.equal(layer.base_layer.weight.view(-1), expected)


# ----------------------------------------------------------------------------------------------- 3: optimizer


def test_adamw_on_bank_equals_dense_masked_adamw_including_growth() -> None:
    base = _net()
    model = copy.deepcopy(base)
    bank = inject_sparse(model, {"0": ("weight",), "2": ("weight", "bias")}, capacity=30)
    layers = dict(sparse_layers(model))
    dense = copy.deepcopy(base)
    for p in dense.parameters():
        p.requires_grad_(False)
    params = {"0.weight": dense[0].weight, "2.weight": dense[2].weight, "2.bias": dense[2].bias}
    for p in params.values():
        p.requires_grad_(True)
    masks = {k: torch.zeros(p.numel(), dtype=torch.bool) for k, p in params.items()}

    def grow(key: str, idx: torch.Tensor) -> None:
        module, name = key.split(".")
        layers[module].add(name, idx)
        masks[key][idx] = True

    grow("0.weight", _pick(48, 6, seed=0))
    grow("2.weight", _pick(24, 4, seed=1))
    opt = torch.optim.AdamW([bank.values], lr=0.05, weight_decay=0.0, foreach=False)
    dense_opt = torch.optim.AdamW(list(params.values()), lr=0.05, weight_decay=0.0, foreach=False)
    gen = torch.Generator().manual_seed(3)
    for step in range(8):
        if step == 3:  # the selection grows mid-run: new entries start with zero moments, like masked ones
            chosen = torch.nonzero(masks["0.weight"]).squeeze(1)
            free = torch.tensor([i for i in range(48) if i not in set(chosen.tolist())])
            grow("0.weight", free[:5])
            grow("2.bias", torch.tensor([0, 2]))
        if step == 5:
            grow("2.weight", torch.tensor([i for i in range(24) if not masks["2.weight"][i]][:3]))
        x, y = torch.randn(5, 6, generator=gen), torch.randn(5, 3, generator=gen)
        opt.zero_grad()
        dense_opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        nn.functional.mse_loss(dense(x), y).backward()
        for key, p in params.items():
            p.grad.view(-1)[~masks[key]] = 0.0
        opt.step()
        dense_opt.step()
    with torch.no_grad():
        model(torch.zeros(1, 6))  # sync
    torch.testing.assert_close(layers["0"].base_layer.weight, dense[0].weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(layers["2"].base_layer.weight, dense[2].weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(layers["2"].base_layer.bias, dense[2].bias, atol=1e-6, rtol=0)
    assert bank.used == 6 + 4 + 5 + 2 + 3
    # entries never selected did not move
    untouched = ~masks["0.weight"]
    assert torch.equal(layers["0"].base_layer.weight.view(-1)[untouched], base[0].weight.view(-1)[untouched])


# ----------------------------------------------------------------------------------------------- 4: lazy sync


def test_forward_syncs_only_after_the_bank_changed() -> None:
    base = _net()
    model = copy.deepcopy(base)
    bank = inject_sparse(model, {"0": ("weight",)}, capacity=8)
    layer = dict(sparse_layers(model))["0"]
    idx = torch.tensor([1, 7, 30])
    layer.add("weight", idx)
    opt = torch.optim.SGD([bank.values], lr=0.5)
    x = torch.randn(4, 6)
    model(x).sum().backward()
    opt.step()
    weight = layer.base_layer.weight
    before = weight._version
    out = model(x)
    assert weight._version > before  # the step was merged into the weight
    expected_w = base[0].weight.detach().clone()
    expected_w.view(-1)[idx] += bank.values[:3].detach()
    ref = copy.deepcopy(base)
    with torch.no_grad():
        ref[0].weight.copy_(expected_w)
    torch.testing.assert_close(out, ref(x), atol=1e-6, rtol=0)
    synced = weight._version
    model(x)
    with torch.no_grad():
        model(x)
    assert weight._version == synced  # no step in between: no rewrite
    layer.sync()
    layer.sync()  # idempotent
    torch.testing.assert_close(weight, expected_w, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------- 5: hook


def test_grad_hook_sees_dense_gradient_even_without_active_entries() -> None:
    base = _net()
    model = copy.deepcopy(base)
    inject_sparse(model, {"0": ("weight",), "2": ("weight", "bias")}, capacity=8)
    layers = dict(sparse_layers(model))
    layers["0"].add("weight", torch.tensor([3, 4]))  # layer "2" has no entry yet
    seen: dict[str, torch.Tensor] = {}

    def hook(layer: SparseDeltaLayer, name: str, grad: torch.Tensor) -> None:
        key = next(k for k, v in layers.items() if v is layer)
        seen[f"{key}.{name}"] = grad.clone()

    for layer in layers.values():
        layer.grad_hook = hook
    dense = copy.deepcopy(base)
    x = torch.randn(4, 6)
    model(x).square().sum().backward()
    dense(x).square().sum().backward()
    assert sorted(seen) == ["0.weight", "2.bias", "2.weight"]
    torch.testing.assert_close(seen["0.weight"], dense[0].weight.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(seen["2.weight"], dense[2].weight.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(seen["2.bias"], dense[2].bias.grad, atol=1e-6, rtol=0)

    # no hook and no entry: the base module alone, no autograd node at all
    layers["2"].grad_hook = None
    out = layers["2"](torch.randn(2, 8))
    assert out.grad_fn is None
    layers["2"].grad_hook = hook
    assert layers["2"](torch.randn(2, 8)).grad_fn is not None


# ----------------------------------------------------------------------------------------------- 6: retire / re-add


def test_retire_keeps_what_was_learned_and_re_add_resumes_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    original = model[0].weight.detach().clone()
    bank = inject_sparse(model, {"0": ("weight",)}, capacity=3)
    layer = dict(sparse_layers(model))["0"]
    assert layer.add("weight", torch.tensor([2, 9, 11])).tolist() == [0, 1, 2]
    opt = torch.optim.Adam([bank.values], lr=0.1)
    x = torch.randn(5, 4)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    learned = bank.values.detach().clone()
    freed = layer.retire("weight", torch.tensor([9]))  # no forward since the last step: retire merges it itself
    assert freed.tolist() == [1]
    assert reset_optimizer_slots(opt, bank.values, freed) == ["exp_avg", "exp_avg_sq"]
    assert opt.state[bank.values]["exp_avg"][1] == 0 and opt.state[bank.values]["exp_avg_sq"][1] == 0
    assert opt.state[bank.values]["exp_avg"][0] != 0
    assert bank.used == 2 and not bool(bank.in_use[1]) and bank.values[1] == 0
    assert layer.active_count() == 2 and layer.selected_count() == 3
    weight = layer.base_layer.weight.view(-1)
    torch.testing.assert_close(weight[9], original.view(-1)[9] + learned[1])
    idx, delta = layer.delta("weight")
    assert idx.tolist() == [2, 9, 11]
    torch.testing.assert_close(delta, learned[[0, 1, 2]])

    # the retired entry no longer trains; the freed slot stays zero (its moments were reset)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    model(x)
    torch.testing.assert_close(weight[9], original.view(-1)[9] + learned[1])
    assert bank.values[1] == 0

    # a new entry reuses the lowest free slot; a full bank refuses more, changing nothing
    assert layer.add("weight", torch.tensor([0])).tolist() == [1]
    with pytest.raises(ValueError, match=r"sparse budget \(capacity 3\) is full"):
        layer.add("weight", torch.tensor([9]))
    assert layer.active_count() == 3 and bank.used == 3
    freed = layer.retire("weight", torch.tensor([0, 2]))
    reset_optimizer_slots(opt, bank.values, freed)
    # re-adding the retired entry resumes from its learned delta, and the weight does not jump
    before = weight.detach().clone()
    slot = layer.add("weight", torch.tensor([9]))
    assert slot.tolist() == [0]
    torch.testing.assert_close(bank.values[0], learned[1])
    model(x)
    torch.testing.assert_close(weight, before)
    idx, delta = layer.delta("weight")
    assert idx.tolist() == [0, 2, 9, 11]
    assert layer.active_indices("weight").tolist() == [9, 11]


def test_forget_sends_retired_entries_back_to_the_base_and_out_of_the_buffers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    original = model[0].weight.detach().clone().view(-1)
    bank = inject_sparse(model, {"0": ("weight",)}, capacity=3)
    layer = dict(sparse_layers(model))["0"]
    layer.add("weight", torch.tensor([2, 9, 11]))
    with torch.no_grad():
        bank.values.copy_(torch.tensor([0.5, -0.25, 0.125]))
    layer.retire("weight", torch.tensor([2, 9]))
    weight = layer.base_layer.weight.view(-1)
    torch.testing.assert_close(weight[2], original[2] + 0.5)  # retired: the learned delta stays in the weight
    with pytest.raises(ValueError, match="not retired entries"):
        layer.forget("weight", torch.tensor([9, 11]))  # 11 is active
    with pytest.raises(ValueError, match="not retired entries"):
        layer.forget("weight", torch.tensor([3]))  # never selected
    assert layer.selected_count() == 3  # a refusal changes nothing
    layer.forget("weight", torch.tensor([9]))
    assert layer.indices("weight").tolist() == [2, 11] and layer.selected_count() == 2
    torch.testing.assert_close(weight[9], original[9])  # back at its pretrained value
    torch.testing.assert_close(weight[2], original[2] + 0.5)
    idx, delta = layer.delta("weight")
    assert idx.tolist() == [2, 11]
    torch.testing.assert_close(delta, torch.tensor([0.5, 0.125]))
    layer.forget("weight", torch.tensor([2]))
    assert layer._buffers["sparse_weight_frozen"].numel() == 0  # no frozen delta left: the buffer is empty again
    layer.sync()  # the active entry's value (set above) reaches the weight at the next forward or sync
    torch.testing.assert_close(weight, original.clone().index_add_(0, torch.tensor([11]), torch.tensor([0.125])))
    # added again, a forgotten entry starts from the pretrained value with a fresh slot
    layer.add("weight", torch.tensor([9]))
    _, delta = layer.delta("weight")
    assert layer.indices("weight").tolist() == [11, 9] and float(delta[0]) == 0.0
    # the shrunk buffers checkpoint and load into a fresh injection
    fresh = nn.Sequential(nn.Linear(4, 4))
    fresh[0].weight.data.copy_(original.view(4, 4))
    fresh[0].bias.data.copy_(model[0].base_layer.bias)
    inject_sparse(fresh, {"0": ("weight",)}, capacity=3)
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(3, 4)
    torch.testing.assert_close(fresh(x), model(x))


def test_add_and_retire_validate_their_input() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    inject_sparse(model, {"0": ("weight",)}, capacity=10)
    layer = dict(sparse_layers(model))["0"]
    layer.add("weight", torch.tensor([1]))
    bad = [
        (torch.tensor([1.0]), "1-D int64"),
        (torch.tensor([2], dtype=torch.int32), "1-D int64"),
        (torch.tensor([[2]]), "1-D int64"),
        (torch.tensor([6]), r"\[0, 6\)"),
        (torch.tensor([-1]), r"\[0, 6\)"),
        (torch.tensor([2, 2]), "repeat"),
        (torch.tensor([1, 3]), "already active"),
    ]
    for indices, message in bad:
        with pytest.raises(ValueError, match=message):
            layer.add("weight", indices)
    with pytest.raises(ValueError, match="takes no sparse delta"):
        layer.add("bias", torch.tensor([0]))
    with pytest.raises(ValueError, match="not active"):
        layer.retire("weight", torch.tensor([1, 4]))
    assert layer.indices("weight").tolist() == [1] and layer.bank.used == 1


def test_unmerge_runs_the_base_model_and_merge_restores() -> None:
    base = _net()
    model = copy.deepcopy(base)
    bank = inject_sparse(model, {"0": ("weight",)}, capacity=4)
    layer = dict(sparse_layers(model))["0"]
    slots = layer.add("weight", torch.tensor([0, 1]))
    with torch.no_grad():
        bank.values[slots] = 1.0
    x = torch.randn(2, 6)
    tuned = model(x)
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(model(x), base(x))
    layer.merge()
    torch.testing.assert_close(model(x), tuned)


# ----------------------------------------------------------------------------------------------- 7: checkpoint resume


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 6, generator=gen)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_state_dict_with_grown_buffers_loads_into_a_fresh_injection() -> None:
    base = _net()
    targets = {"0": ("weight", "bias"), "2": ("weight",)}
    model = copy.deepcopy(base)
    bank = inject_sparse(model, targets, capacity=20)
    layers = dict(sparse_layers(model))
    opt = torch.optim.AdamW([bank.values], lr=0.05)
    layers["0"].add("weight", _pick(48, 5, seed=0))
    _train(model, opt, 2, seed=0)
    layers["0"].add("bias", torch.tensor([1, 6]))
    layers["2"].add("weight", _pick(24, 4, seed=1))
    _train(model, opt, 2, seed=1)
    freed = layers["0"].retire("weight", layers["0"].active_indices("weight")[:2])
    reset_optimizer_slots(opt, bank.values, freed)
    _train(model, opt, 1, seed=2)
    state, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())

    fresh = copy.deepcopy(base)
    fresh_bank = inject_sparse(fresh, targets, capacity=20)
    fresh.load_state_dict(state)  # strict: the per-parameter buffers take the checkpoint's sizes
    fresh_opt = torch.optim.AdamW([fresh_bank.values], lr=0.05)
    fresh_opt.load_state_dict(opt_state)
    assert fresh_bank.used == bank.used
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = torch.randn(3, 6)
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
    for name, layer in sparse_layers(fresh):
        for pname in layer.param_names:
            for a, b in zip(layer.delta(pname), layers[name].delta(pname), strict=True):
                assert torch.equal(a, b)
    # training goes on identically, and the resumed bank allocates the same slots
    assert fresh_bank.allocate(1).tolist() == bank.allocate(1).tolist()
    _train(model, opt, 2, seed=3)
    _train(fresh, fresh_opt, 2, seed=3)
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------- 8: saving format


def _trained(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    base = _net(seed)
    model = copy.deepcopy(base)
    bank = inject_sparse(model, {"0": ("weight", "bias"), "2": ("weight",)}, capacity=16)
    layers = dict(sparse_layers(model))
    layers["0"].add("weight", _pick(48, 6, seed=0))
    layers["2"].add("weight", torch.tensor([20, 3, 11]))
    _train(model, torch.optim.Adam([bank.values], lr=0.1), 3, seed=seed)
    return base, model


def test_sparse_state_dict_applies_onto_a_plain_base_model() -> None:
    base, model = _trained()
    tensors = sparse_state_dict(model)
    assert sorted(tensors) == ["0.weight.indices", "0.weight.values", "2.weight.indices", "2.weight.values"]
    assert tensors["2.weight.indices"].tolist() == [3, 11, 20]
    assert tensors["0.weight.values"].dtype == torch.float32 and bool(tensors["0.weight.values"].ne(0).all())
    target = copy.deepcopy(base)
    assert apply_sparse_delta(target, tensors) == ["0.weight", "2.weight"]
    x = torch.randn(5, 6)
    torch.testing.assert_close(target(x), model(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="remove_sparse"):
        apply_sparse_delta(model, tensors)


def _bad_inputs(tensors: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor], str]]:
    idx, val = tensors["2.weight.indices"], tensors["2.weight.values"]

    def with_(**changes: torch.Tensor) -> dict[str, torch.Tensor]:
        out = dict(tensors)
        for key, value in changes.items():
            out[key.replace("__", ".")] = value
        return out

    unknown = dict(tensors)
    unknown["9.weight.indices"], unknown["9.weight.values"] = idx, val
    half = dict(tensors)
    del half["2.weight.values"]
    return [
        ("out of range", with_(**{"2__weight__indices": torch.tensor([3, 11, 24])}), r"\[0, 24\)"),
        ("negative", with_(**{"2__weight__indices": torch.tensor([-1, 3, 11])}), r"\[0, 24\)"),
        ("unsorted", with_(**{"2__weight__indices": torch.tensor([11, 3, 20])}), "strictly increasing"),
        ("duplicate", with_(**{"2__weight__indices": torch.tensor([3, 3, 20])}), "strictly increasing"),
        ("int32", with_(**{"2__weight__indices": idx.int()}), "int64"),
        ("2-D", with_(**{"2__weight__indices": idx[None]}), "int64"),
        ("int values", with_(**{"2__weight__values": val.long()}), "floating"),
        ("nan", with_(**{"2__weight__values": torch.tensor([0.0, float("nan"), 1.0])}), "NaN"),
        ("length", with_(**{"2__weight__values": val[:2]}), "3 indices but 2 values"),
        ("unknown module", unknown, "does not have"),
        ("missing half", half, "pairs"),
        ("bad key", with_(**{"2__weight__scales": val}), "must be"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_apply_sparse_delta_checks_everything_before_writing(case: int) -> None:
    _, model = _trained()
    tensors = sparse_state_dict(model)
    label, bad, message = _bad_inputs(tensors)[case]
    target = _net()
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=message):
        apply_sparse_delta(target, bad)
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), (label, key)


def test_apply_sparse_delta_non_strict_skips_unknown_tensors() -> None:
    base, model = _trained()
    tensors = sparse_state_dict(model)
    tensors["9.weight.indices"], tensors["9.weight.values"] = torch.tensor([0]), torch.tensor([1.0])
    target = copy.deepcopy(base)
    assert apply_sparse_delta(target, tensors, strict=False) == ["0.weight", "2.weight"]
    x = torch.randn(2, 6)
    torch.testing.assert_close(target(x), model(x), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------- 9: inject / remove


@pytest.mark.parametrize("merge", [True, False])
def test_remove_sparse_merges_or_restores(merge: bool) -> None:
    base, model = _trained()
    x = torch.randn(3, 6)
    tuned = model(x)
    assert remove_sparse(model, merge=merge) == ["0", "2"]
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear and len(model) == 3
    assert sparse_bank(model) is None and not list(sparse_layers(model))
    assert all(p.requires_grad for p in model.parameters())  # the flags from before injection
    torch.testing.assert_close(model(x), tuned if merge else base(x), atol=0, rtol=0)


def test_inject_sparse_is_all_or_nothing() -> None:
    model = _net()
    before = copy.deepcopy(model.state_dict())
    cases = [
        ({"5": ("weight",)}, 4, "no module '5'"),
        ({"0": ("weight",), "2": ("scale",)}, 4, "no parameter 'scale'"),
        ({"0": "weight"}, 4, "tuple of parameter names"),
        ({"0": ("weight",)}, 0, "positive integer"),
        ({"0": ("weight",)}, True, "positive integer"),
        ({}, 4, "at least one target"),
    ]
    for targets, capacity, message in cases:
        with pytest.raises(ValueError, match=message):
            inject_sparse(model, targets, capacity)  # type: ignore[arg-type]
        assert [type(m) for m in model] == [nn.Linear, nn.Tanh, nn.Linear]
        assert all(p.requires_grad for p in model.parameters())
        assert model.state_dict().keys() == before.keys()
    inject_sparse(model, {"0": ("weight",)}, 4)
    with pytest.raises(ValueError, match="already has sparse deltas"):
        inject_sparse(model, {"2": ("weight",)}, 4)


def test_inject_refuses_tied_weights_and_handles_nested_targets() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 5, bias=False)
            self.head.weight = self.embed.weight

    with pytest.raises(ValueError, match="tied"):
        inject_sparse(Tied(), {"head": ("weight",)}, 4)

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * self.scale

    torch.manual_seed(0)
    base = nn.Sequential(Scaled())
    model = copy.deepcopy(base)
    bank = inject_sparse(model, {"0": ("scale",), "0.fc": ("weight",)}, 6)
    layers = dict(sparse_layers(model))
    assert sorted(layers) == ["0", "0.fc"]
    layers["0"].add("scale", torch.tensor([1]))
    layers["0.fc"].add("weight", torch.tensor([0, 7]))
    dense = copy.deepcopy(base)
    x = torch.randn(2, 4)
    model(x).sum().backward()
    dense(x).sum().backward()
    torch.testing.assert_close(bank.values.grad[0], dense[0].scale.grad[1])
    torch.testing.assert_close(bank.values.grad[1:3], dense[0].fc.weight.grad.view(-1)[[0, 7]])
    assert remove_sparse(model) == ["0", "0.fc"]
    assert type(model[0]) is Scaled and type(model[0].fc) is nn.Linear


def test_wrapped_module_attributes_stay_readable() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Embedding(7, 4))
    bank = inject_sparse(model, {"0": ("weight",), "1": ("weight",)}, 4)
    layers = dict(sparse_layers(model))
    slots = layers["1"].add("weight", torch.tensor([2]))
    with torch.no_grad():
        bank.values[slots] = 1.0
    model[1](torch.tensor([0]))  # sync
    assert model[0].in_channels == 2 and model[1].num_embeddings == 7
    assert model[1].weight is layers["1"].base_layer.weight  # holds the learned values
    with pytest.raises(AttributeError, match="SparseDeltaLayer"):
        model[0].no_such_attribute  # noqa: B018


def test_already_sharded_weights_are_refused() -> None:
    class DTensor(torch.Tensor):  # stands in for torch.distributed.tensor.DTensor (checked by name)
        pass

    layer = nn.Linear(2, 2)
    layer.weight = nn.Parameter(torch.zeros(2, 2).as_subclass(DTensor))
    with pytest.raises(NotImplementedError, match="already sharded.*inject sparse deltas into the unsharded model"):
        inject_sparse(nn.Sequential(layer), {"0": ("weight",)}, 4)


class _Shard:
    """What the FSDP2 writes read of a DTensor: FSDP2's dim-0 chunk of a (rows x cols) tensor held by ``rank``."""

    def __init__(self, full: torch.Tensor, rank: int, world: int) -> None:
        from types import SimpleNamespace

        chunk = -(-full.shape[0] // world)
        self.shape, self._full = full.shape, full
        self._local_tensor = full[rank * chunk : (rank + 1) * chunk].clone()
        self.placements = (SimpleNamespace(is_shard=lambda dim: dim == 0),)
        self.device_mesh = SimpleNamespace(size=lambda: world, get_local_rank=lambda: rank)

    def numel(self) -> int:
        return self._full.numel()

    def full_tensor(self) -> torch.Tensor:  # marks it as a DTensor for the sparse module
        raise AssertionError("the writes must not gather")


@pytest.mark.parametrize("rows", [5, 6, 1])
def test_fsdp2_writes_go_to_the_owning_shard_only(rows: int) -> None:
    from lightning_peft.adapters.sparse import _write_entries

    full = torch.arange(rows * 3, dtype=torch.float32).view(rows, 3)
    positions = torch.arange(0, rows * 3, 2)
    expected = full.clone()
    expected.view(-1)[positions] = -1.0
    shards = [_Shard(full, rank, 2) for rank in (0, 1)]
    for shard in shards:
        _write_entries(shard, positions, torch.full((positions.numel(),), -1.0))  # type: ignore[arg-type]
    assert torch.equal(torch.cat([s._local_tensor for s in shards]), expected)  # uneven rows: the last chunk is short


def test_bank_bookkeeping() -> None:
    bank = SparseDeltaBank(5)
    assert bank.allocate(2).tolist() == [0, 1]
    assert bank.allocate(2).tolist() == [2, 3]
    bank.release(torch.tensor([0, 2]))
    assert bank.used == 2 and bank.free == 3
    assert bank.allocate(3).tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match="is full"):
        bank.allocate(1)
    with pytest.raises(ValueError, match="not in use"):
        bank.release(torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="capacity"):
        SparseDeltaBank(-1)


# ----------------------------------------------------------------------------------------------- tiny model table


def _targets(model: nn.Module) -> dict[str, tuple[str, ...]]:
    shared: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        shared[id(p)] = shared.get(id(p), 0) + 1
    out = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None and weight.dim() >= 2 and shared[id(weight)] == 1:
            out[name] = ("weight",)
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_model_table_train_save_apply_resume(family: str) -> None:
    base = FAMILIES[family](seed=0).eval().requires_grad_(False)  # callers decide about the other parameters
    targets = _targets(base)
    model = copy.deepcopy(base)
    bank = inject_sparse(model, targets, capacity=4 * len(targets))
    for i, (_, layer) in enumerate(sparse_layers(model)):
        layer.add("weight", _pick(layer.base_layer.weight.numel(), 3, seed=i))
    opt = torch.optim.Adam([bank.values], lr=0.05)
    inputs = example_inputs(family, model)
    for _ in range(2):
        opt.zero_grad()
        forward(family, model).float().square().mean().backward()
        opt.step()
    assert [n.rsplit(".", 1)[-1] for n in _grads(model)] == ["values"]
    tuned = forward(family, model)
    assert not torch.allclose(tuned, forward(family, base))
    plain = copy.deepcopy(base)
    apply_sparse_delta(plain, sparse_state_dict(model))
    torch.testing.assert_close(forward(family, plain), tuned)
    resumed = copy.deepcopy(base)
    inject_sparse(resumed, targets, capacity=4 * len(targets))
    resumed.load_state_dict(model.state_dict())
    torch.testing.assert_close(forward(family, resumed), tuned)
    assert inputs  # the family's inputs exist (forward() builds the same ones)


def test_grad_hook_gets_the_sum_over_uses_once() -> None:
    """A layer called twice in one forward: one hook call, with the whole gradient (not the last use's share)."""
    _ = torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3))
    reference = nn.Linear(3, 3)
    reference.load_state_dict(net[0].state_dict())
    inject_sparse(net, {"0": ("weight",)}, 4)
    layer = dict(sparse_layers(net))["0"]
    seen: list[torch.Tensor] = []
    layer.grad_hook = lambda _layer, _name, grad: seen.append(grad.clone())
    x = torch.randn(2, 3)
    (net(net(x)).sum() + net(x).pow(2).sum()).backward()
    (reference(reference(x)).sum() + reference(x).pow(2).sum()).backward()
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], reference.weight.grad)
    layer.grad_hook = None


def test_flush_grad_hook_delivers_uses_without_a_backward() -> None:
    net = nn.Sequential(nn.Linear(3, 3))
    inject_sparse(net, {"0": ("weight",)}, 4)
    layer = dict(sparse_layers(net))["0"]
    seen: list[torch.Tensor] = []
    layer.grad_hook = lambda _layer, _name, grad: seen.append(grad.clone())
    x = torch.randn(2, 3)
    unused = net(x)  # noqa: F841 - its output never reaches the loss
    net(x).sum().backward()
    assert seen == []  # one of two uses came back: the hook waits for the other
    layer.flush_grad_hook()
    assert len(seen) == 1 and torch.allclose(seen[0], torch.ones(3, 1) * x.sum(0))
    layer.flush_grad_hook()
    assert len(seen) == 1
