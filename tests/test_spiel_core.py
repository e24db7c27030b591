"""SpIEL's selector (``lightning_peft.methods.spiel``) against a faithful re-implementation of the reference's rule.

``Reference`` below transcribes ``SftSelector`` of ``AlanAnsell/peft`` (``src/peft/tuners/sft/trainer.py``: ``step``,
``begin_selection_phase``, ``end_selection_phase``, ``gradient_accumulation_hook``, ``select_rigl``) onto plain tensors:
its schedule, its candidate choice (``topk`` of the first gradient of a window), its drop (``topk`` smallest
``|values|``) and regrow (``topk`` largest ``|accumulated grad|``) with the same filtering, and its reset of the
moved entries' values to zero. Both are fed the same initial sets, the same gradients (continuous random numbers,
so ``topk``'s unspecified order among ties never matters) and the same value updates, step by step.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_peft.methods.spiel import SpIELSelector, split_budget


class Reference:
    """``SftSelector`` (selection_algorithm="rigl", sample_for_growth=False), one delta per tensor name."""

    def __init__(self, deltas: dict[str, dict[str, torch.Tensor]], numel: dict[str, int], r, a, rate, policy, total):
        self.deltas, self.numel = deltas, numel  # name -> {"indices", "values"}
        self.r, self.a, self.rate, self.policy, self.total = r, a, rate, policy, total
        self.completed_steps = 0
        self.hooks_on = False
        self.updates_at: list[int] = []
        self.begin_selection_phase()

    def step(self) -> None:
        self.completed_steps += 1
        if (self.completed_steps + 1) % self.r == 0:
            self.begin_selection_phase()
        if self.completed_steps % self.r == self.a:
            self.end_selection_phase()

    def begin_selection_phase(self) -> None:
        self.reselection_scores: dict[str, tuple] = {}
        self.hooks_on = True

    def end_selection_phase(self) -> None:
        if self.completed_steps > self.total:
            return
        self.hooks_on = False
        if self.policy == "linear":
            if self.completed_steps == self.a:  # noqa: SIM108 (transcribed as the reference writes it)
                p = 1
            else:
                p = self.rate * (1 - self.completed_steps / self.total)
        else:
            p = self.rate * (1 + math.cos(math.pi * self.completed_steps / self.total)) / 2
        self.select_rigl(p)
        self.reselection_scores = {}
        self.updates_at.append(self.completed_steps)

    def hook(self, name: str, grad: torch.Tensor) -> None:
        grad = grad.reshape(-1)
        if name in self.reselection_scores:
            candidate_indices, candidate_grads, candidate_grads_sq, samples = self.reselection_scores[name]
            new_grads = grad[candidate_indices]
            candidate_grads += new_grads
            candidate_grads_sq.addcmul_(new_grads, new_grads)
            samples += 1
        else:
            num_candidates = len(self.deltas[name]["values"])
            _, candidate_indices = torch.topk(torch.abs(grad), num_candidates, largest=True, sorted=False)
            candidate_grads = grad[candidate_indices]
            self.reselection_scores[name] = (
                candidate_indices,
                candidate_grads,
                candidate_grads * candidate_grads,
                torch.ones_like(candidate_grads),
            )

    def select_rigl(self, change_proportion: float) -> None:
        for name, (candidate_indices, candidate_grads, _, _) in self.reselection_scores.items():
            delta = self.deltas[name]
            dense_numel = self.numel[name]
            num_to_reallocate = int(len(delta["values"]) * change_proportion)
            _, changing_indices = torch.topk(torch.abs(delta["values"]), num_to_reallocate, largest=False, sorted=True)
            outgoing_params = delta["indices"][changing_indices]
            is_outgoing = torch.zeros([dense_numel], dtype=torch.bool)
            is_outgoing[outgoing_params] = True
            assert torch.sum(is_outgoing) == num_to_reallocate
            is_current = torch.zeros([dense_numel], dtype=torch.bool)
            is_current[delta["indices"]] = True
            is_remaining = is_current & ~is_outgoing
            is_valid_candidate = ~is_remaining[candidate_indices]
            candidate_indices = candidate_indices[is_valid_candidate]
            candidate_grads = candidate_grads[is_valid_candidate]
            candidate_scores = torch.abs(candidate_grads)
            _, best_candidate_indices = torch.topk(
                candidate_scores, min(num_to_reallocate, len(candidate_grads)), largest=True, sorted=True
            )
            incoming_params = candidate_indices[best_candidate_indices]
            is_incoming = torch.zeros([dense_numel], dtype=torch.bool)
            is_incoming[incoming_params] = True
            assert torch.sum(is_incoming) == len(best_candidate_indices)
            outgoing_is_incoming = is_incoming[outgoing_params]
            changing_indices = changing_indices[~outgoing_is_incoming]
            incoming_is_outgoing = is_outgoing[incoming_params]
            incoming_params = incoming_params[~incoming_is_outgoing]
            changing_indices = changing_indices[: len(incoming_params)]
            delta["indices"][changing_indices] = incoming_params
            delta["values"][changing_indices] = 0.0


SIZES = {"a": 96, "b": 150, "c": 40}


def run_both(decay: str, micro: int, steps: int = 30, r: int = 6, a: int = 2, rate: float = 0.6, budget: int = 60):
    """Drive ours and the reference over ``steps`` optimizer steps; yields a comparison after every step."""
    counts = dict(zip(SIZES, split_budget(budget, list(SIZES.values())), strict=True))
    ours = SpIELSelector(r, a, rate, decay, steps, seed=7)
    start = {k: ours.initial(i, SIZES[k], counts[k]) for i, k in enumerate(SIZES)}
    mine = {k: {"active": v.clone(), "deltas": torch.zeros(v.numel())} for k, v in start.items()}
    ref = Reference(
        {k: {"indices": v.clone(), "values": torch.zeros(v.numel())} for k, v in start.items()},
        SIZES,
        r,
        a,
        rate,
        decay,
        steps,
    )
    gen = torch.Generator().manual_seed(11)
    updates = []
    for step in range(steps):
        if ours.update_due(step):  # the callback updates at the start of the step after the window closes
            p = ours.proportion(step)
            for k, state in mine.items():
                drop, grow = ours.regrow(k, state["active"], state["deltas"], p)
                assert drop.numel() == grow.numel()
                keep = ~torch.isin(state["active"], drop)
                state["active"] = torch.cat([state["active"][keep], grow])
                state["deltas"] = torch.cat([state["deltas"][keep], torch.zeros(grow.numel())])
                assert state["active"].unique().numel() == counts[k], "the budget of a tensor changed"
            ours.clear()
            updates.append(step)
        # the reference also opens a last window whose update would come after T (and never makes it); ours does not
        last = (step + 1) // r * r + a > steps
        assert ours.accumulating(step) == (ref.hooks_on and not last), f"step {step}: windows differ"
        for _ in range(micro):
            grads = {k: torch.randn(n, generator=gen) for k, n in SIZES.items()}
            if ref.hooks_on:
                for k, g in grads.items():
                    ref.hook(k, g.clone())
            if ours.accumulating(step):
                for k, g in grads.items():
                    ours.observe(k, g.clone(), counts[k])
        moves = {k: torch.randn(n, generator=gen) * 0.1 for k, n in SIZES.items()}  # the optimizer's step
        for k in SIZES:
            ref.deltas[k]["values"] += moves[k][ref.deltas[k]["indices"]]
            mine[k]["deltas"] += moves[k][mine[k]["active"]]
        ref.step()
        yield step, ref, mine, updates


@pytest.mark.parametrize(("decay", "micro"), [("linear", 1), ("linear", 2), ("cosine", 1)])
def test_selection_equals_the_reference_rule_step_by_step(decay: str, micro: int) -> None:
    compared = after_update = moved = 0
    previous = None
    for step, ref, mine, updates in run_both(decay, micro):
        if ref.updates_at and ref.updates_at[-1] == step + 1:
            continue  # the reference updated after this step; ours does at the start of the next one
        for k in SIZES:
            ref_order, our_order = ref.deltas[k]["indices"].argsort(), mine[k]["active"].argsort()
            assert torch.equal(mine[k]["active"][our_order], ref.deltas[k]["indices"][ref_order]), f"{step} {k}"
            values = ref.deltas[k]["values"][ref_order]
            torch.testing.assert_close(mine[k]["deltas"][our_order], values, rtol=0, atol=0, msg=f"{step} {k}")
        compared += 1
        after_update += bool(updates) and updates[-1] == step
        snapshot = {k: set(ref.deltas[k]["indices"].tolist()) for k in SIZES}
        if previous is not None:
            moved += sum(len(snapshot[k] - previous[k]) for k in SIZES)
        previous = snapshot
    assert ref.updates_at == updates == [2, 8, 14, 20, 26]  # completed = kR + A
    assert compared == 25 and after_update == 5
    assert moved > 40, "few entries moved: a weak test"


def test_the_first_update_replaces_the_random_start_and_later_ones_a_decaying_share() -> None:
    sel = SpIELSelector(reselection_steps=10, accumulation_steps=3, drop_fraction=0.4, total_steps=100)
    assert sel.proportion(3) == 1.0
    assert sel.proportion(13) == pytest.approx(0.4 * (1 - 13 / 100))
    cos = SpIELSelector(reselection_steps=10, accumulation_steps=3, drop_fraction=0.4, decay="cosine", total_steps=100)
    assert cos.proportion(53) == pytest.approx(0.4 * (1 + math.cos(math.pi * 0.53)) / 2)
    assert [c for c in range(120) if sel.update_due(c)] == [3, 13, 23, 33, 43, 53, 63, 73, 83, 93]
    assert [s for s in range(25) if sel.accumulating(s)] == [0, 1, 2, 9, 10, 11, 12, 19, 20, 21, 22]


def test_ties_are_broken_by_position() -> None:
    sel = SpIELSelector(reselection_steps=4, accumulation_steps=1, drop_fraction=1.0, total_steps=8)
    sel.observe("w", torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]), count=3)  # four tied: the first three
    assert sel.candidates["w"][0].tolist() == [0, 2, 3]
    drop, grow = sel.regrow("w", torch.tensor([5, 4, 1]), torch.tensor([0.2, 0.2, 0.2]), p=2 / 3)
    assert drop.tolist() == [1, 4] and grow.tolist() == [0, 2]


def test_an_entry_both_dropped_and_grown_stays() -> None:
    sel = SpIELSelector(reselection_steps=4, accumulation_steps=1, drop_fraction=1.0, total_steps=8)
    sel.observe("w", torch.tensor([0.0, 5.0, 0.0, 4.0, 0.0, 0.0]), count=2)
    drop, grow = sel.regrow("w", torch.tensor([1, 2]), torch.tensor([0.01, 0.5]), p=1.0)
    assert drop.tolist() == [2] and grow.tolist() == [3]  # 1 would leave and come back: it stays


def test_a_tensor_without_gradients_in_the_window_keeps_its_entries() -> None:
    sel = SpIELSelector(reselection_steps=4, accumulation_steps=1, drop_fraction=1.0, total_steps=8)
    drop, grow = sel.regrow("w", torch.tensor([1, 2]), torch.tensor([0.0, 0.0]), p=1.0)
    assert drop.numel() == grow.numel() == 0


def test_observe_reduces_the_first_gradient_whole_then_only_the_candidates() -> None:
    seen = []

    def reduce(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.numel())
        return t * 2

    sel = SpIELSelector(reselection_steps=4, accumulation_steps=1, total_steps=8)
    sel.observe("w", torch.tensor([0.0, -3.0, 1.0, 2.0]), count=2, reduce=reduce)
    sel.observe("w", torch.tensor([9.0, 1.0, 9.0, 1.0]), count=2, reduce=reduce)
    assert seen == [4, 2]
    indices, grads = sel.candidates["w"]
    assert indices.tolist() == [1, 3] and grads.tolist() == [-4.0, 6.0]


def test_the_initial_draw_is_seeded_and_leaves_the_global_rng_alone() -> None:
    sel = SpIELSelector(seed=3)
    state = torch.get_rng_state()
    a = sel.initial(0, 1000, 50)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)
    assert torch.equal(sel.initial(0, 1000, 50), a)
    assert a.unique().numel() == 50 and torch.equal(a, a.sort().values) and int(a.max()) < 1000
    assert not torch.equal(SpIELSelector(seed=4).initial(0, 1000, 50), a)
    assert not torch.equal(sel.initial(1, 1000, 50), a)


def test_state_dict_round_trip_continues_the_window_exactly() -> None:
    a = SpIELSelector(reselection_steps=5, accumulation_steps=2, total_steps=20, seed=1)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(30, generator=gen) for _ in range(3)]
    a.observe("w", grads[0], 6)
    b = SpIELSelector(reselection_steps=5, accumulation_steps=2, total_steps=20, seed=1)
    b.load_state_dict(a.state_dict())
    for sel in (a, b):
        sel.observe("w", grads[1], 6)
        sel.observe("w", grads[2], 6)
    active, deltas = torch.arange(0, 30, 5), torch.randn(6, generator=gen)
    assert [t.tolist() for t in a.regrow("w", active, deltas, 0.5)] == [
        t.tolist() for t in b.regrow("w", active, deltas, 0.5)
    ]
    other = SpIELSelector(reselection_steps=5, accumulation_steps=2, total_steps=20, seed=2)
    with pytest.raises(ValueError, match="seed: checkpoint 1 vs now 2"):
        other.load_state_dict(a.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reselection_steps": 2}, "reselection_steps must be >= 3"),
        ({"reselection_steps": 5.0}, "reselection_steps must be an int"),
        ({"accumulation_steps": 0}, r"accumulation_steps must be in \[1, reselection_steps - 2\]"),
        ({"reselection_steps": 6, "accumulation_steps": 5}, r"\[1, 4\]"),
        ({"drop_fraction": 0.0}, r"drop_fraction must be in \(0, 1\]"),
        ({"drop_fraction": 1.5}, r"drop_fraction must be in \(0, 1\]"),
        ({"decay": "exp"}, "decay must be 'linear' or 'cosine'"),
        ({"total_steps": 0}, "total_steps must be an int >= 1"),
        ({"seed": 1.5}, "seed must be an int"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        SpIELSelector(**kwargs)


def test_split_budget_is_the_reference_floor_rule() -> None:
    assert split_budget(100, [10, 20, 70]) == [10, 20, 70]
    assert split_budget(7, [10, 20, 70]) == [0, 1, 4]  # int(7 * n / 100) each, as SftModel.inject_adapter
