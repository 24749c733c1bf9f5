"""What CPU this is: model name, the instruction-set extensions that decide which kernels run
(int8 dot products, bf16, AMX tiles, SVE), and the cores this process may use.

Read from /proc/cpuinfo (Linux); elsewhere the model is ``platform.processor()`` and the ISA
list is empty. Numpy-free and torch-free: rmt-bench, the benchmarks/ scripts and a deploying
device all print the same line.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

# /proc/cpuinfo flag -> the name people use, in the order printed. x86 "flags" lines:
X86_ISA = (("avx2", "AVX2"), ("avx512f", "AVX-512F"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"),
           ("avx512_bf16", "AVX-512 BF16"), ("avx512_fp16", "AVX-512 FP16"), ("amx_tile", "AMX-TILE"),
           ("amx_bf16", "AMX-BF16"), ("amx_int8", "AMX-INT8"))
# aarch64 "Features" lines:
ARM_ISA = (("asimd", "NEON"), ("asimdhp", "NEON FP16"), ("asimddp", "DotProd"), ("i8mm", "I8MM"), ("bf16", "BF16"),
           ("sve", "SVE"), ("sve2", "SVE2"), ("svebf16", "SVE BF16"), ("sme", "SME"))
# Flags meaning the CPU computes bf16 natively (not emulated through fp32).
NATIVE_BF16 = ("avx512_bf16", "amx_bf16", "bf16")

# aarch64 /proc/cpuinfo has no model name: (CPU implementer, CPU part) of the common server and
# Jetson cores; anything else is printed by its numbers.
ARM_PARTS = {("0x41", "0xd03"): "Cortex-A53", ("0x41", "0xd07"): "Cortex-A57", ("0x41", "0xd08"): "Cortex-A72",
             ("0x41", "0xd0b"): "Cortex-A76", ("0x41", "0xd0c"): "Neoverse-N1", ("0x41", "0xd40"): "Neoverse-V1",
             ("0x41", "0xd41"): "Cortex-A78", ("0x41", "0xd42"): "Cortex-A78AE", ("0x41", "0xd49"): "Neoverse-N2",
             ("0x41", "0xd4f"): "Neoverse-V2", ("0x41", "0xd84"): "Neoverse-V3", ("0x41", "0xd8e"): "Neoverse-N3",
             ("0x4e", "0x004"): "NVIDIA Carmel"}


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _first_values(text: str) -> dict[str, str]:
    """The first processor's ``key: value`` pairs (keys lower-cased)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        key = key.strip().lower()
        if colon and key and key not in values:
            values[key] = value.strip()
    return values


def cpu_info(text: str | None = None, arch: str | None = None) -> dict:
    """{"model", "arch", "isa", "cores"}: ``isa`` holds the /proc/cpuinfo flag names of X86_ISA or
    ARM_ISA that this CPU has, in that order; ``cores`` the usable cores. ``text`` parses the
    given /proc/cpuinfo contents instead of this machine's (the architecture then follows from
    it: an x86 ``flags`` line or an aarch64 ``Features`` line)."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
    values = _first_values(text)
    if arch is None:
        arch = "x86_64" if "flags" in values else "aarch64" if "features" in values else platform.machine()
    flags = set((values.get("flags") or values.get("features") or "").split())
    known = ARM_ISA if arch in ("aarch64", "arm64") else X86_ISA
    model = values.get("model name")
    if not model and "cpu implementer" in values:
        key = (values["cpu implementer"].lower(), values.get("cpu part", "").lower())
        model = ARM_PARTS.get(key) or values.get("hardware") or f"ARM implementer {key[0]} part {key[1]}"
    return {"model": model or platform.processor() or "unknown", "arch": arch,
            "isa": [flag for flag, _ in known if flag in flags], "cores": usable_cores()}


def native_bf16(info: dict) -> bool:
    """Whether the CPU has bf16 instructions (AVX-512 BF16, AMX-BF16, Arm BF16)."""
    return any(flag in info["isa"] for flag in NATIVE_BF16)


def describe(info: dict) -> str:
    """One line: ``AMD EPYC 9654 (x86_64; AVX2, AVX-512F, ...); 8 usable cores``."""
    names = dict(X86_ISA + ARM_ISA)
    arm = info["arch"] in ("aarch64", "arm64")
    isa = ", ".join(names[flag] for flag in info["isa"]) or ("none of NEON/SVE" if arm else "none of AVX2/AVX-512/AMX")
    return f"{info['model']} ({info['arch']}; {isa}); {info['cores']} usable cores"
