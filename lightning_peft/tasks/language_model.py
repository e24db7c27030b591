"""Causal language modelling, offline: a corpus of standard-library docstrings and a transformers Llama trained on it.

:class:`DocstringCorpusDataModule` builds its corpus from the docstrings of Python's standard library
(:func:`~lightning_peft.tasks.docstrings.docstring_corpus`, fixed for a given Python version) and tokenises it into
bytes by default, and :class:`CausalLMModule` trains a small random ``LlamaForCausalLM`` on it, or a pretrained one
with ``pretrained`` (and the data module's ``tokenizer``).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from lightning_peft._deps import require
from lightning_peft.tasks.base import TensorSplitDataModule, TrainableAdamW
from lightning_peft.tasks.docstrings import DEFAULT_DOC_MODULES, docstring_corpus

__all__ = ["CausalLMModule", "DocstringCorpusDataModule"]


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
