"""Decode speed: rmt-edge bundles against PyTorch's cached generation, in one run.

Variants, interleaved round-robin (order rotated every repeat), same threads for all:
- rmt-edge (``RMTRuntime.generate_stream``: prefill once, then the decode graph per token):
  - ORT fp32:             the fp32 bundle on the onnxruntime backend
  - ORT fp32, recompute:  ``GenerationConfig(use_cache=False)`` (the prefill graph over the
                          whole segment for every token: what a step-graph-only runtime must do)
  - ORT int8:             the int8 bundle (dynamic int8 weights) on onnxruntime
  - OpenVINO bf16 / fp32: the fp32 bundle on the openvino backend, computed in bf16 (where the
                          CPU has bf16 instructions) and in fp32; a row says "skipped" with the
                          error's first line where that backend cannot load
- PyTorch, the same random-weight model:
  - RMTDecoder loop fp32: ``RMTDecoder.prefill`` + ``decode`` per token (transformers' cache)
  - RMTDecoder loop bf16: the same under ``torch.autocast("cpu", dtype=torch.bfloat16)``
  - HF generate fp32:     Hugging Face ``generate`` (greedy, ``use_cache=True``) on the RMT's
                          backbone (``model.model``, a ``GPT2LMHeadModel`` for GPT-2), fed
                          ``inputs_embeds=[memory, context]``: the context the RMT's cached
                          decode starts from, memory computed by ``model.step`` first
  - HF generate bf16, autocast / bf16 weights: the same under autocast, and on a copy of the
                          model cast to ``torch.bfloat16``
  bf16 variants run only where ``rmt_runtime.cpuinfo.native_bf16()`` (without bf16
  instructions PyTorch emulates bf16, slower than fp32: not a peer anyone would run).
Every variant generates exactly --new-tokens tokens (HF: min_new_tokens = max_new_tokens).
The fp32 variants must produce the same greedy tokens as the PyTorch fp32 loop (checked:
the run fails otherwise); for bf16 and int8 the fraction of positions equal to it is
reported. Figures: decode tokens/s after the first token (the first token's time, which
includes reading the prompt, is reported apart), and the ratio to the fastest PyTorch variant.

    .venv/bin/python benchmarks/generate_bench.py --model tiny
    .venv/bin/python benchmarks/generate_bench.py --model gpt2-small --new-tokens 32 --repeats 2

The prompt is 1.5 segments long: one segment goes into memory, half a segment is the
context the cache starts from. The fp32 and int8 bundles are exported with validation off
into --out/fp32 and --out/int8 (default --out /tmp/rmt-generate-bench/<model>) and reused
while their manifest.json exists.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime_bench import build  # noqa: E402

from rmt_export.exporter import ExportOptions, export_model  # noqa: E402
from rmt_model.generation import split_context  # noqa: E402
from rmt_runtime import GenerationConfig, RMTRuntime  # noqa: E402
from rmt_runtime.cpuinfo import cpu_info, describe, native_bf16, usable_cores  # noqa: E402

REFERENCE = "PyTorch RMTDecoder loop fp32"


def bundle_for(model: torch.nn.Module, out: Path, precision: str, reexport: bool) -> str:
    """The bundle in ``out`` (exported unless one is there): step, ingest, prefill and decode graphs."""
    if (out / "manifest.json").is_file() and not reexport:
        return f"{precision} reused {out}"
    started = time.perf_counter()
    export_model(model, out, ExportOptions(precision=precision, validate=False, force=True))
    return f"{precision} exported to {out} in {time.perf_counter() - started:.1f}s (validation off)"


def read_prompt_into_memory(model, prompt: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Every full segment but the last into memory, as the reference does before it generates;
    (memory [1, M, D], the context the cache starts from)."""
    size = model.segment_size
    commit = split_context(len(prompt), size)
    memory = model.initial_memory(1)
    for start in range(0, commit, size):
        ids = torch.tensor([prompt[start:start + size]])
        _, memory = model.step(ids, torch.ones_like(ids), memory, logits="last")
    return memory, prompt[commit:]


@torch.no_grad()
def pytorch_cached(model, prompt: list[int], new_tokens: int, bf16: bool = False) -> tuple[list[int], float]:
    """Greedy generation with transformers' cache, as the reference reads it; (tokens, first-token time)."""
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
        started = time.perf_counter()
        memory, context = read_prompt_into_memory(model, prompt)
        context = torch.tensor([context])
        logits, cache = model.prefill(context, torch.ones_like(context), memory)
        tokens = [int(logits.argmax())]
        first = time.perf_counter() - started
        length = model.num_mem_tokens + context.shape[1]
        for _ in range(new_tokens - 1):
            length += 1
            logits, cache = model.decode(torch.tensor([[tokens[-1]]]), torch.ones(1, length, dtype=torch.long),
                                         torch.tensor([[length - 1]]), cache)
            tokens.append(int(logits.argmax()))
    return tokens, first


class _Stamps:
    """A ``generate`` streamer that notes when each token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.calls = 0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls > 1:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.no_grad()
def hf_generate(model, prompt: list[int], new_tokens: int, autocast: bool = False) -> tuple[list[int], float]:
    """Hugging Face ``generate`` on the RMT's backbone, fed [memory, context] as inputs_embeds."""
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
        started = time.perf_counter()
        memory, context = read_prompt_into_memory(model, prompt)
        backbone = model.model
        embeds = backbone.get_input_embeddings()(torch.tensor([context]))
        embeds = torch.cat([memory.to(embeds.dtype), embeds], dim=1)
        stamps = _Stamps()
        out = backbone.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                                use_cache=True, pad_token_id=0, streamer=stamps)
    tokens = out[0, -new_tokens:].tolist()
    assert len(stamps.times) == new_tokens, (len(stamps.times), new_tokens)  # the first put was the prompt
    return tokens, stamps.times[0] - started


def runtime_generate(rt: RMTRuntime, prompt: list[int], new_tokens: int, use_cache: bool = True
                     ) -> tuple[list[int], float]:
    started = time.perf_counter()
    state = rt.new_state()
    tokens, first = [], 0.0
    for step in rt.generate_stream(state, prompt, GenerationConfig(max_new_tokens=new_tokens, use_cache=use_cache)):
        if not tokens:
            first = time.perf_counter() - started
        tokens.append(int(step[0]))
    return tokens, first


def load_runtime(bundle: Path, threads: int, backend: str = "onnxruntime", **extra):
    """(runtime, None) or (None, the error's first line)."""
    try:
        return RMTRuntime.load(bundle, backend=backend, threads=threads, **extra), None
    except Exception as error:  # noqa: BLE001 - a backend that cannot run here is a skipped row
        return None, f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def profile_decode(bundle: Path, past: int, threads: int, vocab: int, reps: int = 10, warmup: int = 2) -> str:
    """Where one decode token's time goes: ONNX Runtime's profiler on the bundle's decode graph
    with a cache of ``past`` positions (random values), kernel time per operator type, and
    the LM head (the node whose output is [.., vocab]) apart."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(folder, "decode")
        session = ort.InferenceSession(str(bundle / "decode.onnx"), options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feed = {"input_ids": np.array([[1]]), "attention_mask": np.ones((1, past + 1), np.int64),
                "position_ids": np.array([[past]])}
        for arg in session.get_inputs()[3:]:  # past.{i}.key / .value [1, heads, past, head_dim]
            feed[arg.name] = rng.standard_normal([1, arg.shape[1], past, arg.shape[3]]).astype(np.float32)
        for _ in range(warmup + reps):
            session.run(None, feed)
        with open(session.end_profiling()) as file:
            events = json.load(file)
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    after = runs[warmup - 1]["ts"] + runs[warmup - 1]["dur"]  # the warm-up runs do not count
    events = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > after]
    per_op: collections.Counter = collections.Counter()
    head = 0.0
    for event in events:
        per_op[event["args"]["op_name"]] += event["dur"] / reps / 1000
        shapes = event["args"].get("output_type_shape") or [{}]
        if any(shape and shape[-1] == vocab for shape in (list(s.values())[0] for s in shapes if s)):
            head += event["dur"] / reps / 1000
    total = sum(per_op.values())
    top = ", ".join(f"{op} {ms:.1f} ({ms / total:.0%})" for op, ms in per_op.most_common(6))
    return f"kernels {total:.1f} ms/token; LM head {head:.1f} ms ({head / total:.0%}); by operator: {top}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "gpt2-small"), default="tiny")
    parser.add_argument("--out", type=Path, default=None,
                        help="bundle directory: fp32/ and int8/ under it (default /tmp/rmt-generate-bench/<model>)")
    parser.add_argument("--reexport", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per run (default: half a segment)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true",
                        help="also profile one decode token of each ONNX Runtime bundle (where the time goes)")
    args = parser.parse_args()
    threads = args.threads or usable_cores()
    torch.set_num_threads(threads)
    out = args.out or Path("/tmp/rmt-generate-bench") / args.model
    info = cpu_info()
    bf16 = native_bf16(info)
    model = build(args.model).eval()
    notes = [bundle_for(model, out / precision, precision, args.reexport) for precision in ("fp32", "int8")]
    runtimes, skipped = {}, {}
    for name, bundle, backend, extra in [
        ("rmt-edge ORT fp32", "fp32", "onnxruntime", {}),
        ("rmt-edge ORT int8", "int8", "onnxruntime", {}),
        ("rmt-edge OpenVINO bf16", "fp32", "openvino", {"precision": "bf16"}),
        ("rmt-edge OpenVINO fp32", "fp32", "openvino", {"precision": "fp32"}),
    ]:
        if "bf16" in name and not bf16:
            skipped[name] = "the CPU has no bf16 instructions"
            continue
        runtimes[name], error = load_runtime(out / bundle, threads, backend, **extra)
        if error:
            skipped[name] = error
    rt = runtimes["rmt-edge ORT fp32"]
    if rt is None:
        sys.exit(f"the fp32 bundle does not load: {skipped['rmt-edge ORT fp32']}")
    size = rt.segment_size
    new_tokens = args.new_tokens or size // 2  # stays inside the segment: no rollover in the timing
    prompt = np.random.default_rng(0).integers(0, rt.bundle.vocab_size, size + size // 2).tolist()
    print("# rmt-edge generation benchmark\n")
    print(f"- CPU: {describe(info)}; native bf16: {bf16}; threads {threads}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"- torch {torch.__version__}; model: {args.model} (M={rt.bundle.num_mem_tokens}, segment {size}); "
          f"bundles: {'; '.join(notes)}")
    print(f"- prompt {len(prompt)} tokens, {new_tokens} new tokens per run, greedy; {args.repeats} repeats "
          "(median); decode rate excludes the first token")
    for name, runtime in runtimes.items():
        if runtime is not None:
            print(f"- {name}: {runtime.picked}")
    print()

    def on(name, fn):
        return lambda: fn(runtimes[name], prompt, new_tokens)

    variants = {
        "rmt-edge ORT fp32": on("rmt-edge ORT fp32", runtime_generate),
        "rmt-edge ORT fp32, recompute segment per token":
            lambda: runtime_generate(rt, prompt, new_tokens, use_cache=False),
    }
    for name in ("rmt-edge ORT int8", "rmt-edge OpenVINO bf16", "rmt-edge OpenVINO fp32"):
        if runtimes.get(name) is not None:
            variants[name] = on(name, runtime_generate)
    variants[REFERENCE] = lambda: pytorch_cached(model, prompt, new_tokens)
    variants["PyTorch HF generate fp32"] = lambda: hf_generate(model, prompt, new_tokens)
    pytorch = [REFERENCE, "PyTorch HF generate fp32"]
    if bf16:
        model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
        variants["PyTorch RMTDecoder loop bf16 (autocast)"] = lambda: pytorch_cached(model, prompt, new_tokens, True)
        variants["PyTorch HF generate bf16 (autocast)"] = lambda: hf_generate(model, prompt, new_tokens, True)
        variants["PyTorch HF generate bf16 (bf16 weights)"] = lambda: hf_generate(model_bf16, prompt, new_tokens)
        pytorch += [n for n in variants if n.startswith("PyTorch") and "bf16" in n]
    else:
        for name in ("PyTorch RMTDecoder loop bf16 (autocast)", "PyTorch HF generate bf16"):
            skipped[name] = "the CPU has no bf16 instructions (PyTorch would emulate bf16)"
    must_agree = ["rmt-edge ORT fp32", "rmt-edge ORT fp32, recompute segment per token", REFERENCE,
                  "PyTorch HF generate fp32"]

    for fn in variants.values():  # warm-up
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
            assert len(tokens) == new_tokens, (name, len(tokens))
            rates[name].append((len(tokens) - 1) / (total - first))
            firsts[name].append(first)
            outputs[name] = tokens
    rate = {n: statistics.median(rates[n]) for n in names}
    best = max(pytorch, key=rate.get)
    reference = outputs[REFERENCE]
    print("| variant | decode tokens/s | ms/token | first token ms | vs best PyTorch | tokens equal to fp32 PyTorch |")
    print("|---|---|---|---|---|---|")
    for name in names:
        equal = sum(a == b for a, b in zip(outputs[name], reference)) / len(reference)
        print(f"| {name} | {rate[name]:.1f} | {1000 / rate[name]:.2f} | {1000 * statistics.median(firsts[name]):.1f} | "
              f"{rate[name] / rate[best]:.2f}x | {equal:.2f} |")
    for name, why in skipped.items():
        print(f"| {name} | skipped: {why} | | | | |")
    fastest = max((n for n in names if n not in pytorch), key=rate.get)
    print(f"\nbest PyTorch variant: {best} ({rate[best]:.1f} tokens/s); fastest rmt-edge: {fastest} "
          f"({rate[fastest] / rate[best]:.2f}x)")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.profile:
        past = rt.bundle.num_mem_tokens + len(prompt) - split_context(len(prompt), size)
        for precision in ("fp32", "int8"):
            print(f"- decode profile, ORT {precision}, cache of {past} positions: "
                  f"{profile_decode(out / precision, past, threads, rt.bundle.vocab_size)}")
    agree = all(outputs[n] == reference for n in must_agree)
    print(f"same tokens from the fp32 variants ({', '.join(must_agree)}): {agree}")
    if not agree:
        sys.exit(1)


if __name__ == "__main__":
    main()
