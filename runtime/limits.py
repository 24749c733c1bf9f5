"""Bounds on every number, count, size and file that a user or a file supplies, declared once.

A ``Bound`` says the range of one option or argument and why its upper end is where it is;
the click options of every command (``option_type``) and the library functions (``Bound.check``)
check the same object, so the CLI and the API cannot disagree. Numbers are checked before any
work starts; a file's size before it is read (a pipe's or a device's while it is read, capped),
and a file that must be regular (a tokenizer, a config) is refused when it is not, decided on
``stat`` or a non-blocking open (a FIFO would block a read). Torch-free: rmt_export uses it too;
rmt_model, which may not import rmt_runtime, keeps its own numbers (rmt_model/config.py,
rmt_model/checkpoint.py; tests/reliability/test_bounds.py checks they are these).
"""
from __future__ import annotations

import math
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from .errors import RuntimeInputError

MiB = 2 ** 20


class LimitError(RuntimeInputError):
    """A number out of its declared range, a file too large, or not the kind of file expected."""


class TooLargeError(LimitError):
    """A file or stream with more bytes than its limit."""


@dataclass(frozen=True)
class Bound:
    """The allowed range of one number: ``low``..``high`` (``low`` excluded when ``low_open``)."""

    name: str
    low: int | float
    high: int | float
    why: str
    integer: bool = True
    low_open: bool = False

    def describe(self) -> str:
        """The range in words: 'an int in 1..1024', 'a finite number in (0, 1]'."""
        kind = "an int" if self.integer else "a finite number"
        if self.low_open:
            return f"{kind} in ({self.low:g}, {self.high:g}]"
        return f"{kind} in {self.low}..{self.high}" if self.integer else f"{kind} in [{self.low:g}, {self.high:g}]"

    def allows(self, value) -> bool:
        """``value`` is a number of the bound's kind (never a bool; a finite float) in range."""
        if isinstance(value, (bool, np.bool_)):
            return False
        if not isinstance(value, (int, np.integer)):  # an int of any size compares exactly
            if self.integer or not isinstance(value, (float, np.floating)) or not math.isfinite(value):
                return False
        above_low = value > self.low if self.low_open else value >= self.low
        return bool(above_low and value <= self.high)

    def check(self, value, what: str | None = None):
        """``value`` as an int (a float) when it is in range; else a LimitError naming ``what``
        (default: the bound's name), the value and the range."""
        if not self.allows(value):
            raise LimitError(f"{what or self.name} must be {self.describe()} ({self.why}), got {shown(value)}")
        return int(value) if self.integer else float(value)


def shown(value) -> str:
    """``value`` for a message, short: a huge int by its size (repr refuses ints over 4300 digits)."""
    if isinstance(value, int) and value.bit_length() > 190:
        return f"an int of {len(str(abs(value))) if value.bit_length() < 14000 else 'over 4000'} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:40] + f"... ({len(text)} characters)"


# ---- numbers ------------------------------------------------------------------------------------
THREADS = Bound("threads", 1, 1024, "ONNX Runtime and OpenVINO start one OS thread per intra-op thread when they "
                                    "load; 1024 is the size of Linux's default CPU set, more cores than any machine "
                                    "this runs on has")
BATCH = Bound("batch", 1, 65536, "sequences held at once; the memory they take is checked against the machine too")
MAX_BATCH = Bound("max_batch", 1, 4096, "the largest batch an engine profile or a server batches: TensorRT and "
                                        "Triton size their buffers by it")
VALIDATION_SEGMENTS = Bound("segments", 2, 4096, "chained segments validated, each run in PyTorch and ONNX Runtime; "
                                                 "32 find what 4096 would")
BENCH_SEGMENTS = Bound("segments", 1, 4096, "segments per timed run; the input of every batch is held in memory")
REPEATS = Bound("repeats", 1, 1000, "timed runs of each variant; the median settles within a few")
WORKSPACE_MB = Bound("workspace", 16, 262144, "the TensorRT builder's workspace in MB; 256 GiB is more than any "
                                              "GPU's memory")
OPSET = Bound("opset", 18, 20, "the ONNX opsets the exporter writes and validates")
NUM_MEM_TOKENS = Bound("num_mem_tokens", 1, 4096, "memory tokens take backbone positions in every segment")
SEGMENT_SIZE = Bound("segment_size", 1, 65536, "tokens per segment; the graphs' attention grows with its square")
LORA_ALPHA = Bound("lora_alpha", 0, 1e6, "LoRA's scale numerator, merged as alpha / r; adapters use 8..256",
                   integer=False, low_open=True)
TOP_K_SHOWN = Bound("top_k", 1, 262144, "entries printed; the largest vocabularies have 256k tokens")
# Generation (GenerationConfig checks these; rmt-generate's options are built from them).
MAX_NEW_TOKENS = Bound("max_new_tokens", 1, 2 ** 20, "a million tokens is a few books; a conversation goes on "
                                                     "across calls with a saved state")
TOP_K = Bound("top_k", 0, 262144, "0 is off; the largest vocabularies have 256k tokens")
TEMPERATURE = Bound("temperature", 0, 1000.0, "0 is greedy; at 1000 sampling is already uniform", integer=False)
TOP_P = Bound("top_p", 0, 1.0, "a probability mass", integer=False, low_open=True)
REPETITION_PENALTY = Bound("repetition_penalty", 0, 1000.0, "1 is off; 1000 already removes a repeated token",
                           integer=False, low_open=True)
SEED = Bound("seed", 0, 2 ** 64 - 1, "a 64-bit seed")
TOKEN_ID = Bound("token id", 0, 2 ** 31 - 1, "the graphs take int64 ids, and no vocabulary has 2^31 tokens")
# Triton: the repository rmt-triton writes and the client.
MAX_SEQUENCES = Bound("max_sequences", 1, 65536, "live sequences per instance, each holding its memory in the server")
IDLE_SECONDS = Bound("idle_seconds", 0.001, 7 * 86400.0, "a week; an idle sequence keeps its memory that long",
                     integer=False)
QUEUE_DELAY_US = Bound("queue_delay_us", 0, 10_000_000, "10 s; every request of a batch waits that long")
INSTANCES = Bound("instances", 1, 256, "model instances, each with its own copy of the graphs")
CHUNK_SIZE = Bound("chunk_size", 1, 2 ** 20, "tokens per request; a request's ids travel in one message")
TIMEOUT_S = Bound("timeout_s", 0, 86400.0, "a day per request", integer=False, low_open=True)
SEQUENCE_ID = Bound("sequence_id", 1, 2 ** 63 - 1, "Triton's correlation id, sent as a 64-bit integer")

# The samples' command lines (samples/*.py).
TRAINING_STEPS = Bound("steps", 1, 1_000_000, "optimizer steps of a sample's training; it converges in a few thousand")
EXAMPLES = Bound("examples", 1, 100_000, "evaluation examples, each run through the model")
LENGTH_SEGMENTS = Bound("segments", 1, 4096, "an input's length in segments; its ids are held in memory")

# ---- files --------------------------------------------------------------------------------------
# Token ids or text for one invocation: held in memory at once (the ids as int64, text through the
# tokenizer); a book is about 1 MiB. Longer inputs stream across invocations with --state.
INPUT_BYTES = 64 * MiB
# A tokenizer.json: the largest published ones (256k-token vocabularies) are about 35 MiB.
TOKENIZER_BYTES = 128 * MiB
# A JSON config (a backbone's config.json, a shard index): published ones are under 1 MiB.
CONFIG_BYTES = 16 * MiB


def file_kind(mode: int) -> str:
    """What a stat mode is, in words ('a directory', 'a FIFO (named pipe)', ...)."""
    for test, words in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return words
    return "not a regular file"


def _size(nbytes: int) -> str:
    return f"{nbytes / MiB:.0f} MiB" if nbytes >= MiB else f"{nbytes} bytes"


def _too_large(name: str, what: str, limit: int, size: int | None = None) -> TooLargeError:
    holds = f"is {size:,} bytes" if size is not None else f"holds more than {limit:,} bytes"
    return TooLargeError(f"{name}: {holds}; {what} is limited to {_size(limit)}")


def _read_capped(handle, limit: int, name: str, what: str) -> bytes:
    """Everything ``handle`` gives, refusing it once more than ``limit`` bytes came."""
    chunks, total = [], 0
    while True:
        chunk = handle.read(min(MiB, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise _too_large(name, what, limit)


def read_regular(path: str | os.PathLike, limit: int, what: str) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``limit`` bytes: anything
    else (a directory, a FIFO, a device, a symlink to one) is refused before a byte is read;
    opened non-blocking, so a FIFO cannot hang the check."""
    path = Path(path)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        raise LimitError(f"{path}: is a directory, expected {what} (a regular file)") from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise LimitError(f"{path}: is {file_kind(info.st_mode)}, expected {what} (a regular file)")
        if info.st_size > limit:
            raise _too_large(str(path), what, limit, info.st_size)
    except BaseException:
        os.close(descriptor)
        raise
    with os.fdopen(descriptor, "rb") as handle:
        return _read_capped(handle, limit, str(path), what)  # capped too: a file growing meanwhile


def check_regular(path: str | os.PathLike, limit: int, what: str) -> int:
    """The size of ``path`` when it is a regular file of at most ``limit`` bytes (for a file a
    library then reads by name); else a LimitError, decided on ``stat`` without opening it."""
    path = Path(path)
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise LimitError(f"{path}: is {file_kind(info.st_mode)}, expected {what} (a regular file)")
    if info.st_size > limit:
        raise _too_large(str(path), what, limit, info.st_size)
    return info.st_size


def read_input(source: str, limit: int = INPUT_BYTES, what: str = "an input") -> tuple[bytes, str]:
    """The bytes of a file, a pipe or a device (``<(...)``, /dev/stdin), or stdin for '-', and a
    name for messages; at most ``limit`` bytes: a regular file's size is checked before it is
    read, anything else is cut off and refused once it gives more (/dev/zero ends there)."""
    if source == "-":
        if sys.stdin is None:
            raise LimitError("no stdin to read ('-')")
        return _read_capped(sys.stdin.buffer, limit, "stdin", what), "stdin"
    path = Path(source)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise LimitError(f"{path}: no such file") from None
    if stat.S_ISDIR(info.st_mode):
        raise LimitError(f"{path}: is a directory, not an input file")
    if stat.S_ISREG(info.st_mode) and info.st_size > limit:
        raise _too_large(str(path), what, limit, info.st_size)
    with open(path, "rb") as handle:  # a regular file, or a pipe or device (promised: docs/RELIABILITY.md)
        return _read_capped(handle, limit, str(path), what), str(path)


def physical_memory() -> int:
    """This machine's memory in bytes (1 TiB where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 2 ** 40


def check_allocation(nbytes: int, what: str) -> None:
    """Refuse, before allocating, what needs more bytes than this machine's memory."""
    memory = physical_memory()
    if nbytes > memory:
        raise LimitError(f"{what} needs {nbytes / 2 ** 30:.1f} GiB, more than this machine's "
                         f"{memory / 2 ** 30:.1f} GiB of memory")


# ---- click --------------------------------------------------------------------------------------
class BoundType(click.ParamType):
    """A click option type checking a ``Bound``: the error names the option, the value, the range
    and why; --help shows the range."""

    def __init__(self, bound: Bound) -> None:
        self.bound = bound
        self.name = "integer" if bound.integer else "float"

    def get_metavar(self, param, ctx=None) -> str:
        low = "(" if self.bound.low_open else "["
        kind = "INTEGER" if self.bound.integer else "FLOAT"
        return f"{kind} {low}{self.bound.low:g}..{self.bound.high:g}]" if not self.bound.integer else \
            f"{kind} [{self.bound.low}..{self.bound.high}]"

    def convert(self, value, param, ctx):
        what = param.opts[0] if param is not None and param.opts else self.bound.name
        if isinstance(value, str):
            try:
                value = int(value, 10) if self.bound.integer else float(value)
            except ValueError:
                self.fail(f"{value[:40]!r} is not {'an integer' if self.bound.integer else 'a number'}", param, ctx)
        try:
            return self.bound.check(value, what)
        except LimitError as exc:
            self.fail(str(exc), param, ctx)


def option_type(bound: Bound) -> BoundType:
    """The click type of an option bounded by ``bound``."""
    return BoundType(bound)


def argparse_type(bound: Bound, option: str):
    """The ``type=`` of an argparse option bounded by ``bound`` (the samples' command lines)."""
    import argparse

    def convert(text: str):
        try:
            value = int(text, 10) if bound.integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not {'an integer' if bound.integer else 'a number'}")
        try:
            return bound.check(value, option)
        except LimitError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = bound.name  # argparse names the type in its messages
    return convert
