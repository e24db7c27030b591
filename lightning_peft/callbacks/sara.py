"""The ``SaRA`` callback: re-train the smallest weights as a sparse update, low-rank penalised, re-selected once."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_peft import distributed
from lightning_peft.adapters.sparse import SparseDeltaLayer, reset_optimizer_slots
from lightning_peft.callbacks.sparse import SparseMethod
from lightning_peft.methods.sara import SaRASelector, nuclear_norm_grad

__all__ = ["SaRA"]


class SaRA(SparseMethod):
    """SaRA (Hu et al., ICLR 2025): train the smallest-magnitude weights as a sparse, low-rank-penalised update.

    The entries trained are, in every target tensor, the smallest ``fraction`` by ``|w|`` (or every
    entry with ``|w| < threshold``, the reference's rule). They live in the sparse delta core
    (:mod:`lightning_peft.adapters.sparse`): the update starts at zero, gradients and AdamW state are
    O(selected), and the base weights never get a dense gradient that persists.

    * **Low-rank penalty** ``λ‖ΔW‖_*`` on the update of matrices (conv weights as ``out x in·kh·kw``):
      every ``penalty_every`` optimizer steps, ``penalty_matrices`` of the eligible matrices, drawn from a
      generator seeded by ``(seed, step)`` (the same on every rank), get ``λ / drawn · U Vᵀ`` added to
      their trained entries' gradient, in ``on_before_optimizer_step`` after the gradients are complete.
      With the default one matrix per step that is the reference's strength (``optim/adamw2.py``
      back-propagates ``λ‖W ⊙ M‖_*`` of one random matrix per step into the trained values' gradient;
      in ``optim/adamw.py`` that gradient never reaches them): in expectation the gradient of
      ``λ · mean‖ΔW‖_*`` over the eligible matrices, so the same ``λ`` means the same on any model.
    * **Progressive re-selection** at ``reselect_at`` (an optimizer step, or a fraction of the run): the
      selection is recomputed on the *current* weights; entries that stay keep their value and optimizer
      state, entries that leave keep what they learned in the weight (and in the saved delta), entries
      that join start from zero with fresh optimizer state.

    Hooks: ``setup`` resolves the targets (the preset's layers), sizes the bank (the selection's count;
    the most over ranks for a threshold), fingerprints the base and injects; ``on_train_start`` (after the
    strategy has made the weights equal on every rank) selects; ``on_train_batch_start`` re-selects at
    the chosen step; ``on_before_optimizer_step`` adds the penalty's gradient and logs ``sara/penalty``
    and ``sara/density``; ``on_fit_end`` draws the density per layer and saves indices + values.

    Several processes: ``strategy="ddp_selective"``, or FSDP2 (``ModelParallelStrategy`` with
    ``tensor_parallel_size=1``, the model sharded by :func:`lightning_peft.shard` in ``configure_model``).
    Selections are made from identical weights and the penalty from identical updates, so every rank
    decides the same. Under FSDP2 a selection gathers one whole target tensor at a time
    (``full_tensor()``, never the model), the penalty's ``ΔW`` comes from the bank (whole on every rank),
    and the bank's gradient is averaged before the penalty is added.

    Args:
        fraction: share of each target tensor to train, in (0, 1) (default 0.1); ignored if ``threshold`` is set.
        threshold: train the entries with ``|w| < threshold`` (> 0) instead of a fraction.
        rank_penalty: ``λ`` of the nuclear-norm penalty (>= 0; 0 turns it off): the reference's ``lambda_rank``,
            at the same per-step strength as in its ``optim/adamw2.py``; its README runs 5e-4, the default.
        penalty_matrices: matrices penalised per penalty step.
        penalty_every: optimizer steps between penalty steps.
        penalty_min_dim: a matrix is eligible if both of its sides are at least this (the reference: 65).
        reselect_at: optimizer step of the progressive re-selection (an int in ``[1, steps)``), or a fraction of
            the run in (0, 1); None: no re-selection.
        seed: seed of the penalty's matrix draws.
        target_modules: layers whose tensors are selected from (regex, names/suffixes, ``"all-linear"``); default
            the backbone preset's.
        exclude_modules: layers never selected from.
        parameters: ``("weight",)`` (default) or ``("weight", "bias")``.
        include_norms: also select from the weight and bias of every norm layer of the backbone.
        modules_to_save: backbone modules trained in full.
        backbone: dotted path of the backbone inside the ``LightningModule``; default detected.
        save_dir: folder for the deltas (sparse format) and ``sara_density.png`` at the end of fit.

    Raises:
        ValueError: a fraction outside (0, 1), a threshold <= 0, ``rank_penalty < 0``, a re-selection step outside
            the run, a selection that picks nothing in any tensor (with the magnitudes seen), targets that match
            nothing, or a checkpoint of another configuration.
        NotImplementedError: plain ``ddp``, FSDP1/DeepSpeed, tensor parallelism, or ``ModelParallelStrategy`` on a
            model not sharded by :func:`lightning_peft.shard`, before training.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[SaRA(fraction=0.1, rank_penalty=5e-4, reselect_at=0.5)], logger=False)
    """

    method = "sara"

    def __init__(
        self,
        fraction: float = 0.1,
        threshold: float | None = None,
        rank_penalty: float = 5e-4,
        penalty_matrices: int = 1,
        penalty_every: int = 1,
        penalty_min_dim: int = 1,
        reselect_at: int | float | None = None,
        seed: int = 0,
        target_modules: str | list[str] | None = None,
        exclude_modules: str | list[str] | None = None,
        parameters: tuple[str, ...] | list[str] = ("weight",),
        include_norms: bool = False,
        modules_to_save: list[str] | None = None,
        backbone: str | None = None,
        save_dir: str | None = None,
    ) -> None:
        if not rank_penalty >= 0:
            raise ValueError(f"SaRA rank_penalty must be >= 0, got {rank_penalty!r}")
        if reselect_at is not None and (isinstance(reselect_at, bool) or not reselect_at > 0):
            raise ValueError(
                f"SaRA reselect_at must be a step >= 1 or a fraction of the run in (0, 1), got {reselect_at!r}"
            )
        if isinstance(reselect_at, float) and not reselect_at < 1:
            raise ValueError(f"SaRA reselect_at as a fraction must be in (0, 1), got {reselect_at!r}")
        self.selector = SaRASelector(
            fraction=None if threshold is not None else fraction,
            threshold=threshold,
            matrices=penalty_matrices,
            every=penalty_every,
            min_dim=penalty_min_dim,
            seed=seed,
        )
        self._init_sparse(
            target_modules, exclude_modules, parameters, include_norms, modules_to_save, backbone, save_dir
        )
        self.rank_penalty, self.reselect_at = rank_penalty, reselect_at
        self.reselect_step: int | None = None
        self._reselected_at: int | None = None
        self.penalty = 0.0
        self._pending: dict[str, Any] | None = None

    resolved = ("reselect_step",)

    # ----------------------------------------------------------------------------------------- selection
    def _tensors(self, root: nn.Module) -> list[tuple[str, str, torch.Tensor]]:
        return [(n, p, root.get_submodule(n).get_parameter(p)) for n, ps in self.targets.items() for p in ps]

    @override
    def capacity(self, root: nn.Module, targets: dict[str, tuple[str, ...]]) -> int:
        weights = [root.get_submodule(n).get_parameter(p) for n, ps in targets.items() for p in ps]
        count = torch.tensor(float(sum(self.selector.count(w) for w in weights)))
        distributed.all_reduce(count, "max")  # a threshold may count differently on ranks that start unequal
        if int(count) == 0:
            low = min(float(w.detach().abs().min()) for w in weights)
            high = max(float(w.detach().abs().max()) for w in weights)
            if self.selector.threshold is not None:
                why = f"no entry of the {len(weights)} target tensors has |w| < {self.selector.threshold:g}"
                fix = "raise the threshold or use fraction="
            else:
                why = f"fraction={self.selector.fraction:g} rounds to 0 entries in each of the {len(weights)} tensors"
                fix = "raise the fraction or target larger tensors"
            raise ValueError(f"SaRA selects nothing: {why} (|w| ranges over [{low:.3g}, {high:.3g}]); {fix}")
        return int(count)

    def _select_all(self, pl_module: pl.LightningModule) -> int:
        """Initial selection on the current weights; returns the entries selected."""
        bank = self.bank_of(pl_module)
        for _, layer in self.layers(pl_module):
            for pname in layer.param_names:  # under FSDP2 one whole tensor at a time
                whole = distributed.full_tensor(layer.base_layer.get_parameter(pname).detach())
                picked = self.selector.select(whole, limit=bank.free)
                layer.add(pname, picked)
        return bank.used

    def _reselect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[int, int]:
        """Re-select on the current weights; returns (entries that left, entries that joined)."""
        bank = self.bank_of(pl_module)
        layers = self.layers(pl_module)
        plan: list[tuple[SparseDeltaLayer, str, torch.Tensor, torch.Tensor]] = []
        left = joined = 0
        for _, layer in layers:
            layer.sync()
        for _, layer in layers:  # retire first, so the freed slots are there for the newcomers
            for pname in layer.param_names:
                active = layer.active_indices(pname)
                whole = distributed.full_tensor(layer.base_layer.get_parameter(pname).detach())  # one at a time
                new = self.selector.select(whole)
                leaving = active[~torch.isin(active, new)]
                freed = layer.retire(pname, leaving)
                for opt in trainer.optimizers:
                    reset_optimizer_slots(opt, bank.values, freed)
                entering = new[~torch.isin(new, active)]
                plan.append((layer, pname, entering, whole.reshape(-1)[entering].abs().float()))
                del whole
                left += leaving.numel()
        for layer, pname, entering, magnitude in plan:
            if entering.numel() > bank.free:  # a threshold selection may want more than the bank holds: the smallest
                order = torch.sort(magnitude, stable=True).indices[: bank.free]
                entering = entering[order].sort().values
            layer.add(pname, entering)
            joined += entering.numel()
        return left, joined

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.estimated_stepping_batches
        if self._pending is not None:
            self.selector.load_state_dict(self._pending.get("selector", {}))
            self.reselect_step = self._pending.get("reselect_step")
            self._pending = None
        elif self.reselect_at is not None:
            if isinstance(self.reselect_at, float):
                if not math.isfinite(total):
                    raise ValueError("SaRA reselect_at as a fraction needs a finite run; give a step instead")
                self.reselect_step = max(1, int(self.reselect_at * total))
            else:
                self.reselect_step = int(self.reselect_at)
            if math.isfinite(total) and not 1 <= self.reselect_step < total:
                raise ValueError(
                    f"SaRA reselect_at={self.reselect_at!r} is step {self.reselect_step}, outside this run of "
                    f"{int(total)} optimizer steps; use a step in [1, {int(total) - 1}] or a fraction in (0, 1)"
                )
        if self.bank_of(pl_module).used == 0:  # not resumed: select now that every rank has the same weights
            selected = self._select_all(pl_module)
            rank_zero_info(
                f"SaRA: training {selected:,} of {self.total_params:,} entries "
                f"({100 * selected / max(self.total_params, 1):.2f}%)"
            )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.reselect_step is not None and step == self.reselect_step and self._reselected_at != step:
            left, joined = self._reselect(trainer, pl_module)
            self._reselected_at = step  # later micro-batches of the same optimizer step do not re-select
            rank_zero_info(f"SaRA: re-selected at step {step}: {left:,} entries left, {joined:,} joined")
            for logger in trainer.loggers:
                logger.log_metrics(
                    {"sara/reselect_left": float(left), "sara/reselect_joined": float(joined)}, step=step
                )

    # ----------------------------------------------------------------------------------------- penalty
    def eligible(self, pl_module: pl.LightningModule) -> list[tuple[SparseDeltaLayer, str]]:
        """The selected tensors that can carry the penalty, in a fixed order."""
        return [
            (layer, pname)
            for _, layer in self.layers(pl_module)
            for pname in layer.param_names
            if self.selector.eligible(layer.base_layer.get_parameter(pname).shape)
        ]

    @torch.no_grad()
    def add_penalty_grad(self, pl_module: pl.LightningModule, step: int) -> float:
        """Add ``λ / drawn · U Vᵀ`` to the trained entries of this step's penalised matrices; returns the estimate."""
        if self.rank_penalty == 0:
            return 0.0
        eligible = self.eligible(pl_module)
        picks = self.selector.penalty_matrices(step, len(eligible))
        if not picks:
            return 0.0
        bank = self.bank_of(pl_module)
        bank_grad = self.bank_grad(bank)
        scale = self.selector.penalty_scale(len(picks))
        value = 0.0
        for i in picks:
            layer, pname = eligible[i]
            weight = layer.base_layer.get_parameter(pname)
            indices, values = layer.delta(pname)
            delta = torch.zeros(weight.numel(), dtype=torch.float32, device=weight.device)
            delta[indices] = values
            norm, grad = nuclear_norm_grad(delta.view(weight.shape))
            slots = layer.active_slots(pname)
            bank_grad.index_add_(
                0, slots, (self.rank_penalty * scale * grad.reshape(-1)[layer.active_indices(pname)]).to(bank.values)
            )
            value += float(norm)
        return self.rank_penalty * scale * value

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.reduce_bank_grad(pl_module)  # before the penalty: it is the same on every rank
        self.penalty = self.add_penalty_grad(pl_module, trainer.global_step)
        self.log_density(trainer, pl_module, per_layer=False, extra={"sara/penalty": self.penalty})

    # ----------------------------------------------------------------------------------------- state
    @override
    def method_hyperparameters(self) -> dict[str, Any]:
        return {
            **self.selector.state_dict(),
            "rank_penalty": self.rank_penalty,
            "reselect_at": self.reselect_at,
            "reselect_step": self.reselect_step,
        }

    @override
    def method_schedule(self) -> dict[str, Any]:
        return {"reselect_step": self.reselect_step}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"selector": self.selector.state_dict(), "reselect_step": self.reselect_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict  # applied in on_train_start
