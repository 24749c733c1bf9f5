"""Per-sequence state, separate from the shared runtime, and its versioned file format.

A ``SequenceState`` holds B rows (independent sequences batched together): every named
state tensor of the bundle's state pairs (RMT: ``memory``) in two backend buffers each
(ping-pong: a graph never reads and writes the same buffer), the tokens of each row's
partial segment not yet run, and counters. State files are .npz archives of plain arrays
(no pickle), written atomically, hold every named state, and name the bundle they belong to.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_atomically
from .errors import StateError

STATE_FORMAT = "rmt-edge/state"
STATE_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 held the RMT's one state tensor as "memory"
STATE_PREFIX = "state."


@dataclass
class SequenceState:
    """The state of B sequences run together. Use from one thread at a time."""

    handles: dict[str, Any]   # state input name -> backend handle [B, ...]: the current state
    scratch: dict[str, Any]   # state input name -> backend handle: where the next segment writes
    pending: list[np.ndarray]   # per row: tokens of the partial segment not yet run
    tokens_seen: np.ndarray     # [B] int64: tokens fed so far (pending included)
    segments_done: np.ndarray   # [B] int64: segments run into memory
    last_logits: np.ndarray | None = None  # [B, V] decoder / [B, labels] encoder, after the last segment
    has_logits: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    @property
    def batch(self) -> int:
        return len(self.pending)

    def swap(self) -> None:
        """After a segment: the buffers just written become the state."""
        self.handles, self.scratch = self.scratch, self.handles


def save_state_file(path: str | os.PathLike, bundle_identity: str, bundle_path: str,
                    tensors: dict[str, np.ndarray], state: SequenceState) -> Path:
    """Write ``state`` (with its state ``tensors`` read from the device) atomically to ``path``."""
    path = Path(path)
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
    write_atomically(path, lambda handle: np.savez(handle, **arrays))
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


def load_state_file(path: str | os.PathLike, bundle_identity: str, bundle_path: str,
                    state_shapes: dict[str, tuple[int, ...]]) -> LoadedState:
    """Read and check a state file; it must belong to the bundle ``bundle_identity`` and hold
    float32 tensors of ``state_shapes`` (per state name, without the batch axis)."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"{path}: no such state file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            data = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise StateError(f"{path}: not a readable rmt-edge state file ({exc})") from None
    try:
        header = json.loads(bytes(data["header"]).decode())
    except (KeyError, UnicodeDecodeError, json.JSONDecodeError):
        raise StateError(f"{path}: not an rmt-edge state file (no readable header)") from None
    if header.get("format") != STATE_FORMAT:
        raise StateError(f"{path}: not an rmt-edge state file (format {header.get('format')!r})")
    if header.get("version") not in READABLE_VERSIONS:
        raise StateError(f"{path}: state version {header.get('version')!r} is not supported "
                         f"(this rmt-edge reads {list(READABLE_VERSIONS)})")
    if header.get("bundle_identity") != bundle_identity:
        raise StateError(f"{path}: saved from bundle {header.get('bundle_path')!r} "
                         f"(identity {header.get('bundle_identity')}), not from bundle {bundle_path!r} "
                         f"(identity {bundle_identity}); a state only continues on its own bundle")
    if header["version"] == 1:  # the RMT's memory under its own name
        data = {(STATE_PREFIX + "memory" if name == "memory" else name): value for name, value in data.items()}
    saved = sorted(name[len(STATE_PREFIX):] for name in data if name.startswith(STATE_PREFIX))
    if saved != sorted(state_shapes):
        raise StateError(f"{path}: the file holds state {saved}, this bundle's state is {sorted(state_shapes)}")
    required = ("pending_tokens", "pending_lengths", "tokens_seen", "segments_done", "has_logits")
    missing = [name for name in required if name not in data]
    if missing:
        raise StateError(f"{path}: state file is missing {missing}")
    batch = int(header.get("batch", -1))
    tensors = {name: data[STATE_PREFIX + name] for name in saved}
    for name, value in tensors.items():
        expected = (batch, *state_shapes[name])
        if value.dtype != np.float32 or value.shape != expected:
            raise StateError(f"{path}: state {name!r} {value.dtype}{list(value.shape)} does not fit "
                             f"float32{list(expected)}")
        if not np.isfinite(value).all():
            raise StateError(f"{path}: state {name!r} holds NaN or Inf")
    lengths = data["pending_lengths"]
    if lengths.shape != (batch,) or lengths.sum() != len(data["pending_tokens"]) or (lengths < 0).any():
        raise StateError(f"{path}: pending tokens do not add up")
    pending = np.split(data["pending_tokens"].astype(np.int64), np.cumsum(lengths)[:-1])
    return LoadedState(header=header, tensors=tensors, pending=pending, tokens_seen=data["tokens_seen"],
                       segments_done=data["segments_done"], last_logits=data.get("last_logits"),
                       has_logits=data["has_logits"])
