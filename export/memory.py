"""How much memory an export needs, estimated before it starts, so that a model too large for
the machine is refused with the figures instead of being killed by the kernel midway.

Calibrated on a measured export (benchmarks/real_scale.py, GPT-2-small shape, M=16, segment
512, docs/BENCHMARKS.md): peak RSS 3.34 GiB fp32 and 3.74 GiB fp16; these parts give 3.52 and
3.76 GiB. The parts: the Python process with torch and ONNX Runtime loaded; the float32 model;
an fp16 copy for fp16 bundles; the graph being written, then the one ONNX Runtime session
open at a time (2 x the float32 weights: initializers plus prepacked copies); and during
validation a decoder's full logits of one segment, about eight times over (PyTorch's, the
graph's, the perturbed twin's, float64 differences and ONNX Runtime's arena).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GiB = 2 ** 30
PROCESS_BYTES = int(0.6 * GiB)
SESSION_FACTOR = 2.0
LOGITS_COPIES = 8


@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{name} {value / GiB:.1f}" for name, value in self.parts.items() if value)


def estimate_export_memory(parameters: int, precision: str, kind: str, batch: int, segment_size: int,
                           vocab_size: int, validate: bool) -> MemoryEstimate:
    """The peak resident memory of exporting a model of ``parameters`` weights (bytes, by part)."""
    weights = 4 * parameters
    parts = {"process": PROCESS_BYTES, "float32 model": weights,
             "fp16 copy": weights // 2 if precision == "fp16" else 0,
             "graph or session": int(SESSION_FACTOR * weights)}
    if validate and kind == "decoder":
        parts["validation logits"] = LOGITS_COPIES * batch * segment_size * vocab_size * 4
    return MemoryEstimate(parts)


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), or None where
    there is no /proc/meminfo (then nothing is checked)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    """What a container's memory limit (cgroup v2) leaves, which MemAvailable does not show."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - used, 0)


def resident_memory() -> int:
    """This process's resident memory (VmRSS; 0 where /proc is missing): the loaded model
    already counts in the estimate, so it is part of what the export has."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def memory_for_export() -> int | None:
    """What an export may use here: what this process holds plus MemAvailable (capped by a
    container's cgroup limit), or None where neither can be read."""
    found = [value for value in (available_memory(), _cgroup_room()) if value is not None]
    return min(found) + resident_memory() if found else None


__all__ = ["MemoryEstimate", "estimate_export_memory", "memory_for_export", "resident_memory", "GiB"]
