"""Writing files so that nothing a user saved is ever half-written.

Everything is first written into a temporary folder beside the destination, then moved into place
with ``os.replace`` (atomic on one file system). A crash mid-write leaves the previous files intact.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["staged_dir", "staged_file"]


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
