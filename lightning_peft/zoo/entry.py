"""A zoo entry: one folder that says what an adapter is, what it was trained on, and proves its files.

Files of an entry:

* ``adapter_model.safetensors`` + ``adapter_config.json``: the adapter (peft's format for LoRA/AdaLoRA);
* ``lightning_peft.json``: the manifest: method, hyper-parameters, schedule outcome (AdaLoRA's rank
  pattern), base-model reference and weight fingerprint, metrics, library versions, and the sha256 of
  every other file in the entry;
* ``config.yaml``: the LightningCLI config that produced it, when there was one;
* ``README.md``: a model card (``huggingface_hub.ModelCard``) with ``library_name``, ``base_model``,
  tags and metrics;
* the method's pictures (``*.png``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lightning_peft
from lightning_peft.adapters import read_adapter_config
from lightning_peft.adapters.serialization import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_json
from lightning_peft.fileio import staged_file

__all__ = [
    "MANIFEST",
    "EntryError",
    "FingerprintMismatchError",
    "PublishError",
    "check_fingerprint",
    "fingerprint",
    "read_manifest",
    "sha256_file",
    "validate_name",
    "verify_files",
    "write_manifest",
]

MANIFEST = "lightning_peft.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


class EntryError(ValueError):
    """A zoo entry is malformed, incomplete, or its files do not match its manifest."""


class FingerprintMismatchError(ValueError):
    """The model is not the base model the adapter was trained on."""


class PublishError(RuntimeError):
    """A trained result could not be published; the message says why, where the result is kept and how to push it.

    Attributes:
        folder: the kept entry folder (None when nothing could be written).
    """

    def __init__(self, message: str, folder: str | os.PathLike | None = None) -> None:
        super().__init__(message)
        self.folder = Path(folder) if folder is not None else None

    def __reduce__(self) -> tuple[Any, ...]:  # picklable, to be sent to the other ranks
        return (type(self), (str(self), self.folder))


def validate_name(name: str) -> str:
    """A local entry name: letters, digits, ``.``, ``_``, ``-``; no path separators, no ``..``.

    Raises:
        ValueError: with what is allowed.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"invalid zoo entry name {name!r}: use 1-96 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit, without '..' or path separators"
        )
    return name


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's own tensors, under their names before injection (``x.base_layer.weight`` -> ``x.weight``)."""
    out = {}
    for name, tensor in model.state_dict().items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith(("lora_", "ssf_")) or ".lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = tensor
    return out


def _tensor_digest(tensor: torch.Tensor, samples: int = 4096) -> str:
    whole = tensor.detach()
    if hasattr(whole, "full_tensor"):  # gathered before the reshape: a DTensor sharded on a size-1 dim cannot be
        whole = whole.full_tensor()  # flattened as it is (a timm ViT's cls_token / pos_embed under FSDP2)
    flat = whole.reshape(-1)
    step = max(1, flat.numel() // samples)
    sample = flat[::step][:samples].to("cpu", torch.float64)
    digest = hashlib.sha256()
    digest.update(f"{tuple(tensor.shape)}|{tensor.dtype}|{flat.numel()}".encode())
    digest.update(sample.numpy().tobytes())
    digest.update(f"{float(flat.double().sum()):.10e}".encode())
    return digest.hexdigest()[:16]


def fingerprint(model: nn.Module, exclude: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A fingerprint of the base weights: per tensor, shape, dtype, a strided sample of values and the sum.

    It reads each tensor once (no full hash of a multi-GB model) and tells another architecture,
    another checkpoint or a merged adapter apart. Adapter tensors and ``exclude`` modules (e.g. the
    retrained head) are left out; an injected layer's base weight counts under its original name.

    Returns:
        ``{"sha256": <of all digests>, "tensors": {name: digest}}``.
    """
    digests = {}
    for name, tensor in sorted(_base_tensors(model).items()):
        if any(name == m or name.startswith(m + ".") for m in exclude):
            continue
        digests[name] = _tensor_digest(tensor)
    total = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()
    return {"sha256": total, "tensors": digests}


def check_fingerprint(model: nn.Module, expected: dict[str, Any], exclude: list[str] | tuple[str, ...] = ()) -> None:
    """Raise :class:`FingerprintMismatchError` saying what differs unless ``model`` has the expected base weights."""
    actual = fingerprint(model, exclude)
    if actual["sha256"] == expected.get("sha256"):
        return
    want, have = expected.get("tensors", {}), actual["tensors"]
    missing = [n for n in want if n not in have]
    extra = [n for n in have if n not in want]
    changed = [n for n in want if n in have and want[n] != have[n]]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) of the base model are missing here (first: {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} tensor(s) here were not in the base model (first: {extra[0]})")
    if changed:
        parts.append(f"{len(changed)} tensor(s) have other values or shapes (first: {changed[0]})")
    raise FingerprintMismatchError(
        "this model is not the base model the adapter was trained on: "
        + "; ".join(parts or ["fingerprints differ"])
        + ". Load the right base weights, or pass allow_base_mismatch=True if you know the difference is harmless."
    )


def write_manifest(
    folder: Path,
    method: str,
    hyperparameters: dict[str, Any],
    base_fingerprint: dict[str, Any],
    base_model: str | None = None,
    base_class: str | None = None,
    metrics: dict[str, float] | None = None,
    schedule: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``lightning_peft.json`` into ``folder`` listing the sha256 of every other file there. Returns it."""
    files = {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    for required in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if required not in files:
            raise EntryError(f"an entry needs {required}; {folder} has {sorted(files)}")
    manifest = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "hyperparameters": hyperparameters,
        "schedule": schedule or {},
        "base_model": {"name": base_model, "class": base_class, "fingerprint": base_fingerprint},
        "metrics": metrics or {},
        "versions": {"lightning_peft": lightning_peft.__version__, "torch": torch.__version__.split("+")[0]},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files": files,
    }
    with staged_file(folder / MANIFEST) as tmp:  # never half-written
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an entry folder.

    Raises:
        EntryError: the folder does not exist, has no manifest, or one that is corrupt or this version cannot read.
    """
    folder = Path(folder)
    if not folder.exists():
        raise EntryError(f"the folder {folder} does not exist")
    if not folder.is_dir():
        raise EntryError(f"{folder} is a file, not an entry folder")
    path = folder / MANIFEST
    if not path.is_file():
        raise EntryError(f"{folder} is not a lightning-peft zoo entry: it has no {MANIFEST}")
    try:
        manifest = read_json(path)
    except ValueError as err:
        raise EntryError(str(err)) from None
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise EntryError(f"{folder} uses entry format {manifest['format_version']}; upgrade lightning-peft to read it")
    return manifest


def verify_files(folder: str | os.PathLike, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check every file the manifest lists against its sha256, and refuse pickles. Returns the manifest.

    Raises:
        EntryError: a file is missing, differs from its recorded sha256, or is a pickle.
    """
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    pickles = [p.name for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    if pickles:
        raise EntryError(f"the entry holds pickle files {pickles}: lightning-peft never loads pickle; refusing it")
    for rel, expected in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            raise EntryError(f"the entry lacks {rel}, which its manifest lists")
        actual = sha256_file(path)
        if actual != expected:
            raise EntryError(
                f"{rel} has sha256 {actual[:12]}… but the manifest says {expected[:12]}…: corrupt or tampered"
            )
    try:
        read_adapter_config(folder)
    except ValueError as err:  # corrupt JSON: the message names the file
        raise EntryError(str(err)) from None
    return manifest
