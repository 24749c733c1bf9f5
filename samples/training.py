"""What the two sample trainers share: one optimiser step, and the periodic accuracy report."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch

REPORT_EVERY = 100
REPORT_SEGMENTS = (2, 8, 32)


def set_cosine_rate(optimiser: torch.optim.Optimizer, step: int, steps: int, peak: float,
                    warmup_steps: int = 0) -> None:
    """Linear warm-up, then cosine decay from ``peak`` to a tenth of it over ``steps``."""
    warmup = min(1.0, step / warmup_steps) if warmup_steps else 1.0
    for group in optimiser.param_groups:
        group["lr"] = peak * warmup * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def optimise(model: torch.nn.Module, optimiser: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """Backprop ``loss``, clip the gradient norm to 1, step."""
    optimiser.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimiser.step()


def report(model: torch.nn.Module, step: int, steps: int, task_loss: torch.Tensor,
           accuracy: Callable[[torch.nn.Module, int], float], started: float, log: Callable[[str], None]) -> None:
    """Every REPORT_EVERY steps and at the end: the task loss and accuracy at a few lengths."""
    if step % REPORT_EVERY and step != steps:
        return
    model.eval()
    accs = {n: accuracy(model, n) for n in REPORT_SEGMENTS}
    model.train()
    log(f"step {step:4d}  task loss {task_loss.item():.4f}  accuracy " +
        "  ".join(f"{n} seg {a:.3f}" for n, a in accs.items()) + f"  ({time.perf_counter() - started:.0f}s)")
