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
        # parameter names (relative to the backbone) of every block and of the always-on modules: FSDP2's
        # fully_shard (in configure_model, after setup) replaces the parameter objects, so they are bound by name
        self._block_params: list[list[str]] = []
        self._always_params: list[str] = []
        self._blocks: list[list[nn.Parameter]] = []  # the objects bound to those names now (see _bind)
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
        check_dynamic_strategy(trainer.strategy, "LISA", trainable_changes=True, sharded_ok=True)
        _check_data_parallel_only(trainer.strategy)
        root, _, preset = resolve_backbone(pl_module, self.backbone)
        blocks = find_blocks(root, self.block_path)
        if self.sampler is not None:
            if self._same_setup(root, blocks.modules):
                self._fresh = False
                self._bind(root)
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
        names = {id(p): n for n, p in root.named_parameters()}
        self._block_params = [[names[id(p)] for p in module.parameters()] for module in blocks.modules]
        modules = dict(root.named_modules())
        params_by_name = dict(root.named_parameters())
        self._always_params = []
        for name in found:
            chosen = list(modules[name].parameters()) if name in modules else [params_by_name[name]]
            self._always_params += [names[id(p)] for p in chosen if id(p) not in block_ids]
        self._bind(root)
        self._base = fingerprint(root)  # before any block changes: the base the delta applies to
        if _is_model_parallel(trainer.strategy):
            _check_same_base_on_every_rank(self._base)
        self._root = weakref.ref(root)
        self._setup_configuration = self._configuration()
        self._fresh = True
        self.counts = [0] * len(blocks)
        self._freeze(root)
        rank_zero_info(
            f"LISA: {self.n_layers} of {len(blocks)} blocks of {blocks.path} every {self.interval} steps; "
            f"always on: {what}"
        )

    def _bind(self, root: nn.Module) -> None:
        """Bind the block and always-on parameter names to ``root``'s parameter objects as they are now.

        Called in ``setup`` and again in ``on_train_start``: under FSDP2 ``configure_model`` (between the two)
        replaces every parameter by its sharded ``DTensor`` parameter, which the optimizer holds.
        """
        params = dict(root.named_parameters())
        self._blocks = [[params[n] for n in names] for names in self._block_params]
        self._always = [params[n] for n in self._always_params]
        self._names = {id(p): n for n, p in params.items()}

    def _same_setup(self, root: nn.Module, modules: Sequence[nn.Module]) -> bool:
        """Whether this fit finds the module, blocks and configuration the earlier setup was made for."""
        names = {id(p): n for n, p in root.named_parameters()}
        same_blocks = [[names.get(id(p)) for p in m.parameters()] for m in modules] == self._block_params
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
        self._block_params, self._always_params, self._blocks, self._always, self._names = [], [], [], [], {}
        self._interval_index, self._base, self._root, self._setup_configuration = -1, None, None, None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Under ``ModelParallelStrategy``: every block frozen while the strategy may load a checkpoint.

        The strategy loads a distributed checkpoint's optimizer state right after this hook, into a template that
        gives every parameter that requires grad a state, and fails on any state the checkpoint lacks (it holds
        none for the blocks frozen when it was saved). With only the always-on modules trainable that load is
        exact for them; ``on_train_start`` then reads the active blocks' own state (see there).
        """
        if self.sampler is None or not _is_model_parallel(trainer.strategy):
            return
        root = self._root() if self._root is not None else None
        assert root is not None
        self._bind(root)
        for params in self._blocks:
            for p in params:
                p.requires_grad_(False)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sampler is None:
            return
        root = self._root() if self._root is not None else None
        assert root is not None
        self._bind(root)  # the parameters the optimizer holds (FSDP2's sharded ones, if configure_model sharded)
        for p in self._always:
            p.requires_grad_(True)
        if _is_model_parallel(trainer.strategy):
            _check_sharded(self._names, [p for params in self._blocks for p in params] + self._always)
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
        if trainer.ckpt_path is not None and _is_model_parallel(trainer.strategy):
            self._load_active_optimizer_state(trainer, pl_module, trainer.ckpt_path)

    def _load_active_optimizer_state(self, trainer: pl.Trainer, pl_module: pl.LightningModule, path: Any) -> None:
        """Resuming under FSDP2: read the optimizer state the checkpoint holds for the blocks active now.

        Exactly what the uninterrupted run kept: a block active at the save and still active now continues its
        state; a block that goes frozen at this step would have lost it (not read); a block drawn now that was
        frozen at the save starts fresh (the checkpoint has none).
        """
        if not Path(path, ".metadata").is_file():
            raise NotImplementedError(
                f"LISA under ModelParallelStrategy resumes from distributed checkpoints (folders) only, got {path}: "
                "LISA reads the active blocks' optimizer state back through a distributed checkpoint's index; from a "
                "single file they would restart with fresh state and the resume would not continue the run exactly. "
                "Save with ModelParallelStrategy(save_distributed_checkpoint=True) (the default)."
            )
        fqn = {id(p): n for n, p in pl_module.named_parameters()}
        active = [p for i in self.active for p in self._blocks[i]]
        for index, optimizer in enumerate(trainer.optimizers):
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            wanted = {fqn[id(p)]: p for p in active if id(p) in held}
            distributed.load_optimizer_state(path, f"optimizer_{index}", optimizer, wanted)

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
        """The tensors training changed (always-on modules, blocks trained at least one step), by name.

        Under FSDP2 these are the sharded ``DTensor`` parameters; :meth:`save` gathers them.
        """
        trained = set(self._always_params)
        for i, names in enumerate(self._block_params):
            if self.counts[i] > 0:
                trained.update(names)
        return {name: p for name, p in root.named_parameters() if name in trained}

    @override
    def changed_names(self, root: nn.Module) -> set[str]:
        return set(self.changed_tensors(root))

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


def _is_model_parallel(strategy: object) -> bool:
    return type(strategy).__name__ == "ModelParallelStrategy"


def _check_data_parallel_only(strategy: object) -> None:
    """Refuse ``ModelParallelStrategy`` with tensor parallelism (``lightning_peft.shard`` shards data-parallel only)."""
    size = getattr(strategy, "_tensor_parallel_size", 1)
    if _is_model_parallel(strategy) and isinstance(size, int) and size > 1:
        raise NotImplementedError(
            f"LISA under ModelParallelStrategy runs data-parallel FSDP2 only, got tensor_parallel_size={size}: "
            "tensor parallelism splits every block across ranks along other dimensions than FSDP2's, and "
            "lightning_peft.shard refuses it. Use ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)."
        )


def _check_same_base_on_every_rank(base: dict[str, Any]) -> None:
    """FSDP2 shards each rank's own copy (no broadcast, unlike DDP): the ranks must start from the same weights."""
    if not distributed.is_distributed():
        return
    same = torch.tensor([float(distributed.broadcast_object(base["sha256"]) == base["sha256"])])
    if distributed.all_reduce(same, "min").item() < 1:
        raise ValueError(
            "LISA under ModelParallelStrategy: the ranks hold different base weights before sharding (their "
            "fingerprints differ). fully_shard keeps each rank's own slice of its own copy, so the sharded model "
            "would be a mix of them and the saved delta would not apply to any of them. Build or load the same "
            "weights on every rank (e.g. from_pretrained, or seed the initialisation)."
        )


def _check_sharded(names: dict[int, str], params: list[nn.Parameter]) -> None:
    """Under several FSDP2 ranks every parameter LISA trains must be managed by FSDP2 (a ``DTensor``)."""
    if not distributed.is_distributed():
        return
    plain = [names.get(id(p), "?") for p in params if not distributed.is_dtensor(p)]
    if plain:
        raise ValueError(
            f"LISA under ModelParallelStrategy: {len(plain)} parameter(s) it trains are not sharded by FSDP2 (first: "
            f"{plain[0]}); nothing would average their gradients across ranks, so the ranks would drift apart. "
            "Call lightning_peft.shard(self.model, self.device_mesh) in configure_model (it shards every block, then "
            "the root), as the lightning_peft.tasks modules do."
        )
