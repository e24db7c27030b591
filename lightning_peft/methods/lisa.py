"""LISA's layer sampler (Pan et al., NeurIPS 2024), pure torch: which blocks train in each interval.

Every ``interval`` optimizer steps LISA trains ``n_layers`` of the model's repeated blocks and freezes
the others. The blocks are drawn

* uniformly without replacement (the default, and the paper's and LMFlow's rule), or
* with per-block weights ``w_i`` (the paper's importance sampling) so that block ``i`` trains in an
  interval with probability ``π_i = min(1, c·w_i)``, ``c`` chosen so that ``Σ π_i = n_layers``: the
  inclusion probability is proportional to the weight, and a block whose share would exceed 1 is
  drawn in every interval while the others share the remaining draws in proportion to their
  weights (iterative capping). Only the ratios of the weights matter; a weight of 0 never trains.
  The draw is randomly ordered systematic sampling: the capped blocks, then one random offset
  ``u`` in ``[0, 1)`` and the uncapped blocks in a random order, each taking the points
  ``u, u + 1, ...`` that fall in its slice of length ``π_i``. That yields exactly ``n_layers``
  distinct blocks with exactly the inclusion probabilities ``π_i``.

The draw for interval ``k`` comes from a generator seeded by ``(seed, k)``
(:func:`lightning_peft.distributed.seeded_generator`), so

* every rank draws the same blocks without communicating,
* a run resumed at any step draws what the uninterrupted run drew (the sampler's state is its
  configuration; there is no RNG state to save), and
* the global RNG is never touched.

The reference (LMFlow's ``DynamicLayerActivationCallback``) draws uniformly from Python's global
``random`` after seeding it; that couples the choice to whatever else consumed the global stream and
cannot be replayed on resume. It has no weights. Drawing ``n_layers`` blocks one after another in
proportion to the weights of those not yet drawn (``torch.multinomial`` without replacement, what
this sampler did before) does not give inclusion probabilities proportional to the weights: weights
``[4, 2, 1, 1]`` with ``n_layers=2`` give about ``[0.81, 0.57, 0.31, 0.31]`` that way and exactly
``[1, 0.5, 0.25, 0.25]`` here.

The ``LISA`` callback (:mod:`lightning_peft.callbacks.lisa`) drives it: freezing, optimizer-state
release and multi-process training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_peft.distributed import seeded_generator
from lightning_peft.methods._config import refuse_changed

__all__ = ["LayerSampler", "inclusion_probabilities"]

#: the rule behind weighted draws; a checkpoint of weighted draws without it came from the sequential sampler
WEIGHTED_SAMPLING = "proportional-systematic"


def inclusion_probabilities(weights: Sequence[float] | torch.Tensor, n: int) -> torch.Tensor:
    """Inclusion probabilities proportional to ``w``, capped at 1: ``π_i = min(1, c·w_i)`` with ``Σ π_i = n``.

    Capping is iterative: the blocks with ``c·w_i >= 1`` get 1 and leave, ``c`` is recomputed for the
    rest from the draws left, until no new block reaches 1.

    Args:
        weights: non-negative, finite, at least ``n`` positive.
        n: how many blocks a draw takes, ``>= 1``.

    Returns:
        float64 probabilities, one per weight, each in ``[0, 1]``, summing to ``n``.

    Example:
        >>> inclusion_probabilities([4, 2, 1, 1], 2).tolist()
        [1.0, 0.5, 0.25, 0.25]
        >>> [round(p, 12) for p in inclusion_probabilities([1, 2, 3, 4], 2).tolist()]
        [0.2, 0.4, 0.6, 0.8]
    """
    w = torch.as_tensor(weights, dtype=torch.float64).clone()
    capped = torch.zeros_like(w, dtype=torch.bool)
    while True:
        left, rest = n - int(capped.sum()), float(w[~capped].sum())
        c = left / rest if left > 0 else 0.0
        newly = ~capped & (c * w >= 1)
        if not bool(newly.any()):
            break
        capped |= newly
    return torch.where(capped, torch.ones_like(w), c * w)


class LayerSampler:
    """The active blocks of every interval.

    Args:
        n_blocks: number of repeated blocks in the model.
        n_layers: blocks trained at a time, ``1 <= n_layers <= n_blocks``.
        interval: optimizer steps between switches, ``>= 1``.
        seed: seed of the draws.
        probabilities: optional per-block weights ``w_i`` (non-negative, at least ``n_layers`` positive; only
            their ratios matter). Block ``i`` then trains in an interval with probability
            ``min(1, c·w_i)``, ``c`` such that these sum to ``n_layers`` (see :func:`inclusion_probabilities`);
            with ``n_layers=1`` that is ``w_i / Σ w``. None: uniform, every block with probability
            ``n_layers / n_blocks``.

    Raises:
        ValueError: a value out of range, with what is allowed.

    Example:
        >>> sampler = LayerSampler(n_blocks=8, n_layers=2, interval=5, seed=0)
        >>> sampler.active(0) == sampler.active(4) == LayerSampler(8, 2, 5, seed=0).active(3)
        True
        >>> len(sampler.active(5))
        2
        >>> LayerSampler(4, 2, 1, probabilities=[4, 2, 1, 1]).inclusion.tolist()
        [1.0, 0.5, 0.25, 0.25]
    """

    def __init__(
        self,
        n_blocks: int,
        n_layers: int,
        interval: int,
        seed: int = 0,
        probabilities: Sequence[float] | None = None,
    ) -> None:
        if n_blocks < 1:
            raise ValueError(f"LISA needs at least one block, got n_blocks={n_blocks}")
        if not 1 <= n_layers <= n_blocks:
            raise ValueError(f"LISA n_layers must be between 1 and the number of blocks ({n_blocks}), got {n_layers}")
        if interval < 1:
            raise ValueError(f"LISA interval must be >= 1 optimizer step, got {interval}")
        weights = None
        if probabilities is not None:
            weights = torch.tensor(list(probabilities), dtype=torch.float64)
            if weights.numel() != n_blocks:
                raise ValueError(f"LISA probabilities has {weights.numel()} entries for {n_blocks} blocks")
            if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
                raise ValueError("LISA probabilities must be finite and non-negative")
            if int((weights > 0).sum()) < n_layers:
                raise ValueError(f"LISA probabilities give fewer than n_layers={n_layers} blocks a chance")
            weights = weights / weights.sum()
        self.n_blocks, self.n_layers, self.interval, self.seed = n_blocks, n_layers, interval, seed
        self.probabilities = weights
        self.inclusion = (
            torch.full((n_blocks,), n_layers / n_blocks, dtype=torch.float64)
            if weights is None
            else inclusion_probabilities(weights, n_layers)
        )

    def interval_index(self, step: int) -> int:
        """The interval an optimizer step (0-based) belongs to."""
        return step // self.interval

    def round_start(self, step: int) -> int:
        """The first optimizer step of the interval ``step`` belongs to."""
        return self.interval_index(step) * self.interval

    def is_switch(self, step: int) -> bool:
        """Whether ``step`` starts a new interval (the active set may change before it)."""
        return step % self.interval == 0

    def active(self, step: int) -> list[int]:
        """Sorted indices of the blocks that train at optimizer step ``step`` (0-based)."""
        gen = seeded_generator(self.seed, self.interval_index(step))
        if self.probabilities is None:
            chosen = torch.randperm(self.n_blocks, generator=gen)[: self.n_layers].tolist()
        else:
            chosen = self._systematic(gen)
        return sorted(int(i) for i in chosen)

    def _systematic(self, gen: torch.Generator) -> list[int]:
        """Randomly ordered systematic sampling with inclusion probabilities ``self.inclusion``."""
        pi = self.inclusion
        always = (pi >= 1).nonzero().squeeze(1).tolist()
        rest = (pi < 1).nonzero().squeeze(1)
        left = self.n_layers - len(always)
        if left == 0:
            return always
        order = rest[torch.randperm(rest.numel(), generator=gen)]
        ends = torch.cumsum(pi[order], 0)
        ends = ends / ends[-1] * left  # exactly ``left`` at the end, so exactly ``left`` points fall in
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        hits = torch.ceil(ends - u) - torch.ceil(torch.cat([ends.new_zeros(1), ends[:-1]]) - u)
        return always + order[hits > 0].tolist()

    def state_dict(self) -> dict[str, Any]:
        """The configuration: with it, any step's draw can be replayed exactly."""
        return {
            "n_blocks": self.n_blocks,
            "n_layers": self.n_layers,
            "interval": self.interval,
            "seed": self.seed,
            "probabilities": None if self.probabilities is None else self.probabilities.tolist(),
            "sampling": "uniform" if self.probabilities is None else WEIGHTED_SAMPLING,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse a state that would draw differently (a resumed run must replay the same schedule).

        Raises:
            ValueError: the saved configuration differs; the message names the fields. Weighted draws saved
                without ``sampling`` come from the earlier sequential sampler and cannot be replayed either.
        """
        if state.get("probabilities") is not None and "sampling" not in state:
            raise ValueError(
                "the checkpoint's LISA sampler drew weighted blocks one after another (the sampler before "
                f"inclusion-proportional sampling); its draws cannot be replayed by the {WEIGHTED_SAMPLING!r} rule"
            )
        refuse_changed(self.state_dict(), state, "LISA sampler")
