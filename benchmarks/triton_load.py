"""Load on a python-kind Triton server (loopback only): N concurrent sequences of the sample model.

For each concurrency N (--concurrency, default 1,4,16,64), N client threads (one gRPC
client each) each stream --per-client sequences, one after another: every sequence is
--tokens random byte ids sent in --chunk-token requests (START on the first, END on the
last). Bounded in count (N x per-client sequences) and in time (--time-limit seconds per
level: no sequence starts after it; those under way finish). One server (nvidia-pytriton's
tritonserver on 127.0.0.1, free ports) serves every level. The server runs from its own
environment (--triton-venv, default $RMT_TRITON_VENV or the repository's .venv-triton:
requirements-triton.txt, numpy<2); this script, the clients and the in-process runs use
the running one (.venv, numpy 2).

The same work then runs in process, twice, for the ratios:
- batched: the served model's own code (``SequenceTable``) fed one chunk of each of the N
  sequences per call, at most --max-batch rows per call: what the server computes when its
  batcher fills every batch, minus Triton, gRPC and the clients;
- batch 1: ``RMTRuntime.feed`` + ``peek`` per chunk, one sequence after another.

Reports sequences/s, tokens/s, client request latency p50/p99, the server / in-process
ratios, and where a request's time goes (Triton's statistics: queue, compute input,
compute infer (the Python model, including the stub round trip), compute output; the
average batch; the client-side rest is gRPC and the client threads).

    make .venv/.installed .venv-triton/.installed   # the two environments (make test makes them too)
    .venv/bin/python benchmarks/triton_load.py
    .venv/bin/python benchmarks/triton_load.py --concurrency 1,4,16,64 --tokens 256 --chunk 32 --json out.json
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from rmt_export.bench import machine
from rmt_export.exporter import ExportOptions, export_bundle
from rmt_export.triton import TritonOptions, write_triton_repository
from rmt_export.triton_server import LocalTritonServer, TritonInstall
from rmt_runtime import RMTRuntime
from rmt_runtime.atomic import write_atomically
from rmt_runtime.cpuinfo import cpu_info, describe
from rmt_runtime.triton_client import TritonRMTClient
from rmt_runtime.triton_model import LAST_LOGITS, SequenceTable

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "samples" / "keyrecall" / "model.pt"
STAGES = ("queue", "compute_input", "compute_infer", "compute_output")


def sample_bundle(out: Path) -> Path:
    """The sample model as an fp32 bundle (no generation graphs, validation off), reused."""
    if not (out / "manifest.json").is_file():
        export_bundle(CHECKPOINT, out, ExportOptions(validate=False, generation=False, force=True,
                                                     tokenizer_dir=CHECKPOINT.parent))
    return out


def documents(count: int, tokens: int, vocab: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, tokens) for _ in range(count)]


def chunks_of(ids: np.ndarray, chunk: int) -> list[np.ndarray]:
    return [ids[i:i + chunk] for i in range(0, len(ids), chunk)]


def model_stats(client) -> dict:
    (stats,) = client.client.get_inference_statistics(client.model, as_json=True)["model_stats"]
    inference = stats["inference_stats"]
    out = {"requests": int(stats.get("inference_count", 0)), "executions": int(stats.get("execution_count", 0))}
    for stage in ("success", *STAGES):
        out[stage + "_ns"] = int(inference.get(stage, {}).get("ns", 0))
    # Per execution (batch): each request of a batch records the whole batch's compute time.
    out["batch_infer_ns"] = sum(int(b.get("compute_infer", {}).get("ns", 0)) for b in stats.get("batch_stats", []))
    out["batch_count"] = sum(int(b.get("compute_infer", {}).get("count", 0)) for b in stats.get("batch_stats", []))
    return out


def served(url: str, model: str, n: int, per_client: int, tokens: int, chunk: int, time_limit: float) -> dict:
    """N client threads streaming their sequences; wall time, counts and request latencies."""
    latencies: list[list[float]] = [[] for _ in range(n)]
    done = [0] * n
    failures: list[str] = []
    barrier = threading.Barrier(n + 1)
    stop_at = [0.0]

    def worker(index: int) -> None:
        try:
            client = TritonRMTClient(url, model)
            work = documents(per_client, tokens, client.vocab_size, seed=1000 * n + index)
            barrier.wait()
            for number, ids in enumerate(work):
                if time.perf_counter() > stop_at[0]:
                    break
                sequence = client.sequence(1 + index * per_client + number + 100_000 * n)
                parts = chunks_of(ids, chunk)
                for position, part in enumerate(parts):
                    started = time.perf_counter()
                    sequence.send(part, end=position == len(parts) - 1)
                    latencies[index].append(time.perf_counter() - started)
                done[index] += 1
        except Exception as exc:  # noqa: BLE001 - reported after the level
            failures.append(f"client {index}: {exc}")
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + time_limit  # before the clients are released
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if failures:
        raise RuntimeError("; ".join(failures[:3]))
    flat = np.array([x for per in latencies for x in per])
    if not flat.size:
        raise RuntimeError("no request finished: raise --time-limit")
    sequences = sum(done)
    return {"wall_s": wall, "sequences": sequences, "per_client_done": done, "requests": len(flat),
            "tokens": sequences * tokens,
            "p50_ms": float(np.percentile(flat, 50) * 1e3), "p99_ms": float(np.percentile(flat, 99) * 1e3)}


def in_process_batched(rt: RMTRuntime, n: int, sequences_per_client: list[int], tokens: int, chunk: int,
                       max_batch: int) -> dict:
    """The served model's code on the same sequences: round by round, one chunk of each of
    the N clients' current sequences per call, at most max_batch rows per call."""
    table = SequenceTable(rt, idle_seconds=3600)
    work = [documents(count, tokens, rt.bundle.vocab_size, seed=1000 * n + i)[:count]
            for i, count in enumerate(sequences_per_client)]
    started = time.perf_counter()
    for number in range(max(sequences_per_client, default=0)):
        rows = [(i, work[i][number]) for i in range(n) if number < len(work[i])]
        parts = {i: chunks_of(ids, chunk) for i, ids in rows}
        for position in range(max(len(p) for p in parts.values())):
            requests = [table.check(i + 1, position == 0, position == len(p) - 1, p[position], {LAST_LOGITS})
                        for i, p in parts.items() if position < len(p)]
            for begin in range(0, len(requests), max_batch):
                for result in table.execute(requests[begin:begin + max_batch]):
                    if isinstance(result, Exception):
                        raise result
    return {"wall_s": time.perf_counter() - started}


def in_process_batch1(rt: RMTRuntime, n: int, sequences_per_client: list[int], tokens: int, chunk: int) -> dict:
    started = time.perf_counter()
    for i, count in enumerate(sequences_per_client):
        for ids in documents(count, tokens, rt.bundle.vocab_size, seed=1000 * n + i)[:count]:
            state = rt.new_state()
            for part in chunks_of(ids, chunk):
                rt.feed(state, part)
                rt.peek(state)
    return {"wall_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,4,16,64", help="concurrent sequences per level (comma list)")
    parser.add_argument("--per-client", type=int, default=2, help="sequences each client streams, one after another "
                                                                      "(at least)")
    parser.add_argument("--min-sequences", type=int, default=32,
                        help="sequences per level at least: each client streams max(--per-client, this / N)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--chunk", type=int, default=32, help="tokens per request")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per level before no new sequence starts")
    parser.add_argument("--max-batch", type=int, default=16, help="the served model's max batch (rows per execution)")
    parser.add_argument("--queue-delay-us", type=int, default=1000,
                        help="how long the batcher waits to fill a batch (rmt-triton --queue-delay-us)")
    parser.add_argument("--instances", type=int, default=1, help="model instances (processes) in the server")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per instance (and in process)")
    parser.add_argument("--bundle", type=Path, default=None, help="bundle to serve [default: the sample model]")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "rmt-triton-load",
                        help="work folder (the sample bundle, the repository, the server log)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--triton-venv", type=Path, default=None,
                        help="the server's environment (requirements-triton.txt) [default: $RMT_TRITON_VENV, "
                             "else .venv-triton at the repository root]")
    args = parser.parse_args()
    install = TritonInstall.find(args.triton_venv)  # fails at once, saying how to make it, when there is none
    levels = [int(x) for x in args.concurrency.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or sample_bundle(args.out / "keyrecall-fp32")
    repo = args.out / "repo"
    options = TritonOptions(name="rmt", repository_kind="python", max_batch_size=args.max_batch,
                            max_sequences=max(max(levels), args.max_batch), instances=args.instances,
                            threads=args.threads, max_queue_delay_us=args.queue_delay_us)
    write_triton_repository(bundle, repo, options, force=True)  # replaces only a model folder it wrote
    facts = machine()
    print("# Triton load: python-kind repository, loopback gRPC\n")
    cpu = cpu_info()
    print(f"- CPU: {describe(cpu)}; {facts['cores']} logical cores; "
          f"load average at start {' '.join(f'{x:.2f}' for x in facts['load_average'])}")
    print(f"- Python {platform.python_version()}, onnxruntime {facts['onnxruntime']}, numpy {np.__version__} "
          f"(clients, in process); server: nvidia-pytriton {install.versions['nvidia-pytriton']}'s tritonserver "
          f"from {install.venv or 'this environment'} (onnxruntime {install.versions['onnxruntime']}, numpy "
          f"{install.versions['numpy']}), {args.instances} instance(s) x {args.threads} ORT thread(s), "
          f"max batch {args.max_batch}, queue delay {options.max_queue_delay_us} us")
    print(f"- work per level: N clients x max({args.per_client}, {args.min_sequences}/N) sequences x {args.tokens} "
          f"tokens in {args.chunk}-token requests; time limit {args.time_limit:g} s per level\n")
    rt = RMTRuntime.load(bundle, backend="onnxruntime", provider="cpu", threads=args.threads)
    rows = []
    with LocalTritonServer(repo, log_path=args.out / "tritonserver.log", venv=install.venv) as server:
        warm = TritonRMTClient(server.grpc_url, "rmt")
        warm.read(np.arange(2 * args.chunk) % warm.vocab_size, 99_999_999, chunk_size=args.chunk)
        for n in levels:
            before = model_stats(warm)
            per_client = max(args.per_client, -(-args.min_sequences // n))
            result = served(server.grpc_url, "rmt", n, per_client, args.tokens, args.chunk, args.time_limit)
            after = model_stats(warm)
            delta = {key: after[key] - before[key] for key in after}
            # The same sequences in process (the ones the clients finished).
            per_client = result.pop("per_client_done")
            batched = in_process_batched(rt, n, per_client, args.tokens, args.chunk, args.max_batch)
            single = in_process_batch1(rt, n, per_client, args.tokens, args.chunk)
            tokens = result["tokens"]
            row = {"concurrency": n, **result, "sequences_per_s": result["sequences"] / result["wall_s"],
                   "tokens_per_s": tokens / result["wall_s"],
                   "in_process_batched_tokens_per_s": tokens / batched["wall_s"],
                   "in_process_batch1_tokens_per_s": tokens / single["wall_s"],
                   "average_batch": delta["requests"] / max(delta["executions"], 1),
                   **{f"server_{stage}_ms": delta[f"{stage}_ns"] / max(delta["requests"], 1) / 1e6
                      for stage in ("success", *STAGES)},
                   "model_ms_per_execution": delta["batch_infer_ns"] / max(delta["batch_count"], 1) / 1e6,
                   "in_process_ms_per_batch": batched["wall_s"] * 1e3 / max(
                       -(-result["requests"] // min(n, args.max_batch)), 1)}
            row["ratio_batched"] = row["tokens_per_s"] / row["in_process_batched_tokens_per_s"]
            row["ratio_batch1"] = row["tokens_per_s"] / row["in_process_batch1_tokens_per_s"]
            rows.append(row)
            print(f"N={n}: {result['sequences']} sequences, {result['requests']} requests in {result['wall_s']:.1f} s",
                  flush=True)
    print("\n| concurrent sequences | sequences/s | tokens/s | p50 ms | p99 ms | avg batch | in-process batched "
          "tokens/s | server / in-process batched | in-process batch-1 tokens/s | server / batch-1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['sequences_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['p50_ms']:.1f} | "
              f"{r['p99_ms']:.1f} | {r['average_batch']:.1f} | {r['in_process_batched_tokens_per_s']:.0f} | "
              f"{r['ratio_batched']:.2f} | {r['in_process_batch1_tokens_per_s']:.0f} | {r['ratio_batch1']:.2f} |")
    print("\nWhere a request's time goes (per request, ms; 'model' = compute infer per execution, in process = "
          "SequenceTable per batch of min(N, max batch) rows):\n")
    print("| concurrent sequences | client latency p50 | in server (success) | queue | compute input | "
          "compute infer | compute output | model per execution | in process per batch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['p50_ms']:.2f} | {r['server_success_ms']:.2f} | {r['server_queue_ms']:.2f} | "
              f"{r['server_compute_input_ms']:.2f} | {r['server_compute_infer_ms']:.2f} | "
              f"{r['server_compute_output_ms']:.2f} | {r['model_ms_per_execution']:.2f} | "
              f"{r['in_process_ms_per_batch']:.2f} |")
    if args.json:
        text = json.dumps({"cpu": cpu, "machine": facts, "args": {k: str(v) for k, v in vars(args).items()},
                           "rows": rows}, indent=2)  # replaces only an earlier JSON result, never a link
        write_atomically(args.json, lambda handle: handle.write(text.encode()))


if __name__ == "__main__":
    main()
