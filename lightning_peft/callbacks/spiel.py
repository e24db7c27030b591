"""The ``SpIEL`` callback: sparse fine-tuning whose trained entries move (drop the least moved, regrow by gradient)."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_peft import distributed
from lightning_peft.adapters.sparse import SparseDeltaLayer, reset_optimizer_slots
from lightning_peft.callbacks.sparse import SparseMethod
from lightning_peft.methods.spiel import SpIELSelector, split_budget

__all__ = ["SpIEL"]


def _mean_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    return distributed.all_reduce(tensor, "mean")


class SpIEL(SparseMethod):
    """SpIEL (Ansell et al. 2024): a fixed budget of trained entries whose positions change during training.

    Each target tensor trains ``floor(budget · n_i / N)`` of its ``n_i`` entries (``N``: all targeted entries),
    first drawn uniformly at random from a generator seeded by ``(seed, tensor)``. Every ``reselection_steps``
    optimizer steps, after accumulating the gradients of ``accumulation_steps`` (+1) steps, a share ``p`` of each
    tensor's entries moves: the active entries that moved least from their pretrained value (smallest ``|Δ|``) go
    back to it and stop training, and as many entries with the largest accumulated gradient start at zero. With
    ``decay="linear"`` the first update replaces the random start wholesale (``p = 1``) and later ones change
    ``drop_fraction · (1 - completed / T)``; with ``"cosine"`` every update changes
    ``drop_fraction · (1 + cos(π completed / T)) / 2``, as the reference does. The rule, schedule and differences
    from the reference (``AlanAnsell/peft``, ``tuners/sft``) are in :mod:`lightning_peft.methods.spiel`; briefly:
    ties by flat position, a seeded initial draw, the budget counted over the targeted entries, incoming entries'
    AdamW moments start at zero (the reference seeds them from the window's gradients with its own optimizer),
    gradients averaged across ranks before choosing, no SM3 variant.

    The trained values live in the sparse bank (:mod:`lightning_peft.adapters.sparse`): one parameter of
    ``budget`` slots, so gradients and optimizer state are O(budget) and the optimizer is never rebuilt; a moved
    entry's slot is reused by a newcomer with zero value and zero moments. Gradients of entries not trained yet
    are read in each target layer's backward (the dense gradient exists there anyway) during the accumulation
    windows only; the first one of a window picks ``k_i`` candidates per tensor, later ones are summed at those
    candidates (O(budget) memory). A dropped entry is forgotten by its layer (:meth:`SparseDeltaLayer.forget`: its
    weight back at the pretrained value, its position, base value and slot out of the buffers), so the bookkeeping
    holds the ``budget`` current entries only (13 bytes each for float32 weights), however many moves the run makes;
    the saved delta leaves out entries whose delta is exactly zero.

    Hooks: ``setup`` resolves the targets (the preset's layers by default), splits the budget, fingerprints the
    base and injects; ``on_train_start`` resolves ``total_steps`` (the run's optimizer steps by default), applies
    restored state and makes the initial draw; ``on_train_batch_start`` makes a due update (before the step's
    forward) and arms the gradient hooks inside an accumulation window; ``on_before_optimizer_step`` averages the
    bank's gradient under FSDP2 and logs ``spiel/density``; ``on_fit_end`` draws the density per layer
    (``spiel_density.png``) and saves indices + values.

    Several processes: ``strategy="ddp_selective"``, or FSDP2 (``ModelParallelStrategy`` with
    ``tensor_parallel_size=1``, the model sharded by :func:`lightning_peft.shard` in ``configure_model``). The first
    gradient of a window is averaged across ranks whole (one all-reduce per target tensor), later ones at the
    candidates only, so every rank scores the same numbers; the drop uses the bank (the same on every rank) and
    the initial draw a seeded generator: every rank makes the same decisions with no broadcast.

    Args:
        budget: entries trained at once, a count (``int >= 1``) or a fraction of the targeted entries
            (``0 < float < 1``; default 0.01, the reference's density).
        reselection_steps: optimizer steps between updates (the reference's ``reselection_steps``, default 20).
        accumulation_steps: optimizer steps of gradient accumulation before an update, in
            ``[1, reselection_steps - 2]`` (the reference's ``selection_accumulation_steps``, default 5).
        drop_fraction: share of each tensor's entries moved at the second update, in (0, 1]; decays to 0 at
            ``total_steps`` (the reference's ``initial_reselection_rate``, default 0.2).
        decay: ``"linear"`` (the reference's default) or ``"cosine"``.
        total_steps: the run's length for the decay (optimizer steps); default the trainer's.
        seed: seed of the initial random draw.
        target_modules: layers whose tensors may train (regex, names/suffixes, ``"all-linear"``); default the preset.
        exclude_modules: layers never trained.
        parameters: which tensors of each target layer: ``("weight",)`` or ``("weight", "bias")``.
        include_norms: also the weight and bias of every LayerNorm/GroupNorm/BatchNorm of the backbone.
        modules_to_save: backbone modules trained in full (a new head).
        backbone: dotted path of the backbone inside the ``LightningModule``; default detected.
        save_dir: folder for the deltas (sparse format) and ``spiel_density.png`` at the end of fit.
        log_every: log each layer's density every this many optimizer steps (the overall one: ``log_every_n_steps``).

    Raises:
        ValueError: a budget <= 0, a fraction outside (0, 1), a budget larger than the targeted entries or too
            small to give any tensor an entry, ``reselection_steps < 3``, ``accumulation_steps`` outside
            ``[1, reselection_steps - 2]``, ``drop_fraction`` outside (0, 1], an unknown ``decay``, a non-int
            ``seed``, a run (or ``total_steps``) shorter than ``accumulation_steps`` (no update would come), a run
            without a finite length and no ``total_steps``, targets that match nothing, or a checkpoint of another
            configuration; all before training.
        NotImplementedError: plain ``ddp``, FSDP1/DeepSpeed, tensor parallelism, or ``ModelParallelStrategy`` on a
            model not sharded by :func:`lightning_peft.shard`, before training.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[SpIEL(budget=0.01, reselection_steps=20)], logger=False)
    """

    method = "spiel"

    def __init__(
        self,
        budget: float = 0.01,
        reselection_steps: int = 20,
        accumulation_steps: int = 5,
        drop_fraction: float = 0.2,
        decay: Literal["linear", "cosine"] = "linear",
        total_steps: int | None = None,
        seed: int = 0,
        target_modules: str | list[str] | None = None,
        exclude_modules: str | list[str] | None = None,
        parameters: tuple[str, ...] | list[str] = ("weight",),
        include_norms: bool = False,
        modules_to_save: list[str] | None = None,
        backbone: str | None = None,
        save_dir: str | None = None,
        log_every: int = 50,
    ) -> None:
        self.check_budget(budget, "SpIEL")
        # checks the schedule's arguments now, before any trainer exists
        SpIELSelector(
            reselection_steps, accumulation_steps, drop_fraction, decay, 1 if total_steps is None else total_steps, seed
        )
        if total_steps is not None and total_steps < accumulation_steps:
            raise ValueError(
                f"SpIEL total_steps={total_steps!r} leaves no update: the first comes after accumulation_steps="
                f"{accumulation_steps} optimizer steps"
            )
        self._init_sparse(
            target_modules, exclude_modules, parameters, include_norms, modules_to_save, backbone, save_dir
        )
        self.budget, self.total_steps, self.seed = budget, total_steps, seed
        self.reselection_steps, self.accumulation_steps = reselection_steps, accumulation_steps
        self.drop_fraction, self.decay = drop_fraction, decay
        self.log_every = max(1, int(log_every))
        self.budget_count = 0
        self.counts: dict[str, int] = {}  # "<layer>:<param>" -> entries it trains
        self.selector: SpIELSelector | None = None
        self.moved: list[tuple[int, int]] = []  # (completed steps, entries moved) of each update
        self._pending: dict[str, Any] | None = None
        self._updated_at: int | None = None
        self._keys: dict[int, str] = {}  # id(layer) -> name relative to the backbone
        self._scaler: Any = None

    # ----------------------------------------------------------------------------------------- setup
    @staticmethod
    def _tensor_keys(root: nn.Module, targets: dict[str, tuple[str, ...]]) -> dict[str, int]:
        return {f"{n}:{p}": root.get_submodule(n).get_parameter(p).numel() for n, ps in targets.items() for p in ps}

    @override
    def capacity(self, root: nn.Module, targets: dict[str, tuple[str, ...]]) -> int:
        count = self.budget_entries(self.budget)
        sizes = self._tensor_keys(root, targets)
        self.counts = dict(zip(sizes, split_budget(count, list(sizes.values())), strict=True))
        self.budget_count = sum(self.counts.values())
        if self.budget_count == 0:
            raise ValueError(
                f"SpIEL budget {count:,} gives no tensor an entry (each gets floor(budget * its size / "
                f"{self.total_params:,}), the largest of the {len(sizes)} tensors has {max(sizes.values()):,} entries);"
                " raise the budget"
            )
        return self.budget_count

    resolved = ("budget_count", "total_steps")

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "total_steps": self.total_steps}  # as asked, not as a fit resolved it

    @override
    def kept(self) -> dict[str, Any]:
        return {"budget_count": self.budget_count, "counts": dict(self.counts)}

    @override
    def reuse(self, root: nn.Module, kept: dict[str, Any]) -> None:
        self.budget_count, self.counts = int(kept["budget_count"]), dict(kept["counts"])

    def _total_steps(self, trainer: pl.Trainer) -> int:
        if self._pending is not None:
            return int(self._pending["total_steps"])
        if self.total_steps is not None:
            return self.total_steps
        planned = trainer.estimated_stepping_batches
        if not math.isfinite(planned):
            raise ValueError("SpIEL needs a finite run: set trainer max_steps/max_epochs or SpIEL total_steps")
        if planned < self.accumulation_steps:
            raise ValueError(
                f"SpIEL: this run of {int(planned)} optimizer steps is shorter than accumulation_steps="
                f"{self.accumulation_steps}: no update would come; lower accumulation_steps or train longer"
            )
        return int(planned)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not in on_fit_start: estimated_stepping_batches there would build the train loader before the loops restore.
        bank = self.bank_of(pl_module)
        self.selector = SpIELSelector(
            self.reselection_steps,
            self.accumulation_steps,
            self.drop_fraction,
            self.decay,
            self._total_steps(trainer),
            self.seed,
        )
        if self._pending is not None:
            self.selector.load_state_dict(self._pending, device=bank.values.device)
            self.moved = [(int(a), int(b)) for a, b in self._pending.get("moved", [])]
            self._pending = None
        layers = self.layers(pl_module)
        self._keys = {id(layer): name for name, layer in layers}
        self._scaler = getattr(trainer.precision_plugin, "scaler", None)
        if bank.used == 0:  # not resumed: the seeded draw, the same on every rank
            for ordinal, (name, layer, pname) in enumerate((n, la, p) for n, la in layers for p in la.param_names):
                weight = layer.base_layer.get_parameter(pname)
                numel = int(torch.Size(weight.shape).numel())  # the whole tensor's, sharded or not
                layer.add(pname, self.selector.initial(ordinal, numel, self.counts[f"{name}:{pname}"], weight.device))
            rank_zero_info(
                f"SpIEL: training {bank.used:,} of {self.total_params:,} entries "
                f"({100 * bank.used / max(self.total_params, 1):.3f}%), updates every {self.reselection_steps} steps"
            )

    # ----------------------------------------------------------------------------------------- gradients
    def _hook(self, layer: SparseDeltaLayer, name: str, grad: torch.Tensor) -> None:
        assert self.selector is not None
        if self._scaler is not None:  # AMP: the hook sees the scaled gradient
            grad = grad / float(self._scaler.get_scale())
        key = f"{self._keys[id(layer)]}:{name}"
        reduce = _mean_across_ranks if distributed.is_distributed() else None
        self.selector.observe(key, grad, self.counts[key], reduce)

    # ----------------------------------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, completed: int) -> int:
        """Drop and regrow in every target tensor from the window's gradients; returns the entries moved."""
        assert self.selector is not None
        p = self.selector.proportion(completed)
        bank = self.bank_of(pl_module)
        moved = 0
        for name, layer in self.layers(pl_module):
            for pname in layer.param_names:
                active, slots = layer.active_indices(pname), layer.active_slots(pname)
                drop, grow = self.selector.regrow(f"{name}:{pname}", active, bank.values[slots], p)
                if not drop.numel():
                    continue
                dropped = drop.sort().values
                freed = layer.retire(pname, dropped)
                layer.forget(pname, dropped)  # back at the base value: out of the bookkeeping too
                for optimizer in trainer.optimizers:
                    reset_optimizer_slots(optimizer, bank.values, freed)
                layer.add(pname, grow.sort().values)
                moved += drop.numel()
        self.selector.clear()
        self.selector.updates += 1
        self.moved.append((completed, moved))
        return moved

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.selector is None:
            return
        step = trainer.global_step
        if self.selector.update_due(step) and self._updated_at != step:
            if self._armed:
                self.arm_grad_hooks(pl_module, None)  # delivers what is left of the window first
            moved = self.update(trainer, pl_module, step)
            self._updated_at = step  # later micro-batches of the same optimizer step do not update again
            for logger in trainer.loggers:
                logger.log_metrics({"spiel/moved": float(moved)}, step=step)
        want = self.selector.accumulating(step)
        if want != self._armed:
            self.arm_grad_hooks(pl_module, self._hook if want else None)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.reduce_bank_grad(pl_module)
        if self._armed:
            for _, layer in self.layers(pl_module):
                layer.flush_grad_hook()
        self.log_density(trainer, pl_module, per_layer=(trainer.global_step + 1) % self.log_every == 0)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._armed:
            self.arm_grad_hooks(pl_module, None)

    # ----------------------------------------------------------------------------------------- results
    @override
    def result_tensors(self, root: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
        """As :class:`SparseMethod`'s, less the entries whose delta is exactly zero (they change nothing applied).

        Dropped entries are forgotten by their layers already; an entry grown at the last update and not trained
        since still holds 0.
        """
        tensors, dense = super().result_tensors(root)
        for key in [k for k in tensors if k.endswith(".indices") and k not in dense]:
            stem = key.removesuffix(".indices")
            keep = tensors[f"{stem}.values"] != 0
            if bool(keep.any()):
                tensors[key], tensors[f"{stem}.values"] = tensors[key][keep], tensors[f"{stem}.values"][keep]
            else:
                del tensors[key], tensors[f"{stem}.values"]
        return tensors, dense

    # ----------------------------------------------------------------------------------------- state
    @override
    def method_hyperparameters(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "budget_count": self.budget_count,
            "reselection_steps": self.reselection_steps,
            "accumulation_steps": self.accumulation_steps,
            "drop_fraction": self.drop_fraction,
            "decay": self.decay,
            "total_steps": self.selector.total_steps if self.selector is not None else self.total_steps,
            "seed": self.seed,
        }

    @override
    def method_schedule(self) -> dict[str, Any]:
        return {"budget": self.budget_count, "moved": [list(m) for m in self.moved]}

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.selector is None:
            return dict(self._pending) if self._pending is not None else {}
        return {**self.selector.state_dict(), "moved": [list(m) for m in self.moved]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict) if state_dict else None  # applied in on_train_start, once T is known
