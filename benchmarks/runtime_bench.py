"""Runtime speed vs the PyTorch segment loop, and the runtime's overhead over bare ONNX Runtime.

Everything is measured side by side in ONE run and reported as ratios (run-to-run noise on
the project's 2-core machines is about +-10%; see FIELD_NOTES.md). Variants are interleaved
round-robin, rotating the order on every repeat, so drift hits them all alike.

1. Throughput (tokens/s) at each batch, same thread count for ONNX Runtime and PyTorch:
   - runtime, reading context: ``RMTRuntime.run(ids)`` (ingest graph: last-token logits only)
   - runtime, full logits:     ``RMTRuntime.run(ids, return_logits=True)`` (step graph)
   - PyTorch ``model(ids)``:   the reference segment loop, which always computes full logits
   - PyTorch last-logits loop: ``model.step(..., logits="last")`` per segment, i.e. what the
     ingest graph computes (the like-for-like partner of "runtime, reading context")
2. Per-segment overhead of the runtime over a bare ``onnxruntime.InferenceSession.run`` loop
   of the same ingest graph, same inputs, memory fed back as numpy, at batch 1; runs
   alternate A B B A. Target: < 3%.
3. Where the runtime's Python-side time goes (each piece timed alone, at batch 1).

    .venv/bin/python benchmarks/runtime_bench.py --model tiny
    .venv/bin/python benchmarks/runtime_bench.py --model gpt2-small --segments 4

Bundles are exported with validation off into --out (default /tmp/rmt-runtime-bench/<model>)
and reused while their manifest.json exists, unless --reexport.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import timeit
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from rmt_export.exporter import ExportOptions, export_model
from rmt_model import RMTConfig, build_model, family_config_dict
from rmt_model.tiny import tiny_config
from rmt_runtime import RMTRuntime
from rmt_runtime.cpuinfo import cpu_info, describe, usable_cores
from rmt_runtime.spec import INGEST, STEP

DEFAULT_SEGMENTS = {"tiny": 64, "gpt2-small": 4}
DEFAULT_REPEATS = {"tiny": "7", "gpt2-small": "3,2"}  # per batch, in --batches order
DEFAULT_OVERHEAD_REPS = {"tiny": 200, "gpt2-small": 6}


# ---- model and bundle ------------------------------------------------------------------------
def build(name: str) -> torch.nn.Module:
    if name == "tiny":
        config = tiny_config("gpt2", num_mem_tokens=4, segment_size=16)
    else:  # as benchmarks/export_bench.py: the shape of the published RMT-on-GPT-2 checkpoints
        backbone = family_config_dict("gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=50257,
                                      n_positions=1024)
        config = RMTConfig(kind="decoder", backbone=backbone, num_mem_tokens=16, segment_size=512)
    torch.manual_seed(0)
    return build_model(config)


def bundle_for(model: torch.nn.Module, out: Path, reexport: bool) -> str:
    if (out / "manifest.json").is_file() and not reexport:
        return f"reused {out}"
    started = time.perf_counter()
    export_model(model, out, ExportOptions(validate=False, force=True))
    return f"exported to {out} in {time.perf_counter() - started:.1f}s (validation off)"


# ---- machine facts ----------------------------------------------------------------------------
def header(args, threads: int) -> None:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print("# rmt-edge runtime benchmark\n")
    print(f"- CPU: {describe(cpu_info())}; {os.cpu_count()} logical cores; load average at start {load}")
    print(f"- Python {platform.python_version()}, onnxruntime {ort.__version__} "
          f"({', '.join(ort.get_available_providers())}), torch {torch.__version__}, numpy {np.__version__}")
    print(f"- threads: {threads} (torch.set_num_threads and RMTRuntime threads=); torch interop "
          f"{torch.get_num_interop_threads()}")
    print(f"- model: {args.model}; segments {args.segments}; warmup {args.warmup} segment(s) per variant; "
          f"throughput repeats per batch {dict(zip(args.batches, args.repeats))} (median); "
          f"overhead reps {args.overhead_reps} pairs")


# ---- throughput -----------------------------------------------------------------------------
def pytorch_last_logits_loop(model, ids: torch.Tensor):
    """The segment loop computing what the ingest graph computes: memory + last-token logits."""
    memory = model.initial_memory(ids.shape[0])
    mask = torch.ones_like(ids)
    logits = None
    for start in range(0, ids.shape[1], model.segment_size):
        end = start + model.segment_size
        logits, memory = model.step(ids[:, start:end], mask[:, start:end], memory, logits="last")
    return memory, logits


def throughput(model, rt: RMTRuntime, batch: int, repeats: int, args, rng) -> dict:
    size, vocab = rt.segment_size, rt.bundle.vocab_size
    ids = rng.integers(0, vocab, size=(batch, args.segments * size), dtype=np.int64)
    warm = ids[:, :args.warmup * size]
    variants = {
        "runtime ingest": lambda x: rt.run(x),
        "runtime step (full logits)": lambda x: rt.run(x, return_logits=True),
        "pytorch model(ids) (full logits)": lambda x: model(torch.from_numpy(x)),
        "pytorch step(logits='last') loop": lambda x: pytorch_last_logits_loop(model, torch.from_numpy(x)),
    }
    if batch not in args.logits_batches:
        del variants["runtime step (full logits)"], variants["pytorch model(ids) (full logits)"]
    times: dict[str, list[float]] = {name: [] for name in variants}
    cores: dict[str, list[float]] = {name: [] for name in variants}  # CPU seconds / wall seconds
    with torch.no_grad():
        if args.warmup:
            for fn in variants.values():
                fn(warm)  # result dropped at once (full logits can be GBs)
        names = list(variants)
        kept = {}
        for rep in range(repeats):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                cpu, started = time.process_time(), time.perf_counter()
                result = variants[name](ids)
                wall = time.perf_counter() - started
                times[name].append(wall)
                cores[name].append((time.process_time() - cpu) / wall)
                if rep == 0 and name in ("runtime ingest", "pytorch step(logits='last') loop"):
                    kept[name] = result
                del result
    # Sanity check (untimed): the runtime and PyTorch ran the same computation.
    out, (ref_memory, ref_logits) = kept["runtime ingest"], kept["pytorch step(logits='last') loop"]
    parity = (float(np.abs(out.memory - ref_memory.numpy()).max()),
              float(np.abs(out.last_logits - ref_logits.numpy()).max()))
    tokens = ids.size
    return {"tokens": tokens, "parity": parity,
            "seconds": {name: statistics.median(t) for name, t in times.items()},
            "spread": {name: (min(t), max(t)) for name, t in times.items()},
            "cores": {name: statistics.median(c) for name, c in cores.items()}}


# ---- overhead over bare ONNX Runtime ------------------------------------------------------------
def bare_session(rt: RMTRuntime, threads: int):
    """A plain InferenceSession of the ingest graph with the runner's own session options."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(rt.bundle.graph_path(INGEST)), options, providers=["CPUExecutionProvider"])


def overhead(rt: RMTRuntime, threads: int, args, rng) -> dict:
    size, vocab = rt.segment_size, rt.bundle.vocab_size
    ids = rng.integers(0, vocab, size=(1, args.segments * size), dtype=np.int64)
    mask = np.ones_like(ids)
    session = bare_session(rt, threads)
    memory_init = np.load(rt.bundle.memory_init_path).astype(np.float32)
    outputs = ["last_logits", "new_memory"]

    def bare(stamps: list[float] | None = None):
        memory = np.repeat(memory_init[None], ids.shape[0], axis=0)
        last = None
        for start in range(0, ids.shape[1], size):
            feed = {"input_ids": np.ascontiguousarray(ids[:, start:start + size]),
                    "attention_mask": np.ascontiguousarray(mask[:, start:start + size]), "memory": memory}
            last, memory = session.run(outputs, feed)
            if stamps is not None:
                stamps.append(time.perf_counter())
        return memory, last

    def runtime(stamps: list[float] | None = None):
        progress = (lambda done, total: stamps.append(time.perf_counter())) if stamps is not None else None
        out = rt.run(ids, mask, progress=progress)
        return out.memory, out.last_logits

    # Same inputs, same outputs (else the comparison is meaningless).
    for _ in range(max(args.warmup, 1)):
        bare_memory, bare_last = bare()
        rt_memory, rt_last = runtime()
    parity = (float(np.abs(bare_memory - rt_memory).max()), float(np.abs(bare_last - rt_last).max()))

    runs = {"bare": [], "runtime": []}    # whole run / segments: per-run costs amortised
    steady = {"bare": [], "runtime": []}  # segment-to-segment intervals after the first segment
    fns = {"bare": bare, "runtime": runtime}
    for rep in range(args.overhead_reps):
        order = ("bare", "runtime") if rep % 2 == 0 else ("runtime", "bare")  # A B B A ...
        for name in order:
            stamps: list[float] = []
            started = time.perf_counter()
            fns[name](stamps)
            ended = time.perf_counter()
            runs[name].append((ended - started) / args.segments)
            steady[name].extend(np.diff(stamps).tolist())
    pairs = [r / b for r, b in zip(runs["runtime"], runs["bare"])]
    return {"parity": parity, "runs": runs, "steady": steady, "paired": statistics.median(pairs) - 1,
            "ids": ids, "mask": mask, "session": session}


def overhead_sources(rt: RMTRuntime, ids: np.ndarray, mask: np.ndarray) -> list[tuple[str, str, float]]:
    """Each piece of the runtime's Python-side work, timed alone at batch 1 (microseconds per call)."""
    size = rt.segment_size
    seg_ids, seg_mask = np.ascontiguousarray(ids[:, :size]), np.ascontiguousarray(mask[:, :size])
    runner = rt.runner
    spec = runner.spec(STEP)
    state = rt.new_state(1)
    session = runner._sessions[INGEST]
    vocab = rt.bundle.vocab_size

    def binding():
        b = session.io_binding()
        b.bind_cpu_input("input_ids", seg_ids)
        b.bind_cpu_input("attention_mask", seg_mask)
        for name, output in rt.state_pairs.items():
            b.bind_ortvalue_input(name, state.handles[name])
            b.bind_ortvalue_output(output, state.scratch[name])
        b.bind_output("last_logits", "cpu")
        return b

    logits = np.zeros((1, vocab), np.float32)
    pieces = [
        ("runner.check (run() checks each segment once, up front)", "per segment",
         lambda: runner.check(spec, {"input_ids": seg_ids, "attention_mask": seg_mask, **state.handles})),
        ("state_tensors + isfinite (every segment on CPU)", "per segment",
         lambda: rt._check_finite(rt.state_tensors(state), "x")),
        ("io_binding() + 5 binds (new binding every segment)", "per segment", binding),
        ("last_logits .numpy() copy [1, vocab]", "per segment", lambda: logits.copy()),
        ("mask.any + counters + _record_logits", "per segment",
         lambda: (seg_mask.any(axis=1), rt._record_logits(state, logits, seg_mask.any(axis=1)))),
        ("_left_aligned slicing of the whole input", "per run",
         lambda: [(np.ascontiguousarray(ids[:, s:s + size]), np.ascontiguousarray(mask[:, s:s + size]))
                  for s in range(0, ids.shape[1], size)]),
        ("new_state(1) (repeat, isfinite, 2 OrtValues)", "per run", lambda: rt.new_state(1)),
        ("final state read + isfinite", "per run", lambda: rt._check_finite(rt.state_tensors(state), "x")),
    ]
    rows = []
    for label, when, fn in pieces:
        timer = timeit.Timer(fn)
        number, _ = timer.autorange()
        best = min(timer.repeat(repeat=5, number=number)) / number
        rows.append((label, when, best * 1e6))
    return rows


# ---- report ----------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "gpt2-small"), default="tiny")
    parser.add_argument("--out", type=Path, default=None, help="bundle directory (default /tmp/rmt-runtime-bench/<model>)")
    parser.add_argument("--reexport", action="store_true", help="export even if a bundle exists in --out")
    parser.add_argument("--segments", type=int, default=None, help="segments of input (default 4 gpt2-small, 64 tiny)")
    parser.add_argument("--warmup", type=int, default=1, help="segments run untimed by each variant first")
    parser.add_argument("--batches", default="1,8", help="batch sizes for the throughput table")
    parser.add_argument("--logits-batches", default=None,
                        help="batches that also run the full-logits variants (default: all of --batches); "
                             "full logits at gpt2-small batch 8 x 4 segments are 3.3 GB per copy")
    parser.add_argument("--threads", type=int, default=None, help="threads for both (default: usable cores)")
    parser.add_argument("--repeats", default=None,
                        help="timed runs per throughput variant (median), one number or one per batch "
                             "(default 7 tiny, 3,2 gpt2-small)")
    parser.add_argument("--overhead-reps", type=int, default=None, help="runtime/bare run pairs at batch 1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.segments = args.segments or DEFAULT_SEGMENTS[args.model]
    args.overhead_reps = args.overhead_reps or DEFAULT_OVERHEAD_REPS[args.model]
    args.out = args.out or Path("/tmp/rmt-runtime-bench") / args.model
    args.batches = [int(b) for b in args.batches.split(",")]
    repeats = [int(r) for r in (args.repeats or DEFAULT_REPEATS[args.model]).split(",")]
    args.repeats = [repeats[min(i, len(repeats) - 1)] for i in range(len(args.batches))]
    args.logits_batches = ([int(b) for b in args.logits_batches.split(",")] if args.logits_batches is not None
                           else args.batches)
    if args.segments < 1 or args.warmup < 0 or min(args.repeats) < 1:
        parser.error("--segments and --repeats must be >= 1 and --warmup >= 0")
    threads = args.threads or usable_cores()
    torch.set_num_threads(threads)

    header(args, threads)
    started = time.perf_counter()
    model = build(args.model)
    params = sum(p.numel() for p in model.parameters())
    built = time.perf_counter() - started
    how = bundle_for(model, args.out, args.reexport)
    rt = RMTRuntime.load(args.out, backend="onnxruntime", provider="cpu", threads=threads)
    b = rt.bundle
    print(f"- RMT: {b.kind}, {params / 1e6:.1f}M parameters (built in {built:.1f}s), M={b.num_mem_tokens}, "
          f"segment {b.segment_size}, d={b.hidden_size}, vocab {b.vocab_size}; bundle {how}")
    print(f"- runtime: {rt.picked}\n")

    rng = np.random.default_rng(args.seed)
    results = {}
    for batch, repeats in zip(args.batches, args.repeats):
        t0 = time.perf_counter()
        results[batch] = throughput(model, rt, batch, repeats, args, rng)
        print(f"(batch {batch} measured in {time.perf_counter() - t0:.0f}s)", flush=True)

    print(f"\n## Throughput: {args.segments} segments x {b.segment_size} tokens, {threads} threads\n")
    print("| batch | variant | s per run (median) | min..max s | ms per segment | tokens/s | cores used |")
    print("|---|---|---|---|---|---|---|")
    for batch, r in results.items():
        for name, seconds in r["seconds"].items():
            low, high = r["spread"][name]
            print(f"| {batch} | {name} | {seconds:.3f} | {low:.3f}..{high:.3f} | "
                  f"{seconds / args.segments * 1e3:.1f} | {r['tokens'] / seconds:,.0f} | {r['cores'][name]:.2f} |")
    print(f"\n(cores used: CPU seconds / wall seconds of the timed runs; well under {threads} means the "
          "process waited for the CPU, i.e. other load on the machine, or idle threads)")
    print("\nRatios (tokens/s runtime / tokens/s PyTorch; > 1: the runtime is faster):\n")
    print("| batch | runtime ingest / pytorch model(ids) [NOT like-for-like: PyTorch also computes full logits] "
          "| runtime ingest / pytorch last-logits loop [like-for-like] "
          "| runtime full logits / pytorch model(ids) [like-for-like] | parity: max abs diff memory, last logits |")
    print("|---|---|---|---|---|")
    for batch, r in results.items():
        s = r["seconds"]
        full = (f"{s['pytorch model(ids) (full logits)'] / s['runtime step (full logits)']:.2f}"
                if "runtime step (full logits)" in s else "not run")
        vs_full = (f"{s['pytorch model(ids) (full logits)'] / s['runtime ingest']:.2f}"
                   if "pytorch model(ids) (full logits)" in s else "not run")
        like = s["pytorch step(logits='last') loop"] / s["runtime ingest"]
        print(f"| {batch} | {vs_full} | {like:.2f} | "
              f"{full} | {r['parity'][0]:.1e}, {r['parity'][1]:.1e} |")

    t0 = time.perf_counter()
    o = overhead(rt, threads, args, rng)
    print(f"\n(overhead measured in {time.perf_counter() - t0:.0f}s)")
    print(f"\n## Runtime overhead over a bare InferenceSession.run loop (ingest graph, batch 1, "
          f"{args.segments} segments, {args.overhead_reps} alternating pairs)\n")
    print(f"Same inputs, same outputs: max abs diff memory {o['parity'][0]:.1e}, last logits {o['parity'][1]:.1e}\n")
    print("| measure | bare ORT ms/segment (median) | runtime ms/segment (median) | overhead |")
    print("|---|---|---|---|")
    rb, rr = statistics.median(o["runs"]["bare"]), statistics.median(o["runs"]["runtime"])
    print(f"| whole run / segments (per-run costs included) | {rb * 1e3:.3f} | {rr * 1e3:.3f} | "
          f"{(rr - rb) / rb * 100:+.1f}% |")
    print(f"| same, median of per-pair ratios | | | {o['paired'] * 100:+.1f}% |")
    if o["steady"]["bare"]:
        sb, sr = statistics.median(o["steady"]["bare"]), statistics.median(o["steady"]["runtime"])
        print(f"| segment to segment after the first (n={len(o['steady']['bare'])}) | {sb * 1e3:.3f} | "
              f"{sr * 1e3:.3f} | {(sr - sb) / sb * 100:+.1f}% |")
    verdict = "meets" if (rr - rb) / rb < 0.03 else "MISSES"
    print(f"\nTarget < 3%: {verdict} it ({(rr - rb) / rb * 100:+.1f}% on whole runs).")

    print("\n## Where the runtime's Python-side time goes (each piece alone, batch 1, best of 5)\n")
    print("| piece | when | us per call | % of bare segment |")
    print("|---|---|---|---|")
    estimate = 0.0
    for label, when, micros in overhead_sources(rt, o["ids"], o["mask"]):
        print(f"| {label} | {when} | {micros:.1f} | {micros / (rb * 1e6) * 100:.2f}% |")
        estimate += micros * (2 if when.endswith("x2") else 1) / (1 if when.startswith("per segment")
                                                                   else args.segments)
    print(f"\nSum of the pieces, per segment (per-run pieces spread over {args.segments} segments): "
          f"{estimate:.0f} us = {estimate / (rb * 1e6) * 100:.2f}% of a bare segment. The rest of the "
          "measured overhead is interpreter glue, IOBinding vs run() inside ORT, and noise.")
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
