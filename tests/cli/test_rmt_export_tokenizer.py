"""Tokenizers by default (issue 21): rmt-export ships the tokenizer beside the checkpoint, so
that rmt-run --text-file and rmt-generate --prompt read text from the bundle with no flag;
--tokenizer DIR picks another, --no-tokenizer none, and the log says which in one line.
A machine without torch gets one line naming the export extra."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rmt_export.cli import main
from rmt_export.exporter import find_tokenizer
from rmt_runtime.bundle import Bundle
from samples.task import make_example
from tests.cli.support import one_line_error
from tests.without_modules import run_without

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "samples" / "keyrecall" / "model.pt"
SAMPLE_TOKENIZER = SAMPLE.parent / "tokenizer.json"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tokenizer_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("[tokenizer]")]


def command(name: str) -> list[str]:
    """The installed console script, as a user runs it."""
    return [str(Path(sys.executable).with_name(name))]


# ---- the shipped sample: export with no flag, then text in and text out ------------------------
@pytest.fixture(scope="module")
def sample_export(tmp_path_factory):
    """(bundle, rmt-export's result) for the plain command on the shipped sample."""
    out = tmp_path_factory.mktemp("sample") / "keyrecall"
    result = run("--ckpt", SAMPLE, "--out", out, "--segments", 2)
    assert result.exit_code == 0, result.output
    return out, result


def test_the_sample_export_ships_the_tokenizer_beside_the_checkpoint(sample_export):
    bundle, result = sample_export
    assert tokenizer_lines(result) == [f"[tokenizer] tokenizer.json from {SAMPLE.parent} (beside the checkpoint)"]
    manifest = Bundle.load(bundle).manifest  # hashes checked: tokenizer.json is a listed, hashed file
    assert manifest["tokenizer"] == ["tokenizer.json"] and "tokenizer.json" in manifest["files"]
    assert (bundle / "tokenizer.json").read_bytes() == SAMPLE_TOKENIZER.read_bytes()


def test_the_samples_tokenizer_is_what_its_training_script_writes(tmp_path):
    from samples.byte_tokenizer import save_tokenizer

    assert save_tokenizer(tmp_path).read_bytes() == SAMPLE_TOKENIZER.read_bytes()


def test_rmt_run_reads_a_text_file_through_the_shipped_tokenizer(sample_export, tmp_path):
    bundle, _ = sample_export
    text, answer = make_example(np.random.default_rng(21), segments=4, segment_size=32)
    document = tmp_path / "document.txt"
    document.write_bytes(text)
    result = subprocess.run(command("rmt-run") + ["--bundle", str(bundle), "--text-file", str(document), "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tokens"] == len(text)  # byte-level: one token per byte
    assert report["top_k"][0]["text"] == chr(answer)  # the key, read back from the first segment's memory


def test_rmt_generate_answers_a_text_prompt_through_the_shipped_tokenizer(sample_export):
    bundle, _ = sample_export
    text, answer = make_example(np.random.default_rng(22), segments=3, segment_size=32)
    result = subprocess.run(command("rmt-generate") + ["--bundle", str(bundle), "--prompt", text.decode("ascii"),
                                                       "--max-new-tokens", "2", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["prompt_tokens"] == len(text) and report["text"][0] == chr(answer)


def test_text_without_the_tokenizers_library_names_the_text_extra(sample_export, monkeypatch):
    from rmt_runtime.cli import main as rmt_run

    bundle, _ = sample_export
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # not installed
    result = CliRunner().invoke(rmt_run, ["--bundle", str(bundle), "--text", "key=A;?key="])
    one_line_error(result, 'reading text needs the tokenizers library: pip install "rmt-edge[text]"', "--ids")


# ---- where the tokenizer comes from --------------------------------------------------------------
@pytest.fixture
def beside(tiny_checkpoint, tmp_path):
    """A copy of the tiny checkpoint in a folder holding the sample's tokenizer.json."""
    ckpt, _ = tiny_checkpoint
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(ckpt, folder / "model.pt")
    shutil.copy(SAMPLE_TOKENIZER, folder / "tokenizer.json")
    return folder / "model.pt"


def test_json_output_stays_one_document_and_names_the_tokenizer(beside, tmp_path):
    result = run("--ckpt", beside, "--out", tmp_path / "b", "--segments", 2, "--no-generation", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # the whole of stdout: the log went to stderr
    assert data["ok"] is True and data["tokenizer"] == ["tokenizer.json"]
    assert tokenizer_lines(result) == [f"[tokenizer] tokenizer.json from {beside.parent} (beside the checkpoint)"]
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == SAMPLE_TOKENIZER.read_bytes()


def test_an_explicit_tokenizer_wins_over_the_one_beside(beside, tmp_path):
    other = tmp_path / "wordpiece"
    other.mkdir()
    (other / "vocab.txt").write_text("[PAD]\n[UNK]\nmemory\n")
    result = run("--ckpt", beside, "--out", tmp_path / "b", "--segments", 2, "--no-generation",
                 "--tokenizer", other)
    assert result.exit_code == 0, result.output
    assert tokenizer_lines(result) == [
        f"[tokenizer] vocab.txt from {other} (given with --tokenizer); no tokenizer.json, which rmt-run --text "
        "and rmt-generate --prompt read"]
    assert Bundle.load(tmp_path / "b").manifest["tokenizer"] == ["vocab.txt"]
    assert not (tmp_path / "b" / "tokenizer.json").exists()


def test_no_tokenizer_leaves_it_out(beside, tmp_path):
    result = run("--ckpt", beside, "--out", tmp_path / "b", "--segments", 2, "--no-generation", "--no-tokenizer")
    assert result.exit_code == 0, result.output
    assert tokenizer_lines(result) == ["[tokenizer] none shipped (--no-tokenizer): the bundle takes token ids only"]
    assert Bundle.load(tmp_path / "b").manifest["tokenizer"] is None
    assert not (tmp_path / "b" / "tokenizer.json").exists()


def test_tokenizer_and_no_tokenizer_together_are_refused(beside, tmp_path):
    one_line_error(run("--ckpt", beside, "--out", tmp_path / "b", "--tokenizer", beside.parent, "--no-tokenizer"),
                   "give --tokenizer DIR or --no-tokenizer, not both")
    assert not (tmp_path / "b").exists()


def test_find_tokenizer_looks_beside_the_checkpoint_then_the_backbone_config(tmp_path):
    ckpt_dir, config_dir = tmp_path / "hub", tmp_path / "gpt2"
    ckpt_dir.mkdir()
    config_dir.mkdir()
    (ckpt_dir / "model.safetensors").write_bytes(b"")
    config = config_dir / "config.json"
    config.write_text("{}")
    assert find_tokenizer(ckpt_dir, config) is None
    (config_dir / "vocab.json").write_text("{}")
    assert find_tokenizer(ckpt_dir, config) == (config_dir, "beside the backbone config")
    (ckpt_dir / "tokenizer_config.json").write_text("{}")  # the checkpoint's place comes first...
    assert find_tokenizer(ckpt_dir, config) == (ckpt_dir, "beside the checkpoint")
    assert find_tokenizer(ckpt_dir / "model.safetensors") == (ckpt_dir, "beside the checkpoint")
    (config_dir / "tokenizer.json").write_text("{}")  # ...unless only the other one has what the runtime reads
    assert find_tokenizer(ckpt_dir, config) == (config_dir, "beside the backbone config")
    (ckpt_dir / "tokenizer.json").write_text("{}")
    assert find_tokenizer(ckpt_dir, config) == (ckpt_dir, "beside the checkpoint")


# ---- without torch ------------------------------------------------------------------------------
@pytest.mark.parametrize("as_json", [False, True])
def test_without_torch_rmt_export_is_one_line_naming_the_export_extra(tmp_path, as_json):
    args = ["--ckpt", SAMPLE, "--out", tmp_path / "b"] + (["--json"] if as_json else [])
    result = run_without(("torch",), "from rmt_export.cli import main\nmain(prog_name='rmt-export')\n", args)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        'Error: rmt-export needs the export extra, and torch is not installed here: pip install "rmt-edge[export]"']
    if as_json:
        assert json.loads(result.stdout)["ok"] is False
    else:
        assert result.stdout == ""
    assert not (tmp_path / "b").exists()


def test_without_torch_rmt_export_help_still_works():
    result = run_without(("torch",), "from rmt_export.cli import main\nmain(prog_name='rmt-export')\n", ["--help"])
    assert result.returncode == 0, result.stderr
    assert "--no-tokenizer" in result.stdout
