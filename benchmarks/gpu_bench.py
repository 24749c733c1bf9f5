"""GPU throughput in one run: native TensorRT (plain and CUDA graphs), ONNX Runtime CUDA and
TensorRT providers, and the PyTorch segment loop on CUDA, as ratios to PyTorch.

Each variant reads the same input through the ingest graph (memory + last-token logits),
batch 1 and 8; variants missing on the machine (no tensorrt module, no onnxruntime-gpu)
are listed as skipped with the reason, never replaced. Run by scripts/gpu_checks.sh:

    .venv/bin/python benchmarks/gpu_bench.py --model gpt2-small --segments 16
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rmt_export.reference_backend import reference_runtime  # noqa: E402
from runtime_bench import build, bundle_for, pytorch_last_logits_loop  # noqa: E402

from rmt_model import save_checkpoint  # noqa: E402
from rmt_runtime import RMTRuntime  # noqa: E402


def skip_reason(exc: BaseException) -> str:
    """One line on why a variant cannot run: the exception's type and its message's first line
    (only the type when the message is empty, e.g. ``RuntimeError()``)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "gpt2-small"), default="gpt2-small")
    parser.add_argument("--fp16", action="store_true", help="an fp16 bundle (and PyTorch in fp16)")
    parser.add_argument("--segments", type=int, default=16)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("/tmp/rmt-gpu-bench"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_bench: no CUDA device visible to PyTorch")
    model = build(args.model).eval()
    out = args.out / f"{args.model}-{'fp16' if args.fp16 else 'fp32'}"
    if args.fp16:
        from rmt_export.exporter import ExportOptions, export_model

        if not (out / "manifest.json").is_file():
            export_model(model, out, ExportOptions(precision="fp16", validate=False, force=True))
        note = str(out)
    else:
        note = bundle_for(model, out, False)
    checkpoint = save_checkpoint(model, args.out / f"{args.model}.pt")
    device_model = model.to("cuda", torch.float16 if args.fp16 else torch.float32)
    print(f"# rmt-edge GPU benchmark\n\n- GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; "
          f"bundle {note}\n- {args.segments} segments per run, median of {args.repeats}\n")

    def opener(**kwargs):
        return lambda: RMTRuntime.load(out, **kwargs)

    try:  # loading never builds: the native TensorRT variants need rmt-build's engines first
        from rmt_runtime.engines import BuildOptions, build_bundle_engines

        build_bundle_engines(out, BuildOptions(max_batch=max(int(b) for b in args.batches.split(","))),
                             lambda message: print(f"- rmt-build: {message}"))
    except Exception as exc:  # noqa: BLE001 - no TensorRT here: the native variants are then skipped
        print(f"- rmt-build: {skip_reason(exc)}")

    candidates = {
        "tensorrt native": opener(backend="tensorrt"),
        "tensorrt native + CUDA graphs": opener(backend="tensorrt", cuda_graphs=True),
        "onnxruntime TensorRT EP": opener(backend="onnxruntime", provider="tensorrt"),
        "onnxruntime CUDA EP": opener(backend="onnxruntime", provider="cuda"),
        "torch backend (rmt_model, cuda)": lambda: reference_runtime(out, checkpoint, device="cuda"),
    }
    runtimes = {}
    for name, open_runtime in candidates.items():
        try:
            runtimes[name] = open_runtime()
        except Exception as exc:  # noqa: BLE001 - report every reason a variant cannot run
            print(f"- skipped {name}: {skip_reason(exc)}")
    print()
    size = model.segment_size
    print("| batch | variant | tokens/s | ms/segment | vs PyTorch loop |")
    print("|---|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = np.random.default_rng(batch).integers(0, model.config.vocab_size, (batch, args.segments * size))
        ids_cuda = torch.from_numpy(ids).cuda()

        def pytorch():
            with torch.no_grad():
                pytorch_last_logits_loop(device_model, ids_cuda)
            torch.cuda.synchronize()

        variants = {"pytorch step(logits='last') loop": pytorch,
                    **{name: (lambda rt=rt: rt.run(ids)) for name, rt in runtimes.items()}}
        times = {name: [] for name in variants}
        for fn in variants.values():
            fn()  # warm-up: engines, graphs, cuDNN/cuBLAS plans
        for rep in range(args.repeats):
            names = list(variants)
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                started = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - started)
        base = statistics.median(times["pytorch step(logits='last') loop"])
        for name, values in times.items():
            median = statistics.median(values)
            print(f"| {batch} | {name} | {batch * args.segments * size / median:,.0f} | "
                  f"{1000 * median / args.segments:.2f} | {base / median:.2f}x |")


if __name__ == "__main__":
    main()
