"""The bundles the GPU checks run, with PyTorch's outputs to compare against: made where torch
is (a workstation), copied to the GPU machine, which needs no torch (a Jetson has none).

    .venv/bin/python scripts/make_gpu_bundles.py --out gpu-bundles                 # tiny GPT-2, fp32 + fp16
    .venv/bin/python scripts/make_gpu_bundles.py --out gpu-small --model gpt2-small   # GPT-2-small's shape
    scripts/gpu_checks.sh --bundles gpu-bundles                                     # on the GPU machine

Writes into --out (a new or empty directory, or one this script wrote before):
    index.json              what is here: model, shape, batch, segments, seeds, one entry per precision,
                            and under "armt" the same for the ARMT bundles
    <model>-<precision>/    the exported bundle (the segment graphs only: no generation graphs)
    <model>-<precision>.npz PyTorch's fp32 model on seeded ids, batch 2:
        chained_ids [2, segments * segment_size], chained_memory, chained_last_logits
            (memory and last-token logits after that many chained segments: 128 by default for tiny)
        short_ids [1, 4 * segment_size], short_memory, short_last_logits (the shorter checks)
    tiny-armt-<precision>/  the tiny ARMT's bundle (docs/ARMT.md; segment graphs only), whatever --model
    tiny-armt-<precision>.npz  as above with the ARMT's named state in place of the memory:
        chained_state.W_mem.0, chained_state.z.0, ... (and short_state.*), float32

The model is random-initialised and seeded, so the same command gives the same weights and
ids on every machine. tiny is the model tests/conftest.py's bundle_factory exports (2 layers,
d=32, M=4, segment 16); tiny-armt is armt_bundle_factory's ARMT on the same backbone (2 memory
heads, d_mem 8, a sink, W_mv ~ N(0, 0.05^2): the memory moves the logits, the recurrence stays
tame over 128 segments); gpt2-small is the published RMT-on-GPT-2 shape (benchmarks/real_scale.py:
12 layers, d=768, vocab 50257, M=16, segment 512), whose references take minutes on a CPU
(fewer segments by default). tests/gpu reads the directory named by RMT_GPU_BUNDLES.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from real_scale import SHAPES  # noqa: E402

from rmt_export.exporter import ExportOptions, export_model, not_our_bundle  # noqa: E402
from rmt_export.validate import ValidationPlan  # noqa: E402
from rmt_model import ARMTSettings, RMTConfig, build_armt_model, build_model, family_config_dict  # noqa: E402
from rmt_model.tiny import tiny_config  # noqa: E402
from rmt_runtime.atomic import write_atomically  # noqa: E402
from rmt_runtime.owned_files import check_name, remove_owned_file, remove_owned_tree  # noqa: E402

INDEX = "index.json"
FORMAT = 1
PRECISIONS = ("fp32", "fp16")
# Per model: chained segments of the references, and validation segments of the export.
DEFAULTS = {"tiny": dict(segments=128, validation=32), "gpt2-small": dict(segments=8, validation=4)}
BATCH, SHORT_SEGMENTS, CHAINED_SEED, SHORT_SEED = 2, 4, 0, 1
ARMT = "tiny-armt"
ARMT_SETTINGS = dict(d_mem=8, heads=2, use_sink=True)   # tests/rmt_model/test_armt.py's NEWER
ARMT_W_MV_STD = 0.05


def config_for(model: str) -> RMTConfig:
    if model == "tiny":
        return tiny_config("gpt2", num_mem_tokens=4, segment_size=16)
    shape = SHAPES[model]
    return RMTConfig(kind="decoder", backbone=family_config_dict(shape["family"], **shape["backbone"]),
                     num_mem_tokens=shape["num_mem_tokens"], segment_size=shape["segment_size"])


def armt_model(seed: int):
    """The tiny ARMT (tests/conftest.py's armt_bundle_factory model for seed 0): seeded weights,
    W_mv ~ N(0, 0.05^2) from its own generator (the reference's zero W_mv makes the memory a no-op)."""
    config = tiny_config("gpt2", num_mem_tokens=4, segment_size=16).replace(
        kind="armt", armt=ARMTSettings(**ARMT_SETTINGS))
    torch.manual_seed(seed)
    model = build_armt_model(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model._layers():
            layer.W_mv.weight.copy_(torch.randn(layer.W_mv.weight.shape, generator=generator) * ARMT_W_MV_STD)
    return model.eval()


def last_logits_loop(model, ids: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The state and last-token logits after every segment of ``ids`` (full segments, no padding):
    what the runtime's ingest graph computes, without the [B, T, vocab] logits model(ids) holds.
    The state is {"memory": ...} for an RMT, the ARMT's named tensors for an ARMT."""
    tokens = torch.from_numpy(ids)
    armt = model.config.kind == "armt"
    state = model.initial_state(tokens.shape[0]) if armt else model.initial_memory(tokens.shape[0])
    mask = torch.ones_like(tokens)
    logits = None
    with torch.no_grad():
        for start in range(0, tokens.shape[1], model.segment_size):
            end = start + model.segment_size
            logits, state = model.step(tokens[:, start:end], mask[:, start:end], state, logits="last")
    named = {name: value.numpy() for name, value in state.items()} if armt else {"memory": state.numpy()}
    return named, logits.numpy()


def references(model, segments: int) -> dict[str, np.ndarray]:
    vocab, size = model.config.vocab_size, model.segment_size
    arrays = {}
    for name, seed, shape in (("chained", CHAINED_SEED, (BATCH, segments * size)),
                              ("short", SHORT_SEED, (1, SHORT_SEGMENTS * size))):
        ids = np.random.default_rng(seed).integers(0, vocab, shape, dtype=np.int64)
        state, last_logits = last_logits_loop(model, ids)
        arrays.update({f"{name}_ids": ids, f"{name}_last_logits": last_logits})
        if set(state) == {"memory"}:
            arrays[f"{name}_memory"] = state["memory"]
        else:
            arrays.update({f"{name}_state.{key}": value for key, value in state.items()})
    return arrays


def export_bundles(model, arrays: dict[str, np.ndarray], out: Path, stem: str, precisions: list[str],
                   validation: int) -> dict[str, dict[str, str]]:
    """Export ``model`` as <stem>-<precision> for each precision (segment graphs only), each with
    its own copy of the references; returns index entries precision -> bundle, reference."""
    entries = {}
    for precision in precisions:
        name = f"{stem}-{precision}"
        bundle = out / name
        started = time.perf_counter()
        options = ExportOptions(precision=precision, force=True, generation=False,
                                plan=ValidationPlan(segments=validation))
        export_model(model, bundle, options)
        # Every bundle gets its own copy: each is complete alone (copy one to a device, run it).
        write_atomically(out / f"{name}.npz", lambda handle: np.savez(handle, **arrays))
        entries[precision] = {"bundle": name, "reference": f"{name}.npz"}
        print(f"{bundle}: exported and validated ({time.perf_counter() - started:.1f}s)")
    return entries


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


def remove_earlier(out: Path, entry: dict) -> None:
    """Remove an earlier run's bundle and reference that this run did not make, when they are
    what this script wrote: names of one path component (the index may have been edited), a
    bundle whose manifest lists all of it, an .npz reference. Anything else is left, and said."""
    try:
        bundle = check_name(entry.get("bundle"), f"{INDEX} bundle", ValueError)
        reference = check_name(entry.get("reference"), f"{INDEX} reference", ValueError)
        if reference != f"{bundle}.npz":
            raise ValueError(f"{INDEX} reference {reference!r} is not the bundle's ({bundle}.npz)")
        remove_owned_tree(out / bundle, not_our_bundle, ValueError)
        remove_owned_file(out / reference, "npz", ValueError)
    except (ValueError, AttributeError) as exc:
        print(f"make_gpu_bundles: left an earlier entry in place: {exc}", file=sys.stderr)


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
    entries = export_bundles(model, arrays, args.out, args.model, precisions, DEFAULTS[args.model]["validation"])
    # The tiny ARMT, whatever --model: its segments are --segments for tiny, tiny's default otherwise.
    armt = armt_model(args.seed)
    armt_segments = segments if args.model == "tiny" else DEFAULTS["tiny"]["segments"]
    started = time.perf_counter()
    armt_arrays = references(armt, armt_segments)
    print(f"ARMT references: {armt_segments} chained segments, batch {BATCH} ({time.perf_counter() - started:.1f}s)")
    armt_entries = export_bundles(armt, armt_arrays, args.out, ARMT, precisions, DEFAULTS["tiny"]["validation"])
    index = {
        "format": FORMAT, "model": args.model, "seed": args.seed, "batch": BATCH, "segments": segments,
        "segment_size": model.segment_size, "num_mem_tokens": model.config.num_mem_tokens,
        "vocab_size": model.config.vocab_size, "short_segments": SHORT_SEGMENTS,
        "reference": "PyTorch fp32 model, step(logits='last') over full segments",
        "made_with": {"torch": torch.__version__, "numpy": np.__version__},
        "bundles": entries,
        "armt": {
            "model": ARMT, "segments": armt_segments, "batch": BATCH, "short_segments": SHORT_SEGMENTS,
            "segment_size": armt.segment_size, "num_mem_tokens": armt.config.num_mem_tokens,
            "vocab_size": armt.config.vocab_size, "state": list(armt.state_shapes(1)),
            "settings": {**ARMT_SETTINGS, "w_mv_std": ARMT_W_MV_STD},
            "reference": "PyTorch fp32 ARMT, step(logits='last') over full segments",
            "bundles": armt_entries,
        },
    }
    previous = args.out / INDEX
    if previous.is_file():  # an earlier run's bundles not made now go: the index lists what is here
        earlier = json.loads(previous.read_text())
        for made, before in ((entries, earlier.get("bundles", {})),
                             (armt_entries, dict(earlier.get("armt") or {}).get("bundles", {}))):
            for precision, entry in before.items():
                if precision not in made:
                    remove_earlier(args.out, entry)
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    write_atomically(previous, lambda handle: handle.write(text.encode()))
    print(f"{args.out / INDEX}: {args.model}, {', '.join(sorted(index['bundles']))}; {ARMT}, "
          f"{', '.join(sorted(armt_entries))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
