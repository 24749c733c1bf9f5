"""Export and run at the published checkpoints' scale: wall time and peak RSS per stage.

Shapes (random weights, stored as the reference trainer stores them: a pickled state dict
of bf16 tensors, imported with --backbone-config/--num-mem-tokens/--segment-size):
  gpt2-small  12 layers, d=768, 12 heads, vocab 50257, M=16, segment 512 (124M parameters)
  llama-1b    16 layers, d=2048, 32 heads / 8 KV heads, vocab 128256, tied embeddings,
              M=16, segment 1024 (1.24B parameters; Llama-3.2-1B's shape)
  armt-gpt2-small  an ARMT over gpt2-small: d_mem 64, 1 head, a sink, M=16, segment 512
              (the ARMT authors' layout, imported with --backbone-config/--armt-version;
              W_mv ~ N(0, 0.02^2) instead of the reference's zeros, so the memory is in play)

Each step runs the real command in its own process (`rmt-export`, then `rmt-run` over
--run-segments segments); this script reads the child's peak RSS (VmHWM) from /proc at each
`[stage]` line the export prints and resets it there (/proc/PID/clear_refs), so each stage's
peak is its own. Linux only. Prints the machine, then one markdown table.

    .venv/bin/python benchmarks/real_scale.py --shape gpt2-small [--precisions fp32,fp16]
        [--segments 32] [--run-segments 8] [--work /tmp/rmt-real-scale]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
SHAPES = {
    "gpt2-small": dict(family="gpt2", segment_size=512, num_mem_tokens=16,
                       backbone=dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)),
    "armt-gpt2-small": dict(family="gpt2", segment_size=512, num_mem_tokens=16,
                            armt=dict(d_mem=64, heads=1, use_sink=True),
                            backbone=dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)),
    "llama-1b": dict(family="llama", segment_size=1024, num_mem_tokens=16,
                     backbone=dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32,
                                   num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                                   max_position_embeddings=131072, tie_word_embeddings=True, rope_theta=500000.0)),
}

# Written by a child process: the parent never holds the model.
MAKE_CHECKPOINT = textwrap.dedent("""
    import json, sys, collections, torch
    from rmt_model import ARMTSettings, RMTConfig, build_armt_model, build_model, family_config_dict
    shape = json.loads(sys.argv[1]); out = sys.argv[2]
    backbone = family_config_dict(shape["family"], **shape["backbone"])
    torch.manual_seed(0)
    if "armt" in shape:
        model = build_armt_model(RMTConfig(kind="armt", backbone=backbone, num_mem_tokens=shape["num_mem_tokens"],
                                           segment_size=shape["segment_size"], armt=ARMTSettings(**shape["armt"])))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("W_mv.weight"):
                    parameter.normal_(0.0, 0.02)
    else:
        model = build_model(RMTConfig(kind="decoder", backbone=backbone, num_mem_tokens=shape["num_mem_tokens"],
                                      segment_size=shape["segment_size"]))
    parameters = sum(p.numel() for p in model.parameters())  # the tied LM head counted once
    state = collections.OrderedDict()
    for key, value in model.state_dict().items():   # the reference trainer's key layout, in bf16
        name = "memory_cell.memory" if key == "memory" else "memory_cell." + key
        state[name] = value.to(torch.bfloat16)
    del model
    torch.save(state, out + "/rmt.bin")
    json.dump(backbone, open(out + "/backbone.json", "w"))
    print(parameters)
""")


def machine() -> str:
    """CPU model, ISA flags (AVX2, AVX-512, VNNI, BF16, AMX), usable cores and RAM of this machine."""
    from rmt_runtime.cpuinfo import cpu_info, describe

    memory = next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    return f"{describe(cpu_info())}; {int(memory) / 2**20:.1f} GiB RAM"


def _peak_and_reset(pid: int) -> int:
    """The process's peak RSS since the last reset (bytes), then reset it."""
    status = Path(f"/proc/{pid}/status").read_text()
    peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) * 1024
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return peak


def run_staged(command: list[str], log: Path) -> tuple[list[tuple[str, float, int]], int]:
    """Run ``command``; at each '[stage] ...' line on its stderr take that stage's wall time
    and peak RSS. Returns ([(stage, seconds, peak bytes)], return code)."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    stages: list[tuple[str, float, int]] = []
    started = time.perf_counter()
    stdout: list[str] = []
    reader = threading.Thread(target=lambda: stdout.extend(process.stdout), daemon=True)
    reader.start()
    with log.open("w") as sink:
        for line in process.stderr:
            sink.write(line)
            sink.flush()
            if line.startswith("[") and "]" in line:
                now = time.perf_counter()
                try:
                    peak = _peak_and_reset(process.pid)
                except (OSError, StopIteration):
                    peak = -1
                stages.append((line[1:line.index("]")], now - started, peak))
                started = now
    code = process.wait()
    reader.join()
    # After the last stage line: what is left (writing the summary); the process's own peak
    # is gone with it, so the last stage's figure is the one taken at its line.
    return stages, code


def run_measured(command: list[str], log: Path) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, return code) of a whole command (VmHWM read just before it exits)."""
    wrapper = textwrap.dedent("""
        import resource, subprocess, sys
        code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)
        print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, code)
    """)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log.write_text(result.stderr)
    peak, code = (int(x) for x in result.stdout.split())
    return seconds, peak, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-small")
    parser.add_argument("--precisions", default="fp32,fp16")
    parser.add_argument("--segments", type=int, default=32, help="validation segments (the CLI default: 32)")
    parser.add_argument("--run-segments", type=int, default=8, help="segments rmt-run reads per bundle")
    parser.add_argument("--work", type=Path, default=Path("/tmp/rmt-real-scale"))
    args = parser.parse_args()

    shape = SHAPES[args.shape]
    work = args.work / args.shape
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    if not (work / "rmt.bin").is_file():
        started = time.perf_counter()
        made = subprocess.run([sys.executable, "-c", MAKE_CHECKPOINT, json.dumps(shape), str(work)],
                              capture_output=True, text=True)
        if made.returncode != 0:
            sys.exit(f"making the checkpoint failed:\n{made.stderr}")
        print(f"checkpoint: {int(made.stdout.split()[-1]) / 1e6:.0f}M parameters as bf16 "
              f"({(work / 'rmt.bin').stat().st_size / 2**30:.2f} GiB), made in {time.perf_counter() - started:.0f}s")
    ids = work / "ids.npy"
    import numpy as np

    np.save(ids, np.random.default_rng(0).integers(0, shape["backbone"]["vocab_size"],
                                                   args.run_segments * shape["segment_size"]))
    rows = []
    for precision in args.precisions.split(","):
        out = work / f"bundle-{precision}"
        command = [str(BIN / "rmt-export"), "--ckpt", str(work / "rmt.bin"), "--out", str(out), "--force",
                   "--backbone-config", str(work / "backbone.json"), "--segment-size", str(shape["segment_size"]),
                   "--segments", str(args.segments)]
        command += (["--armt-version", "normalized"] if "armt" in shape
                    else ["--num-mem-tokens", str(shape["num_mem_tokens"])])
        command += [] if precision == "fp32" else [f"--{precision}"]
        started = time.perf_counter()
        stages, code = run_staged(command, work / f"export-{precision}.log")
        total = time.perf_counter() - started
        if code != 0:
            tail = (work / f"export-{precision}.log").read_text().splitlines()[-3:]
            rows.append((precision, "export", f"failed (exit {code}): {' / '.join(tail)}", "", ""))
            continue
        for stage, seconds, peak in stages:
            rows.append((precision, stage, f"{seconds:.1f}", f"{peak / 2**30:.2f}", ""))
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        rows.append((precision, "export total", f"{total:.1f}", f"{max(p for _, _, p in stages) / 2**30:.2f}",
                     f"bundle {size / 2**30:.2f} GiB"))
        seconds, peak, code = run_measured([str(BIN / "rmt-run"), "--bundle", str(out), "--ids", str(ids),
                                            "--no-progress", "--json"], work / f"run-{precision}.log")
        tokens = args.run_segments * shape["segment_size"]
        rows.append((precision, f"rmt-run {args.run_segments} segments", f"{seconds:.1f}", f"{peak / 2**30:.2f}",
                     f"{tokens / seconds:.0f} tokens/s incl. load" if code == 0 else f"failed (exit {code})"))
    print(f"\n{args.shape}: rmt-export with default options (all graphs, validation over {args.segments} "
          f"segments), then rmt-run over {args.run_segments} segments\n")
    print("| precision | stage | wall s | peak RSS GiB | note |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
