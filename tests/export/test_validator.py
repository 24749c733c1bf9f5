"""The validator itself: damaged graphs must fail it, and only the comparison that can see
the damage may pass it. Each graph here is the real exported step graph with one deliberate
change made with the onnx API, checked by the real validator against the real PyTorch model."""
import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from rmt_export.errors import ValidationError
from rmt_export.exporter import ExportOptions, export_model
from rmt_export.validate import ValidationPlan, summary_lines, validate_graphs
from rmt_model import build_model, save_checkpoint
from rmt_model.tiny import tiny_config
from rmt_runtime.bundle import Bundle

PLAN = ValidationPlan(segments=12)


@pytest.fixture(scope="module")
def exported(bundle_factory):
    model, result = bundle_factory("gpt2", "fp32")
    bundle = Bundle.load(result.path)
    return model, onnx.load(str(bundle.graph_path("step"))), bundle.graph_spec("step")


def _validate(model, graph, spec, tmp_path):
    path = tmp_path / "step.onnx"
    onnx.save(graph, str(path))
    return validate_graphs(model, {"step": (str(path), spec)}, "fp32", PLAN)


def test_the_undamaged_graph_passes(exported, tmp_path):
    model, graph, spec = exported
    report = _validate(model, graph, spec, tmp_path)
    assert report["passed"] and report["graphs"]["step"]["argmax_agreement"]["teacher_forced_decisive"] == 1.0


def test_one_weight_matrix_off_by_one_percent_fails(exported, tmp_path):
    model, graph, spec = exported
    damaged = copy.deepcopy(graph)
    matrices = [t for t in damaged.graph.initializer if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT]
    target = max(matrices, key=lambda t: int(np.prod(t.dims)) if "wte" not in t.name else 0)
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * np.float32(1.01), target.name))
    with pytest.raises(ValidationError) as error:
        _validate(model, damaged, spec, tmp_path)
    assert any("teacher_forced" in miss for miss in error.value.misses), error.value.misses[:3]


def test_memory_error_that_grows_over_segments_fails_in_the_chained_comparison_only(exported, tmp_path):
    """new_memory += a fixed zero-mean pattern of 3e-5: inside the per-segment bound
    (teacher-forced passes, ~1e-4 + 1e-4 x 2.6), but fed back it accumulates (measured: past
    the chained bound from segment 5). A validator that fed PyTorch's memory in the chained
    mode too would pass this graph."""
    model, graph, spec = exported
    damaged = copy.deepcopy(graph)
    for node in damaged.graph.node:
        node.output[:] = ["new_memory_exact" if name == "new_memory" else name for name in node.output]
    width = spec.inputs[-1].dims[-1]
    pattern = np.random.default_rng(0).normal(0, 1, (model.config.num_mem_tokens, width))
    pattern = (3e-5 * (pattern - pattern.mean(axis=1, keepdims=True))).astype(np.float32)
    damaged.graph.initializer.append(numpy_helper.from_array(pattern, "drift"))
    damaged.graph.node.append(helper.make_node("Add", ["new_memory_exact", "drift"], ["new_memory"]))
    with pytest.raises(ValidationError) as error:
        _validate(model, damaged, spec, tmp_path)
    misses = error.value.misses
    assert misses and all("chained" in miss for miss in misses), misses[:3]
    chained = error.value.report["graphs"]["step"]["chained"]["new_memory"]["max_abs"]
    forced = error.value.report["graphs"]["step"]["teacher_forced"]["new_memory"]["max_abs"]
    assert chained[-1] > 3 * chained[0] and chained[-1] > 3 * max(forced)  # it grows, and only when chained


def test_no_decisive_position_is_not_reported_as_agreement(tmp_path):
    """A model whose logits are all equal (zero output embeddings): no position is decisive,
    so the decisive agreement is null, never 1.0, and the summary says it was not judged."""
    torch.manual_seed(0)
    model = build_model(tiny_config("gpt2", num_mem_tokens=2, segment_size=8))
    with torch.no_grad():
        model.model.get_output_embeddings().weight.zero_()  # tied: the input embeddings too
    report = export_model(model, tmp_path / "flat", ExportOptions(plan=ValidationPlan(segments=2), generation=False)
                          ).manifest["validation"]
    agreement = report["graphs"]["step"]["argmax_agreement"]
    assert agreement["decisive_positions"] == 0 and agreement["teacher_forced_decisive"] is None
    assert any("argmax not judged" in line for line in summary_lines(report))


PEAK_SCRIPT = """
import sys, torch
from rmt_model import load_checkpoint
from rmt_runtime.bundle import Bundle
from rmt_export.validate import ValidationPlan, validate_graphs
torch.set_num_threads(1)
model = load_checkpoint(sys.argv[1])
bundle = Bundle.load(sys.argv[2])
graphs = {name: (str(bundle.graph_path(name)), bundle.graph_spec(name)) for name in ("step", "ingest")}
validate_graphs(model, graphs, "fp32", ValidationPlan(segments=int(sys.argv[3])))
peak = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
print(int(peak) * 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_validation_peak_memory_does_not_grow_with_the_number_of_segments(shared_once):
    """A vocabulary of 32,000 makes a segment's full logits 8 MB ([2, 64, 32000] float32): keeping
    them per segment, as the validator once did three times over, would add ~0.8 GB between 4
    and 32 segments. The process's peak RSS must stay within 10%."""
    torch.manual_seed(0)
    model = build_model(tiny_config("gpt2", num_mem_tokens=4, segment_size=56, vocab_size=32000))
    checkpoint = shared_once("ckpt/large-vocab.pt", lambda path: save_checkpoint(model, path))
    options = ExportOptions(plan=ValidationPlan(segments=2), generation=False, validate=False)
    bundle = shared_once("bundles/large-vocab", lambda path: export_model(model, path, options))
    peaks = {}
    for segments in (4, 32):
        result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(checkpoint), str(bundle), str(segments)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        peaks[segments] = int(result.stdout.strip().splitlines()[-1])
    assert peaks[32] <= 1.10 * peaks[4], {k: f"{v / 2**20:.0f} MiB" for k, v in peaks.items()}


@pytest.mark.parametrize("shape", [(2, 37, 1000), (3, 70000), (70001,), (1, 1, 5)])
def test_the_blockwise_comparison_equals_the_whole_array_one(shape, monkeypatch):
    """The validator compares a segment's logits in blocks (a GB at a 128k vocabulary); with
    blocks far smaller than the arrays it must give what whole-array numpy gives."""
    import rmt_export.validate as validate

    monkeypatch.setattr(validate, "CHUNK_ELEMENTS", 4096)
    rng = np.random.default_rng(0)
    expected = rng.standard_normal(shape).astype(np.float32) * 7
    got = expected + rng.standard_normal(shape).astype(np.float32) * 1e-3
    assert validate._max_abs_diff(got, expected) == float(np.abs(got.astype(np.float64) - expected).max())
    assert validate._abs_max(expected) == float(np.abs(expected).max())
    top2 = np.sort(expected, axis=-1)[..., -2:]
    np.testing.assert_array_equal(validate._top2_margin(expected), top2[..., 1] - top2[..., 0])
    got.flat[-1] = np.nan  # in the last block
    assert validate._max_abs_diff(got, expected) == float("inf")
    got.flat[-1], got.flat[0] = 0.0, np.inf  # in the first
    assert validate._max_abs_diff(got, expected) == float("inf")
    assert np.isnan(validate._abs_max(np.array([1.0, np.nan, -3.0])))
    assert validate._abs_max(np.array([-5.0, 2.0])) == 5.0


def test_pytorch_runs_each_segment_once_for_both_segment_graphs(bundle_factory, monkeypatch):
    """The reference (and its perturbed twin) run once per segment: the ingest graph reuses the
    step graph's pass, whose small outputs (memory, last-token logits) are kept. Running PyTorch
    again for ingest would add a third of the validation time at real size."""
    model, result = bundle_factory("gpt2", "fp32")
    bundle = Bundle.load(result.path)
    graphs = {name: (str(bundle.graph_path(name)), bundle.graph_spec(name)) for name in ("step", "ingest")}
    calls = []
    step = model.step
    monkeypatch.setattr(model, "step", lambda *args, **kwargs: calls.append(1) or step(*args, **kwargs))
    validate_graphs(model, graphs, "fp32", ValidationPlan(segments=3))
    assert len(calls) == 2 * 3  # reference + perturbed twin, per segment, for both graphs together
