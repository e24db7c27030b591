"""LoRA/AdaLoRA layers of a diffusers UNet written as diffusers' own LoRA file, for ``pipe.load_lora_weights``.

diffusers reads ``pytorch_lora_weights.safetensors`` with peft-style keys under the component's prefix
(``unet.<module>.lora_A.weight`` / ``.lora_B.weight``) and a ``lora_adapter_metadata`` JSON (a peft
``LoraConfig``) in the safetensors header; it builds peft LoRA layers from that config. Two things of ours
have no place there and are folded in at the boundary, exactly: the ``alpha / r`` scaling goes into ``B``
(and ``lora_alpha`` is written equal to each layer's rank, so diffusers scales by 1), and an AdaLoRA
triplet ``B · diag(E) · A`` becomes ``B · (diag(E) · A)``, a plain LoRA pair of the kept rank (per-layer ranks
go to ``rank_pattern`` / ``alpha_pattern``). The file is written by diffusers' own
``StableDiffusionLoraLoaderMixin.save_lora_weights``, so the key and metadata layout is diffusers'.

Only UNets load LoRA through a diffusers pipeline: ``DiTTransformer2DModel`` has no ``PeftAdapterMixin``
and ``DiTPipeline`` no LoRA loader; export a DiT's LoRA merged instead (:func:`lightning_peft.export`).
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_peft.adapters.inject import adapter_layers
from lightning_peft.adapters.svd import SVDLoRALayer
from lightning_peft.fileio import staged_dir

__all__ = ["DIFFUSERS_LORA_WEIGHTS", "diffusers_lora_state_dict", "save_diffusers_lora"]

DIFFUSERS_LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


@torch.no_grad()
def diffusers_lora_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The LoRA pairs of ``model`` (scaling folded into ``B``), unprefixed, and their peft ``LoraConfig`` metadata.

    Raises:
        ValueError: the model has no LoRA layers, or a layer wraps a transformers ``Conv1D`` (not in diffusers).
    """
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, layer in adapter_layers(model):
        if layer.kind == "conv1d":
            raise ValueError(f"{name} wraps a transformers Conv1D, which diffusers' LoRA layers do not hold")
        a, b = layer.lora_A.float(), layer.lora_B.float() * layer.scaling
        if isinstance(layer, SVDLoRALayer):
            a = a * layer.lora_E.float().view(-1, *([1] * (a.dim() - 1)))
        if layer.r == 0:  # AdaLoRA pruned every triplet: nothing to load
            continue
        dtype = layer.lora_A.dtype
        tensors[f"{name}.lora_A.weight"] = a.to(dtype).contiguous().cpu()
        tensors[f"{name}.lora_B.weight"] = b.to(dtype).contiguous().cpu()
        ranks[name] = layer.r
    if not ranks:
        raise ValueError(
            "the model has no LoRA layers (with a rank above 0) to write; diffusers' load_lora_weights reads LoRA "
            "only, so export a LISA, ID3 or SaRA result merged (lightning_peft.export)"
        )
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: rank for name, rank in ranks.items() if rank != r}
    metadata = {
        "r": r,
        "lora_alpha": r,  # the scaling is in B already
        "target_modules": sorted(ranks),
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "lora_dropout": 0.0,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
    }
    return tensors, metadata


def save_diffusers_lora(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the LoRA of a UNet (``pipe.unet`` with our LoRA layers) for ``pipe.load_lora_weights(path)``, atomically.

    Example:
        >>> save_diffusers_lora(unet, "out/")  # doctest: +SKIP
        >>> pipe.load_lora_weights("out/")  # doctest: +SKIP

    Raises:
        ValueError: no LoRA layers, or a layer diffusers cannot hold.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    tensors, metadata = diffusers_lora_state_dict(model)
    with staged_dir(path) as tmp:
        layers: dict[str, Any] = dict(tensors)  # diffusers types it as modules or tensors
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            tmp, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata, weight_name=DIFFUSERS_LORA_WEIGHTS
        )
    return Path(path)
