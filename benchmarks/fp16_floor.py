"""PyTorch's own fp16 error: the model cast to fp16 against itself in float32, on the
validator's first segment, so an exported fp16 graph's error can be read against what fp16
itself costs at that size (docs/VALIDATION.md).

    .venv/bin/python benchmarks/fp16_floor.py --ckpt /tmp/rmt-real-scale/llama-1b/rmt.bin \\
        --backbone-config /tmp/rmt-real-scale/llama-1b/backbone.json --num-mem-tokens 16 --segment-size 1024

(benchmarks/real_scale.py --shape llama-1b writes that checkpoint.) fp16 matmuls are slow on
most CPUs: about 5 minutes for that segment on 2 cores.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from rmt_export.validate import ValidationPlan
from rmt_model import import_reference_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a reference checkpoint (any layout rmt-export reads)")
    parser.add_argument("--backbone-config", required=True)
    parser.add_argument("--num-mem-tokens", type=int, required=True)
    parser.add_argument("--segment-size", type=int, required=True)
    args = parser.parse_args()
    model = import_reference_checkpoint(args.ckpt, args.backbone_config, num_mem_tokens=args.num_mem_tokens,
                                        segment_size=args.segment_size).eval()
    ids, mask = ValidationPlan().inputs(model.config.vocab_size, args.segment_size)[0]
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    memory = model.initial_memory(2).detach().float()
    started = time.perf_counter()
    with torch.no_grad():
        ref_logits, ref_memory = model.step(ids, mask, memory, logits="last")
        half = copy.deepcopy(model).half().eval()
        logits, new_memory = half.step(ids, mask, memory.half(), logits="last")
    print(f"fp16 vs fp32 PyTorch, first validation segment (batch 2): memory max abs "
          f"{float((new_memory.float() - ref_memory).abs().max()):.3g} (max |fp32| {float(ref_memory.abs().max()):.3g}); "
          f"last-token logits max abs {float((logits.float() - ref_logits).abs().max()):.3g} "
          f"(max |fp32| {float(ref_logits.abs().max()):.3g}); {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
