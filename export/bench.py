"""``rmt-bench``: every available backend and precision side by side in one run, as ratios.

For each bundle (one per precision: pass --bundle several times), each backend that can
run it here, batch 1 and 8, and both graphs (``ingest``: reading context, memory and the
last token's logits; ``step``: every position's logits), the same random input is read
segment by segment through ``RMTRuntime.feed``. Reported: tokens/s (median over repeats),
per-segment latency (median and p90 over every timed segment), and with ``--ckpt`` two
ratios to PyTorch peers measured in the same run, same threads, same segments:

- vs best PyTorch (the headline): tokens/s over the fastest of the --peers of that batch,
  each the checkpoint's own ``step(logits='last')`` loop (reading context, as the ingest
  graph): eager fp32, ``torch.compile`` fp32, and where the CPU has bf16 instructions eager
  and compiled under ``torch.autocast("cpu", torch.bfloat16)``. Ingest rows and peers only:
  the step graph's every-position logits are more work than the peers do.
- vs model(ids) (with the eager peer): over the reference's ``model(ids)`` segment loop, full
  logits, eager fp32.

An ARMT checkpoint's loop is its own step over its named state, W_mem.{l} and z.{l}. A peer
that cannot run here (no bf16, torch.compile failing) gets a row saying why. The header names
the CPU and its ISA extensions (rmt_runtime.cpuinfo). Variants run interleaved, rotating the
order each repeat, so machine drift hits them alike.

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

from rmt_runtime import limits
from rmt_runtime.bundle import Bundle, BundleError
from rmt_runtime.cli_support import JsonCommand, run_guarded
from rmt_runtime.cpuinfo import cpu_info, describe, native_bf16, usable_cores
from rmt_runtime.errors import BackendError, RuntimeInputError
from rmt_runtime.runtime import RMTRuntime
from rmt_runtime.spec import INGEST, STEP

# (backend, provider) pairs; for openvino the second item is the precision it computes in.
BACKEND_CANDIDATES = (("onnxruntime", "cpu"), ("openvino", "fp32"), ("openvino", "bf16"), ("onnxruntime", "cuda"),
                      ("onnxruntime", "tensorrt"), ("tensorrt", None))


def machine() -> dict:
    """Logical cores, usable cores, load, versions (the CPU itself: rmt_runtime.cpuinfo.cpu_info)."""
    import onnxruntime

    try:
        import openvino
        openvino_version = openvino.__version__.split("-")[0]
    except ImportError:
        openvino_version = None
    return {"cores": os.cpu_count(), "usable_cores": usable_cores(), "load_average": list(os.getloadavg()),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "providers": onnxruntime.get_available_providers(), "openvino": openvino_version}


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
    flops += 4 * bundle.num_layers * positions ** 2 * bundle.hidden_size
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


# PyTorch peers (--peers), each the checkpoint's own step(logits='last') over the same full
# segments as the bundles' ingest rows (the LM head on each row's last token only). "bf16" is
# eager under torch.autocast("cpu", dtype=torch.bfloat16); "compile" is torch.compile(step)
# (inductor, static shapes, weights frozen as constants), compiled by its first run.
PEERS = {"eager": "pytorch eager fp32", "compile": "pytorch compile fp32", "bf16": "pytorch eager bf16",
         "compile-bf16": "pytorch compile bf16"}
# With the eager peer: the reference's model(ids) segment loop, full logits (vs_pytorch's base).
REFERENCE = "pytorch model(ids) loop (full logits)"


def parse_peers(text: str) -> tuple[str, ...]:
    """``eager,compile,...`` (PEERS' keys), ``all`` or ``none`` -> the chosen peers, in order."""
    text = text.strip()
    if text in ("none", "all"):
        return () if text == "none" else tuple(PEERS)
    chosen = [peer.strip() for peer in text.split(",") if peer.strip()]
    unknown = [peer for peer in chosen if peer not in PEERS]
    if unknown or not chosen:
        raise ValueError(f"unknown peer(s) {unknown or [text]}: choose from {', '.join(PEERS)}, all or none")
    return tuple(dict.fromkeys(chosen))


MAX_BATCH_SIZES = 16  # batch sizes one run measures, each a full pass over every variant


def parse_batches(text: str) -> list[int]:
    """``--batches``: comma-separated batch sizes, each within ``limits.MAX_BATCH``, at most
    ``MAX_BATCH_SIZES`` of them; ValueError saying what is wrong."""
    words = text.split(",")
    if len(words) > MAX_BATCH_SIZES:
        raise ValueError(f"expected at most {MAX_BATCH_SIZES} comma-separated batch sizes, got {len(words)}")
    try:
        sizes = [int(word) for word in words]
    except ValueError:
        raise ValueError(f"expected comma-separated positive integers, got {text[:60]!r}") from None
    for size in sizes:
        limits.MAX_BATCH.check(size, "a batch size")
    return sizes


def _reason(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:300]


class TorchPeers:
    """The checkpoint's model, loaded once, and the chosen PyTorch peers as segment loops.

    ``unavailable`` maps a peer's row name to why it does not run here: no native bf16 on this
    CPU, torch.compile refusing, or a failure in its first run (compilation happens there);
    such a peer is not tried again for the next batch. ``close()`` restores torch's threads and
    the compiler settings."""

    def __init__(self, checkpoint: Path, threads: int, peers: tuple[str, ...], cpu: dict):
        import contextlib

        import torch

        from rmt_model import ARMTDecoder, load_checkpoint

        self.torch, self.peers = torch, peers
        self._settings = contextlib.ExitStack()
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        self._settings.callback(torch.set_num_threads, previous)
        self.model = load_checkpoint(checkpoint).eval()
        # An RMT carries one memory tensor, an ARMT its named state (W_mem.{l}, z.{l}): each
        # model's own step over the same full segments, as the runtime's loop.
        self.initial = self.model.initial_state if isinstance(self.model, ARMTDecoder) else self.model.initial_memory
        self.unavailable: dict[str, str] = {}
        self.steps: dict[str, Callable] = {}
        no_bf16 = self._no_bf16(cpu)
        for peer in peers:
            if "bf16" in peer and no_bf16:
                self.unavailable[PEERS[peer]] = no_bf16
            elif peer.startswith("compile"):
                try:
                    self.steps[peer] = torch.compile(self.model.step, dynamic=False)
                except Exception as exc:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
                    self.unavailable[PEERS[peer]] = f"torch.compile failed: {_reason(exc)}"
            else:
                self.steps[peer] = self.model.step
        self.freezing = any(peer.startswith("compile") for peer in self.steps)
        if self.freezing:
            self._compiler_settings()

    def _no_bf16(self, cpu: dict) -> str | None:
        """Why the bf16 peers do not run here, or None: they need the CPU's own bf16
        instructions (without them oneDNN emulates bf16 through fp32, a peer nobody would deploy)
        and this torch build's oneDNN to use them."""
        if not native_bf16(cpu):
            return "no native bf16 on this CPU (none of avx512_bf16, amx_bf16, bf16 in /proc/cpuinfo)"
        check = getattr(self.torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        try:
            supported = check() if check is not None else True
        except Exception:  # noqa: BLE001 - an unanswerable check does not veto the CPU's flags
            supported = True
        return None if supported else "this torch build's oneDNN has no bf16 here (torch.ops.mkldnn._is_mkldnn_bf16_supported)"

    def _compiler_settings(self) -> None:
        """Freeze weights into the compiled graphs (inductor's CPU inference setting: constant
        folding, oneDNN weight prepacking) and allow one compiled graph per batch size and
        precision without falling back to eager (dynamo's default keeps 8 per function)."""
        import torch._dynamo.config as dynamo
        import torch._inductor.config as inductor

        limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
        self._settings.enter_context(dynamo.patch(**{limit: 64}))
        self._settings.enter_context(inductor.patch(freezing=True))

    def variants(self, ids: np.ndarray, times: dict[str, list[float]]) -> dict[str, Callable[[], None]]:
        """Row name -> one run over ``ids``; each timed segment is appended to ``times[name]``."""
        torch = self.torch
        tokens = torch.from_numpy(ids)
        size = self.model.segment_size

        def loop(step: Callable, logits: str, bf16: bool, segment_times: list[float]) -> Callable[[], None]:
            def run() -> None:
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    state = self.initial(tokens.shape[0])
                    for start in range(0, tokens.shape[1], size):
                        chunk = tokens[:, start:start + size]
                        started = time.perf_counter()
                        _, state = step(chunk, torch.ones_like(chunk), state, logits=logits)
                        segment_times.append(time.perf_counter() - started)
            return run

        found: dict[str, Callable[[], None]] = {}
        if "eager" in self.peers:
            times[REFERENCE] = []
            found[REFERENCE] = loop(self.model.step, "all", False, times[REFERENCE])
        for peer, step in self.steps.items():
            name = PEERS[peer]
            if name not in self.unavailable:
                times[name] = []
                found[name] = loop(step, "last", "bf16" in peer, times[name])
        return found

    def failed(self, name: str, exc: BaseException) -> None:
        compiled = name in (PEERS["compile"], PEERS["compile-bf16"])
        self.unavailable[name] = ("torch.compile failed: " if compiled else "failed: ") + _reason(exc)

    def close(self) -> None:
        self._settings.close()


def run_bench(bundles: list[Path], checkpoint: Path | None, batches: list[int], segments: int, repeats: int,
              threads: int, graphs: tuple[str, ...], say: Callable[[str], None], ceiling: bool = True,
              peers: tuple[str, ...] = tuple(PEERS)) -> dict:
    """Measure everything; returns the JSON-able result (see the module docstring)."""
    threads, segments, repeats = (limits.THREADS.check(threads), limits.BENCH_SEGMENTS.check(segments),
                                  limits.REPEATS.check(repeats))
    if not batches or len(batches) > MAX_BATCH_SIZES:
        raise RuntimeInputError(f"batches must be 1..{MAX_BATCH_SIZES} batch sizes, got {len(batches)}")
    batches = [limits.MAX_BATCH.check(batch, "a batch size") for batch in batches]
    loaded = [Bundle.load(path) for path in bundles]
    first = loaded[0]
    # The random input of the largest batch, held while it runs: bounded before anything loads.
    limits.check_allocation(max(batches) * segments * first.segment_size * 8,
                            f"--batches {max(batches)} x --segments {segments} of {first.segment_size} int64 ids")
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
                runtimes[label] = RMTRuntime.load(bundle, backend=backend, threads=threads,
                                                  **({"precision": provider} if backend == "openvino"
                                                     else {"provider": provider}))
            except Exception as exc:  # noqa: BLE001 - every reason a backend cannot run is reported
                skipped.append({"variant": label, "reason": str(exc).splitlines()[0][:200]})
    if checkpoint is not None and first.kind != "decoder":
        skipped.append({"variant": "pytorch segment loop", "reason": "the PyTorch baseline covers decoder bundles"})
    cpu = cpu_info()
    torch_peers = TorchPeers(checkpoint, threads, peers, cpu) if checkpoint is not None and first.kind == "decoder" \
        and peers else None
    say(f"running {', '.join(runtimes)}; skipped {len(skipped)} (see 'skipped')")
    try:
        result: dict = {"cpu": cpu, "machine": machine(), "threads": threads, "segments": segments,
                        "repeats": repeats, "segment_size": first.segment_size, "bundles": [str(b.path) for b in loaded],
                        "ceiling": matmul_ceiling(threads) if ceiling else {"skipped": "--no-ceiling"},
                        "skipped": skipped, "peers": list(peers) if torch_peers else [], "best_pytorch": [], "rows": []}
        if torch_peers:
            result["pytorch"] = {"torch": torch_peers.torch.__version__, "inductor_freezing": torch_peers.freezing}
        # Per graph, batch 1 (FLOPs scale with the batch): read once, not once per row.
        gflop_per_row = {graph: segment_gflop(first, graph, 1) for graph in (INGEST, STEP)}
        rng = np.random.default_rng(0)
        for batch in batches:
            ids = rng.integers(0, first.vocab_size, size=(batch, segments * first.segment_size), dtype=np.int64)
            if first.kind == "encoder":
                ids = np.maximum(ids, 4)
            result["rows"] += _measure_batch(runtimes, torch_peers, graphs, ids, repeats, gflop_per_row, say)
            best = max((r for r in result["rows"] if r["batch"] == batch and r["variant"] in PEERS.values()
                        and r["tokens_per_second"]), key=lambda r: r["tokens_per_second"], default=None)
            if best:
                result["best_pytorch"].append({"batch": batch, "variant": best["variant"],
                                               "tokens_per_second": best["tokens_per_second"]})
            for row in result["rows"]:
                # The peers read context: the like-for-like rows are the ingest graph's (and the peers').
                like = row["variant"] in PEERS.values() or row["variant"].endswith(f" {INGEST}")
                if row["batch"] == batch:
                    row["vs_best_pytorch"] = (row["tokens_per_second"] / best["tokens_per_second"]
                                              if best and like and row["tokens_per_second"] else None)
    finally:
        if torch_peers:
            torch_peers.close()
    ceiling = result["ceiling"].get("gflops")
    for row in result["rows"]:
        row["of_ceiling"] = row["gflops"] / ceiling if row["gflops"] and ceiling else None
    return result


def _measure_batch(runtimes: dict[str, RMTRuntime], torch_peers: TorchPeers | None, graphs: tuple[str, ...],
                   ids: np.ndarray, repeats: int, gflop_per_row: dict, say: Callable[[str], None]) -> list[dict]:
    """Every variant over ``ids``: one warm-up run each (a compiled peer compiles there), then
    ``repeats`` interleaved timed runs. One row per variant, and one per peer that did not run."""
    batch = ids.shape[0]
    segment_times: dict[str, list[float]] = {}
    variants: dict[str, Callable[[], None]] = {}
    for label, rt in runtimes.items():
        for graph in graphs:
            name = f"{label} {graph}"
            segment_times[name] = []
            variants[name] = _runtime_variant(rt, graph, ids, segment_times[name])
    if torch_peers:
        variants.update(torch_peers.variants(ids, segment_times))
    first_run: dict[str, float] = {}
    for name, fn in list(variants.items()):  # warm-up: sessions, arenas, kernels, compilation
        started = time.perf_counter()
        if name in PEERS.values():
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - a peer that fails is reported in its row
                torch_peers.failed(name, exc)
                del variants[name]
                continue
        else:
            fn()
        first_run[name] = time.perf_counter() - started
    for times in segment_times.values():
        times.clear()
    names = list(variants)
    totals: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats if names else 0):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            started = time.perf_counter()
            variants[name]()
            totals[name].append(time.perf_counter() - started)
        say(f"batch {batch}: repeat {rep + 1}/{repeats} done")
    base = statistics.median(totals[REFERENCE]) if REFERENCE in totals else None
    rows = []
    for name in names:
        median = statistics.median(totals[name])
        graph = STEP if name.endswith(f" {STEP}") or name == REFERENCE else INGEST
        per_row = gflop_per_row[graph] if not name.startswith("pytorch") else None
        gflop = per_row * batch if per_row else None
        latency = statistics.median(segment_times[name])
        rows.append({"batch": batch, "variant": name, "tokens_per_second": batch * ids.shape[1] / median,
                     "segment_ms_median": 1000 * latency,
                     "segment_ms_p90": 1000 * _percentile(segment_times[name], 90),
                     "vs_pytorch": base / median if base else None, "gflops": gflop / latency if gflop else None,
                     "compile_seconds": first_run[name] if name in (PEERS["compile"], PEERS["compile-bf16"]) else None,
                     "not_run": None})
    for name, reason in (torch_peers.unavailable.items() if torch_peers else ()):
        rows.append({"batch": batch, "variant": name, "tokens_per_second": None, "segment_ms_median": None,
                     "segment_ms_p90": None, "vs_pytorch": None, "gflops": None, "compile_seconds": None,
                     "not_run": reason})
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"- CPU: {describe(result['cpu'])}; {m['cores']} logical cores; "
             f"load {' '.join(f'{x:.2f}' for x in m['load_average'])}; onnxruntime {m['onnxruntime']}"
             + (f"; openvino {m['openvino']}" if m.get("openvino") else ""),
             f"- threads {result['threads']}; {result['segments']} segments of {result['segment_size']} tokens per run; "
             f"median of {result['repeats']}",
             f"- ceiling: {result['ceiling'].get('gflops', 0):.1f} GFLOP/s ({result['ceiling'].get('what', result['ceiling'].get('skipped'))})"]
    if "pytorch" in result:
        lines.append(f"- PyTorch peers ({', '.join(result['peers'])}; torch {result['pytorch']['torch']}): "
                     + ("; ".join(f"best at batch {b['batch']}: {b['variant']}" for b in result["best_pytorch"])
                        or "none ran"))
    lines += [f"- {r['variant']} at batch {r['batch']}: compiled in its first run, {r['compile_seconds']:.1f} s"
              for r in result["rows"] if r.get("compile_seconds") is not None]
    lines += [f"- skipped {s['variant']}: {s['reason']}" for s in result["skipped"]]
    lines += ["", "| batch | variant | tokens/s | segment ms (median) | p90 | vs best PyTorch | vs model(ids) | GFLOP/s "
              "| of ceiling |", "|---|---|---|---|---|---|---|---|---|"]

    def fmt(value, spec, suffix=""):
        return "-" if value is None else format(value, spec) + suffix

    for r in result["rows"]:
        variant = r["variant"] + (f" (not run: {r['not_run']})" if r["not_run"] else "")
        lines.append(f"| {r['batch']} | {variant} | {fmt(r['tokens_per_second'], ',.0f')} | "
                     f"{fmt(r['segment_ms_median'], '.2f')} | {fmt(r['segment_ms_p90'], '.2f')} | "
                     f"{fmt(r['vs_best_pytorch'], '.2f', 'x')} | {fmt(r['vs_pytorch'], '.2f', 'x')} | "
                     f"{fmt(r['gflops'], '.1f')} | {fmt(r['of_ceiling'], '.0%')} |")
    return "\n".join(lines)


@click.command(cls=JsonCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", "bundles", required=True, multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Bundle directory; repeat to compare precisions of one model (fp32, fp16, int8).")
@click.option("--ckpt", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The checkpoint the bundles came from: adds the PyTorch peers of --peers, measured in the same "
                   "run (needs torch).")
@click.option("--peers", default="all", show_default=True,
              help="PyTorch peers with --ckpt, comma-separated: eager (fp32, with the full-logits model(ids) loop "
                   "that 'vs model(ids)' divides by), compile (torch.compile fp32, compiled in its first run, the "
                   "seconds shown apart), bf16 (eager under torch.autocast bfloat16), compile-bf16; 'all' or "
                   "'none'. The bf16 peers run only on a CPU with bf16 instructions (avx512_bf16, amx_bf16, Arm "
                   "bf16); a peer that cannot run says why in its row. Each bundle's ingest rows show their speed "
                   "relative to the fastest peer ('vs best PyTorch').")
@click.option("--batches", default="1,8", show_default=True, help="Comma-separated batch sizes.")
@click.option("--segments", type=limits.option_type(limits.BENCH_SEGMENTS), default=8, show_default=True,
              help="Segments per run.")
@click.option("--repeats", type=limits.option_type(limits.REPEATS), default=3, show_default=True)
@click.option("--threads", type=limits.option_type(limits.THREADS), default=None,
              help="Threads for every variant [usable cores].")
@click.option("--graphs", type=click.Choice(["both", "ingest", "step"]), default="both", show_default=True)
@click.option("--ceiling/--no-ceiling", default=True, show_default=True,
              help="Measure the machine's fp32 matmul ceiling first (about 10 s on 2 cores).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
def main(bundles, ckpt, peers, batches, segments, repeats, threads, graphs, ceiling, as_json, verbose):
    """Benchmark bundles on every backend available here, side by side, as ratios to PyTorch.

    \b
    Examples:
      rmt-bench --bundle model-fp32 --bundle model-int8 --ckpt model.pt
      rmt-bench --bundle model-fp32 --ckpt model.pt --peers eager,compile --batches 1
      rmt-bench --bundle model-fp16 --batches 1 --segments 32 --json > bench.json
    """
    try:
        batch_sizes = parse_batches(batches)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--batches")
    try:
        chosen_peers = parse_peers(peers)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--peers")
    chosen = (INGEST, STEP) if graphs == "both" else (graphs,)
    say = (lambda message: None) if as_json else (lambda message: click.echo(message, err=True))
    result = run_guarded(verbose, as_json, lambda: run_bench(
        list(bundles), ckpt, batch_sizes, segments, repeats, threads or min(usable_cores(), limits.THREADS.high),
        chosen, say, ceiling, chosen_peers),
        (RuntimeInputError, BackendError, BundleError))
    click.echo(json.dumps({"ok": True, **result}, indent=2) if as_json else markdown(result))


if __name__ == "__main__":  # pragma: no cover
    main()
