"""How much a recurrent model amplifies a rounding-level change of its memory, in PyTorch
alone: why the validator judges chained drift against the model's own sensitivity
(docs/VALIDATION.md).

    .venv/bin/python benchmarks/sensitivity.py --initializer-range 0.5

Tiny random models (tiny_config), batch 2, seeded random segments: the initial memory and a
copy perturbed by --perturbation (relative) are stepped side by side; prints the max
|difference| of the memory after each segment, per family.
"""
from __future__ import annotations

import argparse

import torch

from rmt_model import build_model
from rmt_model.tiny import tiny_config


def drift(family: str, initializer_range: float, perturbation: float, segments: int) -> list[float]:
    torch.manual_seed(0)
    model = build_model(tiny_config(family, num_mem_tokens=4, segment_size=16,
                                    initializer_range=initializer_range)).eval()
    generator = torch.Generator().manual_seed(1)
    memory = model.initial_memory(2).detach().float()
    perturbed = memory * (1 + perturbation * torch.randn(memory.shape, generator=generator))
    mask = torch.ones(2, 16, dtype=torch.int64)
    found = []
    with torch.no_grad():
        for _ in range(segments):
            ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=generator)
            _, memory = model.step(ids, mask, memory)
            _, perturbed = model.step(ids, mask, perturbed)
            found.append(float((memory - perturbed).abs().max()))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="llama,gpt2")
    parser.add_argument("--initializer-range", type=float, default=0.02)
    parser.add_argument("--perturbation", type=float, default=1e-6)
    parser.add_argument("--segments", type=int, default=15)
    args = parser.parse_args()
    print(f"max |memory - perturbed memory| after each segment; relative perturbation {args.perturbation:g}, "
          f"initializer_range {args.initializer_range:g}")
    for family in args.families.split(","):
        values = drift(family, args.initializer_range, args.perturbation, args.segments)
        print(f"{family}: " + " ".join(f"{v:.2g}" for v in values))


if __name__ == "__main__":
    main()
