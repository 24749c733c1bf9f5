"""Cost vs input length: the RMT runtime streams any length at a constant cost per token
and constant memory; the same backbone without memory, on full attention, does not.

Every measurement runs in a fresh child process, so its peak resident memory (VmHWM, which
starts afresh at exec, unlike ru_maxrss, which Linux carries over from the parent) is its own:
- rmt: the runtime reads N random tokens through the ingest graph, fed in 16K-token
  chunks (as a stream arrives); time per token and peak RSS, and the RSS growth from
  just before the first token to the end;
- full: the backbone alone (position table stretched to N, random weights: timing only)
  on one N-token input, last-token logits, PyTorch eager, until a run passes --full-limit
  seconds or the next length would not fit in memory.

    .venv/bin/python benchmarks/scaling_bench.py --model sample --lengths 4096,65536,1048576 \\
        --full-lengths 1024,2048,4096,8192,16384,32768
    .venv/bin/python benchmarks/scaling_bench.py --model gpt2-small --lengths 4096,16384,65536,131072 \\
        --full-lengths 1024,2048,4096,8192

Writes a markdown table, <out>/scaling-<model>.json and PNG plots (time per token and
peak RSS vs length) to --plots.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 16384


def child_rmt(bundle: str, length: int, threads: int) -> dict:
    import numpy as np

    from rmt_runtime import RMTRuntime

    rt = RMTRuntime.load(bundle, backend="onnxruntime", provider="cpu", threads=threads)
    rng = np.random.default_rng(0)
    vocab = rt.bundle.vocab_size
    warm = rt.new_state()
    rt.feed(warm, rng.integers(0, vocab, 2 * rt.segment_size))  # sessions and arenas warm
    del warm
    before = _rss_now()
    state = rt.new_state()
    started = time.perf_counter()
    fed = 0
    while fed < length:
        chunk = rng.integers(0, vocab, min(CHUNK, length - fed))
        rt.feed(state, chunk)
        fed += len(chunk)
    out = rt.flush(state)
    seconds = time.perf_counter() - started
    assert np.isfinite(out.memory).all()
    return {"seconds": seconds, "rss_before_mb": before / 2**20, "rss_end_mb": _rss_now() / 2**20,
            "peak_rss_mb": _peak_rss() / 2**20, "segments": int(state.segments_done[0])}


def child_full(checkpoint: str, length: int, threads: int) -> dict:
    import torch

    from rmt_model import build_backbone, load_checkpoint

    torch.set_num_threads(threads)
    config = load_checkpoint(checkpoint).config
    stretched = dict(config.backbone)
    for key in ("n_positions", "max_position_embeddings"):
        if key in stretched:
            stretched[key] = length
    backbone = build_backbone(config.replace(backbone=stretched)).eval()
    ids = torch.randint(0, config.vocab_size, (1, length))
    with torch.no_grad():
        backbone(input_ids=ids[:, :64], logits_to_keep=1)  # warm
        before = _rss_now()
        started = time.perf_counter()
        backbone(input_ids=ids, logits_to_keep=1, use_cache=False)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "rss_before_mb": before / 2**20, "rss_end_mb": _rss_now() / 2**20,
            "peak_rss_mb": _peak_rss() / 2**20}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def _rss_now() -> int:
    return _status_bytes("VmRSS:")


def _peak_rss() -> int:
    return _status_bytes("VmHWM:")


def in_child(kind: str, target: str, length: int, threads: int, timeout: float) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--target", target, "--length", str(length),
               "--threads", str(threads)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f}s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_bundle(model: str, out: Path) -> tuple[str, str]:
    """(bundle, checkpoint) for the sample model or the GPT-2-small-shaped one."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    from rmt_export.exporter import ExportOptions, export_bundle, export_model
    from rmt_model import save_checkpoint

    bundle = out / f"{model}-fp32"
    if model == "sample":
        checkpoint = ROOT / "samples" / "keyrecall" / "model.pt"
        if not (bundle / "manifest.json").is_file():
            export_bundle(checkpoint, bundle, ExportOptions(force=True, validate=False, generation=False))
        return str(bundle), str(checkpoint)
    from runtime_bench import build

    checkpoint = out / "gpt2-small.pt"
    if not checkpoint.is_file():
        save_checkpoint(build("gpt2-small"), checkpoint)
    if not (bundle / "manifest.json").is_file():
        from rmt_model import load_checkpoint

        export_model(load_checkpoint(checkpoint), bundle, ExportOptions(force=True, validate=False, generation=False))
    return str(bundle), str(checkpoint)


def plot(result: dict, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for metric, label, name in (("us_per_token", "time per token (µs)", "time"), ("peak_rss_mb", "peak RSS (MB)", "memory")):
        figure, axes = plt.subplots(figsize=(6.4, 4.0))
        for kind, style, text in (("rmt", "o-", "RMT runtime (ingest graph, memory carried)"),
                                  ("full", "s--", "same backbone, full attention, no memory")):
            rows = [r for r in result["rows"] if r["kind"] == kind and metric in r]
            if rows:
                axes.plot([r["length"] for r in rows], [r[metric] for r in rows], style, label=text)
        axes.set_xscale("log", base=2)
        if metric == "us_per_token":
            axes.set_yscale("log")
        else:
            axes.set_ylim(bottom=0)
        axes.set_xlabel("input length (tokens)")
        axes.set_ylabel(label)
        axes.set_title(f"{result['model']}: {label} vs input length")
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = directory / f"scaling_{result['model']}_{name}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("sample", "gpt2-small"), default="sample")
    parser.add_argument("--lengths", default="4096,65536,1048576")
    parser.add_argument("--full-lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--full-limit", type=float, default=120.0, help="stop full attention after a run this long (s)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("/tmp/rmt-scaling"))
    parser.add_argument("--plots", type=Path, default=None,
                        help="directory for the plots [default: <out>/plots; docs/images holds the published ones]")
    parser.add_argument("--child", choices=("rmt", "full"), help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from rmt_runtime.cpuinfo import usable_cores  # here: a child measures its own memory, without it

    threads = args.threads or usable_cores()
    if args.child:
        work = child_rmt if args.child == "rmt" else child_full
        print(json.dumps(work(args.target, args.length, threads)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    bundle, checkpoint = build_bundle(args.model, args.out)
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        row = {"kind": "rmt", "length": length, **in_child("rmt", bundle, length, threads, 7200)}
        if "seconds" in row:
            row["us_per_token"] = 1e6 * row["seconds"] / length
            row["rss_growth_mb"] = row["rss_end_mb"] - row["rss_before_mb"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    for length in [int(x) for x in args.full_lengths.split(",")]:
        row = {"kind": "full", "length": length, **in_child("full", checkpoint, length, threads, 4 * args.full_limit)}
        if "seconds" in row:
            row["us_per_token"] = 1e6 * row["seconds"] / length
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        if "error" in row or row["seconds"] > args.full_limit:
            break
    result = {"model": args.model, "threads": threads, "bundle": bundle, "rows": rows}
    from rmt_runtime.atomic import write_atomically

    text = json.dumps(result, indent=2)  # replaces only an earlier JSON result, never a link
    write_atomically(args.out / f"scaling-{args.model}.json", lambda handle: handle.write(text.encode()))
    print("| model | kind | tokens | seconds | µs/token | peak RSS MB | RSS growth MB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {args.model} | {r['kind']} | {r['length']:,} | {r['error']} | | | |")
            continue
        growth = f"{r['rss_growth_mb']:.1f}" if "rss_growth_mb" in r else "-"
        print(f"| {args.model} | {r['kind']} | {r['length']:,} | {r['seconds']:.2f} | {r['us_per_token']:.1f} | "
              f"{r['peak_rss_mb']:.0f} | {growth} |")
    rmt = [r for r in rows if r["kind"] == "rmt" and "us_per_token" in r]
    if len(rmt) > 1:
        print(f"\ntime per token at {rmt[-1]['length']:,} vs {rmt[0]['length']:,}: "
              f"{rmt[-1]['us_per_token'] / rmt[0]['us_per_token']:.3f}x; peak RSS growth "
              f"{rmt[-1]['peak_rss_mb'] - rmt[0]['peak_rss_mb']:+.1f} MB")
    plots = args.plots or args.out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for path in plot(result, plots):
        print(f"plot: {path}")


if __name__ == "__main__":
    main()
