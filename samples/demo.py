"""The main job on a freshly created tiny model (until the trained sample model ships).

Creates a seeded tiny GPT-2 RMT and saves it as an rmt-edge checkpoint; exports it to a
validated bundle (ONNX Runtime vs PyTorch over chained segments) exactly as
``rmt-export --ckpt out/demo/model.pt`` does; then reads a long input segment by segment
with the exported step graph in ONNX Runtime, carrying memory, and compares the final
memory with the PyTorch segment loop.
Run: make demo   (or: .venv/bin/python samples/demo.py --segments 256)
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from rmt_export.exporter import ExportOptions, export_bundle
from rmt_export.validate import summary_lines
from rmt_model import build_model, save_checkpoint
from rmt_model.tiny import tiny_config
from rmt_runtime.bundle import Bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="where model.pt and the bundle go")
    parser.add_argument("--segments", type=int, default=64, help="segments of input to read")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    config = tiny_config("gpt2", num_mem_tokens=4, segment_size=16)
    ckpt = save_checkpoint(build_model(config), args.out / "model.pt")
    print(f"checkpoint: {ckpt} ({ckpt.stat().st_size / 1e3:.0f} kB), {config.family} decoder RMT, "
          f"M={config.num_mem_tokens}, segment={config.segment_size}, D={config.hidden_size}")

    result = export_bundle(ckpt, args.out / "bundle", ExportOptions(force=True),
                           progress=lambda stage, detail: print(f"  [{stage}] {detail}"))
    for line in summary_lines(result.manifest["validation"]):
        print(f"  {line}")

    bundle = Bundle.load(result.path)
    session = ort.InferenceSession(str(bundle.graph_path("ingest")), providers=["CPUExecutionProvider"])
    length = args.segments * bundle.segment_size
    ids = np.random.default_rng(args.seed).integers(0, bundle.vocab_size, (1, length), dtype=np.int64)
    memory = np.load(bundle.memory_init_path)[None]
    started = time.perf_counter()
    for start in range(0, length, bundle.segment_size):
        chunk = ids[:, start:start + bundle.segment_size]
        last_logits, memory = session.run(None, {"input_ids": chunk, "attention_mask": np.ones_like(chunk),
                                                 "memory": memory})
    onnx_seconds = time.perf_counter() - started

    from rmt_model import load_checkpoint

    model = load_checkpoint(ckpt)
    started = time.perf_counter()
    with torch.no_grad():
        reference = model(torch.from_numpy(ids))
    torch_seconds = time.perf_counter() - started
    drift = float(np.abs(memory - reference.memory.numpy()).max())
    print(f"read {length} tokens in {args.segments} segments: ONNX Runtime ingest graph "
          f"{length / onnx_seconds:,.0f} tokens/s, PyTorch eager {length / torch_seconds:,.0f} tokens/s "
          f"({torch_seconds / onnx_seconds:.2f}x)")
    print(f"final memory {memory.shape}: max abs difference ONNX vs PyTorch after {args.segments} "
          f"chained segments {drift:.2e}")
    print("next-token top-5 ids:", np.argsort(last_logits[0])[::-1][:5].tolist())


if __name__ == "__main__":
    main()
