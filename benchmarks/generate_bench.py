"""Decode speed: KV-cached generation vs recomputing the segment for every token, in one run.

Variants, interleaved round-robin (order rotated every repeat), same threads for all:
- runtime, cached:      ``RMTRuntime.generate`` (prefill once, then the decode graph per token)
- runtime, recompute:   ``GenerationConfig(use_cache=False)`` (the prefill graph over the
                        whole segment for every token: what a step-graph-only runtime must do)
- PyTorch, cached:      ``RMTDecoder.prefill`` + ``decode`` per token (transformers' cache)
All generate the same greedy tokens (checked). Figures: decode tokens/s after the first token
(the first token's time, which includes reading the prompt, is reported apart), and ratios.

    .venv/bin/python benchmarks/generate_bench.py --model tiny
    .venv/bin/python benchmarks/generate_bench.py --model gpt2-small --new-tokens 48

The prompt is 1.5 segments long: one segment goes into memory, half a segment is the
context the cache starts from. Bundles are exported with validation off into --out
(default /tmp/rmt-generate-bench/<model>) and reused while their manifest.json exists.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime_bench import build, bundle_for  # noqa: E402

from rmt_model.generation import split_context  # noqa: E402
from rmt_runtime import GenerationConfig, RMTRuntime  # noqa: E402
from rmt_runtime.cpuinfo import cpu_info, describe, usable_cores  # noqa: E402


@torch.no_grad()
def pytorch_cached(model, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    """Greedy generation with transformers' cache, as the reference reads it; (tokens, first-token time)."""
    started = time.perf_counter()
    size, m = model.segment_size, model.num_mem_tokens
    commit = split_context(len(prompt), size)
    memory = model.initial_memory(1)
    for start in range(0, commit, size):
        ids = torch.tensor([prompt[start:start + size]])
        _, memory = model.step(ids, torch.ones_like(ids), memory, logits="last")
    context = torch.tensor([prompt[commit:]])
    logits, cache = model.prefill(context, torch.ones_like(context), memory)
    tokens = [int(logits.argmax())]
    first = time.perf_counter() - started
    length = m + context.shape[1]
    for _ in range(new_tokens - 1):
        length += 1
        logits, cache = model.decode(torch.tensor([[tokens[-1]]]), torch.ones(1, length, dtype=torch.long),
                                     torch.tensor([[length - 1]]), cache)
        tokens.append(int(logits.argmax()))
    return tokens, first


def runtime_generate(rt: RMTRuntime, prompt: list[int], new_tokens: int, use_cache: bool) -> tuple[list[int], float]:
    started = time.perf_counter()
    state = rt.new_state()
    tokens, first = [], 0.0
    for step in rt.generate_stream(state, prompt, GenerationConfig(max_new_tokens=new_tokens, use_cache=use_cache)):
        if not tokens:
            first = time.perf_counter() - started
        tokens.append(int(step[0]))
    return tokens, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "gpt2-small"), default="tiny")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--reexport", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per run (default: half a segment)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    threads = args.threads or usable_cores()
    torch.set_num_threads(threads)
    out = args.out or Path("/tmp/rmt-generate-bench") / args.model
    model = build(args.model).eval()
    note = bundle_for(model, out, args.reexport)
    rt = RMTRuntime.load(out, backend="onnxruntime", threads=threads)
    size = rt.segment_size
    new_tokens = args.new_tokens or size // 2  # stays inside the segment: no rollover in the timing
    prompt = np.random.default_rng(0).integers(0, rt.bundle.vocab_size, size + size // 2).tolist()
    print("# rmt-edge generation benchmark\n")
    print(f"- CPU: {describe(cpu_info())}; threads {threads}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"- model: {args.model} (M={rt.bundle.num_mem_tokens}, segment {size}); bundle {note}")
    print(f"- prompt {len(prompt)} tokens, {new_tokens} new tokens per run, greedy; {args.repeats} repeats "
          "(median); decode rate excludes the first token\n")
    variants = {
        "runtime, cached (decode graph)": lambda: runtime_generate(rt, prompt, new_tokens, True),
        "runtime, recompute segment per token": lambda: runtime_generate(rt, prompt, new_tokens, False),
        "pytorch, cached (transformers cache)": lambda: pytorch_cached(model, prompt, new_tokens),
    }
    for fn in variants.values():  # warm-up, and the tokens must agree
        fn()
    names = list(variants)
    rates: dict[str, list[float]] = {n: [] for n in names}
    firsts: dict[str, list[float]] = {n: [] for n in names}
    outputs = {}
    for rep in range(args.repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            started = time.perf_counter()
            tokens, first = variants[name]()
            total = time.perf_counter() - started
            rates[name].append((len(tokens) - 1) / (total - first))
            firsts[name].append(first)
            outputs[name] = tokens
    agree = all(outputs[n] == outputs[names[0]] for n in names)
    base = statistics.median(rates["runtime, recompute segment per token"])
    torch_rate = statistics.median(rates["pytorch, cached (transformers cache)"])
    print("| variant | decode tokens/s | ms/token | first token ms | vs recompute | vs PyTorch cached |")
    print("|---|---|---|---|---|---|")
    for name in names:
        rate = statistics.median(rates[name])
        print(f"| {name} | {rate:.1f} | {1000 / rate:.2f} | {1000 * statistics.median(firsts[name]):.1f} | "
              f"{rate / base:.2f}x | {rate / torch_rate:.2f}x |")
    print(f"\nsame tokens from all variants: {agree}")
    if not agree:
        sys.exit(1)


if __name__ == "__main__":
    main()
