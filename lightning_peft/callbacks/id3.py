"""The ``ID3`` callback: selective fine-tuning that unmasks scalar parameters step by step within a budget."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_peft import distributed
from lightning_peft.adapters.sparse import SparseDeltaLayer
from lightning_peft.callbacks.sparse import SparseMethod
from lightning_peft.methods.id3 import Unmasker

__all__ = ["ID3"]


class ID3(SparseMethod):
    """ID³ (Agarwal et al., TACL 2025): train a budget of scalar parameters, unmasked step by step by importance.

    At optimizer step ``t < T`` the ``n_t = B // T`` (+1 for the first ``B % T`` steps) entries not
    chosen yet with the largest ``|g| / (eps + |θ|)^exp``, over all targeted tensors together, join the
    trained set; after ``T`` steps exactly ``B`` entries train, and the set never shrinks.

    The trained values live in one flat bank of ``B`` slots (:mod:`lightning_peft.adapters.sparse`):
    gradients and AdamW state are O(B), not O(model), and the bank never changes, so the optimizer
    is built once. Scoring needs the dense gradient of entries not chosen yet; it is read in each
    layer's backward, one tensor at a time, and only that tensor's best ``n_t`` candidates are kept, on
    the micro-batch that completes an optimizer step while unmasking is still going on (after ``T``
    steps the backward is O(B) only). New entries receive their gradient in the same optimizer step,
    as in the reference; their AdamW moments start at zero under the shared step count, which is what
    the reference's dense masked AdamW gives an entry masked until then.

    Hooks: ``setup`` resolves the targets (the preset's layers by default), fingerprints the base and
    injects the sparse layers; ``on_train_start`` (after Lightning restored the loops) builds the
    :class:`~lightning_peft.methods.id3.Unmasker` (``T`` defaults to ``trainer.estimated_stepping_batches``)
    and applies restored state; ``on_train_batch_start`` arms the scoring hooks on the micro-batch that
    ends an accumulation window; ``on_before_optimizer_step`` (gradients complete and averaged across
    ranks) selects the new entries and gives them their gradient; ``on_fit_end`` logs the density per
    layer, draws it (``id3_density.png``) and saves indices + values.

    Several processes: ``strategy="ddp_selective"``, or FSDP2 (``ModelParallelStrategy`` with
    ``tensor_parallel_size=1``, the model sharded by :func:`lightning_peft.shard` in ``configure_model``).
    Each rank's dense gradient is averaged across ranks inside the scoring hook (under FSDP2 it is the
    gradient of the all-gathered weight), so every rank scores the same numbers and makes the same,
    exact global top-``n_t`` choice with no broadcast; under FSDP2 the bank stays whole on every rank and
    its gradient is averaged first thing in ``on_before_optimizer_step``. Tests check indices and weights
    are identical on both ranks and, under FSDP2, equal to one process on both ranks' batches.
    A target layer called several times in one step is scored on its gradient summed over the calls.

    Gradient clipping: Lightning clips after ``on_before_optimizer_step`` (and after the backward the
    scoring hooks run in), so ID3 scores the *unclipped* gradients; the reference, called from its
    optimizer's ``step``, scores the clipped ones. Without ``gradient_clip_val`` they are the same. The
    trained entries' update is clipped as usual.

    Ties at the cutoff: here the ``n_t`` new entries are an exact top-``n_t``, ties broken by tensor name
    then flat index. The reference (selective-peft-toolkit ``optimizers/id3.py``) takes the ``n_t``-th
    largest score among the unchosen entries as a cutoff and chooses, tensor by tensor, *every* entry
    scoring ``>=`` it; only when one tensor alone adds more than ``n_t`` does it un-choose that tensor's
    first chosen entries by flat index (earlier steps' entries included), so ties across tensors let a
    step add more than ``n_t``. With ``B < T`` it raises ``IndexError`` (``topk(k=0).values[-1]``) at the
    first step with nothing to add; here those steps add nothing.

    Args:
        budget: entries to train, a count (``int >= 1``) or a fraction of the targeted entries (``0 < float < 1``).
        total_steps: ``T``, the optimizer steps over which the budget is unmasked; default the whole run.
        eps: the score's ``eps`` (> 0). The default 1e-8 is ours: the reference has no default (``eps=None``).
        exp: the score's exponent on ``eps + |θ|`` (>= 0; 0 ranks by ``|g|`` alone). The default 1 is ours; the
            reference has none.
        target_modules: layers whose tensors may train (regex, names/suffixes, ``"all-linear"``); default the preset.
        exclude_modules: layers never trained.
        parameters: which tensors of each target layer: ``("weight",)`` or ``("weight", "bias")``.
        include_norms: also the weight and bias of every LayerNorm/GroupNorm/BatchNorm of the backbone.
        modules_to_save: backbone modules trained in full (a new head).
        backbone: dotted path of the backbone inside the ``LightningModule``; default detected.
        save_dir: folder for the deltas (sparse format) and ``id3_density.png`` at the end of fit.
        log_every: log each layer's density every this many optimizer steps (the overall one: ``log_every_n_steps``).

    Raises:
        ValueError: a budget <= 0, a fraction outside (0, 1), a budget larger than the targeted entries,
            ``eps <= 0``, ``exp < 0``, targets that match nothing, a run without a finite length and no
            ``total_steps``, or a checkpoint of another configuration.
        NotImplementedError: plain ``ddp``, FSDP1/DeepSpeed, tensor parallelism, or ``ModelParallelStrategy`` on a
            model not sharded by :func:`lightning_peft.shard`, before training.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[ID3(budget=0.01, exp=1.0)], logger=False)
    """

    method = "id3"

    def __init__(
        self,
        budget: float = 0.01,
        total_steps: int | None = None,
        eps: float = 1e-8,
        exp: float = 1.0,
        target_modules: str | list[str] | None = None,
        exclude_modules: str | list[str] | None = None,
        parameters: tuple[str, ...] | list[str] = ("weight",),
        include_norms: bool = False,
        modules_to_save: list[str] | None = None,
        backbone: str | None = None,
        save_dir: str | None = None,
        log_every: int = 50,
    ) -> None:
        self.check_budget(budget, "ID3")
        if not eps > 0:
            raise ValueError(f"ID3 eps must be > 0, got {eps!r}")
        if not exp >= 0:
            raise ValueError(f"ID3 exp must be >= 0, got {exp!r}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"ID3 total_steps must be >= 1, got {total_steps!r}")
        self._init_sparse(
            target_modules, exclude_modules, parameters, include_norms, modules_to_save, backbone, save_dir
        )
        self.budget, self.total_steps, self.eps, self.exp = budget, total_steps, eps, exp
        self.log_every = max(1, int(log_every))
        self.budget_count = 0
        self.unmasker: Unmasker | None = None
        self._pending: dict[str, Any] | None = None
        self._keys: dict[int, str] = {}  # id(layer) -> name relative to the backbone

    # ----------------------------------------------------------------------------------------- setup
    @override
    def capacity(self, root: nn.Module, targets: dict[str, tuple[str, ...]]) -> int:
        count = self.budget_entries(self.budget)
        self.budget_count = count
        return count

    resolved = ("budget_count", "total_steps")

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "total_steps": self.total_steps}  # as asked, not as a fit resolved it

    @override
    def kept(self) -> dict[str, Any]:
        return {"budget_count": self.budget_count}

    @override
    def reuse(self, root: nn.Module, kept: dict[str, Any]) -> None:
        self.budget_count = int(kept["budget_count"])

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not in on_fit_start: estimated_stepping_batches there would build the train loader before Lightning restores
        # the loops, and a resumable loader would never get its place in the epoch back (Lightning issue #20550).
        chosen = self.bank_of(pl_module).used
        if chosen and self._pending is None:  # a second fit of a module this method trained, not a resume
            raise ValueError(
                f"ID3: this module already has {chosen:,} entries unmasked by an earlier fit; a new fit would start "
                "the unmasking schedule again over them. Resume that run from its checkpoint (ckpt_path=...) to go "
                "on, or start from a fresh module"
            )
        planned = trainer.estimated_stepping_batches
        total = self.total_steps
        if self._pending is not None:
            total = int(self._pending["total_steps"])
        elif total is None:
            if not math.isfinite(planned):
                raise ValueError("ID3 needs a finite run: set trainer max_steps/max_epochs or ID3 total_steps")
            total = int(planned)
        if math.isfinite(planned) and planned < total:
            rank_zero_warn(
                f"ID3 total_steps={total} is longer than the {int(planned)} optimizer steps the trainer will run: "
                f"only {Unmasker(self.budget_count, total, self.total_params).cumulative(int(planned) - 1):,} of the "
                f"budget of {self.budget_count:,} entries will be unmasked"
            )
        self.unmasker = Unmasker(self.budget_count, total, self.total_params, eps=self.eps, exp=self.exp)
        if self._pending is not None:
            self.unmasker.load_state_dict(self._pending)
            self._pending = None
        self._keys = {id(layer): name for name, layer in self.layers(pl_module)}

    # ----------------------------------------------------------------------------------------- scoring
    def _hook(self, layer: SparseDeltaLayer, name: str, grad: torch.Tensor) -> None:
        assert self.unmasker is not None
        if distributed.is_distributed():
            grad = distributed.all_reduce(grad.detach().clone(), "mean")
        key = f"{self._keys[id(layer)]}:{name}"
        self.unmasker.observe(key, grad, layer.base_layer.get_parameter(name), layer.indices(name))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.unmasker is None:
            return
        ends_window = (
            batch_idx + 1
        ) % trainer.accumulate_grad_batches == 0 or batch_idx + 1 == trainer.num_training_batches
        # Before the first entry exists nothing would need a gradient, so every micro-batch of that window scores
        # (the last one's candidates count); later only the micro-batch that completes the optimizer step does.
        nothing_yet = self.bank_of(pl_module).used == 0
        want = (ends_window or nothing_yet) and self.unmasker.wants_gradients(trainer.global_step)
        if want != self._armed:
            self.arm_grad_hooks(pl_module, self._hook if want else None)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.unmasker is None:
            return
        self.reduce_bank_grad(pl_module)
        step = trainer.global_step
        if self._armed:
            for _, layer in self.layers(pl_module):
                layer.flush_grad_hook()
            picks = self.unmasker.select(step)
            grads = self.unmasker.selected_grads
            bank_grad = self.bank_grad(self.bank_of(pl_module))
            layers = dict(self.layers(pl_module))
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            scale = float(scaler.get_scale()) if scaler is not None else 1.0  # hook gradients are not unscaled yet
            for key, indices in picks.items():
                layer_name, pname = key.rsplit(":", 1)
                slots = layers[layer_name].add(pname, indices)
                bank_grad[slots] = grads[key].to(bank_grad) / scale
            self.arm_grad_hooks(pl_module, None)
        self.log_density(trainer, pl_module, per_layer=(step + 1) % self.log_every == 0)

    # ----------------------------------------------------------------------------------------- state
    @override
    def method_hyperparameters(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "budget_count": self.budget_count,
            "total_steps": self.unmasker.total_steps if self.unmasker is not None else self.total_steps,
            "eps": self.eps,
            "exp": self.exp,
        }

    @override
    def method_schedule(self) -> dict[str, Any]:
        return {"budget": self.budget_count}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"unmasker": self.unmasker.state_dict() if self.unmasker is not None else self._pending}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("unmasker")  # applied in on_train_start, once T is known
