"""``rmt-run``: a thin click layer over ``rmt_runtime.RMTRuntime``.

Torch-free: this module imports numpy, click and rmt_runtime only; ``tokenizers`` is
imported when text is read or decoded. (The PyTorch reference backend lives in rmt_export.)
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import time
from pathlib import Path

import click
import numpy as np

from . import limits
from .atomic import unwritable_reason, write_atomically
from .bundle import Bundle, BundleError
from .cli_support import JsonCommand, exit_interrupted, run_guarded, stop_requests
from .errors import BackendError, RuntimeInputError, StateError
from .limits import LimitError
from .segments import check_mask
from .runtime import RMTRuntime
from .state import locked_state_file

_NPY_MAGIC = b"\x93NUMPY"


class CliInputError(Exception):
    """Input the command cannot use: an unreadable or malformed file, a missing tokenizer, no tokens."""


_EXPECTED = (BundleError, RuntimeInputError, BackendError, StateError, CliInputError)


def run_guarded_cli(verbose, as_json, work, interrupted=lambda: "interrupted: nothing was written"):
    return run_guarded(verbose, as_json, work, _EXPECTED, interrupted)


# ---- input ------------------------------------------------------------------------------------
def _read_bytes(source: str) -> tuple[bytes, str]:
    """The bytes of a file, a pipe or a device, or of stdin for '-', and a name for messages; at
    most ``limits.INPUT_BYTES`` (one invocation holds its whole input)."""
    try:
        return limits.read_input(source, limits.INPUT_BYTES, "an input file")
    except limits.TooLargeError as exc:
        raise CliInputError(f"{exc}: give a longer input in parts (--state carries the sequence over)") from None
    except LimitError as exc:
        raise CliInputError(str(exc)) from None
    except OSError as exc:
        raise CliInputError(f"{source}: cannot be read ({exc.strerror or exc})") from None


def _decode_text(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CliInputError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _load_npy(data: bytes, name: str) -> np.ndarray:
    """A .npy array from ``data`` whose header declares no more bytes than follow it: numpy
    allocates what the header declares before reading, so a 100-byte file claiming 10^12
    elements is refused here, not allocated."""
    handle = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(handle)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(handle, max_header_size=1 << 16)
        declared = dtype.itemsize * math.prod(shape)
        present = len(data) - handle.tell()
        if declared > present:
            raise CliInputError(f"{name}: its .npy header declares {dtype} {list(shape)} ({declared:,} bytes), but "
                                f"only {present:,} bytes follow it")
        handle.seek(0)
        return np.load(handle, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CliInputError(f"{name}: not a readable .npy array ({exc})") from None


def parse_ids(data: bytes, name: str) -> np.ndarray:
    """Token ids as [B, N]: a .npy integer array [N], [1, N] (what a tokenizer gives with
    return_tensors="np") or [B, N], or whitespace-separated integers (one sequence)."""
    if data.startswith(_NPY_MAGIC):
        array = _load_npy(data, name)
        if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.integer):
            raise CliInputError(f"{name}: token ids must be an integer array, got dtype {array.dtype}")
        if array.ndim not in (1, 2):
            raise CliInputError(f"{name}: token ids must be [N] or [batch, N], got shape {list(array.shape)}")
        if array.size and array.dtype == np.uint64 and array.max() > np.iinfo(np.int64).max:  # not wrapped to < 0
            raise CliInputError(f"{name}: token id {int(array.max())} is past int64, not a token id")
        return np.atleast_2d(array.astype(np.int64))
    words = _decode_text(data, name).split()
    ids = []
    for position, word in enumerate(words):
        try:
            ids.append(int(word))
        except ValueError:
            raise CliInputError(f"{name}: token {position} ({word[:20]!r}) is not an integer id; "
                                "--ids takes a .npy array or whitespace-separated integers") from None
        if not -(1 << 63) <= ids[-1] < 1 << 63:
            raise CliInputError(f"{name}: token {position} ({word[:20]!r}) is past int64, not a token id")
    return np.asarray(ids, dtype=np.int64)[None]


def read_mask(mask_file: str, ids: np.ndarray) -> np.ndarray:
    """A .npy attention mask for right-padded rows of ``ids`` [B, N] (integer or boolean 0/1)."""
    data, name = _read_bytes(mask_file)
    if not data.startswith(_NPY_MAGIC):
        raise CliInputError(f"{name}: --mask takes a .npy array of 0/1 shaped like the ids {list(ids.shape)}")
    mask = _load_npy(data, name)
    try:
        return check_mask(np.atleast_2d(mask), ids.shape)
    except RuntimeInputError as exc:
        raise CliInputError(f"{name}: {exc}") from None


# The runtime's text features come with the ``text`` extra of setup.py (tokenizers).
TEXT_INSTALL = 'pip install "rmt-edge[text]"'


def load_tokenizer(bundle: Bundle, ids_option: str = "--ids"):
    """The bundle's tokenizer.json through the ``tokenizers`` library; CliInputError if it cannot."""
    shipped = bundle.tokenizer_files
    if "tokenizer.json" not in shipped:
        what = f"ships {shipped} but no tokenizer.json" if shipped else "has no tokenizer"
        raise CliInputError(f"bundle {bundle.path} {what}: pass token ids with {ids_option}, or re-export "
                            "with tokenizer.json beside the checkpoint (or rmt-export --tokenizer DIR holding it)")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise CliInputError(f"reading text needs the tokenizers library: {TEXT_INSTALL} "
                            f"(or pass token ids with {ids_option})") from None
    path = bundle.path / "tokenizer.json"
    try:
        text = limits.read_regular(path, limits.TOKENIZER_BYTES, "a tokenizer.json").decode("utf-8")
    except (LimitError, OSError, UnicodeDecodeError) as exc:
        raise CliInputError(exc if isinstance(exc, LimitError) else f"{path}: not a readable tokenizer ({exc})") \
            from None
    try:
        return Tokenizer.from_str(text)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exceptions
        raise CliInputError(f"{bundle.path / 'tokenizer.json'}: not a readable tokenizer ({exc})") from None


def optional_tokenizer(bundle: Bundle):
    """The tokenizer for decoding output ids, or None when the bundle or the library has none."""
    try:
        return load_tokenizer(bundle)
    except CliInputError:
        return None


def read_input(bundle: Bundle, text, text_file, ids_file,
               options: tuple[str, str, str] = ("--text", "--text-file", "--ids")) -> tuple[np.ndarray, object]:
    """(ids [B, N], tokenizer or None) from exactly one of the input options, or from stdin.
    ``options``: the command's names for the text, text-file and ids options (for messages)."""
    given = [name for name, value in zip(options, (text, text_file, ids_file)) if value is not None]
    if len(given) > 1:
        raise CliInputError(f"give one input, not {' and '.join(given)}")
    if not given:
        if sys.stdin is None or sys.stdin.isatty():
            raise CliInputError(f"no input: give {options[0]}, {options[1]} or {options[2]}, or pipe input on stdin")
        if "tokenizer.json" in bundle.tokenizer_files:
            text_file = "-"
        else:
            ids_file = "-"
    if ids_file is not None:
        ids = parse_ids(*_read_bytes(ids_file))
        tokenizer = optional_tokenizer(bundle) if bundle.kind == "decoder" else None
    else:
        tokenizer = load_tokenizer(bundle, options[2])
        if text is None:
            text = _decode_text(*_read_bytes(text_file))
        ids = np.asarray(tokenizer.encode(text).ids, dtype=np.int64)[None]
    if ids.size == 0:
        raise CliInputError("no tokens to run: the input is empty")
    return ids, tokenizer


# ---- output -----------------------------------------------------------------------------------
def _labels(bundle: Bundle) -> dict[int, str]:
    return bundle.id2label


def summarize(bundle: Bundle, logits: np.ndarray | None, top_k: int, tokenizer) -> dict:
    """Top-k next tokens (decoder) or the predicted class (encoder) from one row's
    last-position logits [V] (or [1, V])."""
    if logits is None:
        return {}
    row = np.asarray(logits, dtype=np.float32).reshape(-1)
    order = np.argsort(-row, kind="stable")[:top_k]
    if bundle.kind == "encoder":
        labels = _labels(bundle)
        predicted = int(order[0])
        return {"class": predicted, "label": labels.get(predicted),
                "class_logits": [float(x) for x in row],
                "top_k": [{"id": int(i), "logit": float(row[i]), "label": labels.get(int(i))} for i in order]}
    entries = []
    for i in order:
        entry = {"id": int(i), "logit": float(row[i])}
        if tokenizer is not None:
            entry["text"] = tokenizer.decode([int(i)], skip_special_tokens=False)
        entries.append(entry)
    return {"top_k": entries}


def _human_lines(kind: str, summary: dict) -> list[str]:
    lines = []
    if kind == "encoder":
        label = f" ({summary['label']})" if summary.get("label") else ""
        lines.append(f"class {summary['class']}{label}")
    for entry in summary.get("top_k", []):
        line = f"{entry['id']:>6} {entry['logit']:>12.4f}"
        if entry.get("text") is not None:
            line += f"  {json.dumps(entry['text'], ensure_ascii=False)}"
        elif entry.get("label") is not None:
            line += f"  {entry['label']}"
        lines.append(line)
    return lines


class _Progress:
    """A click progress bar on stderr, opened at the first report of more than one segment."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self.done = 0

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            if not self.enabled or total <= 1:
                return
            self.bar = click.progressbar(length=total, label=f"running {total} segments", file=sys.stderr,
                                         show_pos=True)
            self.bar.__enter__()
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


# ---- command ----------------------------------------------------------------------------------
@click.command(cls=JsonCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", "bundle_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path), help="Bundle directory.")
@click.option("--text", default=None, help="Input text (needs the bundle's tokenizer.json).")
@click.option("--text-file", default=None, metavar="FILE", help="Input text from FILE ('-': stdin).")
@click.option("--ids", "ids_file", default=None, metavar="FILE",
              help="Token ids: a .npy integer array [N], [1, N] or [batch, N] (rows run together), or "
                   "whitespace-separated integers ('-': stdin).")
@click.option("--mask", "mask_file", default=None, metavar="FILE.npy",
              help="Attention mask for right-padded --ids rows: a .npy 0/1 array shaped like the ids.")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "openvino", "tensorrt"]), default="auto",
              show_default=True, help="What runs the graphs (tensorrt: engines from rmt-build; openvino: the "
                                      "CPU, fp32 bundles); an explicit choice never falls back.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=None,
              help="With --backend openvino: compute the fp32 bundle in fp32 (default) or bf16 (CPUs with AVX-512 "
                   "BF16 or AMX; an error elsewhere). Other backends run the bundle's own precision.")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default=None,
              help="ONNX Runtime execution provider; an explicit one never falls back.")
@click.option("--threads", type=limits.option_type(limits.THREADS), default=None, help="Intra-op CPU threads.")
@click.option("--top-k", type=limits.option_type(limits.TOP_K_SHOWN), default=5, show_default=True,
              help="Next tokens (decoder) or classes (encoder) to show.")
@click.option("--state", "state_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Continue the sequence saved in FILE (if it exists), then save it there.")
@click.option("--finish", is_flag=True,
              help="With --state: read no input; run the tokens the state holds pending (left by an interrupt) "
                   "and print the result.")
@click.option("--save-outputs", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="FILE.npz", help="Write the final state (memory) and last_logits arrays (np.savez).")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable result on stdout.")
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
def main(bundle_dir, text, text_file, ids_file, mask_file, backend, provider, precision, threads, top_k, state_file, finish,
         save_outputs, no_progress, as_json, verbose):
    """Run an exported RMT bundle over an input of any length, segment by segment.

    \b
    Examples:
      rmt-run --bundle model-fp32 --text "The memory tokens carry"
      rmt-run --bundle model-fp32 --ids ids.npy --top-k 10 --json
      rmt-run --bundle model-fp32 --ids batch.npy --mask mask.npy --json   # [B, N] rows, right-padded
      echo "17 4 88 23" | rmt-run --bundle model-fp32 --ids -
      cat book.txt | rmt-run --bundle model-fp32 --save-outputs out.npz
    \b
    Streaming across invocations (a decoder gives the same result as one run over all chunks):
      rmt-run --bundle model-fp32 --ids part1.txt --state seq.npz
      rmt-run --bundle model-fp32 --ids part2.txt --state seq.npz
      rmt-run --bundle model-fp32 --state seq.npz --finish   # after an interrupt: run what is pending

    Input is one of --text, --text-file or --ids; with none, stdin is read (text when the
    bundle ships tokenizer.json, token ids otherwise). A decoder prints the top-k next
    tokens with their logits (decoded when the bundle has a tokenizer); an encoder prints
    the predicted class and the class logits. The backend picked goes to stderr.

    With --state, full segments are run into the saved memory and a partial segment waits
    in the state for the next invocation; the output shown is what the input so far gives,
    as if it ended here. (Encoders: streaming segments from the first token, while one
    run without --state aligns segments to the end as the reference encoder does, so the
    two can differ slightly.) Ctrl-C or SIGTERM while segments run with --state stops after
    the current segment and saves the state there (the tokens not yet run stay pending in
    it), exit status 130: the next invocation continues exactly, with more input or, when
    the input has ended, with --finish (no input: it runs what is pending and prints the
    result as the interrupted run would have). Without --state, Ctrl-C exits with status 130
    and writes nothing.

    --json prints exactly one JSON document on stdout, also for errors and interrupts
    ({"ok": false, "error": ...}); everything else goes to stderr.
    """
    def prepare():
        if finish:
            if state_file is None:
                raise CliInputError("--finish runs the tokens pending in a state file: give --state FILE")
            given = [name for name, value in (("--text", text), ("--text-file", text_file), ("--ids", ids_file),
                                              ("--mask", mask_file)) if value is not None]
            if given:
                raise CliInputError(f"--finish reads no input (it runs what --state {state_file} holds), got "
                                    f"{' and '.join(given)}: drop it, or leave out --finish to continue the sequence")
            if not state_file.exists():
                raise CliInputError(f"--state {state_file}: no such file, so nothing to finish")
        bundle = Bundle.load(bundle_dir)
        if finish:
            ids = mask = None
            tokenizer = optional_tokenizer(bundle) if bundle.kind == "decoder" else None
        else:
            ids, tokenizer = read_input(bundle, text, text_file, ids_file)
            if mask_file is not None and ids_file is None:
                raise CliInputError("--mask goes with --ids (a [batch, N] array of right-padded rows)")
            mask = np.ones_like(ids) if mask_file is None else read_mask(mask_file, ids)
        for option, path in (("--state", state_file), ("--save-outputs", save_outputs)):
            reason = None if path is None else unwritable_reason(path)
            if reason:
                raise CliInputError(f"{option} {path}: {reason}")
        if state_file is not None and save_outputs is not None and state_file.resolve() == save_outputs.resolve():
            raise CliInputError(f"--state and --save-outputs are the same file ({state_file}): give two paths")
        return bundle, ids, mask, tokenizer

    bundle, ids, mask, tokenizer = run_guarded_cli(verbose, as_json, prepare)
    # --finish: no input; the state's rows get no new tokens.
    rows = None if ids is None else [row[:length] for row, length in zip(ids, mask.sum(axis=1))]
    progress = _Progress(enabled=not (as_json or no_progress))
    written: list[str] = []

    def interrupted() -> str:
        if written:
            return f"interrupted: {' and '.join(written)} written before the interrupt"
        kept = ""
        if state_file is not None and state_file.exists():
            kept = f"; {state_file} keeps what the previous invocation saved"
        return f"interrupted: nothing was written{kept}"

    def work_holding_the_state():
        # With --state, Ctrl-C and SIGTERM are handled from here on: feed stops between two
        # segments and the state is saved there (a signal during loading stops before the first).
        stopping = stop_requests() if state_file is not None else contextlib.nullcontext()
        with stopping as stop:
            started = time.perf_counter()
            rt = RMTRuntime.load(bundle, backend=backend, provider=provider, threads=threads, precision=precision)
            loaded = time.perf_counter()
            click.echo(f"backend: {rt.picked}", err=True)
            try:
                if state_file is not None:
                    resumed = state_file.exists()
                    state = rt.restore_state(state_file) if resumed else rt.new_state(len(rows))
                    new = [np.zeros(0, np.int64)] * state.batch if finish else rows
                    if len(new) != state.batch:
                        raise CliInputError(f"--state {state_file} holds {state.batch} sequence(s), the input has "
                                            f"{len(new)} row(s): give as many rows as the state holds")
                    tokens = sum(len(p) for p in state.pending) if finish else int(mask.sum())
                    finished = rt.feed(state, new if state.batch > 1 else new[0], progress=progress,
                                       stop=stop.is_set)
                else:
                    resumed, finished, tokens = False, True, int(mask.sum())
                    state = rt.new_state(len(rows))
                    output = rt.run(ids, mask, progress=progress, state=state)
            finally:
                progress.close()
        if not finished:  # stopped by a signal: save where it stopped, say so outside (exit 130)
            rt.save_state(state, state_file)
            return rt, state, None, resumed, loaded - started, 0.0, tokens
        if state_file is not None:
            output = rt.peek(state)
        ran = time.perf_counter()
        if state_file is not None:
            rt.save_state(state, state_file)
            written.append(f"state {state_file}")
        if save_outputs is not None:
            arrays = dict(output.state)  # every named state tensor (the RMT's: memory)
            if output.last_logits is not None:
                arrays["last_logits"] = output.last_logits
            write_atomically(save_outputs, lambda handle: np.savez(handle, **arrays))  # a handle: no suffix added
            written.append(f"outputs {save_outputs}")
        return rt, state, output, resumed, loaded - started, ran - loaded, tokens

    def work():
        # One invocation at a time per state file: a second one waits instead of losing an update.
        if state_file is None:
            return work_holding_the_state()
        with locked_state_file(state_file, lambda message: click.echo(message, err=True)):
            return work_holding_the_state()

    rt, state, output, resumed, load_seconds, run_seconds, tokens = run_guarded_cli(verbose, as_json, work,
                                                                                    interrupted)
    batch = state.batch
    if output is None:
        pending = sum(len(p) for p in state.pending)
        exit_interrupted(f"interrupted after segment {int(state.segments_done.max())}: state saved to {state_file} "
                         f"with {pending} tokens pending; run again with --state {state_file} --finish to run them "
                         "and print the result, or with more input to continue the sequence", as_json,
                         state=str(state_file), segments=int(state.segments_done.max()), pending=pending)
    per_row = [_row_result(bundle, state, output, row, top_k, tokenizer) for row in range(batch)]
    if as_json:
        click.echo(json.dumps({
            "ok": True, "bundle": str(bundle.path), "kind": bundle.kind, "backend": rt.picked,
            "tokens": tokens, "batch": batch,
            "state_shapes": {name: list(value.shape) for name, value in output.state.items()},
            **({} if output.memory is None else {"memory_shape": list(output.memory.shape)}),
            **(per_row[0] if batch == 1 else {}),  # batch 1: the row's figures at the top level too
            "rows": per_row,
            "seconds": run_seconds, "load_seconds": load_seconds,
            "tokens_per_second": tokens / run_seconds if run_seconds > 0 else None,
            "state": None if state_file is None else str(state_file), "resumed": resumed, "finish": finish,
            "outputs": None if save_outputs is None else str(save_outputs),
        }, indent=2))
        return
    rate = f", {tokens / run_seconds:.0f} tokens/s" if run_seconds > 0 else ""
    segments = int(state.segments_done.sum())
    pending = sum(len(p) for p in state.pending)
    click.echo(f"{tokens} token{'s' * (tokens != 1)}" + (f" in {batch} rows" if batch > 1 else "")
               + f", {segments} segment{'s' * (segments != 1)}"
               + (f" ({pending} tokens pending in {state_file})" if state_file is not None and pending else "")
               + rate, err=True)
    for row, result in enumerate(per_row):
        if batch > 1:
            click.echo(f"row {row}:")
        for line in _human_lines(bundle.kind, result):
            click.echo(("  " if batch > 1 else "") + line)

def _row_result(bundle: Bundle, state, output, row: int, top_k: int, tokenizer) -> dict:
    """One row's figures for --json: counters, memory norm, and its top-k (or class)."""
    result = {"tokens_seen": int(state.tokens_seen[row]), "segments": int(state.segments_done[row]),
              "pending": int(len(state.pending[row]))}
    if output.memory is not None:
        result["memory_norm"] = float(np.linalg.norm(output.memory[row].astype(np.float64)))
    logits = None if output.last_logits is None else output.last_logits[row]
    return {**result, **summarize(bundle, logits, top_k, tokenizer)}


if __name__ == "__main__":  # pragma: no cover
    main()
