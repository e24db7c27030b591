"""A small Hugging Face Hub-protocol server for tests: the real ``huggingface_hub`` client talks to it.

Standard library only (``http.server.ThreadingHTTPServer`` in a daemon thread, HTTP/1.1 keep-alive),
bound to 127.0.0.1 on a random free port. Model repos only. Written against ``huggingface_hub`` 2.4
(its ``httpx2`` transport), by reading which HTTP calls the client makes.

Usage::

    with running_hub(tmp_path / "hub") as server:          # or HubServer(root).start() / .stop()
        api = HfApi(endpoint=server.url, token=server.token)
        api.create_repo("tester/x", exist_ok=True)
        api.upload_folder(repo_id="tester/x", folder_path=folder)
        path = snapshot_download("tester/x", endpoint=server.url, token=server.token, cache_dir=cache)

Pointing the client at the server
---------------------------------
``huggingface_hub`` reads its environment once, at import time, into ``huggingface_hub.constants``;
setting ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` / ``HF_HOME`` afterwards changes nothing in this process
(the repo's ``tests/conftest.py`` sets ``HF_HUB_OFFLINE=1`` before anything imports the client). So:

* Prefer explicit endpoints: ``HfApi(endpoint=server.url, token=server.token)``,
  ``hf_hub_download(..., endpoint=server.url)``, ``snapshot_download(..., endpoint=server.url)``.
* Offline mode must be switched off on the constants, not the environment:
  ``monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)``.
* For code that does not take an endpoint, patch ``constants.ENDPOINT`` and
  ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (``hf_hub_download``, ``snapshot_download``, new ``HfApi()``
  read them at call time), *and* ``huggingface_hub.hf_api.api.endpoint``: the module-level functions
  (``huggingface_hub.model_info``, ``list_models``, ``upload_folder``...) are bound methods of an
  ``HfApi()`` built at import time, which copied the endpoint then.
* Only a subprocess started afterwards can use plain environment variables
  (``HF_ENDPOINT=server.url HF_HUB_OFFLINE=0 ...``).

:func:`point_client_at` does all of the above with a pytest ``monkeypatch`` (and also disables
telemetry, optionally the implicit token, and moves ``HF_HOME`` and the caches to a given folder).

Implemented (``{repo}`` is ``namespace/name``; revisions are branch names or full 40-hex commit shas)
----------------------------------------------------------------------------------------------------
* ``GET /api/whoami-v2`` (401 without a valid token).
* ``POST /api/repos/create`` (409 when it exists; ``visibility`` private/public) and
  ``DELETE /api/repos/delete``. A new repo gets an ``initial commit`` with a ``.gitattributes``, as on
  the real Hub. Any namespace may be written with the token (there are no organisations).
* ``POST /api/validate-yaml`` (the client checks ``README.md`` front matter before uploading).
* ``POST /api/models/{repo}/preupload/{rev}``: every file is ``"uploadMode": "regular"`` (so neither
  LFS nor Xet is ever used, whatever the size or ``.gitattributes``), with the remote blob ``oid``
  of an existing path so that the client skips unchanged files like on the real Hub.
* ``POST /api/models/{repo}/commit/{rev}``: NDJSON ``header``, ``file`` (base64 or utf-8),
  ``deletedFile``, ``deletedFolder``; ``parentCommit`` is checked (412). One request is one commit with
  a new 40-hex sha; the history is kept. ``lfsFile`` and ``create_pr`` are refused with 400.
* ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}`` (model info: id, author, sha,
  lastModified, createdAt, private, tags, library_name, pipeline_tag, cardData from the README YAML
  front matter, siblings, with sizes and blob ids under ``blobs=true``, downloads=likes=0).
  Tags are the card's ``tags`` plus ``library_name`` plus ``base_model:X`` and
  ``base_model:{relation}:X`` (relation from ``base_model_relation``, else ``adapter`` when the repo
  holds ``adapter_config.json``, else ``finetune``), like the Hub adds them.
* ``GET /api/models`` (list): ``filter`` (repeatable, every one must be a tag), ``author``, ``search``
  (case-insensitive substring of the id), ``pipeline_tag``, ``sort`` (descending), ``limit``,
  ``full`` (siblings), ``cardData``. Default order: by id. No pagination.
* ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (``recursive``, ``expand`` gives ``lastCommit``),
  ``GET /api/models/{repo}/commits/{rev}`` (first-parent history, newest first),
  ``GET /api/models/{repo}/refs``.
* ``GET`` / ``HEAD /{repo}/resolve/{rev}/{path}``: the bytes, with ``X-Repo-Commit``, ``ETag`` (the git
  blob sha1, which the client uses as its cache key), ``Content-Length``, and single byte ``Range``
  requests; never a redirect.
* Errors carry ``X-Error-Code`` so that the client raises its own exceptions: 404 ``RepoNotFound``
  (missing repo, or private and no valid token) -> ``RepositoryNotFoundError``; 404
  ``RevisionNotFound`` -> ``RevisionNotFoundError``; 404 ``EntryNotFound`` (with ``X-Repo-Commit``)
  -> ``EntryNotFoundError``. Writes without a valid token are 401 (``HfHubHTTPError``); a wrong token
  is 401 ``Invalid credentials in Authorization header`` on any request, as on the Hub.

Not implemented: LFS and Xet transfers (the preupload answer avoids them), datasets/spaces/kernels
(their URLs answer ``RepoNotFound``), pull requests and discussions, branch/tag creation, gated repos,
organisations and permissions beyond "the token may do everything", ``paths-info``, repo settings,
moves and duplication, ``.gitignore`` rules, pagination, short shas, rate limits, and anything
outside the list above (404 JSON).

Storage: ``root/{namespace}/{name}/repo.json`` (visibility, refs, and every commit with its file
table ``path -> [git blob sha1, size]``) and ``root/{namespace}/{name}/commits/{sha}/`` (a plain folder
with the files as of that commit). A server started again on the same root sees the same repos.
Every request is appended to :attr:`HubServer.requests` as ``(method, raw path without the query)``;
unexpected server-side exceptions (answered 500) are kept in :attr:`HubServer.errors` (assert it is
empty: the client retries a 500 five times with back-off, which is slow rather than loud).
:meth:`HubServer.head` and :meth:`HubServer.repo_ids` read the state directly, for assertions.

Client behaviour worth knowing (huggingface_hub 2.4)
----------------------------------------------------
* With ``hf_xet`` installed (it is here) ``upload_folder`` does not call ``create_commit``: it runs the
  pipelined uploader, which sends ``validate-yaml``, ``preupload`` and ``commit`` itself and splits a
  large folder into several commits (about 250 files, or 100 MB of regular content, per commit).
  ``upload_file``/``create_commit`` are one commit. With ``HF_HUB_DISABLE_XET`` the folder goes
  through ``create_commit`` and the README is validated twice.
* Re-uploading identical files makes no commit: the client drops files whose preupload ``oid`` equals
  its local git sha1 and returns the current head's sha.
* ``create_repo(exist_ok=True)`` reads ``url`` from the 409 body; on 401/403 it asks ``repo_info``.
* The client maps a 401 to ``RepositoryNotFoundError`` only for ``https://`` URLs; on this
  ``http://`` server, private repos answer 404 ``RepoNotFound`` instead.
* The download cache is keyed by ``ETag``, so it must be content-addressed; a ``snapshot_download`` by
  commit sha that is fully cached makes no request at all.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import re
import shutil
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubServer", "point_client_at", "running_hub"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA = re.compile(r"^[0-9a-f]{40}$")
_FRONT_MATTER = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")
_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.bin", "*.ckpt", "*.h5", "*.onnx", "*.pt", "*.pth", "*.safetensors", "*.zip", "*tfevents*")
)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, which the Hub uses as the ETag of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _simple_yaml(text: str) -> dict[str, Any]:
    """Fallback for when PyYAML is absent (it comes with huggingface_hub): top-level ``key: scalar``,
    ``key: [a, b]`` and ``- item`` lists; other lines are skipped."""

    def scalar(value: str) -> Any:
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            return value[1:-1]
        lowered = value.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if lowered in ("null", "~", ""):
            return None
        for cast in (int, float):
            with suppress(ValueError):
                return cast(value)
        return value

    data: dict[str, Any] = {}
    key = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        stripped = line.strip()
        if stripped.startswith("- ") and key is not None:
            if not isinstance(data.get(key), list):
                data[key] = []
            data[key].append(scalar(stripped[2:]))
        elif ":" in line and not line[0].isspace():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if value.startswith("[") and value.endswith("]"):
                data[key] = [scalar(v) for v in value[1:-1].split(",") if v.strip()]
            else:
                data[key] = scalar(value) if value else None
        # anything else (nested mappings, multi-line strings) is beyond this fallback: skipped
    return data


def parse_front_matter(readme: str) -> dict[str, Any] | None:
    """The YAML front matter of a model card as a dict; None when there is none. Raises ValueError if invalid."""
    match = _FRONT_MATTER.search(readme)
    if match is None:
        return None
    text = match.group(2)
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML is in the venv through other packages
        data = _simple_yaml(text)
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"invalid YAML in the model card: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("the model card's YAML front matter must be a mapping")
    return json.loads(json.dumps(data, default=str))  # dates and the like become strings, as in JSON


class _HttpError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = headers or {}, extra or {}


def _repo_not_found(repo_id: str) -> _HttpError:
    return _HttpError(404, f"Repository Not Found: {repo_id}", "RepoNotFound")


def _unauthorized() -> _HttpError:
    return _HttpError(401, "You must be authenticated with a valid token (Authorization: Bearer ...) to do this")


def _check_path(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
        raise _HttpError(400, f"Invalid path in repo: {path!r}")
    if parts[0] == ".git":
        raise _HttpError(400, f"Cannot write under .git: {path!r}")
    return path


class _Repo:
    """One model repo on disk: ``repo.json`` plus ``commits/{sha}/`` plain folders. Callers hold the lock."""

    def __init__(self, folder: Path, repo_id: str) -> None:
        self.folder, self.id = folder, repo_id
        self.meta: dict[str, Any] = json.loads((folder / "repo.json").read_text())

    @property
    def private(self) -> bool:
        return bool(self.meta["private"])

    def save(self) -> None:
        tmp = self.folder / "repo.json.tmp"
        tmp.write_text(json.dumps(self.meta, indent=1, sort_keys=True))
        os.replace(tmp, self.folder / "repo.json")

    def resolve(self, revision: str) -> str:
        if revision in self.meta["refs"]:
            return self.meta["refs"][revision]
        if _SHA.match(revision) and revision in self.meta["commits"]:
            return revision
        raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def commit(self, sha: str) -> dict[str, Any]:
        return self.meta["commits"][sha]

    def files(self, sha: str) -> dict[str, list]:
        """``path -> [blob sha1, size]`` at a commit."""
        return self.meta["commits"][sha]["files"]

    def read(self, sha: str, path: str) -> bytes:
        return (self.folder / "commits" / sha / path).read_bytes()

    def card(self, sha: str) -> dict[str, Any] | None:
        if "README.md" not in self.files(sha):
            return None
        try:
            return parse_front_matter(self.read(sha, "README.md").decode("utf-8", errors="replace"))
        except ValueError:
            return None

    def history(self, sha: str) -> Iterator[dict[str, Any]]:
        """First-parent history from ``sha``, newest first."""
        current: str | None = sha
        while current is not None:
            commit = self.commit(current)
            yield commit
            current = commit["parents"][0] if commit["parents"] else None

    def last_commit(self, sha: str, path: str) -> dict[str, Any]:
        """The newest commit reachable from ``sha`` that changed ``path`` (a file or a folder)."""

        def state(files: dict[str, list]) -> list:
            return sorted((p, v[0]) for p, v in files.items() if p == path or p.startswith(path + "/"))

        previous = None
        for commit in self.history(sha):
            here = state(commit["files"])
            if previous is not None and here != previous[1]:
                return previous[0]
            previous = (commit, here)
        assert previous is not None
        return previous[0]

    def new_commit(
        self, branch: str, title: str, message: str, author: str, changes: dict[str, bytes | None], nonce: int
    ) -> str:
        """Apply ``changes`` (path -> bytes, or None to delete) on top of ``branch``; returns the new sha."""
        parent = self.meta["refs"].get(branch)
        files = {p: list(v) for p, v in (self.files(parent) if parent else {}).items()}
        for path, data in changes.items():
            if data is None:
                files.pop(path, None)
            else:
                files[path] = [git_blob_sha1(data), len(data)]
        folders = {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}
        if clash := sorted(folders & files.keys()):
            raise _HttpError(400, f"{clash[0]!r} would be both a file and a folder")
        date = _now()
        payload = json.dumps([parent, sorted(files.items()), title, message, date, nonce, time.time_ns()])
        sha = hashlib.sha1(payload.encode()).hexdigest()
        staging = self.folder / "commits" / f".staging-{sha}"
        if parent:
            shutil.copytree(self.folder / "commits" / parent, staging, symlinks=False)
        else:
            staging.mkdir(parents=True)
        for path, data in changes.items():
            target = staging / path
            if data is None:
                target.unlink(missing_ok=True)
                for folder in target.parents:  # drop folders left empty
                    if folder == staging or any(folder.iterdir()):
                        break
                    folder.rmdir()
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        os.replace(staging, self.folder / "commits" / sha)
        self.meta["commits"][sha] = {
            "id": sha,
            "parents": [parent] if parent else [],
            "title": title,
            "message": message,
            "date": date,
            "author": author,
            "files": files,
        }
        self.meta["refs"][branch] = sha
        self.save()
        return sha


class HubServer:
    """A Hugging Face Hub-protocol server on 127.0.0.1, for tests. See the module docstring.

    Args:
        root: folder holding the repos (created if missing).
        token: the bearer token that writes (and reads of private repos) need.
        user: the token's user name (``whoami()["name"]``).
    """

    def __init__(self, root: Path, token: str = "hf_test_token", user: str = "tester") -> None:
        self.root = Path(root)
        self.token = token
        self.user = user
        self.url = ""
        self.requests: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self._lock = threading.RLock()
        self._nonce = itertools.count()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> str:
        """Serve on a random free port of 127.0.0.1 in a daemon thread; returns ``http://127.0.0.1:PORT``."""
        if self._httpd is not None:
            return self.url
        self.root.mkdir(parents=True, exist_ok=True)
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.hub = self
        self._httpd = httpd
        self.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        # a short poll interval: shutdown() waits for the serving loop to notice, up to one interval
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop serving and drop open connections: the port refuses connections afterwards."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HubServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers for tests

    def repo_ids(self) -> list[str]:
        """Every repo id on the server, private ones included."""
        with self._lock:
            return sorted(f"{p.parent.parent.name}/{p.parent.name}" for p in self.root.glob("*/*/repo.json"))

    def head(self, repo_id: str, branch: str = "main") -> str:
        """The commit sha ``branch`` points at."""
        with self._lock:
            return self._repo(repo_id, authed=True).resolve(branch)

    # ------------------------------------------------------------------ state (lock held by callers)

    def _repo(self, repo_id: str, authed: bool) -> _Repo:
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(_NAME.match(p) and ".." not in p and "--" not in p for p in parts):
            raise _repo_not_found(repo_id)
        folder = self.root / parts[0] / parts[1]
        if not (folder / "repo.json").is_file():
            raise _repo_not_found(repo_id)
        repo = _Repo(folder, repo_id)
        if repo.private and not authed:
            raise _repo_not_found(repo_id)
        return repo

    def _visible_repos(self, authed: bool) -> Iterator[_Repo]:
        for repo_id in self.repo_ids():
            with suppress(_HttpError):
                yield self._repo(repo_id, authed)

    def _model_json(self, repo: _Repo, sha: str, siblings: bool, blobs: bool, card: bool) -> dict[str, Any]:
        commit, files = repo.commit(sha), repo.files(sha)
        card_data = repo.card(sha)
        tags: list[str] = []
        library_name = pipeline_tag = None
        if card_data:
            card_tags = card_data.get("tags") or []
            tags.extend(str(t) for t in (card_tags if isinstance(card_tags, list) else [card_tags]))
            library_name = card_data.get("library_name")
            pipeline_tag = card_data.get("pipeline_tag")
            if library_name:
                tags.append(str(library_name))
            bases = card_data.get("base_model") or []
            relation = card_data.get("base_model_relation") or (
                "adapter" if "adapter_config.json" in files else "finetune"
            )
            for base in bases if isinstance(bases, list) else [bases]:
                tags += [f"base_model:{base}", f"base_model:{relation}:{base}"]
        namespace = repo.id.split("/")[0]
        data: dict[str, Any] = {
            "_id": hashlib.sha1(repo.id.encode()).hexdigest()[:24],
            "id": repo.id,
            "modelId": repo.id,
            "author": namespace,
            "sha": sha,
            "lastModified": commit["date"],
            "createdAt": repo.meta["createdAt"],
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": list(dict.fromkeys(tags)),
            "library_name": library_name,
            "pipeline_tag": pipeline_tag,
            "usedStorage": sum(size for _, size in files.values()),
        }
        if card:
            data["cardData"] = card_data
        if siblings:
            data["siblings"] = [
                {"rfilename": p, **({"size": v[1], "blobId": v[0]} if blobs else {})} for p, v in sorted(files.items())
            ]
            data["spaces"] = []
        return data

    # ------------------------------------------------------------------ request handling

    def _handle(self, req: _Handler, method: str, body: bytes) -> None:
        split = urlsplit(req.path)
        raw_path = split.path
        query = parse_qs(split.query, keep_blank_values=True)
        with self._lock:
            self.requests.append((method, raw_path))
        authed = self._auth(req)
        segments = raw_path.strip("/").split("/")
        base = f"/{raw_path.strip('/')}"

        if segments[0] == "api":
            route = segments[1:]
            if method == "GET" and route == ["whoami-v2"]:
                if not authed:
                    raise _unauthorized()
                return req.send_json(200, self._whoami())
            if method == "POST" and route == ["repos", "create"]:
                return self._create_repo(req, authed, _json_body(body))
            if method == "DELETE" and route == ["repos", "delete"]:
                return self._delete_repo(req, authed, _json_body(body))
            if method == "POST" and route == ["validate-yaml"]:
                return self._validate_yaml(req, _json_body(body))
            if method == "GET" and route == ["models"]:
                return self._list_models(req, authed, query)
            if route and route[0] in ("datasets", "spaces", "kernels") and len(route) >= 3:
                raise _repo_not_found(f"{route[0]}/{unquote(route[1])}/{unquote(route[2])}")
            if len(route) == 2 and route[0] == "models":  # a legacy id without namespace: none here
                raise _repo_not_found(unquote(route[1]))
            if len(route) >= 3 and route[0] == "models":
                repo_id = f"{unquote(route[1])}/{unquote(route[2])}"
                return self._repo_api(req, method, repo_id, route[3:], query, body, authed)
            raise _HttpError(404, f"Not found: {method} {base}")

        if method in ("GET", "HEAD") and len(segments) >= 5 and segments[2] == "resolve":
            if segments[0] in ("datasets", "spaces", "kernels"):
                raise _repo_not_found("/".join(segments[:3]))
            repo_id = f"{unquote(segments[0])}/{unquote(segments[1])}"
            revision, path = unquote(segments[3]), unquote("/".join(segments[4:]))
            return self._resolve(req, method, repo_id, revision, path, authed)
        if method in ("GET", "HEAD") and len(segments) >= 4 and segments[1] == "resolve":
            raise _repo_not_found(unquote(segments[0]))  # a legacy id without namespace: none here
        raise _HttpError(404, f"Not found: {method} {base}")

    def _auth(self, req: _Handler) -> bool:
        header = req.headers.get("Authorization")
        if header is None:
            return False
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip() == self.token:
            return True
        raise _HttpError(
            401,
            "Invalid credentials in Authorization header",
            headers={"X-Error-Message": "Invalid credentials in Authorization header"},
        )

    def _whoami(self) -> dict[str, Any]:
        return {
            "type": "user",
            "id": hashlib.sha1(self.user.encode()).hexdigest()[:24],
            "name": self.user,
            "fullname": self.user,
            "email": None,
            "emailVerified": False,
            "canPay": False,
            "isPro": False,
            "periodEnd": None,
            "avatarUrl": "",
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
        }

    def _create_repo(self, req: _Handler, authed: bool, payload: dict[str, Any]) -> None:
        if not authed:
            raise _unauthorized()
        repo_type = payload.get("type") or "model"
        if repo_type != "model":
            raise _HttpError(400, f"Only model repos are supported by this test server, not {repo_type!r}")
        name, namespace = payload.get("name"), payload.get("organization") or self.user
        if not isinstance(name, str) or not all(
            _NAME.match(p) and ".." not in p and "--" not in p for p in (namespace, name)
        ):
            raise _HttpError(400, f"Invalid repo name: {namespace}/{name}")
        repo_id = f"{namespace}/{name}"
        visibility = payload.get("visibility") or ("private" if payload.get("private") else "public")
        if visibility not in ("public", "private"):
            raise _HttpError(400, f"Invalid visibility {visibility!r}")
        with self._lock:
            folder = self.root / namespace / name
            if (folder / "repo.json").exists():
                # the client's create_repo(exist_ok=True) reads "url" from this 409 answer
                raise _HttpError(409, "You already created this model repo", extra={"url": f"{self.url}/{repo_id}"})
            (folder / "commits").mkdir(parents=True, exist_ok=True)
            meta = {"private": visibility == "private", "createdAt": _now(), "refs": {}, "commits": {}}
            (folder / "repo.json").write_text(json.dumps(meta))
            repo = _Repo(folder, repo_id)
            repo.new_commit(
                "main", "initial commit", "", self.user, {".gitattributes": _GITATTRIBUTES.encode()}, next(self._nonce)
            )
        req.send_json(200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _delete_repo(self, req: _Handler, authed: bool, payload: dict[str, Any]) -> None:
        if not authed:
            raise _unauthorized()
        if (payload.get("type") or "model") != "model":
            raise _repo_not_found(str(payload.get("name")))
        repo_id = f"{payload.get('organization') or self.user}/{payload.get('name')}"
        with self._lock:
            repo = self._repo(repo_id, authed)
            shutil.rmtree(repo.folder)
            with suppress(OSError):
                repo.folder.parent.rmdir()  # the namespace folder, when it was the last repo
        req.send_json(200, {})

    def _validate_yaml(self, req: _Handler, payload: dict[str, Any]) -> None:
        try:
            parse_front_matter(str(payload.get("content") or ""))
        except ValueError as err:
            return req.send_json(400, {"errors": [{"message": str(err)}], "warnings": []})
        req.send_json(200, {"errors": [], "warnings": []})

    def _list_models(self, req: _Handler, authed: bool, query: dict[str, list[str]]) -> None:
        wanted = query.get("filter", [])
        author = (query.get("author") or [None])[0]
        search = ((query.get("search") or [""])[0]).lower()
        pipeline = (query.get("pipeline_tag") or [None])[0]
        truthy = ("true", "1", "True")
        full = (query.get("full") or [""])[0] in truthy
        card = (query.get("cardData") or [""])[0] in truthy
        rows = []
        with self._lock:
            for repo in self._visible_repos(authed):
                if author and repo.id.split("/")[0] != author:
                    continue
                if search and search not in repo.id.lower():
                    continue
                row = self._model_json(repo, repo.resolve("main"), siblings=full, blobs=False, card=True)
                if not all(tag in row["tags"] for tag in wanted):
                    continue
                if pipeline and row["pipeline_tag"] != pipeline:
                    continue
                if not card:
                    row.pop("cardData")
                rows.append(row)
        sort = (query.get("sort") or [None])[0]
        if sort:
            rows.sort(key=lambda r: (r.get(sort) or 0, r["id"]) if sort in r else (0, r["id"]), reverse=True)
        limit = (query.get("limit") or [None])[0]
        if limit is not None:
            rows = rows[: max(int(limit), 0)]
        req.send_json(200, rows)

    def _repo_api(
        self,
        req: _Handler,
        method: str,
        repo_id: str,
        rest: list[str],
        query: dict[str, list[str]],
        body: bytes,
        authed: bool,
    ) -> None:
        truthy = ("true", "1", "True")
        with self._lock:
            repo = self._repo(repo_id, authed)
            if method == "GET" and (not rest or (rest[0] == "revision" and len(rest) == 2)):
                sha = repo.resolve(unquote(rest[1]) if rest else "main")
                blobs = (query.get("blobs") or [""])[0] in truthy
                return req.send_json(200, self._model_json(repo, sha, siblings=True, blobs=blobs, card=True))
            if method == "GET" and rest and rest[0] == "tree" and len(rest) >= 2:
                sha = repo.resolve(unquote(rest[1]))
                path = unquote("/".join(rest[2:])).strip("/")
                recursive = (query.get("recursive") or [""])[0] in truthy
                expand = (query.get("expand") or [""])[0] in truthy
                return req.send_json(200, _tree(repo, sha, path, recursive, expand))
            if method == "GET" and rest and rest[0] == "commits" and len(rest) == 2:
                sha = repo.resolve(unquote(rest[1]))
                commits = [
                    {
                        "id": c["id"],
                        "title": c["title"],
                        "message": c["message"],
                        "date": c["date"],
                        "authors": [{"user": c["author"], "avatar": ""}],
                        "formatted": {"title": c["title"], "message": c["message"]},
                    }
                    for c in repo.history(sha)
                ]
                return req.send_json(200, commits)
            if method == "GET" and rest == ["refs"]:
                branches = [
                    {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                    for name, sha in sorted(repo.meta["refs"].items())
                ]
                return req.send_json(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": []})
            if method == "POST" and rest and rest[0] in ("preupload", "commit") and len(rest) == 2:
                if not authed:
                    raise _unauthorized()
                if query.get("create_pr"):
                    raise _HttpError(400, "Pull requests are not implemented by this test server")
                revision = unquote(rest[1])
                if revision not in repo.meta["refs"]:
                    if _SHA.match(revision):
                        raise _HttpError(400, f"Cannot commit to a commit sha, only to a branch: {revision}")
                    raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
                if rest[0] == "preupload":
                    return req.send_json(200, _preupload(repo, revision, _json_body(body)))
                return self._commit(req, repo, revision, body)
        raise _HttpError(404, f"Not found: {method} /api/models/{repo_id}/{'/'.join(rest)}")

    def _commit(self, req: _Handler, repo: _Repo, branch: str, body: bytes) -> None:
        header: dict[str, Any] = {}
        changes: dict[str, bytes | None] = {}
        current = repo.files(repo.meta["refs"][branch])
        for number, line in enumerate(body.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError) as err:
                raise _HttpError(400, f"Invalid NDJSON line {number} in commit payload: {err}") from err
            if key == "header":
                header = value
            elif key == "file":
                path = _check_path(value["path"])
                content = value.get("content", "")
                if value.get("encoding") == "base64":
                    try:
                        data = base64.b64decode(content, validate=True)
                    except ValueError as err:
                        raise _HttpError(400, f"Invalid base64 content for {path}") from err
                else:
                    data = content.encode("utf-8")
                changes[path] = data
            elif key == "deletedFile":
                path = _check_path(value["path"])
                if path not in current and changes.get(path) is None:
                    raise _HttpError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                changes[path] = None
            elif key == "deletedFolder":
                prefix = _check_path(value["path"].rstrip("/")) + "/"
                for path in list(current) + list(changes):
                    if path.startswith(prefix):
                        changes[path] = None
            elif key == "lfsFile":
                raise _HttpError(400, "LFS files are not supported by this test server: upload in regular mode")
            else:
                raise _HttpError(400, f"Unknown commit operation {key!r}")
        head = repo.meta["refs"][branch]
        parent = header.get("parentCommit")
        if parent is not None and parent != head:
            raise _HttpError(412, f"A commit has happened since {parent}: the head of {branch} is {head}")
        title = str(header.get("summary") or "").strip()
        if not title:
            raise _HttpError(400, "The commit summary (commit message) cannot be empty")
        sha = repo.new_commit(
            branch, title, str(header.get("description") or ""), self.user, changes, next(self._nonce)
        )
        req.send_json(
            200,
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self.url}/{repo.id}/commit/{sha}",
                "hookOutput": "",
                "pullRequestUrl": None,
            },
        )

    def _resolve(self, req: _Handler, method: str, repo_id: str, revision: str, path: str, authed: bool) -> None:
        with self._lock:
            repo = self._repo(repo_id, authed)
            sha = repo.resolve(revision)
            entry = repo.files(sha).get(path)
            if entry is None:
                raise _HttpError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": sha})
            data = b"" if method == "HEAD" else repo.read(sha, path)
        oid, size = entry
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{oid}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        status, start, end = 200, 0, size
        range_header = req.headers.get("Range")
        if range_header:
            match = _RANGE.match(range_header)
            if match is None or match.group(1) == match.group(2) == "":
                raise _HttpError(
                    416, f"Unsupported range {range_header!r}", headers={"Content-Range": f"bytes */{size}"}
                )
            first, last = match.groups()
            if first == "":  # suffix: the last N bytes
                start, end = max(size - int(last), 0), size
            else:
                start, end = int(first), min(int(last) + 1, size) if last else size
            if start >= size or start >= end:
                raise _HttpError(
                    416, f"Range {range_header!r} not satisfiable", headers={"Content-Range": f"bytes */{size}"}
                )
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        req.send_bytes(status, data[start:end], headers, length=end - start)


def _json_body(body: bytes) -> dict[str, Any]:
    if not body:
        return {}
    try:
        data = json.loads(body)
    except ValueError as err:
        raise _HttpError(400, f"Invalid JSON body: {err}") from err
    if not isinstance(data, dict):
        raise _HttpError(400, "The JSON body must be an object")
    return data


def _preupload(repo: _Repo, branch: str, payload: dict[str, Any]) -> dict[str, Any]:
    files = repo.files(repo.meta["refs"][branch])
    answer = []
    for item in payload.get("files") or []:
        path = _check_path(str(item.get("path")))
        existing = files.get(path)
        answer.append(
            {"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": existing[0] if existing else None}
        )
    return {"files": answer, "commitOid": repo.meta["refs"][branch]}


def _tree(repo: _Repo, sha: str, path: str, recursive: bool, expand: bool) -> list[dict[str, Any]]:
    files = repo.files(sha)
    prefix = f"{path}/" if path else ""
    if path and path in files:
        raise _HttpError(404, f"{path} is a file, not a folder", "EntryNotFound", headers={"X-Repo-Commit": sha})
    inside = {p: v for p, v in files.items() if p.startswith(prefix)}
    if path and not inside:
        raise _HttpError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": sha})
    folders: set[str] = set()
    entries: list[dict[str, Any]] = []
    for file_path, (oid, size) in sorted(inside.items()):
        relative = file_path[len(prefix) :]
        parts = relative.split("/")
        for depth in range(1, len(parts)):
            if depth > 1 and not recursive:
                break
            folders.add(prefix + "/".join(parts[:depth]))
        if recursive or len(parts) == 1:
            entries.append({"type": "file", "oid": oid, "size": size, "path": file_path})
    for folder in sorted(folders):
        content = sorted((p, v[0]) for p, v in files.items() if p.startswith(folder + "/"))
        tree_oid = hashlib.sha1(json.dumps(content).encode()).hexdigest()
        entries.append({"type": "directory", "oid": tree_oid, "size": 0, "path": folder})
    entries.sort(key=lambda e: (e["type"] != "directory", e["path"]))
    if expand:
        for entry in entries:
            commit = repo.last_commit(sha, entry["path"])
            entry["lastCommit"] = {"id": commit["id"], "title": commit["title"], "date": commit["date"]}
    return entries


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    hub: HubServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections, self._connections = list(self._connections), set()
        for connection in connections:
            with suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            with suppress(OSError):
                connection.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    server_version = "lightning-peft-test-hub/1"
    timeout = 60  # idle keep-alive connections end eventually
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        pass  # quiet: HubServer.requests records every request

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        method = self.command
        body = self._read_body() if method in ("POST", "PUT", "PATCH", "DELETE") else b""
        hub = self.server.hub
        try:
            hub._handle(self, method, body)
        except _HttpError as err:
            headers = {**err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            headers.setdefault("X-Error-Message", err.message)
            self.send_json(err.status, {"error": err.message, **err.extra}, headers)
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True
        except Exception:  # noqa: BLE001 - the client gets a 500, the test gets the traceback
            hub.errors.append(traceback.format_exc())
            with suppress(OSError):
                self.send_json(500, {"error": "Internal error in the test hub server"})

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

    def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_bytes(status, data, {"Content-Type": "application/json; charset=utf-8", **(headers or {})})

    def send_bytes(self, status: int, data: bytes, headers: dict[str, str], length: int | None = None) -> None:
        self.send_response(status)
        for key, value in headers.items():
            # header values must be latin-1 and single-line
            self.send_header(
                key, value.replace("\r", " ").replace("\n", " ").encode("latin-1", "replace").decode("latin-1")
            )
        self.send_header("Content-Length", str(len(data) if length is None else length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


@contextmanager
def running_hub(tmp_path: str | os.PathLike, token: str = "hf_test_token", user: str = "tester") -> Iterator[HubServer]:
    """Start a :class:`HubServer` storing its repos under ``tmp_path``, yield it, stop it."""
    server = HubServer(Path(tmp_path), token=token, user=user)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def point_client_at(
    server: HubServer, monkeypatch: Any, hf_home: str | os.PathLike, implicit_token: bool = False
) -> None:
    """Point this process's ``huggingface_hub`` (already imported or not) at ``server``, for one test.

    Turns offline mode off, telemetry off, the default endpoint (``constants`` and the module-level
    ``HfApi``) to ``server.url``, and ``HF_HOME``, the caches and the token file to ``hf_home``. Unless
    ``implicit_token``, the client sends a token only when given one (``token=`` argument), and
    ``HF_TOKEN`` is unset. The environment variables are set too, for subprocesses.
    """
    from huggingface_hub import constants, hf_api

    home = Path(hf_home)
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "HF_ENDPOINT": server.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HOME": str(home),
    }
    if not implicit_token:
        env["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            monkeypatch.delenv(name, raising=False)
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH", "HF_XET_CACHE", "HUGGINGFACE_CO_STAGING"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    patches = {
        "ENDPOINT": server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
    }
    if not implicit_token:
        patches["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = True
    for name, value in patches.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", server.url)
