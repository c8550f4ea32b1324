"""Atomic file writes: a file at ``path`` is either the old one or the complete new one, never a part."""

from __future__ import annotations

import contextlib
import os
import pathlib
import uuid
from collections.abc import Callable

__all__ = ["write_atomic", "write_text_atomic"]


def _fsync_dir(directory: str) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write a file through a temporary sibling, then move it into place with one rename.

    ``write(tmp)`` fills a fresh temporary file in the same directory as ``path``;
    the temporary file is then fsynced and renamed over ``path`` with
    ``os.replace`` (atomic on POSIX and Windows), and the directory is fsynced.
    If anything fails, the temporary file is removed, ``path`` keeps its old
    content (or stays absent), and the error propagates.

    Args:
        path: destination file; its directory must exist.
        write: a function that writes the complete file at the path it is given.

    Raises:
        Whatever ``write``, the fsync or the rename raise.

    Example:
        >>> import os, pathlib, tempfile
        >>> d = tempfile.mkdtemp()
        >>> write_atomic(os.path.join(d, "a.txt"), lambda tmp: pathlib.Path(tmp).write_text("hi"))
        >>> open(os.path.join(d, "a.txt")).read(), os.listdir(d)
        ('hi', ['a.txt'])
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # 0o666 minus the umask, like open(path, "w")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text to ``path`` with :func:`write_atomic`.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "a.json")
        >>> write_text_atomic(path, "{}")
        >>> open(path).read()
        '{}'
    """
    write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8"))
