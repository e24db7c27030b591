"""The ``LISA`` callback: train a few sampled blocks at a time, with memory that really stays small."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from typing_extensions import override

from lightning_peft.backbones import Blocks, Preset
from lightning_peft.callbacks.scheduled import ScheduledSelection
from lightning_peft.methods.lisa import LayerSampler
from lightning_peft.strategies import check_data_parallel_only, check_dynamic_strategy

__all__ = ["LISA"]


class LISA(ScheduledSelection):
    """Layerwise Importance Sampled AdamW (Pan et al., NeurIPS 2024) as a callback.

    The embeddings, final norm and head (the *always-on* modules) train all the time; of the model's
    repeated blocks only ``n_layers``, drawn every ``interval`` optimizer steps, train at a time. The
    rest of the backbone stays frozen. On a model no backbone preset knows, every backbone parameter
    outside the blocks is always on (a task head included), as in LMFlow and axolotl; ``always_on``
    narrows that to the names given.

    Hooks: ``setup`` finds the blocks (the backbone preset's block list, or ``block_path``), freezes
    the backbone except the blocks and the always-on modules, and fingerprints the base weights (the
    blocks are about to change); the optimizer is built after it from every block, so any block can
    train later. ``on_train_start``, once the optimizer exists, checks it holds every block and
    applies the first draw. ``on_train_batch_start`` switches the active set at interval boundaries
    of optimizer steps (never inside a gradient-accumulation window). A block that goes frozen loses
    its gradients *and its optimizer state* (Adam's ``exp_avg``/``exp_avg_sq``), so memory holds only
    the active blocks and the always-on modules; a block drawn again later starts with fresh optimizer
    state, as a block trained for the first time does (the paper's algorithm re-initialises the
    optimizer at every switch; LMFlow's reference keeps every state it ever made, which is why its
    memory grows). ``on_before_optimizer_step`` counts the steps each block trained;
    ``on_fit_end`` draws those counts (``lisa_layers.png``) and saves the changed tensors.

    The draw of interval ``k`` comes from a generator seeded by ``(seed, k)``: every rank draws the
    same blocks without communication, a resumed run draws what the uninterrupted run drew, and the
    global RNG is never touched.

    Multi-process: plain ``strategy="ddp"`` registers every block when it wraps the model and raises
    "parameters that were not used in producing the loss" at the step after LISA first freezes some
    (with ``find_unused_parameters=True`` it trains correctly but keeps a gradient bucket for every
    block), so LISA refuses it before training and asks for
    :class:`~lightning_peft.strategies.SelectiveDDPStrategy` (``strategy="ddp_selective"``), which
    all-reduces the gradients of exactly the trainable parameters at every optimizer step.

    FSDP2 (``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)``, the model sharded by
    :func:`lightning_peft.shard` in ``configure_model``: each block, then the root) trains exactly as one process
    on the union of the ranks' batches (measured: max difference 0.0 on 2 CPU ranks, resumes included). FSDP2
    (torch 2.14) copies ``requires_grad`` from the sharded parameter to the unsharded one it computes with at
    *every* all-gather (``FSDPParam.to_unsharded`` calls ``set_requires_grad_if_needed``), not once at its lazy
    init, and reduce-scatters only the parameters that got a gradient. So LISA flips the flag on the sharded
    ``DTensor`` parameters between steps and FSDP2 reduce-scatters exactly the active blocks and the always-on
    modules: a block frozen after the first forward gets no gradient and no reduce-scatter, a block frozen
    before it and unfrozen later gets both again (``tests/test_fsdp2_lisa.py`` records FSDP2's reduce-scatters at
    every step, also with ``reshard_after_forward=False`` and bfloat16 parameters). A block that goes frozen
    drops its sharded gradient and its sharded optimizer state, as on one process. The parameters are bound
    by name, since ``fully_shard`` replaces them after ``setup``. Resuming from a distributed checkpoint:
    ``on_fit_start`` freezes every block while the strategy loads the optimizer (its template would give every
    trainable parameter a state the checkpoint may lack, and fail), and ``on_train_start`` reads back, from the
    checkpoint, the state of the blocks active at the resumed step
    (:func:`lightning_peft.distributed.load_optimizer_state`).
    Refused before training: tensor parallelism, trained parameters FSDP2 does not manage (``configure_model``
    did not shard), ranks holding different base weights (FSDP2 would shard a mix), and a resume from a
    single-file checkpoint (``save_distributed_checkpoint=False``). The saved delta is gathered and written
    once, unsharded, in the same format as on one process. DeepSpeed and FSDP1 are refused before training.

    A fit that fails before its first optimizer step (any refusal, e.g. an optimizer without the
    blocks, a checkpoint of another configuration) gives the backbone back the ``requires_grad`` flags
    it had before the fit, through ``on_exception``. A second fit with the same callback continues only
    on the same backbone, blocks and configuration (same base fingerprint, step counts add up);
    otherwise the callback sets up afresh for what it finds.

    Saving: the result is the new values of every tensor that trained (the always-on modules and
    the blocks drawn at least once), written as a dense weight delta with the base fingerprint taken
    before training; blocks that never trained are not written.

    All of this but the draw is :class:`~lightning_peft.callbacks.scheduled.ScheduledSelection`, shared with
    :class:`~lightning_peft.callbacks.HFT` (whose units are parameter groups inside the blocks rather than blocks).

    Args:
        n_layers: blocks trained at a time, ``1 <= n_layers <=`` number of blocks.
        interval: optimizer steps between draws, ``>= 1``.
        seed: seed of the draws.
        probabilities: per-block weights ``w_i`` (the paper's importance sampling; only their ratios matter):
            block ``i`` trains in an interval with probability ``min(1, c·w_i)``, ``c`` such that these sum to
            ``n_layers`` (a block whose share would exceed 1 trains in every interval); with ``n_layers=1``
            that is ``w_i / Σ w``. Default: uniform, ``n_layers / blocks`` each.
        block_path: dotted path of the ``nn.ModuleList`` of blocks inside the backbone (several joined
            by ``"+"``); default: the backbone preset's, else the largest list of same-type blocks.
        always_on: modules or parameters (dotted names inside the backbone) that always train; default:
            the preset's embeddings, final norm and head that exist in the model, and for a model no preset
            knows every backbone parameter outside the blocks (logged as the fewest module names that cover it).
        backbone: dotted path of the backbone inside the ``LightningModule``; default: detected.
        save_dir: folder to write the changed tensors (dense delta) and ``lisa_layers.png`` to at the end of fit.

    Raises:
        ValueError: ``n_layers`` < 1 or more than the blocks, ``interval`` < 1, a ``block_path`` that does
            not exist or is not a ModuleList, an ``always_on`` name that matches nothing, an optimizer that
            lacks some block's parameters, a checkpoint from another configuration, or under FSDP2 trained
            parameters that are not sharded or ranks that start from different base weights.
        NotImplementedError: an unsupported strategy (the message names the one to use), tensor parallelism, or
            a resume under FSDP2 from a single-file checkpoint.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[LISA(n_layers=2, interval=20)], logger=False)
    """

    method = "lisa"
    core_key = "sampler"  # the name LISA's checkpoints have always used
    unit_word = "blocks"

    def __init__(
        self,
        n_layers: int = 2,
        interval: int = 20,
        seed: int = 0,
        probabilities: Sequence[float] | None = None,
        block_path: str | None = None,
        always_on: list[str] | None = None,
        backbone: str | None = None,
        save_dir: str | None = None,
    ) -> None:
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"LISA n_layers must be an integer >= 1, got {n_layers!r}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"LISA interval must be an integer >= 1 optimizer step, got {interval!r}")
        super().__init__(seed=seed, block_path=block_path, always_on=always_on, backbone=backbone, save_dir=save_dir)
        self.n_layers, self.interval = n_layers, interval
        self.probabilities = list(probabilities) if probabilities is not None else None

    @property
    def sampler(self) -> LayerSampler | None:
        """The layer sampler of the blocks set up (None before ``setup``)."""
        return self.core  # type: ignore[no-any-return]

    @property
    def block_names(self) -> list[str]:
        """The blocks' dotted names, in order (the units LISA draws)."""
        return self.unit_names

    @override
    def _check_strategy(self, strategy: object) -> None:
        check_dynamic_strategy(strategy, "LISA", trainable_changes=True, sharded_ok=True)

    @override
    def _find_units(self, root: nn.Module, blocks: Blocks, preset: Preset | None) -> tuple[list[str], list[list[str]]]:
        names = {id(p): n for n, p in root.named_parameters()}
        return list(blocks.names), [[names[id(p)] for p in module.parameters()] for module in blocks.modules]

    @override
    def _make_core(self) -> LayerSampler:
        return LayerSampler(len(self.unit_names), self.n_layers, self.interval, self.seed, self.probabilities)

    @override
    def _describe(self, blocks: Blocks, always: str) -> str:
        every = f"every {self.interval} steps; always on: {always}"
        return f"{self.n_layers} of {len(blocks)} blocks of {blocks.path} {every}"

    @override
    def hyperparameters(self) -> dict[str, Any]:
        return {
            "n_layers": self.n_layers,
            "interval": self.interval,
            "seed": self.seed,
            "probabilities": self.probabilities,
            "block_path": self.block_path,
            "always_on": self.always_on_names,
        }

    @override
    def schedule(self) -> dict[str, Any]:
        return {"blocks": self.block_names, "steps_trained": list(self.counts), "intervals": len(self.history)}

    @override
    def write_pictures(self, folder: Path) -> list[Path]:
        if not self.block_names:
            return []
        from lightning_peft.callbacks.plots import plot_layer_counts  # matplotlib only when a picture is wanted

        return [plot_layer_counts(self.block_names, self.counts, self.n_layers, folder / "lisa_layers.png")]


def _check_data_parallel_only(strategy: object) -> None:
    """Refuse ``ModelParallelStrategy`` with tensor parallelism (``lightning_peft.shard`` shards data-parallel only)."""
    check_data_parallel_only(strategy, "LISA")
