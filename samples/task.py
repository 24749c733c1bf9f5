"""The sample task: remember a key across segments of noise (BABILong-style, byte level).

The first segment states a secret letter; segments of random lowercase filler follow; the
last segment asks for it. Only memory can carry the letter from the first segment to the
last, so with memory reset at every segment the answer falls to chance (1 in 16).

    segment 0:      "key=K;" + filler          (K one of A..P)
    segments 1..n-2: filler
    segment n-1:    filler + "?key=" -> the model must predict K next
"""
from __future__ import annotations

import numpy as np

KEYS = "ABCDEFGHIJKLMNOP"
FILLER = "abcdefghijklmnopqrstuvwxyz "
CHANCE = 1 / len(KEYS)


def make_example(rng: np.random.Generator, segments: int, segment_size: int) -> tuple[bytes, int]:
    """One input of ``segments`` * ``segment_size`` - 1 bytes, and the answer byte."""
    if segments < 2:
        raise ValueError("the task needs at least 2 segments (fact, question)")
    key = KEYS[rng.integers(len(KEYS))]
    total = segments * segment_size
    filler = "".join(rng.choice(list(FILLER), size=total))
    head = f"key={key};"
    question = "?key="
    text = head + filler[len(head): total - len(question) - 1] + question
    assert len(text) == total - 1
    return text.encode("ascii"), ord(key)


def make_batch(rng: np.random.Generator, batch: int, segments: int, segment_size: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """ids [batch, segments * segment_size - 1] (byte values) and answers [batch]."""
    examples = [make_example(rng, segments, segment_size) for _ in range(batch)]
    ids = np.array([list(text) for text, _ in examples], dtype=np.int64)
    answers = np.array([answer for _, answer in examples], dtype=np.int64)
    return ids, answers
