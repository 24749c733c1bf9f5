"""Reference generation in PyTorch: the behaviour the runtime's cached generation must equal.

The reference RMT code generates by reading every prompt segment but the last into
memory, then letting the backbone continue ``[mem, last segment]`` (RMT_SEMANTICS.md).
``rollover=True`` is this project's extension: when the segment is full, it is written
into memory with ``step`` and generation continues in a fresh segment, so the context
the backbone sees never grows past M + segment_size. Every token is recomputed from
scratch here (no cache): slow, and obviously right.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .model import RMTDecoder

Choose = Callable[[torch.Tensor], int]


def greedy(logits: torch.Tensor) -> int:
    return int(torch.argmax(logits))


def split_context(num_tokens: int, segment_size: int) -> int:
    """How many leading tokens go into memory before generating: all full segments but the
    last, so the generation context holds 1..segment_size tokens (the reference's split)."""
    if num_tokens < 1:
        raise ValueError("generation needs at least one context token")
    return ((num_tokens - 1) // segment_size) * segment_size


@torch.no_grad()
def generate_reference(model: RMTDecoder, prompt: Sequence[int], max_new_tokens: int,
                       memory: torch.Tensor | None = None, rollover: bool = True,
                       choose: Choose = greedy, stop_tokens: Sequence[int] = ()) -> list[int]:
    """Generate up to ``max_new_tokens`` ids after ``prompt`` (one sequence) from ``memory``
    ([1, M, D]; the learned initial memory by default). ``choose`` picks a token from the
    next-token logits [V] (greedy by default); generation ends after a stop token."""
    size = model.segment_size
    memory = model.initial_memory(1) if memory is None else memory
    prompt = list(prompt)
    commit = split_context(len(prompt), size)
    for start in range(0, commit, size):
        ids = torch.tensor([prompt[start:start + size]])
        _, memory = model.step(ids, torch.ones_like(ids), memory, logits="last")
    segment = prompt[commit:]
    generated: list[int] = []
    for _ in range(max_new_tokens):
        logits = model.segment_logits(torch.tensor([segment]), memory)[0].float()
        token = choose(logits)
        generated.append(token)
        if token in stop_tokens:
            break
        if rollover and len(segment) == size:
            ids = torch.tensor([segment])
            _, memory = model.step(ids, torch.ones_like(ids), memory, logits="last")
            segment = [token]
        else:
            segment.append(token)
    return generated
