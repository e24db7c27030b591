"""Text tasks (the old single module; its names are re-exported here, so ``lightning_peft.tasks.text.X`` keeps working).

One module per task family:

- :mod:`lightning_peft.tasks.language_model`: :class:`CausalLMModule` (a transformers Llama) and
  :class:`DocstringCorpusDataModule`, causal language modelling on standard-library docstrings.
- :mod:`lightning_peft.tasks.sentence_classification`: :class:`SentenceClassifier` (MiniLM or any encoder),
  :class:`TextClassificationModel` and the frozen-encoder baseline :func:`head_only_accuracy`.
- :mod:`lightning_peft.tasks.sentiment`: :class:`SentimentTemplatesDataModule`, template-written reviews.
- :mod:`lightning_peft.tasks.word_order`: :class:`DocstringWordOrderDataModule`, as written or two words swapped.

Shared helpers: :mod:`lightning_peft.tasks.docstrings` (the docstring corpus) and :mod:`lightning_peft.tasks.encoders`
(the bundled MiniLM and its tokenizer).
"""

from __future__ import annotations

from lightning_peft.tasks.docstrings import DEFAULT_DOC_MODULES, docstring_corpus
from lightning_peft.tasks.encoders import MINILM_PACKAGE, bundled_minilm_path, encoder_tokenizer
from lightning_peft.tasks.language_model import CausalLMModule, DocstringCorpusDataModule
from lightning_peft.tasks.sentence_classification import (
    SentenceClassifier,
    TextClassificationModel,
    head_only_accuracy,
)
from lightning_peft.tasks.sentiment import _NEGATIVE, _POSITIVE, SentimentTemplatesDataModule  # noqa: F401 (word lists: tests)

__all__ = [
    "DEFAULT_DOC_MODULES",
    "MINILM_PACKAGE",
    "CausalLMModule",
    "DocstringCorpusDataModule",
    "SentenceClassifier",
    "SentimentTemplatesDataModule",
    "TextClassificationModel",
    "bundled_minilm_path",
    "docstring_corpus",
    "encoder_tokenizer",
    "head_only_accuracy",
]
