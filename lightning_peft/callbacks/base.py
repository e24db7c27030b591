"""What every method callback offers the rest of the library (the zoo publisher, the CLI, the pictures)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_peft.callbacks.backbone import resolve_backbone

__all__ = ["MethodCallback", "cli_recipe", "restorer"]

#: attribute of a backbone a method callback set up: ``{"settings": {"method": ..., ...}, "kept": {...}}``
SETUP_ATTR = "_lightning_peft_setup"


def restorer(root: nn.Module, unwrap: Callable[[], Any]) -> Callable[[], None]:
    """A function that puts ``root`` back as it is now: it calls ``unwrap`` and restores every ``requires_grad``.

    Take it *before* changing the module; ``unwrap`` undoes the structural change (e.g. removes the adapters).
    The flags are kept by parameter name, not by holding the parameters: FSDP2 replaces every parameter when it
    shards, and a reference here would keep each rank's whole unsharded weights alive until training starts.
    """
    flags = {name: p.requires_grad for name, p in root.named_parameters()}

    def restore() -> None:
        unwrap()
        for name, param in root.named_parameters():
            if name in flags:
                param.requires_grad_(flags[name])
        if SETUP_ATTR in root.__dict__:
            del root.__dict__[SETUP_ATTR]

    return restore


def log_picture(logger: Any, key: str, path: Path, step: int) -> bool:
    """Send a PNG to a logger that takes images: ``log_image`` (WandB, Neptune, MLflow-style loggers) or a
    TensorBoard ``SummaryWriter`` (``logger.experiment.add_image``). Returns whether it went anywhere."""
    if hasattr(logger, "log_image"):
        logger.log_image(key=key, images=[str(path)])
        return True
    experiment = getattr(logger, "experiment", None)
    if experiment is not None and hasattr(experiment, "add_image"):
        from torchvision.io import ImageReadMode, read_image

        experiment.add_image(key, read_image(str(path), mode=ImageReadMode.RGB), global_step=step, dataformats="CHW")
        return True
    return False


def cli_recipe(trainer: pl.Trainer) -> str | None:
    """The LightningCLI config of this run as YAML (the ``config.yaml`` of a zoo entry), or None outside the CLI."""
    from lightning.pytorch.cli import SaveConfigCallback

    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, SaveConfigCallback):
            return str(cb.parser.dump(cb.config, skip_none=False))
    return None


class MethodCallback(Callback):
    """Base of the method callbacks (``LoRA``, ``AdaLoRA``, ``LISA``, ``ID3``, ``SaRA``).

    A subclass sets ``method`` and ``backbone`` and implements :meth:`save`,
    :meth:`hyperparameters` and :meth:`base_fingerprint`. It inherits ``on_fit_end``: when
    ``save_dir`` is set the result is saved there (every rank gathers, rank 0 writes) with the
    method's pictures (also logged to TensorBoard and loggers with ``log_image``), the LightningCLI
    ``config.yaml`` when the run came from the CLI, and a zoo manifest: the folder is a zoo entry
    that ``lightning-peft zoo push`` publishes.

    A module is set up once per configuration: a callback that finds its method's layers from an
    earlier fit reuses them only when they were set up with identical settings
    (:meth:`reuse_setup`), and refuses otherwise. A fit that fails before its first backward (a
    refused configuration, in any hook) leaves the module as it found it (:meth:`on_exception`).
    """

    method = "method"
    backbone: str | None = None
    save_dir: str | None = None
    saved_to: Path | None = None
    #: the base fingerprint ``on_fit_end`` computed for the saved result (None without ``save_dir``), for the zoo
    fit_fingerprint: dict[str, Any] | None = None
    _undo: Callable[[], None] | None = None  # puts the module back as this fit found it, until training starts

    # ----------------------------------------------------------------------------------------- one setup per module
    def reuse_setup(self, root: nn.Module, settings: dict[str, Any], present: bool, what: str) -> dict[str, Any] | None:
        """Whether ``root`` already carries what this callback would set up (reuse it), or nothing yet.

        A module keeps what a method callback set up on it after the fit (a second ``fit``, ``validate`` or
        ``test`` of the same module uses it). Reusing it is right only if it was set up with exactly these
        settings: the adapters of a fit with another rank or other targets would otherwise train (and be
        saved under this callback's configuration, which does not describe them).

        Args:
            root: the backbone.
            settings: everything that decides what is set up (method, resolved targets, ranks, budgets).
            present: whether ``root`` holds this method's layers now.
            what: the layers in words, for the message (``"LoRA layers"``).

        Returns:
            None when nothing is set up yet; else what :meth:`record_setup` kept (reuse what is there).

        Raises:
            ValueError: ``root`` holds layers set up with other settings, or layers no callback set up.
        """
        marker = root.__dict__.get(SETUP_ATTR)
        if not present and marker is None:
            return None
        name = type(self).__name__
        fix = (
            "build a fresh module, or take the earlier layers out first "
            "(lightning_peft.adapters.remove_adapters / remove_sparse)"
        )
        if marker is None or not present:
            raise ValueError(
                f"{name}: {type(root).__name__} already holds {what} that no lightning-peft callback set up "
                f"(injected by hand or by another tool); {fix}"
            )
        mine, recorded = {"method": self.method, **settings}, marker["settings"]
        if recorded != mine:
            differs = sorted(k for k in set(recorded) | set(mine) if recorded.get(k) != mine.get(k))
            detail = "; ".join(f"{k}: earlier {recorded.get(k)!r}, now {mine.get(k)!r}" for k in differs)
            raise ValueError(
                f"{name}: {type(root).__name__} already holds {what} that an earlier fit set up with other settings "
                f"({detail}). Training them would train the earlier adapters under this configuration. Fit again with "
                f"the same settings to keep training them, or {fix}"
            )
        rank_zero_info(f"{name}: reusing the {what} an earlier fit set up on {type(root).__name__}")
        return marker["kept"]

    def record_setup(
        self, root: nn.Module, settings: dict[str, Any], undo: Callable[[], None], kept: dict[str, Any] | None = None
    ) -> None:
        """Mark ``root`` as set up with ``settings``; ``undo`` (see :func:`restorer`) runs if the fit fails first.

        ``kept``: what a later callback reusing the setup needs and cannot recompute (e.g. the base fingerprint).
        """
        root.__dict__[SETUP_ATTR] = {"settings": {"method": self.method, **settings}, "kept": dict(kept or {})}
        self._undo = undo

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._undo = None  # training has started: a later failure keeps what was learned

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        undo, self._undo = self._undo, None
        if undo is not None:
            undo()
            rank_zero_info(
                f"{type(self).__name__}: the fit stopped before training ({type(exception).__name__}); "
                "the module is restored as it was before the fit"
            )

    def save(self, root: nn.Module, path: str | Path) -> Path | None:
        """Gather the result on every rank and write it from rank 0 (a collective). Returns the folder on rank 0."""
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, Any]:
        """The method's settings, JSON-able, for the zoo manifest and the model card."""
        raise NotImplementedError

    def base_fingerprint(self, root: nn.Module) -> dict[str, Any]:
        """The fingerprint of the base weights the result applies to (a collective under sharding)."""
        raise NotImplementedError

    def schedule(self) -> dict[str, Any]:
        """What the method decided during training, for the zoo manifest (e.g. LISA's layer counts)."""
        return {}

    def changed_names(self, root: nn.Module) -> set[str]:
        """Names (in ``root.named_parameters()``) of parameters frozen now that training has changed so far.

        An adapter-only checkpoint (:class:`~lightning_peft.callbacks.AdapterCheckpoints`) keeps them with what
        trains now. None for the adapter methods (the base never changes) and the sparse ones (their merged
        entries are rebuilt from their bookkeeping buffers).
        """
        return set()

    def write_pictures(self, folder: Path) -> list[Path]:
        """Write the method's pictures of what it decided into ``folder`` (rank 0). Returns their paths."""
        return []

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._undo = None
        self.fit_fingerprint = None
        if self.save_dir is None:
            return
        root, _, _ = resolve_backbone(pl_module, self.backbone)
        self.saved_to = self.save(root, self.save_dir)
        base = self.fit_fingerprint = self.base_fingerprint(root)  # every rank (a collective under sharding)
        if self.saved_to is None:  # not rank 0
            return
        for picture in self.write_pictures(self.saved_to):
            for logger in trainer.loggers:
                log_picture(logger, f"{self.method}/{picture.stem}", picture, trainer.global_step)
        # the folder is a zoo entry too: `lightning-peft zoo push <save_dir> NAME` publishes it as it is
        from lightning_peft.distributed import unwrapped_class
        from lightning_peft.zoo.entry import write_manifest

        recipe = cli_recipe(trainer)
        if recipe:
            (self.saved_to / "config.yaml").write_text(recipe)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        write_manifest(
            self.saved_to,
            method=self.method,
            hyperparameters=self.hyperparameters(),
            base_fingerprint=base,
            base_class=unwrapped_class(root).__name__,
            metrics=metrics,
            schedule=self.schedule(),
        )
        rank_zero_info(f"{type(self).__name__}: result saved to {self.saved_to.resolve()}")
