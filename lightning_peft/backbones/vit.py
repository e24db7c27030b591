"""Vision presets: timm's ``VisionTransformer`` and its subclasses."""

from __future__ import annotations

from lightning_peft.backbones.registry import Preset, register

register(
    Preset(
        family="timm-vit",
        target_modules=("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
        block_paths=("blocks",),
        always_on=("patch_embed", "cls_token", "reg_token", "pos_embed", "norm", "fc_norm", "attn_pool", "head"),
        head=("head",),
        groups=(
            ("attention", ("attn.qkv", "attn.proj")),
            ("feed_forward", ("mlp.fc1", "mlp.fc2")),
            ("norm", ("norm1", "norm2")),
        ),
    ),
    library="timm",
    classes=("VisionTransformer",),
)
