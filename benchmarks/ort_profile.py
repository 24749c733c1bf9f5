"""Where the time goes in the ONNX Runtime CPU segment, and what the session options change.

1. Profile: one ingest segment under ORT's profiler, time summed per operator type (and
   the share of MatMul-like work), batch 1, full segment.
2. Session variants, side by side in one run (interleaved, median of --repeats), each a
   ratio to the runtime's default session (ORT_ENABLE_ALL, usable cores as threads):
   graph optimisation levels, thread counts, spinning off, and the step graph (every
   position's logits) against the ingest graph (the cost that skipping them saves).

    .venv/bin/python benchmarks/ort_profile.py --bundle /tmp/rmt-runtime-bench/gpt2-small
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rmt_runtime.bundle import Bundle
from rmt_runtime.cpuinfo import usable_cores


def session(path: Path, level, threads: int, spinning: bool = True, profile_dir: str | None = None):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = level
    options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_dir:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(profile_dir, "ort")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feeds(bundle: Bundle, batch: int = 1) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, bundle.vocab_size, (batch, bundle.segment_size), dtype=np.int64)
    memory = np.repeat(np.load(bundle.memory_init_path)[None], batch, axis=0).astype(np.float32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "memory": memory}


def profile(bundle: Bundle, threads: int) -> list[tuple[str, float]]:
    with tempfile.TemporaryDirectory() as directory:
        s = session(bundle.graph_path("ingest"), ort.GraphOptimizationLevel.ORT_ENABLE_ALL, threads,
                    profile_dir=directory)
        data = feeds(bundle)
        s.run(None, data)  # warm
        s.run(None, data)
        trace = json.loads(Path(s.end_profiling()).read_text())
    by_op: dict[str, float] = collections.defaultdict(float)
    runs = 0
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            by_op[event["args"].get("op_name", "?")] += event["dur"] / 1000.0
        elif event.get("name") == "model_run":
            runs += 1
    return sorted(((op, ms / max(runs, 1)) for op, ms in by_op.items()), key=lambda x: -x[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    bundle = Bundle.load(args.bundle)
    cores = usable_cores()
    print(f"# ORT CPU profile: {bundle.path} ({bundle.family}, M={bundle.num_mem_tokens}, segment "
          f"{bundle.segment_size}, {bundle.precision}), {cores} cores, onnxruntime {ort.__version__}\n")
    ops = profile(bundle, cores)
    total = sum(ms for _, ms in ops)
    print("| operator | ms per segment | share |\n|---|---|---|")
    for op, ms in ops[:12]:
        print(f"| {op} | {ms:.2f} | {ms / total:.1%} |")
    matmul = sum(ms for op, ms in ops if op in ("MatMul", "Gemm", "FusedMatMul", "MatMulInteger", "QGemm",
                                                     "DynamicQuantizeMatMul", "MatMulNBits"))
    print(f"\nmatrix multiplications: {matmul / total:.1%} of {total:.1f} ms of kernel time\n")
    level = ort.GraphOptimizationLevel
    variants = {
        "default (ENABLE_ALL, all cores)": session(bundle.graph_path("ingest"), level.ORT_ENABLE_ALL, cores),
        "ENABLE_EXTENDED": session(bundle.graph_path("ingest"), level.ORT_ENABLE_EXTENDED, cores),
        "ENABLE_BASIC": session(bundle.graph_path("ingest"), level.ORT_ENABLE_BASIC, cores),
        "no graph optimisation": session(bundle.graph_path("ingest"), level.ORT_DISABLE_ALL, cores),
        "1 thread": session(bundle.graph_path("ingest"), level.ORT_ENABLE_ALL, 1),
        "spinning off": session(bundle.graph_path("ingest"), level.ORT_ENABLE_ALL, cores, spinning=False),
        "step graph (every position's logits)": session(bundle.graph_path("step"), level.ORT_ENABLE_ALL, cores),
    }
    data = feeds(bundle)
    times = {name: [] for name in variants}
    for s in variants.values():
        s.run(None, data)
    names = list(variants)
    for rep in range(args.repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            started = time.perf_counter()
            variants[name].run(None, data)
            times[name].append(time.perf_counter() - started)
    base = statistics.median(times[names[0]])
    print("| session variant (ingest unless said) | ms per segment | speed vs default |\n|---|---|---|")
    for name in names:
        median = statistics.median(times[name])
        print(f"| {name} | {1000 * median:.2f} | {base / median:.2f}x |")


if __name__ == "__main__":
    main()
