"""What rmt_export.validate reports and refuses, checked on its own (the export tests see it only
through a bundle's manifest): the seeded inputs, the documented bounds, every number of the
report against a PyTorch rollout made here, the misses of a graph that is wrong, the
generation graphs' report, and the summary lines."""
from dataclasses import asdict

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from rmt_export.errors import ValidationError
from rmt_export.validate import (TOLERANCES, Tolerance, ValidationPlan, summary_lines, validate_generation,
                                 validate_graphs)
from rmt_model import build_model
from rmt_model.tiny import tiny_config
from rmt_runtime.bundle import Bundle


def graphs_of(path, names):
    bundle = Bundle.load(path)
    return {name: (bundle.graph_path(name), bundle.graph_spec(name)) for name in names}


def sig(x):
    return float(f"{x:.3g}")


def altered(path, output, tmp_path, offset=0.0, scale=1.0, padded_rows_only=False):
    """A copy of the graph at ``path`` whose ``output`` is ``output * scale + offset`` (with
    ``padded_rows_only``: only in rows whose attention_mask holds a 0), a graph that is wrong
    in a known way."""
    model = onnx.load(str(path))
    graph = model.graph
    raw = f"{output}.raw"
    for node in graph.node:  # the graph itself keeps computing with the true value
        node.output[:] = [raw if name == output else name for name in node.output]
        node.input[:] = [raw if name == output else name for name in node.input]
    graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), "alter.scale"),
                              numpy_helper.from_array(np.array(offset, np.float32), "alter.offset"),
                              numpy_helper.from_array(np.array(1.0, np.float32), "alter.one"),
                              numpy_helper.from_array(np.array([1], np.int64), "alter.axes")])
    nodes = [helper.make_node("Mul", [raw, "alter.scale"], ["alter.scaled"])]
    shift = "alter.offset"
    if padded_rows_only:  # offset * (1 - min(mask over positions)): [B, 1], broadcast over the rest
        rank = len(next(o for o in graph.output if o.name == output).type.tensor_type.shape.dim)
        nodes += [helper.make_node("ReduceMin", ["attention_mask", "alter.axes"], ["alter.min"], keepdims=1),
                  helper.make_node("Cast", ["alter.min"], ["alter.minf"], to=onnx.TensorProto.FLOAT),
                  helper.make_node("Sub", ["alter.one", "alter.minf"], ["alter.padded"]),
                  helper.make_node("Mul", ["alter.padded", "alter.offset"], ["alter.rowshift"])]
        shift = "alter.rowshift"
        for extra in range(rank - 2):
            nodes.append(helper.make_node("Unsqueeze", [shift, "alter.axes"], [f"{shift}.{extra}"]))
            shift = f"{shift}.{extra}"
    nodes.append(helper.make_node("Add", ["alter.scaled", shift], [output]))
    graph.node.extend(nodes)
    target = tmp_path / f"{path.stem}-{output}.onnx"
    onnx.save(model, str(target))
    return target


# ---- the inputs and the bounds ------------------------------------------------------------------
def test_plan_inputs_are_seeded_full_segments_then_a_short_one_with_its_second_row_padded():
    plan = ValidationPlan(segments=3, batch=3, seed=5)
    inputs = plan.inputs(vocab_size=50, segment_size=16, low=4)
    assert [ids.shape for ids, _ in inputs] == [(3, 16), (3, 16), (3, 9)]
    for ids, mask in inputs:
        assert ids.dtype == mask.dtype == np.int64 and mask.shape == ids.shape
    for _, mask in inputs[:-1]:
        assert (mask == 1).all()
    _, mask = inputs[-1]
    assert (mask[0] == 1).all()
    assert (mask[1:, :4] == 1).all() and (mask[1:, 4:] == 0).all()  # padded from half the short segment
    values = np.concatenate([ids.ravel() for ids, _ in inputs])
    assert values.min() == 4 and values.max() == 49  # [low, vocab): both ends are drawn with this seed
    again = plan.inputs(50, 16, 4)
    assert all((a == b).all() for (a, _), (b, _) in zip(inputs, again))
    other = ValidationPlan(segments=3, batch=3, seed=6).inputs(50, 16, 4)
    assert any((a != b).any() for (a, _), (b, _) in zip(inputs, other))


def test_plan_inputs_for_the_smallest_segments():
    ids, mask = ValidationPlan(segments=2, batch=2).inputs(10, 1)[-1]
    assert ids.shape == (2, 1) and (mask == 1).all()  # a one-token segment keeps its token
    ids, mask = ValidationPlan(segments=2, batch=2).inputs(10, 2)[-1]
    assert ids.shape == (2, 2) and mask.tolist() == [[1, 1], [1, 0]]
    assert ValidationPlan().inputs(10, 4)[0][0].shape == (2, 4) and len(ValidationPlan().inputs(10, 4)) == 32


@pytest.mark.parametrize("segments, batch", [(1, 2), (2, 1), (0, 0)])
def test_a_plan_below_two_segments_or_batch_two_is_refused(segments, batch):
    with pytest.raises(ValueError, match="at least 2 segments and batch 2"):
        ValidationPlan(segments=segments, batch=batch).inputs(10, 4)


def test_tolerances_are_the_documented_ones():
    """docs/VALIDATION.md's table and text."""
    assert asdict(TOLERANCES["fp32"]) == dict(atol=1e-4, rtol=1e-4, perturbation=1e-6, sensitivity_factor=10.0)
    assert asdict(TOLERANCES["fp16"]) == dict(atol=2e-2, rtol=5e-2, perturbation=1e-3, sensitivity_factor=10.0)
    assert asdict(TOLERANCES["int8"]) == dict(atol=1e-1, rtol=1e-1, perturbation=1e-2, sensitivity_factor=10.0)
    assert Tolerance(atol=1.0, rtol=0.5, perturbation=0.0).bound(4.0) == 3.0


# ---- the report of graphs that pass ----------------------------------------------------------
def rollout(model, segments, memory):
    """PyTorch per segment: (memory in, outputs by name), chained."""
    steps = []
    with torch.no_grad():
        for ids, mask in segments:
            logits, new = model.step(torch.from_numpy(ids), torch.from_numpy(mask), memory)
            last = np.maximum(mask.sum(axis=1) - 1, 0)
            out = {"logits": logits.numpy(), "new_memory": new.numpy(),
                   "last_logits": logits.numpy()[np.arange(len(last)), last]}
            steps.append((memory.numpy(), out))
            memory = new
    return steps


def test_the_report_holds_every_bound_and_error_per_segment(bundle_factory):
    model, exported = bundle_factory("gpt2", "fp32")
    plan = ValidationPlan(segments=3)
    report = validate_graphs(model, graphs_of(exported.path, ("step", "ingest")), "fp32", plan)
    tolerance = TOLERANCES["fp32"]
    assert report["passed"] is True and report["misses"] == []
    assert (report["precision"], report["segments"], report["batch"], report["seed"]) == ("fp32", 3, 2, 0)
    assert report["segment_lengths"] == [16, 16, 9]
    assert report["tolerance"] == asdict(tolerance)

    segments = plan.inputs(model.config.vocab_size, model.config.segment_size)
    memory0 = model.initial_memory(2).detach().float().clone()
    reference = rollout(model, segments, memory0)
    noise = torch.randn(memory0.shape, generator=torch.Generator().manual_seed(1))
    perturbed = rollout(model, segments, memory0 * (1 + tolerance.perturbation * noise))
    sensitivity = {name: [float(np.abs(p[name] - r[name]).max()) for (_, p), (_, r) in zip(perturbed, reference)]
                   for name in ("logits", "new_memory", "last_logits")}
    assert set(report["sensitivity"]) == set(sensitivity)
    for name, values in sensitivity.items():
        assert report["sensitivity"][name] == pytest.approx([sig(v) for v in values], rel=1e-2, abs=1e-12)
        assert all(v > 0 for v in values)

    assert set(report["graphs"]) == {"step", "ingest"}
    for graph, outputs in (("step", ("logits", "new_memory")), ("ingest", ("last_logits", "new_memory"))):
        result = report["graphs"][graph]
        assert set(result) == {"teacher_forced", "chained", "argmax_agreement", "worst"}
        for mode in ("teacher_forced", "chained"):
            assert set(result[mode]) == set(outputs)
            for output in outputs:
                numbers = result[mode][output]
                scales = [float(np.abs(out[output]).max()) for _, out in reference]
                bounds = [tolerance.bound(s) + (10 * sensitivity[output][i] if mode == "chained" else 0)
                          for i, s in enumerate(scales)]
                assert numbers["bound"] == pytest.approx([sig(b) for b in bounds], rel=1e-2)
                assert len(numbers["max_abs"]) == len(numbers["max_rel"]) == 3
                for err, rel, bound, scale in zip(numbers["max_abs"], numbers["max_rel"], numbers["bound"], scales):
                    assert 0 <= err <= bound and sig(err) == err
                    assert rel == pytest.approx(err / scale, rel=2e-2, abs=1e-12)
        assert result["worst"] == {f"{mode}.{o}": max(result[mode][o]["max_abs"])
                                   for mode in ("teacher_forced", "chained") for o in outputs}
        agreement = result["argmax_agreement"]
        assert agreement["teacher_forced"] == agreement["chained"] == agreement["teacher_forced_decisive"] == 1.0
        # Decisive positions: valid ones whose PyTorch top-2 margin exceeds twice the bound.
        name = outputs[0]
        refs = [out[name] for _, out in reference]
        valid = [mask.astype(bool) if name == "logits" else mask.any(axis=1) for _, mask in segments]
        ref_all = np.concatenate([r.reshape(-1, r.shape[-1]) for r in refs])
        valid_all = np.concatenate([v.reshape(-1) for v in valid])
        top2 = np.sort(ref_all, axis=-1)[:, -2:]
        decisive = valid_all & (top2[:, 1] - top2[:, 0] > 2 * tolerance.bound(float(np.abs(ref_all).max())))
        assert agreement["decisive_positions"] == int(decisive.sum()) > 0
    assert summary_lines(report)[0] == (f"model's own sensitivity (memory, last segment): "
                                        f"{report['sensitivity']['new_memory'][-1]:.3g} for a 1e-06 relative "
                                        "perturbation")


def test_an_encoders_graph_is_judged_on_its_class_logits(bundle_factory):
    model, exported = bundle_factory("bert", "fp32")
    report = validate_graphs(model, graphs_of(exported.path, ("step",)), "fp32", ValidationPlan(segments=2))
    assert report["passed"] and set(report["graphs"]["step"]["teacher_forced"]) == {"logits", "new_memory"}
    assert report["graphs"]["step"]["argmax_agreement"]["teacher_forced"] == 1.0


# ---- graphs that are wrong ------------------------------------------------------------------------
def other_model(model, **overrides):
    torch.manual_seed(1)
    return build_model(tiny_config("gpt2", num_mem_tokens=4, segment_size=16, **overrides))


def test_a_graph_of_another_model_misses_everywhere_and_the_report_says_so(bundle_factory):
    model, exported = bundle_factory("gpt2", "fp32")
    with pytest.raises(ValidationError) as info:
        validate_graphs(other_model(model), graphs_of(exported.path, ("step", "ingest")), "fp32",
                        ValidationPlan(segments=2))
    misses, report = info.value.misses, info.value.report
    assert report["passed"] is False and report["misses"] == misses
    assert set(report["graphs"]) == {"step", "ingest"}  # both graphs were judged before raising
    for graph, output in (("step", "logits"), ("step", "new_memory"), ("ingest", "last_logits")):
        for mode in ("teacher_forced", "chained"):
            for segment in (0, 1):
                assert any(m.startswith(f"{graph}.{output} {mode} segment {segment}: max abs ") for m in misses)
    miss = next(m for m in misses if m.startswith("step.logits teacher_forced segment 0"))
    err, bound = float(miss.split("max abs ")[1].split(" ")[0]), float(miss.split("> bound ")[1].split(" ")[0])
    assert err > bound and "(max |ref| " in miss and ", sensitivity " in miss
    assert any(m.startswith("step.logits teacher_forced: argmax agrees on ") and m.endswith("(expected all)")
               for m in misses)
    assert report["graphs"]["step"]["argmax_agreement"]["teacher_forced_decisive"] < 1.0


def test_non_finite_graph_outputs_are_an_infinite_error(bundle_factory, tmp_path):
    model, exported = bundle_factory("gpt2", "fp32")
    graphs = graphs_of(exported.path, ("step",))
    graphs["step"] = (altered(graphs["step"][0], "new_memory", tmp_path, scale=float("nan")), graphs["step"][1])
    with pytest.raises(ValidationError) as info:
        validate_graphs(model, graphs, "fp32", ValidationPlan(segments=2))
    assert "step.new_memory teacher_forced segment 0: max abs inf > bound" in " ".join(info.value.misses)
    assert info.value.report["graphs"]["step"]["teacher_forced"]["new_memory"]["max_abs"] == [float("inf")] * 2


def test_a_step_graph_wrong_only_on_padded_rows_is_refused(bundle_factory, tmp_path):
    """The plan's last segment pads its second row, so a graph that is wrong only there misses."""
    model, exported = bundle_factory("gpt2", "fp32")
    graphs = graphs_of(exported.path, ("ingest",))
    graphs["ingest"] = (altered(graphs["ingest"][0], "last_logits", tmp_path, offset=1.0, padded_rows_only=True),
                        graphs["ingest"][1])
    with pytest.raises(ValidationError) as info:
        validate_graphs(model, graphs, "fp32", ValidationPlan(segments=3))
    assert {m.split(":")[0] for m in info.value.misses} == {"ingest.last_logits teacher_forced segment 2",
                                                            "ingest.last_logits chained segment 2"}


# ---- the generation graphs ------------------------------------------------------------------------
def test_generation_report_covers_prefill_every_decode_step_and_the_caches(bundle_factory):
    model, exported = bundle_factory("gpt2", "fp32")
    graphs = graphs_of(exported.path, ("prefill", "decode"))
    result = validate_generation(model, graphs, "fp32", ValidationPlan(segments=4), decode_steps=3)
    cache_inputs = [t.name for t in graphs["decode"][1].inputs if t.name.startswith("past.")]
    assert len(cache_inputs) >= 2 and len(cache_inputs) % 2 == 0  # a key and a value per layer
    assert len(result["prefill"]["last_logits"]) == 1
    assert len(result["decode"]["logits"]) == 3 and result["decode"]["steps"] == 3
    assert len(result["decode"]["cache"]) == len(cache_inputs)
    assert all(0 <= e <= 1e-4 for e in result["prefill"]["last_logits"] + result["decode"]["logits"]
               + result["decode"]["cache"])
    assert result["worst"] == {"prefill.last_logits": max(result["prefill"]["last_logits"]),
                               "decode.logits": max(result["decode"]["logits"]),
                               "decode.cache": max(result["decode"]["cache"])}
    agreement = result["argmax_agreement"]
    assert agreement["cached"] == agreement["cached_decisive"] == 1.0
    assert 0 < agreement["decisive_positions"] <= 4 * 2
    default = validate_generation(model, graphs, "fp32", ValidationPlan(segments=2))
    assert default["decode"]["steps"] == 8 and len(default["decode"]["logits"]) == 8  # min(segment, 8)


def test_generation_graphs_of_another_model_are_refused_naming_each_miss(bundle_factory):
    model, exported = bundle_factory("gpt2", "fp32")
    graphs = graphs_of(exported.path, ("prefill", "decode"))
    with pytest.raises(ValidationError) as info:
        # A model with larger weights: its top-2 margins are decisive, and the graph disagrees.
        validate_generation(other_model(model, initializer_range=0.2), graphs, "fp32", ValidationPlan(segments=2),
                            decode_steps=2)
    misses = info.value.misses
    assert any(m.startswith("prefill.last_logits: max abs ") and "> bound" in m for m in misses)
    assert any(m.startswith("decode.logits step 0: max abs ") for m in misses)
    assert any(m.startswith("decode.logits step 1: max abs ") for m in misses)
    assert any(m.startswith("decode.present.0.") and " after 2 steps: max abs " in m for m in misses)
    assert misses[-1].startswith("prefill/decode logits: argmax agrees on ")
    assert misses[-1].endswith(" decisive positions (expected all)")
    report = info.value.report
    assert report["passed"] is False and report["misses"] == misses
    assert report["generation"]["decode"]["steps"] == 2


def test_generation_validation_is_reproducible(bundle_factory):
    model, exported = bundle_factory("gpt2", "fp32")
    graphs = graphs_of(exported.path, ("prefill", "decode"))
    first = validate_generation(model, graphs, "fp32", ValidationPlan(segments=2), decode_steps=2)
    assert validate_generation(model, graphs, "fp32", ValidationPlan(segments=2), decode_steps=2) == first


@pytest.mark.parametrize("graph, output, miss", [
    ("prefill", "last_logits", "prefill.last_logits: max abs "),
    ("decode", "logits", "decode.logits step 0: max abs "),
])
def test_generation_graphs_wrong_only_on_the_padded_row_are_refused(bundle_factory, tmp_path, graph, output, miss):
    """The prompt's second row is padded: a graph wrong only on padded rows misses."""
    model, exported = bundle_factory("gpt2", "fp32")
    graphs = graphs_of(exported.path, ("prefill", "decode"))
    graphs[graph] = (altered(graphs[graph][0], output, tmp_path, offset=1.0, padded_rows_only=True), graphs[graph][1])
    with pytest.raises(ValidationError) as info:
        validate_generation(model, graphs, "fp32", ValidationPlan(segments=2), decode_steps=2)
    assert any(m.startswith(miss) for m in info.value.misses), info.value.misses


def test_a_non_finite_cache_is_an_infinite_error_named_by_its_present_output(bundle_factory, tmp_path):
    model, exported = bundle_factory("gpt2", "fp32")
    graphs = graphs_of(exported.path, ("prefill", "decode"))
    graphs["decode"] = (altered(graphs["decode"][0], "present.1.value", tmp_path, scale=float("nan")),
                        graphs["decode"][1])
    with pytest.raises(ValidationError) as info:
        validate_generation(model, graphs, "fp32", ValidationPlan(segments=2), decode_steps=1)
    # One step: the NaN cache is judged, and fed to no later step.
    assert info.value.misses == ["decode.present.1.value after 1 steps: max abs inf > bound "
                                 + info.value.misses[0].split("> bound ")[1]]
    assert info.value.report["generation"]["decode"]["cache"][3] == float("inf")


# ---- the summary --------------------------------------------------------------------------------
def test_summary_lines_give_the_worst_error_per_graph_and_the_agreement():
    report = {
        "sensitivity": {"new_memory": [0.5, 0.00012345]},
        "tolerance": {"perturbation": 1e-6},
        "graphs": {
            "step": {"worst": {"teacher_forced.logits": 1.5e-6, "chained.logits": 0.25},
                     "argmax_agreement": {"teacher_forced": 1.0, "chained": 0.98765}},
            "ingest": {"worst": {"teacher_forced.last_logits": 2e-7}},
        },
        "generation": {"worst": {"prefill.last_logits": 3e-7, "decode.logits": 4e-7, "decode.cache": 5e-7},
                       "decode": {"steps": 8}, "argmax_agreement": {"cached": 0.5}},
    }
    assert summary_lines(report) == [
        "model's own sensitivity (memory, last segment): 0.000123 for a 1e-06 relative perturbation",
        "step: max abs error teacher_forced.logits 1.5e-06, chained.logits 0.25; argmax agreement 1.0000 "
        "teacher-forced, 0.9877 chained",
        "ingest: max abs error teacher_forced.last_logits 2e-07",
        "prefill/decode (8 cached tokens): max abs error prefill.last_logits 3e-07, decode.logits 4e-07, "
        "decode.cache 5e-07; argmax agreement 0.5000",
    ]
    del report["generation"]
    assert len(summary_lines(report)) == 3
