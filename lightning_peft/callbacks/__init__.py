"""Lightning callbacks, one per method: thin shells that call the pure-torch cores from the right hooks."""

from lightning_peft.callbacks.adalora import AdaLoRA
from lightning_peft.callbacks.lora import LoRA
from lightning_peft.callbacks.zoo_publisher import ZooPublisher

__all__ = ["AdaLoRA", "LoRA", "ZooPublisher"]
