"""LISA's layer sampler (Pan et al., NeurIPS 2024), pure torch: which blocks train in each interval.

Every ``interval`` optimizer steps LISA trains ``n_layers`` of the model's repeated blocks, drawn
without replacement, uniformly or with per-block probabilities (the paper's importance sampling),
and freezes the others. The draw for interval ``k`` comes from a generator seeded by
``(seed, k)`` (:func:`lightning_peft.distributed.seeded_generator`), so

* every rank draws the same blocks without communicating,
* a run resumed at any step draws what the uninterrupted run drew (the sampler's state is its
  configuration; there is no RNG state to save), and
* the global RNG is never touched.

The reference (LMFlow's ``DynamicLayerActivationCallback``) draws from Python's global ``random``
after seeding it; that couples the choice to whatever else consumed the global stream and cannot be
replayed on resume.

The ``LISA`` callback (:mod:`lightning_peft.callbacks.lisa`) drives it: freezing, optimizer-state
release and multi-process training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_peft.distributed import seeded_generator
from lightning_peft.methods._config import refuse_changed

__all__ = ["LayerSampler"]


class LayerSampler:
    """The active blocks of every interval.

    Args:
        n_blocks: number of repeated blocks in the model.
        n_layers: blocks trained at a time, ``1 <= n_layers <= n_blocks``.
        interval: optimizer steps between switches, ``>= 1``.
        seed: seed of the draws.
        probabilities: optional per-block sampling weights (non-negative, at least ``n_layers`` positive);
            normalised internally. None: uniform.

    Raises:
        ValueError: a value out of range, with what is allowed.

    Example:
        >>> sampler = LayerSampler(n_blocks=8, n_layers=2, interval=5, seed=0)
        >>> sampler.active(0) == sampler.active(4) == LayerSampler(8, 2, 5, seed=0).active(3)
        True
        >>> len(sampler.active(5))
        2
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

    def interval_index(self, step: int) -> int:
        """The interval an optimizer step (0-based) belongs to."""
        return step // self.interval

    def is_switch(self, step: int) -> bool:
        """Whether ``step`` starts a new interval (the active set may change before it)."""
        return step % self.interval == 0

    def active(self, step: int) -> list[int]:
        """Sorted indices of the blocks that train at optimizer step ``step`` (0-based)."""
        gen = seeded_generator(self.seed, self.interval_index(step))
        if self.probabilities is None:
            chosen = torch.randperm(self.n_blocks, generator=gen)[: self.n_layers]
        else:
            chosen = torch.multinomial(self.probabilities, self.n_layers, replacement=False, generator=gen)
        return sorted(int(i) for i in chosen)

    def state_dict(self) -> dict[str, Any]:
        """The configuration: with it, any step's draw can be replayed exactly."""
        return {
            "n_blocks": self.n_blocks,
            "n_layers": self.n_layers,
            "interval": self.interval,
            "seed": self.seed,
            "probabilities": None if self.probabilities is None else self.probabilities.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse a state that would draw differently (a resumed run must replay the same schedule).

        Raises:
            ValueError: the saved configuration differs; the message names the fields.
        """
        refuse_changed(self.state_dict(), state, "LISA sampler")
