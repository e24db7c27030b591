"""``LocalZoo``: the embedded default zoo, a directory of entries with immutable revisions.

Layout (like the Hugging Face cache, so revisions mean the same in both backends)::

    <root>/<name>/revisions/<revision>/   one published entry, never modified after publishing
    <root>/<name>/refs/main               the revision ``main`` points to

The root is ``$LIGHTNING_PEFT_ZOO`` if set, else ``$XDG_CACHE_HOME/lightning-peft/zoo`` (default
``~/.cache/lightning-peft/zoo``), unless passed explicitly. A publish copies the entry into a
hidden temporary folder, renames it into place (atomic), then moves ``refs/main``: an interrupted
publish leaves no entry, and readers never see a half-written one. A publish that fails (disk full,
read-only) removes what it wrote and raises one :class:`~lightning_peft.fileio.StorageError` line.

The temporary folder's name records its writer (``.publish-<host>~<pid>~<start time>~<boot id>~…``),
so a publisher killed midway (``SIGKILL``, power loss) is recognised later: each publish removes the
temporaries whose writer is gone (another boot, no such process, or the pid now belongs to a process
started at another time), and keeps those of live writers and of other hosts sharing the folder.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_peft.fileio import staged_file, storage_error, user_cache_dir
from lightning_peft.zoo.entry import EntryError, read_manifest, validate_name, verify_files

__all__ = ["EntryInfo", "LocalZoo", "default_root"]


@dataclass
class EntryInfo:
    """What a listing shows of an entry."""

    name: str
    revision: str
    method: str = ""
    base_model: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    created: str = ""
    location: str = ""
    tags: list[str] = field(default_factory=list)

    @classmethod
    def from_manifest(cls, name: str, revision: str, manifest: dict[str, Any], location: str) -> EntryInfo:
        return cls(
            name=name,
            revision=revision,
            method=manifest.get("method", ""),
            base_model=(manifest.get("base_model") or {}).get("name"),
            metrics=dict(manifest.get("metrics") or {}),
            created=manifest.get("created", ""),
            location=location,
            tags=["lightning-peft", manifest.get("method", "")],
        )

    def matches(self, query: str | None = None, method: str | None = None, base_model: str | None = None) -> bool:
        """What ``zoo search`` finds, the same for every zoo: case-insensitive throughout; ``method`` names the
        method (``LISA`` = ``lisa``); ``base_model`` is a substring of the base model's id; ``query`` a substring of
        the name, the method, the base model or a tag."""
        if method and self.method.lower() != method.lower():
            return False
        if base_model and base_model.lower() not in (self.base_model or "").lower():
            return False
        if query:
            fields = [self.name, self.method, self.base_model or "", *self.tags]
            return any(query.lower() in text.lower() for text in fields)
        return True


def default_root() -> Path:
    """``$LIGHTNING_PEFT_ZOO``, else ``$XDG_CACHE_HOME/lightning-peft/zoo``, else ``~/.cache/lightning-peft/zoo``."""
    return user_cache_dir("zoo", "LIGHTNING_PEFT_ZOO")


class LocalZoo:
    """A zoo in a local directory.

    Args:
        root: the directory (created on first publish); default :func:`default_root`.

    Example:
        >>> import tempfile
        >>> LocalZoo(tempfile.mkdtemp()).list()
        []
    """

    kind = "local"

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()

    def __repr__(self) -> str:
        return f"LocalZoo({str(self.root)!r})"

    def _entry_dir(self, name: str) -> Path:
        path = (self.root / validate_name(name)).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"zoo entry name {name!r} leads outside the zoo at {self.root}")
        return path

    def publish(self, folder: str | os.PathLike, name: str) -> str:
        """Copy a built entry folder in as a new revision of ``name`` and point ``main`` at it. Returns the revision."""
        entry = self._entry_dir(name)  # the name is checked before anything is read or written
        folder = Path(folder)
        manifest = verify_files(folder)
        revisions = entry / "revisions"
        revision = _revision_id(manifest)
        target = revisions / revision
        created = [d for d in (self.root, entry, revisions, entry / "refs") if not d.exists()]
        wrote_target = False
        try:
            revisions.mkdir(parents=True, exist_ok=True)
            self.clean_stale()
            if not target.exists():
                tmp = Path(tempfile.mkdtemp(prefix=_publish_prefix(), dir=revisions))
                try:
                    _copy_tree(folder, tmp)
                    os.replace(tmp, target)
                    wrote_target = True
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            with staged_file(entry / "refs" / "main") as ref:
                ref.write_text(revision + "\n")
        except OSError as err:  # leave nothing behind: the new revision and the folders this publish made
            if wrote_target:
                shutil.rmtree(target, ignore_errors=True)
            for made in reversed(created):
                with contextlib.suppress(OSError):
                    made.rmdir()  # only if empty: a concurrent publish keeps what it wrote
            raise storage_error(err, entry, f"writing entry {name!r}") from err
        return revision

    def clean_stale(self) -> list[Path]:
        """Remove the hidden temporaries of publishes whose writer is gone (killed). Returns what was removed.

        Only a temporary whose name records a writer on this host that no longer runs (or ran before the
        last boot) is removed; those of live publishers, of other hosts and of unknown writers are kept.
        """
        removed = []
        for tmp in self.root.glob(f"*/revisions/{_PUBLISH}*"):
            if tmp.is_dir() and _writer_gone(tmp.name):
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
        return removed

    def revisions(self, name: str) -> list[str]:
        """Revisions of ``name``, oldest first."""
        revisions = self._entry_dir(name) / "revisions"
        if not revisions.is_dir():
            return []
        found = [p for p in revisions.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime_ns)]

    def _resolve(self, name: str, revision: str | None) -> tuple[str, Path]:
        entry = self._entry_dir(name)
        if not entry.is_dir():
            known = ", ".join(e.name for e in self.list()) or "none"
            raise FileNotFoundError(f"no entry {name!r} in the local zoo at {self.root} (entries: {known})")
        if revision in (None, "main"):
            ref = entry / "refs" / "main"
            if not ref.is_file():
                raise EntryError(f"zoo entry {name!r} has no main revision (an interrupted publish?)")
            revision = ref.read_text().strip()
        matches = [r for r in self.revisions(name) if r == revision or r.startswith(str(revision))]
        if len(matches) != 1:
            raise FileNotFoundError(
                f"revision {revision!r} of {name!r} not found in the local zoo; it has {self.revisions(name)}"
            )
        return matches[0], entry / "revisions" / matches[0]

    def download(self, name: str, revision: str | None = None) -> Path:
        """The folder of ``name`` at ``revision`` (default ``main``), after checking every file's sha256."""
        _, path = self._resolve(name, revision)
        verify_files(path)
        return path

    def info(self, name: str, revision: str | None = None) -> EntryInfo:
        """The listing row of one entry revision."""
        rev, path = self._resolve(name, revision)
        return EntryInfo.from_manifest(name, rev, read_manifest(path), str(path))

    def list(self) -> builtins.list[EntryInfo]:
        """Every entry at its ``main`` revision, by name."""
        if not self.root.is_dir():
            return []
        out = []
        for entry in sorted(self.root.iterdir()):
            if entry.is_dir() and not entry.name.startswith(".") and (entry / "refs" / "main").is_file():
                try:
                    out.append(self.info(entry.name))
                except (EntryError, FileNotFoundError, ValueError):
                    continue  # a broken entry does not hide the others
        return out

    def search(
        self, query: str | None = None, method: str | None = None, base_model: str | None = None
    ) -> builtins.list[EntryInfo]:
        """Entries that match (:meth:`EntryInfo.matches`: case-insensitive, over name, method, base model, tags)."""
        return [e for e in self.list() if e.matches(query, method, base_model)]

    def rm(self, name: str) -> None:
        """Delete an entry with all its revisions."""
        entry = self._entry_dir(name)
        if not entry.is_dir():
            raise FileNotFoundError(f"no entry {name!r} in the local zoo at {self.root}")
        trash = entry.with_name(f".rm-{entry.name}-{os.getpid()}")
        try:
            os.replace(entry, trash)  # atomic: readers see the entry or nothing
        except OSError as err:
            raise storage_error(err, entry, f"deleting entry {name!r}") from err
        shutil.rmtree(trash, ignore_errors=True)


def _revision_id(manifest: dict[str, Any]) -> str:
    import hashlib
    import json

    return hashlib.sha256(
        json.dumps(manifest["files"], sort_keys=True).encode() + manifest["created"].encode()
    ).hexdigest()[:12]


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy ``src``'s files into the existing ``dst``, stopping at the first error (``copytree`` collects them)."""
    for path in sorted(src.rglob("*")):
        out = dst / path.relative_to(src)
        if path.is_dir():
            out.mkdir(exist_ok=True)
        else:
            shutil.copy2(path, out)


_PUBLISH = ".publish-"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:12]
    except OSError:
        return "0"  # unknown: not Linux


def _start_time(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot, from ``/proc``); ``"0"`` if unknown, ``""`` if none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ""
    except OSError:
        return "0"
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name before it may hold spaces


def _host() -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in socket.gethostname())[:64]


def _publish_prefix() -> str:
    """``.publish-<host>~<pid>~<start>~<boot>~``: what :func:`_writer_gone` reads back."""
    pid = os.getpid()
    return f"{_PUBLISH}{_host()}~{pid}~{_start_time(pid) or 0}~{_boot_id()}~"


def _writer_gone(name: str) -> bool:
    """Whether the publish that made the temporary ``name`` certainly no longer runs."""
    fields = name[len(_PUBLISH) :].split("~")
    if len(fields) != 5 or fields[0] != _host() or not fields[1].isdigit():
        return False  # another host, or a name this version did not write: cannot tell
    pid, started, boot = int(fields[1]), fields[2], fields[3]
    if boot != "0" and _boot_id() not in ("0", boot):
        return True  # written before the last reboot
    now = _start_time(pid)
    if now == "0" or (now and started == "0"):  # no /proc: only whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return now != started  # no such process, or the pid was reused by a later one
