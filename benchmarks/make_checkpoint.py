"""A random-weight, seeded RMT checkpoint in a published checkpoint's shape, for the
benchmarks that run bundles of that shape (docs/BENCHMARKS.md):

    .venv/bin/python benchmarks/make_checkpoint.py --shape gpt2-small --out gpt2-small.pt

The shapes are those of benchmarks/real_scale.py (gpt2-small: the published RMT-on-GPT-2
checkpoints; llama-1b: Llama-3.2-1B's). Written with rmt_model.save_checkpoint (config and
float32 weights), so `rmt-export --ckpt` and `rmt-bench --ckpt` take it as it is.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_scale import SHAPES  # noqa: E402

from rmt_model import RMTConfig, build_model, family_config_dict, save_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-small")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint file to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    torch.manual_seed(args.seed)
    model = build_model(RMTConfig(kind="decoder", backbone=family_config_dict(shape["family"], **shape["backbone"]),
                                  num_mem_tokens=shape["num_mem_tokens"], segment_size=shape["segment_size"]))
    save_checkpoint(model, args.out)
    print(f"{args.out}: {args.shape}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
          f"seed {args.seed}")


if __name__ == "__main__":
    main()
