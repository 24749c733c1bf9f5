"""The export's memory estimate: a model that needs more than the machine has is refused up
front with the figures, nothing written; the estimate is what was measured at real size."""
import pytest

import rmt_export.exporter as exporter
from rmt_export.errors import ExportError
from rmt_export.exporter import ExportOptions, export_model
from rmt_export.memory import GiB, estimate_export_memory
from rmt_export.validate import ValidationPlan


def test_an_export_that_needs_more_memory_than_is_available_is_refused_before_any_work(make_model, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.setattr(exporter, "memory_for_export", lambda: 200 * 2 ** 20)
    said = []
    with pytest.raises(ExportError, match=r"this export needs about 1\.6 GiB of memory \(trace: process 0\.6, .*exporter 1\.0.*\) and "
                                          r"0\.2 GiB is available: .* --no-memory-check"):
        export_model(make_model("gpt2"), tmp_path / "b", ExportOptions(plan=ValidationPlan(segments=2)),
                     lambda stage, detail: said.append((stage, detail)))
    assert said == [("memory", said[0][1])] and "0.2 GiB available" in said[0][1]  # nothing traced
    assert list(tmp_path.iterdir()) == []


def test_without_the_check_the_same_export_runs(make_model, tmp_path, monkeypatch):
    monkeypatch.setattr(exporter, "memory_for_export", lambda: 200 * 2 ** 20)
    options = ExportOptions(plan=ValidationPlan(segments=2), generation=False, check_memory=False)
    assert (export_model(make_model("gpt2"), tmp_path / "b", options).path / "manifest.json").is_file()


@pytest.mark.parametrize("precision, measured", [("fp32", {"trace": 2.76, "validate": 3.04}),
                                                  ("fp16", {"trace": 2.09, "validate": 2.88})])
def test_the_estimate_covers_the_measured_gpt2_small_export(precision, measured):
    """docs/BENCHMARKS.md, benchmarks/real_scale.py: peak RSS per stage of the GPT-2-small-shaped
    export (124.4M parameters, M=16, segment 512, vocab 50257, batch 2). No stage's estimate
    may be below what was measured, and the peak not far above it (within 15%)."""
    estimate = estimate_export_memory(124_439_808 + 16 * 768, precision, "decoder", 2, 512, 50257, True)
    for stage, peak in measured.items():
        assert peak <= sum(estimate.stages[stage].values()) / GiB, stage
    assert max(measured.values()) <= estimate.total / GiB <= 1.15 * max(measured.values())
