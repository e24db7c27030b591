"""Per-family backbone presets: what to adapt, where the repeated blocks are, what stays trainable.

A *preset* is the small amount of knowledge about a model family that every method needs and that
a user should not have to type: the default LoRA ``target_modules``, the dotted path of the
``nn.ModuleList`` that holds the repeated blocks (what LISA samples from, what AdaLoRA reports ranks
per), the modules LISA keeps trainable all the time (embeddings, final norm, head) and the task head.

Detection never imports ``transformers``, ``timm`` or ``diffusers``: it looks at class names, their
``__module__`` and, for transformers, at ``model.config.model_type``. It recognises the model *root*
(any head class: ``LlamaForCausalLM`` and ``LlamaModel`` are both ``hf-llama``);
:func:`find_backbone` finds that root inside a wrapper such as a ``LightningModule``.

Families and their defaults (``target_modules`` use peft list semantics: an entry ``t`` matches a
module name ``n`` iff ``n == t`` or ``n.endswith("." + t)``):

==================  ===========================================  =======================================
family              target_modules                               block_paths (first that exists wins)
==================  ===========================================  =======================================
``timm-vit``        attn.qkv, attn.proj, mlp.fc1, mlp.fc2        blocks
``diffusers-unet``  to_q, to_k, to_v, to_out.0                   down_blocks+mid_block+up_blocks
``diffusers-dit``   to_q, to_k, to_v, to_out.0, ff.net.0.proj,   transformer_blocks
                    ff.net.2
``hf-ast``          q_proj, k_proj, v_proj, o_proj, mlp.fc1,     audio_spectrogram_transformer.layers,
                    mlp.fc2  (transformers >= 5)                 layers
``hf-ast``          query, key, value, attention.output.dense,   audio_spectrogram_transformer.encoder
                    intermediate.dense, output.dense (< 5)       .layer, encoder.layer
``hf-wav2vec2``     q_proj, k_proj, v_proj, out_proj,            wav2vec2.encoder.layers, encoder.layers
                    feed_forward.intermediate_dense,
                    feed_forward.output_dense
``hf-whisper``      q_proj, k_proj, v_proj, out_proj, fc1, fc2   encoder.layers, model.encoder.layers,
                                                                 layers
``hf-llama``        q_proj, k_proj, v_proj, o_proj, gate_proj,   model.layers, layers
                    up_proj, down_proj
``hf-phi3``         qkv_proj, o_proj, gate_up_proj, down_proj    model.layers, layers
``hf-gpt2``         c_attn, c_proj, c_fc (``Conv1D``)            transformer.h, h
==================  ===========================================  =======================================

``hf-llama`` covers ``model_type`` llama, mistral, qwen2, qwen3, gemma and gemma2 (same layout);
``hf-whisper`` targets match the decoder too when the model has one, but its blocks are the encoder
layers. A family may have several layouts (AST changed its module names in transformers 5); the
layout whose block path exists in the model is picked. For a UNet the blocks are the down blocks,
the mid block and the up blocks, in that order. For a model no preset knows, :func:`find_blocks`
falls back to the largest ``nn.ModuleList`` of at least two children of one type.

Overriding: every callback takes ``target_modules=...`` (a list, or a regex string that is
``re.fullmatch``-ed), ``block_path="dotted.path.to.ModuleList"`` and the names to keep trainable;
an explicit value always wins over the preset. ``block_path`` may join several paths with ``"+"``.

Layout (one file per group of families, one table, as peft keeps a mapping per model type and
timm a file per architecture):

- ``registry.py``: :class:`Preset`, the table :data:`PRESETS`,
  :func:`~lightning_peft.backbones.registry.register` and the lookups that read the table
  (:func:`detect_preset`, :func:`find_backbone`, :func:`default_target_modules`, :func:`find_blocks`);
- ``blocks.py``: what is found in a model without knowing its family: :class:`Blocks`,
  :class:`NoBlocksError`, following a block path, the fallback list of blocks, :func:`resolve_always_on`;
- ``vit.py`` (timm), ``diffusion.py`` (diffusers), ``audio.py`` and ``llm.py`` (transformers): each
  calls ``register(...)`` once per family with its presets and the classes or ``model_type`` values
  it recognises.

Adding a family is adding such a module, its name in ``_FAMILY_MODULES`` below (modules register in
that order, the order of :data:`PRESETS`) and its row in the table above.

Example:
    >>> from torch import nn
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
    >>> detect_preset(Net()) is None
    True
    >>> find_blocks(Net()).names
    ('layers.0', 'layers.1', 'layers.2')
"""

from __future__ import annotations

from importlib import import_module

from lightning_peft.backbones.blocks import Blocks, NoBlocksError, resolve_always_on
from lightning_peft.backbones.registry import (
    PRESETS,
    Preset,
    default_target_modules,
    detect_preset,
    find_backbone,
    find_blocks,
)

__all__ = [
    "PRESETS",
    "Blocks",
    "NoBlocksError",
    "Preset",
    "default_target_modules",
    "detect_preset",
    "find_backbone",
    "find_blocks",
    "resolve_always_on",
]

#: the family modules, imported (so registered) in this order: the order of PRESETS and of class detection
_FAMILY_MODULES = ("vit", "diffusion", "audio", "llm")

for _module in _FAMILY_MODULES:
    import_module(f"{__name__}.{_module}")
del _module
