"""Accuracy of a sample model over 2..64 segments: PyTorch, the fp32, fp16 and int8 bundles
through the runtime, the fp32 bundle computed in bf16 by the openvino backend, and PyTorch
with memory reset at every segment (must fall to chance).

    .venv/bin/python samples/accuracy_table.py [--examples 200] [--out out/sample]
    .venv/bin/python samples/accuracy_table.py --checkpoint samples/keyrecall_armt/model.pt \
        --segments 2 4 8 16 32 64 128 --out out/sample-armt        # the ARMT sample

Exports the shipped checkpoint to fp32, fp16 and int8 bundles under --out (reused when present;
the bf16 column's is an fp32 bundle exported with --bf16, validated as OpenVINO computes it in
bf16), prints a markdown table, writes accuracy.json and accuracy.png there. A column that cannot
run here (bf16 without openvino or a CPU with bf16 instructions) says why under the table.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rmt_export.errors import ExportError, ValidationError  # noqa: E402
from rmt_export.exporter import ExportOptions, export_bundle  # noqa: E402
from rmt_model import ARMTDecoder, load_checkpoint  # noqa: E402
from rmt_runtime import RMTRuntime, RuntimeInputError  # noqa: E402
from rmt_runtime.atomic import write_atomically  # noqa: E402
from rmt_runtime.errors import BackendError  # noqa: E402
from rmt_runtime import limits  # noqa: E402
from samples.task import CHANCE, make_batch  # noqa: E402

HERE = Path(__file__).resolve().parent
CHECKPOINT = HERE / "keyrecall" / "model.pt"
SEGMENTS = (2, 4, 8, 16, 32, 64)
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
# bf16 is how the openvino backend computes an fp32 bundle (rmt-export --bf16 validates it).
COMPUTED = {"bf16": ("fp32", "openvino")}
LABELS = {"bf16": "bf16 (OpenVINO)"}


def bundle_for(precision: str, out: Path, checkpoint: Path) -> Path:
    path = out / f"{checkpoint.parent.name}-{precision}"
    if not (path / "manifest.json").is_file():
        exported, _ = COMPUTED.get(precision, (precision, None))
        export_bundle(checkpoint, path, ExportOptions(precision=exported, force=True, bf16=precision == "bf16",
                                                      tokenizer_dir=checkpoint.parent))
    return path


def runtime_for(precision: str, out: Path, checkpoint: Path) -> RMTRuntime:
    """The runtime of a column: the precision's bundle on the default backend, or (bf16) the fp32
    bundle on the backend that computes it in that precision."""
    _, backend = COMPUTED.get(precision, (precision, None))
    path = bundle_for(precision, out, checkpoint)
    return RMTRuntime.load(path, backend=backend, precision=precision) if backend else RMTRuntime.load(path)


def answers_with_reset(model, ids: np.ndarray) -> np.ndarray:
    """PyTorch with the initial memory (an ARMT: its zero state) fed to every segment: nothing
    is carried."""
    size = model.config.segment_size
    tokens = torch.from_numpy(ids)
    with torch.no_grad():
        fresh = model.initial_state(ids.shape[0]) if isinstance(model, ARMTDecoder) else model.initial_memory(
            ids.shape[0])
        for start in range(0, ids.shape[1], size):
            chunk = tokens[:, start:start + size]
            logits, _ = model.step(chunk, torch.ones_like(chunk), fresh)
    return logits[:, -1].argmax(-1).numpy()


def predict(rt: RMTRuntime, ids: np.ndarray) -> np.ndarray:
    """Each row's answer through the runtime, -1 for a row whose state went to NaN or Inf: the
    runtime refuses such a batch naming the rows, and the others are run again without them."""
    try:
        return rt.run(ids).last_logits.argmax(-1)
    except RuntimeInputError as exc:
        bad = re.search(r"holds NaN or Inf in row\(s\) \[([\d, ]+)\]", str(exc))
        if not bad:
            raise
        rows = [int(r) for r in bad[1].split(",")]
        answers = np.full(len(ids), -1, np.int64)
        keep = np.setdiff1d(np.arange(len(ids)), rows)
        if len(keep):
            answers[keep] = predict(rt, ids[keep])
        return answers


def measure(checkpoint: Path, out: Path, examples: int, segments=SEGMENTS, seed: int = 1234) -> dict:
    """Accuracy per input length. A precision whose export the validation refuses has no
    column of figures: ``refused`` says why (its first miss), and nothing unvalidated is run."""
    model = load_checkpoint(checkpoint)
    runtimes, refused, not_run = {}, {}, {}
    for precision in PRECISIONS:
        try:
            runtimes[precision] = runtime_for(precision, out, checkpoint)
        except ValidationError as exc:
            refused[precision] = f"{len(exc.misses)} validation misses, the first: {exc.misses[0]}"
        except (ExportError, BackendError) as exc:  # e.g. bf16 without openvino or bf16 instructions
            not_run[precision] = str(exc).splitlines()[0]
    rows = []
    for n in segments:
        ids, answers = make_batch(np.random.default_rng(seed + n), examples, n, model.config.segment_size)
        with torch.no_grad():
            reference = model(torch.from_numpy(ids)).logits[:, -1].argmax(-1).numpy()
        row = {"segments": n, "tokens": int(ids.shape[1]) + 1, "pytorch": float((reference == answers).mean())}
        for precision, rt in runtimes.items():
            predicted = predict(rt, ids)
            if (predicted < 0).any():
                row[f"{precision}_nonfinite"] = int((predicted < 0).sum())
            row[precision] = float((predicted == answers).mean())
            row[f"{precision}_agrees_with_pytorch"] = float((predicted == reference).mean())
        row["memory_reset"] = float((answers_with_reset(model, ids) == answers).mean())
        rows.append(row)
    return {"examples": examples, "chance": CHANCE, "rows": rows, "refused": refused, "not_run": not_run}


def table(result: dict) -> str:
    lines = [f"| segments | tokens | PyTorch | {' | '.join(LABELS.get(p, f'{p} bundle') for p in PRECISIONS)} | "
             f"agree {'/'.join(PRECISIONS)} with PyTorch | memory reset (chance {result['chance']:.3f}) |",
             "|---" * (5 + len(PRECISIONS)) + "|"]
    for r in result["rows"]:
        lines.append(f"| {r['segments']} | {r['tokens']} | {r['pytorch']:.3f} | "
                     + " | ".join(f"{r[p]:.3f}" if p in r else "not run" if p in result.get("not_run", {})
                                  else "refused" for p in PRECISIONS) + " | "
                     + " / ".join(f"{r[f'{p}_agrees_with_pytorch']:.3f}" if p in r else "-" for p in PRECISIONS)
                     + f" | {r['memory_reset']:.3f} |")
    lines += [f"\n{p} refused by the export's validation: {why}" for p, why in result.get("refused", {}).items()]
    lines += [f"\n{p} not run here: {why}" for p, why in result.get("not_run", {}).items()]
    lines += [f"\n{r['segments']} segments, {p}: {r[f'{p}_nonfinite']} row(s) whose state went to NaN/Inf (counted wrong)"
              for r in result["rows"] for p in PRECISIONS if f"{p}_nonfinite" in r]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    segments = [r["segments"] for r in result["rows"]]
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for key, label, style in (("pytorch", "PyTorch", "o-"), ("fp32", "fp32 bundle (runtime)", "s--"),
                              ("bf16", "fp32 bundle in bf16 (OpenVINO)", "v--"),
                              ("fp16", "fp16 bundle (runtime)", "^:"), ("int8", "int8 bundle (runtime)", "d-."),
                              ("memory_reset", "memory reset", "x-")):
        if key not in result["rows"][0]:
            continue
        axes.plot(segments, [r[key] for r in result["rows"]], style, label=label)
    axes.axhline(result["chance"], color="grey", linewidth=0.8, label="chance")
    axes.set_xscale("log", base=2)
    axes.set_xticks(segments, [str(s) for s in segments])
    axes.set_ylim(0, 1.05)
    axes.set_xlabel("segments of input (32 tokens each)")
    axes.set_ylabel("answer accuracy")
    axes.set_title(f"Key recall across segments ({result['examples']} examples each)")
    axes.legend(loc="center left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=limits.argparse_type(limits.EXAMPLES, "--examples"), default=200)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--out", type=Path, default=Path("out/sample"))
    parser.add_argument("--plot", type=Path, default=None, help="PNG path [default: <out>/accuracy.png]")
    parser.add_argument("--segments", type=limits.argparse_type(limits.LENGTH_SEGMENTS, "--segments"),
                        nargs="+", default=list(SEGMENTS), help="input lengths, in segments")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = measure(args.checkpoint, args.out, args.examples, tuple(args.segments))
    print(table(result))
    text = json.dumps(result, indent=2)  # replaces only an earlier JSON result, never a link
    write_atomically(args.out / "accuracy.json", lambda handle: handle.write(text.encode()))
    print("plot:", plot(result, args.plot or args.out / "accuracy.png"))


if __name__ == "__main__":
    main()
