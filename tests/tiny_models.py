"""Tiny, randomly initialised models of every supported backbone family, for fast offline tests.

Every factory takes ``seed`` and returns the same weights for the same seed without touching the
global RNG; models come back in train mode with every dropout / layerdrop / SpecAugment switched off,
so two forwards of the same input give the same output in train mode too. ``timm``, ``diffusers``
and ``transformers`` are imported inside the factories, so importing this module is cheap.

Example:
    >>> model = tiny_mlp()
    >>> forward("mlp", model).shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

# Before any Hugging Face library is imported (they are only imported inside the factories).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = [
    "FAMILIES",
    "TinyMLP",
    "example_inputs",
    "forward",
    "tiny_ast",
    "tiny_dit",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_mlp",
    "tiny_unet",
    "tiny_vit",
    "tiny_wav2vec2",
    "tiny_whisper",
]


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch for the block without changing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_vit(num_classes: int = 10, img_size: int = 8, in_chans: int = 1, seed: int = 0) -> nn.Module:
    """timm ``VisionTransformer``: patch 2, width 32, depth 2, 2 heads; input ``(B, in_chans, img_size, img_size)``."""
    from timm.models.vision_transformer import VisionTransformer

    with _seeded(seed):
        return VisionTransformer(
            img_size=img_size,
            patch_size=2,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=32,
            depth=2,
            num_heads=2,
            mlp_ratio=2,
        )


def tiny_unet(seed: int = 0) -> nn.Module:
    """diffusers ``UNet2DConditionModel``: 8x8x4 latents, 2 levels, cross-attention dim 32."""
    from diffusers import UNet2DConditionModel

    with _seeded(seed):
        return UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )


def tiny_dit(seed: int = 0) -> nn.Module:
    """diffusers ``DiTTransformer2DModel``: 8x8x4 latents, patch 2, 2 layers of 2x8 heads, 1000 classes.

    The class-label dropout of classifier-free guidance (random in train mode) is switched off.
    """
    from diffusers import DiTTransformer2DModel

    with _seeded(seed):
        model = DiTTransformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            num_embeds_ada_norm=1000,
        )
    for module in model.modules():
        if type(module).__name__ == "LabelEmbedding":
            module.dropout_prob = 0.0
    return model


def tiny_ast(num_labels: int = 4, seed: int = 0) -> nn.Module:
    """transformers ``ASTForAudioClassification``: 16 mel bins x 32 frames, width 32, 2 layers."""
    from transformers import ASTConfig, ASTForAudioClassification

    config = ASTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_mel_bins=16,
        max_length=32,
        frequency_stride=4,
        time_stride=4,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )
    with _seeded(seed):
        return ASTForAudioClassification(config)


def tiny_wav2vec2(num_labels: int = 4, seed: int = 0) -> nn.Module:
    """transformers ``Wav2Vec2ForSequenceClassification``: raw audio ``(B, 1600)``, width 32, 2 layers."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    config = Wav2Vec2Config(
        vocab_size=32,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_stride=(5, 4),
        conv_kernel=(10, 4),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        classifier_proj_size=16,
        hidden_dropout=0.0,
        activation_dropout=0.0,
        attention_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=0.0,
        apply_spec_augment=False,
        num_labels=num_labels,
    )
    with _seeded(seed):
        return Wav2Vec2ForSequenceClassification(config)


def tiny_whisper(num_labels: int = 4, seed: int = 0) -> nn.Module:
    """transformers ``WhisperForAudioClassification`` (encoder only): features ``(B, 16, 32)``, 2 layers."""
    from transformers import WhisperConfig, WhisperForAudioClassification

    config = WhisperConfig(
        vocab_size=128,
        num_mel_bins=16,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=16,
        max_target_positions=32,
        classifier_proj_size=16,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        num_labels=num_labels,
    )
    with _seeded(seed):
        return WhisperForAudioClassification(config)


def tiny_llama(seed: int = 0) -> nn.Module:
    """transformers ``LlamaForCausalLM``: vocab 128, width 32, 2 layers, 4 heads / 2 KV heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with _seeded(seed):
        return LlamaForCausalLM(config)


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """transformers ``GPT2LMHeadModel``: vocab 128, width 32, 2 layers, ``Conv1D`` projections, tied head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with _seeded(seed):
        return GPT2LMHeadModel(config)


class TinyBlock(nn.Module):
    """A residual MLP block: ``x + fc2(gelu(fc1(x)))``."""

    def __init__(self, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(x)))


class TinyMLP(nn.Module):
    """A plain model no preset knows: ``embed`` -> ``blocks`` (3 x :class:`TinyBlock`) -> ``head``.

    Maps ``(B, 16)`` inputs to ``(B, 4)`` logits.
    """

    def __init__(self, in_features: int = 16, dim: int = 32, depth: int = 3, num_classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, dim)
        self.blocks = nn.ModuleList(TinyBlock(dim, 2 * dim) for _ in range(depth))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def tiny_mlp(seed: int = 0) -> nn.Module:
    """A :class:`TinyMLP`: ``embed`` Linear, 3 blocks of ``fc1``/``fc2`` Linears, ``head`` Linear."""
    with _seeded(seed):
        return TinyMLP()


FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "vit": tiny_vit,
    "unet": tiny_unet,
    "dit": tiny_dit,
    "ast": tiny_ast,
    "wav2vec2": tiny_wav2vec2,
    "whisper": tiny_whisper,
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "mlp": tiny_mlp,
}
"""Factory of each tiny model by family name."""


def example_inputs(name: str, model: nn.Module, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic keyword inputs for ``model(**inputs)``, drawn from a local generator.

    Args:
        name: A key of :data:`FAMILIES`.
        model: The model (used for its config where shapes depend on it).
        batch: Batch size.
        seed: Seed of the local ``torch.Generator``; the global RNG is never used.

    Returns:
        The keyword arguments of the model's forward.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    def randint(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=g)

    if name == "vit":
        return {"x": randn(batch, model.patch_embed.proj.in_channels, *model.patch_embed.img_size)}
    if name == "unet":
        return {
            "sample": randn(batch, 4, 8, 8),
            "timestep": randint(1000, batch),
            "encoder_hidden_states": randn(batch, 5, 32),
        }
    if name == "dit":
        return {
            "hidden_states": randn(batch, 4, 8, 8),
            "timestep": randint(1000, batch),
            "class_labels": randint(10, batch),
        }
    if name == "ast":
        return {"input_values": randn(batch, model.config.max_length, model.config.num_mel_bins)}
    if name == "wav2vec2":
        return {"input_values": randn(batch, 1600)}
    if name == "whisper":
        return {"input_features": randn(batch, model.config.num_mel_bins, 2 * model.config.max_source_positions)}
    if name in ("llama", "gpt2"):
        return {"input_ids": randint(model.config.vocab_size, batch, 8)}
    if name == "mlp":
        return {"x": randn(batch, 16)}
    raise KeyError(f"unknown family {name!r}; known: {sorted(FAMILIES)}")


def _output_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("logits", "sample"):
        value = getattr(out, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot pick an output tensor from {type(out).__name__}")


def forward(name: str, model: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Run ``model`` on :func:`example_inputs` and return its main output (logits or sample).

    Args:
        name: A key of :data:`FAMILIES`.
        model: The model.
        batch: Batch size.
        seed: Seed of the inputs.

    Returns:
        The logits (classifiers, LMs) or the denoised sample (UNet, DiT); gradients are tracked.
    """
    return _output_tensor(model(**example_inputs(name, model, batch=batch, seed=seed)))
