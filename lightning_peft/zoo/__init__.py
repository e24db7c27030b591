"""The adapter zoo: publish, find, download and load adapters, locally or on the Hugging Face Hub.

Example:
    >>> import tempfile
    >>> from torch import nn
    >>> from lightning_peft import zoo
    >>> from lightning_peft.adapters import LoRAConfig, inject_adapters
    >>> net = nn.Sequential(nn.Linear(4, 4))
    >>> cfg = LoRAConfig(r=2, target_modules=["0"])
    >>> _ = inject_adapters(net, cfg)
    >>> local = zoo.LocalZoo(tempfile.mkdtemp())
    >>> rev = zoo.publish(net, "tiny-net", cfg, zoo=local, base_model="my/base")
    >>> [e.name for e in zoo.search("tiny", zoo=local)]
    ['tiny-net']
    >>> fresh = nn.Sequential(nn.Linear(4, 4))
    >>> _ = fresh[0].load_state_dict(net[0].base_layer.state_dict())  # the same base weights
    >>> zoo.load(fresh, "tiny-net", zoo=local)["method"]
    'lora'

Names: a name with a ``/`` (``org/repo``) is a Hub repo and goes to :class:`HubZoo`; a plain name
is a :class:`LocalZoo` entry. Pass ``zoo=`` to choose explicitly.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from lightning_peft.adapters import AdaLoRAConfig, LoRAConfig, adapter_layers, load_adapter, read_adapter_config
from lightning_peft.adapters import save_adapter as _save_adapter
from lightning_peft.distributed import unwrapped_class
from lightning_peft.fileio import StorageError
from lightning_peft.zoo.card import write_card
from lightning_peft.zoo.entry import (
    MANIFEST,
    EntryError,
    FingerprintMismatchError,
    PublishError,
    check_fingerprint,
    fingerprint,
    read_manifest,
    validate_name,
    verify_files,
    write_manifest,
)
from lightning_peft.zoo.hub import HubError, HubUnreachableError, HubZoo, validate_repo_id
from lightning_peft.zoo.local import EntryInfo, LocalZoo, default_root

__all__ = [
    "MANIFEST",
    "EntryError",
    "EntryInfo",
    "FingerprintMismatchError",
    "HubError",
    "HubUnreachableError",
    "HubZoo",
    "LocalZoo",
    "PublishError",
    "StorageError",
    "build_entry",
    "default_root",
    "download",
    "fingerprint",
    "load",
    "load_folder",
    "publish",
    "publish_folder",
    "resolve_zoo",
    "search",
    "validate_name",
    "validate_repo_id",
]

Zoo = LocalZoo | HubZoo


def resolve_zoo(name: str | None = None, zoo: Zoo | str | None = None) -> Zoo:
    """The zoo a call goes to: ``zoo`` if given (an instance, ``"local"`` or ``"hub"``), else by the name's form."""
    if isinstance(zoo, LocalZoo | HubZoo):
        return zoo
    if zoo == "local" or (zoo is None and (name is None or "/" not in name)):
        return LocalZoo()
    if zoo in ("hub", None):
        return HubZoo()
    raise ValueError(f"zoo must be a LocalZoo, a HubZoo, 'local' or 'hub', got {zoo!r}")


def build_entry(
    folder: str | os.PathLike,
    model: nn.Module,
    config: LoRAConfig | None,
    name: str,
    base_model: str | None = None,
    metrics: dict[str, float] | None = None,
    recipe: str | None = None,
    pictures: list[str | os.PathLike] | None = None,
    adapter_written: bool = False,
    base_fingerprint: dict[str, Any] | None = None,
    method: str | None = None,
    hyperparameters: dict[str, Any] | None = None,
    schedule: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a complete entry for ``model``'s adapters into ``folder``; returns the manifest.

    Args:
        folder: an empty (or adapter-only, with ``adapter_written``) folder.
        model: the adapted model (names relative to it), base weights as trained on.
        config: the adapters' config (None for a method that is not LoRA layers, with ``adapter_written``).
        name: the entry's display name.
        base_model: a reference to the base weights (a Hub id, a path, a description).
        metrics: numbers for the card and manifest (e.g. the trainer's ``callback_metrics``).
        recipe: the LightningCLI config text that produced the adapter, saved as ``config.yaml``.
        pictures: PNG files to copy in.
        adapter_written: the adapter files are already in ``folder`` (e.g. gathered from several ranks).
        base_fingerprint: the base weights' :func:`fingerprint`, if already computed (on every rank, when sharded,
            or before training for methods that change the base weights).
        method, hyperparameters, schedule: what the method callback reports; default: derived from ``config``.
    """
    folder = Path(folder)
    if config is None and not (adapter_written and method and base_fingerprint):
        raise ValueError("build_entry without a LoRA config needs adapter_written, method and base_fingerprint")
    if not adapter_written:
        assert config is not None
        _save_adapter(model, folder, config, base_model=base_model)
    method = method or ("adalora" if isinstance(config, AdaLoRAConfig) else "lora")
    for picture in pictures or []:
        picture = Path(picture)
        (folder / picture.name).write_bytes(picture.read_bytes())
    names = sorted(p.name for p in folder.glob("*.png"))  # copied here or written by the method callback
    if recipe:
        (folder / "config.yaml").write_text(recipe)
    metrics = {k: float(v) for k, v in (metrics or {}).items()}
    hyper = hyperparameters if hyperparameters is not None else (config.to_dict() if config is not None else {})
    schedule = dict(schedule or {})
    write_card(folder, name, method, base_model, metrics, hyper, names, schedule, unwrapped_class(model).__name__)
    if method == "adalora" and not schedule:
        schedule = {
            "rank_pattern": read_adapter_config(folder).get("rank_pattern", {}),
            "final_ranks": {n: layer.r for n, layer in adapter_layers(model)},
        }
    return write_manifest(
        folder,
        method=method,
        hyperparameters=hyper,
        base_fingerprint=base_fingerprint or fingerprint(model, exclude=config.modules_to_save if config else ()),
        base_model=base_model,
        base_class=unwrapped_class(model).__name__,
        metrics=metrics,
        schedule=schedule,
    )


def publish(
    model: nn.Module,
    name: str,
    config: LoRAConfig,
    *,
    zoo: Zoo | str | None = None,
    base_model: str | None = None,
    metrics: dict[str, float] | None = None,
    recipe: str | None = None,
    pictures: list[str | os.PathLike] | None = None,
) -> str:
    """Build an entry for ``model``'s adapters in a temporary folder and publish it. Returns the new revision.

    Raises:
        ValueError: an invalid name (checked before anything is built).
        StorageError: the local zoo cannot be written (disk full, read-only); nothing is left behind.
        HubError: the Hub refused or did not answer.
    """
    target = resolve_zoo(name, zoo)
    if isinstance(target, LocalZoo):
        validate_name(name)
    else:
        validate_repo_id(name)
    with tempfile.TemporaryDirectory(prefix="lightning-peft-entry-") as tmp:
        build_entry(tmp, model, config, name, base_model, metrics, recipe, pictures)
        return target.publish(tmp, name)


def publish_folder(
    folder: str | os.PathLike, name: str, *, zoo: Zoo | str | None = None, base_model: str | None = None
) -> str:
    """Publish an entry folder as it is: one :class:`ZooPublisher` or :func:`build_entry` wrote, or a method callback's
    ``save_dir`` (what ``lightning-peft zoo push FOLDER NAME`` does). Returns the new revision.

    A folder without a model card (a ``save_dir``) gets one from its manifest, as :func:`build_entry` writes it: the
    Hub lists and searches entries by the card's tags, so a card-less push would be invisible there. ``base_model``
    (a Hub id, a path) names the base in the manifest and the card (a ``save_dir`` only has its fingerprint); the
    folder itself is never changed, the card and manifest are written into a temporary copy.

    Raises:
        EntryError: not an entry folder (no ``lightning_peft.json``), or a file differs from its manifest.
    """
    folder = Path(folder)
    target = resolve_zoo(name, zoo)
    manifest = verify_files(folder)
    base = manifest.get("base_model") or {}
    if (folder / "README.md").is_file() and base_model in (None, base.get("name")):
        return target.publish(folder, name)
    with tempfile.TemporaryDirectory(prefix="lightning-peft-entry-") as tmp:
        for rel in manifest["files"]:
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / rel).write_bytes((folder / rel).read_bytes())
        (Path(tmp) / "README.md").unlink(missing_ok=True)  # rewritten below, with the base model named
        base_model = base_model or base.get("name")
        pictures = sorted(rel for rel in manifest["files"] if rel.endswith(".png") and "/" not in rel)
        fields = {k: manifest.get(k) or {} for k in ("hyperparameters", "metrics", "schedule")}
        write_card(
            Path(tmp),
            name,
            manifest["method"],
            base_model,
            fields["metrics"],
            fields["hyperparameters"],
            pictures,
            schedule=fields["schedule"],
            base_class=base.get("class"),
        )
        write_manifest(
            Path(tmp),
            method=manifest["method"],
            base_fingerprint=base["fingerprint"],
            base_model=base_model,
            base_class=base.get("class"),
            **fields,
        )
        return target.publish(tmp, name)


def search(
    query: str | None = None, *, method: str | None = None, base_model: str | None = None, zoo: Zoo | str | None = None
) -> list[EntryInfo]:
    """Entries matching ``query``, ``method`` and ``base_model``, case-insensitively: ``query`` is a substring of the
    name, method, base model or a tag, ``base_model`` a substring of the base model's id (:meth:`EntryInfo.matches`)."""
    return resolve_zoo(None, zoo).search(query, method=method, base_model=base_model)


def download(name: str, revision: str | None = None, *, zoo: Zoo | str | None = None) -> Path:
    """The verified folder of an entry (a Hub entry goes through the huggingface_hub cache)."""
    return resolve_zoo(name, zoo).download(name, revision)


def load(
    model: nn.Module,
    name: str,
    revision: str | None = None,
    *,
    zoo: Zoo | str | None = None,
    allow_base_mismatch: bool = False,
) -> dict[str, Any]:
    """Put a zoo entry's adapters onto ``model`` (injecting them) after checking it is the right base model.

    Args:
        model: the base model the adapter was trained on (without adapters, or with the same ones).
        name: a local entry name or a Hub repo id.
        revision: a revision (commit sha, local revision id or prefix); default ``main``.
        zoo: the zoo to use instead of deciding by the name.
        allow_base_mismatch: load even if the base weights' fingerprint differs (shapes must still fit).

    Returns:
        The entry's manifest.

    Raises:
        FingerprintMismatchError: the model is not the base the adapter was trained on; says what differs.
        AdapterMismatchError: the adapter's tensors do not fit the model; the model is left as it was.
        EntryError: a file is missing, corrupt or a pickle.
    """
    return load_folder(model, download(name, revision, zoo=zoo), allow_base_mismatch=allow_base_mismatch)


def load_folder(model: nn.Module, folder: str | os.PathLike, *, allow_base_mismatch: bool = False) -> dict[str, Any]:
    """:func:`load` from an entry folder already on disk: verify its files, check the base, load. Returns the manifest.

    Raises:
        EntryError: not an entry folder, or a file is missing, corrupt or a pickle.
        FingerprintMismatchError: the model is not the base the adapter was trained on (checked before any write).
    """
    manifest = verify_files(folder, read_manifest(folder))
    modules_to_save = list(read_adapter_config(folder).get("modules_to_save") or [])
    if not allow_base_mismatch:
        check_fingerprint(model, manifest["base_model"]["fingerprint"], exclude=modules_to_save)
    load_adapter(model, folder)
    return manifest
