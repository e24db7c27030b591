"""Save and load LoRA adapters in peft's on-disk format, with safetensors only.

A saved adapter is a folder with

* ``adapter_model.safetensors``: tensors named as peft names them
  (``base_model.model.<layer>.lora_A.weight``, ``...lora_B.weight``, and
  ``base_model.model.<module>.<param>`` for ``modules_to_save``);
* ``adapter_config.json``: a peft ``LoraConfig`` (``peft_type: "LORA"``) whose ``target_modules``
  are the exact adapted layer names.

So ``peft.PeftModel.from_pretrained(model, folder)`` loads it onto the same base model (layer names
relative to the model the adapter was injected into). Internal names are converted to peft's only
here, at the boundary. Pickle files (``.bin``, ``.pt``) are never loaded.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lightning_peft.adapters.delta import is_delta_config, load_delta
from lightning_peft.adapters.fitting import AdapterMismatchError, check_fits
from lightning_peft.adapters.inject import (
    adapter_layers,
    inject_adapters,
    modules_to_save_tensors,
    remove_adapters,
)
from lightning_peft.adapters.lora import LoRAConfig
from lightning_peft.adapters.ssf import is_ssf_config, load_ssf
from lightning_peft.adapters.svd import AdaLoRAConfig, SVDLoRALayer
from lightning_peft.fileio import staged_dir

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterMismatchError",
    "adapter_state_dict",
    "load_adapter",
    "peft_config",
    "read_adapter_config",
    "read_json",
    "save_adapter",
    "write_adapter",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."


def adapter_state_dict(model: nn.Module, modules_to_save: list[str] | tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's names (detached, same device and dtype as the model).

    Args:
        model: a model with injected LoRA layers.
        modules_to_save: modules whose full parameters are saved too.
    """
    out: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model):
        if isinstance(layer, SVDLoRALayer):  # peft's AdaLoRA keeps raw Parameters: no ".weight"
            out[f"{_PREFIX}{name}.lora_A"] = layer.lora_A.detach()
            out[f"{_PREFIX}{name}.lora_B"] = layer.lora_B.detach()
            out[f"{_PREFIX}{name}.lora_E"] = layer.lora_E.detach()
            continue
        out[f"{_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach()
        out[f"{_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach()
    out.update(modules_to_save_tensors(model, modules_to_save, _PREFIX, "lora_"))
    return out


def peft_config(model: nn.Module, config: LoRAConfig, base_model: str | None = None) -> dict:
    """The peft ``adapter_config.json`` content describing ``model``'s LoRA layers."""
    layers = dict(adapter_layers(model))
    out: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(layers),
        "exclude_modules": None,
        "modules_to_save": list(config.modules_to_save) or None,
        "fan_in_fan_out": any(layer.kind == "conv1d" for layer in layers.values()),
        "bias": "none",
        "use_rslora": config.use_rslora,
        "use_dora": False,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    if isinstance(config, AdaLoRAConfig):
        del out["r"]  # peft's AdaLoRA reads init_r and warns about r
        if config.total_step is None:
            raise ValueError("an AdaLoRA adapter is exported with its total_step; set config.total_step first")
        out.update(
            peft_type="ADALORA",
            init_r=config.r,
            target_r=config.target_r,
            tinit=config.tinit,
            tfinal=config.tfinal,
            deltaT=config.deltaT,
            beta1=config.beta1,
            beta2=config.beta2,
            orth_reg_weight=config.orth_reg_weight,
            total_step=config.total_step,
            rank_pattern={
                f"{name}.lora_E": layer.kept
                for name, layer in layers.items()
                if isinstance(layer, SVDLoRALayer) and layer.kept is not None
            },
        )
    return out


def save_adapter(model: nn.Module, path: str | os.PathLike, config: LoRAConfig, base_model: str | None = None) -> Path:
    """Write the adapter of ``model`` to the folder ``path`` (created if needed), atomically.

    Args:
        model: a model with injected LoRA layers (names relative to it).
        path: destination folder; existing files of the same names are replaced, others kept.
        config: the config the adapters were injected with (its ``modules_to_save`` are saved in full).
        base_model: optional base-model reference written as ``base_model_name_or_path``.

    Returns:
        The folder.

    Raises:
        ValueError: the model has no LoRA layers.
    """
    return write_adapter(
        path, adapter_state_dict(model, config.modules_to_save), peft_config(model, config, base_model)
    )


def write_adapter(path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write already-collected adapter ``tensors`` and a peft ``config`` dict to the folder ``path``, atomically.

    The lower half of :func:`save_adapter`, for callers that gather the tensors themselves (e.g. from
    sharded parameters on several ranks) and write from one rank.
    """
    if not _layer_names(tensors):
        raise ValueError("no LoRA tensors to save; inject adapters first")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {"format": "pt", "library": "lightning-peft", "method": str(config.get("peft_type", "LORA")).lower()}
    with staged_dir(path) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata=metadata)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(path)


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        candidate = path / ADAPTER_WEIGHTS
        if candidate.is_file():
            return candidate
        pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
        hint = f" It holds {pickles}: pickle files are never loaded; re-save them as safetensors." if pickles else ""
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {path}.{hint}")
    if not path.exists():
        raise FileNotFoundError(f"adapter path {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{path} is not a .safetensors file; lightning-peft loads adapters from safetensors only and never "
            "unpickles .bin/.pt files. Convert a file you trust with "
            "safetensors.torch.save_file(torch.load(f, weights_only=True), out)."
        )
    return path


def read_json(file: str | os.PathLike) -> dict:
    """The JSON object in ``file``.

    Raises:
        ValueError: the file is not valid JSON (or not an object): names the file, the place, and says it is corrupt.
    """
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{file} is corrupt: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
            "re-create it or fetch the entry again"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{file} is corrupt: not UTF-8 text; re-create it or fetch the entry again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} is corrupt: it holds a JSON {type(data).__name__}, not an object")
    return data


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The ``adapter_config.json`` of an adapter folder (or beside an adapter file).

    Raises:
        FileNotFoundError: there is none.
        ValueError: it is not valid JSON (the message names the file).
    """
    path = Path(path)
    file = (path if path.is_dir() else path.parent) / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} beside the adapter at {path}")
    return read_json(file)


def config_from_peft(cfg: dict) -> LoRAConfig:
    """A config that re-creates the layers described by a peft LoRA or AdaLoRA ``adapter_config.json``."""
    kind = cfg.get("peft_type")
    if kind not in ("LORA", "ADALORA"):
        raise ValueError(f"adapter_config.json has peft_type={kind!r}; lightning-peft loads 'LORA' and 'ADALORA'")
    if cfg.get("alpha_pattern") or cfg.get("use_dora") or (kind == "LORA" and cfg.get("rank_pattern")):
        raise ValueError("rank_pattern/alpha_pattern LoRA and DoRA adapters are not supported by the loader yet")
    common = {
        "alpha": float(cfg["lora_alpha"]),
        "dropout": float(cfg.get("lora_dropout") or 0.0),
        "target_modules": cfg["target_modules"],
        "exclude_modules": cfg.get("exclude_modules"),
        "modules_to_save": list(cfg.get("modules_to_save") or []),
    }
    if kind == "ADALORA":
        return AdaLoRAConfig(
            r=int(cfg["init_r"]),
            target_r=int(cfg["target_r"]),
            tinit=int(cfg.get("tinit", 0)),
            tfinal=int(cfg.get("tfinal", 0)),
            deltaT=int(cfg.get("deltaT", 1)),
            beta1=float(cfg.get("beta1", 0.85)),
            beta2=float(cfg.get("beta2", 0.85)),
            orth_reg_weight=float(cfg.get("orth_reg_weight", 0.5)),
            total_step=cfg.get("total_step"),
            **common,
        )
    return LoRAConfig(r=int(cfg["r"]), use_rslora=bool(cfg.get("use_rslora", False)), **common)


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except SafetensorError as err:
        raise ValueError(
            f"{file} is not a valid safetensors file ({err}); re-save the adapter with save_adapter"
        ) from err


def load_adapter(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> LoRAConfig | None:
    """Load an adapter saved by :func:`save_adapter` (or by peft, for LoRA) into ``model``, in place.

    A weight-delta adapter (LISA, ID³, SaRA; see :mod:`.delta`) is applied to the base tensors instead; an SSF
    adapter (:mod:`.ssf`) gets its scale/shift layers.
    If ``model`` has no LoRA layers yet, they are injected first from ``adapter_config.json``. Every
    check runs before any weight is copied: a file that does not fit leaves the model unchanged.

    Args:
        model: the base model (the same architecture the adapter was trained on), with or without adapters.
        path: the adapter folder, or its ``.safetensors`` file.
        strict: require that the file covers every adapter tensor of the model.

    Returns:
        The config the layers were injected with, or None when the model already had adapters.

    Raises:
        ValueError: not a safetensors file, or a pickle-only folder.
        AdapterMismatchError: the file's tensors do not fit the model; names the first mismatch.
    """
    path = Path(path)
    file = _weights_file(path)
    tensors = _read_tensors(file)
    config_file = (path if path.is_dir() else path.parent) / ADAPTER_CONFIG
    cfg = read_json(config_file) if config_file.is_file() else None
    if cfg is not None and is_delta_config(cfg):
        load_delta(model, tensors, cfg)  # a weight delta (LISA, ID³, SaRA): applied to the base tensors
        return None
    if cfg is not None and is_ssf_config(cfg):
        load_ssf(model, tensors, cfg)  # SSF scale/shift layers (lightning_peft.adapters.ssf)
        return None
    injected: LoRAConfig | None = None
    modules_to_save: list[str] = []
    if not any(True for _ in adapter_layers(model)):
        if cfg is None:
            raise FileNotFoundError(f"no {ADAPTER_CONFIG} beside the adapter at {path}")
        injected = config_from_peft(cfg)
        _check_dtypes(tensors)
        _check_layers_exist(model, tensors)
        exact = "|".join(re.escape(n) for n in _layer_names(tensors))
        injected.target_modules = f"(?:{exact})"
        inject_adapters(model, injected, freeze=False)
        _apply_rank_pattern(model, cfg.get("rank_pattern") or {})
        modules_to_save = injected.modules_to_save
    elif cfg is not None:
        modules_to_save = list(cfg.get("modules_to_save") or [])
    try:
        _copy_into(model, tensors, modules_to_save, strict)
    except AdapterMismatchError:
        if injected is not None:  # leave the model as it came
            remove_adapters(model)
        raise
    return injected


def _layer_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    names = []
    for key in tensors:
        for suffix in (".lora_A.weight", ".lora_A"):
            if key.endswith(suffix):
                names.append(key[len(_PREFIX) : -len(suffix)])
    return names


def _apply_rank_pattern(model: nn.Module, rank_pattern: dict[str, list[bool]]) -> None:
    """Shrink freshly injected SVD layers to the triplets an AdaLoRA adapter kept (peft's ``rank_pattern``)."""
    for key, pattern in rank_pattern.items():
        layer = model.get_submodule(key.removesuffix(".lora_E"))
        if not isinstance(layer, SVDLoRALayer) or len(pattern) != layer.r:
            raise AdapterMismatchError(f"rank_pattern entry {key!r} does not fit the model's adapter layer")
        layer.shrink(torch.tensor(pattern, dtype=torch.bool))


def _check_dtypes(tensors: dict[str, torch.Tensor]) -> None:
    """Adapter weights are floating point: an integer or bool tensor is a corrupt or foreign file."""
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise AdapterMismatchError(
                f"tensor {key!r} has dtype {value.dtype} in the adapter: adapter weights are floating point, so "
                "the file is corrupt or not a LoRA adapter"
            )


def _check_layers_exist(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    modules = dict(model.named_modules())
    for name in _layer_names(tensors):
        if name not in modules:
            raise AdapterMismatchError(
                f"the adapter targets layer {name!r}, which {type(model).__name__} does not have: "
                "it was trained on another model (or on a wrapper of this one)"
            )


def _copy_into(model: nn.Module, tensors: dict[str, torch.Tensor], modules_to_save: list[str], strict: bool) -> None:
    merged = [name for name, layer in adapter_layers(model) if layer.merged]
    if merged:
        raise RuntimeError(f"{merged[0]} is merged; unmerge_adapters() before loading an adapter")
    expected = adapter_state_dict(model, modules_to_save)
    _check_dtypes(tensors)
    check_fits(tensors, expected, "LoRA", "another model or with another rank", strict=strict)
    with torch.no_grad():
        for key, value in tensors.items():
            expected[key].copy_(value.to(expected[key].dtype))
