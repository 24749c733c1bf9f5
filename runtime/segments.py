"""Segmentation: turning token ids into the [batch, seq] ids and masks a segment graph takes.

Pure numpy, no runner and no state: the runtime's reading loop and generation both use it.
Decoders segment left-aligned (the reference's segmentation: from each sequence's first
token); encoders right-aligned (rows end together, the first segment may be short).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import RuntimeInputError

Segment = tuple[np.ndarray, np.ndarray]  # ids [B, S] int64, mask [B, S] int64


def as_ids_array(array: np.ndarray, name: str) -> np.ndarray:
    """Integer token ids of any integer dtype as int64, refusing values int64 cannot hold
    (a uint64 2**64-1 must not turn into -1)."""
    if not np.issubdtype(array.dtype, np.integer):
        raise RuntimeInputError(f"{name} must be integer token ids, got dtype {array.dtype}")
    if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
        raise RuntimeInputError(f"{name} holds token id {int(array.max())}, outside any vocabulary")
    return array.astype(np.int64)


def as_ids(tokens, name: str = "tokens") -> np.ndarray:
    """One sequence of token ids as int64 [N] (empty input gives [0])."""
    array = np.asarray(tokens)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1:
        raise RuntimeInputError(f"{name} must be one sequence of ids (1-D), got shape {array.shape}")
    return as_ids_array(array, name)


def check_mask(attention_mask, shape: tuple[int, ...]) -> np.ndarray:
    """An attention mask for right-padded rows, as int64: integer or boolean 0/1 (a float mask
    would be truncated silently), each row its tokens then its padding, no row empty."""
    mask = np.asarray(attention_mask)
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        raise RuntimeInputError(f"attention_mask must be integer or boolean 0/1, got dtype {mask.dtype}")
    if mask.shape != tuple(shape):
        raise RuntimeInputError(f"attention_mask shape {mask.shape} must equal input_ids shape {tuple(shape)}")
    if not ((mask == 0) | (mask == 1)).all():
        raise RuntimeInputError("attention_mask must hold only 0 and 1")
    mask = mask.astype(np.int64)
    lengths = mask.sum(axis=1)
    empty = np.nonzero(lengths == 0)[0].tolist()
    if empty:
        raise RuntimeInputError(f"rows {empty} of attention_mask have no tokens; every row needs at least one")
    gappy = np.nonzero((mask != (np.arange(mask.shape[1]) < lengths[:, None])).any(axis=1))[0].tolist()
    if gappy:
        raise RuntimeInputError(f"rows {gappy} of attention_mask are not right-padded (tokens first, then 0s); "
                                "left padding or gaps would shift positions and memory: pad on the right")
    return mask


def check_token_container(tokens, what: str) -> None:
    """Refuse what cannot be token ids at all (None, text, a mapping, a scalar) with a message
    saying what is expected, instead of a TypeError from deep inside numpy."""
    if tokens is None or isinstance(tokens, (str, bytes, dict)) or not (
            isinstance(tokens, np.ndarray) or hasattr(tokens, "__iter__")):
        raise RuntimeInputError(f"{what} must be token ids (a sequence of ints, or one sequence per row), "
                                f"got {type(tokens).__name__}")


def materialized(tokens):
    """``tokens`` in a form that can be read more than once: a generator or other one-shot
    iterable becomes a list, read here once (counting rows and then reading them would
    otherwise find it empty); arrays, lists and tuples are returned as they are."""
    return tokens if isinstance(tokens, (np.ndarray, list, tuple)) else list(tokens)


def is_ragged(tokens) -> bool:
    """True for a list of sequences (one per row), False for one sequence of ids."""
    if isinstance(tokens, np.ndarray):
        return tokens.ndim == 2
    tokens = list(tokens) if not isinstance(tokens, (list, tuple)) else tokens
    return bool(tokens) and isinstance(tokens[0], (list, tuple, np.ndarray))


def rows_of(tokens, batch: int, vocab_size: int, what: str = "sequence",
            offsets: Sequence[int] | None = None) -> list[np.ndarray]:
    """``tokens`` as one int64 id array per row, every id checked against the vocabulary.

    Batch 1 takes one sequence; batch B takes B sequences. ``offsets``: where each row's
    tokens start in its sequence, so an error names the position in the whole input.
    """
    check_token_container(tokens, f"the {what}s" if batch > 1 else f"the {what}")
    tokens = materialized(tokens)
    chunks = [tokens] if batch == 1 and not is_ragged(tokens) else list(tokens)
    if len(chunks) != batch:
        raise RuntimeInputError(f"got {len(chunks)} {what}s for a state of batch {batch}")
    rows = [as_ids(chunk, f"{what} of row {row}") for row, chunk in enumerate(chunks)]
    for row, ids in enumerate(rows):
        bad = (ids < 0) | (ids >= vocab_size)
        if bad.any():
            index = int(np.argmax(bad))
            position = index + (int(offsets[row]) if offsets is not None else 0)
            raise RuntimeInputError(f"token id {int(ids[index])} at row {row}, position {position} is outside the "
                                    f"vocabulary 0..{vocab_size - 1} (in the {what})")
    return rows


def pad_rows(rows: Sequence[np.ndarray], width: int | None = None) -> Segment:
    """Rows of different lengths as right-padded ids and a 0/1 mask, ``width`` wide
    (default: the longest row)."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for row, tokens in enumerate(rows):
        ids[row, :len(tokens)], mask[row, :len(tokens)] = tokens, 1
    return ids, mask


def full_segment(pending: Sequence[np.ndarray], size: int) -> Segment:
    """The next full segment of every row that holds at least ``size`` pending tokens;
    rows with fewer are masked out (they keep their memory)."""
    return pad_rows([p[:size] if len(p) >= size else p[:0] for p in pending], size)


def left_aligned(ids: np.ndarray, mask: np.ndarray, size: int) -> list[Segment]:
    """[B, T] ids and mask cut into segments of ``size`` from the first position (the last may be short)."""
    return [(np.ascontiguousarray(ids[:, s:s + size]), np.ascontiguousarray(mask[:, s:s + size]))
            for s in range(0, ids.shape[1], size)]


def right_aligned(ids: np.ndarray, mask: np.ndarray, size: int) -> list[Segment]:
    """Each row's tokens in segments counted from its end (the first may be short), rows ending together."""
    rows = [row_ids[row_mask > 0] for row_ids, row_mask in zip(ids, mask)]
    if min(len(r) for r in rows) == 0:
        raise RuntimeInputError("every row of an encoder input needs at least one token")
    counts = [-(-len(r) // size) for r in rows]
    total = max(counts)
    out = []
    for index in range(total):
        pieces = []
        for tokens, count in zip(rows, counts):
            own = index - (total - count)
            end = len(tokens) - (count - 1 - own) * size
            pieces.append(tokens[max(0, end - size):end] if own >= 0 else tokens[:0])
        out.append(pad_rows(pieces))
    return out
