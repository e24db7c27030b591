"""``HubZoo``: zoo entries as Hugging Face Hub model repos, through ``huggingface_hub``.

One entry is one model repo tagged ``lightning-peft`` (the model card's tags); one publish is one
``upload_folder`` commit, whose sha is the entry's revision. Tokens come from huggingface_hub's own
login (``hf auth login`` / ``HF_TOKEN``) unless passed; they are never printed or written into an
entry. Downloads go through ``snapshot_download`` (so ``HF_HUB_OFFLINE=1`` works from the cache) and
every file is checked against the manifest's sha256; a snapshot that fails is deleted from the cache.
"""

from __future__ import annotations

import builtins
import os
import shutil
from pathlib import Path
from typing import Any

from lightning_peft.zoo.entry import EntryError, read_manifest, verify_files
from lightning_peft.zoo.local import EntryInfo

__all__ = ["HubError", "HubZoo"]


class HubError(RuntimeError):
    """The Hub refused or could not be reached; the message says which."""


def _translate(err: Exception, repo_id: str, revision: str | None = None) -> Exception:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, RevisionNotFoundError):
        return HubError(f"revision {revision!r} of {repo_id} does not exist on the Hub")
    if isinstance(err, RepositoryNotFoundError):
        return HubError(f"{repo_id} was not found on the Hub (or it is private and your token cannot see it)")
    if isinstance(err, LocalEntryNotFoundError | OfflineModeIsEnabled):  # before EntryNotFoundError: a subclass
        return HubError(f"the Hub cannot be reached and {repo_id} is not in the local cache ({err})")
    if isinstance(err, EntryNotFoundError):
        return HubError(f"{repo_id} lacks a file the entry needs: {err}")
    if isinstance(err, HfHubHTTPError):
        status = getattr(err.response, "status_code", None)
        if status in (401, 403):
            return HubError(f"no permission for {repo_id} (HTTP {status}): log in with `hf auth login` or pass a token")
        return HubError(f"the Hub answered HTTP {status} for {repo_id}: {err}")
    if isinstance(err, OSError | ConnectionError):
        return HubError(f"the Hub cannot be reached ({type(err).__name__}: {err})")
    return err


class HubZoo:
    """A zoo on the Hugging Face Hub (or any server speaking its protocol).

    Args:
        namespace: user or organisation that owns published repos; default: the token's user.
        endpoint: Hub URL; default huggingface_hub's (``HF_ENDPOINT``).
        token: a token; default huggingface_hub's login.
        private: create new repos private.
        cache_dir: where downloads are cached; default huggingface_hub's cache.
    """

    kind = "hub"

    def __init__(
        self,
        namespace: str | None = None,
        endpoint: str | None = None,
        token: str | None = None,
        private: bool = False,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        from huggingface_hub import HfApi

        self.endpoint = endpoint
        self.api = HfApi(endpoint=endpoint, token=token)
        self._token = token
        self._namespace = namespace
        self.private = private
        self.cache_dir = str(cache_dir) if cache_dir is not None else None

    def __repr__(self) -> str:  # never shows the token
        return f"HubZoo(namespace={self._namespace!r}, endpoint={self.endpoint!r})"

    @property
    def namespace(self) -> str:
        if self._namespace is None:
            try:
                self._namespace = self.api.whoami()["name"]
            except Exception as err:  # noqa: BLE001 - translated
                raise _translate(err, "whoami") from err
        return self._namespace

    def repo_id(self, name: str) -> str:
        return name if "/" in name else f"{self.namespace}/{name}"

    def publish(self, folder: str | os.PathLike, name: str) -> str:
        """Create the repo if needed and upload the entry folder as one commit. Returns the commit sha."""
        verify_files(folder)
        repo_id = self.repo_id(name)
        try:
            self.api.create_repo(repo_id, repo_type="model", private=self.private, exist_ok=True)
            info = self.api.upload_folder(
                repo_id=repo_id, folder_path=str(folder), commit_message="lightning-peft publish"
            )
        except Exception as err:  # noqa: BLE001 - translated
            raise _translate(err, repo_id) from err
        return info.oid

    def download(self, name: str, revision: str | None = None) -> Path:
        """Snapshot of the entry at ``revision`` (default ``main``) in the cache, every file checked."""
        from huggingface_hub import snapshot_download

        repo_id = self.repo_id(name)
        try:
            path = Path(
                snapshot_download(
                    repo_id, revision=revision, cache_dir=self.cache_dir, endpoint=self.endpoint, token=self._token
                )
            )
        except Exception as err:  # noqa: BLE001 - translated
            raise _translate(err, repo_id, revision) from err
        try:
            verify_files(path)
        except EntryError:
            shutil.rmtree(path, ignore_errors=True)  # do not keep a bad snapshot in the cache
            raise
        return path

    def info(self, name: str, revision: str | None = None) -> EntryInfo:
        path = self.download(name, revision)
        return EntryInfo.from_manifest(self.repo_id(name), path.name, read_manifest(path), str(path))

    def _rows(self, models: Any) -> list[EntryInfo]:
        rows = []
        for m in models:
            tags = list(m.tags or [])
            method = next((t for t in tags if t in ("lora", "adalora", "lisa", "id3", "sara")), "")
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
        """Repos tagged ``lightning-peft`` (and ``method``), by any author unless given, whose id contains ``query``."""
        tags = ["lightning-peft"] + ([method] if method else [])
        try:
            models = self.api.list_models(filter=tags, author=author, search=query)
            rows = self._rows(models)
        except Exception as err:  # noqa: BLE001 - translated
            raise _translate(err, author or "the Hub") from err
        if base_model:
            rows = [r for r in rows if r.base_model == base_model]
        return rows

    def rm(self, name: str) -> None:
        """Delete the entry's repo."""
        repo_id = self.repo_id(name)
        try:
            self.api.delete_repo(repo_id, repo_type="model")
        except Exception as err:  # noqa: BLE001 - translated
            raise _translate(err, repo_id) from err
