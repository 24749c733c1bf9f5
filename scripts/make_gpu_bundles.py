"""The bundles the GPU checks run, with PyTorch's outputs to compare against: made where torch
is (a workstation), copied to the GPU machine, which needs no torch (a Jetson has none).

    .venv/bin/python scripts/make_gpu_bundles.py --out gpu-bundles                 # tiny GPT-2, fp32 + fp16
    .venv/bin/python scripts/make_gpu_bundles.py --out gpu-small --model gpt2-small   # GPT-2-small's shape
    scripts/gpu_checks.sh --bundles gpu-bundles                                     # on the GPU machine

Writes into --out (a new or empty directory, or one this script wrote before):
    index.json              what is here: model, shape, batch, segments, seeds, one entry per precision
    <model>-<precision>/    the exported bundle (the segment graphs only: no generation graphs)
    <model>-<precision>.npz PyTorch's fp32 model on seeded ids, batch 2:
        chained_ids [2, segments * segment_size], chained_memory, chained_last_logits
            (memory and last-token logits after that many chained segments: 128 by default for tiny)
        short_ids [1, 4 * segment_size], short_memory, short_last_logits (the shorter checks)

The model is random-initialised and seeded, so the same command gives the same weights and
ids on every machine. tiny is the model tests/conftest.py's bundle_factory exports (2 layers,
d=32, M=4, segment 16); gpt2-small is the published RMT-on-GPT-2 shape (benchmarks/real_scale.py:
12 layers, d=768, vocab 50257, M=16, segment 512), whose references take minutes on a CPU
(fewer segments by default). tests/gpu reads the directory named by RMT_GPU_BUNDLES.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from real_scale import SHAPES  # noqa: E402

from rmt_export.exporter import ExportOptions, export_model  # noqa: E402
from rmt_export.validate import ValidationPlan  # noqa: E402
from rmt_model import RMTConfig, build_model, family_config_dict  # noqa: E402
from rmt_model.tiny import tiny_config  # noqa: E402

INDEX = "index.json"
FORMAT = 1
PRECISIONS = ("fp32", "fp16")
# Per model: chained segments of the references, and validation segments of the export.
DEFAULTS = {"tiny": dict(segments=128, validation=32), "gpt2-small": dict(segments=8, validation=4)}
BATCH, SHORT_SEGMENTS, CHAINED_SEED, SHORT_SEED = 2, 4, 0, 1


def config_for(model: str) -> RMTConfig:
    if model == "tiny":
        return tiny_config("gpt2", num_mem_tokens=4, segment_size=16)
    shape = SHAPES[model]
    return RMTConfig(kind="decoder", backbone=family_config_dict(shape["family"], **shape["backbone"]),
                     num_mem_tokens=shape["num_mem_tokens"], segment_size=shape["segment_size"])


def last_logits_loop(model, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Memory and last-token logits after every segment of ``ids`` (full segments, no padding):
    what the runtime's ingest graph computes, without the [B, T, vocab] logits model(ids) holds."""
    tokens = torch.from_numpy(ids)
    memory = model.initial_memory(tokens.shape[0])
    mask = torch.ones_like(tokens)
    logits = None
    with torch.no_grad():
        for start in range(0, tokens.shape[1], model.segment_size):
            end = start + model.segment_size
            logits, memory = model.step(tokens[:, start:end], mask[:, start:end], memory, logits="last")
    return memory.numpy(), logits.numpy()


def references(model, segments: int) -> dict[str, np.ndarray]:
    vocab, size = model.config.vocab_size, model.segment_size
    arrays = {}
    for name, seed, shape in (("chained", CHAINED_SEED, (BATCH, segments * size)),
                              ("short", SHORT_SEED, (1, SHORT_SEGMENTS * size))):
        ids = np.random.default_rng(seed).integers(0, vocab, shape, dtype=np.int64)
        memory, last_logits = last_logits_loop(model, ids)
        arrays.update({f"{name}_ids": ids, f"{name}_memory": memory, f"{name}_last_logits": last_logits})
    return arrays


def check_out(out: Path, model: str) -> None:
    """--out is new, empty, or an earlier output of this script for the same model."""
    if not out.exists() or not any(out.iterdir()):
        return
    index = out / INDEX
    if not index.is_file():
        sys.exit(f"make_gpu_bundles: {out} is not empty and holds no {INDEX}: give a new directory")
    previous = json.loads(index.read_text()).get("model")
    if previous != model:
        sys.exit(f"make_gpu_bundles: {out} holds the {previous} bundles; give another directory for {model}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory to write (new, empty, or made by this "
                                                               "script for the same --model)")
    parser.add_argument("--model", choices=sorted(DEFAULTS), default="tiny",
                        help="tiny (default; what tests/gpu is sized for) or GPT-2-small's shape, random weights")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated: fp32,fp16")
    parser.add_argument("--segments", type=int, help="chained segments of the references (default: 128 for tiny, "
                                                     "8 for gpt2-small)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the random weights")
    args = parser.parse_args(argv)
    precisions = [p for p in args.precisions.split(",") if p]
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown or not precisions:
        parser.error(f"--precisions: {', '.join(unknown) or 'none given'}; expected some of {', '.join(PRECISIONS)}")
    segments = args.segments or DEFAULTS[args.model]["segments"]
    if segments < 1:
        parser.error("--segments must be at least 1")
    check_out(args.out, args.model)
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    model = build_model(config_for(args.model)).eval()
    started = time.perf_counter()
    arrays = references(model, segments)
    print(f"references: {segments} chained segments, batch {BATCH} ({time.perf_counter() - started:.1f}s)")
    entries = {}
    for precision in precisions:
        name = f"{args.model}-{precision}"
        bundle = args.out / name
        started = time.perf_counter()
        options = ExportOptions(precision=precision, force=True, generation=False,
                                plan=ValidationPlan(segments=DEFAULTS[args.model]["validation"]))
        export_model(model, bundle, options)
        # Every bundle gets its own copy: each is complete alone (copy one to a device, run it).
        np.savez(args.out / f"{name}.npz", **arrays)
        entries[precision] = {"bundle": name, "reference": f"{name}.npz"}
        print(f"{bundle}: exported and validated ({time.perf_counter() - started:.1f}s)")
    index = {
        "format": FORMAT, "model": args.model, "seed": args.seed, "batch": BATCH, "segments": segments,
        "segment_size": model.segment_size, "num_mem_tokens": model.config.num_mem_tokens,
        "vocab_size": model.config.vocab_size, "short_segments": SHORT_SEGMENTS,
        "reference": "PyTorch fp32 model, step(logits='last') over full segments",
        "made_with": {"torch": torch.__version__, "numpy": np.__version__},
        "bundles": entries,
    }
    previous = args.out / INDEX
    if previous.is_file():  # an earlier run's bundles not made now go: the index lists what is here
        for precision, entry in json.loads(previous.read_text()).get("bundles", {}).items():
            if precision not in entries:
                shutil.rmtree(args.out / entry["bundle"], ignore_errors=True)
                (args.out / entry["reference"]).unlink(missing_ok=True)
    previous.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    print(f"{args.out / INDEX}: {args.model}, {', '.join(sorted(index['bundles']))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
