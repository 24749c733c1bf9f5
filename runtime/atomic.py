"""Atomic file writes: a temporary file in the same directory, fsynced, then renamed over the
target. A reader sees the old file or the new one, never a half-written one; the target is
replaced only under the rules of ``owned_files`` (a regular file of the kind being written)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable

from .owned_files import NotOwnedError, create_temporary, remove_file, replace_file, replace_reason


def as_path(value, what: str, error: type[Exception]) -> Path:
    """``value`` as a Path, or ``error`` naming the argument when it is not a path at all."""
    if isinstance(value, bool) or not isinstance(value, (str, os.PathLike)) or value == "":
        raise error(f"{what} must be a file system path (str or os.PathLike), got {value!r}")
    return Path(value)


def unwritable_reason(path: Path, writes: str | None = "npz") -> str | None:
    """Why ``path`` cannot be written as a file, checked before any work: a directory at the
    path, a regular file where a parent directory should be, or an existing path that
    ``write_atomically`` would refuse to replace with a file of the format ``writes`` (a link,
    a device, a file of another kind; every caller today writes .npz archives)."""
    if path.is_dir() and not path.is_symlink():
        return "is a directory; give the path of a file"
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is not a directory"
            break
    return replace_reason(path, writes)


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
    (with the mode ``file_mode_for`` gives). An existing ``path`` is replaced only when it is a
    regular file, empty or of the kind just written (``owned_files.replace_reason``); else
    NotOwnedError, and nothing is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    reason = replace_reason(path)  # a link, a folder, a device: refused before writing anything
    if reason:
        raise NotOwnedError(f"{path} {reason}")
    try:
        fd, tmp = create_temporary(path)
    except OSError as exc:  # named by the file asked for, not by the temporary's random name
        raise type(exc)(exc.errno, f"cannot create a file in {path.parent} ({exc.strerror})", str(path)) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fchmod(handle.fileno(), file_mode_for(path))
            os.fsync(handle.fileno())
        replace_file(tmp, path)  # only over nothing, an empty file or one of the same kind
    except BaseException:
        remove_file(tmp)
        raise
    return path
