"""The one place rmt-edge deletes or replaces files, so that it can only touch what it wrote.

Four rules, one function each:
- a temporary file of an atomic write is named ``.<name>.<8 hex digits>.tmp`` (the name escaped
  in every match, never a glob); only a regular file of exactly that name is removed as stale;
- an existing file is replaced only when it is a regular file (not a symbolic link, directory or
  device) that is empty or of the format being written (``file_format``): ``rmt-run
  --save-outputs notes.txt`` refuses instead of replacing the notes;
- a directory is replaced only when a check of its kind says rmt-edge wrote all of it (a bundle:
  its manifest lists every file; a Triton model folder: its ``.rmt-edge-model.json``) and nothing
  at or under it is a symbolic link; a failed replacement puts the old one back and leaves no
  staging or retired folder;
- names that become one path component (a Triton model name) are checked by ``check_name``.

Torch-free, numpy-free: the bottom layer, used by the runtime, the exporter and the scripts.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

NAME_MAX = 128
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")


class NotOwnedError(FileExistsError):
    """A path rmt-edge would delete or replace is not verifiably one it wrote; nothing was changed.
    An OSError, so that a command reports it as one line naming the path."""


def check_name(name, what: str, error: type[Exception] = ValueError) -> str:
    """``name`` when it is a safe single path component: letters, digits, '_', '-' and '.', not
    first '.' or '-' (so not '.', '..' or a hidden or option-like name), no separator or NUL, at
    most NAME_MAX characters; else ``error`` naming ``what``, what it got and what is allowed."""
    allowed = (f"use letters, digits, '_', '-' and '.', not '.' or '-' first, at most {NAME_MAX} characters "
               "(one folder name: no '/', '..' or NUL)")
    if not isinstance(name, str):
        raise error(f"{what} must be a string, got {name!r}: {allowed}")
    if not name or len(name) > NAME_MAX or not _NAME.match(name):
        raise error(f"{what} {name!r} is not a safe name: {allowed}")
    return name


# ---- temporary files of atomic writes ---------------------------------------------------------------
def temporary_name(name: str) -> str:
    """A fresh name for a temporary file of ``name`` (what ``temporary_pattern`` matches)."""
    return f".{name}.{secrets.token_hex(4)}.tmp"


def temporary_pattern(name: str) -> re.Pattern:
    """The names ``temporary_name(name)`` gives, and nothing else: ``name`` is escaped, so a name
    holding ``*``, ``?`` or ``[`` matches only itself."""
    return re.compile(r"\." + re.escape(name) + r"\.[0-9a-f]{8}\.tmp\Z")


def create_temporary(path: Path) -> tuple[int, Path]:
    """Create (O_EXCL, mode 0600) a new temporary file beside ``path``; its descriptor and path."""
    for _ in range(100):
        temporary = path.with_name(temporary_name(path.name))
        try:
            return os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600), temporary
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {path}: 100 names were taken")


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporary files a killed atomic write of ``path`` left: regular files (not
    links, not folders) whose whole name matches ``temporary_pattern``. The ones removed."""
    pattern = temporary_pattern(path.name)
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        if pattern.match(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:  # another process's cleanup was first
                continue
            removed.append(Path(entry.path))
    return removed


# ---- replacing a file -------------------------------------------------------------------------------
def file_format(path: Path) -> str:
    """What ``path`` holds, as far as replacing it is concerned: 'empty', 'npz' (a zip of .npy
    members: state files, --save-outputs), 'torch checkpoint', 'zip', 'json', or 'data' for
    anything else (what rmt-edge writes as raw bytes, only into its own engines/ folder: an
    engine, a timing cache, which a rebuild replaces whatever TensorRT wrote before)."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "data"
        if names and all(name.endswith(".npy") for name in names):
            return "npz"
        if any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
            return "torch checkpoint"
        return "zip"
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    return "data"


def replace_reason(path: Path, new_format: str | None = None) -> str | None:
    """Why ``path`` may not be replaced by a file of ``new_format`` (None: it may). A missing path
    may; a symbolic link (even to a file of ours), a directory, a device or a FIFO may not; a
    regular file may when it is empty or of ``new_format`` (any format when None)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link; rmt-edge replaces only a regular file, never a link (give the file itself)"
    if stat.S_ISDIR(info.st_mode):
        return "is a directory; give the path of a file"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file (a device, a FIFO or a socket); rmt-edge replaces only regular files"
    if new_format is None:
        return None
    try:
        old = file_format(path)
    except OSError as exc:
        return f"cannot be read to check what it holds ({exc.strerror})"
    if old not in ("empty", new_format):
        return (f"exists and holds {old}, not {new_format}: rmt-edge replaces only a file of the kind it "
                "writes, so nothing was changed (remove it or give another path)")
    return None


def replace_file(temporary: Path, path: Path) -> None:
    """Move the finished ``temporary`` over ``path`` when ``replace_reason`` allows it for the
    temporary's format; else remove the temporary and raise NotOwnedError."""
    reason = replace_reason(path, file_format(temporary))
    if reason:
        remove_file(temporary)
        raise NotOwnedError(f"{path} {reason}")
    os.replace(temporary, path)


def remove_file(path: Path) -> None:
    """Remove a file this process created (a temporary): a regular file or nothing; never a
    link's target or a folder."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(info.st_mode):
        raise NotOwnedError(f"{path} is not a regular file rmt-edge wrote; not removed")
    os.unlink(path)


def remove_owned_file(path: Path, kind: str, error: type[Exception]) -> bool:
    """Remove ``path`` when it is a regular file holding ``kind`` (``file_format``: 'npz', 'json',
    ...), what rmt-edge writes there; ``error`` otherwise. Whether there was one to remove."""
    if not path.is_symlink() and not path.exists():
        return False
    reason = replace_reason(path, kind)
    if reason is None and file_format(path) != kind:
        reason = f"holds {file_format(path)}, not {kind}"
    if reason:
        raise error(f"{path} {reason}; nothing was removed")
    remove_file(path)
    return True


# ---- directories ------------------------------------------------------------------------------------
def links_under(directory: Path) -> list[str]:
    """Symbolic links at or under ``directory`` (relative names), without following any."""
    if directory.is_symlink():
        return ["."]
    found = []
    for root, folders, files in os.walk(directory, followlinks=False):
        for name in folders + files:
            if os.path.islink(os.path.join(root, name)):
                found.append(os.path.relpath(os.path.join(root, name), directory))
    return sorted(found)


def directory_reason(directory: Path, not_ours: Callable[[Path], str | None]) -> str | None:
    """Why the existing ``directory`` may not be replaced (None: it may, or it does not exist): a
    link at or under it, not a folder, or ``not_ours`` (the check of its kind) says why."""
    if not directory.is_symlink() and not directory.exists():
        return None
    links = links_under(directory)
    if links == ["."]:
        return "is a symbolic link; give the folder itself"
    if not directory.is_dir():
        return "is a file, not a folder"
    if links:
        return f"holds symbolic links ({', '.join(links[:5])}); rmt-edge replaces no folder that links elsewhere"
    return not_ours(directory)


def new_sibling_directory(target: Path, role: str) -> Path:
    """A fresh hidden folder beside ``target`` (``.<name>.<role>-XXXXXXXX``) to stage or retire it."""
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{role}-", dir=target.parent))


def replace_directory(staging: Path, target: Path, not_ours: Callable[[Path], str | None],
                      error: type[Exception]) -> None:
    """Move the finished ``staging`` folder to ``target``. An existing ``target`` is checked again
    (``directory_reason``: ``error`` when it is not ours), moved aside, and removed only once the
    new one is in place; when the move fails, it is put back. No retired folder is left."""
    if not target.is_symlink() and not target.exists():
        os.replace(staging, target)
        return
    reason = directory_reason(target, not_ours)
    if reason:
        raise error(f"{target} {reason}; nothing was replaced")
    retired = new_sibling_directory(target, "old")
    try:
        os.replace(target, retired / target.name)
    except BaseException:
        os.rmdir(retired)
        raise
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(retired / target.name, target)
        os.rmdir(retired)
        raise
    remove_tree(retired)


def remove_tree(directory: Path) -> None:
    """Remove a folder rmt-edge made or verified as its own (a staging, retired or work folder):
    never through a link (one at ``directory`` is refused; links inside are removed as links)."""
    if directory.is_symlink():
        raise NotOwnedError(f"{directory} is a symbolic link; not removed")
    if directory.exists():
        shutil.rmtree(directory, ignore_errors=True)


def remove_owned_tree(directory: Path, not_ours: Callable[[Path], str | None], error: type[Exception]) -> bool:
    """Remove ``directory`` when ``directory_reason`` finds it ours; ``error`` otherwise. Whether
    there was one to remove."""
    reason = directory_reason(directory, not_ours)
    if reason:
        raise error(f"{directory} {reason}; nothing was removed")
    if not directory.exists():
        return False
    remove_tree(directory)
    return True


__all__ = ["NAME_MAX", "NotOwnedError", "check_name", "create_temporary", "directory_reason", "file_format",
           "links_under", "new_sibling_directory", "remove_file", "remove_owned_file", "remove_owned_tree", "remove_stale_temporaries",
           "remove_tree", "replace_directory", "replace_file", "replace_reason", "temporary_name",
           "temporary_pattern"]
