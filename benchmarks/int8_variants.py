"""Int8 variants of the ingest graph side by side: speed on the CPU and error against float32
(issue 19, CPU speed).

The bundles' int8 today is ONNX Runtime's dynamic quantization (export/graphs.py,
quantize_graph): int8 weights, activations quantized on every call (DynamicQuantizeLinear +
MatMulInteger), the attention matmuls (QK^T, attn @ V) in float32. This script builds the
static alternative from the float32 bundle's ingest graph, onnxruntime.quantization
.quantize_static in QDQ format (per-channel int8 weights, uint8 activations with MinMax ranges
from calibration; the matmul outputs stay float32 as in the dynamic int8, and so do the
embeddings: the tied wte/lm_head table is copied first so that the Gather keeps a float32 one),
in two flavours:

* qdq-w: the MatMul/Gemm with a constant weight only (what the dynamic int8 quantizes),
* qdq-all: the attention matmuls as well (both inputs activations),

and runs them on ONNX Runtime and on OpenVINO (which runs a QDQ graph as int8 through its
low-precision transformations; INFERENCE_PRECISION_HINT f32 keeps what is not int8 in
float32), next to the float32 and dynamic int8 bundles on ONNX Runtime.

Calibration feeds --calib-segments chained segments of random token ids (batch 1), each
segment's memory being the float32 bundle's own new_memory from the previous one. Accuracy
runs --segments chained segments of other random ids at batch --accuracy-batch, each variant
carrying its own memory, and compares every segment's outputs with the float32 bundle's:
last_logits max abs error (max over segments), top-1 agreement of last_logits (share of
segment x sequence pairs), new_memory relative error (max over segments of
||new_memory - fp32|| / ||fp32||, Frobenius). Random ids on a checkpoint with random weights
say nothing about task accuracy; they measure the numerical cost of the rounding only, and a
random GPT-2 has none of the outlier activations that make static ranges hard on a trained one.
The top-1 agreement is only as telling as the float32 logits' top-1 margin (printed).

Speed: full segments of random ids, the variants interleaved round robin (each repeat times
every variant once per batch size), median of --repeats, tokens/s = batch x segment / time.
On a shared host read the ratios to ort-fp32 of one run, not the absolute rates.

    .venv/bin/python benchmarks/int8_variants.py --fp32-bundle /tmp/m19/fp32 --int8-bundle /tmp/m19/int8 \\
        --static-out /tmp/int8-static --batches 1,8 --threads 2
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rmt_runtime import Bundle
from rmt_runtime.cpuinfo import cpu_info, describe, usable_cores
from rmt_runtime.owned_files import create_temporary, remove_file, remove_owned_file

GRAPH = "ingest"


def ingest_geometry(bundle: Path) -> tuple[int, int, np.ndarray]:
    """(segment size, vocabulary size, initial memory [M, hidden]) of a bundle, from its checked manifest."""
    loaded = Bundle.load(bundle)
    return loaded.segment_size, loaded.vocab_size, loaded.initial_state()["memory"]


def feeds(ids: np.ndarray, memory: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "memory": memory}


def batch_memory(initial: np.ndarray, batch: int) -> np.ndarray:
    return np.ascontiguousarray(np.broadcast_to(initial, (batch, *initial.shape)), dtype=np.float32)


def ort_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtRunner:
    def __init__(self, path: Path, threads: int) -> None:
        self.session = ort_session(path, threads)

    def __call__(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        logits, memory = self.session.run(["last_logits", "new_memory"], inputs)
        return logits, memory


class OpenVinoRunner:
    def __init__(self, path: Path, threads: int, precision: str) -> None:
        import openvino

        self.compiled = openvino.Core().compile_model(
            str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision})
        self.request = self.compiled.create_infer_request()

    def __call__(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        self.request.infer(inputs)
        return (self.request.get_tensor("last_logits").data.copy(),
                self.request.get_tensor("new_memory").data.copy())


class ChainedReader:
    """quantize_static's CalibrationDataReader: chained segments, memory from the float32 graph."""

    def __init__(self, fp32: OrtRunner, segments: int, segment: int, vocab: int, initial: np.ndarray,
                 seed: int) -> None:
        rng = np.random.default_rng(seed)
        memory = batch_memory(initial, 1)
        self.items = []
        for _ in range(segments):
            ids = rng.integers(0, vocab, size=(1, segment), dtype=np.int64)
            self.items.append(feeds(ids, memory))
            memory = fp32(self.items[-1])[1]
        self.position = 0

    def get_next(self):
        if self.position >= len(self.items):
            return None
        self.position += 1
        return self.items[self.position - 1]

    def rewind(self) -> None:
        self.position = 0


def untied(fp32_graph: Path):
    """The float32 graph with its own copy of any embedding table that a MatMul/Gemm shares (GPT-2
    ties wte to lm_head): quantize_static would otherwise feed the embedding Gather from the
    lm_head's int8 weight, which the dynamic int8 does not do (its embeddings stay float32)."""
    import onnx

    model = onnx.load(str(fp32_graph))
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    matmul_weights = {node.input[1] for node in model.graph.node if node.op_type in ("MatMul", "Gemm")}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[0] in initializers and node.input[0] in matmul_weights:
            copy = onnx.TensorProto()
            copy.CopyFrom(initializers[node.input[0]])
            copy.name = f"{node.input[0]}.embedding"
            model.graph.initializer.append(copy)
            node.input[0] = copy.name
    return model


def activation_matmuls(model) -> list[str]:
    """The MatMul/Gemm nodes whose second input is not a constant (attention's QK^T and attn @ V)."""
    constants = {tensor.name for tensor in model.graph.initializer}
    constants |= {output for node in model.graph.node if node.op_type == "Constant" for output in node.output}
    return [node.name for node in model.graph.node
            if node.op_type in ("MatMul", "Gemm") and node.input[1] not in constants]


def build_static(fp32_graph: Path, out_dir: Path, reader: ChainedReader, rebuild: bool) -> dict[str, Path]:
    """qdq-all and qdq-w from one calibration (the second reads the first's cached ranges)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / "calibration.json"
    paths = {name: out_dir / f"{GRAPH}.{name}.onnx" for name in ("qdq-all", "qdq-w")}
    if rebuild:
        remove_owned_file(cache, "json", SystemExit)  # ONNX Runtime's JSON ranges, or refused
    elif all(path.exists() for path in paths.values()):
        print(f"reusing {', '.join(map(str, paths.values()))}", flush=True)
        return paths
    import onnx

    model = untied(fp32_graph)
    attention = activation_matmuls(model)
    descriptor, source = create_temporary(out_dir / f"{GRAPH}.untied.onnx")  # a fresh name, removed below
    os.close(descriptor)
    try:
        onnx.save(model, str(source))
        del model
        for name, excluded in (("qdq-all", []), ("qdq-w", attention)):
            started = time.perf_counter()
            reader.rewind()
            # quantize_static's MatMulConstBOnly is not honoured in QDQ format (1.32): exclude by name.
            # Outputs stay float32, as in the dynamic int8: a QDQ pair on each output would round the
            # residual stream, the attention scores and the logits to 8 bits as well, and would keep
            # ONNX Runtime from fusing GELU (it runs QGemm / MatMulIntegerToFloat with float outputs).
            quantize_static(source, paths[name], reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=excluded, per_channel=True,
                            reduce_range=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=cache,
                            extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]})
            print(f"{name}: built {paths[name]} ({paths[name].stat().st_size / 2**20:.0f} MiB; "
                  f"{len(excluded)} activation matmuls left float32) in {time.perf_counter() - started:.0f}s",
                  flush=True)
    finally:
        remove_file(source)
    return paths


def accuracy(runners: dict, segments: int, batch: int, segment: int, vocab: int, initial: np.ndarray,
             seed: int) -> dict[str, dict]:
    """Each variant's chained outputs against the float32 ORT variant's, segment by segment."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, vocab, size=(batch, segment), dtype=np.int64) for _ in range(segments)]
    outputs = {}
    for name, run in runners.items():
        memory, outputs[name] = batch_memory(initial, batch), []
        for segment_ids in ids:
            logits, memory = run(feeds(segment_ids, memory))
            outputs[name].append((logits, memory))
    reference = outputs["ort-fp32"]
    errors = {}
    for name, chain in outputs.items():
        logit_err, agree, memory_rel = 0.0, 0, 0.0
        for (logits, memory), (ref_logits, ref_memory) in zip(chain, reference):
            logit_err = max(logit_err, float(np.abs(logits - ref_logits).max()))
            agree += int((logits.argmax(-1) == ref_logits.argmax(-1)).sum())
            memory_rel = max(memory_rel, float(np.linalg.norm(memory - ref_memory) / np.linalg.norm(ref_memory)))
        errors[name] = {"logits_max_abs": logit_err, "top1": agree / (segments * batch), "memory_rel": memory_rel}
    logits = np.concatenate([logits for logits, _ in reference])
    top2 = np.sort(logits, axis=-1)[:, -2:]
    errors["fp32 scale"] = {"max_abs": float(np.abs(logits).max()),
                            "median_margin": float(np.median(top2[:, 1] - top2[:, 0]))}
    return errors


def speed(runners: dict, batches: list[int], repeats: int, segment: int, vocab: int,
          initial: np.ndarray) -> dict[tuple[str, int], float]:
    rng = np.random.default_rng(1)
    inputs = {batch: feeds(rng.integers(0, vocab, size=(batch, segment), dtype=np.int64), batch_memory(initial, batch))
              for batch in batches}
    times: dict[tuple[str, int], list[float]] = {(name, batch): [] for name in runners for batch in batches}
    for name, run in runners.items():  # warm-up: first-call allocations, OpenVINO's shape specialisation
        for batch in batches:
            run(inputs[batch])
    for _ in range(repeats):
        for batch in batches:
            for name, run in runners.items():
                started = time.perf_counter()
                run(inputs[batch])
                times[(name, batch)].append(time.perf_counter() - started)
    return {(name, batch): batch * segment / statistics.median(values) for (name, batch), values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32-bundle", type=Path, required=True)
    parser.add_argument("--int8-bundle", type=Path, required=True, help="a bundle exported with --int8 (dynamic)")
    parser.add_argument("--static-out", type=Path, default=Path("/tmp/rmt-int8-static"),
                        help="where the static QDQ graphs and the calibration cache go (reused unless --rebuild)")
    parser.add_argument("--rebuild", action="store_true", help="quantize again even if the QDQ graphs exist")
    parser.add_argument("--batches", default="1,8", help="batch sizes of the speed runs")
    parser.add_argument("--segments", type=int, default=4, help="chained segments of the accuracy run")
    parser.add_argument("--accuracy-batch", type=int, default=2)
    parser.add_argument("--calib-segments", type=int, default=4, help="chained segments of calibration (batch 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant and batch size")
    parser.add_argument("--threads", type=int, default=usable_cores())
    parser.add_argument("--no-openvino", action="store_true", help="ONNX Runtime variants only")
    parser.add_argument("--openvino-bf16", action="store_true",
                        help="also OpenVINO on the float32 graph with INFERENCE_PRECISION_HINT bf16 (a peer)")
    args = parser.parse_args()
    batches = [int(batch) for batch in args.batches.split(",")]

    print(f"CPU: {describe(cpu_info())}; {args.threads} threads; onnxruntime {ort.__version__}", flush=True)
    segment, vocab, initial = ingest_geometry(args.fp32_bundle)
    fp32_graph = args.fp32_bundle / f"{GRAPH}.onnx"
    runners = {"ort-fp32": OrtRunner(fp32_graph, args.threads)}
    reader = ChainedReader(runners["ort-fp32"], args.calib_segments, segment, vocab, initial, seed=1234)
    static = build_static(fp32_graph, args.static_out, reader, args.rebuild)
    runners["ort-dyn-int8"] = OrtRunner(args.int8_bundle / f"{GRAPH}.onnx", args.threads)
    for name, path in static.items():
        runners[f"ort-{name}"] = OrtRunner(path, args.threads)
    if not args.no_openvino:
        if importlib.util.find_spec("openvino") is None:
            print("openvino is not installed: its variants are left out", flush=True)
        else:
            for name, path in static.items():
                runners[f"ov-{name}"] = OpenVinoRunner(path, args.threads, "f32")
            if args.openvino_bf16:
                runners["ov-fp32-bf16"] = OpenVinoRunner(fp32_graph, args.threads, "bf16")
    print(f"variants: {', '.join(runners)}; segment {segment}", flush=True)

    started = time.perf_counter()
    errors = accuracy(runners, args.segments, args.accuracy_batch, segment, vocab, initial, seed=99)
    print(f"accuracy: {args.segments} chained segments at batch {args.accuracy_batch} "
          f"({time.perf_counter() - started:.0f}s); fp32 last_logits: max {errors['fp32 scale']['max_abs']:.3g}, "
          f"median top-1 - top-2 margin {errors['fp32 scale']['median_margin']:.3g}",
          flush=True)
    started = time.perf_counter()
    rates = speed(runners, batches, args.repeats, segment, vocab, initial)
    print(f"speed: median of {args.repeats}, round robin ({time.perf_counter() - started:.0f}s)\n", flush=True)

    header = ["variant"] + [f"tokens/s batch {batch}" for batch in batches] + \
        [f"vs fp32 ORT (batch {batch})" for batch in batches] + \
        ["last_logits max abs err vs fp32", "top-1 agree", "new_memory rel err"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in runners:
        error = errors[name]
        cells = [name] + [f"{rates[(name, batch)]:.0f}" for batch in batches] + \
            [f"{rates[(name, batch)] / rates[('ort-fp32', batch)]:.2f}x" for batch in batches] + \
            [f"{error['logits_max_abs']:.3g}", f"{error['top1']:.0%}", f"{error['memory_rel']:.3g}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
