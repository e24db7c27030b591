"""lightning-peft: adaptive parameter-efficient fine-tuning as PyTorch Lightning callbacks.

Add a callback to a ``lightning.Trainer`` and the backbone inside your ``LightningModule`` is
fine-tuned with a parameter-efficient method::

    import lightning as L
    from lightning_peft import LoRA

    trainer = L.Trainer(callbacks=[LoRA(r=8, alpha=16, modules_to_save=["head"])])
    trainer.fit(my_module, datamodule)

The pure-torch layers (:mod:`lightning_peft.adapters`, :mod:`lightning_peft.methods`,
:mod:`lightning_peft.backbones`) never import Lightning; the callbacks are imported lazily from
here so ``import lightning_peft.adapters`` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "AdaLoRA": "lightning_peft.callbacks",
    "LoRA": "lightning_peft.callbacks",
    "LISA": "lightning_peft.callbacks",
    "ID3": "lightning_peft.callbacks",
    "SaRA": "lightning_peft.callbacks",
    "SSF": "lightning_peft.callbacks",
    "HFT": "lightning_peft.callbacks",
    "SpIEL": "lightning_peft.callbacks",
    "SelectiveDDPStrategy": "lightning_peft.strategies",
    "shard": "lightning_peft.distributed",
    "ZooPublisher": "lightning_peft.callbacks",
    "AdapterCheckpoints": "lightning_peft.callbacks",
    "AdaLoRAConfig": "lightning_peft.adapters",
    "LoRAConfig": "lightning_peft.adapters",
    "inject_adapters": "lightning_peft.adapters",
    "remove_adapters": "lightning_peft.adapters",
    "save_adapter": "lightning_peft.adapters",
    "load_adapter": "lightning_peft.adapters",
    "export": "lightning_peft.exporting",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_peft' has no attribute {name!r}")
