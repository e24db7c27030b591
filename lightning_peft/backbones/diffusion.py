"""Diffusion presets: diffusers' UNet (down, mid and up blocks in that order) and DiT-style transformers."""

from __future__ import annotations

from lightning_peft.backbones.registry import Preset, register

_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")

register(
    Preset(
        family="diffusers-unet",
        target_modules=_ATTENTION,
        block_paths=("down_blocks+mid_block+up_blocks",),
        always_on=(
            "conv_in",
            "time_embedding",
            "class_embedding",
            "add_embedding",
            "encoder_hid_proj",
            "conv_norm_out",
            "conv_out",
        ),
    ),
    library="diffusers",
    classes=("UNet2DConditionModel",),
)

register(
    Preset(
        family="diffusers-dit",
        target_modules=(*_ATTENTION, "ff.net.0.proj", "ff.net.2"),
        block_paths=("transformer_blocks",),
        always_on=(
            "pos_embed",
            "norm",
            "proj_in",
            "adaln_single",
            "caption_projection",
            "norm_out",
            "scale_shift_table",
            "proj_out",
            "proj_out_1",
            "proj_out_2",
        ),
    ),
    library="diffusers",
    classes=("DiTTransformer2DModel", "Transformer2DModel", "PixArtTransformer2DModel"),
)
