"""Ready-made ``LightningModule`` s and data modules for recipes and examples.

These sit on top of the library (they import Lightning and the backbone libraries); the callbacks
never depend on them and work with any ``LightningModule`` of your own. One module per family, each
with its backbone at ``self.model`` and an AdamW over the parameters that require grad when
``configure_optimizers`` runs; each builds a small random backbone offline, or loads real weights with
its ``pretrained`` argument.

===========================  ======================================  =====================================
module                       backbone                                data (offline)
===========================  ======================================  =====================================
:class:`ImageClassifier`     timm (ViT ...)                          :class:`DigitsDataModule`
:class:`DenoisingModule`     diffusers UNet2DConditionModel / DiT    :class:`DigitsDataModule`
:class:`AudioClassifier`     transformers AST                        :class:`TwoNoteMelodyDataModule`
:class:`CausalLMModule`      transformers Llama                      :class:`DocstringCorpusDataModule`
:class:`SentenceClassifier`  transformers encoder (MiniLM, bundled)  :class:`DocstringWordOrderDataModule`,
                                                                     :class:`SentimentTemplatesDataModule`
===========================  ======================================  =====================================
"""

from lightning_peft.tasks.audio import AudioClassifier, TwoNoteMelodyDataModule
from lightning_peft.tasks.data import DigitsDataModule
from lightning_peft.tasks.diffusion import DenoisingModule
from lightning_peft.tasks.language_model import CausalLMModule, DocstringCorpusDataModule
from lightning_peft.tasks.sentence_classification import SentenceClassifier
from lightning_peft.tasks.sentiment import SentimentTemplatesDataModule
from lightning_peft.tasks.vision import ImageClassifier
from lightning_peft.tasks.word_order import DocstringWordOrderDataModule

__all__ = [
    "AudioClassifier",
    "CausalLMModule",
    "DenoisingModule",
    "DigitsDataModule",
    "DocstringCorpusDataModule",
    "DocstringWordOrderDataModule",
    "ImageClassifier",
    "SentenceClassifier",
    "SentimentTemplatesDataModule",
    "TwoNoteMelodyDataModule",
]
