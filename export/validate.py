"""Validation of exported graphs against the PyTorch model over many chained segments.

Two comparisons per graph, per output, per segment:
- teacher-forced: each segment gets PyTorch's memory, so the difference is the graph's
  own error; this is what the tolerances judge;
- chained: the graph's memory is fed back, as deployed. A recurrent model can amplify
  rounding noise by itself, so chained drift is judged against the model's own
  sensitivity, measured in the same run: PyTorch against PyTorch with its initial memory
  perturbed at rounding level.
A miss anywhere raises one ValidationError listing every miss with its numbers.
See docs/VALIDATION.md for why the tolerances are what they are.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from rmt_model import RMTBase
from rmt_model.armt import ARMTDecoder
from rmt_runtime.spec import GraphSpec

from .errors import ValidationError


@dataclass(frozen=True)
class Tolerance:
    """Bound on |graph - PyTorch| for one output: atol + rtol * max|PyTorch| (per segment).

    sensitivity_factor: chained drift may also be this many times the model's own drift
    under a ``perturbation`` (relative, rounding level) of its initial memory.
    """

    atol: float
    rtol: float
    perturbation: float
    sensitivity_factor: float = 10.0

    def bound(self, scale: float) -> float:
        return self.atol + self.rtol * scale


TOLERANCES = {
    # ORT CPU fp32 differs from PyTorch by ~1e-7..1e-6 relative (different kernels).
    "fp32": Tolerance(atol=1e-4, rtol=1e-4, perturbation=1e-6),
    # fp16 weights and activations: fp16's epsilon is ~1e-3, and its rounding compounds with
    # depth and width: 7e-4 of the largest value for GPT-2-small, 2.5% for a 1.24B Llama,
    # where PyTorch's own fp16 differs from its fp32 by as much (docs/VALIDATION.md).
    "fp16": Tolerance(atol=2e-2, rtol=5e-2, perturbation=1e-3),
    # int8 MatMul weights and per-call activation scales: each quantized matmul rounds to
    # 1/254 of its range (~4e-3 relative), compounding over layers to a few percent; the
    # task-level check (sample answers) is what int8 is judged on, see docs/VALIDATION.md.
    "int8": Tolerance(atol=1e-1, rtol=1e-1, perturbation=1e-2),
    # An fp32 graph computed by OpenVINO in bf16 (rmt-export --bf16): matmul inputs rounded to
    # bf16's 8-bit mantissa (~4e-3 relative), products accumulated in fp32; measured ratios in
    # docs/VALIDATION.md.
    "bf16": Tolerance(atol=5e-2, rtol=5e-2, perturbation=4e-3),
}
#: Precisions that are not the graph's own but how a backend computes an fp32 graph, and who
#: computes them in validation: bf16 by OpenVINO's CPU plugin (rmt_runtime.backends.openvino).
COMPUTED_BY_OPENVINO = ("bf16",)


@dataclass(frozen=True)
class ValidationPlan:
    """``segments`` segments of batch ``batch``; the last is short and its second row padded
    (so the padding path is checked). Inputs: seeded random ids, or, with ``token_ids``, the
    user's own tokens (one row after the other, ``tokens_needed`` of them): a trained model
    can be out of its range on random ids where it is not on its own data (an ARMT's fp16
    read, docs/VALIDATION.md)."""

    segments: int = 32
    batch: int = 2
    seed: int = 0
    token_ids: np.ndarray | None = field(default=None, compare=False, repr=False)
    source: str = "random ids"  # what the report says the inputs were

    def tokens_needed(self, segment_size: int) -> int:
        """Tokens ``token_ids`` must hold: ``batch`` rows of (segments - 1) full segments and a short one."""
        return self.batch * ((self.segments - 1) * segment_size + max(1, segment_size // 2 + 1))

    def check_tokens(self, vocab_size: int, segment_size: int) -> None:
        """``token_ids`` fit: 1-D integers in the vocabulary, enough of them (ValueError naming which)."""
        ids = self.token_ids
        if ids is None:
            return
        needed = self.tokens_needed(segment_size)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"validation tokens must be a 1-D array of integer ids, got {ids.dtype}{list(ids.shape)}")
        if len(ids) < needed:
            raise ValueError(f"validation over {self.segments} segments of {segment_size} tokens, batch {self.batch}, "
                             f"needs {needed} tokens; {self.source} gives {len(ids)} (give more text, or fewer "
                             "--segments)")
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"validation tokens must be ids in 0..{vocab_size - 1}; {self.source} holds "
                             f"{int(ids.min())}..{int(ids.max())}")

    def inputs(self, vocab_size: int, segment_size: int, low: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
        if self.segments < 2 or self.batch < 2:
            raise ValueError("validation needs at least 2 segments and batch 2")
        rng = np.random.default_rng(self.seed)
        rows = None
        if self.token_ids is not None:
            self.check_tokens(vocab_size, segment_size)
            per_row = self.tokens_needed(segment_size) // self.batch
            rows = np.asarray(self.token_ids[:per_row * self.batch], np.int64).reshape(self.batch, per_row)
        out = []
        start = 0
        for index in range(self.segments):
            last = index == self.segments - 1
            length = max(1, segment_size // 2 + 1) if last else segment_size
            if rows is None:
                ids = rng.integers(low, vocab_size, size=(self.batch, length), dtype=np.int64)
            else:
                ids = np.ascontiguousarray(rows[:, start:start + length])
            start += length
            mask = np.ones_like(ids)
            if last:
                mask[1:, max(1, length // 2):] = 0
            out.append((ids, mask))
        return out


# Outputs above this size are allocated with mmap by glibc's malloc and returned on free.
MMAP_BYTES = 32 * 2 ** 20


def _ort_session(path: str, large_outputs: bool = False):
    """A CPU session. With ``large_outputs`` (a segment's full logits over MMAP_BYTES: a GB at
    a 128k vocabulary) it has no arena, which would keep those blocks allocated after each run
    on top of the copies being compared; such blocks are mmapped, so freeing them returns the
    memory. Smaller outputs keep the arena: without it, malloc's heap fragments and the peak
    grows with the number of segments (tests/export/test_validator.py)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = not large_outputs
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    if session.get_providers()[0] != "CPUExecutionProvider":
        raise RuntimeError(f"validation asked for ONNX Runtime CPU, got {session.get_providers()}")
    return session


class _OpenVinoSession:
    """An fp32 graph compiled by OpenVINO to compute in ``precision``, with ONNX Runtime's
    ``run(names, feeds)``: what the openvino backend runs, for validation to judge."""

    def __init__(self, path: str, precision: str) -> None:
        from rmt_runtime.backends.openvino import compile_graph, import_openvino

        self.compiled = compile_graph(import_openvino().Core(), path, precision)
        self.request = self.compiled.create_infer_request()
        self.names = [port.get_any_name() for port in self.compiled.outputs]

    def run(self, names, feeds):
        results = self.request.infer(feeds)
        by_name = {port.get_any_name(): value for port, value in results.items()}
        return [np.array(by_name[name], copy=True) for name in (names or self.names)]


def _session(path: str, precision: str, large_outputs: bool = False):
    """What computes ``path`` in ``precision``: ONNX Runtime's CPU provider for the graph's own
    precision, OpenVINO for bf16 (COMPUTED_BY_OPENVINO)."""
    if precision in COMPUTED_BY_OPENVINO:
        return _OpenVinoSession(path, precision)
    return _ort_session(path, large_outputs)


def initial_state(model: RMTBase | ARMTDecoder, batch: int) -> dict[str, torch.Tensor]:
    """The model's state for new sequences by state input name: the RMT's ``memory``, an
    ARMT's ``W_mem.{l}``/``z.{l}`` (zeros); float32 copies."""
    if isinstance(model, ARMTDecoder):
        return model.initial_state(batch)
    return {"memory": model.initial_memory(batch).detach().float().clone()}


def pytorch_step(model: RMTBase | ARMTDecoder, ids: np.ndarray, mask: np.ndarray, state: dict[str, torch.Tensor],
                 pairs: dict[str, str]) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """One PyTorch fp32 segment: its outputs by graph output name (``pairs``: state input ->
    the output replacing it), and the state it passes on."""
    with torch.no_grad():
        if isinstance(model, ARMTDecoder):
            logits, new_state = model.step(torch.from_numpy(ids), torch.from_numpy(mask), state)
        else:
            logits, memory = model.step(torch.from_numpy(ids), torch.from_numpy(mask), state["memory"])
            new_state = {"memory": memory}
    record = {pairs[name]: value.numpy() for name, value in new_state.items()}
    record["logits"] = logits.numpy()
    if model.config.kind != "encoder":
        last = np.maximum(mask.sum(axis=1) - 1, 0)
        record["last_logits"] = record["logits"][np.arange(len(last)), last]
    return record, new_state


def _perturbed(state: dict[str, torch.Tensor], perturbation: float, seed: int) -> dict[str, torch.Tensor]:
    """``state`` times (1 + perturbation * N(0, 1)), elementwise, seeded: the rounding-level
    disturbance whose effect measures the model's own sensitivity."""
    generator = torch.Generator().manual_seed(seed)
    return {name: value * (1 + perturbation * torch.randn(value.shape, generator=generator))
            for name, value in state.items()}


CHUNK_ELEMENTS = 1 << 22  # 16 MB of float32: the comparison's temporaries stay this small


def _blocks(*arrays: np.ndarray):
    """The arrays' matching blocks of whole last-axis rows, about CHUNK_ELEMENTS each: a
    segment's full logits are a GB at a 128k vocabulary, so no whole-array temporary."""
    flat = [a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a.reshape(1, -1) for a in arrays]
    step = max(1, CHUNK_ELEMENTS // max(1, flat[0].shape[1]))
    for start in range(0, flat[0].shape[0], step):
        yield tuple(f[start:start + step] for f in flat)


def _abs_max(values: np.ndarray) -> float:
    """max |values| without an |values| copy (nan if any value is nan)."""
    if not values.size:
        return 0.0
    low, high = float(values.min()), float(values.max())
    return float("nan") if low != low or high != high else max(-low, high, 0.0)


def _max_abs_diff(got: np.ndarray, expected: np.ndarray) -> float:
    """max |got - expected| in float64, block by block (see _blocks); inf when ``got`` is not
    finite."""
    worst = 0.0
    for got_block, expected_block in _blocks(got, expected):
        if not np.isfinite(got_block).all():
            return float("inf")
        worst = max(worst, float(np.abs(got_block.astype(np.float64) - expected_block).max(initial=0.0)))
    return worst


def _sig(x: float) -> float:
    return float(f"{x:.3g}")


def _top2_margin(logits: np.ndarray) -> np.ndarray:
    """top-1 minus top-2 over the last axis (block by block: np.partition copies its input)."""
    margins = []
    for (block,) in _blocks(logits):
        top2 = np.partition(block, -2, axis=-1)[:, -2:]
        margins.append(top2[:, 1] - top2[:, 0])
    return np.concatenate(margins).reshape(logits.shape[:-1])


def _argmax_agreement(got: np.ndarray, ref: np.ndarray, valid: np.ndarray,
                      bound: float) -> tuple[float, float | None, int]:
    """(agreement over valid rows, agreement where ref's top-2 margin > 2 * bound, decisive count).

    With no decisive position the decisive agreement is None: nothing was judged, so it
    must not read as agreement."""
    return _Agreement.of(got, ref, valid).result(bound)


class _Agreement:
    """Argmax agreement gathered segment by segment: per valid position only whether the
    argmaxes agree and PyTorch's top-2 margin, plus the largest |logit| seen, so that the
    decisive threshold (2 x the bound at the largest |logit|) is applied once all are in."""

    def __init__(self) -> None:
        self.same: list[np.ndarray] = []
        self.margin: list[np.ndarray] = []
        self.scale = 0.0

    @classmethod
    def of(cls, got: np.ndarray, ref: np.ndarray, valid: np.ndarray) -> "_Agreement":
        agreement = cls()
        agreement.add(got, ref, valid)
        return agreement

    def add(self, got: np.ndarray, ref: np.ndarray, valid: np.ndarray) -> None:
        self.same.append((got.argmax(-1) == ref.argmax(-1))[valid])
        self.margin.append(_top2_margin(ref)[valid])
        self.scale = max(self.scale, _abs_max(ref))

    def result(self, bound: float) -> tuple[float, float | None, int]:
        same, margin = np.concatenate(self.same), np.concatenate(self.margin)
        decisive = margin > 2 * bound
        overall = float(same.mean()) if same.size else 1.0
        decisive_rate = float(same[decisive].mean()) if decisive.any() else None
        return overall, decisive_rate, int(decisive.sum())


def _rate(value: float | None) -> float | None:
    return None if value is None else _sig(value)


MODES = ("teacher_forced", "chained")


def validate_graphs(model: RMTBase, graphs: dict[str, tuple[str, GraphSpec]], precision: str,
                    plan: ValidationPlan = ValidationPlan()) -> dict[str, Any]:
    """Compare every graph with ``model`` (fp32 PyTorch); return the report or raise ValidationError.

    Segment by segment: PyTorch's step (and its perturbed twin: the model's own sensitivity)
    and the graph in both modes run, are compared, and only the figures are kept, so memory
    does not grow with the number of segments (a segment's full logits are hundreds of MB at
    real vocabulary sizes). One graph's session is open at a time (each holds a copy of the
    weights). The reference's small outputs (memory, last-token or class logits: a few MB
    over all segments) are kept from the first graph's pass, so a graph that has only those
    (ingest) does not run PyTorch again."""
    config = model.config
    tolerance = TOLERANCES[precision]
    low = 4 if config.kind == "encoder" else 0
    segments = plan.inputs(config.vocab_size, config.segment_size, low)
    state0 = initial_state(model, plan.batch)
    pairs = next(iter(graphs.values()))[1].state  # state input -> output; every segment graph has the same

    sensitivity: dict[str, list[float]] = {}
    kept: list[dict[str, np.ndarray]] = []  # per segment: the reference's small outputs
    report: dict[str, Any] = {
        "precision": precision, "segments": plan.segments, "batch": plan.batch, "seed": plan.seed,
        "inputs": plan.source,
        "segment_lengths": [int(ids.shape[1]) for ids, _ in segments],
        "tolerance": asdict(tolerance), "sensitivity": {}, "graphs": {}, "misses": [],
    }
    misses: list[str] = report["misses"]
    large_outputs = config.kind != "encoder" and plan.batch * config.segment_size * config.vocab_size * 4 > MMAP_BYTES
    for name, (path, spec) in graphs.items():
        session = _session(str(path), precision, large_outputs)
        outputs = spec.output_names
        logits_name = "last_logits" if "last_logits" in outputs else "logits" if "logits" in outputs else None
        errors = {mode: {o: {"max_abs": [], "max_rel": [], "bound": []} for o in outputs} for mode in MODES}
        found: dict[str, list[str]] = {mode: [] for mode in MODES}
        agreements = {mode: _Agreement() for mode in MODES}
        measure_sensitivity = not sensitivity
        reuse = bool(kept) and all(o in kept[0] for o in outputs)
        # The perturbed twin starts at the first state that is not all zero (an ARMT's is zero
        # until its first segment writes, and a perturbed zero is zero).
        reference_state, perturbed_state = state0, None
        chained_state = {k: v.numpy() for k, v in state0.items()}
        for index, (ids, mask) in enumerate(segments):
            if reuse:
                state_in = ({k: v.numpy() for k, v in state0.items()} if index == 0
                            else {k: kept[index - 1][pairs[k]] for k in pairs})
                reference = kept[index]
            else:
                state_in = {k: v.numpy() for k, v in reference_state.items()}
                if measure_sensitivity and perturbed_state is None and any(v.any() for v in state_in.values()):
                    perturbed_state = _perturbed(reference_state, tolerance.perturbation, plan.seed + 1)
                reference, reference_state = pytorch_step(model, ids, mask, reference_state, pairs)
                if len(kept) <= index:
                    kept.append({k: v.copy() for k, v in reference.items() if k != "logits" or v.ndim == 2})
            if measure_sensitivity:
                if perturbed_state is None:
                    for key in reference:
                        sensitivity.setdefault(key, []).append(0.0)
                else:
                    perturbed, perturbed_state = pytorch_step(model, ids, mask, perturbed_state, pairs)
                    for key in reference:
                        sensitivity.setdefault(key, []).append(_max_abs_diff(perturbed[key], reference[key]))
                    del perturbed
            for mode in MODES:
                feed_state = state_in if mode == "teacher_forced" else chained_state
                got = dict(zip(outputs, session.run(outputs, {
                    "input_ids": ids, "attention_mask": mask,
                    **{k: np.asarray(v, np.float32) for k, v in feed_state.items()}})))
                if mode == "chained":
                    chained_state = {k: got[pairs[k]] for k in pairs}
                for output in outputs:
                    expected = reference[output]
                    scale = _abs_max(expected)
                    err = _max_abs_diff(got[output], expected)
                    bound = tolerance.bound(scale)
                    if mode == "chained":
                        bound += tolerance.sensitivity_factor * sensitivity[output][index]
                    figures = errors[mode][output]
                    figures["max_abs"].append(_sig(err))
                    figures["max_rel"].append(_sig(err / scale if scale else err))
                    figures["bound"].append(_sig(bound))
                    if not err <= bound:
                        found[mode].append(f"{name}.{output} {mode} segment {index}: max abs {err:.3g} > bound "
                                           f"{bound:.3g} (max |ref| {scale:.3g}, sensitivity "
                                           f"{sensitivity[output][index]:.3g})")
                if logits_name:
                    valid = mask.astype(bool) if got[logits_name].ndim == 3 else mask.any(axis=1)
                    agreements[mode].add(got[logits_name], reference[logits_name], valid)
                del got
            del reference
        del session
        result: dict[str, Any] = {}
        for mode in MODES:  # per mode: its errors and misses, then its argmax agreement
            result[mode] = errors[mode]
            misses += found[mode]
            if not logits_name:
                continue
            overall, decisive, count = agreements[mode].result(tolerance.bound(agreements[mode].scale))
            result.setdefault("argmax_agreement", {})[mode] = _sig(overall)
            if mode == "teacher_forced":
                result["argmax_agreement"]["teacher_forced_decisive"] = _rate(decisive)
                result["argmax_agreement"]["decisive_positions"] = count
                if decisive is not None and decisive < 1.0:
                    misses.append(f"{name}.{logits_name} teacher_forced: argmax agrees on {decisive:.4f} of "
                                  f"{count} positions whose top-2 margin exceeds 2 x the tolerance (expected all)")
        result["worst"] = {f"{mode}.{o}": max(result[mode][o]["max_abs"]) for mode in MODES for o in outputs}
        report["graphs"][name] = result
    report["sensitivity"] = {k: [_sig(v) for v in values] for k, values in sensitivity.items()}
    report["passed"] = not misses
    if misses:
        raise ValidationError(misses, report)
    return report


def validate_generation(model: RMTBase, graphs: dict[str, tuple[str, GraphSpec]], precision: str,
                        plan: ValidationPlan = ValidationPlan(), decode_steps: int | None = None) -> dict[str, Any]:
    """Compare the prefill and decode graphs with the PyTorch model on a batch of prompts.

    Memory comes from PyTorch reading a few segments (a realistic memory, not the initial
    one); the prompt's second row is padded (the padded-cache path). The decode graph is
    chained on its own caches for ``decode_steps`` teacher-forced tokens, as the runtime
    runs it, and every step's logits and the final caches are judged with the same
    tolerance as the step graph. Returns {"prefill": result, "decode": result}; a miss
    raises ValidationError.
    """
    config = model.config
    tolerance = TOLERANCES[precision]
    size = config.segment_size
    armt = isinstance(model, ARMTDecoder)
    # Positions ahead of the prompt in the cache: the RMT's memory tokens, an ARMT's sink.
    prefix = int(model.settings.use_sink) if armt else config.num_mem_tokens
    steps = decode_steps if decode_steps is not None else min(size, 8)
    segments = plan.inputs(config.vocab_size, size)
    rng = np.random.default_rng(plan.seed + 2)
    length = max(1, size // 2 + 1)
    if plan.token_ids is None:
        ids = rng.integers(0, config.vocab_size, size=(plan.batch, length), dtype=np.int64)
        mask = np.ones_like(ids)
        mask[1:, max(1, length // 2):] = 0
    else:  # the user's tokens: the plan's last (short, padded) segment is the prompt
        ids, mask = segments[-1]
    forced = (rng.integers(0, config.vocab_size, size=(steps, plan.batch, 1), dtype=np.int64) if plan.token_ids is None
              else rng.choice(np.asarray(plan.token_ids, np.int64), size=(steps, plan.batch, 1)))
    with torch.no_grad():
        state = initial_state(model, plan.batch)
        pairs = {name: name for name in state}
        for seg_ids, seg_mask in segments[:min(3, len(segments) - 1)]:
            _, state = pytorch_step(model, seg_ids, seg_mask, state, pairs)
        if armt:
            ref_logits, cache = model.prefill(torch.from_numpy(ids), torch.from_numpy(mask), state)
        else:
            ref_logits, cache = model.prefill(torch.from_numpy(ids), torch.from_numpy(mask), state["memory"])
        reference = [ref_logits.numpy().copy()]
        full_mask = np.concatenate([np.ones((plan.batch, prefix), np.int64), mask], axis=1)
        positions = prefix + mask.sum(axis=1, keepdims=True)
        masks, position_ids = [], []
        for step in range(steps):
            full_mask = np.concatenate([full_mask, np.ones((plan.batch, 1), np.int64)], axis=1)
            masks.append(full_mask)
            position_ids.append(positions + step)
            decode_inputs = (torch.from_numpy(forced[step]), torch.from_numpy(full_mask),
                             torch.from_numpy(position_ids[-1]), cache)
            logits, cache = model.decode(*decode_inputs, state) if armt else model.decode(*decode_inputs)
            reference.append(logits.numpy().copy())
        ref_cache = [t.float().numpy() for layer in cache.layers for t in (layer.keys, layer.values)]
    state_feed = {name: value.float().numpy() for name, value in state.items()}

    misses: list[str] = []
    results: dict[str, Any] = {}

    def judge(graph: str, what: str, got: np.ndarray, expected: np.ndarray, errors: list) -> None:
        scale = _abs_max(expected)
        err = _max_abs_diff(got, expected)
        bound = tolerance.bound(scale)
        errors.append(_sig(err))
        if not err <= bound:
            misses.append(f"{graph}.{what}: max abs {err:.3g} > bound {bound:.3g} (max |ref| {scale:.3g})")

    prefill = _session(str(graphs["prefill"][0]), precision)
    outputs = prefill.run(None, {"input_ids": ids, "attention_mask": mask,
                                 **{k: state_feed[k] for k in graphs["prefill"][1].input_names if k in state_feed}})
    logits_errors: list[float] = []
    first_logits = outputs[0]
    judge("prefill", "last_logits", first_logits, reference[0], logits_errors)
    results["prefill"] = {"last_logits": logits_errors}
    caches = outputs[1:]
    del prefill, outputs  # one session (a copy of the weights) open at a time
    decode = _session(str(graphs["decode"][0]), precision)
    past_names = [t.name for t in graphs["decode"][1].inputs if t.name.startswith("past.")]
    got_logits = [first_logits]
    decode_errors: list[float] = []
    for step in range(steps):
        feed = {"input_ids": forced[step], "attention_mask": masks[step], "position_ids": position_ids[step],
                **dict(zip(past_names, caches)),
                **{k: state_feed[k] for k in graphs["decode"][1].input_names if k in state_feed}}
        out = decode.run(None, feed)
        caches = out[1:]
        got_logits.append(out[0])
        judge("decode", f"logits step {step}", out[0], reference[step + 1], decode_errors)
    cache_errors: list[float] = []
    for name, got, expected in zip(past_names, caches, ref_cache):
        judge("decode", name.replace("past.", "present.", 1) + f" after {steps} steps", got, expected, cache_errors)
    results["decode"] = {"logits": decode_errors, "cache": cache_errors, "steps": steps}
    bound = tolerance.bound(float(np.abs(np.stack(reference)).max()))
    overall, decisive, count = _argmax_agreement(np.stack(got_logits), np.stack(reference),
                                                 np.ones((steps + 1, plan.batch), bool), bound)
    results["argmax_agreement"] = {"cached": _sig(overall), "cached_decisive": _rate(decisive),
                                   "decisive_positions": count}
    if decisive is not None and decisive < 1.0:
        misses.append(f"prefill/decode logits: argmax agrees on {decisive:.4f} of {count} decisive positions "
                      "(expected all)")
    results["worst"] = {"prefill.last_logits": max(logits_errors), "decode.logits": max(decode_errors),
                        "decode.cache": max(cache_errors)}
    if misses:
        raise ValidationError(misses, {"generation": results, "misses": misses, "passed": False})
    return results


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Human-readable lines: the worst error per graph/output/mode, and argmax agreement."""
    lines = []
    sens = report["sensitivity"]
    state = [name for name in sens if "logits" not in name]
    what = "memory" if state == ["new_memory"] else f"largest over {len(state)} state tensors"
    lines.append(f"model's own sensitivity ({what}, last segment): {max(sens[n][-1] for n in state):.3g} "
                 f"for a {report['tolerance']['perturbation']:g} relative perturbation")
    for name, result in report["graphs"].items():
        worst = ", ".join(f"{k} {v:.3g}" for k, v in result["worst"].items())
        line = f"{name}: max abs error {worst}"
        if "argmax_agreement" in result:
            a = result["argmax_agreement"]
            line += f"; argmax agreement {a['teacher_forced']:.4f} teacher-forced, {a['chained']:.4f} chained"
            if a.get("decisive_positions") == 0:
                line += " (no decisive position: every top-2 margin is within the tolerance, argmax not judged)"
        lines.append(line)
    generation = report.get("generation")
    if generation:
        worst = ", ".join(f"{k} {v:.3g}" for k, v in generation["worst"].items())
        lines.append(f"prefill/decode ({generation['decode']['steps']} cached tokens): max abs error {worst}; "
                     f"argmax agreement {generation['argmax_agreement']['cached']:.4f}")
    return lines
