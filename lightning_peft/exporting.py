"""Merge any method's result into its base model and write a plain model in the backbone's own format.

:func:`export` (``lightning_peft.export``) takes a trained model (LoRA/AdaLoRA layers, sparse delta layers, or a
LISA-trained plain model), or a saved result (a zoo entry name, an entry folder, a callback's ``save_dir``) plus
the base model it was trained on, applies the result onto the base weights, and writes a model that
its family's own loader reads with no lightning-peft installed:

==========================  =====================================  ====================================================
model                       files written                          read back with
==========================  =====================================  ====================================================
transformers PreTrainedModel  ``save_pretrained``: config.json,    ``AutoModel...`` / ``<Class>.from_pretrained(dir)``
                            model.safetensors
diffusers ModelMixin        ``save_pretrained``: config.json,      ``UNet2DConditionModel.from_pretrained(dir)`` ...
(UNet, DiT, ...)            diffusion_pytorch_model.safetensors
timm (``timm.create_model``)  ``timm.models.save_for_hf``:          ``timm.create_model("local-dir:" + dir,
                            config.json, model.safetensors         pretrained=True)`` (or ``hf-hub:`` once pushed)
any other ``nn.Module``     model.safetensors (the state_dict)     ``safetensors.torch.load_model(model, file)``
==========================  =====================================  ====================================================

Order of work: the result's files are verified and the base fingerprint is checked before any weight is
touched (:func:`lightning_peft.zoo.load_folder`); the result is loaded with the same code as
:func:`lightning_peft.adapters.load_adapter` (LoRA/AdaLoRA layers injected then merged; LISA's and HFT's dense delta
and ID³/SaRA's sparse delta written into the base tensors); the model is written into a temporary folder
beside ``out_dir`` that is renamed into place (:func:`lightning_peft.fileio.staged_dir`). On any error
nothing is left in ``out_dir``.

Example:
    >>> import tempfile, pathlib
    >>> from torch import nn
    >>> from lightning_peft.adapters import LoRAConfig, inject_adapters
    >>> net = nn.Sequential(nn.Linear(4, 4))
    >>> _ = inject_adapters(net, LoRAConfig(r=2, target_modules=["0"]))
    >>> out = export(net, pathlib.Path(tempfile.mkdtemp()) / "merged")
    >>> sorted(p.name for p in out.iterdir())
    ['model.safetensors']
"""

from __future__ import annotations

import copy
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

from torch import nn

from lightning_peft._deps import require
from lightning_peft.adapters import adapter_layers, load_adapter, read_adapter_config, remove_adapters
from lightning_peft.adapters.serialization import read_json
from lightning_peft.adapters.sparse import remove_sparse, sparse_layers
from lightning_peft.adapters.ssf import remove_ssf, ssf_layers
from lightning_peft.fileio import staged_dir

__all__ = ["FORMATS", "export", "load_base", "merged_model", "native_format", "save_native"]

Format = Literal["auto", "transformers", "diffusers", "timm", "safetensors", "diffusers-lora", "peft-shira"]
FORMATS: tuple[str, ...] = ("auto", "transformers", "diffusers", "timm", "safetensors", "diffusers-lora", "peft-shira")
_UNMERGED = ("diffusers-lora", "peft-shira")  # formats that keep the result apart from the base weights


def export(
    source: nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    base: nn.Module | str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    zoo: Any = None,
    format: Format = "auto",
    allow_base_mismatch: bool = False,
) -> Path:
    """Apply a result onto its base model and write the merged model in its native format (see the module docstring).

    Args:
        source: a trained model (merged in a copy; the model is left as it is), or a saved result: an entry
            folder (with ``lightning_peft.json``), an adapter folder (a callback's ``save_dir``), or a zoo entry
            name (a local name or a Hub ``org/repo``).
        out_dir: a new (or empty) folder for the exported model.
        base: with a saved result, the base model it was trained on: a module (the result is merged into it
            in place, as peft's ``merge_and_unload``), a local model folder, or a Hub id (see :func:`load_base`).
        revision: the zoo entry's revision.
        zoo: the zoo to read a name from (a ``LocalZoo``/``HubZoo``, ``"local"`` or ``"hub"``).
        format: ``"auto"`` (by the model's class), or one of ``transformers``, ``diffusers``, ``timm``,
            ``safetensors`` (a plain state_dict, for any module); ``diffusers-lora`` writes a UNet's LoRA unmerged,
            for a pipeline's ``load_lora_weights`` (:mod:`lightning_peft.adapters.diffusers_lora`); ``peft-shira``
            writes an ID³/SaRA result as a peft SHiRA adapter, for ``PeftModel.from_pretrained``
            (:mod:`lightning_peft.adapters.shira`).
        allow_base_mismatch: apply the result even if the base weights' fingerprint differs.

    Returns:
        ``out_dir``.

    Raises:
        FingerprintMismatchError: ``base`` is not the model the result was trained on (nothing is written).
        FileExistsError: ``out_dir`` exists and is not empty.
        ValueError: a saved result without ``base``, or a format the model cannot be written in.
    """
    target = _check_out_dir(out_dir)
    if format == "diffusers-lora":
        from lightning_peft.adapters.diffusers_lora import save_diffusers_lora

        return save_diffusers_lora(_backbone(_with_result(source, base, revision, zoo, allow_base_mismatch)[0]), target)
    if format == "peft-shira":
        return _export_shira(source, target, base, revision, zoo, allow_base_mismatch)
    model = merged_model(source, base, revision=revision, zoo=zoo, allow_base_mismatch=allow_base_mismatch)
    return save_native(model, target, format)


def merged_model(
    source: nn.Module | str | os.PathLike,
    base: nn.Module | str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    zoo: Any = None,
    allow_base_mismatch: bool = False,
) -> nn.Module:
    """The plain model with the result folded into its weights (arguments as :func:`export`)."""
    if isinstance(source, nn.Module):
        _with_result(source, base, revision, zoo, allow_base_mismatch)
        return _merge(copy.deepcopy(_backbone(source)))
    return _merge(_with_result(source, base, revision, zoo, allow_base_mismatch)[0])


def _export_shira(
    source: nn.Module | str | os.PathLike,
    target: Path,
    base: nn.Module | str | os.PathLike | None,
    revision: str | None,
    zoo: Any,
    allow_base_mismatch: bool,
) -> Path:
    """Write an ID³/SaRA result as a peft SHiRA adapter (:mod:`lightning_peft.adapters.shira`), atomically."""
    from safetensors.torch import save_file

    from lightning_peft.adapters.serialization import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from lightning_peft.adapters.shira import shira_files
    from lightning_peft.adapters.sparse import sparse_state_dict

    model, folder = _with_result(source, base, revision, zoo, allow_base_mismatch)
    if folder is None:  # a trained model: its sparse layers, and what trains in full beside them
        backbone = _backbone(model)
        sparse = sparse_state_dict(backbone)
        if not sparse:
            raise ValueError(_NOT_SPARSE.format(what="this model has no sparse layers (ID³/SaRA/SpIEL)"))
        bank = {id(p) for _, layer in sparse_layers(backbone) for p in layer.parameters()}
        dense = [n for n, p in backbone.named_parameters() if p.requires_grad and id(p) not in bank]
        merged = _merge(copy.deepcopy(backbone))
        base_name = None
    else:
        config = read_adapter_config(folder)
        if config.get("delta_format") != "sparse":
            raise ValueError(_NOT_SPARSE.format(what=f"{folder} holds a {config.get('method', 'LoRA')} result"))
        from safetensors.torch import load_file

        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
        dense = list(config.get("dense_tensors") or [])
        sparse = {k: v for k, v in tensors.items() if k not in dense}
        merged, base_name = model, config.get("base_model_name_or_path")
    peft_config, peft_tensors = shira_files(merged, sparse, dense, base_name)
    with staged_dir(target) as tmp:
        save_file(peft_tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    return target


_NOT_SPARSE = (
    "format='peft-shira' writes sparse results (ID³, SaRA, SpIEL), but {what}: a LoRA/AdaLoRA result is a peft adapter "
    "already, and a LISA or HFT result is dense; export merged (format='auto') instead"
)


def _with_result(
    source: nn.Module | str | os.PathLike,
    base: nn.Module | str | os.PathLike | None,
    revision: str | None,
    zoo: Any,
    allow_base_mismatch: bool,
) -> tuple[nn.Module, Path | None]:
    """``source`` itself (a trained model), or the base with the saved result loaded (adapters not merged), and the
    result's folder (None for a trained model)."""
    if isinstance(source, nn.Module):
        if base is not None:
            raise ValueError("pass base= only with a saved result; a trained model already holds its base weights")
        return source, None
    if base is None:
        raise ValueError(
            f"exporting the saved result {str(source)!r} needs base=: the model it was trained on (a module, a local "
            "model folder or a Hub id)"
        )
    model = load_base(base) if isinstance(base, str | os.PathLike) else base
    folder = Path(source)
    if folder.is_dir() and not (folder / "lightning_peft.json").is_file():
        read_adapter_config(folder)  # a clear error for a folder that holds no result
        warnings.warn(
            f"{folder} is not a zoo entry (no lightning_peft.json), so the base weights' fingerprint cannot be "
            "checked; only names and shapes are",
            stacklevel=2,
        )
        load_adapter(model, folder)
    else:
        from lightning_peft import zoo as zoo_api

        if not folder.is_dir():
            folder = zoo_api.download(str(source), revision, zoo=zoo)
        zoo_api.load_folder(model, folder, allow_base_mismatch=allow_base_mismatch)
    return model, folder


def _backbone(model: nn.Module) -> nn.Module:
    """The backbone inside a LightningModule (what has a native format); any other module as it is."""
    if not any(cls.__name__ == "LightningModule" for cls in type(model).__mro__):
        return model
    from lightning_peft.backbones import find_backbone

    found = find_backbone(model)
    return model.get_submodule(found[0]) if found else model


def _merge(model: nn.Module) -> nn.Module:
    """Fold LoRA/AdaLoRA layers and sparse delta layers into their base weights and unwrap them."""
    if any(True for _ in adapter_layers(model)):
        remove_adapters(model, merge=True)
    if any(True for _ in sparse_layers(model)):
        remove_sparse(model, merge=True)
    if any(True for _ in ssf_layers(model)):
        remove_ssf(model, merge=True)  # scale and shift folded into the preceding layer
    return model


def _check_out_dir(out_dir: str | os.PathLike) -> Path:
    target = Path(out_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not an empty folder: export into a new or empty folder")
    return target


def _is(model: nn.Module, library: str, cls: str) -> bool:
    """``isinstance(model, library.cls)`` without importing ``library`` (it is loaded if the model is one of its)."""
    module = sys.modules.get(library)
    return module is not None and isinstance(model, getattr(module, cls))


def native_format(model: nn.Module) -> str:
    """The format :func:`save_native` picks for ``model``: its library's own, else a plain safetensors state_dict."""
    if _is(model, "transformers", "PreTrainedModel"):
        return "transformers"
    if _is(model, "diffusers", "ModelMixin"):
        return "diffusers"
    if type(model).__module__.startswith("timm."):
        return "timm"
    return "safetensors"


def save_native(model: nn.Module, out_dir: str | os.PathLike, format: Format = "auto") -> Path:
    """Write ``model`` (a plain model, no adapter layers) into ``out_dir`` in ``format``, atomically.

    Raises:
        ValueError: ``model`` still has adapter layers, or it cannot be written in ``format`` (e.g. a timm model
            not built by ``timm.create_model``, whose architecture timm could not rebuild).
    """
    if any(True for _ in adapter_layers(model)) or any(True for _ in sparse_layers(model)) or any(ssf_layers(model)):
        raise ValueError("save_native writes a plain model; merge the adapters first (merged_model / export)")
    if format not in FORMATS or format in _UNMERGED:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    chosen = native_format(model) if format == "auto" else format
    if chosen != "safetensors" and chosen != native_format(model):
        raise ValueError(
            f"{type(model).__name__} is not a {chosen} model; format='safetensors' writes its state_dict instead"
        )
    if chosen == "timm" and not getattr(model, "pretrained_cfg", None):
        raise ValueError(
            f"this timm {type(model).__name__} was not made by timm.create_model, so it has no pretrained_cfg naming "
            "its architecture and timm could not rebuild it from the export: create the base with "
            "timm.create_model(name, **kwargs), or pass format='safetensors' for its state_dict"
        )
    target = _check_out_dir(out_dir)
    with staged_dir(target) as tmp:
        if chosen in ("transformers", "diffusers"):
            model.save_pretrained(tmp)  # type: ignore[operator]
        elif chosen == "timm":
            from timm.models import save_for_hf

            save_for_hf(model, str(tmp), safe_serialization=True)
        else:
            from safetensors.torch import save_model

            save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt", "class": type(model).__name__})
    return target


def load_base(spec: str | os.PathLike) -> nn.Module:
    """Load a base model by its library's own loader, from a local folder or a Hub id.

    The library is read from the folder's ``config.json``: ``_class_name`` (diffusers), ``architecture`` with
    ``pretrained_cfg`` (timm), ``architectures`` / ``model_type`` (transformers). ``timm:NAME`` creates the
    pretrained timm model ``NAME``. A Hub id is looked up through the huggingface_hub cache (``HF_HUB_OFFLINE=1``
    works once downloaded).

    Raises:
        ValueError: the folder is a diffusers pipeline (pass its component folder, e.g. ``<dir>/unet``) or its
            config names no library this knows.
    """
    spec = str(spec)
    if spec.startswith("timm:"):
        import timm

        return timm.create_model(spec.removeprefix("timm:"), pretrained=True)
    local = Path(spec)
    if local.is_dir():
        if (local / "model_index.json").is_file():
            raise ValueError(
                f"{spec} is a diffusers pipeline; pass the folder of the model trained on (e.g. {spec}/unet)"
            )
        config_file = local / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        config_file = Path(hf_hub_download(spec, "config.json"))
    config = read_json(config_file)
    if "_class_name" in config:
        import diffusers

        return getattr(diffusers, config["_class_name"]).from_pretrained(spec)
    if "architecture" in config and "pretrained_cfg" in config:
        import timm

        return timm.create_model(("local-dir:" if local.is_dir() else "hf-hub:") + spec, pretrained=True)
    if "architectures" in config or "model_type" in config:
        transformers = require("transformers", f"loading the transformers model {spec}")
        names = config.get("architectures") or ["AutoModel"]
        return getattr(transformers, names[0]).from_pretrained(spec)
    raise ValueError(f"{config_file} names no model library lightning-peft knows (diffusers, timm, transformers)")
