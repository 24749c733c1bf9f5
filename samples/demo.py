"""The main job: export the shipped sample model and let the runtime answer across 32 segments.

1. exports samples/keyrecall/model.pt (a trained key-recall RMT) to a bundle, with the
   export's own validation (ONNX Runtime vs PyTorch over 32 chained segments);
2. builds a long input: a secret key in the first segment, 30 segments of noise, a
   question in the last; streams it to the runtime in chunks as a document would arrive;
3. prints the question, the answer, the parity figures and tokens/s against PyTorch.

Run: make demo   (or: .venv/bin/python samples/demo.py --segments 128)
     make demo-armt (the ARMT sample: --checkpoint samples/keyrecall_armt/model.pt)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rmt_export.exporter import ExportOptions, export_bundle  # noqa: E402
from rmt_export.validate import summary_lines  # noqa: E402
from rmt_model import load_checkpoint  # noqa: E402
from rmt_runtime import RMTRuntime  # noqa: E402
from rmt_runtime import limits  # noqa: E402
from samples.task import make_batch, make_example  # noqa: E402

CHECKPOINT = Path(__file__).resolve().parent / "keyrecall" / "model.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT, help="the sample checkpoint (RMT or ARMT)")
    parser.add_argument("--segments", type=limits.argparse_type(limits.LENGTH_SEGMENTS, "--segments"),
                        default=32, help="segments of the long example")
    parser.add_argument("--examples", type=limits.argparse_type(limits.EXAMPLES, "--examples"),
                        default=100, help="examples for the accuracy line")
    parser.add_argument("--seed", type=limits.argparse_type(limits.SEED, "--seed"), default=7)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    checkpoint = args.checkpoint.resolve()
    print(f"1. export {checkpoint.relative_to(Path.cwd()) if checkpoint.is_relative_to(Path.cwd()) else checkpoint}")
    result = export_bundle(checkpoint, args.out / f"{checkpoint.parent.name}-fp32",
                           ExportOptions(force=True, tokenizer_dir=checkpoint.parent),
                           progress=lambda stage, detail: print(f"   [{stage}] {detail}"))
    rt = RMTRuntime.load(result.path)
    for line in summary_lines(rt.bundle.validation):
        print(f"   {line}")

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(  # a regular file of bounded size (rmt_runtime.limits)
        limits.read_regular(result.path / "tokenizer.json", limits.TOKENIZER_BYTES, "a tokenizer.json").decode("utf-8"))
    text, answer = make_example(np.random.default_rng(args.seed), args.segments, rt.segment_size)
    document = text.decode("ascii")
    print(f"\n2. a document of {len(document)} bytes ({args.segments} segments of {rt.segment_size}), "
          f"runtime: {rt.picked.split(' (')[0]}")
    print(f"   starts: {document[:40]!r} ...")
    print(f"   ends:   ... {document[-40:]!r}")
    state = rt.new_state()
    rng = np.random.default_rng(args.seed)
    position = 0
    while position < len(document):  # the document arrives in chunks of any size
        size = int(rng.integers(1, 100))
        rt.feed(state, tokenizer.encode(document[position:position + size]).ids)
        position += size
    output = rt.flush(state)
    predicted = tokenizer.decode([int(output.last_logits[0].argmax())])
    print(f"   question: what is the key?  answer: {predicted!r}  (expected {chr(answer)!r}: "
          f"{'right' if predicted == chr(answer) else 'WRONG'})")

    model = load_checkpoint(checkpoint)
    ids = np.frombuffer(text, dtype=np.uint8).astype(np.int64)[None]
    with torch.no_grad():
        reference = model(torch.from_numpy(ids))  # also warms PyTorch up before timing
        started = time.perf_counter()
        model(torch.from_numpy(ids))
        torch_seconds = time.perf_counter() - started
    rt.run(ids)  # warm-up
    started = time.perf_counter()
    rt.run(ids)
    runtime_seconds = time.perf_counter() - started
    # The state: the RMT's memory, or an ARMT's per-layer W_mem and z (the largest difference).
    expected = {"memory": reference.memory} if hasattr(reference, "memory") else reference.state
    drift = max(float(np.abs(output.state[name] - value.numpy()).max()) for name, value in expected.items())
    what = "memory" if "memory" in expected else f"state ({len(expected)} tensors)"
    tokens = ids.shape[1]
    print(f"\n3. parity with PyTorch after {args.segments} chained segments: {what} max abs diff {drift:.2e}, "
          f"same answer: {int(reference.logits[0, -1].argmax()) == int(output.last_logits[0].argmax())}")
    print(f"   speed, one sequence (2 CPU threads): runtime {tokens / runtime_seconds:,.0f} tokens/s, "
          f"PyTorch eager {tokens / torch_seconds:,.0f} tokens/s ({torch_seconds / runtime_seconds:.1f}x)")
    batch_ids, answers = make_batch(np.random.default_rng(args.seed + 1), args.examples, args.segments,
                                    rt.segment_size)
    started = time.perf_counter()
    predicted = rt.run(batch_ids).last_logits.argmax(-1)
    batch_seconds = time.perf_counter() - started
    print(f"   {args.examples} examples of {args.segments} segments, batched: accuracy "
          f"{(predicted == answers).mean():.3f} (chance 0.062), {batch_ids.size / batch_seconds:,.0f} tokens/s")


if __name__ == "__main__":
    main()
