"""How much memory an export needs, estimated before it starts, so that a model too large for
the machine is refused with the figures instead of being killed by the kernel midway.

The estimate is per stage (trace, validate); the peak is the larger. Calibrated on measured
exports (benchmarks/real_scale.py, docs/BENCHMARKS.md section 6): GPT-2-small's shape (M=16,
segment 512) peaked at 2.76 GiB tracing and 3.04 GiB validating in fp32 (estimates: 3.0 and
3.1), 2.09 and 2.88 GiB in fp16 (2.8 and 3.1). The exporter's fixed part dominates small
models; the weights (model, graph, session) and one segment's full logits dominate large
ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GiB = 2 ** 30
PROCESS_BYTES = int(0.6 * GiB)
EXPORTER_BYTES = int(1.0 * GiB)
GRAPH_COPIES = 2
SESSION_FACTOR = 2.0
LOGITS_COPIES = 6


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes by part for each stage that holds memory at once; the peak is the largest stage."""

    stages: dict[str, dict[str, int]]

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=lambda stage: sum(self.stages[stage].values()))

    @property
    def parts(self) -> dict[str, int]:
        return self.stages[self.peak_stage]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        figures = ", ".join(f"{name} {value / GiB:.1f}" for name, value in self.parts.items() if value)
        return f"{self.peak_stage}: {figures}"


def estimate_export_memory(parameters: int, precision: str, kind: str, batch: int, segment_size: int,
                           vocab_size: int, validate: bool) -> MemoryEstimate:
    """The peak resident memory of exporting a model of ``parameters`` weights, by stage and part.

    trace: the float32 model, the copy in the bundle's precision that is traced (fp16), the
    exporter's own working memory, and the graph being written (its weights twice: the
    ONNX model and its serialised bytes). validate: the float32 model (PyTorch's
    reference), the one ONNX Runtime session open at a time (its initializers, prepacked
    copies and the load's transient: 1.4-1.8x the float32 weights measured), and a decoder's
    full logits of one segment a few times over (PyTorch's and its perturbed twin's, ONNX
    Runtime's output and its copy into numpy). The fp16 copy is freed before validation."""
    weights = 4 * parameters
    graph = weights // 2 if precision == "fp16" else weights
    stages = {"trace": {"process": PROCESS_BYTES, "float32 model": weights,
                        "fp16 copy": weights // 2 if precision == "fp16" else 0,
                        "exporter": EXPORTER_BYTES, "graph": GRAPH_COPIES * graph}}
    if validate:
        stages["validate"] = {"process": PROCESS_BYTES, "float32 model": weights,
                              "session": int(SESSION_FACTOR * weights),
                              "logits": LOGITS_COPIES * batch * segment_size * vocab_size * 4
                              if kind == "decoder" else 0}
    return MemoryEstimate(stages)


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
