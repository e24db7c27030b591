"""The ``ZooPublisher`` callback: publish the trained adapter to a zoo at the end of fit, never losing it."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_peft import distributed
from lightning_peft.callbacks.backbone import resolve_backbone
from lightning_peft.callbacks.base import MethodCallback, cli_recipe
from lightning_peft.callbacks.lora import LoRA
from lightning_peft.fileio import check_writable, storage_error
from lightning_peft.zoo import HubError, HubZoo, LocalZoo, PublishError, build_entry, validate_name, validate_repo_id

__all__ = ["ZooPublisher"]


class ZooPublisher(Callback):
    """Publish the result of the method callback placed before it (``LoRA``, ``AdaLoRA``, ``LISA``…) when fit ends.

    The result is first kept on local disk as a complete entry folder (``entry_dir``, default
    ``<default_root_dir>/zoo-entries/<name>``), then published; a successful publish removes that
    folder unless ``keep_entry``. A publish that fails (Hub unreachable, disk full, no permission)
    leaves the folder and raises :class:`~lightning_peft.zoo.PublishError` saying where it is and how
    to push it later (``lightning-peft zoo push DIR NAME``): a trained result is never lost.

    Hooks: ``setup`` checks, before any training, the name, that a method callback comes earlier in
    ``callbacks`` (so its ``on_fit_end``, e.g. AdaLoRA's shrink, has run first), that ``entry_dir``
    and the local zoo can be written, and that the Hub answers (unless ``HF_HUB_OFFLINE`` is set);
    ``on_fit_end`` gathers the adapter and the base fingerprint on every rank, then rank 0 builds the
    entry (adapter, manifest, model card with the trainer's metrics, the LightningCLI ``config.yaml``
    when the run came from the CLI, the method's pictures) and publishes it with one commit. On
    several ranks, rank 0 checks and publishes and every rank raises the same error.

    Args:
        name: entry name (local) or repo name / ``org/repo`` (Hub).
        zoo: ``"local"`` (default) or ``"hub"``.
        root: local zoo directory; default ``$LIGHTNING_PEFT_ZOO`` or the user cache.
        namespace: Hub user or organisation; default the token's user.
        endpoint: Hub URL; default huggingface_hub's.
        private: create the Hub repo private.
        base_model: reference to the base weights for the card and manifest (a Hub id, a path).
        entry_dir: where the entry is kept before publishing; default ``<trainer.default_root_dir>/zoo-entries``.
        keep_entry: keep the entry folder after a successful publish too.
        timeout: seconds to wait for the Hub; default ``$LIGHTNING_PEFT_HUB_TIMEOUT`` or 10.

    Raises:
        ValueError: an invalid name, or no method callback before this one.

    Example:
        >>> publisher = ZooPublisher(name="org/vit-lora", zoo="hub", keep_entry=True)  # checked at once
        >>> ZooPublisher(name="bad name!", zoo="hub")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: invalid Hub repo name 'bad name!': ...
    """

    def __init__(
        self,
        name: str,
        zoo: Literal["local", "hub"] = "local",
        root: str | None = None,
        namespace: str | None = None,
        endpoint: str | None = None,
        private: bool = False,
        base_model: str | None = None,
        entry_dir: str | None = None,
        keep_entry: bool = False,
        timeout: float | None = None,
    ) -> None:
        if zoo == "local":
            validate_name(name)
        elif zoo == "hub":
            validate_repo_id(name)
        else:
            raise ValueError(f"zoo must be 'local' or 'hub', got {zoo!r}")
        self.name, self.zoo, self.root = name, zoo, root
        self.namespace, self.endpoint, self.private, self.base_model = namespace, endpoint, private, base_model
        self.entry_dir, self.keep_entry, self.timeout = entry_dir, keep_entry, timeout
        self.revision: str | None = None
        self.kept: Path | None = None  # the entry folder left on disk (rank 0), if any

    def _method(self, trainer: pl.Trainer) -> MethodCallback:
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        methods = [cb for cb in callbacks[: callbacks.index(self)] if isinstance(cb, MethodCallback)]
        if not methods:
            raise ValueError(
                "ZooPublisher publishes the result of a method callback (LoRA, AdaLoRA, LISA, ID3, SaRA) listed "
                "before it in callbacks"
            )
        return methods[-1]

    def _target(self) -> LocalZoo | HubZoo:
        if self.zoo == "local":
            return LocalZoo(self.root)
        return HubZoo(namespace=self.namespace, endpoint=self.endpoint, private=self.private, timeout=self.timeout)

    def _entries(self, trainer: pl.Trainer) -> Path:
        return Path(self.entry_dir) if self.entry_dir else Path(trainer.default_root_dir) / "zoo-entries"

    def _preflight(self, trainer: pl.Trainer) -> Exception | None:
        """What would make the publish fail, found before training (rank 0); None when all is well."""
        try:
            check_writable(self._entries(trainer), f"keeping the trained entry {self.name!r}")
            target = self._target()
            if isinstance(target, LocalZoo):
                check_writable(target.root, f"publishing entry {self.name!r}")
            else:
                target.check()  # a no-op under HF_HUB_OFFLINE: offline by choice
        except (OSError, HubError, ValueError) as err:
            return err
        return None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._method(trainer)
        if stage != "fit":
            return
        problem = distributed.broadcast_object(distributed.rank_zero_only(self._preflight)(trainer))
        if problem is not None:
            raise problem

    def _fresh_folder(self, trainer: pl.Trainer) -> str:
        """``<entries>/<name>``, or ``<name>-2``… when an earlier run's entry is still kept there."""
        base = self._entries(trainer) / self.name.replace("/", "--")
        folder, n = base, 1
        while folder.exists() or folder.with_name(f".{folder.name}.partial").exists():
            n += 1
            folder = base.with_name(f"{base.name}-{n}")
        return str(folder)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        method = self._method(trainer)
        root, _, _ = resolve_backbone(pl_module, method.backbone)
        base = method.fit_fingerprint  # the method callback's on_fit_end (it runs first) read every base tensor
        if base is None:
            base = method.base_fingerprint(root)  # on every rank: sharded weights gather
        final = Path(str(distributed.broadcast_object(distributed.rank_zero_only(self._fresh_folder)(trainer))))
        stage = final.with_name(f".{final.name}.partial")
        written: Path | None = None
        error: Exception | None = None
        try:
            written = method.save(root, stage)  # every rank gathers, rank 0 writes (atomically)
        except OSError as err:
            reason = storage_error(err, stage.parent, "writing the adapter")
            error = PublishError(
                f"ZooPublisher could not keep the trained result of {self.name!r}: {reason}; the adapters are still "
                "on the model in memory"
            )
        outcome: tuple[str | None, Exception | None] | None = (None, error)
        if error is None:
            outcome = distributed.rank_zero_only(self._build_and_publish)(trainer, method, root, written, final, base)
        self.revision, error = distributed.broadcast_object(outcome) or (None, None)
        if error is not None:
            raise error

    def _build_and_publish(
        self,
        trainer: pl.Trainer,
        method: MethodCallback,
        root: nn.Module,
        written: Path | None,
        final: Path,
        base: dict,
    ) -> tuple[str | None, Exception | None]:
        stage = Path(written) if written is not None else final.with_name(f".{final.name}.partial")
        try:
            pictures = self._build(trainer, method, root, stage, base)
            os.replace(stage, final)
        except Exception as err:  # noqa: BLE001 - reported with where the adapter is
            reason = storage_error(err, stage, "writing the entry") if isinstance(err, OSError) else err
            self.kept = stage
            return None, PublishError(
                f"ZooPublisher could not complete the entry {self.name!r} ({reason}); the trained adapter is kept "
                f"at {stage}",
                stage,
            )
        target = self._target()
        try:
            revision = target.publish(final, self.name)
        except Exception as err:  # noqa: BLE001 - the result stays on disk, the message says how to push it
            self.kept = final
            return None, PublishError(
                f"ZooPublisher could not publish {self.name!r} ({err}); the trained entry is kept at {final}: push "
                f"it later with `{self._push_command(final)}`",
                final,
            )
        if self.keep_entry:
            self.kept = final
        else:
            shutil.rmtree(final, ignore_errors=True)
            with contextlib.suppress(OSError):
                final.parent.rmdir()  # the default folder, when nothing else is kept there
        where = target.root / self.name if isinstance(target, LocalZoo) else target.repo_id(self.name)
        rank_zero_info(
            f"ZooPublisher: published {self.name!r} revision {revision[:12]} ({len(pictures)} picture(s)) to {where}"
        )
        return revision, None

    def _build(self, trainer: pl.Trainer, method: MethodCallback, root: nn.Module, folder: Path, base: dict) -> list:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        pictures = method.write_pictures(folder)
        build_entry(
            folder,
            root,
            method.config if isinstance(method, LoRA) else None,
            self.name,
            base_model=self.base_model,
            metrics=metrics,
            recipe=cli_recipe(trainer),
            adapter_written=True,
            base_fingerprint=base,
            pictures=None,
            method=method.method,
            hyperparameters=method.hyperparameters(),
            schedule=method.schedule(),
        )
        return pictures

    def _push_command(self, folder: Path) -> str:
        parts = ["lightning-peft", "zoo", "push", str(folder), self.name]
        if self.zoo == "hub":
            parts.append("--hub")
            parts += ["--namespace", self.namespace] if self.namespace else []
            parts += ["--endpoint", self.endpoint] if self.endpoint else []
        elif self.root:
            parts += ["--root", str(self.root)]
        return " ".join(parts)
