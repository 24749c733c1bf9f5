"""``rmt-bench``: every available backend and precision side by side in one run, as ratios.

For each bundle (one per precision: pass --bundle several times), each backend that can
run it here, batch 1 and 8, and both graphs (``ingest``: reading context, memory and the
last token's logits; ``step``: every position's logits), the same random input is read
segment by segment through ``RMTRuntime.feed``. Reported: tokens/s (median over repeats),
per-segment latency (median and p90 over every timed segment) and the ratio to the
PyTorch segment loop (``--ckpt``: the reference's ``model(ids)``, full logits, eager,
same threads; the like-for-like ``step(logits='last')`` loop is shown too; an ARMT
checkpoint's loop is its own step over its named state, W_mem.{l} and z.{l}). Variants run
interleaved, rotating the order each repeat, so machine drift hits them alike.

Torch is imported only with --ckpt; everything else needs numpy and onnxruntime, so it runs
on a deploying device too. It lives in rmt_export because its PyTorch baseline needs rmt_model.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import click
import numpy as np

from rmt_runtime.bundle import Bundle, BundleError
from rmt_runtime.cli_support import JsonCommand, run_guarded
from rmt_runtime.errors import BackendError, RuntimeInputError
from rmt_runtime.runtime import RMTRuntime
from rmt_runtime.spec import INGEST, STEP

BACKEND_CANDIDATES = (("onnxruntime", "cpu"), ("onnxruntime", "cuda"), ("onnxruntime", "tensorrt"), ("tensorrt", None))


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine() -> dict:
    """CPU model, SIMD flags that matter for int8/fp32 kernels, cores, load, versions."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    import onnxruntime

    return {"cpu": model, "simd": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags],
            "cores": os.cpu_count(), "usable_cores": _usable_cores(), "load_average": list(os.getloadavg()),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "providers": onnxruntime.get_available_providers()}


def matmul_ceiling(threads: int, repeats: int = 3) -> dict:
    """The machine's fp32 matmul rate: the best of ONNX Runtime MatMuls (square 1024..4096 and
    a transformer-shaped 544x768 @ 768x3072) with the runtime's thread count. ORT picks
    different kernels and threading per shape, so one size alone can sit below what a
    model's own matmuls reach. Needs the onnx package to build the graphs."""
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        return {"skipped": "the onnx package is not installed"}
    import onnxruntime

    rng = np.random.default_rng(0)
    best: dict = {"gflops": 0.0}
    for m, k, n in ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096), (544, 768, 3072)):
        graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "ceiling",
                                  [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k]),
                                   helper.make_tensor_value_info("b", TensorProto.FLOAT, [k, n])],
                                  [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                               providers=["CPUExecutionProvider"])
        feeds = {"a": rng.standard_normal((m, k), np.float32), "b": rng.standard_normal((k, n), np.float32)}
        session.run(None, feeds)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - started)
        rate = 2 * m * k * n / min(times) / 1e9
        if rate > best["gflops"]:
            best = {"gflops": rate, "what": f"best ORT CPU fp32 MatMul ({m}x{k} @ {k}x{n})"}
    return {**best, "threads": threads, "onnx": onnx.__version__}


# The ARMT's associative-memory projections (rmt_model.armt.AssociativeLayer; the exporter's
# name scopes end in these): left out of segment_gflop, with the rest of the memory's work.
MEMORY_SCOPES = tuple(f".{name}" for name in ("W_mq", "W_mk", "W_mv", "W_mb"))


def _memory_projection(node) -> bool:
    """Whether a node belongs to an ARMT memory projection, by the torch exporter's name scopes
    (node metadata ``pkg.torch.onnx.name_scopes``); a graph without them counts every node."""
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
    return any(f"{scope}'" in scopes for scope in MEMORY_SCOPES)


def segment_gflop(bundle: Bundle, graph: str, batch: int) -> float | None:
    """FLOPs of one full segment of ``graph`` (GFLOP): 2 x positions x weights for every
    MatMul/Gemm with a constant 2-D weight; the decoder's LM head, 2 x rows x vocab x
    hidden, with rows the segment's tokens (step) or one per row (ingest); the attention
    matmuls, 4 x layers x positions^2 x hidden. Positions are the segment's tokens and what
    the architecture adds to them (Bundle.extra_positions: the RMT decoder's 2M memory
    positions, the encoder's M + 3, the ARMT's M write tokens and its sink).

    An ARMT's associative memory is left out: its projections (W_mq, W_mk, W_mv, W_mb, found
    by the exporter's name scopes), the DPFP features, the reads and the writes. For the
    shapes rmt-edge runs they are a few percent of the backbone's (per layer ~2 x positions x
    hidden x (d_mem + 6 d_mem) for the reads, less for the M-token writes), so the figure is
    the backbone's work: a slight underestimate of what the graph computes.
    None without the onnx package."""
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(bundle.graph_path(graph)), load_external_data=False)
    initializers = {i.name: i for i in model.graph.initializer}
    positions = bundle.segment_size + bundle.extra_positions
    lm_rows = bundle.segment_size if graph == STEP else 1
    armt = bundle.architecture == "armt"
    flops = 0
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm", "MatMulInteger") and len(node.input) > 1 and node.input[1] in initializers:
            if armt and _memory_projection(node):
                continue
            dims = [int(d) for d in initializers[node.input[1]].dims]
            if len(dims) == 2 and bundle.vocab_size not in dims:
                flops += 2 * positions * dims[0] * dims[1]
    if bundle.kind == "decoder":  # the LM head, whether its weight is stored or tied to the embeddings
        flops += 2 * lm_rows * bundle.vocab_size * bundle.hidden_size
    backbone = (bundle.manifest.get("rmt_config") or {}).get("backbone") or {}
    layers = backbone.get("n_layer") or backbone.get("num_hidden_layers") or 0
    flops += 4 * layers * positions ** 2 * bundle.hidden_size
    return batch * flops / 1e9


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _runtime_variant(rt: RMTRuntime, graph: str, ids: np.ndarray, segment_times: list[float]) -> Callable[[], None]:
    size = rt.segment_size

    def run() -> None:
        state = rt.new_state(ids.shape[0])
        want = ("last_logits",) if graph == INGEST and rt.kind == "decoder" else ("logits",) if graph == STEP else ()
        for start in range(0, ids.shape[1], size):
            segment = np.ascontiguousarray(ids[:, start:start + size])
            mask = np.ones_like(segment)
            started = time.perf_counter()
            rt.run_segment(state, segment, mask, graph, want)
            segment_times.append(time.perf_counter() - started)
    return run


def _pytorch_variants(checkpoint: Path, threads: int, ids: np.ndarray, times: dict[str, list[float]]):
    import torch

    from rmt_model import ARMTDecoder, load_checkpoint

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    model = load_checkpoint(checkpoint).eval()
    tokens = torch.from_numpy(ids)
    size = model.segment_size

    # An RMT carries one memory tensor, an ARMT its named state (W_mem.{l}, z.{l}): each model's
    # own step over the same full segments, as the runtime's loop.
    initial = model.initial_state if isinstance(model, ARMTDecoder) else model.initial_memory

    def loop(logits: str, segment_times: list[float]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                state = initial(tokens.shape[0])
                for start in range(0, tokens.shape[1], size):
                    chunk = tokens[:, start:start + size]
                    started = time.perf_counter()
                    _, state = model.step(chunk, torch.ones_like(chunk), state, logits=logits)
                    segment_times.append(time.perf_counter() - started)
        return run

    reference = "pytorch model(ids) loop (full logits)"
    times[reference], times["pytorch step(logits='last') loop"] = [], []
    return (lambda: torch.set_num_threads(previous)), {
        reference: loop("all", times[reference]),
        "pytorch step(logits='last') loop": loop("last", times["pytorch step(logits='last') loop"])}


def run_bench(bundles: list[Path], checkpoint: Path | None, batches: list[int], segments: int, repeats: int,
              threads: int, graphs: tuple[str, ...], say: Callable[[str], None], ceiling: bool = True) -> dict:
    """Measure everything; returns the JSON-able result (see the module docstring)."""
    loaded = [Bundle.load(path) for path in bundles]
    first = loaded[0]
    for bundle in loaded[1:]:
        same = (bundle.kind, bundle.architecture, bundle.segment_size, bundle.num_mem_tokens, bundle.vocab_size,
                bundle.hidden_size)
        if same != (first.kind, first.architecture, first.segment_size, first.num_mem_tokens, first.vocab_size,
                    first.hidden_size):
            raise RuntimeInputError(f"bundle {bundle.path} has another geometry than {first.path}: compare the "
                                    "precisions of one model")
    runtimes, skipped = {}, []
    precisions = [bundle.precision for bundle in loaded]
    for bundle in loaded:
        # Bundles are named by precision, or by directory when two share one (before/after runs).
        name = bundle.precision if precisions.count(bundle.precision) == 1 else bundle.path.name
        for backend, provider in BACKEND_CANDIDATES:
            label = f"{name} {backend}" + (f"/{provider}" if provider else "")
            try:
                runtimes[label] = RMTRuntime.load(bundle, backend=backend, provider=provider, threads=threads)
            except Exception as exc:  # noqa: BLE001 - every reason a backend cannot run is reported
                skipped.append({"variant": label, "reason": str(exc).splitlines()[0][:200]})
    if checkpoint is not None and first.kind != "decoder":
        skipped.append({"variant": "pytorch segment loop", "reason": "the PyTorch baseline covers decoder bundles"})
    say(f"running {', '.join(runtimes)}; skipped {len(skipped)} (see 'skipped')")
    result: dict = {"machine": machine(), "threads": threads, "segments": segments, "repeats": repeats,
                    "segment_size": first.segment_size, "bundles": [str(b.path) for b in loaded],
                    "ceiling": matmul_ceiling(threads) if ceiling else {"skipped": "--no-ceiling"}, "skipped": skipped, "rows": []}
    # Per graph, batch 1 (FLOPs scale with the batch): read once, not once per row.
    gflop_per_row = {graph: segment_gflop(first, graph, 1) for graph in (INGEST, STEP)}
    rng = np.random.default_rng(0)
    for batch in batches:
        ids = rng.integers(0, first.vocab_size, size=(batch, segments * first.segment_size), dtype=np.int64)
        if first.kind == "encoder":
            ids = np.maximum(ids, 4)
        segment_times: dict[str, list[float]] = {}
        variants: dict[str, Callable[[], None]] = {}
        for label, rt in runtimes.items():
            for graph in graphs:
                name = f"{label} {graph}"
                segment_times[name] = []
                variants[name] = _runtime_variant(rt, graph, ids, segment_times[name])
        reference, restore_threads = None, (lambda: None)
        if checkpoint is not None and first.kind == "decoder":
            restore_threads, torch_variants = _pytorch_variants(checkpoint, threads, ids, segment_times)
            variants.update(torch_variants)
            reference = "pytorch model(ids) loop (full logits)"
        totals: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        try:
            for fn in variants.values():  # warm-up: sessions, arenas, kernels
                fn()
            for times in segment_times.values():
                times.clear()
            for rep in range(repeats):
                for name in names[rep % len(names):] + names[:rep % len(names)]:
                    started = time.perf_counter()
                    variants[name]()
                    totals[name].append(time.perf_counter() - started)
                say(f"batch {batch}: repeat {rep + 1}/{repeats} done")
        finally:
            restore_threads()
        base = statistics.median(totals[reference]) if reference else None
        for name in names:
            median = statistics.median(totals[name])
            graph = STEP if name.endswith(f" {STEP}") or "full logits" in name else INGEST
            per_row = gflop_per_row[graph] if not name.startswith("pytorch") else None
            gflop = per_row * batch if per_row else None
            latency = statistics.median(segment_times[name])
            row = {"batch": batch, "variant": name, "tokens_per_second": batch * ids.shape[1] / median,
                   "segment_ms_median": 1000 * latency, "segment_ms_p90": 1000 * _percentile(segment_times[name], 90),
                   "vs_pytorch": base / median if base else None,
                   "gflops": gflop / latency if gflop else None}
            result["rows"].append(row)
    ceiling = result["ceiling"].get("gflops")
    for row in result["rows"]:
        row["of_ceiling"] = row["gflops"] / ceiling if row["gflops"] and ceiling else None
    return result


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"- machine: {m['cpu']} ({' '.join(m['simd']) or 'no AVX'}); {m['usable_cores']} usable cores; "
             f"load {' '.join(f'{x:.2f}' for x in m['load_average'])}; onnxruntime {m['onnxruntime']}",
             f"- threads {result['threads']}; {result['segments']} segments of {result['segment_size']} tokens per run; "
             f"median of {result['repeats']}",
             f"- ceiling: {result['ceiling'].get('gflops', 0):.1f} GFLOP/s ({result['ceiling'].get('what', result['ceiling'].get('skipped'))})"]
    lines += [f"- skipped {s['variant']}: {s['reason']}" for s in result["skipped"]]
    lines += ["", "| batch | variant | tokens/s | segment ms (median) | p90 | vs PyTorch | GFLOP/s | of ceiling |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        def fmt(value, spec):
            return "-" if value is None else format(value, spec)
        lines.append(f"| {r['batch']} | {r['variant']} | {r['tokens_per_second']:,.0f} | {r['segment_ms_median']:.2f} | "
                     f"{r['segment_ms_p90']:.2f} | {fmt(r['vs_pytorch'], '.2f')}{'x' if r['vs_pytorch'] else ''} | "
                     f"{fmt(r['gflops'], '.1f')} | {fmt(r['of_ceiling'], '.0%')} |")
    return "\n".join(lines)


@click.command(cls=JsonCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", "bundles", required=True, multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Bundle directory; repeat to compare precisions of one model (fp32, fp16, int8).")
@click.option("--ckpt", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The checkpoint the bundles came from: adds the PyTorch segment loop as the baseline (needs torch).")
@click.option("--batches", default="1,8", show_default=True, help="Comma-separated batch sizes.")
@click.option("--segments", type=click.IntRange(min=1), default=8, show_default=True, help="Segments per run.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads for every variant [usable cores].")
@click.option("--graphs", type=click.Choice(["both", "ingest", "step"]), default="both", show_default=True)
@click.option("--ceiling/--no-ceiling", default=True, show_default=True,
              help="Measure the machine's fp32 matmul ceiling first (about 10 s on 2 cores).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
def main(bundles, ckpt, batches, segments, repeats, threads, graphs, ceiling, as_json, verbose):
    """Benchmark bundles on every backend available here, side by side, as ratios to PyTorch.

    \b
    Examples:
      rmt-bench --bundle model-fp32 --bundle model-int8 --ckpt model.pt
      rmt-bench --bundle model-fp16 --batches 1 --segments 32 --json > bench.json
    """
    try:
        batch_sizes = [int(b) for b in batches.split(",")]
        if min(batch_sizes) < 1:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"expected comma-separated positive integers, got {batches!r}", param_hint="--batches")
    chosen = (INGEST, STEP) if graphs == "both" else (graphs,)
    say = (lambda message: None) if as_json else (lambda message: click.echo(message, err=True))
    result = run_guarded(verbose, as_json, lambda: run_bench(
        list(bundles), ckpt, batch_sizes, segments, repeats, threads or _usable_cores(), chosen, say, ceiling),
        (RuntimeInputError, BackendError, BundleError))
    click.echo(json.dumps({"ok": True, **result}, indent=2) if as_json else markdown(result))


if __name__ == "__main__":  # pragma: no cover
    main()
