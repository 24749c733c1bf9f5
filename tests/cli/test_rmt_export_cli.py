"""rmt-export through click's CliRunner: success, --json, and every bad input as one line."""
import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rmt_export.cli import main
from rmt_runtime.bundle import Bundle
from tests.cli.support import one_line_error


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_export_succeeds_and_prints_the_bundle_path(tiny_checkpoint, tmp_path):
    ckpt, _ = tiny_checkpoint
    out = tmp_path / "bundle"
    result = run("--ckpt", ckpt, "--out", out, "--segments", 4)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert "[validate] 4 chained segments" in result.stderr
    assert Bundle.load(out).manifest["validation"]["passed"] is True
    assert Bundle.load(out).has_generation and "prefill.onnx, decode.onnx" in result.stderr  # the default
    # Nothing beside this checkpoint: the log says where it looked, the bundle takes ids.
    assert f"[tokenizer] none found beside the checkpoint ({ckpt.parent}): the bundle takes token ids" in result.stderr
    assert Bundle.load(out).manifest["tokenizer"] is None


def test_json_output_and_default_out_beside_the_checkpoint(tiny_checkpoint, tmp_path):
    ckpt, _ = tiny_checkpoint
    local = tmp_path / "model.pt"
    local.write_bytes(ckpt.read_bytes())
    result = run("--no-generation", "--ckpt", local, "--fp16", "--segments", 3, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["precision"] == "fp16"
    assert data["bundle"] == str(tmp_path / "model-fp16")
    assert set(data["validation"]) == {"step", "ingest"}  # + prefill/decode: in the report's "generation"
    assert set(data["seconds"]) == {"load", "trace", "validate", "save"}


def test_engine_builds_the_segment_graphs_after_the_export(tiny_checkpoint, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    ckpt, _ = tiny_checkpoint
    out = tmp_path / "bundle"
    result = run("--ckpt", ckpt, "--out", out, "--segments", 3, "--no-generation", "--engine",
                 "--engine-builder", "tensorrt_rtx", "--max-batch", 2, "--json")
    assert result.exit_code == 0, result.output
    engines = json.loads(result.stdout)["engines"]
    assert set(engines) == {"step", "ingest"}
    assert all(path.endswith(".plan") and (out / "engines").is_dir() and Path(path).stat().st_size > 0
               for path in engines.values())


def test_engine_with_a_missing_builder_fails_before_exporting(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # not importable, on GPU machines too
    ckpt, _ = tiny_checkpoint
    out = tmp_path / "bundle"
    one_line_error(run("--ckpt", ckpt, "--out", out, "--engine"), "tensorrt module is not importable here")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_no_validate_writes_a_bundle_without_a_report(tiny_checkpoint, tmp_path):
    ckpt, _ = tiny_checkpoint
    result = run("--no-generation", "--ckpt", ckpt, "--out", tmp_path / "b", "--no-validate")
    assert result.exit_code == 0, result.output
    assert Bundle.load(tmp_path / "b").manifest["validation"] is None
    assert "validation skipped" in result.stderr


def test_missing_checkpoint(tmp_path):
    result = run("--ckpt", tmp_path / "absent.pt")
    assert result.exit_code == 2 and "does not exist" in result.output


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    one_line_error(run("--ckpt", bad, "--out", tmp_path / "b"), "not a readable PyTorch checkpoint")
    assert not (tmp_path / "b").exists()


def _edited_checkpoint(ckpt, tmp_path, **config_changes):
    payload = torch.load(ckpt, weights_only=True)
    config = json.loads(payload["config"])
    for key, value in config_changes.items():
        if key == "model_type":
            config["backbone"]["model_type"] = value
        else:
            config[key] = value
    payload["config"] = json.dumps(config)
    path = tmp_path / "edited.pt"
    torch.save(payload, path)
    return path


def test_unknown_backbone_family(tiny_checkpoint, tmp_path):
    ckpt, _ = tiny_checkpoint
    edited = _edited_checkpoint(ckpt, tmp_path, model_type="not_a_family")
    one_line_error(run("--ckpt", edited, "--out", tmp_path / "b"), "unknown backbone family 'not_a_family'")


def test_segment_beyond_backbone_positions(tiny_checkpoint, tmp_path):
    ckpt, _ = tiny_checkpoint
    edited = _edited_checkpoint(ckpt, tmp_path, segment_size=100)
    one_line_error(run("--ckpt", edited, "--out", tmp_path / "b"),
                    "segment_size 100 + 2 x 4 memory tokens = 108 positions", "only 64")


def test_reference_checkpoint_without_backbone_config(tiny_checkpoint, tmp_path):
    _, model = tiny_checkpoint
    reference = tmp_path / "rmt.bin"
    torch.save({("memory_cell.memory" if k == "memory" else f"memory_cell.{k}"): v
                for k, v in model.state_dict().items()}, reference)
    one_line_error(run("--ckpt", reference, "--out", tmp_path / "b"), "reference RMT code", "--backbone-config")


def test_reference_checkpoint_with_its_layout_exports(tiny_checkpoint, tmp_path):
    _, model = tiny_checkpoint
    reference = tmp_path / "rmt.bin"
    torch.save({("memory_cell.memory" if k == "memory" else f"memory_cell.{k}"): v
                for k, v in model.state_dict().items()}, reference)
    (tmp_path / "config.json").write_text(json.dumps(model.config.backbone))
    result = run("--no-generation", "--ckpt", reference, "--out", tmp_path / "b", "--segments", 2,
                 "--backbone-config", tmp_path / "config.json", "--num-mem-tokens", 4, "--segment-size", 16)
    assert result.exit_code == 0, result.output
    assert Bundle.load(tmp_path / "b").num_mem_tokens == 4


def test_layout_options_go_together(tiny_checkpoint, tmp_path):
    ckpt, _ = tiny_checkpoint
    one_line_error(run("--ckpt", ckpt, "--num-mem-tokens", 4), "go together")


def test_unwritable_out(tiny_checkpoint, tmp_path):
    ckpt, _ = tiny_checkpoint
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(run("--ckpt", ckpt, "--out", blocker / "bundle"), f"{blocker} is a file, not a directory")
    one_line_error(run("--ckpt", ckpt, "--out", blocker), "is an existing file")


def test_existing_out_needs_force(tiny_checkpoint, tmp_path):
    ckpt, _ = tiny_checkpoint
    out = tmp_path / "b"
    assert run("--no-generation", "--ckpt", ckpt, "--out", out, "--segments", 2).exit_code == 0
    one_line_error(run("--no-generation", "--ckpt", ckpt, "--out", out, "--segments", 2), "already exists; pass --force")
    result = run("--no-generation", "--ckpt", ckpt, "--out", out, "--segments", 2, "--force")
    assert result.exit_code == 0, result.output


def test_json_error_is_machine_readable(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_text("nope")
    result = run("--ckpt", bad, "--out", tmp_path / "b", "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["ok"] is False and "not a readable PyTorch checkpoint" in data["error"]


def test_verbose_shows_the_traceback(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_text("nope")
    result = run("--ckpt", bad, "--out", tmp_path / "b", "--verbose")
    assert result.exit_code == 1 and "Traceback" in result.stderr


@pytest.mark.parametrize("option", ["--help", "-h"])
def test_help_shows_examples(option):
    result = run(option)
    assert result.exit_code == 0 and "rmt-export --ckpt model.pt --fp16" in result.output


def test_tokenizer_files_ship_in_the_bundle_with_their_hashes(tiny_checkpoint, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.train_from_iterator(["memory tokens carry state across segments"] * 4,
                                  trainers.BpeTrainer(vocab_size=80, show_progress=False))
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tokenizer.save(str(tok_dir / "tokenizer.json"))
    ckpt, _ = tiny_checkpoint
    result = run("--no-generation", "--ckpt", ckpt, "--out", tmp_path / "b", "--segments", 2, "--tokenizer", tok_dir)
    assert result.exit_code == 0, result.output
    bundle = Bundle.load(tmp_path / "b")
    assert bundle.manifest["tokenizer"] == ["tokenizer.json"]
    assert "tokenizer.json" in bundle.manifest["files"]
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    assert oct((tmp_path / "b").stat().st_mode & 0o777) != oct(0o700)


def test_tokenizer_dir_without_tokenizer_files_is_refused(tiny_checkpoint, tmp_path):
    ckpt, _ = tiny_checkpoint
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(run("--ckpt", ckpt, "--out", tmp_path / "b", "--tokenizer", empty), "holds no tokenizer files")


def test_validation_on_the_users_own_text_is_recorded_and_bad_text_is_refused_before_work(tmp_path):
    """--validation-text: the sample's tokenizer reads the text; the report says what the inputs were."""
    sample = Path(__file__).resolve().parents[2] / "samples" / "keyrecall" / "model.pt"
    text = tmp_path / "task.txt"
    text.write_text("key=K;" + "the quick brown fox jumps over a lazy dog " * 8)   # 342 bytes: 4 segments need 226
    out = tmp_path / "bundle"
    result = run("--ckpt", sample, "--out", out, "--validation-text", text, "--segments", 4, "--no-generation")
    assert result.exit_code == 0, result.output
    report = Bundle.load(out).manifest["validation"]
    assert report["passed"] and report["inputs"] == "text task.txt (342 tokens)"
    short = tmp_path / "short.txt"
    short.write_text("key=K;" * 10)
    one_line_error(run("--ckpt", sample, "--out", tmp_path / "b2", "--validation-text", short, "--segments", 4),
                   "needs 226 tokens; text short.txt (60 tokens) gives 60")
    assert not (tmp_path / "b2").exists()
    one_line_error(run("--ckpt", sample, "--out", tmp_path / "b3", "--validation-text", text, "--no-validate"),
                   "--validation-text with --no-validate")
    one_line_error(run("--ckpt", sample, "--out", tmp_path / "b4", "--validation-text", text, "--no-tokenizer"),
                   "needs the bundle's tokenizer.json")
