"""SSF (Scale and Shift Features, Lian et al., NeurIPS 2022): a learned per-channel scale and shift after a layer.

An :class:`SSFLayer` wraps a frozen ``nn.Linear``, ``nn.Conv2d``, transformers ``Conv1D`` or ``nn.LayerNorm`` (kept as
``base_layer``, as a LoRA layer keeps its base) and returns ``y = ssf_scale * base(x) + ssf_shift`` over the output
channels: the last dimension for Linear / Conv1D / LayerNorm outputs, dimension 1 for a Conv2d's ``(B, C, H, W)``.
Merging folds it into the base layer, so the exported model costs nothing more at inference::

    W' = diag(scale) W        b' = scale * b + shift        (LayerNorm: weight' = scale * w, bias' = scale * b + shift)

Deliberate deviations from the reference code (``dongzelian/SSF``, ``models/vision_transformer.py``:
``init_ssf_scale_shift`` and ``ssf_ada``):

* the channel dimension is fixed by the layer kind, not guessed from shapes (``ssf_ada`` takes the last dimension
  when its size equals the channel count, else dimension 1, which is ambiguous for a tensor whose last dimension
  happens to equal the channel count);
* the default init is the identity (scale 1, shift 0: the model starts exactly as the base); ``init="normal"`` is the
  reference's ``N(1, 0.02)`` / ``N(0, 0.02)``;
* a base layer without a bias (``bias=False``) or a LayerNorm without ``elementwise_affine`` is refused: the shift
  (or the scale) would have nowhere to be merged into without adding a tensor the plain model does not have;
* SSF parameters take the base layer's dtype (no float32 autocast as LoRA's); quantized bases are refused (a merge
  would have to re-quantize).

Saved (:func:`write_ssf`) like a LoRA adapter: ``adapter_model.safetensors`` with ``base_model.model.<layer>.ssf_scale``
/ ``.ssf_shift`` (and ``modules_to_save`` in full) and an ``adapter_config.json`` with ``"peft_type":
"LIGHTNING_PEFT_SSF"`` (peft has no SSF: it refuses the file rather than load it wrongly).
:func:`lightning_peft.adapters.load_adapter` reads it back onto a plain base.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    >>> inject_ssf(net, SSFConfig(target_modules=["0", "1"]))
    ['0', '1']
    >>> sum(p.numel() for p in net.parameters() if p.requires_grad)
    16
"""

from lightning_peft.adapters.ssf.layer import (
    SSF_TYPE,
    VIT_TARGETS,
    SSFConfig,
    SSFInit,
    SSFLayer,
    inject_ssf,
    mark_ssf_trainable,
    merge_ssf,
    remove_ssf,
    ssf_layers,
)
from lightning_peft.adapters.ssf.saving import is_ssf_config, load_ssf, ssf_config, ssf_state_dict, write_ssf

__all__ = [
    "SSF_TYPE",
    "VIT_TARGETS",
    "SSFConfig",
    "SSFInit",
    "SSFLayer",
    "inject_ssf",
    "is_ssf_config",
    "load_ssf",
    "mark_ssf_trainable",
    "merge_ssf",
    "remove_ssf",
    "ssf_config",
    "ssf_layers",
    "ssf_state_dict",
    "write_ssf",
]
