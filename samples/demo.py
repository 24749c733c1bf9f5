"""The main job on a freshly created tiny model (until the trained sample model ships).

Creates a seeded tiny GPT-2 RMT, saves it as an rmt-edge checkpoint, reloads it from the
file alone, reads a long input segment by segment carrying memory, and prints what it did.
Run: make demo   (or: .venv/bin/python samples/demo.py --segments 256)
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rmt_model import build_model, load_checkpoint, save_checkpoint
from rmt_model.tiny import tiny_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="where model.pt is written")
    parser.add_argument("--segments", type=int, default=64, help="segments of input to read")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    config = tiny_config("gpt2", num_mem_tokens=4, segment_size=16)
    path = save_checkpoint(build_model(config), args.out / "model.pt")
    model = load_checkpoint(path)
    print(f"checkpoint: {path} ({path.stat().st_size / 1e3:.0f} kB), {config.family} decoder RMT, "
          f"M={config.num_mem_tokens}, segment={config.segment_size}, D={config.hidden_size}")

    length = args.segments * config.segment_size
    ids = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(args.seed))
    start = time.perf_counter()
    with torch.no_grad():
        out = model(ids)
    seconds = time.perf_counter() - start
    top = out.logits[0, -1].topk(5)
    print(f"read {length} tokens in {args.segments} segments: {length / seconds:,.0f} tokens/s (PyTorch eager)")
    print(f"final memory {tuple(out.memory.shape)}, norm {out.memory.norm():.3f}, "
          f"finite: {bool(torch.isfinite(out.memory).all())}")
    print("next-token top-5 ids:", top.indices.tolist())


if __name__ == "__main__":
    main()
