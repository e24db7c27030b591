"""``AdapterCheckpoints``: training checkpoints that hold what the method trains, not the frozen base.

A Lightning checkpoint of a LoRA run holds the whole model, so for a 7B base every checkpoint is gigabytes of
weights that never changed (Lightning issue #21053). With this callback beside a method callback, every
checkpoint the trainer writes (``ModelCheckpoint``, ``trainer.save_checkpoint``, the SIGKILL-safe last
checkpoint) keeps in ``state_dict`` only

* the parameters that train now (adapters, the sparse bank, LISA's sampled blocks, a new head),
* the frozen parameters training changed so far (LISA: every block trained for at least one step;
  :meth:`~lightning_peft.callbacks.MethodCallback.changed_names`),
* every buffer (the methods' bookkeeping: sparse indices, slots, pretrained values; BatchNorm statistics),

plus, as always, the optimizer, the loops, the callbacks' state, and a ``"lightning_peft"`` record: the
method, the base model's fingerprint and the keys left out. ID3, SaRA and SpIEL merge their values into the frozen
weights in place; those weights are left out and rebuilt exactly from the bookkeeping (pretrained values,
learned deltas, the bank) when the checkpoint loads.

**Resuming** (``trainer.fit(model, ckpt_path=...)`` with the same callbacks) needs the same base weights in the
model: the callback wraps the strategy's ``CheckpointIO`` so that, when a checkpoint it wrote loads, the base
fingerprint is checked against the model in memory (a clear error if another base, or a base already trained
in this process, is there) and the left-out tensors are taken from it; Lightning then loads the state strictly
and the run resumes exactly (tested after a SIGKILL, for every method).

Sharded strategies (FSDP2's ``ModelParallelStrategy``) write distributed checkpoints, a folder of per-rank
shards, and are refused; use this callback with one device, ``ddp`` or ``ddp_selective``.

Example:
    >>> from lightning_peft.callbacks import LoRA
    >>> callbacks = [LoRA(r=8), AdapterCheckpoints()]
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_peft.callbacks.backbone import resolve_backbone
from lightning_peft.callbacks.base import MethodCallback
from lightning_peft.zoo.entry import fingerprint

__all__ = ["AdapterCheckpoints", "ExplainCheckpointLoading", "check_loadable"]

RECORD = "lightning_peft"
"""Key of the record in a checkpoint written with :class:`AdapterCheckpoints`."""


class AdapterCheckpoints(Callback):
    """Make the trainer's checkpoints hold only what the method trains (and resume from them given the same base).

    Put it in ``Trainer(callbacks=[...])`` beside exactly one method callback (``LoRA``, ``AdaLoRA``, ``LISA``,
    ``HFT``, ``ID3``, ``SaRA``, ``SSF``), or as one more ``class_path`` in a LightningCLI config.

    Raises:
        ValueError: at setup, no method callback or several are in the trainer.
        NotImplementedError: at setup, the strategy shards the model (FSDP2, FSDP, DeepSpeed).
    """

    def __init__(self) -> None:
        self.method: MethodCallback | None = None
        self.dropped_bytes = 0  # of the last checkpoint written, for the log and the tests
        self.kept_bytes = 0

    # ----------------------------------------------------------------------------------------- setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        methods = [c for c in trainer.callbacks if isinstance(c, MethodCallback)]  # type: ignore[attr-defined]
        if len(methods) != 1:
            found = ", ".join(type(m).__name__ for m in methods) or "none"
            raise ValueError(
                "AdapterCheckpoints keeps what one method trains: put exactly one method callback (LoRA, AdaLoRA, SSF, "
                f"LISA, HFT, ID3, SaRA, SpIEL) in the trainer beside it; found {found}"
            )
        self.method = methods[0]
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

        strategy = trainer.strategy
        if not isinstance(strategy, DDPStrategy | SingleDeviceStrategy):
            raise NotImplementedError(
                f"AdapterCheckpoints does not support {type(strategy).__name__}: sharded strategies write distributed "
                "checkpoints (per-rank shards), which this callback does not rewrite. Use one device, "
                "strategy='ddp' or strategy='ddp_selective', or leave AdapterCheckpoints out"
            )
        if not isinstance(strategy.checkpoint_io, _FillingIO):
            strategy.checkpoint_io = _FillingIO(strategy.checkpoint_io, self, trainer)

    # ----------------------------------------------------------------------------------------- what is kept
    def left_out(self, pl_module: pl.LightningModule) -> set[str]:
        """The ``state_dict`` keys a checkpoint leaves out: frozen parameters that training has not changed."""
        assert self.method is not None
        root, path, _ = resolve_backbone(pl_module, self.method.backbone)
        prefix = f"{path}." if path else ""
        changed = {prefix + name for name in self.method.changed_names(root)}
        return {
            name
            for name, param in pl_module.named_parameters(remove_duplicate=False)
            if not param.requires_grad and name not in changed
        }

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        assert self.method is not None
        state = checkpoint["state_dict"]
        drop = sorted(self.left_out(pl_module) & set(state))
        root, path, _ = resolve_backbone(pl_module, self.method.backbone)
        self.dropped_bytes = sum(_nbytes(state[k]) for k in drop)
        for key in drop:
            del state[key]
        self.kept_bytes = sum(_nbytes(v) for v in state.values())
        checkpoint[RECORD] = {
            "adapter_only": True,
            "method": self.method.method,
            "backbone": path,
            "base_fingerprint": self.method.base_fingerprint(root),
            "left_out": drop,
        }

    # ----------------------------------------------------------------------------------------- loading
    def fill(self, checkpoint: dict[str, Any], pl_module: pl.LightningModule) -> None:
        """Put the left-out base tensors of an adapter-only ``checkpoint`` back, from the model in memory.

        Raises:
            ValueError: the model in memory does not hold the base the checkpoint was trained on, or lacks a tensor.
        """
        record = checkpoint.get(RECORD)
        if not isinstance(record, dict) or not record.get("adapter_only"):
            return
        assert self.method is not None
        root, _, _ = resolve_backbone(pl_module, self.method.backbone)
        expected = record.get("base_fingerprint", {}).get("tensors", {})
        have = fingerprint(root)["tensors"]
        differ = sorted(n for n, digest in expected.items() if have.get(n) != digest)
        if differ:
            raise ValueError(
                f"the checkpoint holds only what {record.get('method')} trained and needs the base weights it was "
                f"trained on, but {len(differ)} base tensor(s) of this model differ (first: {differ[0]}). Resume with "
                "a freshly built model holding the same pretrained weights (not one trained already in this process)"
            )
        own = pl_module.state_dict()
        state = checkpoint["state_dict"]
        missing = [k for k in record.get("left_out", []) if k not in own]
        if missing:
            raise ValueError(
                f"the checkpoint left out {len(missing)} base tensor(s) this model does not have (first: "
                f"{missing[0]}): it was written for another model"
            )
        for key in record.get("left_out", []):
            state[key] = own[key]
        rank_zero_info(f"AdapterCheckpoints: took {len(record.get('left_out', []))} base tensors from the model")


def check_loadable(module: torch.nn.Module, checkpoint: dict[str, Any]) -> None:
    """Explain, before ``load_state_dict`` fails on it, why a lightning-peft training checkpoint does not load here.

    ``MyModule.load_from_checkpoint(path)`` builds a fresh module and loads the checkpoint's ``state_dict`` into it.
    A training checkpoint of a method run holds the method's layers (``...q_proj.base_layer.weight``,
    ``lora_A``, the sparse bookkeeping), which a fresh module does not have, and an adapter-only checkpoint also
    lacks the frozen base. torch then lists missing keys; this says what to do instead.

    Raises:
        ValueError: the checkpoint cannot load into ``module`` as it is, with the ways to use it.
    """
    state = checkpoint.get("state_dict", {})
    own = module.state_dict()
    found = checkpoint.get(RECORD)
    record: dict[str, Any] = found if isinstance(found, dict) else {}
    method_keys = [
        k for k in state if k not in own and (".base_layer." in k or ".lora_" in k or ".sparse_" in k or ".ssf_" in k)
    ]
    left_out = [k for k in record.get("left_out", []) if k not in state]
    if not method_keys and not left_out:
        return
    what = f"an adapter-only checkpoint of a {record.get('method')} run" if left_out else "a training checkpoint"
    example = (method_keys or left_out)[0]
    raise ValueError(
        f"{what} written with lightning-peft: it holds the method's layers or leaves the frozen base out (e.g. "
        f"{example!r}), which a fresh {type(module).__name__} does not match. To continue training: "
        "trainer.fit(model, ckpt_path=...) with the same method callback (and AdapterCheckpoints if it wrote the "
        "checkpoint). To use the trained model: load the result the method callback saved (its save_dir) or its zoo "
        "entry: lightning_peft.zoo.load(name, base_model) / lightning_peft.load_adapter(model, folder)"
    )


class ExplainCheckpointLoading:
    """Mix into a ``LightningModule`` so that ``load_from_checkpoint`` of a method run's training checkpoint says what
    to do instead of listing missing keys (:func:`check_loadable`). The modules of :mod:`lightning_peft.tasks` have it.
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        assert isinstance(self, torch.nn.Module)
        check_loadable(self, checkpoint)
        parent = super()
        if hasattr(parent, "on_load_checkpoint"):
            parent.on_load_checkpoint(checkpoint)  # type: ignore[misc]


def _nbytes(value: Any) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


class _FillingIO(CheckpointIO):
    """The strategy's ``CheckpointIO``, with the left-out base tensors put back into what it loads."""

    def __init__(self, inner: CheckpointIO, owner: AdapterCheckpoints, trainer: pl.Trainer) -> None:
        self.inner, self.owner, self.trainer = inner, owner, trainer

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"weights_only": weights_only}
        if map_location is not None:  # else the inner IO's own default
            kwargs["map_location"] = map_location
        checkpoint = self.inner.load_checkpoint(path, **kwargs)
        self.owner.fill(checkpoint, self.trainer.lightning_module)
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()
