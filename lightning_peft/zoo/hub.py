"""``HubZoo``: zoo entries as Hugging Face Hub model repos, through ``huggingface_hub``.

One entry is one model repo tagged ``lightning-peft`` (the model card's tags); one publish is one
``upload_folder`` commit, whose sha is the entry's revision. Tokens come from huggingface_hub's own
login (``hf auth login`` / ``HF_TOKEN``) unless passed; they are never printed or written into an
entry. Downloads go through ``snapshot_download`` (so ``HF_HUB_OFFLINE=1`` works from the cache) and
every file is checked against the manifest's sha256; a snapshot that fails is deleted from the cache,
with the cached blobs of its bad files, so a retry downloads them again.

Faults are one :class:`HubError` line that names the endpoint and what to check; how each call is probed,
bounded by ``timeout`` and its errors translated is :mod:`lightning_peft.zoo.transport`. A download whose endpoint
is unreachable is served from the cache when the revision is there.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning_peft.zoo.entry import EntryError, read_manifest, sha256_file, verify_files
from lightning_peft.zoo.local import EntryInfo
from lightning_peft.zoo.transport import (
    DEFAULT_TIMEOUT,
    TIMEOUT_ENV,
    HubError,
    HubUnreachableError,
    bounded,
    probe,
    resolve_timeout,
    translate,
)

__all__ = ["DEFAULT_TIMEOUT", "TIMEOUT_ENV", "HubError", "HubUnreachableError", "HubZoo", "validate_repo_id"]

_PICKLES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def validate_repo_id(name: str) -> str:
    """A Hub repo name: ``name`` or ``org/name`` as the Hub allows them (checked before any network call).

    Raises:
        ValueError: with what is allowed.
    """
    from huggingface_hub.utils import validate_repo_id as hub_rules

    try:
        if not isinstance(name, str) or not name or name.count("/") > 1:
            raise ValueError(name)
        hub_rules(name)
    except ValueError:
        raise ValueError(
            f"invalid Hub repo name {name!r}: use 'name' or 'org/name', each 1-96 letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit, without '--' or '..'"
        ) from None
    return name


class HubZoo:
    """A zoo on the Hugging Face Hub (or any server speaking its protocol).

    Args:
        namespace: user or organisation that owns published repos; default: the token's user.
        endpoint: Hub URL; default huggingface_hub's (``HF_ENDPOINT``).
        token: a token; default huggingface_hub's login.
        private: create new repos private.
        cache_dir: where downloads are cached; default huggingface_hub's cache.
        timeout: seconds to wait for the Hub to answer (connect and each read); default
            ``$LIGHTNING_PEFT_HUB_TIMEOUT`` or 10.

    Raises:
        HubError: from every method when the Hub refuses; :class:`HubUnreachableError` when nothing answers.

    Example:
        >>> HubZoo(namespace="me", endpoint="http://127.0.0.1:1", timeout=2.5)
        HubZoo(namespace='me', endpoint='http://127.0.0.1:1')
    """

    kind = "hub"

    def __init__(
        self,
        namespace: str | None = None,
        endpoint: str | None = None,
        token: str | None = None,
        private: bool = False,
        cache_dir: str | os.PathLike | None = None,
        timeout: float | None = None,
    ) -> None:
        from huggingface_hub import HfApi

        self.endpoint = endpoint
        self.api = HfApi(endpoint=endpoint, token=token)
        self._token = token
        self._namespace = namespace
        self.private = private
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.timeout = resolve_timeout(timeout)

    def __repr__(self) -> str:  # never shows the token
        return f"HubZoo(namespace={self._namespace!r}, endpoint={self.endpoint!r})"

    @property
    def url(self) -> str:
        """The endpoint this zoo talks to (the explicit one, else huggingface_hub's)."""
        return str(self.api.endpoint).rstrip("/")

    @contextlib.contextmanager
    def _call(self, name: str | None, revision: str | None = None) -> Iterator[str]:
        """Probe, bound the timeouts, and translate every error of the block; yields the repo id of ``name``."""
        subject = name or "the Hub"
        try:
            probe(self.url, self.timeout)
            with bounded(self.url, self.timeout):
                if name is not None:
                    subject = self.repo_id(name)
                yield subject
        except Exception as err:  # noqa: BLE001 - translated
            translated = translate(err, self.url, self.timeout, subject, revision)
            if translated is err:
                raise
            raise translated from err

    def check(self) -> None:
        """Fail now if the Hub does not answer (or, without a namespace, the login is missing); no-op offline.

        Offline means ``HF_HUB_OFFLINE`` is set: offline by choice, nothing is checked.

        Raises:
            HubUnreachableError: nothing answers at the endpoint within the timeout.
            HubError: the token is refused.
        """
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return
        with self._call(None):
            _ = self.namespace

    @property
    def namespace(self) -> str:
        if self._namespace is None:
            with self._call(None):
                self._namespace = self.api.whoami()["name"]
        return self._namespace

    def repo_id(self, name: str) -> str:
        return validate_repo_id(name if "/" in name else f"{self.namespace}/{name}")

    def publish(self, folder: str | os.PathLike, name: str) -> str:
        """Create the repo if needed and upload the entry folder as one commit. Returns the commit sha."""
        validate_repo_id(name)
        verify_files(folder)
        with self._call(name) as repo_id:
            self.api.create_repo(repo_id, repo_type="model", private=self.private, exist_ok=True)
            info = self.api.upload_folder(
                repo_id=repo_id, folder_path=str(folder), commit_message="lightning-peft publish"
            )
        return info.oid

    def _snapshot(self, repo_id: str, revision: str | None, local_only: bool) -> Path:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=self.cache_dir,
                endpoint=self.endpoint,
                token=self._token,
                local_files_only=local_only,
            )
        )

    def download(self, name: str, revision: str | None = None) -> Path:
        """Snapshot of the entry at ``revision`` (default ``main``) in the cache, every file checked.

        When nothing answers at the endpoint, a revision already in the cache is used.
        """
        validate_repo_id(name)
        try:
            with self._call(name, revision) as repo_id:
                path = self._snapshot(repo_id, revision, local_only=False)
        except HubUnreachableError as unreachable:
            if "/" not in name and self._namespace is None:
                raise
            repo_id = self.repo_id(name)
            try:
                path = self._snapshot(repo_id, revision, local_only=True)
            except Exception:  # noqa: BLE001 - not cached: the Hub's error is the one to report
                raise HubUnreachableError(f"{unreachable}; {repo_id} is not in the local cache either") from unreachable
        try:
            verify_files(path)
        except EntryError:
            _evict(path)  # do not keep a bad snapshot (nor its bad blobs) in the cache
            raise
        return path

    def info(self, name: str, revision: str | None = None) -> EntryInfo:
        path = self.download(name, revision)
        return EntryInfo.from_manifest(self.repo_id(name), path.name, read_manifest(path), str(path))

    def _rows(self, models: Any) -> list[EntryInfo]:
        rows = []
        for m in models:
            tags = list(m.tags or [])
            method = next(
                (t for t in tags if t in ("lora", "adalora", "lisa", "hft", "id3", "sara", "ssf", "spiel")), ""
            )
            base = next((t.split(":", 1)[1] for t in tags if t.startswith("base_model:") and t.count(":") == 1), None)
            rows.append(
                EntryInfo(
                    name=m.id,
                    revision=m.sha or "",
                    method=method,
                    base_model=base,
                    created=str(m.last_modified or ""),
                    location=m.id,
                    tags=tags,
                )
            )
        return rows

    def list(self) -> builtins.list[EntryInfo]:
        """The namespace's repos tagged ``lightning-peft``."""
        return self.search(author=self.namespace)

    def search(
        self,
        query: str | None = None,
        method: str | None = None,
        base_model: str | None = None,
        author: str | None = None,
    ) -> builtins.list[EntryInfo]:
        """Repos tagged ``lightning-peft``, by any author unless given, that match as local entries do
        (:meth:`EntryInfo.matches`). The Hub is asked for the ``lightning-peft`` tag (and the method's, lower case);
        the query is matched here, over the id, the method, the base model and the tags (the Hub's own ``search``
        looks at ids only)."""
        tags = ["lightning-peft"] + ([method.lower()] if method else [])
        with self._call(None):
            rows = self._rows(self.api.list_models(filter=tags, author=author))
        return [r for r in rows if r.matches(query, method, base_model)]

    def rm(self, name: str) -> None:
        """Delete the entry's repo."""
        validate_repo_id(name)
        with self._call(name) as repo_id:
            self.api.delete_repo(repo_id, repo_type="model")


def _evict(snapshot: Path) -> None:
    """Delete a snapshot that failed its check, with the cached blobs of its bad files, so a retry fetches them again.

    Bad: a file whose sha256 differs from the manifest, a pickle, or every file when the manifest is unreadable.
    Blobs of good files stay (other cached revisions may share them).
    """
    try:
        expected: dict[str, str] | None = dict(read_manifest(snapshot)["files"])
    except (EntryError, KeyError, TypeError, ValueError):
        expected = None
    for file in snapshot.rglob("*"):
        if not file.is_file():
            continue
        rel = file.relative_to(snapshot).as_posix()
        bad = expected is None or file.suffix in _PICKLES or (rel in expected and sha256_file(file) != expected[rel])
        blob = file.resolve()
        if bad and blob != file.absolute():  # the cache's snapshot files are links into blobs/
            blob.unlink(missing_ok=True)
    shutil.rmtree(snapshot, ignore_errors=True)
