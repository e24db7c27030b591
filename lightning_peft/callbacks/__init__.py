"""Lightning callbacks, one per method: thin shells that call the pure-torch cores from the right hooks.

Importing this package also registers the ``"ddp_selective"`` strategy name
(:class:`lightning_peft.strategies.SelectiveDDPStrategy`).
"""

from lightning_peft.callbacks.adalora import AdaLoRA
from lightning_peft.callbacks.base import MethodCallback
from lightning_peft.callbacks.checkpoints import AdapterCheckpoints
from lightning_peft.callbacks.hft import HFT
from lightning_peft.callbacks.id3 import ID3
from lightning_peft.callbacks.lisa import LISA
from lightning_peft.callbacks.lora import LoRA
from lightning_peft.callbacks.sara import SaRA
from lightning_peft.callbacks.spiel import SpIEL
from lightning_peft.callbacks.ssf import SSF
from lightning_peft.callbacks.zoo_publisher import ZooPublisher

__all__ = [
    "HFT",
    "ID3",
    "LISA",
    "AdaLoRA",
    "AdapterCheckpoints",
    "LoRA",
    "MethodCallback",
    "SSF",
    "SaRA",
    "SpIEL",
    "ZooPublisher",
]
