"""Per-sequence state, separate from the shared runtime, and its versioned file format.

A ``SequenceState`` holds B rows (independent sequences batched together): every named
state tensor of the bundle's state pairs (RMT: ``memory``) in two backend buffers each
(ping-pong: a graph never reads and writes the same buffer), the tokens of each row's
partial segment not yet run, and counters. State files are .npz archives of plain arrays
(no pickle), written atomically, hold every named state, and name the bundle they belong to.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .atomic import as_path, unwritable_reason, write_atomically
from .errors import RuntimeInputError, StateError, StateInUseError
from .schema import (READABLE_STATE_VERSIONS, STATE_FORMAT, STATE_HEADER_LIMIT, STATE_VERSION, DocumentError,
                     check_state_counters, check_state_header, parse_json)
from .owned_files import remove_stale_temporaries

READABLE_VERSIONS = READABLE_STATE_VERSIONS
STATE_PREFIX = "state."


@dataclass(repr=False)
class SequenceState:
    """The state of B sequences run together. One user at a time: every RMTRuntime call that
    reads or writes it holds it (``using``) for as long as its result depends on it."""

    handles: dict[str, Any]   # state input name -> backend handle [B, ...]: the current state
    scratch: dict[str, Any]   # state input name -> backend handle: where the next segment writes
    pending: list[np.ndarray]   # per row: tokens of the partial segment not yet run
    tokens_seen: np.ndarray     # [B] int64: tokens fed so far (pending included)
    segments_done: np.ndarray   # [B] int64: segments run into memory
    last_logits: np.ndarray | None = None  # [B, V] decoder / [B, labels] encoder, after the last segment
    has_logits: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    bundle_identity: str = ""   # the bundle whose runtime made it: another bundle's runtime refuses it
    _in_use: threading.Lock = field(default_factory=threading.Lock, compare=False)

    @contextlib.contextmanager
    def using(self) -> Iterator["SequenceState"]:
        """Hold the state for one operation. A state is one thread's at a time: a second
        thread using it meanwhile gets an error instead of silently mixing two streams."""
        release = SequenceState.hold_all([self])
        try:
            yield self
        finally:
            release()

    @staticmethod
    def hold_all(states: Iterable["SequenceState"]) -> Callable[[], None]:
        """Take every distinct state of ``states`` (the same state twice is taken once), without
        waiting: when one is in use, the ones taken are given back and StateInUseError is raised.
        Returns the release, which gives all of them back (a second call does nothing), so that
        a hold can outlive the call that took it (an iterator's)."""
        distinct = list({id(state): state for state in states}.values())
        taken: list[SequenceState] = []
        for state in distinct:
            if not state._in_use.acquire(blocking=False):
                for held in reversed(taken):
                    held._in_use.release()
                raise StateInUseError("this SequenceState is being used by another thread (or by a generation "
                                      "that has not finished); a state belongs to one thread at a time: give each "
                                      "thread its own state (RMTRuntime.new_state, or unstack)")
            taken.append(state)

        def release() -> None:
            while taken:
                taken.pop()._in_use.release()
        return release

    @property
    def batch(self) -> int:
        return len(self.pending)

    @property
    def in_use(self) -> bool:
        """Whether an operation holds the state now."""
        return self._in_use.locked()

    def swap(self) -> None:
        """After a segment: the buffers just written become the state."""
        self.handles, self.scratch = self.scratch, self.handles

    def __repr__(self) -> str:
        # Read only while held: a repr taken meanwhile says so instead of showing a torn state.
        if not self._in_use.acquire(blocking=False):
            return f"SequenceState(batch={self.batch}, in use)"
        try:
            return (f"SequenceState(batch={self.batch}, state={sorted(self.handles)}, "
                    f"tokens_seen={self.tokens_seen.tolist()}, segments_done={self.segments_done.tolist()}, "
                    f"pending={[len(p) for p in self.pending]}, bundle={self.bundle_identity[:12] or '?'})")
        finally:
            self._in_use.release()


@contextlib.contextmanager
def locked_state_file(path: str | os.PathLike, waiting: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive OS lock (``flock`` on ``.<name>.lock`` beside it) for one
    read-modify-write of a state file, so that two invocations on one file run one after the
    other instead of one overwriting the other's update. ``waiting`` is told when another
    holder makes this one wait. Temporary files of a save that was killed are removed here."""
    path = as_path(path, "the state file path", RuntimeInputError)
    reason = unwritable_reason(path)
    if reason:
        raise StateError(f"{path}: cannot be a state file: {reason}")
    lock_path = path.with_name(f".{path.name}.lock")
    try:
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StateError(f"{path}: cannot lock the state file ({exc.strerror}: {lock_path})") from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting(f"{path} is in use by another process; waiting for it to finish")
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        remove_stale_temporaries(path)  # write_atomically's, from a killed save: its exact names only
        yield
    finally:
        os.close(descriptor)


def save_state_file(path: str | os.PathLike, bundle_identity: str, bundle_path: str,
                    tensors: dict[str, np.ndarray], state: SequenceState) -> Path:
    """Write ``state`` (with its state ``tensors`` read from the device) atomically to ``path``."""
    path = as_path(path, "the state file path", RuntimeInputError)
    reason = unwritable_reason(path)
    if reason:
        raise StateError(f"{path}: cannot write the state file: {reason}")
    header = {"format": STATE_FORMAT, "version": STATE_VERSION, "bundle_identity": bundle_identity,
              "bundle_path": bundle_path, "batch": state.batch, "state": sorted(tensors)}
    lengths = np.array([len(p) for p in state.pending], dtype=np.int64)
    arrays = {
        "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
        **{STATE_PREFIX + name: np.ascontiguousarray(value) for name, value in tensors.items()},
        "pending_tokens": np.concatenate(state.pending).astype(np.int64) if lengths.sum() else np.zeros(0, np.int64),
        "pending_lengths": lengths,
        "tokens_seen": state.tokens_seen.astype(np.int64),
        "segments_done": state.segments_done.astype(np.int64),
        "has_logits": state.has_logits.astype(bool),
    }
    if state.last_logits is not None:
        arrays["last_logits"] = state.last_logits.astype(np.float32)
    try:
        write_atomically(path, lambda handle: np.savez(handle, **arrays))
    except OSError as exc:
        raise StateError(f"{path}: cannot write the state file ({exc.strerror or exc})") from None
    return path


@dataclass
class LoadedState:
    """A state file's contents, checked; ``memory`` still on the host."""

    header: dict[str, Any]
    tensors: dict[str, np.ndarray]
    pending: list[np.ndarray]
    tokens_seen: np.ndarray
    segments_done: np.ndarray
    last_logits: np.ndarray | None
    has_logits: np.ndarray


@dataclass(frozen=True)
class StateLayout:
    """What a state file of one bundle must hold: its state tensors' shapes (without the batch
    axis), the vocabulary pending ids must fall in, the width of the saved logits, and the
    segment size the counters are checked against (None: not known to the reader)."""

    state_shapes: dict[str, tuple[int, ...]]
    vocab_size: int
    logits_width: int
    segment_size: int | None = None


_COUNTERS = ("pending_lengths", "tokens_seen", "segments_done", "has_logits")
_HEADER_LIMIT = STATE_HEADER_LIMIT
# The largest state file restored: far above any real state (the ARMT's per-layer matrices of a
# 1B model at batch 64 are ~2 GB); a larger file is refused before it is opened as an archive.
STATE_FILE_LIMIT = 1 << 34


def _member_header(archive: zipfile.ZipFile, member: str, path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    """dtype and shape of one .npy member, read from its header alone (nothing is allocated by
    what the header claims): the member must be stored uncompressed, as rmt-edge writes it, and
    hold exactly the bytes its header declares."""
    info = archive.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED:
        raise StateError(f"{path}: member {member} is compressed; rmt-edge writes state files uncompressed "
                         "(refusing to inflate it)")
    try:
        with archive.open(member) as handle:
            version = np.lib.format.read_magic(handle)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(handle, max_header_size=_HEADER_LIMIT)
            offset = handle.tell()
    except (ValueError, OSError, EOFError) as exc:
        raise StateError(f"{path}: member {member} is not a readable .npy array ({exc})") from None
    if dtype.hasobject or fortran:
        raise StateError(f"{path}: member {member} holds {dtype} {'Fortran-ordered ' if fortran else ''}data; "
                         "state files hold plain C-ordered numbers")
    declared = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize
    if declared != info.file_size - offset:
        raise StateError(f"{path}: member {member} declares shape {list(shape)} ({declared} bytes) but holds "
                         f"{info.file_size - offset} bytes")
    return dtype, tuple(shape)


def _read_member(archive: zipfile.ZipFile, member: str) -> np.ndarray:
    with archive.open(member) as handle:
        return np.lib.format.read_array(handle, allow_pickle=False)


def load_state_file(path: str | os.PathLike, bundle_identity: str, bundle_path: str,
                    layout: StateLayout) -> LoadedState:
    """Read and check a state file before anything it claims is allocated: it must be an
    rmt-edge state of the bundle ``bundle_identity``, with the members, dtypes and shapes
    ``layout`` gives, ids inside the vocabulary, consistent counters and finite numbers."""
    path = as_path(path, "the state file path", RuntimeInputError)
    if not path.exists():
        raise StateError(f"{path}: no such state file")
    if not path.is_file():
        raise StateError(f"{path}: not a regular file; a state file is an .npz archive written by save_state")
    if path.stat().st_size > STATE_FILE_LIMIT:
        raise StateError(f"{path}: {path.stat().st_size} bytes, more than the {STATE_FILE_LIMIT} a state file "
                         "can be")
    try:
        with zipfile.ZipFile(path) as archive:
            return _load_checked(archive, path, bundle_identity, bundle_path, layout)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise StateError(f"{path}: not a readable rmt-edge state file ({exc})") from None


def _load_checked(archive: zipfile.ZipFile, path: Path, bundle_identity: str, bundle_path: str,
                  layout: StateLayout) -> LoadedState:
    members = {name[:-4]: name for name in archive.namelist() if name.endswith(".npy")}
    if "header" not in members or archive.getinfo(members["header"]).file_size > _HEADER_LIMIT:
        raise StateError(f"{path}: not an rmt-edge state file (no readable header)")
    dtype, shape = _member_header(archive, members["header"], path)
    if dtype != np.uint8 or len(shape) != 1:
        raise StateError(f"{path}: not an rmt-edge state file (no readable header)")
    try:
        document = parse_json(bytes(_read_member(archive, members["header"])), str(path), "state header")
    except (DocumentError, ValueError):
        raise StateError(f"{path}: not an rmt-edge state file (no readable header)") from None
    try:
        checked = check_state_header(document, str(path))
    except DocumentError as exc:
        raise StateError(str(exc)) from None
    header = checked.model_dump()
    if checked.bundle_identity != bundle_identity:
        raise StateError(f"{path}: saved from bundle {checked.bundle_path!r} "
                         f"(identity {checked.bundle_identity}), not from bundle {bundle_path!r} "
                         f"(identity {bundle_identity}); a state only continues on its own bundle")
    batch = checked.batch
    if checked.version == 1:  # the RMT's memory under its own name
        members = {(STATE_PREFIX + "memory" if name == "memory" else name): member for name, member in members.items()}
    # Every member, with the dtype and shape it must have (None: any length), checked on its header.
    expected: dict[str, tuple[np.dtype, tuple[int | None, ...]]] = {
        "header": (np.dtype(np.uint8), (None,)), "pending_tokens": (np.dtype(np.int64), (None,)),
        "pending_lengths": (np.dtype(np.int64), (batch,)), "tokens_seen": (np.dtype(np.int64), (batch,)),
        "segments_done": (np.dtype(np.int64), (batch,)), "has_logits": (np.dtype(bool), (batch,)),
        "last_logits": (np.dtype(np.float32), (batch, layout.logits_width)),
        **{STATE_PREFIX + name: (np.dtype(np.float32), (batch, *shape)) for name, shape in layout.state_shapes.items()}}
    saved = sorted(name[len(STATE_PREFIX):] for name in members if name.startswith(STATE_PREFIX))
    if saved != sorted(layout.state_shapes):
        raise StateError(f"{path}: the file holds state {saved}, this bundle's state is {sorted(layout.state_shapes)}")
    unknown = sorted(set(members) - set(expected)) + sorted(n for n in archive.namelist() if not n.endswith(".npy"))
    if unknown:
        raise StateError(f"{path}: unexpected members {unknown[:5]} (an rmt-edge state file holds only "
                         f"{sorted(expected)})")
    missing = [name for name in ("pending_tokens", *_COUNTERS) if name not in members]
    if missing:
        raise StateError(f"{path}: state file is missing {missing}")
    for name, member in members.items():
        dtype, shape = _member_header(archive, member, path)
        want_dtype, want_shape = expected[name]
        fits = len(shape) == len(want_shape) and all(w is None or w == h for w, h in zip(want_shape, shape))
        if dtype != want_dtype or not fits:
            shown = [("N" if w is None else w) for w in want_shape]
            raise StateError(f"{path}: {name} is {dtype}{list(shape)}, expected {want_dtype}{shown}")
    data = {name: _read_member(archive, member) for name, member in members.items() if name != "header"}
    tensors = {name: data[STATE_PREFIX + name] for name in saved}
    for name, value in tensors.items():
        if not np.isfinite(value).all():
            raise StateError(f"{path}: state {name!r} holds NaN or Inf")
    lengths, tokens = data["pending_lengths"], data["pending_tokens"]
    seen, done, has_logits = data["tokens_seen"], data["segments_done"], data["has_logits"]
    try:  # before any sum: a length near 2**63 would overflow it
        check_state_counters(str(path), lengths, seen, done, has_logits, layout.segment_size)
    except DocumentError as exc:
        raise StateError(str(exc)) from None
    if int(lengths.sum()) != len(tokens):
        raise StateError(f"{path}: pending tokens do not add up ({len(tokens)} tokens, lengths {lengths.tolist()})")
    bad = (tokens < 0) | (tokens >= layout.vocab_size)
    if bad.any():
        raise StateError(f"{path}: pending token id {int(tokens[np.argmax(bad)])} is outside the vocabulary "
                         f"0..{layout.vocab_size - 1}")
    last_logits = data.get("last_logits")
    if has_logits.any() and (last_logits is None or not np.isfinite(last_logits[has_logits]).all()):
        raise StateError(f"{path}: last_logits are missing or hold NaN or Inf for rows that have them")
    pending = np.split(tokens, np.cumsum(lengths)[:-1])
    return LoadedState(header=header, tensors=tensors, pending=pending, tokens_seen=seen, segments_done=done,
                       last_logits=last_logits, has_logits=has_logits)
