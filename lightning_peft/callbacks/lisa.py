"""The ``LISA`` callback: train a few sampled blocks at a time, with memory that really stays small."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_peft import distributed
from lightning_peft.adapters.delta import delta_config, write_delta
from lightning_peft.backbones import find_blocks, resolve_always_on
from lightning_peft.callbacks.backbone import resolve_backbone
from lightning_peft.callbacks.base import MethodCallback, restorer
from lightning_peft.methods.lisa import LayerSampler
from lightning_peft.strategies import check_dynamic_strategy
from lightning_peft.zoo.entry import fingerprint

__all__ = ["LISA"]


class LISA(MethodCallback):
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
    all-reduces the gradients of exactly the trainable parameters at every optimizer step. FSDP2
    (``ModelParallelStrategy``), DeepSpeed and FSDP1 are refused before training.

    A fit that fails before its first optimizer step (any refusal, e.g. an optimizer without the
    blocks, a checkpoint of another configuration) gives the backbone back the ``requires_grad`` flags
    it had before the fit, through ``on_exception``. A second fit with the same callback continues only
    on the same backbone, blocks and configuration (same base fingerprint, step counts add up);
    otherwise the callback sets up afresh for what it finds.

    Saving: the result is the new values of every tensor that trained (the always-on modules and
    the blocks drawn at least once), written as a dense weight delta with the base fingerprint taken
    before training; blocks that never trained are not written.

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
            lacks some block's parameters, or a checkpoint from another configuration.
        NotImplementedError: an unsupported strategy (the message names the one to use).

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[LISA(n_layers=2, interval=20)], logger=False)
    """

    method = "lisa"

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
        self.n_layers, self.interval, self.seed = n_layers, interval, seed
        self.probabilities = list(probabilities) if probabilities is not None else None
        self.block_path, self.always_on, self.backbone, self.save_dir = block_path, always_on, backbone, save_dir
        self.sampler: LayerSampler | None = None
        self.block_names: list[str] = []
        self.always_on_names: list[str] = []
        self.counts: list[int] = []  # optimizer steps each block trained
        self.history: list[tuple[int, list[int]]] = []  # (first step, active blocks) of every interval
        self.active: list[int] = []
        self._blocks: list[list[nn.Parameter]] = []
        self._always: list[nn.Parameter] = []
        self._names: dict[int, str] = {}  # id(param) -> name relative to the backbone
        self._interval_index = -1
        self._base: dict[str, Any] | None = None
        self._pending: dict[str, Any] | None = None
        self._root: weakref.ref[nn.Module] | None = None  # the backbone the blocks belong to
        self._setup_configuration: dict[str, Any] | None = None
        self._fresh = False  # this fit set the callback up (rather than continuing an earlier fit's setup)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(backbone=self.backbone, block_path=self.block_path)

    def _configuration(self) -> dict[str, Any]:
        return {**self.hyperparameters(), "always_on": self.always_on, "backbone": self.backbone}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_dynamic_strategy(trainer.strategy, "LISA", trainable_changes=True)
        root, _, preset = resolve_backbone(pl_module, self.backbone)
        blocks = find_blocks(root, self.block_path)
        if self.sampler is not None:
            if self._same_setup(root, blocks.modules):
                self._fresh = False
                self._freeze(root)
                rank_zero_info("LISA: continuing on the module this callback set up in an earlier fit")
                return
            rank_zero_info(
                "LISA: this callback set up another module or configuration in an earlier fit; setting up afresh "
                "(the earlier fit's step counts, history and base fingerprint are dropped)"
            )
            self._forget()
        self.sampler = LayerSampler(len(blocks), self.n_layers, self.interval, self.seed, self.probabilities)
        block_ids = {id(p) for module in blocks.modules for p in module.parameters()}
        if self.always_on is not None:
            found = resolve_always_on(root, self.always_on)
            missing = [n for n in self.always_on if n not in found]
            if missing:
                self.sampler = None
                top = ", ".join(n for n, _ in root.named_children()) or "none"
                raise ValueError(
                    f"LISA always_on names {missing} match no module or parameter of {type(root).__name__} "
                    f"(its top-level modules: {top}); use dotted names relative to the backbone"
                )
            what = ", ".join(found)
        elif preset is not None:
            found = resolve_always_on(root, (*preset.always_on, *preset.head))
            what = ", ".join(found) or "nothing"
        else:  # no preset: every parameter outside the blocks trains, as in LMFlow and axolotl
            found = _outside_blocks(root, block_ids)
            what = f"every parameter outside the blocks ({', '.join(found) or 'none'})"
        self.block_names, self.always_on_names = list(blocks.names), found
        self._blocks = [list(module.parameters()) for module in blocks.modules]
        modules = dict(root.named_modules())
        params_by_name = dict(root.named_parameters())
        self._always = []
        for name in found:
            chosen = list(modules[name].parameters()) if name in modules else [params_by_name[name]]
            self._always += [p for p in chosen if id(p) not in block_ids]
        self._names = {id(p): n for n, p in root.named_parameters()}
        self._base = fingerprint(root)  # before any block changes: the base the delta applies to
        self._root = weakref.ref(root)
        self._setup_configuration = self._configuration()
        self._fresh = True
        self.counts = [0] * len(blocks)
        self._freeze(root)
        rank_zero_info(
            f"LISA: {self.n_layers} of {len(blocks)} blocks of {blocks.path} every {self.interval} steps; "
            f"always on: {what}"
        )

    def _same_setup(self, root: nn.Module, modules: Sequence[nn.Module]) -> bool:
        """Whether this fit finds the module, blocks and configuration the earlier setup was made for."""
        same_blocks = [[id(p) for p in m.parameters()] for m in modules] == [[id(p) for p in ps] for ps in self._blocks]
        return (
            self._root is not None
            and self._root() is root
            and same_blocks
            and self._setup_configuration == self._configuration()
        )

    def _freeze(self, root: nn.Module) -> None:
        """Freeze the backbone but the always-on parameters and the blocks; a fit that fails before training undoes it
        (flags restored; a setup made in this fit is forgotten), through :meth:`MethodCallback.on_exception`."""
        self._undo = restorer(root, self._forget if self._fresh else lambda: None)
        root.requires_grad_(False)
        for p in self._always:
            p.requires_grad_(True)
        for params in self._blocks:  # trainable when the optimizer is built, frozen in on_train_start
            for p in params:
                p.requires_grad_(True)

    def _forget(self) -> None:
        """Back to the state of a callback that never set anything up."""
        self.sampler = None
        self.block_names, self.always_on_names, self.counts, self.history, self.active = [], [], [], [], []
        self._blocks, self._always, self._names = [], [], {}
        self._interval_index, self._base, self._root, self._setup_configuration = -1, None, None, None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sampler is None:
            return
        in_optimizer = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        missing = [p for params in self._blocks for p in params if id(p) not in in_optimizer]
        missing += [p for p in self._always if id(p) not in in_optimizer]
        if missing:
            raise ValueError(
                f"LISA: the optimizer lacks {len(missing)} parameter(s) of the blocks/always-on modules "
                f"(first: {self._names.get(id(missing[0]), '?')}). Build it in configure_optimizers from every "
                "parameter that requires grad at that point (LISA freezes blocks only after the optimizer exists)."
            )
        if self._pending is not None:
            self._apply_state(self._pending)
            self._pending = None
        self._interval_index = -1
        self._switch(trainer, trainer.global_step)

    def _switch(self, trainer: pl.Trainer, step: int) -> None:
        assert self.sampler is not None
        index = self.sampler.interval_index(step)
        if index == self._interval_index:
            return
        self._interval_index = index
        active = self.sampler.active(step)
        for i, params in enumerate(self._blocks):
            on = i in active
            for p in params:
                if not on:
                    p.grad = None
                    for opt in trainer.optimizers:
                        opt.state.pop(p, None)  # exp_avg / exp_avg_sq go with the gradient
                p.requires_grad_(on)
        self.active = active
        first = index * self.interval
        if not self.history or self.history[-1][0] != first:  # a resumed run already has its interval
            self.history.append((first, active))
        metrics = {f"lisa/active/{i}": float(i in active) for i in range(len(self._blocks))}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.sampler is not None:
            self._switch(trainer, trainer.global_step)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        for i in self.active:
            self.counts[i] += 1

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
    def base_fingerprint(self, root: nn.Module) -> dict[str, Any]:
        if self._base is None:
            raise RuntimeError("LISA has not set up a model yet: fit first")
        return self._base

    @override
    def schedule(self) -> dict[str, Any]:
        return {"blocks": self.block_names, "steps_trained": list(self.counts), "intervals": len(self.history)}

    def changed_tensors(self, root: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors training changed (always-on modules, blocks trained at least one step), by name."""
        trained = {id(p) for p in self._always}
        for i, params in enumerate(self._blocks):
            if self.counts[i] > 0:
                trained.update(id(p) for p in params)
        return {name: p for name, p in root.named_parameters() if id(p) in trained}

    @override
    def save(self, root: nn.Module, path: str | Path) -> Path | None:
        tensors = {k: distributed.full_tensor(v.detach()) for k, v in self.changed_tensors(root).items()}
        config = delta_config(self.method, "dense", list(tensors), self.hyperparameters())
        return distributed.rank_zero_only(write_delta)(path, tensors, config)

    @override
    def write_pictures(self, folder: Path) -> list[Path]:
        if not self.block_names:
            return []
        from lightning_peft.callbacks.plots import plot_layer_counts  # matplotlib only when a picture is wanted

        return [plot_layer_counts(self.block_names, self.counts, self.n_layers, folder / "lisa_layers.png")]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler.state_dict() if self.sampler is not None else None,
            "counts": list(self.counts),
            "history": [[s, list(a)] for s, a in self.history],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.sampler is not None:
            self._apply_state(state_dict)
        else:
            self._pending = state_dict  # applied once setup has found the blocks

    def _apply_state(self, state: dict[str, Any]) -> None:
        assert self.sampler is not None
        if state.get("sampler") is not None:
            self.sampler.load_state_dict(state["sampler"])
        counts = list(state.get("counts") or [])
        if counts and len(counts) != len(self._blocks):
            raise ValueError(
                f"the checkpoint's LISA state has {len(counts)} blocks but this model has {len(self._blocks)}"
            )
        self.counts = counts or self.counts
        self.history = [(int(s), [int(i) for i in a]) for s, a in state.get("history") or []]


def _outside_blocks(root: nn.Module, block_ids: set[int]) -> list[str]:
    """The fewest dotted names (modules whole, else single parameters) that cover every parameter outside the blocks."""
    names: list[str] = []

    def walk(prefix: str, module: nn.Module) -> None:
        names.extend(prefix + n for n, p in module.named_parameters(recurse=False) if id(p) not in block_ids)
        for child_name, child in module.named_children():
            ids = {id(p) for p in child.parameters()}
            if not ids:
                continue
            if ids.isdisjoint(block_ids):
                names.append(prefix + child_name)
            else:
                walk(f"{prefix}{child_name}.", child)

    walk("", root)
    return names
