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


def current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc/self/status),
    else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode_for(path: Path) -> int:
    """The mode a rewritten ``path`` gets: the existing file's, else what ``open`` would give a
    new file (0666 less the umask). A temporary file is created 0600; renamed as it is, a
    checkpoint or state file would be unreadable to the other users its directory allows."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~current_umask()


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, then move it into place
    (with the mode ``file_mode_for`` gives)."""
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
            os.fchmod(handle.fileno(), file_mode_for(path))
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
