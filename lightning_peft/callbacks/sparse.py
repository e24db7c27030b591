"""What the sparse methods (ID³, SaRA) share: targets, the sparse delta bank, saving, density pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_peft import distributed
from lightning_peft.adapters.delta import delta_config, write_delta
from lightning_peft.adapters.quantized import quantization_of
from lightning_peft.adapters.sparse import (
    GradHook,
    SparseDeltaBank,
    SparseDeltaLayer,
    inject_sparse,
    remove_sparse,
    sparse_bank,
    sparse_layers,
    sparse_state_dict,
)
from lightning_peft.adapters.targeting import match_targets
from lightning_peft.backbones import Preset
from lightning_peft.callbacks.backbone import resolve_backbone
from lightning_peft.callbacks.base import MethodCallback, restorer
from lightning_peft.strategies import check_dynamic_strategy
from lightning_peft.zoo.entry import fingerprint

__all__ = ["SparseMethod"]

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


class SparseMethod(MethodCallback):
    """Base of the callbacks that train a sparse delta of the base weights (:mod:`lightning_peft.adapters.sparse`).

    ``setup`` (before the optimizer and the strategy's wrapper exist) resolves the target tensors,
    fingerprints the base weights (the training changes them in place), asks the subclass for the
    bank's capacity, injects the sparse layers and freezes the backbone except the bank's one
    parameter and ``modules_to_save``. Because the bank never changes identity or size, the optimizer,
    built once, stays valid however the selection changes. A module set up by an earlier fit with the same
    settings is reused (other settings are refused); a fit that fails before training takes the sparse layers
    out and restores the weights. Several processes: ``strategy="ddp_selective"``, or FSDP2
    (``ModelParallelStrategy(tensor_parallel_size=1)``, the model sharded by :func:`lightning_peft.shard` in
    ``configure_model``): the bank is kept whole on every rank and its gradient averaged in
    ``on_before_optimizer_step``; each rank writes the learned values into the entries of its own shards.
    ``on_fit_end`` draws the density per layer and saves the deltas (sparse format: indices + values;
    ``modules_to_save`` in full) with the base fingerprint.
    """

    def _init_sparse(
        self,
        target_modules: str | list[str] | None,
        exclude_modules: str | list[str] | None,
        parameters: tuple[str, ...] | list[str],
        include_norms: bool,
        modules_to_save: list[str] | None,
        backbone: str | None,
        save_dir: str | None,
    ) -> None:
        if not parameters or any(p not in ("weight", "bias") for p in parameters):
            raise ValueError(f"parameters must be a non-empty subset of ('weight', 'bias'), got {parameters!r}")
        self.target_modules, self.exclude_modules = target_modules, exclude_modules
        self.parameters, self.include_norms = tuple(parameters), include_norms
        self.modules_to_save = list(modules_to_save or [])
        self.backbone, self.save_dir = backbone, save_dir
        self.targets: dict[str, tuple[str, ...]] = {}
        self.sizes: dict[str, int] = {}  # entries of each target module's selected tensors
        self.total_params = 0
        self.density_per_layer: dict[str, float] = {}
        self._base: dict[str, Any] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(backbone=self.backbone, target_modules=self.target_modules)

    # ----------------------------------------------------------------------------------------- budgets, hooks
    @staticmethod
    def check_budget(budget: float, who: str) -> None:
        """Refuse, at construction, a budget that is neither a count ``>= 1`` (int) nor a fraction in ``(0, 1)``."""
        if isinstance(budget, bool) or not isinstance(budget, int | float) or not budget > 0:
            raise ValueError(f"{who} budget must be a count >= 1 or a fraction in (0, 1), got {budget!r}")
        if isinstance(budget, float) and not budget < 1:
            raise ValueError(f"{who} budget as a fraction must be in (0, 1), got {budget!r}; pass an int for a count")

    def budget_entries(self, budget: float) -> int:
        """The budget as a count of the targeted entries (a fraction rounds, at least 1); refuses more than exist."""
        total = self.total_params
        count = budget if isinstance(budget, int) else max(1, int(round(budget * total)))
        if count > total:
            raise ValueError(
                f"{type(self).__name__} budget {count:,} exceeds the {total:,} entries of the targeted tensors; lower "
                "it or target more"
            )
        return int(count)

    _armed = False  # whether the layers' grad hooks are set (arm_grad_hooks)

    def arm_grad_hooks(self, pl_module: pl.LightningModule, hook: GradHook | None) -> None:
        """Set (or, with None, clear) every sparse layer's ``grad_hook``; uses whose backward never came count first."""
        for _, layer in self.layers(pl_module):
            layer.flush_grad_hook()  # a use without a backward (its output not in the loss) is delivered now
            layer.grad_hook = hook
        self._armed = hook is not None

    # ----------------------------------------------------------------------------------------- subclass hooks
    def capacity(self, root: nn.Module, targets: dict[str, tuple[str, ...]]) -> int:
        """How many entries the bank must hold (the most trained at once)."""
        raise NotImplementedError

    def after_inject(self, trainer: pl.Trainer, root: nn.Module) -> None:
        """Called at the end of ``setup`` (e.g. to make the initial selection)."""

    # ----------------------------------------------------------------------------------------- setup
    def resolve_targets(self, root: nn.Module, preset: Preset | None) -> dict[str, tuple[str, ...]]:
        """``{module name: parameter names}`` of the tensors that may take a delta."""
        targets = self.target_modules
        if targets is None:
            if preset is None:
                raise ValueError(
                    f"{type(self).__name__}: no preset knows {type(root).__name__}, so target_modules must be given "
                    "(a regex, a list of module names/suffixes, or 'all-linear')"
                )
            targets = list(preset.target_modules)
        match = match_targets(root, targets, self.exclude_modules)
        out: dict[str, tuple[str, ...]] = {}
        for name in match.matched:
            module = root.get_submodule(name)
            quantized = quantization_of(module)
            if quantized is not None:
                raise ValueError(
                    f"{type(self).__name__}: {name} is quantized ({quantized}); {type(self).__name__} trains entries "
                    "of the base weights themselves, which a quantized tensor cannot hold. Fine-tune a quantized base "
                    "with LoRA or AdaLoRA (QLoRA-style), or load the base unquantized, or exclude the layer"
                )
            names = tuple(p for p in self.parameters if getattr(module, p, None) is not None)
            if names:
                out[name] = names
        if self.include_norms:
            for name, module in root.named_modules():
                if isinstance(module, _NORMS) and name not in out:
                    names = tuple(p for p in ("weight", "bias") if getattr(module, p, None) is not None)
                    if names:
                        out[name] = names
        return out

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        root, _, preset = resolve_backbone(pl_module, self.backbone)
        settings = self.settings()
        kept = self.reuse_setup(root, settings, sparse_bank(root) is not None, "sparse delta layers")
        if kept is not None:  # a second fit of the same module, set up the same way
            self.targets = {name: tuple(layer.param_names) for name, layer in sparse_layers(root)}
            self.sizes, self.total_params, self._base = dict(kept["sizes"]), int(kept["total"]), kept["base"]
            self.reuse(root, kept)
            return
        check_dynamic_strategy(trainer.strategy, type(self).__name__, sharded_ok=True)
        targets = self.resolve_targets(root, preset)
        for name in self.modules_to_save:
            try:
                root.get_submodule(name)
            except AttributeError as err:
                raise ValueError(f"modules_to_save entry {name!r} is not a module of {type(root).__name__}") from err
        self.sizes = {n: sum(getattr(root.get_submodule(n), p).numel() for p in ps) for n, ps in targets.items()}
        self.total_params = sum(self.sizes.values())
        capacity = self.capacity(root, targets)
        self._base = fingerprint(root, exclude=self.modules_to_save)  # before any weight changes
        undo = restorer(root, lambda: remove_sparse(root, merge=False))
        root.requires_grad_(False)
        bank = inject_sparse(root, targets, capacity)
        bank.values.requires_grad_(True)
        for name in self.modules_to_save:
            root.get_submodule(name).requires_grad_(True)
        self.targets = targets
        kept = {"sizes": dict(self.sizes), "total": self.total_params, "base": self._base, **self.kept()}
        self.record_setup(root, settings, undo, kept)
        rank_zero_info(
            f"{type(self).__name__}: {len(targets)} layers, {self.total_params:,} candidate entries; "
            f"bank of {capacity:,} trainable values ({100 * capacity / max(self.total_params, 1):.3f}% of them)"
        )
        self.after_inject(trainer, root)

    #: keys of :meth:`hyperparameters` that a fit works out (not settings the user gives)
    resolved: tuple[str, ...] = ()

    def settings(self) -> dict[str, Any]:
        """What decides the sparse layers this callback sets up, to tell a reusable setup apart."""
        given = {k: v for k, v in self.hyperparameters().items() if k not in self.resolved}
        return {"backbone": self.backbone, **given}

    def kept(self) -> dict[str, Any]:
        """What a later callback reusing this setup needs from this one (beyond targets, sizes, base)."""
        return {}

    def reuse(self, root: nn.Module, kept: dict[str, Any]) -> None:
        """Take over the setup an earlier fit made (``kept`` is what :meth:`kept` returned then)."""

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After configure_model (FSDP2 sharding) and before any forward or checkpoint restore.
        sharded = [layer.track_shards() for _, layer in self.layers(pl_module)]
        if distributed.is_distributed() and any(sharded):
            bank = self.bank_of(pl_module)
            if distributed.is_dtensor(bank.values) or not any(
                p is bank.values for p in distributed.replicated_params(pl_module)
            ):
                raise NotImplementedError(
                    f"{type(self).__name__} under FSDP2 needs its bank of trained values kept whole on every rank: "
                    "shard the model with lightning_peft.shard(module, self.device_mesh) in configure_model (it keeps "
                    "the parameters marked replicated out of fully_shard and the callback averages their gradients)"
                )
        elif distributed.is_distributed() and type(trainer.strategy).__name__ == "ModelParallelStrategy":
            raise NotImplementedError(
                f"{type(self).__name__} under ModelParallelStrategy found no sharded weight: nothing would average "
                "the trained values' gradients across ranks. Shard the model with lightning_peft.shard(module, "
                "self.device_mesh) in configure_model, or use strategy='ddp_selective'"
            )

    @staticmethod
    def reduce_bank_grad(pl_module: nn.Module) -> None:
        """Under FSDP2 average the bank's gradient across ranks (FSDP2 leaves it alone); elsewhere nothing.

        Called first in ``on_before_optimizer_step``, before anything reads or adds to that gradient.
        """
        distributed.reduce_replicated_grads(pl_module)

    # ----------------------------------------------------------------------------------------- helpers
    @staticmethod
    def bank_of(pl_module: nn.Module) -> SparseDeltaBank:
        bank = sparse_bank(pl_module)
        if bank is None:
            raise RuntimeError("no sparse deltas in the model: setup has not run")
        return bank

    @staticmethod
    def bank_grad(bank: SparseDeltaBank) -> torch.Tensor:
        """The bank's gradient, zeros if no value has one yet this step, for adding entries' gradients to."""
        if bank.values.grad is None:
            bank.values.grad = torch.zeros_like(bank.values)
        return bank.values.grad

    def layers(self, pl_module: pl.LightningModule) -> list[tuple[str, SparseDeltaLayer]]:
        """The sparse layers, with names relative to the backbone."""
        root, _, _ = resolve_backbone(pl_module, self.backbone)
        return list(sparse_layers(root))

    def log_density(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, per_layer: bool, extra: dict[str, float] | None = None
    ) -> float:
        """Log the overall density (and each layer's, and ``extra``); returns the overall one.

        Without ``per_layer`` the figures reach the loggers at the trainer's interval only (``log_every_n_steps``,
        counted in optimizer steps, as ``self.log`` does); with it (``log_every``, the end of fit) always.
        """
        layers = self.layers(pl_module)
        active = sum(layer.active_count() for _, layer in layers)
        density = active / max(self.total_params, 1)
        every = int(getattr(trainer, "log_every_n_steps", 1) or 1)
        if not per_layer and (trainer.global_step + 1) % every != 0:
            return density
        metrics = {f"{self.method}/density": density, f"{self.method}/active": float(active), **(extra or {})}
        if per_layer:
            self.density_per_layer = {name: layer.density() for name, layer in layers}
            metrics.update({f"{self.method}/density/{n}": d for n, d in self.density_per_layer.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        return density

    # ----------------------------------------------------------------------------------------- results
    def method_hyperparameters(self) -> dict[str, Any]:
        """The method's own settings (and what a fit resolved of them); :meth:`hyperparameters` adds the targets."""
        raise NotImplementedError

    @override
    def hyperparameters(self) -> dict[str, Any]:
        return {
            **self.method_hyperparameters(),
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "parameters": list(self.parameters),
            "include_norms": self.include_norms,
            "modules_to_save": self.modules_to_save,
        }

    def method_schedule(self) -> dict[str, Any]:
        """What the method decided beyond the density per layer; :meth:`schedule` adds that density."""
        return {}

    @override
    def schedule(self) -> dict[str, Any]:
        return {"density_per_layer": dict(self.density_per_layer), **self.method_schedule()}

    @override
    def base_fingerprint(self, root: nn.Module) -> dict[str, Any]:
        if self._base is None:
            raise RuntimeError(f"{type(self).__name__} has not set up a model yet: fit first")
        return self._base

    def result_tensors(self, root: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
        """The sparse deltas and the ``modules_to_save`` tensors (full values), and the names of the latter."""
        tensors = dict(sparse_state_dict(root))
        dense = []
        for module in self.modules_to_save:
            for pname, param in root.get_submodule(module).named_parameters():
                key = f"{module}.{pname}"
                tensors[key] = distributed.full_tensor(param.detach())
                dense.append(key)
        return tensors, dense

    @override
    def save(self, root: nn.Module, path: str | Path) -> Path | None:
        tensors, dense = self.result_tensors(root)
        names = sorted({k.rsplit(".", 1)[0] for k in tensors if k not in dense} | set(dense))
        config = delta_config(self.method, "sparse", names, self.hyperparameters())
        config["dense_tensors"] = dense
        config["modules_to_save"] = list(self.modules_to_save)  # the zoo leaves them out of the base fingerprint check
        return distributed.rank_zero_only(write_delta)(path, tensors, config)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for _, layer in self.layers(pl_module):
            layer.sync()  # the weights show the last step's values (forwards sync lazily; none may follow)
        self.log_density(trainer, pl_module, per_layer=True)
        super().on_fit_end(trainer, pl_module)

    @override
    def write_pictures(self, folder: Path) -> list[Path]:
        if not self.density_per_layer:
            return []
        from lightning_peft.callbacks.plots import plot_density

        names = list(self.density_per_layer)
        overall = 100 * sum(self.density_per_layer[n] * self.sizes[n] for n in names) / max(self.total_params, 1)
        title = f"{type(self).__name__}: share of each layer trained (overall {overall:.2f} %)"
        return [plot_density(self.density_per_layer, title, folder / f"{self.method}_density.png")]
