"""``rmt-generate``: text generation from a decoder bundle, printed as it comes.

Torch-free, like rmt-run: numpy, click, rmt_runtime, and ``tokenizers`` for text.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import click

from . import limits
from .bundle import Bundle
from .cli import CliInputError, optional_tokenizer, run_guarded_cli, read_input
from .cli_support import JsonCommand, exit_interrupted, fail, stop_requests
from .generation import GenerationConfig
from .runtime import RMTRuntime
from .state import locked_state_file

PROMPT_OPTIONS = ("--prompt", "--prompt-file", "--prompt-ids")


class _TextStream:
    """Prints generated tokens as they come: decoded text when there is a tokenizer (only
    whole characters: a byte-level token may end inside one), ids otherwise."""

    def __init__(self, tokenizer, enabled: bool) -> None:
        self.tokenizer = tokenizer
        self.enabled = enabled
        self.ids: list[int] = []
        self.shown = ""

    def add(self, token: int) -> None:
        self.ids.append(token)
        if not self.enabled:
            return
        if self.tokenizer is None:
            click.echo(f"{token} ", nl=False)
            sys.stdout.flush()
            return
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return
        if text.startswith(self.shown):
            click.echo(text[len(self.shown):], nl=False)
        else:  # a tokenizer that rewrites earlier text: start a new line with the whole text
            click.echo("\n" + text, nl=False)
        sys.stdout.flush()
        self.shown = text

    def text(self) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(self.ids, skip_special_tokens=False)


def _default_stops(bundle: Bundle) -> tuple[int, ...]:
    """The backbone's eos_token_id(s), when they are inside the vocabulary."""
    return tuple(v for v in bundle.eos_token_ids if v < bundle.vocab_size)


@click.command(cls=JsonCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", "bundle_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path), help="Decoder bundle directory.")
@click.option("--prompt", default=None, help="Prompt text (needs the bundle's tokenizer.json).")
@click.option("--prompt-file", default=None, metavar="FILE", help="Prompt text from FILE ('-': stdin).")
@click.option("--prompt-ids", default=None, metavar="FILE",
              help="Prompt token ids: a .npy integer array [N] or [1, N], or whitespace-separated integers "
                   "('-': stdin).")
@click.option("--max-new-tokens", type=limits.option_type(limits.MAX_NEW_TOKENS), default=64, show_default=True)
@click.option("--temperature", type=limits.option_type(limits.TEMPERATURE), default=0.0, show_default=True,
              help="0: greedy.")
@click.option("--top-k", type=limits.option_type(limits.TOP_K), default=0, show_default=True, help="0: off.")
@click.option("--top-p", type=limits.option_type(limits.TOP_P), default=1.0, show_default=True)
@click.option("--repetition-penalty", type=limits.option_type(limits.REPETITION_PENALTY), default=1.0,
              show_default=True, help="1: off.")
@click.option("--stop-token", "stop_tokens", type=limits.option_type(limits.TOKEN_ID), multiple=True,
              help="Stop after this id (repeatable). Default: the backbone's eos_token_id, if any.")
@click.option("--no-stop", is_flag=True, help="No stop tokens: always generate --max-new-tokens.")
@click.option("--seed", type=limits.option_type(limits.SEED), default=None,
              help="Seed for sampling (same seed, same tokens).")
@click.option("--no-rollover", is_flag=True,
              help="The reference's generation: memory is not written while generating and the context "
                   "grows up to the backbone's position limit (default: full segments roll into memory).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "openvino"]), default="auto", show_default=True,
              help="What runs the graphs (generation runs on ONNX Runtime or OpenVINO).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=None,
              help="With --backend openvino: compute the fp32 bundle in fp32 (default) or bf16 (CPUs with AVX-512 "
                   "BF16 or AMX; an error elsewhere). Other backends run the bundle's own precision.")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default=None,
              help="Execution provider; an explicit one never falls back.")
@click.option("--threads", type=limits.option_type(limits.THREADS), default=None, help="Intra-op CPU threads.")
@click.option("--state", "state_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Continue the conversation saved in FILE (if it exists), then save it there.")
@click.option("--json", "as_json", is_flag=True,
              help="Print only a machine-readable result: the generated ids (and text with a tokenizer).")
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
def main(bundle_dir, prompt, prompt_file, prompt_ids, max_new_tokens, temperature, top_k, top_p,
         repetition_penalty, stop_tokens, no_stop, seed, no_rollover, backend, provider, precision, threads, state_file,
         as_json, verbose):
    """Generate text after a prompt of any length with a decoder bundle.

    \b
    Examples:
      rmt-generate --bundle model-fp32 --prompt "Once upon a time" --max-new-tokens 100
      rmt-generate --bundle model-fp32 --prompt-file book.txt --temperature 0.8 --top-p 0.95 --seed 1
      rmt-generate --bundle model-fp32 --prompt-ids ids.npy --json
    \b
    A conversation across invocations (memory carries everything said so far):
      rmt-generate --bundle model-fp32 --prompt "Q: ..." --state chat.npz
      rmt-generate --bundle model-fp32 --prompt "Q: ..." --state chat.npz

    The prompt is read segment by segment into memory; the last segment and the generated
    tokens are decoded with a key/value cache. When they fill a segment it is written into
    memory and generation goes on in a fresh one, so any length runs in constant memory
    (--no-rollover: the reference's behaviour). Tokens are printed as they come. With
    --state, Ctrl-C or SIGTERM stops after the current token and saves the state (exit 130).
    """
    if no_stop and stop_tokens:
        fail("give --stop-token or --no-stop, not both", as_json)

    def prepare():
        bundle = Bundle.load(bundle_dir)
        if bundle.kind != "decoder":
            raise CliInputError(f"bundle {bundle.path} is an encoder (classification): rmt-generate needs a "
                                "decoder bundle")
        ids, tokenizer = read_input(bundle, prompt, prompt_file, prompt_ids, PROMPT_OPTIONS)
        if ids.shape[0] != 1:
            raise CliInputError(f"{prompt_ids}: rmt-generate takes one prompt ([N] or [1, N]), got "
                                f"{ids.shape[0]} rows: run one invocation per prompt, or batch with "
                                "RMTRuntime.generate in Python")
        ids = ids[0]
        if tokenizer is None:
            tokenizer = optional_tokenizer(bundle)
        if state_file is not None and state_file.is_dir():
            raise CliInputError(f"{state_file}: is a directory, not a state file")
        stops = () if no_stop else tuple(stop_tokens) or _default_stops(bundle)
        config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                  top_p=top_p, repetition_penalty=repetition_penalty, stop_tokens=stops,
                                  seed=seed, rollover=not no_rollover)
        config.check(bundle.vocab_size)
        return bundle, ids, tokenizer, config

    bundle, ids, tokenizer, config = run_guarded_cli(verbose, as_json, prepare)
    stream = _TextStream(tokenizer, enabled=not as_json)

    def work_holding_the_state():
        stopping = stop_requests() if state_file is not None else contextlib.nullcontext()
        with stopping as stop:
            started = time.perf_counter()
            rt = RMTRuntime.load(bundle, backend=backend, provider=provider, threads=threads, precision=precision)
            click.echo(f"backend: {rt.picked}", err=True)
            resumed = state_file is not None and state_file.exists()
            state = rt.restore_state(state_file) if resumed else rt.new_state()
            loaded = time.perf_counter()
            first = None
            finished = True
            for tokens in rt.generate_stream(state, ids, config):
                if first is None:
                    first = time.perf_counter()
                stream.add(int(tokens[0]))
                if stop is not None and stop.is_set():
                    finished = False
                    break
            done = time.perf_counter()
        if not as_json:
            click.echo("")
        if state_file is not None:
            rt.save_state(state, state_file)
        return rt, state, resumed, finished, loaded - started, (first or done) - loaded, done - (first or done)

    def work():
        # One invocation at a time per state file: a second one waits instead of losing an update.
        if state_file is None:
            return work_holding_the_state()
        with locked_state_file(state_file, lambda message: click.echo(message, err=True)):
            return work_holding_the_state()

    rt, state, resumed, finished, load_s, prompt_s, decode_s = run_guarded_cli(verbose, as_json, work)
    new = len(stream.ids)
    if not finished:
        exit_interrupted(f"interrupted after {new} tokens: state saved to {state_file}; run again with --state "
                         f"{state_file} to continue the conversation", as_json, new_tokens=new, tokens=stream.ids,
                         text=stream.text(), state=str(state_file))
    rate = (new - 1) / decode_s if new > 1 and decode_s > 0 else None
    if as_json:
        result = {"ok": True, "bundle": str(bundle.path), "backend": rt.picked, "prompt_tokens": int(ids.size),
                  "new_tokens": new, "tokens": stream.ids, "text": stream.text(),
                  "stopped": bool(stream.ids and stream.ids[-1] in config.stop_tokens),
                  "segments_in_memory": int(state.segments_done[0]), "pending": int(len(state.pending[0])),
                  "load_seconds": load_s, "first_token_seconds": prompt_s, "decode_tokens_per_second": rate,
                  "state": None if state_file is None else str(state_file), "resumed": resumed}
        click.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    summary = f"{ids.size} prompt tokens, {new} new tokens; first token after {prompt_s:.2f}s"
    if rate:
        summary += f", then {rate:.0f} tokens/s"
    if state_file is not None:
        summary += f"; state saved to {state_file}"
    click.echo(summary, err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
