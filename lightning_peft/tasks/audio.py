"""Audio classification with a transformers Audio Spectrogram Transformer, on synthetic audio made offline.

:class:`TwoNoteMelodyDataModule` synthesises short clips (two notes one after the other; the melody is the
class, at random loudness, timing, detuning and noise level) and turns them into log-mel spectrograms
with plain torch (an STFT and a triangular mel filter bank; no torchaudio, nothing downloaded).
:class:`AudioClassifier` puts an ``ASTForAudioClassification`` on top: a small random one by default, or a
pretrained checkpoint with ``pretrained``.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import TensorDataset

from lightning_peft._deps import require
from lightning_peft.tasks.base import ClassifierSteps, TensorSplitDataModule

__all__ = ["AudioClassifier", "TwoNoteMelodyDataModule", "log_mel_spectrogram", "mel_filter_bank"]


def _hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filter_bank(num_mel_bins: int, n_fft: int, sample_rate: int, f_min: float = 20.0) -> torch.Tensor:
    """Triangular filters evenly spaced on the HTK mel scale from ``f_min`` to Nyquist.

    Args:
        num_mel_bins: number of filters.
        n_fft: FFT size; the filters cover its ``n_fft // 2 + 1`` frequency bins.
        sample_rate: sampling rate in Hz.
        f_min: lowest frequency in Hz.

    Returns:
        ``(n_fft // 2 + 1, num_mel_bins)`` weights.

    Example:
        >>> mel_filter_bank(16, 512, 16000).shape
        torch.Size([257, 16])
    """
    freqs = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = _mel_to_hz(
        torch.linspace(
            _hz_to_mel(torch.tensor(f_min)).item(), _hz_to_mel(torch.tensor(sample_rate / 2)).item(), num_mel_bins + 2
        ).double()
    )
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (freqs[:, None] - lower) / (center - lower)
    falling = (upper - freqs[:, None]) / (upper - center)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


def log_mel_spectrogram(
    waves: torch.Tensor, num_mel_bins: int, sample_rate: int = 16000, hop_length: int = 160, win_length: int = 400
) -> torch.Tensor:
    """Log-mel features as AST expects them: 25 ms Hann windows every 10 ms (at 16 kHz), time first.

    Args:
        waves: ``(B, samples)`` waveforms.
        num_mel_bins: mel bands.
        sample_rate: sampling rate in Hz.
        hop_length: samples between frames.
        win_length: window length in samples (zero-padded to the next power of two for the FFT).

    Returns:
        ``(B, frames, num_mel_bins)`` natural-log mel energies, ``frames = 1 + (samples - n_fft) // hop_length``.
    """
    n_fft = 1 << (win_length - 1).bit_length()
    window = torch.hann_window(win_length, periodic=False, dtype=waves.dtype, device=waves.device)
    spec = (
        torch.stft(waves, n_fft, hop_length, win_length, window=window, center=False, return_complex=True).abs() ** 2
    )  # (B, n_fft // 2 + 1, frames)
    fbank = mel_filter_bank(num_mel_bins, n_fft, sample_rate).to(waves)
    return torch.log(torch.einsum("bft,fm->btm", spec, fbank) + 1e-6)


class TwoNoteMelodyDataModule(TensorSplitDataModule):
    """Synthetic, deterministic audio classification: which two-note melody a noisy clip plays.

    Every clip plays one sine tone, then another; class ``k`` is the ``k``-th ordered pair of distinct pitches
    drawn from ``num_tones`` pitches evenly spaced on the mel scale between 250 Hz and 4 kHz (``num_tones``
    is the smallest number that gives ``num_classes`` ordered pairs). A melody and its reverse hold the same
    pitches, so the average spectrum does not tell them apart: the model has to see which note comes first.
    Each note is detuned by up to a sixth of the pitch spacing and has its own loudness (0.3-1) and phase;
    the first starts in the first 15 % of the clip, the change comes between 40 % and 60 % (with a gap of up
    to 5 %), the second ends in the last 15 %; white noise of a random level (std 0.05-0.5) is added.
    Features are :func:`log_mel_spectrogram` s normalised as AST's feature extractor does,
    ``(x - mean) / (2 * std)``, with the training set's mean and std. The same ``seed`` gives the same clips
    on every machine and rank.

    Args:
        num_classes: number of classes (melodies), >= 2.
        samples_per_class: clips per class, split into train and validation.
        val_fraction: share of each class held out for validation (and test).
        num_mel_bins: mel bands of the features (AST's ``num_mel_bins``; 128 for pretrained ASTs).
        max_length: frames per clip, 10 ms each (AST's ``max_length``; 1024 for pretrained ASTs).
        sample_rate: sampling rate in Hz.
        batch_size: samples per training batch.
        seed: seed of the synthesis.
        num_workers: DataLoader workers.

    Example:
        >>> dm = TwoNoteMelodyDataModule(num_classes=3, samples_per_class=4, num_mel_bins=16, max_length=32)
        >>> dm.setup("fit")
        >>> dm.train_set.tensors[0].shape
        torch.Size([9, 32, 16])
    """

    val_batch_size = 256

    def __init__(
        self,
        num_classes: int = 6,
        samples_per_class: int = 200,
        val_fraction: float = 0.25,
        num_mel_bins: int = 32,
        max_length: int = 64,
        sample_rate: int = 16000,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.num_classes, self.samples_per_class, self.val_fraction = num_classes, samples_per_class, val_fraction
        self.num_mel_bins, self.max_length, self.sample_rate = num_mel_bins, max_length, sample_rate
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.num_tones = next(n for n in range(2, num_classes + 2) if n * (n - 1) >= num_classes)
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def tone_frequencies(self) -> torch.Tensor:
        """The ``num_tones`` pitches in Hz."""
        lo, hi = _hz_to_mel(torch.tensor(250.0)), _hz_to_mel(torch.tensor(4000.0))
        return _mel_to_hz(torch.linspace(lo.item(), hi.item(), self.num_tones))

    def melodies(self) -> torch.Tensor:
        """``(num_classes, 2)``: the pitch indices of each class's first and second note."""
        pairs = [(i, j) for i in range(self.num_tones) for j in range(self.num_tones) if i != j]
        return torch.tensor(pairs[: self.num_classes])

    def synthesize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All clips as waveforms ``(N, samples)`` and their labels ``(N,)``, class by class."""
        gen = torch.Generator().manual_seed(self.seed)

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)

        n = self.num_classes * self.samples_per_class
        labels = torch.arange(self.num_classes).repeat_interleave(self.samples_per_class)
        notes = self.melodies()[labels]
        win = 400 * self.sample_rate // 16000
        hop = 160 * self.sample_rate // 16000
        length = (1 << (win - 1).bit_length()) + (self.max_length - 1) * hop
        t = torch.arange(length, dtype=torch.float64) / self.sample_rate
        idx = torch.arange(length, dtype=torch.float64)
        mels = _hz_to_mel(self.tone_frequencies().double())
        spacing = (mels[1] - mels[0]).item()
        change = uniform(0.4, 0.6) * length
        spans = [
            (uniform(0.0, 0.15) * length, change),
            (change + uniform(0.0, 0.05) * length, uniform(0.85, 1.0) * length),
        ]
        waves = torch.zeros(n, length, dtype=torch.float64)
        for k, (start, end) in enumerate(spans):
            freq = _mel_to_hz(mels[notes[:, k]] + uniform(-spacing / 6, spacing / 6))
            amp, phase = uniform(0.3, 1.0), uniform(0.0, 2 * math.pi)
            envelope = ((idx >= start[:, None]) & (idx < end[:, None])).double()
            waves += amp[:, None] * torch.sin(2 * math.pi * freq[:, None] * t + phase[:, None]) * envelope
        waves += uniform(0.05, 0.5)[:, None] * torch.randn(n, length, generator=gen, dtype=torch.float64)
        return waves.float(), labels

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        waves, labels = self.synthesize()
        feats = log_mel_spectrogram(waves, self.num_mel_bins, self.sample_rate)
        n_val = max(1, round(self.samples_per_class * self.val_fraction))
        is_val = (torch.arange(len(labels)) % self.samples_per_class) < n_val
        mean, std = feats[~is_val].mean(), feats[~is_val].std()
        feats = (feats - mean) / (2 * std)
        self.train_set = TensorDataset(feats[~is_val], labels[~is_val])
        self.val_set = TensorDataset(feats[is_val], labels[is_val])


class AudioClassifier(ClassifierSteps, pl.LightningModule):
    """An ``ASTForAudioClassification`` trained with cross-entropy on ``(features, labels)`` batches.

    Features are ``(B, max_length, num_mel_bins)`` log-mel spectrograms (time first), e.g. from
    :class:`TwoNoteMelodyDataModule`. The backbone, classifier included, lives at ``self.model``. Only
    parameters that require grad at ``configure_optimizers`` time go to AdamW, so a PEFT callback's
    freezing is respected.

    Args:
        num_classes: classes of the new classifier.
        pretrained: a transformers AST checkpoint (Hub id or folder, e.g.
            ``"MIT/ast-finetuned-audioset-10-10-0.4593"``; its classifier is replaced for ``num_classes``);
            None builds the small random model described by the size arguments.
        num_mel_bins: mel bands of the input (random model only; must match the data).
        max_length: frames of the input (random model only; must match the data).
        hidden_size: transformer width (random model only).
        num_layers: transformer layers (random model only).
        num_heads: attention heads (random model only).
        stride: frequency and time stride of the 16x16 patches (random model only; AST uses 10).
        model_kwargs: extra ``ASTConfig`` (or ``from_pretrained``) arguments, overriding the ones above.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.

    Example:
        >>> m = AudioClassifier(num_classes=3, num_mel_bins=16, max_length=32, hidden_size=16, num_layers=1)
        >>> m(torch.zeros(2, 32, 16)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        num_classes: int = 6,
        pretrained: str | None = None,
        num_mel_bins: int = 32,
        max_length: int = 64,
        hidden_size: int = 64,
        num_layers: int = 4,
        num_heads: int = 4,
        stride: int = 8,
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        transformers = require("transformers", "AudioClassifier")
        ASTConfig, ASTForAudioClassification = transformers.ASTConfig, transformers.ASTForAudioClassification  # noqa: N806

        self.num_classes, self.lr, self.weight_decay = num_classes, lr, weight_decay
        if pretrained is not None:
            self.model = ASTForAudioClassification.from_pretrained(
                pretrained, num_labels=num_classes, ignore_mismatched_sizes=True, **(model_kwargs or {})
            ).train()  # from_pretrained returns eval mode; fine-tuning trains with the model's dropout
        else:
            config = {
                "hidden_size": hidden_size,
                "num_hidden_layers": num_layers,
                "num_attention_heads": num_heads,
                "intermediate_size": 2 * hidden_size,
                "num_mel_bins": num_mel_bins,
                "max_length": max_length,
                "frequency_stride": stride,
                "time_stride": stride,
                "num_labels": num_classes,
            }
            self.model = ASTForAudioClassification(ASTConfig(**{**config, **(model_kwargs or {})}))

    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None)
        config = self.model.config
        for name, mine in (
            ("num_classes", self.num_classes),
            ("num_mel_bins", config.num_mel_bins),
            ("max_length", config.max_length),
        ):
            theirs = getattr(data, name, None)
            if theirs is not None and theirs != mine:
                raise ValueError(f"AudioClassifier: the model has {name}={mine} but the data module {theirs}")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model(input_values=features).logits
