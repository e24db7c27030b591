"""The ``ZooPublisher`` callback: publish the trained adapter to a zoo at the end of fit."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_peft import distributed
from lightning_peft.callbacks.backbone import resolve_backbone
from lightning_peft.callbacks.base import MethodCallback
from lightning_peft.callbacks.lora import LoRA
from lightning_peft.zoo import HubZoo, LocalZoo, build_entry, validate_name

__all__ = ["ZooPublisher"]


class ZooPublisher(Callback):
    """Publish the result of the method callback placed before it (``LoRA``, ``AdaLoRA``, ``LISA``…) when fit ends.

    Hooks: ``setup`` checks the name and that a method callback comes earlier in ``callbacks`` (so its
    ``on_fit_end``, e.g. AdaLoRA's shrink, has run first); ``on_fit_end`` gathers the adapter and the
    base fingerprint on every rank, then rank 0 builds the entry (adapter, manifest, model card with
    the trainer's metrics, the LightningCLI ``config.yaml`` when the run came from the CLI, the
    method's pictures) in a temporary folder and publishes it with one commit.

    Args:
        name: entry name (local) or repo name / ``org/repo`` (Hub).
        zoo: ``"local"`` (default) or ``"hub"``.
        root: local zoo directory; default ``$LIGHTNING_PEFT_ZOO`` or the user cache.
        namespace: Hub user or organisation; default the token's user.
        endpoint: Hub URL; default huggingface_hub's.
        private: create the Hub repo private.
        base_model: reference to the base weights for the card and manifest (a Hub id, a path).

    Raises:
        ValueError: an invalid local name, or no adapter callback before this one.
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
    ) -> None:
        if zoo == "local":
            validate_name(name)
        elif zoo != "hub":
            raise ValueError(f"zoo must be 'local' or 'hub', got {zoo!r}")
        self.name, self.zoo, self.root = name, zoo, root
        self.namespace, self.endpoint, self.private, self.base_model = namespace, endpoint, private, base_model
        self.revision: str | None = None

    def _method(self, trainer: pl.Trainer) -> MethodCallback:
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        methods = [cb for cb in callbacks[: callbacks.index(self)] if isinstance(cb, MethodCallback)]
        if not methods:
            raise ValueError(
                "ZooPublisher publishes the result of a method callback (LoRA, AdaLoRA, LISA, ID3, SaRA) listed "
                "before it in callbacks"
            )
        return methods[-1]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._method(trainer)

    def _recipe(self, trainer: pl.Trainer) -> str | None:
        from lightning.pytorch.cli import SaveConfigCallback

        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, SaveConfigCallback):
                return cb.parser.dump(cb.config, skip_none=False)
        return None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        method = self._method(trainer)
        root, _, _ = resolve_backbone(pl_module, method.backbone)
        base = method.base_fingerprint(root)  # on every rank: sharded weights gather
        with tempfile.TemporaryDirectory(prefix="lightning-peft-publish-") as tmp:
            folder = Path(tmp) / "entry"
            written = method.save(root, folder)  # every rank gathers, rank 0 writes
            self.revision = distributed.rank_zero_only(self._publish)(trainer, method, root, written, base)
        self.revision = distributed.broadcast_object(self.revision)

    def _publish(self, trainer: pl.Trainer, method: MethodCallback, root, folder: Path, base: dict) -> str:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        pictures = method.write_pictures(folder)
        build_entry(
            folder,
            root,
            method.config if isinstance(method, LoRA) else None,
            self.name,
            base_model=self.base_model,
            metrics=metrics,
            recipe=self._recipe(trainer),
            adapter_written=True,
            base_fingerprint=base,
            pictures=None,
            method=method.method,
            hyperparameters=method.hyperparameters(),
            schedule=method.schedule(),
        )
        target = (
            LocalZoo(self.root)
            if self.zoo == "local"
            else HubZoo(namespace=self.namespace, endpoint=self.endpoint, private=self.private)
        )
        revision = target.publish(folder, self.name)
        where = target.root / self.name if isinstance(target, LocalZoo) else target.repo_id(self.name)
        rank_zero_info(
            f"ZooPublisher: published {self.name!r} revision {revision[:12]} ({len(pictures)} picture(s)) to {where}"
        )
        return revision
