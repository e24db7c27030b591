"""What LISA and HFT share: a scheduled selection of *units* (lists of parameter names) that train, the rest frozen.

A unit is what a schedule switches on and off as one: a whole block for LISA, a parameter group inside a block for
HFT. :class:`ScheduledSelection` does everything that does not depend on how units are drawn: it binds the units'
parameters by name (FSDP2 replaces the parameter objects after ``setup``), freezes and unfreezes them between optimizer
steps, frees the gradient and the optimizer state of a unit that goes frozen, checks the strategy (``ddp_selective``
or data-parallel FSDP2) and reads back, on an FSDP2 resume, the optimizer state of the units active at the resumed
step, counts the steps each unit trained, keeps the history of the draws, saves the tensors that trained as a dense
delta with the base fingerprint taken before training, and puts the callback's state through ``state_dict``.

It is one class (about 430 lines): its hooks share the binding of units to parameters, the freeze flags and the
counts, and the parts that stand alone (the FSDP2 preconditions, the tree walk for always-on modules) live in
:mod:`lightning_peft.strategies` and :mod:`lightning_peft.backbones.blocks`.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_peft import distributed
from lightning_peft.adapters.delta import delta_config, write_delta
from lightning_peft.backbones import Blocks, Preset, find_blocks, resolve_always_on
from lightning_peft.backbones.blocks import outside_params
from lightning_peft.callbacks.backbone import resolve_backbone
from lightning_peft.callbacks.base import MethodCallback, restorer
from lightning_peft.strategies import (
    check_data_parallel_only,
    check_same_base_on_every_rank,
    check_sharded,
    is_model_parallel,
)
from lightning_peft.zoo.entry import fingerprint

__all__ = ["Schedule", "ScheduledSelection"]


class Schedule(Protocol):
    """The pure-torch core a :class:`ScheduledSelection` drives (LISA's ``LayerSampler``, HFT's ``HalfSelector``)."""

    def interval_index(self, step: int) -> int:
        """The round an optimizer step (0-based) belongs to."""
        ...

    def round_start(self, step: int) -> int:
        """The first optimizer step of the round ``step`` belongs to."""
        ...

    def active(self, step: int) -> list[int]:
        """Sorted indices of the units that train at optimizer step ``step``."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ScheduledSelection(MethodCallback):
    """Base of the callbacks that train a scheduled selection of units of the backbone's repeated blocks.

    A subclass says what its units are (:meth:`_find_units`: names and parameter names, covering the blocks'
    parameters), builds its schedule core (:meth:`_make_core`), checks the strategy (:meth:`_check_strategy`), and
    gives its hyperparameters, schedule summary and pictures. Everything else happens here:

    Hooks: ``setup`` finds the blocks and the units, freezes the backbone except the units and the *always-on*
    modules (the preset's embeddings, final norm and head; on a model no preset knows every backbone parameter outside
    the blocks; ``always_on`` narrows that) and fingerprints the base weights; the optimizer is then built from every
    unit. ``on_train_start`` checks the optimizer holds every unit and applies the first draw;
    ``on_train_batch_start`` switches at round boundaries of optimizer steps (never inside a gradient-accumulation
    window). A unit that goes frozen loses its gradients *and its optimizer state*; drawn again later it starts with
    fresh optimizer state. ``on_before_optimizer_step`` counts the steps each unit trained.

    Multi-process: plain DDP is refused before training (the subclass's message asks for ``ddp_selective``);
    FSDP2 (``ModelParallelStrategy``, data parallel only, the model sharded by :func:`lightning_peft.shard`) flips
    ``requires_grad`` on the sharded ``DTensor`` parameters between steps, which FSDP2 copies to the unsharded ones at
    every all-gather, so it reduce-scatters exactly the active units and the always-on modules. Resuming from a
    distributed checkpoint: ``on_fit_start`` freezes every unit while the strategy loads the optimizer, and
    ``on_train_start`` reads back the optimizer state of the units active at the resumed step. Refused: tensor
    parallelism, trained parameters FSDP2 does not manage, ranks holding different base weights, and an FSDP2 resume
    from a single-file checkpoint.

    A fit that fails before its first backward gives the backbone back its ``requires_grad`` flags
    (``on_exception``). A second fit with the same callback continues only on the same backbone, units and
    configuration; otherwise the callback sets up afresh.
    """

    #: the key of the core's state in :meth:`state_dict` (LISA's checkpoints say ``"sampler"``)
    core_key = "core"
    #: what the units are, in messages
    unit_word = "units"

    def __init__(
        self,
        seed: int = 0,
        block_path: str | None = None,
        always_on: list[str] | None = None,
        backbone: str | None = None,
        save_dir: str | None = None,
    ) -> None:
        self.seed, self.block_path, self.always_on, self.backbone, self.save_dir = (
            seed,
            block_path,
            always_on,
            backbone,
            save_dir,
        )
        self.core: Any = None
        self.unit_names: list[str] = []
        self.always_on_names: list[str] = []
        self.counts: list[int] = []  # optimizer steps each unit trained
        self.history: list[tuple[int, list[int]]] = []  # (first step, active units) of every round
        self.active: list[int] = []
        # parameter names (relative to the backbone) of every unit and of the always-on modules: FSDP2's
        # fully_shard (in configure_model, after setup) replaces the parameter objects, so they are bound by name
        self._unit_params: list[list[str]] = []
        self._always_params: list[str] = []
        self._units: list[list[nn.Parameter]] = []  # the objects bound to those names now (see _bind)
        self._always: list[nn.Parameter] = []
        self._names: dict[int, str] = {}  # id(param) -> name relative to the backbone
        self._interval_index = -1
        self._base: dict[str, Any] | None = None
        self._pending: dict[str, Any] | None = None
        self._root: weakref.ref[nn.Module] | None = None  # the backbone the units belong to
        self._setup_configuration: dict[str, Any] | None = None
        self._fresh = False  # this fit set the callback up (rather than continuing an earlier fit's setup)

    # ------------------------------------------------------------------------------------------ what a subclass gives
    def _check_strategy(self, strategy: object) -> None:
        """Refuse a strategy before training (``check_dynamic_strategy(strategy, NAME, True, sharded_ok=True)``)."""
        raise NotImplementedError

    def _find_units(self, root: nn.Module, blocks: Blocks, preset: Preset | None) -> tuple[list[str], list[list[str]]]:
        """The units' names and their parameter names (relative to ``root``), covering every block parameter."""
        raise NotImplementedError

    def _make_core(self) -> Schedule:
        """The schedule core for the units :meth:`_find_units` found last (raises ValueError on bad arguments)."""
        raise NotImplementedError

    def _describe(self, blocks: Blocks, always: str) -> str:
        """One line for the log: what trains when."""
        return f"{len(self.unit_names)} {self.unit_word} in {len(blocks)} blocks of {blocks.path}; always on: {always}"

    # ---------------------------------------------------------------------------------------------------------- setup
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(backbone=self.backbone, block_path=self.block_path)

    def _configuration(self) -> dict[str, Any]:
        return {**self.hyperparameters(), "always_on": self.always_on, "backbone": self.backbone}

    @property
    def _who(self) -> str:
        return type(self).__name__

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_strategy(trainer.strategy)
        check_data_parallel_only(trainer.strategy, self._who)
        root, _, preset = resolve_backbone(pl_module, self.backbone)
        blocks = find_blocks(root, self.block_path)
        unit_names, unit_params = self._find_units(root, blocks, preset)
        if self.core is not None:
            if self._same_setup(root, unit_params):
                self._fresh = False
                self._bind(root)
                self._freeze(root)
                rank_zero_info(f"{self._who}: continuing on the module this callback set up in an earlier fit")
                return
            rank_zero_info(
                f"{self._who}: this callback set up another module or configuration in an earlier fit; setting up "
                "afresh (the earlier fit's step counts, history and base fingerprint are dropped)"
            )
            self._forget()
        self.unit_names, self._unit_params = unit_names, unit_params
        try:
            self.core = self._make_core()
            found, what = self._always_on(root, preset, unit_params)
        except ValueError:
            self._forget()
            raise
        self.always_on_names = found
        self._bind(root)
        self._base = fingerprint(root)  # before any unit changes: the base the delta applies to
        if is_model_parallel(trainer.strategy):
            check_same_base_on_every_rank(self._base, self._who)
        self._root = weakref.ref(root)
        self._setup_configuration = self._configuration()
        self._fresh = True
        self.counts = [0] * len(unit_params)
        self._freeze(root)
        rank_zero_info(f"{self._who}: {self._describe(blocks, what)}")

    def _always_on(self, root: nn.Module, preset: Preset | None, units: list[list[str]]) -> tuple[list[str], str]:
        """The always-on names (and in words); sets ``_always_params`` to their parameters outside the units."""
        modules, params = dict(root.named_modules()), dict(root.named_parameters())
        unit_ids = {id(params[n]) for names in units for n in names}
        if self.always_on is not None:
            found = resolve_always_on(root, self.always_on)
            missing = [n for n in self.always_on if n not in found]
            if missing:
                top = ", ".join(n for n, _ in root.named_children()) or "none"
                raise ValueError(
                    f"{self._who} always_on names {missing} match no module or parameter of {type(root).__name__} "
                    f"(its top-level modules: {top}); use dotted names relative to the backbone"
                )
            what = ", ".join(found)
        elif preset is not None:
            found = resolve_always_on(root, (*preset.always_on, *preset.head))
            what = ", ".join(found) or "nothing"
        else:  # no preset: every parameter outside the blocks trains, as in LMFlow and axolotl
            found = outside_params(root, unit_ids)
            what = f"every parameter outside the blocks ({', '.join(found) or 'none'})"
        names = {id(p): n for n, p in params.items()}
        self._always_params = []
        for name in found:
            chosen = list(modules[name].parameters()) if name in modules else [params[name]]
            self._always_params += [names[id(p)] for p in chosen if id(p) not in unit_ids]
        return found, what

    def _bind(self, root: nn.Module) -> None:
        """Bind the unit and always-on parameter names to ``root``'s parameter objects as they are now.

        Called in ``setup`` and again in ``on_train_start``: under FSDP2 ``configure_model`` (between the two)
        replaces every parameter by its sharded ``DTensor`` parameter, which the optimizer holds.
        """
        params = dict(root.named_parameters())
        self._units = [[params[n] for n in names] for names in self._unit_params]
        self._always = [params[n] for n in self._always_params]
        self._names = {id(p): n for n, p in params.items()}

    def _same_setup(self, root: nn.Module, unit_params: list[list[str]]) -> bool:
        """Whether this fit finds the module, units and configuration the earlier setup was made for."""
        return (
            self._root is not None
            and self._root() is root
            and unit_params == self._unit_params
            and self._setup_configuration == self._configuration()
        )

    def _freeze(self, root: nn.Module) -> None:
        """Freeze the backbone but the always-on parameters and the units; a fit that fails before training undoes it
        (flags restored; a setup made in this fit is forgotten), through :meth:`MethodCallback.on_exception`."""
        self._undo = restorer(root, self._forget if self._fresh else lambda: None)
        root.requires_grad_(False)
        for p in self._always:
            p.requires_grad_(True)
        for params in self._units:  # trainable when the optimizer is built, frozen in on_train_start
            for p in params:
                p.requires_grad_(True)

    def _forget(self) -> None:
        """Back to the state of a callback that never set anything up."""
        self.core = None
        self.unit_names, self.always_on_names, self.counts, self.history, self.active = [], [], [], [], []
        self._unit_params, self._always_params, self._units, self._always, self._names = [], [], [], [], {}
        self._interval_index, self._base, self._root, self._setup_configuration = -1, None, None, None

    # ----------------------------------------------------------------------------------------------------- training
    def _bound_root(self) -> nn.Module:
        root = self._root() if self._root is not None else None
        assert root is not None
        self._bind(root)
        return root

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Under ``ModelParallelStrategy``: every unit frozen while the strategy may load a checkpoint.

        The strategy loads a distributed checkpoint's optimizer state right after this hook, into a template that
        gives every parameter that requires grad a state, and fails on any state the checkpoint lacks (it holds
        none for the units frozen when it was saved). With only the always-on modules trainable that load is
        exact for them; ``on_train_start`` then reads the active units' own state.
        """
        if self.core is None or not is_model_parallel(trainer.strategy):
            return
        self._bound_root()
        for params in self._units:
            for p in params:
                p.requires_grad_(False)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.core is None:
            return
        self._bound_root()  # the parameters the optimizer holds (FSDP2's sharded ones, if configure_model sharded)
        for p in self._always:
            p.requires_grad_(True)
        if is_model_parallel(trainer.strategy):
            check_sharded(self._names, [p for params in self._units for p in params] + self._always, self._who)
        in_optimizer = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        missing = [p for params in self._units for p in params if id(p) not in in_optimizer]
        missing += [p for p in self._always if id(p) not in in_optimizer]
        if missing:
            raise ValueError(
                f"{self._who}: the optimizer lacks {len(missing)} parameter(s) of the {self.unit_word}/always-on "
                f"modules (first: {self._names.get(id(missing[0]), '?')}). Build it in configure_optimizers from "
                f"every parameter that requires grad at that point ({self._who} freezes {self.unit_word} only after "
                "the optimizer exists)."
            )
        if self._pending is not None:
            self._apply_state(self._pending)
            self._pending = None
        self._interval_index = -1
        self._switch(trainer, trainer.global_step)
        if trainer.ckpt_path is not None and is_model_parallel(trainer.strategy):
            self._load_active_optimizer_state(trainer, pl_module, trainer.ckpt_path)

    def _load_active_optimizer_state(self, trainer: pl.Trainer, pl_module: pl.LightningModule, path: Any) -> None:
        """Resuming under FSDP2: read the optimizer state the checkpoint holds for the units active now.

        Exactly what the uninterrupted run kept: a unit active at the save and still active now continues its
        state; a unit that goes frozen at this step would have lost it (not read); a unit drawn now that was
        frozen at the save starts fresh (the checkpoint has none).
        """
        if not Path(path, ".metadata").is_file():
            raise NotImplementedError(
                f"{self._who} under ModelParallelStrategy resumes from distributed checkpoints (folders) only, got "
                f"{path}: {self._who} reads the active {self.unit_word}' optimizer state back through a distributed "
                "checkpoint's index; from a single file they would restart with fresh state and the resume would not "
                "continue the run exactly. Save with ModelParallelStrategy(save_distributed_checkpoint=True) "
                "(the default)."
            )
        fqn = {id(p): n for n, p in pl_module.named_parameters()}
        active = [p for i in self.active for p in self._units[i]]
        for index, optimizer in enumerate(trainer.optimizers):
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            wanted = {fqn[id(p)]: p for p in active if id(p) in held}
            distributed.load_optimizer_state(path, f"optimizer_{index}", optimizer, wanted)

    def _switch(self, trainer: pl.Trainer, step: int) -> None:
        index = self.core.interval_index(step)
        if index == self._interval_index:
            return
        self._interval_index = index
        active = self.core.active(step)
        chosen = set(active)
        for i, params in enumerate(self._units):
            on = i in chosen
            for p in params:
                if not on:
                    p.grad = None
                    for opt in trainer.optimizers:
                        opt.state.pop(p, None)  # exp_avg / exp_avg_sq go with the gradient
                p.requires_grad_(on)
        self.active = active
        first = self.core.round_start(step)
        if not self.history or self.history[-1][0] != first:  # a resumed run already has its round
            self.history.append((first, active))
        metrics = {f"{self.method}/active/{i}": float(i in chosen) for i in range(len(self._units))}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.core is not None:
            self._switch(trainer, trainer.global_step)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        for i in self.active:
            self.counts[i] += 1

    # ------------------------------------------------------------------------------------------------------- result
    @override
    def base_fingerprint(self, root: nn.Module) -> dict[str, Any]:
        if self._base is None:
            raise RuntimeError(f"{self._who} has not set up a model yet: fit first")
        return self._base

    def changed_tensors(self, root: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors training changed (always-on modules, units trained at least one step), by name.

        Under FSDP2 these are the sharded ``DTensor`` parameters; :meth:`save` gathers them.
        """
        trained = set(self._always_params)
        for i, names in enumerate(self._unit_params):
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

    # -------------------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            self.core_key: self.core.state_dict() if self.core is not None else None,
            "counts": list(self.counts),
            "history": [[s, list(a)] for s, a in self.history],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.core is not None:
            self._apply_state(state_dict)
        else:
            self._pending = state_dict  # applied once setup has found the units

    def _apply_state(self, state: dict[str, Any]) -> None:
        if state.get(self.core_key) is not None:
            self.core.load_state_dict(state[self.core_key])
        counts = list(state.get("counts") or [])
        if counts and len(counts) != len(self._units):
            raise ValueError(
                f"the checkpoint's {self._who} state has {len(counts)} {self.unit_word} but this model has "
                f"{len(self._units)}"
            )
        self.counts = counts or self.counts
        self.history = [(int(s), [int(i) for i in a]) for s, a in state.get("history") or []]
