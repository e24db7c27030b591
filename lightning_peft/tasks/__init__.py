"""Ready-made ``LightningModule`` s and data modules for recipes and examples.

These sit on top of the library (they import Lightning and the backbone libraries); the callbacks
never depend on them and work with any ``LightningModule`` of your own.
"""

from lightning_peft.tasks.data import DigitsDataModule
from lightning_peft.tasks.vision import ImageClassifier

__all__ = ["DigitsDataModule", "ImageClassifier"]
