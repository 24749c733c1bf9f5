"""Export time and bundle size for a GPT-2-small-shaped RMT (random weights), fp32 and fp16.

12 layers, d=768, 12 heads, vocab 50257, M=16, segment 512 (544 positions): the shape of
the published RMT-on-GPT-2 checkpoints. Prints one table; every figure comes from this run.

    .venv/bin/python benchmarks/export_bench.py [--segments 8] [--out /tmp/rmt-export-bench]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rmt_export.exporter import ExportOptions, export_model
from rmt_export.validate import ValidationPlan
from rmt_model import RMTConfig, build_model, family_config_dict
from rmt_runtime import Bundle


def gpt2_small_rmt() -> torch.nn.Module:
    backbone = family_config_dict("gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    config = RMTConfig(kind="decoder", backbone=backbone, num_mem_tokens=16, segment_size=512)
    torch.manual_seed(0)
    return build_model(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, default=8, help="validation segments (the CLI default is 32)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/rmt-export-bench"))
    parser.add_argument("--precisions", default="fp32,fp16")
    args = parser.parse_args()

    started = time.perf_counter()
    model = gpt2_small_rmt()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: GPT-2-small-shaped RMT, {params / 1e6:.1f}M parameters, built in "
          f"{time.perf_counter() - started:.1f}s; torch threads {torch.get_num_threads()}")
    rows = []
    for precision in args.precisions.split(","):
        out = args.out / precision
        started = time.perf_counter()
        result = export_model(model, out, ExportOptions(precision=precision, force=True,
                                                        plan=ValidationPlan(segments=args.segments)))
        total = time.perf_counter() - started
        sizes = {p.name: p.stat().st_size for p in out.iterdir()}
        report = Bundle.load(out).validation
        worst = {name: g["worst"] for name, g in report["graphs"].items()}
        rows.append((precision, result.seconds, total, sizes, worst, report["graphs"]["step"]["argmax_agreement"]))
    print(f"\n| precision | trace s | validate s ({args.segments} seg) | save s | total s | "
          "step.onnx MB | ingest.onnx MB | bundle MB |")
    print("|---|---|---|---|---|---|---|---|")
    for precision, seconds, total, sizes, _, _ in rows:
        print(f"| {precision} | {seconds['trace']:.1f} | {seconds['validate']:.1f} | {seconds['save']:.1f} | "
              f"{total:.1f} | {sizes['step.onnx'] / 1e6:.1f} | {sizes['ingest.onnx'] / 1e6:.1f} | "
              f"{sum(sizes.values()) / 1e6:.1f} |")
    if len(rows) == 2:
        print(f"\nfp16 / fp32 bundle size: {sum(rows[1][3].values()) / sum(rows[0][3].values()):.2f}")
    for precision, _, _, _, worst, agreement in rows:
        print(f"\n{precision} worst max-abs errors: {worst}\n{precision} step argmax agreement: {agreement}")


if __name__ == "__main__":
    main()
