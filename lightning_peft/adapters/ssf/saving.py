"""Saving and loading SSF adapters: the tensors under peft-style names, ``adapter_config.json``, atomic writes."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lightning_peft.adapters.fitting import check_fits
from lightning_peft.adapters.inject import modules_to_save_tensors
from lightning_peft.adapters.ssf.layer import _PREFIX, SSF_TYPE, SSFConfig, inject_ssf, remove_ssf, ssf_layers
from lightning_peft.fileio import staged_dir


def ssf_state_dict(model: nn.Module, modules_to_save: list[str] | tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The SSF tensors (``base_model.model.<layer>.ssf_scale`` / ``.ssf_shift``) and ``modules_to_save``, detached."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in ssf_layers(model):
        out[f"{_PREFIX}{name}.ssf_scale"] = layer.ssf_scale.detach()
        out[f"{_PREFIX}{name}.ssf_shift"] = layer.ssf_shift.detach()
    out.update(modules_to_save_tensors(model, modules_to_save, _PREFIX, "ssf_"))
    return out


def ssf_config(model: nn.Module, config: SSFConfig, base_model: str | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` content of ``model``'s SSF layers (their exact names as ``target_modules``)."""
    return {
        "peft_type": SSF_TYPE,
        "method": "ssf",
        "base_model_name_or_path": base_model,
        "target_modules": [n for n, _ in ssf_layers(model)],
        "modules_to_save": list(config.modules_to_save) or None,
        "init": config.init,
    }


def is_ssf_config(config: dict[str, Any]) -> bool:
    """Whether an ``adapter_config.json`` describes SSF layers."""
    return config.get("peft_type") == SSF_TYPE


def write_ssf(path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write already-collected SSF ``tensors`` and their ``config`` into the folder ``path``, atomically.

    Raises:
        ValueError: ``config`` is no SSF config, or there is no SSF tensor.
    """
    if not is_ssf_config(config):
        raise ValueError(f"write_ssf needs a config from ssf_config(), got peft_type={config.get('peft_type')!r}")
    if not any(k.endswith(".ssf_scale") for k in tensors):
        raise ValueError("no SSF tensors to save; inject SSF layers first")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with staged_dir(path) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt", "method": "ssf"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(path)


def load_ssf(model: nn.Module, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> list[str]:
    """Put a saved SSF adapter (its tensors and ``adapter_config.json``) onto ``model``, injecting the layers if needed.

    Every name and shape is checked before a weight is copied; a file that does not fit leaves the model as it was.

    Returns:
        The names of the SSF layers.

    Raises:
        ValueError: a tensor the model has no place for, a shape that differs, or a missing tensor.
    """
    modules_to_save = list(config.get("modules_to_save") or [])
    injected = False
    if not any(True for _ in ssf_layers(model)):
        names = list(config.get("target_modules") or [])
        missing = [n for n in names if n not in dict(model.named_modules())]
        if missing:
            raise ValueError(
                f"the SSF adapter targets layer {missing[0]!r}, which {type(model).__name__} does not have: it was "
                "trained on another model (or on a wrapper of this one)"
            )
        exact = "(?:" + "|".join(re.escape(n) for n in names) + ")"
        inject_ssf(model, SSFConfig(target_modules=exact, modules_to_save=modules_to_save), freeze=False)
        injected = True
    expected = ssf_state_dict(model, modules_to_save)
    try:
        check_fits(tensors, expected, "SSF", "another model")
    except ValueError:
        if injected:
            remove_ssf(model)
        raise
    with torch.no_grad():
        for key, value in tensors.items():
            expected[key].copy_(value.to(expected[key].dtype))
    return [n for n, _ in ssf_layers(model)]
