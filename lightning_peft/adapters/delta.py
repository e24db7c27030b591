"""Weight-delta adapters: what methods that train the base weights themselves (LISA, ID³, SaRA) save.

Such a result is not a set of new layers but a change of some base tensors. It is saved in the
same two files as a LoRA adapter so the zoo, the model card and the loaders treat it alike:

* ``adapter_config.json`` with ``"peft_type": "LIGHTNING_PEFT_DELTA"`` (peft has no such type; peft
  will refuse to load it rather than load it wrongly), ``"delta_format"`` and ``"method"``;
* ``adapter_model.safetensors`` holding, by format,

  - ``"dense"`` (LISA): the new values of every base tensor that training changed, under the
    tensor's name in the model (``layers.3.mlp.fc1.weight``). Tensors that never trained are not
    written, so the file holds the changed blocks, not a copy of the model;
  - ``"sparse"`` (ID³, SaRA): for each changed tensor ``<name>.indices`` (int64 flat positions,
    strictly increasing) and ``<name>.values`` (float32 differences from the base values); tensors
    trained in full (``modules_to_save``, e.g. a new head) are listed in ``"dense_tensors"`` and
    stored whole under their own names.

Loading checks every name, shape and index before any weight is written, so a file that does not
fit leaves the model as it was. The base weights' fingerprint travels in the zoo manifest, and
the zoo checks it before loading, as for every adapter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import nn

from lightning_peft.fileio import staged_dir

__all__ = [
    "DELTA_TYPE",
    "apply_dense_delta",
    "delta_config",
    "is_delta_config",
    "load_delta",
    "write_delta",
]

DELTA_TYPE = "LIGHTNING_PEFT_DELTA"
_WEIGHTS = "adapter_model.safetensors"
_CONFIG = "adapter_config.json"


def delta_config(
    method: str,
    delta_format: Literal["dense", "sparse"],
    tensors: list[str],
    hyperparameters: dict[str, Any] | None = None,
    base_model: str | None = None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` of a weight-delta adapter."""
    if delta_format not in ("dense", "sparse"):
        raise ValueError(f"delta_format must be 'dense' or 'sparse', got {delta_format!r}")
    return {
        "peft_type": DELTA_TYPE,
        "delta_format": delta_format,
        "method": method,
        "tensors": sorted(tensors),
        "hyperparameters": hyperparameters or {},
        "base_model_name_or_path": base_model,
    }


def is_delta_config(config: dict[str, Any]) -> bool:
    """Whether an ``adapter_config.json`` describes a weight delta rather than LoRA layers."""
    return config.get("peft_type") == DELTA_TYPE


def write_delta(path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write a weight-delta adapter into the folder ``path`` atomically (a temporary folder, then a rename).

    Raises:
        ValueError: ``config`` is not a delta config, or there is nothing to save.
    """
    if not is_delta_config(config):
        raise ValueError(f"write_delta needs a config from delta_config(), got peft_type={config.get('peft_type')!r}")
    if not tensors:
        raise ValueError(
            f"the {config.get('method')} run changed no tensor, so there is no delta to save; did training run?"
        )
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {"format": "pt", "library": "lightning-peft", "method": str(config.get("method"))}
    with staged_dir(path) as tmp:
        save_file(tensors, str(tmp / _WEIGHTS), metadata=metadata)
        (tmp / _CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(path)


def _check_dense(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's tensors a dense delta writes to, after checking every name, shape and dtype."""
    own: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    own.update(model.named_buffers(remove_duplicate=False))
    for name, value in tensors.items():
        if name not in own:
            raise ValueError(
                f"the delta has tensor {name!r}, which {type(model).__name__} does not have: it was trained on "
                "another model (or on a wrapper of this one)"
            )
        if tuple(value.shape) != tuple(own[name].shape):
            raise ValueError(
                f"tensor {name!r} has shape {tuple(value.shape)} in the delta but {tuple(own[name].shape)} in the model"
            )
        if not value.is_floating_point():
            raise ValueError(f"tensor {name!r} of the delta is {value.dtype}; a dense delta holds floating tensors")
    return own


def apply_dense_delta(model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Overwrite ``model``'s tensors with a dense delta's values; every name and shape is checked first.

    Returns:
        The names written.

    Raises:
        ValueError: a name the model does not have, or a shape that differs (nothing is written then).
    """
    own = _check_dense(model, tensors)
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value.to(own[name].dtype))
    return sorted(tensors)


def load_delta(model: nn.Module, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> list[str]:
    """Apply a delta adapter's tensors (read from its safetensors file) to a plain base model.

    Returns:
        The names of the changed tensors.
    """
    kind = config.get("delta_format")
    if kind == "dense":
        return apply_dense_delta(model, tensors)
    if kind == "sparse":
        from lightning_peft.adapters.sparse import apply_sparse_delta

        dense_names = set(config.get("dense_tensors") or [])
        dense = {k: v for k, v in tensors.items() if k in dense_names}
        sparse = {k: v for k, v in tensors.items() if k not in dense_names}
        missing = dense_names - set(dense)
        if missing:
            raise ValueError(f"adapter_config.json lists dense tensors the file lacks: {sorted(missing)[:3]}")
        _check_dense(model, dense)
        changed = apply_sparse_delta(model, sparse)  # checks all of its input before writing
        return sorted(set(changed) | set(apply_dense_delta(model, dense)))
    raise ValueError(f"adapter_config.json has delta_format={kind!r}; this version reads 'dense' and 'sparse'")
