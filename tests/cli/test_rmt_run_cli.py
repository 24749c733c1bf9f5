"""rmt-run through click's CliRunner (and once as a real process without torch) on exported bundles."""
import json
import os
import subprocess
import sys
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rmt_export.exporter import ExportOptions, export_model
from rmt_export.validate import ValidationPlan
from rmt_runtime import RMTRuntime
from rmt_runtime.cli import main
from tests.cli.support import one_line_error

SEGMENT = 16
IDS = np.random.default_rng(7).integers(0, 97, size=3 * SEGMENT + 5).astype(np.int64)  # 4 segments


def run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


@lru_cache(maxsize=None)
def _runtime(path: str) -> RMTRuntime:
    return RMTRuntime.load(path, backend="onnxruntime")


def reference(path, ids):
    return _runtime(str(path)).run(np.asarray(ids, np.int64)[None])


def top_ids(logits, k=5):
    return np.argsort(-logits[0], kind="stable")[:k].tolist()


def printed(result):
    """(id, logit) of each top-k line on stdout."""
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()]
    return [int(r[0]) for r in rows], [float(r[1]) for r in rows]


@pytest.fixture(scope="module")
def gpt2(bundle_factory):
    return bundle_factory("gpt2", "fp32")[1].path


@pytest.fixture(scope="module")
def bert(bundle_factory):
    return bundle_factory("bert", "fp32")[1].path


@pytest.fixture
def ids_npy(tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, IDS)
    return path


@pytest.fixture(scope="module")
def tokenized(tiny_checkpoint, tmp_path_factory, shared_once):
    """(bundle shipping a byte-level BPE tokenizer.json, that Tokenizer, the checkpoint it was exported from).

    One export serves the tokenizer tests and the torch backend (which needs the checkpoint).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = ["the memory tokens carry the state from one segment to the next"] * 20
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=90, show_progress=False))
    assert tokenizer.get_vocab_size() <= 97
    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(str(directory / "tokenizer.json"))
    checkpoint, model = tiny_checkpoint
    out = shared_once("gpt2-tok", lambda path: export_model(
        model, path, ExportOptions(tokenizer_dir=directory, plan=ValidationPlan(segments=2), generation=False)))
    return out, tokenizer, checkpoint


# ---- inputs and top-k --------------------------------------------------------------------------
def test_ids_from_npy_prints_the_runtime_top_k(gpt2, ids_npy):
    result = run("--bundle", gpt2, "--ids", ids_npy)
    assert result.exit_code == 0, result.output
    expected = reference(gpt2, IDS).last_logits
    ids, logits = printed(result)
    assert ids == top_ids(expected)
    np.testing.assert_allclose(logits, expected[0, ids], atol=1e-4)
    assert "backend: onnxruntime/CPUExecutionProvider" in result.stderr


def test_ids_from_a_text_file_and_from_stdin_agree_with_npy(gpt2, ids_npy, tmp_path):
    text_ids = tmp_path / "ids.txt"
    text_ids.write_text(" ".join(map(str, IDS[:20])) + "\n" + "\t".join(map(str, IDS[20:])) + "\n")
    from_npy = run("--bundle", gpt2, "--ids", ids_npy, "--top-k", 8)
    from_text = run("--bundle", gpt2, "--ids", text_ids, "--top-k", 8)
    from_stdin = run("--bundle", gpt2, "--ids", "-", "--top-k", 8, input=text_ids.read_text())
    implicit_stdin = run("--bundle", gpt2, "--top-k", 8, input=text_ids.read_text())  # no tokenizer: ids
    npy_on_stdin = run("--bundle", gpt2, "--ids", "-", "--top-k", 8, input=ids_npy.read_bytes())
    for result in (from_npy, from_text, from_stdin, implicit_stdin, npy_on_stdin):
        assert result.exit_code == 0, result.output
        assert result.stdout == from_npy.stdout
    assert printed(from_npy)[0] == top_ids(reference(gpt2, IDS).last_logits, 8)


def test_json_fields(gpt2, ids_npy):
    result = run("--bundle", gpt2, "--ids", ids_npy, "--json", "--top-k", 3)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    expected = reference(gpt2, IDS)
    assert data["ok"] is True and data["kind"] == "decoder"
    assert data["backend"].startswith("onnxruntime/CPUExecutionProvider")
    assert data["tokens"] == len(IDS) and data["segments"] == 4 and data["pending"] == 0
    assert data["memory_shape"] == [1, 4, 32]
    assert data["memory_norm"] == pytest.approx(float(np.linalg.norm(expected.memory)), rel=1e-6)
    assert [e["id"] for e in data["top_k"]] == top_ids(expected.last_logits, 3)
    assert data["top_k"][0]["logit"] == pytest.approx(float(expected.last_logits.max()), abs=1e-5)
    assert data["seconds"] > 0 and data["tokens_per_second"] > 0
    assert data["state"] is None
    assert "segments" not in result.stderr  # no progress bar with --json


def test_progress_bar_only_for_several_segments(gpt2, ids_npy, tmp_path):
    assert "running 4 segments" in run("--bundle", gpt2, "--ids", ids_npy).stderr
    assert "running" not in run("--bundle", gpt2, "--ids", ids_npy, "--no-progress").stderr
    short = tmp_path / "short.txt"
    short.write_text("1 2 3")
    assert "running" not in run("--bundle", gpt2, "--ids", short).stderr


def test_save_outputs_equal_the_runtime_run(gpt2, ids_npy, tmp_path):
    out = tmp_path / "sub" / "out"  # no .npz suffix: written as given
    result = run("--bundle", gpt2, "--ids", ids_npy, "--save-outputs", out)
    assert result.exit_code == 0, result.output
    expected = reference(gpt2, IDS)
    with np.load(out) as saved:
        assert set(saved.files) == {"memory", "last_logits"}
        assert np.array_equal(saved["memory"], expected.memory)
        assert np.array_equal(saved["last_logits"], expected.last_logits)


# ---- streaming state --------------------------------------------------------------------------
def test_state_over_three_invocations_equals_one_run(gpt2, tmp_path):
    state = tmp_path / "seq.npz"
    total = 0
    for index, size in enumerate((10, 20, 23)):
        chunk = tmp_path / f"chunk{index}.npy"
        np.save(chunk, IDS[total:total + size])
        total += size
        out = tmp_path / f"out{index}.npz"
        result = run("--bundle", gpt2, "--ids", chunk, "--state", state, "--save-outputs", out, "--json")
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["resumed"] is (index > 0) and data["state"] == str(state)
        assert data["tokens"] == size and data["tokens_seen"] == total
        assert data["segments"] == total // SEGMENT and data["pending"] == total % SEGMENT
        expected = reference(gpt2, IDS[:total])  # peek == run over the same tokens
        with np.load(out) as saved:
            assert np.array_equal(saved["memory"], expected.memory), f"after {total} tokens"
            assert np.array_equal(saved["last_logits"], expected.last_logits)
        assert [e["id"] for e in data["top_k"]] == top_ids(expected.last_logits)
    assert total == len(IDS)


def test_state_from_another_bundle_is_refused(gpt2, bundle_factory, tmp_path):
    llama = bundle_factory("llama", "fp32")[1].path
    state = tmp_path / "seq.npz"
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 3 4 5")
    assert run("--bundle", gpt2, "--ids", ids, "--state", state).exit_code == 0
    before = state.read_bytes()
    one_line_error(run("--bundle", llama, "--ids", ids, "--state", state), str(gpt2), str(llama),
                   "only continues on its own bundle")
    assert state.read_bytes() == before


def test_ctrl_c_exits_130_and_keeps_the_state(gpt2, tmp_path, monkeypatch):
    state = tmp_path / "seq.npz"
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 3 4 5")
    assert run("--bundle", gpt2, "--ids", ids, "--state", state).exit_code == 0
    before = state.read_bytes()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(RMTRuntime, "feed", interrupt)
    result = run("--bundle", gpt2, "--ids", ids, "--state", state)
    assert result.exit_code == 130
    assert "interrupted: nothing was written" in result.stderr and str(state) in result.stderr
    assert state.read_bytes() == before


def test_finish_runs_what_a_stopped_feed_left_pending(gpt2, tmp_path):
    """A batch of two stopped after one segment (as a signal stops rmt-run): --finish runs the rest
    and prints what each row gives alone; the partial segments stay pending, as in any --state run."""
    rt, state_file, out = _runtime(str(gpt2)), tmp_path / "s.npz", tmp_path / "out.npz"
    rows = [IDS, IDS[:37]]
    state = rt.new_state(2)
    asked = iter([False, True])  # run one segment, then stop
    assert rt.feed(state, rows, stop=lambda: next(asked)) is False
    pending = sum(len(p) for p in state.pending)
    rt.save_state(state, state_file)
    result = run("--bundle", gpt2, "--state", state_file, "--finish", "--save-outputs", out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["finish"] is True and data["batch"] == 2 and data["tokens"] == pending == len(IDS) + 37 - 2 * SEGMENT
    assert [(r["tokens_seen"], r["segments"], r["pending"]) for r in data["rows"]] == [(53, 3, 5), (37, 2, 5)]
    with np.load(out) as saved:
        for row, ids in enumerate(rows):  # batched rows equal each row alone (1e-5: other matmul shapes)
            expected = reference(gpt2, ids)
            np.testing.assert_allclose(saved["memory"][row], expected.memory[0], atol=1e-5)
            np.testing.assert_allclose(saved["last_logits"][row], expected.last_logits[0], atol=1e-5)


@pytest.mark.parametrize("extra, fragment", [
    (["--ids", "IDS"], "--finish reads no input (it runs what --state"),
    ([], "no such file, so nothing to finish"),
])
def test_finish_refuses_input_and_a_missing_state(gpt2, ids_npy, tmp_path, extra, fragment):
    state = tmp_path / "s.npz"
    if extra:
        assert run("--bundle", gpt2, "--ids", ids_npy, "--state", state).exit_code == 0
    before = state.read_bytes() if state.exists() else None
    args = [ids_npy if a == "IDS" else a for a in extra]
    one_line_error(run("--bundle", gpt2, "--state", state, "--finish", *args), fragment)
    assert (state.read_bytes() if state.exists() else None) == before


# ---- ids as tokenizers give them: [N], [1, N], [B, N] with --mask -------------------------------
def test_ids_shaped_one_by_n_run_as_one_sequence(gpt2, tmp_path):
    flat, row = tmp_path / "flat.npy", tmp_path / "row.npy"
    np.save(flat, IDS)
    np.save(row, IDS[None])  # what a tokenizer returns with return_tensors="np"
    results = [json.loads(run("--bundle", gpt2, "--ids", path, "--json").stdout) for path in (flat, row)]
    assert results[0]["top_k"] == results[1]["top_k"] and results[1]["batch"] == 1
    assert [e["id"] for e in results[1]["top_k"]] == top_ids(reference(gpt2, IDS).last_logits)


LENGTHS = (53, 30, 7)  # several segments, a partial one after full ones, a partial one only


def _batch_files(tmp_path):
    rng = np.random.default_rng(12)
    ids = rng.integers(0, 97, (len(LENGTHS), max(LENGTHS))).astype(np.int64)
    mask = (np.arange(max(LENGTHS)) < np.array(LENGTHS)[:, None]).astype(np.int64)
    np.save(tmp_path / "batch.npy", ids)
    np.save(tmp_path / "mask.npy", mask)
    return ids, tmp_path / "batch.npy", tmp_path / "mask.npy"


@pytest.mark.parametrize("with_state", [False, True], ids=["run", "state"])
def test_a_batch_with_a_mask_gives_each_row_what_it_gives_alone(gpt2, tmp_path, with_state):
    ids, ids_path, mask_path = _batch_files(tmp_path)
    extra = ["--state", tmp_path / "s.npz"] if with_state else []
    result = run("--bundle", gpt2, "--ids", ids_path, "--mask", mask_path, "--json",
                 "--save-outputs", tmp_path / "out.npz", *extra)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    saved = np.load(tmp_path / "out.npz")
    assert out["batch"] == 3 and out["tokens"] == sum(LENGTHS) and saved["last_logits"].shape == (3, 97)
    for row, length in enumerate(LENGTHS):
        alone = reference(gpt2, ids[row, :length])
        np.testing.assert_allclose(saved["last_logits"][row], alone.last_logits[0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(saved["memory"][row], alone.memory[0], rtol=0, atol=1e-5)
        assert [e["id"] for e in out["rows"][row]["top_k"]] == top_ids(alone.last_logits)
        assert out["rows"][row]["tokens_seen"] == length
        expected_segments = length // SEGMENT if with_state else -(-length // SEGMENT)
        assert out["rows"][row]["segments"] == expected_segments


@pytest.mark.parametrize("mask, fragment", [
    (lambda m: m.astype(np.float32), "attention_mask must be integer or boolean 0/1, got dtype float32"),
    (lambda m: m[:, ::-1], "rows [1, 2] of attention_mask are not right-padded"),  # row 0 is full
    (lambda m: m[:2], "attention_mask shape (2, 53) must equal input_ids shape (3, 53)"),
], ids=["float", "left-padded", "shape"])
def test_a_mask_that_does_not_fit_is_refused_naming_the_file(gpt2, tmp_path, mask, fragment):
    _, ids_path, mask_path = _batch_files(tmp_path)
    np.save(mask_path, mask(np.load(mask_path)))
    one_line_error(run("--bundle", gpt2, "--ids", ids_path, "--mask", mask_path), "mask.npy: ", fragment)


def test_a_state_of_another_batch_size_is_refused(gpt2, tmp_path):
    _, ids_path, mask_path = _batch_files(tmp_path)
    state = tmp_path / "s.npz"
    assert run("--bundle", gpt2, "--ids", ids_path, "--mask", mask_path, "--state", state).exit_code == 0
    before = state.read_bytes()
    np.save(tmp_path / "one.npy", IDS)
    one_line_error(run("--bundle", gpt2, "--ids", tmp_path / "one.npy", "--state", state),
                   "holds 3 sequence(s), the input has 1 row(s)")
    assert state.read_bytes() == before


# ---- bad input ----------------------------------------------------------------------------------
def test_out_of_vocabulary_id(gpt2, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("5 6 97")
    one_line_error(run("--bundle", gpt2, "--ids", ids), "token id 97", "vocabulary 0..96")


@pytest.mark.parametrize("content", ["", "  \n\t "])
def test_empty_ids_file(gpt2, tmp_path, content):
    ids = tmp_path / "ids.txt"
    ids.write_text(content)
    one_line_error(run("--bundle", gpt2, "--ids", ids), "no tokens to run")


def test_malformed_ids(gpt2, tmp_path):
    words = tmp_path / "ids.txt"
    words.write_text("1 2 three")
    one_line_error(run("--bundle", gpt2, "--ids", words), "token 2 ('three') is not an integer id")
    cube = tmp_path / "cube.npy"
    np.save(cube, np.zeros((2, 3, 4), np.int64))
    one_line_error(run("--bundle", gpt2, "--ids", cube), "must be [N] or [batch, N]", "[2, 3, 4]")
    floats = tmp_path / "f.npy"
    np.save(floats, np.zeros(3, np.float32))
    one_line_error(run("--bundle", gpt2, "--ids", floats), "integer array", "float32")
    one_line_error(run("--bundle", gpt2, "--ids", tmp_path / "absent.txt"), "absent.txt: no such file")


def test_ids_from_a_pipe_or_a_device_are_read_not_called_missing(gpt2, tmp_path):
    one_line_error(run("--bundle", gpt2, "--ids", "/dev/null"), "no tokens to run")  # a device: empty, not absent
    fifo = tmp_path / "ids.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_text, args=("5 6 7",))
    writer.start()
    result = run("--bundle", gpt2, "--ids", fifo, "--json")
    writer.join()
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["tokens"] == 3


@pytest.mark.parametrize("option", ["--state", "--save-outputs"])
def test_output_paths_that_cannot_be_written_are_refused_before_the_run(gpt2, ids_npy, tmp_path, option):
    tmp_path = tmp_path / "outputs"
    tmp_path.mkdir()
    plain = tmp_path / "plain.txt"
    plain.write_text("keep")
    one_line_error(run("--bundle", gpt2, "--ids", ids_npy, option, plain / "x.npz"), f"{option} {plain / 'x.npz'}",
                   f"{plain} is not a directory")
    same = tmp_path / "s.npz"
    one_line_error(run("--bundle", gpt2, "--ids", ids_npy, "--state", same, "--save-outputs", same),
                   "--state and --save-outputs are the same file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.txt"] and plain.read_text() == "keep"


def test_one_input_only(gpt2, ids_npy):
    one_line_error(run("--bundle", gpt2, "--ids", ids_npy, "--text", "hi"), "give one input", "--text and --ids")


def test_text_on_a_bundle_without_tokenizer(gpt2):
    one_line_error(run("--bundle", gpt2, "--text", "hello"), "has no tokenizer", "--ids")


def test_not_a_bundle(tmp_path):
    one_line_error(run("--bundle", tmp_path, "--text", "hello"), "no manifest.json")


def test_verbose_shows_the_traceback(gpt2):
    result = run("--bundle", gpt2, "--text", "hello", "--verbose")
    assert result.exit_code == 1 and "Traceback" in result.stderr


def test_json_error_is_machine_readable(gpt2, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("")
    result = run("--bundle", gpt2, "--ids", ids, "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {"ok": False, "error": "no tokens to run: the input is empty"}


# ---- tokenizer, encoder, backends --------------------------------------------------------------
def test_text_with_a_tokenizer_runs_and_decodes(tokenized, tmp_path):
    bundle, tokenizer, _ = tokenized
    text = "the memory tokens carry the state from one segment to the next, and the next"
    ids = tokenizer.encode(text).ids
    assert len(ids) > SEGMENT  # more than one segment
    expected = reference(bundle, ids).last_logits
    source = tmp_path / "in.txt"
    source.write_text(text, encoding="utf-8")
    results = [run("--bundle", bundle, "--text", text, "--json"),
               run("--bundle", bundle, "--text-file", source, "--json"),
               run("--bundle", bundle, "--text-file", "-", "--json", input=text),
               run("--bundle", bundle, "--json", input=text)]  # tokenizer: stdin is text
    for result in results:
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["tokens"] == len(ids)
        assert [e["id"] for e in data["top_k"]] == top_ids(expected)
        assert [e["text"] for e in data["top_k"]] == [tokenizer.decode([i]) for i in top_ids(expected)]
    human = run("--bundle", bundle, "--text", text)
    assert human.exit_code == 0, human.output
    first = human.stdout.splitlines()[0]
    assert json.dumps(tokenizer.decode([top_ids(expected)[0]]), ensure_ascii=False) in first
    ids_file = tmp_path / "ids.txt"  # ids on a tokenized bundle are decoded too
    ids_file.write_text(" ".join(map(str, ids)))
    assert run("--bundle", bundle, "--ids", ids_file).stdout == human.stdout


def test_encoder_prints_the_class(bert, ids_npy):
    expected = reference(bert, IDS).last_logits
    result = run("--bundle", bert, "--ids", ids_npy)
    assert result.exit_code == 0, result.output
    predicted = int(np.argmax(expected[0]))
    lines = result.stdout.splitlines()
    assert lines[0] == f"class {predicted} (LABEL_{predicted})"
    assert [int(line.split()[0]) for line in lines[1:]] == top_ids(expected, 3)
    data = json.loads(run("--bundle", bert, "--ids", ids_npy, "--json").stdout)
    assert data["class"] == predicted and data["kind"] == "encoder"
    np.testing.assert_allclose(data["class_logits"], expected[0], atol=1e-6)


def test_the_torch_backend_is_not_part_of_the_runtime_cli(tokenized, ids_npy):
    bundle, _, _ = tokenized
    result = run("--bundle", bundle, "--ids", ids_npy, "--backend", "torch")
    assert result.exit_code == 2 and "'torch' is not one of" in result.stderr


def test_cuda_provider_is_an_error_not_a_fallback(gpt2, ids_npy, monkeypatch):
    from tests.onnxruntime_stand_in import OnnxRuntimeStandIn, use_onnxruntime

    use_onnxruntime(monkeypatch, OnnxRuntimeStandIn(["CPUExecutionProvider"]))  # a build without CUDA, anywhere
    result = run("--bundle", gpt2, "--ids", ids_npy, "--provider", "cuda")
    one_line_error(result, "provider 'cuda'", "CUDAExecutionProvider", "not in this onnxruntime build")
    assert result.stdout == ""


def test_rmt_run_works_without_torch(gpt2, ids_npy, tmp_path):
    blocker = tmp_path / "blocker"
    (blocker / "torch").mkdir(parents=True)
    (blocker / "torch" / "__init__.py").write_text("raise ImportError('torch is blocked in this test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")])))
    blocked = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0 and "torch is blocked" in blocked.stderr
    script = Path(sys.executable).parent / "rmt-run"
    done = subprocess.run([str(script), "--bundle", str(gpt2), "--ids", str(ids_npy), "--json"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert [e["id"] for e in data["top_k"]] == top_ids(reference(gpt2, IDS).last_logits)
