"""SpIEL's drop-and-regrow schedule (Ansell et al. 2024, "Scaling Sparse Fine-Tuning to Large Language Models").

SpIEL trains a fixed number of scalar entries of the base weights whose *positions change* during training.
Every tensor ``i`` has its own count ``k_i`` (the budget spread in proportion to its size); the set starts
uniformly at random and, every ``reselection_steps`` optimizer steps, the entries that moved least from their
pretrained value are dropped and as many new ones are grown where the accumulated gradient is largest (the
RigL-like variant of the paper, ``selection_algorithm="rigl"`` in the reference). The count per tensor, so the
budget, never changes.

This module holds the decisions, in pure torch; the trained values live in
:mod:`lightning_peft.adapters.sparse` and the Lightning shell in :mod:`lightning_peft.callbacks.spiel`.

**Schedule** (``R = reselection_steps``, ``A = accumulation_steps``, ``T = total_steps``; ``step`` is the 0-based
index of an optimizer step, ``completed`` the number of optimizer steps done):

* gradients are accumulated during the backward passes (every micro-batch) of steps ``0 .. A-1`` and, for
  ``k >= 1``, of steps ``kR-1 .. kR+A-1`` (``A + 1`` steps: the reference opens its window when
  ``(completed + 1) % R == 0`` and closes it when ``completed % R == A``); a window whose update would come
  after ``T`` is not opened;
* update ``k`` comes once ``completed = kR + A`` (:meth:`SpIELSelector.update_due`) and changes the share
  ``p`` of each tensor's entries. ``decay="linear"`` (the reference's default): ``p = 1`` at the first update
  (``completed == A``: the random start is replaced wholesale by gradient-chosen entries), then
  ``p = drop_fraction · (1 - completed / T)``. ``"cosine"``: ``p = drop_fraction · (1 + cos(π completed / T)) / 2``
  from the first update on (the reference makes no wholesale first update under this policy). No update once
  ``completed > T``.

**Candidates.** The first gradient of a tensor in a window picks its candidates, the ``k_i`` entries of largest
``|g|`` (active entries included); later gradients of the window are added at those candidates only, so the
accumulator is O(budget), never model-sized (:meth:`SpIELSelector.observe`).

**Drop and regrow** (:meth:`SpIELSelector.regrow`, one tensor): ``n = int(k_i · p)``; the ``n`` active entries of
smallest ``|Δ|`` are the outgoing ones; candidates that stay active are removed; the ``min(n, #left)`` candidates
of largest ``|accumulated g|`` are the incoming ones; an entry both outgoing and incoming stays (with its value);
the rest of the outgoing list, smallest ``|Δ|`` first, is cut to the number of incoming ones. Dropped entries
return to their pretrained value (the reference sets their delta to zero) and incoming ones start at zero.

Differences from the reference (``AlanAnsell/peft``, ``src/peft/tuners/sft/trainer.py`` ``SftSelector``,
``layer.py`` ``SparseDelta``, ``model.py`` ``SftModel``):

* **ties** are broken by flat position (lower first) in both the drop and the regrow order, and in the choice of
  candidates; the reference uses ``torch.topk``, whose order among equal values is unspecified;
* **the initial set** is drawn from a generator seeded by ``(seed, tensor ordinal)``
  (:func:`lightning_peft.seeding.seeded_generator`), so every rank and every rerun draws the same; the reference
  draws from the global RNG (``torch.rand`` then ``topk``): the same distribution (uniform, without replacement);
* **the budget** is a count or a fraction of the *targeted* entries; the reference's ``density`` is a fraction of
  all the model's parameters; both give tensor ``i`` ``floor(budget · n_i / N_targeted)`` entries;
* **optimizer moments** of incoming entries start at zero (the bank's slots are reset); the reference seeds
  AdamW's ``exp_avg`` / ``exp_avg_sq`` from the window's mean gradient and squared gradient with a per-entry step
  count (``age``), which needs its own ``SftAdamW``; here any torch optimizer works;
* **several ranks**: the gradient each window sees is averaged across ranks first (the callback does it), so every
  rank makes the same choice; the reference's hooks read each rank's own gradient;
* not implemented: the SM3-moment variant (it needs the SM3 optimizer's row/column accumulators),
  ``sample_for_growth`` and ``candidate_reselection_steps``.

Example:
    >>> sel = SpIELSelector(reselection_steps=4, accumulation_steps=2, drop_fraction=0.5, total_steps=12)
    >>> [s for s in range(12) if sel.accumulating(s)], [c for c in range(13) if sel.update_due(c)]
    ([0, 1, 3, 4, 5, 7, 8, 9], [2, 6, 10])
    >>> sel.proportion(2), sel.proportion(6)
    (1.0, 0.25)
    >>> sel.observe("w", torch.tensor([0.0, 3.0, -1.0, 0.5, -2.0, 0.0]), count=2)
    >>> sel.observe("w", torch.tensor([0.0, 1.0, 0.0, 0.0, -3.0, 0.0]), count=2)
    >>> drop, grow = sel.regrow("w", torch.tensor([0, 5]), torch.tensor([0.1, -0.01]), p=1.0)
    >>> drop.tolist(), grow.tolist()
    ([5, 0], [4, 1])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch

from lightning_peft.methods._config import refuse_changed
from lightning_peft.seeding import seeded_generator

__all__ = ["SpIELSelector", "split_budget"]

_CONFIG = ("reselection_steps", "accumulation_steps", "drop_fraction", "decay", "total_steps", "seed")


def split_budget(budget: int, sizes: list[int]) -> list[int]:
    """Each tensor's count, ``floor(budget · n_i / Σ n)`` (the reference's rule; the counts may sum to < budget).

    Example:
        >>> split_budget(10, [30, 60, 9])
        [3, 6, 0]
    """
    total = sum(sizes)
    return [budget * n // total for n in sizes]


def _top(scores: torch.Tensor, n: int, descending: bool) -> torch.Tensor:
    """Positions of the ``n`` first of ``scores`` in the given order, ties by position (a stable sort)."""
    return torch.sort(scores, descending=descending, stable=True).indices[:n]


class SpIELSelector:
    """When SpIEL accumulates gradients and updates, and which entries it drops and grows.

    Args:
        reselection_steps: ``R``, optimizer steps between updates (>= 3).
        accumulation_steps: ``A``, optimizer steps of gradient accumulation before the first update (>= 1,
            <= ``R - 2``: the reference's windows would overlap otherwise).
        drop_fraction: the share of each tensor's entries changed at the second update, in (0, 1]; it decays to
            0 at ``total_steps`` (the reference's ``initial_reselection_rate``).
        decay: ``"linear"`` (the reference's default) or ``"cosine"``.
        total_steps: ``T``, the run's optimizer steps (>= 1).
        seed: seed of the initial random selection.

    Raises:
        ValueError: a value out of range, naming it and what would be accepted.
    """

    def __init__(
        self,
        reselection_steps: int = 20,
        accumulation_steps: int = 5,
        drop_fraction: float = 0.2,
        decay: Literal["linear", "cosine"] = "linear",
        total_steps: int = 1,
        seed: int = 0,
    ) -> None:
        for name, value in (("reselection_steps", reselection_steps), ("accumulation_steps", accumulation_steps)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"SpIEL {name} must be an int, got {value!r}")
        if reselection_steps < 3:
            raise ValueError(f"SpIEL reselection_steps must be >= 3, got {reselection_steps}")
        if not 1 <= accumulation_steps <= reselection_steps - 2:
            raise ValueError(
                f"SpIEL accumulation_steps must be in [1, reselection_steps - 2] = [1, {reselection_steps - 2}] "
                f"(a window of gradients must close before the next one opens), got {accumulation_steps}"
            )
        if isinstance(drop_fraction, bool) or not 0.0 < drop_fraction <= 1.0:
            raise ValueError(f"SpIEL drop_fraction must be in (0, 1], got {drop_fraction!r}")
        if decay not in ("linear", "cosine"):
            raise ValueError(f"SpIEL decay must be 'linear' or 'cosine', got {decay!r}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"SpIEL total_steps must be an int >= 1, got {total_steps!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"SpIEL seed must be an int, got {seed!r}")
        self.reselection_steps, self.accumulation_steps = reselection_steps, accumulation_steps
        self.drop_fraction, self.decay, self.total_steps, self.seed = float(drop_fraction), decay, total_steps, seed
        #: per tensor key: candidate flat positions (sorted) and their accumulated gradient (float32)
        self.candidates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.updates = 0  # updates made so far

    # ------------------------------------------------------------------------------------------- schedule
    def accumulating(self, step: int) -> bool:
        """Whether the gradients of optimizer step ``step`` (0-based) are accumulated."""
        r, a = self.reselection_steps, self.accumulation_steps
        if step < a:
            return a <= self.total_steps
        done = step + 1  # the window of update k >= 1 holds the steps that complete kR .. kR + A
        return done >= r and done % r <= a and done - done % r + a <= self.total_steps

    def update_due(self, completed: int) -> bool:
        """Whether an update comes once ``completed`` optimizer steps are done."""
        return 0 < completed <= self.total_steps and completed % self.reselection_steps == self.accumulation_steps

    def proportion(self, completed: int) -> float:
        """``p``, the share of each tensor's entries the update at ``completed`` may change."""
        frac = completed / self.total_steps
        if self.decay == "linear":
            return 1.0 if completed == self.accumulation_steps else self.drop_fraction * (1.0 - frac)
        return self.drop_fraction * (1.0 + math.cos(math.pi * frac)) / 2.0

    @torch.no_grad()
    def initial(self, ordinal: int, numel: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The starting entries of tensor number ``ordinal``: ``count`` flat positions, uniform, sorted, seeded."""
        gen = seeded_generator(self.seed, ordinal)
        return torch.randperm(numel, generator=gen)[:count].sort().values.to(device)

    # ------------------------------------------------------------------------------------------- gradients
    @torch.no_grad()
    def observe(
        self,
        key: str,
        grad: torch.Tensor,
        count: int,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """Add one backward's dense gradient of tensor ``key`` to the window's accumulator.

        The first gradient of the window picks the ``count`` candidates (largest ``|g|``, ties by position); later
        ones are added at the candidates only. ``reduce`` (e.g. a cross-rank mean) is applied to what is kept: the
        whole gradient the first time, the candidates' values after that.
        """
        flat = grad.detach().reshape(-1)
        held = self.candidates.get(key)
        if held is None:
            if count <= 0:
                return
            dense = flat.float().clone()
            if reduce is not None:
                dense = reduce(dense)
            picked = _top(dense.abs(), count, descending=True).sort().values
            self.candidates[key] = (picked, dense[picked].clone())
            return
        indices, total = held
        values = flat.index_select(0, indices.to(flat.device)).float()
        if reduce is not None:
            values = reduce(values)
        total.add_(values.to(total.device))

    def clear(self) -> None:
        """Forget the window's gradients (after an update)."""
        self.candidates = {}

    # ------------------------------------------------------------------------------------------- drop / regrow
    @torch.no_grad()
    def regrow(
        self, key: str, active: torch.Tensor, deltas: torch.Tensor, p: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(drop, grow)``: flat positions of tensor ``key`` to stop and to start training (equal lengths).

        Args:
            key: the tensor.
            active: flat positions of its active entries.
            deltas: their learned deltas from the pretrained values (aligned with ``active``).
            p: the share of ``len(active)`` that may change (:meth:`proportion`).

        ``drop`` is ordered by ``|Δ|`` (smallest first), ``grow`` by accumulated ``|g|`` (largest first). Without
        gradients for ``key`` this window, nothing changes.
        """
        empty = torch.empty(0, dtype=torch.long, device=active.device)
        held = self.candidates.get(key)
        n = int(active.numel() * p)
        if held is None or n <= 0:
            return empty, empty
        cand, grads = held[0].to(active.device), held[1].to(active.device)
        order = active.argsort()  # ties by position: sort the entries by position first
        active, deltas = active[order], deltas[order].float()
        outgoing = active[_top(deltas.abs(), n, descending=False)]
        remaining = active[~torch.isin(active, outgoing)]
        valid = ~torch.isin(cand, remaining)
        cand, grads = cand[valid], grads[valid]
        incoming = cand[_top(grads.abs(), min(n, cand.numel()), descending=True)]
        both_in = torch.isin(incoming, outgoing)
        outgoing = outgoing[~torch.isin(outgoing, incoming)]
        incoming = incoming[~both_in]
        return outgoing[: incoming.numel()], incoming

    # ------------------------------------------------------------------------------------------- state
    def config(self) -> dict[str, Any]:
        """The configuration (checked on resume)."""
        return {k: getattr(self, k) for k in _CONFIG}

    def state_dict(self) -> dict[str, Any]:
        """Configuration, update count and the open window's candidates (tensors), for an exact resume."""
        return {
            **self.config(),
            "updates": self.updates,
            "candidates": {k: {"indices": i.cpu(), "grads": g.cpu()} for k, (i, g) in self.candidates.items()},
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        """Restore what :meth:`state_dict` gave.

        Raises:
            ValueError: the checkpoint's selector was configured differently (naming the fields).
        """
        refuse_changed(self.config(), state, "SpIEL selector", _CONFIG)
        self.updates = int(state.get("updates", 0))
        self.candidates = {
            k: (v["indices"].to(device), v["grads"].to(device)) for k, v in state.get("candidates", {}).items()
        }
