"""The ``AdaLoRA`` callback: SVD-form adapters whose rank budget is pruned by importance during training."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_peft import distributed
from lightning_peft.adapters import AdaLoRAConfig, LoRAConfig, SVDLoRALayer, adapter_layers
from lightning_peft.callbacks.backbone import resolve_backbone
from lightning_peft.callbacks.lora import LoRA
from lightning_peft.methods.adalora import RankAllocator

__all__ = ["AdaLoRA"]


class AdaLoRA(LoRA):
    """Fine-tune with AdaLoRA: ``W + B·diag(E)·A·alpha/r`` adapters whose ranks are re-allocated by importance.

    Hooks: ``setup`` injects SVD adapters (as :class:`LoRA` does) and marks them to be kept whole under
    FSDP2 (:func:`lightning_peft.distributed.mark_replicated`); ``on_train_start``
    builds the :class:`~lightning_peft.methods.adalora.RankAllocator` (``total_step`` defaults to
    ``trainer.estimated_stepping_batches``; a schedule that does not fit the run is refused there and the
    adapters injected in ``setup`` are taken out again), applies state restored from a checkpoint and reads
    the step the run starts from (``on_train_start``, not ``on_fit_start``: Lightning restores the step and a
    resumable loader's place in the epoch only between the two);
    ``on_before_optimizer_step`` adds the orthogonal regulariser's gradient and folds the complete
    gradients (after accumulation, the DDP all-reduce and AMP unscaling) into the importance EMAs;
    ``on_train_batch_end`` masks triplets after the optimizer step when the schedule says so and logs
    the budget; ``on_fit_end`` shrinks every adapter to its kept ranks, writes a rank heatmap, and saves.

    Gradient clipping: Lightning calls ``on_before_optimizer_step`` before it clips, so the importance
    EMAs fold in the *unclipped* gradients; peft's ``update_and_allocate`` runs after the training loop's
    clipping and scores the clipped ones. Without ``gradient_clip_val`` they are the same.

    Steps are optimizer steps (``trainer.global_step``), never micro-batches. On several ranks every
    rank sees the same all-reduced gradients and parameters, so every rank computes the same scores
    and masks with no extra communication (a test compares them at every masking step). Under FSDP2
    (:func:`lightning_peft.shard` in ``configure_model``) the base weights are sharded and the adapters
    are kept whole on every rank: the callback averages their gradients across ranks before it scores
    them, so scores, masks and the shrunk adapters equal a one-process run's.

    Args:
        r: initial rank of every adapted layer (peft's ``init_r``).
        target_r: average rank per layer at the end; the final budget is ``target_r x layers``.
        alpha: scale numerator; the update is scaled by ``alpha / r`` (``r`` the initial rank). The default 16
            is ours; peft's ``AdaLoraConfig`` defaults to ``lora_alpha=8`` (pass 8 for peft's scale).
        tinit: warm-up optimizer steps before pruning.
        tfinal: final optimizer steps with the rank pattern frozen.
        deltaT: prune every ``deltaT`` optimizer steps while the budget decays.
        beta1: EMA factor of the sensitivity, in (0, 1).
        beta2: EMA factor of the uncertainty, in (0, 1).
        orth_reg_weight: weight of the orthogonality penalty on A and B (0 disables it).
        total_step: optimizer steps the schedule spans; default ``trainer.estimated_stepping_batches``.
        dropout: dropout on the adapter input, in [0, 1).
        target_modules: layers to adapt (regex, names/suffixes, or ``"all-linear"``); default: the preset.
        exclude_modules: layers never adapted.
        modules_to_save: backbone modules trained in full and saved with the adapter.
        backbone: dotted path of the backbone inside the ``LightningModule``; default: detected.
        save_dir: folder for the adapter (peft AdaLoRA format) and ``adalora_ranks.png`` at the end of fit.
        autocast_adapter_dtype: keep the adapters float32 beside a half-precision or quantized base, also under
            ``precision="bf16-true"`` (peft's default); False: the base's dtype.

    Raises:
        ValueError: on construction for out-of-range values (``target_r > r``, betas outside (0, 1),
            ``deltaT < 1``, ``tinit + tfinal >= total_step``); at fit start for a schedule that does not
            fit the run; on resume for allocator state that does not match the adapters.
        NotImplementedError: under FSDP2, adapters that were sharded (not kept whole by :func:`lightning_peft.shard`),
            before training starts.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[AdaLoRA(r=12, target_r=4, tinit=10, tfinal=10)], logger=False)
    """

    method = "adalora"
    resume_keys = ("r", "alpha", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight")

    def __init__(
        self,
        r: int = 12,
        target_r: int = 8,
        alpha: float = 16.0,
        tinit: int = 0,
        tfinal: int = 0,
        deltaT: int = 1,  # noqa: N803 - the paper's and peft's name
        beta1: float = 0.85,
        beta2: float = 0.85,
        orth_reg_weight: float = 0.5,
        total_step: int | None = None,
        dropout: float = 0.0,
        target_modules: str | list[str] | None = None,
        exclude_modules: str | list[str] | None = None,
        modules_to_save: list[str] | None = None,
        backbone: str | None = None,
        save_dir: str | None = None,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        config = AdaLoRAConfig(
            r=r,
            target_r=target_r,
            alpha=alpha,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=deltaT,
            beta1=beta1,
            beta2=beta2,
            orth_reg_weight=orth_reg_weight,
            total_step=total_step,
            dropout=dropout,
            target_modules=target_modules,
            exclude_modules=exclude_modules,
            modules_to_save=modules_to_save or [],
            autocast_adapter_dtype=autocast_adapter_dtype,
        )
        self._init_shell(config, backbone, save_dir)
        self.total_step = total_step  # as asked; config.total_step holds the value a fit resolved
        self.allocator: RankAllocator | None = None
        self.outcome: dict[str, Any] = {}  # final ranks and budget history, kept after fit for pictures and the zoo
        self.unfinished: dict[str, Any] | None = None  # set when a fit stops before the schedule reaches its end
        self._pending: dict[str, Any] | None = None
        self._last_step = -1
        self.penalty = torch.zeros(())

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # Importance scores and masks need whole triplets: under FSDP2, lightning_peft.shard keeps these small
        # tensors whole on every rank (their gradients averaged in on_before_optimizer_step); the base is sharded.
        root, _, _ = resolve_backbone(pl_module, self.backbone)
        distributed.mark_replicated(p for _, layer in adapter_layers(root) for p in layer.parameters(recurse=False))

    def _check_whole(self, pl_module: pl.LightningModule, layers: list[tuple[str, SVDLoRALayer]]) -> None:
        """Under FSDP2 the adapters must have been kept whole (by lightning_peft.shard), not sharded.

        Checked against what :func:`lightning_peft.shard` kept whole, not by tensor type: between a forward and
        the backward FSDP2 leaves the gathered (plain) tensors registered on the modules.
        """
        if not any(distributed.is_sharded(m) for m in pl_module.modules()):
            return
        whole = {id(p) for p in distributed.replicated_params(pl_module)}
        sharded = [n for n, layer in layers if any(id(p) not in whole for p in layer.parameters(recurse=False))]
        if sharded:
            raise NotImplementedError(
                f"AdaLoRA: the adapters of {sharded[0]} (and {len(sharded) - 1} more) were sharded by FSDP2, but "
                "importance scores and masks need whole triplets. Shard with lightning_peft.shard(self.model, "
                "self.device_mesh) in configure_model: it keeps AdaLoRA's adapters whole on every rank and shards the "
                "base weights"
            )

    @override
    def settings(self, config: LoRAConfig) -> dict[str, Any]:
        settings = super().settings(config)
        settings["config"] = {**settings["config"], "total_step": self.total_step}  # as asked, not as a fit resolved
        return settings

    def _layers(self, pl_module: pl.LightningModule) -> list[tuple[str, SVDLoRALayer]]:
        root, _, _ = resolve_backbone(pl_module, self.backbone)
        return [(n, layer) for n, layer in adapter_layers(root) if isinstance(layer, SVDLoRALayer)]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in on_fit_start: Lightning restores the loops only after on_fit_start. Read earlier, a resumed
        # run's global_step is still 0 (the first micro-batch of an accumulation window would look like a completed
        # optimizer step), and estimated_stepping_batches builds the train loader before its saved place in the epoch
        # is known, so a resumable loader never gets it back (Lightning issue #20550).
        super().on_train_start(trainer, pl_module)
        layers = self._layers(pl_module)
        self._check_whole(pl_module, layers)
        config: AdaLoRAConfig = self.config  # type: ignore[assignment]
        planned = trainer.estimated_stepping_batches
        total = self.total_step
        if self._pending is not None:  # a resumed run continues the schedule it started with
            total = int(self._pending["total_step"])
        elif total is None:
            if not math.isfinite(planned):
                raise ValueError("AdaLoRA needs a finite run: set trainer max_steps/max_epochs or AdaLoRA total_step")
            total = int(planned)
        if math.isfinite(planned) and planned > total:
            rank_zero_warn(
                f"AdaLoRA total_step={total} is shorter than the {int(planned)} optimizer steps the trainer will run: "
                f"the rank pattern is frozen after step {total - config.tfinal} and kept for the remaining steps"
            )
        config.check_total_step(total)
        config.total_step = total
        self.allocator = RankAllocator(layers, config, total_step=total)
        if self._pending is not None:
            self.allocator.load_state_dict(self._pending)
            self._pending = None
        self._last_step = trainer.global_step

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        alloc = self.allocator
        if alloc is None:
            return
        distributed.reduce_replicated_grads(pl_module)  # FSDP2: the whole adapters' gradients, averaged over ranks
        self.penalty = alloc.add_orthogonal_grad()  # part of the gradient, as in peft's loss, before scoring
        if alloc.wants_importance(trainer.global_step):
            alloc.update_importance()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        alloc = self.allocator
        if alloc is None or trainer.global_step == self._last_step:  # a micro-batch of gradient accumulation
            return
        self._last_step = trainer.global_step
        if alloc.allocate(trainer.global_step - 1) is not None:  # a masking step: the ranks per layer changed
            ranks = {f"adalora/rank/{name}": float(rank) for name, rank in alloc.ranks().items()}
            for logger in trainer.loggers:
                logger.log_metrics(ranks, step=trainer.global_step)
        pl_module.log_dict(
            {
                "adalora/budget": float(alloc.budget),
                "adalora/kept_ranks": float(alloc.kept),
                "adalora/orth": self.penalty,
            },
            on_step=True,
            on_epoch=False,
        )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        alloc, self.allocator = self.allocator, None  # the allocator holds the pre-shrink parameters: let it go
        self.unfinished = None
        if alloc is not None:
            final = alloc.rank_pattern if alloc.rank_pattern is not None else alloc.masks
            for layer, keep in zip(alloc.layers, final, strict=True):
                layer.shrink(keep)
            ranks = alloc.ranks()
            self.outcome = {
                "ranks": ranks,
                "history": list(alloc.history),
                "max_rank": max(alloc.init_ranks),
                "target_budget": alloc.target_bgt,
            }
            rank_zero_info(
                f"AdaLoRA: kept {sum(ranks.values())} of {alloc.init_bgt} ranks "
                f"(target {alloc.target_bgt}) over {len(ranks)} layers"
            )
            if alloc.rank_pattern is None:  # stopped (early stopping, max_time, should_stop) before the final phase
                self.unfinished = {
                    "stopped_at": int(trainer.global_step),
                    "planned_steps": int(alloc.total_step),
                    "note": (
                        f"the budget was still decaying ({sum(ranks.values())} ranks kept, target "
                        f"{alloc.target_bgt}; the final {alloc.config.tfinal} steps with frozen ranks never ran)"
                    ),
                }
                rank_zero_warn(
                    f"AdaLoRA: the fit stopped at step {trainer.global_step} of the {alloc.total_step} its schedule "
                    f"planned, before the rank budget reached its target: {self.unfinished['note']}. The saved "
                    "result and its zoo entry say so; give the run the steps it planned, or a schedule that fits "
                    "(tinit, tfinal), for the budget it was given"
                )
            for logger in trainer.loggers:
                logger.log_metrics({"adalora/final_ranks": float(sum(ranks.values()))}, step=trainer.global_step)
        super().on_fit_end(trainer, pl_module)

    @override
    def schedule(self) -> dict[str, Any]:
        """The final ranks per layer and the budget history ``[step, kept]`` (after fit), for the zoo manifest."""
        if not self.outcome:
            return {}
        history = [[int(step), int(kept)] for step, kept in self.outcome["history"]]
        out = {
            "ranks": dict(self.outcome["ranks"]),
            "history": history,
            "target_budget": self.outcome["target_budget"],
            "finished": self.unfinished is None,
        }
        return out | (self.unfinished or {})

    @override
    def write_pictures(self, folder: Path) -> list[Path]:
        if not self.outcome:
            return []
        from lightning_peft.callbacks.plots import plot_ranks  # matplotlib only when a picture is wanted

        return [plot_ranks(**self.outcome, path=folder / "adalora_ranks.png")]

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        alloc_state = self.allocator.state_dict() if self.allocator is not None else self._pending
        state["allocator"] = alloc_state
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._pending = state_dict.get("allocator")  # applied in on_train_start, once the allocator exists
