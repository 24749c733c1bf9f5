"""Atomic file writes: a temporary file in the same directory, fsynced, then renamed over the
target. A reader sees the old file or the new one, never a half-written one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def as_path(value, what: str, error: type[Exception]) -> Path:
    """``value`` as a Path, or ``error`` naming the argument when it is not a path at all."""
    if isinstance(value, bool) or not isinstance(value, (str, os.PathLike)) or value == "":
        raise error(f"{what} must be a file system path (str or os.PathLike), got {value!r}")
    return Path(value)


def unwritable_reason(path: Path) -> str | None:
    """Why ``path`` cannot be written as a file, for the cases an OSError words badly: a
    directory at the path, or a regular file where a parent directory should be."""
    if path.is_dir():
        return "is a directory; give the path of a file"
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else f"{parent} is not a directory"
    return None


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # named by the file asked for, not by the temporary's random name
        raise type(exc)(exc.errno, f"cannot create a file in {path.parent} ({exc.strerror})", str(path)) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
