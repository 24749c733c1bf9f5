"""rmt-export --bf16: the fp32 graphs validated a second time, as the openvino backend computes
them in bf16 (real OpenVINO, real PyTorch, 32 chained segments), with the report in the
manifest; requests that cannot be met are refused before any work."""
import json

import pytest
from click.testing import CliRunner

from rmt_export import validate
from rmt_export.cli import main
from rmt_export.errors import ExportError, ValidationError
from rmt_export.exporter import ExportOptions, export_model
from rmt_export.validate import Tolerance, ValidationPlan
from rmt_runtime import RMTRuntime
from tests.cli.support import one_line_error

openvino = pytest.importorskip("openvino")
if "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
    pytest.skip("this CPU has no bf16 instructions (AVX-512 BF16 or AMX)", allow_module_level=True)


def test_bf16_validation_is_in_the_manifest_and_measures_bf16_not_fp32(make_model, tmp_path):
    model = make_model("gpt2", num_mem_tokens=4, segment_size=16, initializer_range=0.2)
    result = export_model(model, tmp_path / "b", ExportOptions(bf16=True, plan=ValidationPlan(segments=32)))
    report = result.manifest["validation"]
    assert result.manifest["precision"] == "fp32"
    bf16 = report["bf16"]
    assert bf16["precision"] == "bf16" and bf16["segments"] == 32 and bf16["misses"] == []
    assert set(bf16["graphs"]) == {"step", "ingest"} and set(bf16["generation"]) >= {"prefill", "decode"}
    for graph in ("step", "ingest"):
        fp32_worst, bf16_worst = report["graphs"][graph]["worst"], bf16["graphs"][graph]["worst"]
        # bf16's rounding is ~4e-3 relative: its figures sit far above fp32's (~1e-6).
        assert all(bf16_worst[key] > 30 * fp32_worst[key] for key in fp32_worst), (fp32_worst, bf16_worst)
    assert bf16["tolerance"]["rtol"] == validate.TOLERANCES["bf16"].rtol
    runtime = RMTRuntime.load(result.path, backend="openvino", precision="bf16")
    assert runtime.picked == "openvino/CPU (bf16) (asked for)"  # validated: no note


def test_a_bf16_miss_fails_the_export_saying_it_was_bf16_and_writes_nothing(make_model, tmp_path, monkeypatch):
    monkeypatch.setitem(validate.TOLERANCES, "bf16", Tolerance(atol=1e-7, rtol=1e-7, perturbation=4e-3))
    model = make_model("gpt2", num_mem_tokens=4, segment_size=16)
    with pytest.raises(ValidationError) as caught:
        export_model(model, tmp_path / "b", ExportOptions(bf16=True, plan=ValidationPlan(segments=3),
                                                           generation=False))
    assert caught.value.misses and all(m.startswith("computed in bf16 by OpenVINO (--bf16): ")
                                       for m in caught.value.misses)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("options, expected", [
    (dict(precision="int8", bf16=True), "needs an fp32 export with validation on (got precision int8)"),
    (dict(precision="fp16", bf16=True), "(got precision fp16)"),
    (dict(bf16=True, validate=False), "(got precision fp32, validation off)"),
])
def test_bf16_without_an_fp32_validated_export_is_refused_before_work(options, expected):
    with pytest.raises(ExportError, match="bf16 is how the openvino backend computes an fp32 bundle") as caught:
        ExportOptions(**options).check()
    assert expected in str(caught.value)


def test_cli_bf16_with_int8_is_one_error_before_export(tiny_checkpoint, tmp_path):
    ckpt, _ = tiny_checkpoint
    result = CliRunner().invoke(main, ["--ckpt", str(ckpt), "--int8", "--bf16", "--out", str(tmp_path / "b")])
    one_line_error(result, "--bf16 validates that", "got precision int8")
    assert not (tmp_path / "b").exists()


def test_cli_bf16_without_openvino_names_the_install(tiny_checkpoint, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)
    ckpt, _ = tiny_checkpoint
    result = CliRunner().invoke(main, ["--ckpt", str(ckpt), "--bf16", "--out", str(tmp_path / "b"), "--json"])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["ok"] is False and "--bf16: the openvino backend needs OpenVINO: pip install openvino" in data["error"]
    assert not (tmp_path / "b").exists()
