"""Writing files so that nothing a user saved is ever half-written.

Everything is first written into a temporary folder beside the destination, then moved into place
with ``os.replace`` (atomic on one file system). A crash mid-write leaves the previous files intact.
A write that fails for want of space or permission is reported as one :class:`StorageError` line
that names the device or folder and what to do (:func:`storage_error`).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["StorageError", "check_writable", "mount_of", "staged_dir", "staged_file", "storage_error", "user_cache_dir"]


class StorageError(OSError):
    """A file could not be written (disk full, read-only, no permission); the message says where and what to do.

    ``errno`` and ``filename`` are those of the failed write; ``str()`` is the one-line message alone.
    """

    def __str__(self) -> str:
        return str(self.strerror if self.strerror is not None else super().__str__())


def user_cache_dir(name: str, env: str) -> Path:
    """``$<env>``, else ``$XDG_CACHE_HOME/lightning-peft/<name>``, else ``~/.cache/lightning-peft/<name>``."""
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "lightning-peft" / name


def _existing(path: Path) -> Path:
    """``path`` or its nearest parent that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def mount_of(path: str | os.PathLike) -> tuple[str, str]:
    """``(device, mount point)`` of the file system holding ``path`` (or its nearest existing parent).

    The device is the mount's source as ``/proc/self/mounts`` lists it (e.g. ``/dev/nvme0n1p2``,
    ``tmpfs``); where that cannot be read it is the mount point itself.
    """
    mount = _existing(Path(os.path.abspath(path)))
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        with open("/proc/self/mounts") as f:
            sources = {fields[1]: fields[0] for fields in (line.split() for line in f) if len(fields) > 1}
    except OSError:
        sources = {}
    return sources.get(str(mount), str(mount)), str(mount)


def storage_error(err: OSError, path: str | os.PathLike, doing: str) -> StorageError:
    """One line for an ``OSError`` raised at ``path`` while ``doing`` (e.g. ``"writing entry 'x'"``).

    Example:
        >>> import errno
        >>> print(storage_error(OSError(errno.EACCES, "Permission denied"), "/srv", "writing x"))
        no permission for /srv while writing x: choose a folder you can write to, or fix its permissions
    """
    if isinstance(err, StorageError):
        return err
    code = err.errno
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        device, mount = mount_of(path)
        on = device if device == mount else f"{device} (mounted at {mount})"
        if code == errno.EROFS:
            message = f"{on} is read-only, so {doing} at {path} failed: choose a writable folder"
        else:
            what = "no space left" if code == errno.ENOSPC else "disk quota exceeded"
            message = f"{what} on {on} while {doing} at {path}: free some space there or use another folder"
    elif code in (errno.EACCES, errno.EPERM):
        message = f"no permission for {path} while {doing}: choose a folder you can write to, or fix its permissions"
    else:
        reason = err.strerror or str(err) or type(err).__name__
        where = f" ({err.filename})" if err.filename and str(err.filename) != str(path) else ""
        message = f"{doing} at {path} failed: {reason}{where}"
    return StorageError(code, message, str(path))


def check_writable(folder: str | os.PathLike, doing: str) -> Path:
    """Prove that ``folder`` can be written (or created) without creating anything. Returns the folder.

    A probe file is written and removed in ``folder`` or, if it does not exist yet, in its nearest
    existing parent.

    Raises:
        StorageError: it cannot be written, with the reason in one line.
    """
    folder = Path(os.path.abspath(folder))
    probe = _existing(folder)
    try:
        if not probe.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{probe} is a file", str(probe))
        fd, name = tempfile.mkstemp(prefix=".write-check-", dir=probe)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as err:
        raise storage_error(err, folder, doing) from err
    return folder


def _mode(directory: bool) -> int:
    """The permissions a plain ``open``/``mkdir`` would give under the current umask (mkdtemp/mkstemp use 0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextmanager
def staged_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder; on success its files replace those in ``target``.

    A new ``target`` is created by renaming the whole temporary folder (atomic); an existing one has
    each file replaced atomically, and files of ``target`` not written here are kept. On an error
    nothing in ``target`` changes and the temporary folder is removed.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "adapter"
        >>> with staged_dir(out) as tmp:
        ...     _ = (tmp / "a.txt").write_text("hi")
        >>> (out / "a.txt").read_text()
        'hi'
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory; pass a directory path")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        dir_mode, file_mode = _mode(True), _mode(False)
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod(dir_mode if path.is_dir() else file_mode)
        if not target.exists():
            os.replace(tmp, target)
            return
        for src in sorted(tmp.rglob("*")):
            if src.is_file():
                dst = target / src.relative_to(tmp)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` atomically, else it is removed.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "x.txt"
        >>> with staged_file(out) as tmp:
        ...     _ = tmp.write_text("hi")
        >>> out.read_text()
        'hi'
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(_mode(False))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
