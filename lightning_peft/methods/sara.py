"""SaRA's selector and low-rank penalty (Hu et al., ICLR 2025), pure torch.

SaRA ("Progressive Sparse Low-Rank Adaptation") observes that the smallest weights of a pretrained
diffusion model (by magnitude) barely contribute to its output, and re-trains exactly those as a
sparse update ``ΔW``, with a nuclear-norm penalty ``λ‖ΔW‖_*`` that keeps the update low-rank, and
re-selects the entries once during training on the current weights (the *progressive* part).

This module holds the decisions; the sparse delta itself lives in
:mod:`lightning_peft.adapters.sparse` and the Lightning shell in :mod:`lightning_peft.callbacks.sara`.

* :meth:`SaRASelector.select`: the entries of one tensor to train, either the smallest ``fraction``
  of it by ``|w|`` (the same share of every tensor; easy to reason about across models) or every
  entry with ``|w| < threshold`` (the reference's rule).
* :meth:`SaRASelector.penalty_matrices`: which matrices carry the penalty at a step: ``matrices`` of
  them drawn from a generator seeded by ``(seed, step)``, so every rank draws the same without
  communicating and a resumed run draws the same, every ``every`` steps.
* :func:`nuclear_norm_grad`: ``‖ΔW‖_*`` and its (sub)gradient ``U Vᵀ`` (over the non-zero singular
  values). The callback adds ``λ · scale · U Vᵀ`` at the trained entries to their gradient, where
  ``scale = 1 / matrices`` (:meth:`SaRASelector.penalty_scale`): with the default ``matrices=1`` the
  drawn matrix gets ``λ · U Vᵀ``, the reference's per-step strength (``optim/adamw2.py``: one random
  eligible matrix per step, ``lambda_rank · ‖param * mask‖_*`` back-propagated into the parameter's
  gradient). In expectation that is the gradient of ``λ · mean`` of ``‖ΔW‖_*`` over the eligible
  matrices; more matrices per step give the same strength with less variance. (This used to be
  ``eligible / matrices``, the gradient of ``λ · sum``: ``N_eligible`` times the reference's strength.)

Differences from the reference (``sjtuplayer/SaRA``). It has two optimizers: ``optim/adamw.py`` (the
one with the sparse ``Sparse.apply`` parameters) and ``optim/adamw2.py`` (dense parameters, the update
masked inside AdamW):

* in ``optim/adamw.py`` the penalty ``λ‖param * mask‖_*`` is taken of the *detached source parameter*, so
  its gradient never reaches the trained values; in ``optim/adamw2.py`` it is taken of the parameter
  AdamW updates, so ``λ · mask ⊙ U Vᵀ`` does reach them, and that is the strength matched here; here
  the gradient is added to the trained entries' gradient;
* ``optim/adamw2.py`` skips the penalty in a step whose drawn matrix has 100 or fewer trained entries;
  here every drawn matrix is penalised;
* it penalises the masked weight ``W ⊙ M`` (the small pretrained values plus the update); here the
  penalty is on the update ``ΔW`` itself, which is what "low-rank update" means and what is zero at
  the start;
* it selects with ``|w| < threshold`` only; here a per-tensor fraction is offered too (the default);
* it starts the trained values at ``|w|`` (``Sparse.apply(param, trainable.abs(), mask)``), which flips
  the sign of small negative weights; here the update starts at zero, so the model is unchanged at
  step 0;
* its default ``progressive_iter=-1`` fails (the adaptive masks are never built); here re-selection is
  off unless a step is given, and a step outside the run is refused before training;
* it only penalises 2-D matrices with both sides > 64; here every selected tensor with two or more
  dimensions is eligible (a conv weight as ``out x (in·kh·kw)``), and ``min_dim`` restores the rule.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_peft.distributed import seeded_generator
from lightning_peft.methods._config import refuse_changed

__all__ = ["SaRASelector", "nuclear_norm_grad"]


def nuclear_norm_grad(delta: torch.Tensor, rtol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(‖ΔW‖_*, ∂‖ΔW‖_*/∂ΔW)`` of a matrix (or a tensor seen as ``shape[0] x rest``).

    The gradient is ``U Vᵀ`` over the singular values above ``rtol · σ_max`` (the minimum-norm
    subgradient: zero directions get zero). Computed in float32; returned in ``delta``'s shape.

    Example:
        >>> value, grad = nuclear_norm_grad(torch.diag(torch.tensor([3.0, -2.0, 0.0])))
        >>> float(value), grad.diag().tolist()
        (5.0, [1.0, -1.0, 0.0])
    """
    matrix = delta.detach().float().reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return s.sum(), torch.zeros_like(delta, dtype=torch.float32)
    keep = s > rtol * s[0]
    grad = u[:, keep] @ vh[keep]
    return s.sum(), grad.reshape(delta.shape)


class SaRASelector:
    """Which entries SaRA trains and which matrices carry its penalty.

    Args:
        fraction: train the smallest ``fraction`` of every tensor by ``|w|``, ``0 < fraction < 1``.
        threshold: or every entry with ``|w| < threshold`` (> 0). Exactly one of the two.
        matrices: matrices penalised per penalty step (>= 1).
        every: a penalty step every ``every`` optimizer steps (>= 1).
        min_dim: a tensor is eligible for the penalty if, seen as ``shape[0] x rest``, both sides are >= this.
        seed: seed of the matrix draws.

    Raises:
        ValueError: a value out of range, or both / neither of ``fraction`` and ``threshold``.

    Example:
        >>> sel = SaRASelector(fraction=0.25)
        >>> sel.select(torch.tensor([0.5, -0.01, 2.0, 0.3])).tolist()
        [1]
        >>> SaRASelector(threshold=0.4).select(torch.tensor([0.5, -0.01, 2.0, 0.3])).tolist()
        [1, 3]
    """

    def __init__(
        self,
        fraction: float | None = None,
        threshold: float | None = None,
        matrices: int = 1,
        every: int = 1,
        min_dim: int = 1,
        seed: int = 0,
    ) -> None:
        if (fraction is None) == (threshold is None):
            raise ValueError("SaRA selects by fraction or by threshold: give exactly one of them")
        if fraction is not None and not 0.0 < fraction < 1.0:
            raise ValueError(f"SaRA fraction must be in (0, 1), got {fraction!r}")
        if threshold is not None and not threshold > 0.0:
            raise ValueError(f"SaRA threshold must be > 0, got {threshold!r}")
        if matrices < 1 or every < 1 or min_dim < 1:
            raise ValueError(f"SaRA matrices, every and min_dim must be >= 1, got {matrices}, {every}, {min_dim}")
        self.fraction, self.threshold = fraction, threshold
        self.matrices, self.every, self.min_dim, self.seed = matrices, every, min_dim, seed

    def count(self, weight: torch.Tensor) -> int:
        """How many entries of ``weight`` :meth:`select` picks."""
        if self.fraction is not None:
            return int(round(self.fraction * weight.numel()))
        assert self.threshold is not None  # one of the two is set (checked in __init__)
        return int((weight.detach().abs() < self.threshold).sum())

    @torch.no_grad()
    def select(self, weight: torch.Tensor, limit: int | None = None) -> torch.Tensor:
        """Sorted flat indices of the entries to train (the smallest ``|w|``; ties by position).

        Args:
            weight: the tensor's current values.
            limit: at most this many (the smallest ones are kept), e.g. the slots left for a threshold selection.
        """
        flat = weight.detach().reshape(-1).abs().float()
        k = self.count(weight) if limit is None else min(self.count(weight), limit)
        if k <= 0:
            return torch.empty(0, dtype=torch.long, device=weight.device)
        order = torch.sort(flat, stable=True).indices[:k]
        return order.sort().values

    def eligible(self, shape: torch.Size | tuple[int, ...]) -> bool:
        """Whether a tensor of ``shape`` can carry the nuclear-norm penalty."""
        if len(shape) < 2:
            return False
        rows, cols = shape[0], int(torch.Size(shape[1:]).numel())
        return min(rows, cols) >= self.min_dim

    def penalty_scale(self, n_drawn: int) -> float:
        """The factor on each drawn matrix's ``λ · U Vᵀ``: ``1 / n_drawn``, the reference's strength per step.

        The reference (``optim/adamw2.py``) back-propagates ``λ‖W_i ⊙ M_i‖_*`` of one random eligible matrix
        per step; a matrix's expected penalty gradient is ``λ / N_eligible · U Vᵀ``. Drawing ``n_drawn`` and
        scaling each by ``1 / n_drawn`` keeps that expectation (and equals the reference when ``n_drawn`` is 1).
        """
        return 1.0 / n_drawn

    def penalty_matrices(self, step: int, n_eligible: int) -> list[int]:
        """Indices (into the eligible matrices) penalised at optimizer step ``step``; empty between penalty steps."""
        if n_eligible == 0 or step % self.every != 0:
            return []
        k = min(self.matrices, n_eligible)
        gen = seeded_generator(self.seed, step)
        return sorted(int(i) for i in torch.randperm(n_eligible, generator=gen)[:k])

    def state_dict(self) -> dict[str, Any]:
        """The configuration (every decision is a function of it, the weights and the step)."""
        return {
            "fraction": self.fraction,
            "threshold": self.threshold,
            "matrices": self.matrices,
            "every": self.every,
            "min_dim": self.min_dim,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint whose selector was configured differently.

        Raises:
            ValueError: naming the fields that differ.
        """
        refuse_changed(self.state_dict(), state, "SaRA selector")
