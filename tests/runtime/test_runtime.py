"""The ONNX Runtime runtime against the PyTorch segment loop, and its streams, batches and states."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from rmt_runtime import BackendError, BundleError, RMTRuntime, RuntimeInputError, StateError
from tests.onnxruntime_stand_in import OnnxRuntimeStandIn, use_onnxruntime

TOKENS = 4096  # 256 segments of 16


def random_ids(vocab, shape, seed=0, low=0):
    return np.random.default_rng(seed).integers(low, vocab, shape, dtype=np.int64)


def pytorch_loop(model, ids, mask=None, memory=None):
    with torch.no_grad():
        return model(torch.from_numpy(ids), None if mask is None else torch.from_numpy(mask),
                     memory=None if memory is None else torch.from_numpy(memory))


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "qwen2", "bert"])
def test_parity_with_pytorch_over_4096_tokens(bundle_factory, family):
    """Chained drift over 256 segments stays within the model's own sensitivity bound."""
    model, exported = bundle_factory(family, "fp32")
    rt = RMTRuntime.load(exported.path)
    low = 4 if model.config.kind == "encoder" else 0
    ids = random_ids(model.config.vocab_size, (2, TOKENS), seed=1, low=low)
    mask = np.ones_like(ids)
    mask[1, TOKENS - 100:] = 0
    out = rt.run(ids, mask)
    reference = pytorch_loop(model, ids, mask)
    # The model's own sensitivity in the same run: PyTorch with its initial memory perturbed by 1e-6.
    memory0 = model.initial_memory(2).detach().numpy().copy()
    noise = np.random.default_rng(2).normal(size=memory0.shape).astype(np.float32)
    perturbed = pytorch_loop(model, ids, mask, memory0 * (1 + 1e-6 * noise))
    sensitivity = float(np.abs(perturbed.memory.numpy() - reference.memory.numpy()).max())
    drift = float(np.abs(out.memory - reference.memory.numpy()).max())
    assert drift <= 1e-4 + 10 * sensitivity, (drift, sensitivity)
    if model.config.kind == "decoder":
        last = mask.sum(axis=1) - 1
        expected = reference.logits.numpy()[np.arange(2), last]
    else:
        expected = reference.logits.numpy()
    assert np.abs(out.last_logits - expected).max() <= 1e-4 + 10 * sensitivity
    assert out.memory.shape == (2, model.config.num_mem_tokens, model.config.hidden_size)


def test_full_logits_through_the_step_graph(bundle_factory):
    model, exported = bundle_factory("llama", "fp32")
    rt = RMTRuntime.load(exported.path)
    ids = random_ids(model.config.vocab_size, (1, 100))
    out = rt.run(ids, return_logits=True)
    reference = pytorch_loop(model, ids)
    assert out.logits.shape == (1, 100, model.config.vocab_size)
    np.testing.assert_allclose(out.logits, reference.logits.numpy(), rtol=0, atol=1e-4)
    ingest = rt.run(ids)
    np.testing.assert_allclose(ingest.last_logits, out.logits[:, -1], rtol=0, atol=1e-5)


# Decoders: tests/reliability/test_properties.py::test_any_chunking_equals_one_shot (hypothesis).
def test_run_with_right_padding_equals_rows_alone(bundle_factory):
    model, exported = bundle_factory("gpt2", "fp32")
    rt = RMTRuntime.load(exported.path)
    lengths = [90, 33, 16]
    ids = random_ids(model.config.vocab_size, (3, 90), seed=5)
    mask = (np.arange(90)[None] < np.array(lengths)[:, None]).astype(np.int64)
    together = rt.run(ids, mask)
    for row, n in enumerate(lengths):
        alone = rt.run(ids[row:row + 1, :n])
        np.testing.assert_allclose(together.memory[row], alone.memory[0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(together.last_logits[row], alone.last_logits[0], rtol=0, atol=1e-5)


def test_stack_and_unstack_round_trip(bundle_factory):
    model, exported = bundle_factory("gpt2", "fp32")
    rt = RMTRuntime.load(exported.path)
    a, b = rt.new_state(), rt.new_state()
    rt.feed(a, random_ids(97, 40, seed=6))
    rt.feed(b, random_ids(97, 21, seed=7))
    both = rt.stack([a, b])
    assert both.batch == 2 and [len(p) for p in both.pending] == [8, 5]
    rt.feed(both, [random_ids(97, 30, seed=8), random_ids(97, 30, seed=9)])
    rt.feed(a, random_ids(97, 30, seed=8))
    rt.feed(b, random_ids(97, 30, seed=9))
    first, second = rt.unstack(both)
    np.testing.assert_allclose(rt.flush(first).memory, rt.flush(a).memory, rtol=0, atol=1e-5)
    np.testing.assert_allclose(rt.flush(second).memory, rt.flush(b).memory, rtol=0, atol=1e-5)


def test_peek_does_not_commit(bundle_factory):
    model, exported = bundle_factory("gpt2", "fp32")
    rt = RMTRuntime.load(exported.path)
    ids = random_ids(97, 50, seed=10)
    state = rt.new_state()
    rt.feed(state, ids[:37])
    first, second = rt.peek(state), rt.peek(state)
    np.testing.assert_array_equal(first.memory, second.memory)
    assert [len(p) for p in state.pending] == [5]
    np.testing.assert_array_equal(first.memory, rt.run(ids[:37]).memory)  # peek = the input ending here
    rt.feed(state, ids[37:])
    np.testing.assert_array_equal(rt.flush(state).memory, rt.run(ids).memory)


# Rows that hold nothing pending (exactly two segments), a partial segment after full ones, and
# a partial segment only: the three cases a batched peek/flush/restore must keep apart.
ROW_LENGTHS = (32, 37, 5)


def _fed(rt, lengths, stop=None):
    state = rt.new_state(len(lengths))
    rt.feed(state, [random_ids(97, n, seed=20 + row) for row, n in enumerate(lengths)], stop=stop)
    return state


def _alone(rt, row, lengths, stop=None):
    state = rt.new_state()
    rt.feed(state, random_ids(97, lengths[row], seed=20 + row), stop=stop)
    return state


@pytest.mark.parametrize("stopped", [False, True], ids=["fed", "feed-stopped"])
def test_batched_peek_and_flush_equal_each_row_alone(bundle_factory, stopped):
    """Each row of a batch whose rows hold nothing pending, a partial segment, or (after a
    stopped feed) several segments, equals that row run alone (1e-5: other matmul shapes)."""
    _, exported = bundle_factory("gpt2", "fp32")
    rt = RMTRuntime.load(exported.path)
    stop = (lambda: True) if stopped else None
    batch = _fed(rt, ROW_LENGTHS, stop)
    if stopped:
        assert [len(p) for p in batch.pending] == list(ROW_LENGTHS)
    peeked, flushed = rt.peek(batch), rt.flush(batch)
    for row in range(len(ROW_LENGTHS)):
        alone = _alone(rt, row, ROW_LENGTHS, stop)
        for got, expected in ((peeked, rt.peek(alone)), (flushed, rt.flush(alone))):
            np.testing.assert_allclose(got.memory[row], expected.memory[0], rtol=0, atol=1e-5)
            np.testing.assert_allclose(got.last_logits[row], expected.last_logits[0], rtol=0, atol=1e-5)


SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from rmt_runtime import RMTRuntime
    bundle, state_path, rest_path, out_path = sys.argv[1:]
    rt = RMTRuntime.load(bundle)
    state = rt.restore_state(state_path)
    rt.feed(state, np.load(rest_path))
    out = rt.flush(state)
    np.savez(out_path, memory=out.memory, last_logits=out.last_logits,
             torch_loaded=np.array("torch" in sys.modules))
""")


def _torchless_env(tmp_path):
    """PYTHONPATH with a 'torch' package that cannot be imported."""
    blocker = tmp_path / "no_torch" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is blocked in this test')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(blocker.parent), env.get("PYTHONPATH", "")])
    return env


def test_save_then_restore_in_a_new_process_without_torch_is_bit_identical(bundle_factory, tmp_path):
    """Restore in a fresh process that cannot import torch, continue: equal to no interruption."""
    model, exported = bundle_factory("gpt2", "fp32")
    rt = RMTRuntime.load(exported.path)
    ids = random_ids(97, 300, seed=11)
    state = rt.new_state()
    rt.feed(state, ids[:123])
    rt.save_state(state, tmp_path / "state.npz")
    np.save(tmp_path / "rest.npy", ids[123:])
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(exported.path), str(tmp_path / "state.npz"),
                             str(tmp_path / "rest.npy"), str(tmp_path / "out.npz")],
                            env=_torchless_env(tmp_path), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    restored = np.load(tmp_path / "out.npz")
    assert not bool(restored["torch_loaded"])
    rt.feed(state, ids[123:])
    uninterrupted = rt.flush(state)
    np.testing.assert_array_equal(restored["memory"], uninterrupted.memory)
    np.testing.assert_array_equal(restored["last_logits"], uninterrupted.last_logits)


def test_import_without_torch(tmp_path):
    code = "import sys, rmt_runtime, rmt_runtime.backends.onnxruntime; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], env=_torchless_env(tmp_path), capture_output=True,
                            text=True)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr


def test_state_from_another_bundle_is_refused_naming_both(bundle_factory, tmp_path):
    _, gpt2 = bundle_factory("gpt2", "fp32")
    _, llama = bundle_factory("llama", "fp32")
    rt_gpt2, rt_llama = RMTRuntime.load(gpt2.path), RMTRuntime.load(llama.path)
    rt_gpt2.save_state(rt_gpt2.new_state(), tmp_path / "s.npz")
    with pytest.raises(StateError) as info:
        rt_llama.restore_state(tmp_path / "s.npz")
    assert str(gpt2.path) in str(info.value) and str(llama.path) in str(info.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "version"])
def test_damaged_state_files_are_refused(bundle_factory, tmp_path, damage):
    _, exported = bundle_factory("gpt2", "fp32")
    rt = RMTRuntime.load(exported.path)
    path = rt.save_state(rt.new_state(), tmp_path / "s.npz")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_text("not a state")
    else:
        with np.load(path) as archive:
            arrays = {k: archive[k] for k in archive.files}
        header = json.loads(bytes(arrays["header"]).decode())
        header["version"] = 99
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        np.savez(path, **arrays)
    with pytest.raises(StateError, match="not a readable|not an rmt-edge|version 99"):
        rt.restore_state(path)


def test_bad_inputs_are_refused_before_any_work(bundle_factory):
    model, exported = bundle_factory("gpt2", "fp32")
    rt = RMTRuntime.load(exported.path)
    state = rt.new_state()
    with pytest.raises(RuntimeInputError, match=r"token id 97 at row 0, position 3 is outside the vocabulary 0..96"):
        rt.feed(state, [1, 2, 3, 97])
    with pytest.raises(RuntimeInputError, match="token id -1"):
        rt.run(np.array([[5, -1, 3]]))
    with pytest.raises(RuntimeInputError, match="integer token ids"):
        rt.run(np.array([[1.0, 2.0]]))
    with pytest.raises(RuntimeInputError, match="length >= 1"):
        rt.run(np.zeros((1, 0), np.int64))
    with pytest.raises(RuntimeInputError, match="attention_mask shape"):
        rt.run(np.ones((2, 5), np.int64), np.ones((2, 4), np.int64))
    with pytest.raises(RuntimeInputError, match=r"memory must be float32 \[1, 4, 32\]"):
        rt.new_state(1, memory=np.zeros((1, 3, 32), np.float32))
    with pytest.raises(RuntimeInputError, match="NaN or Inf"):
        rt.new_state(1, memory=np.full((1, 4, 32), np.nan, np.float32))
    assert state.tokens_seen[0] == 0 and len(state.pending[0]) == 0  # the refused feed changed nothing
    spec = rt.runner.spec("step")
    memory = state.handles["memory"]
    with pytest.raises(RuntimeInputError, match="outside 1..16"):
        rt.runner.check(spec, {"input_ids": np.zeros((1, 17), np.int64), "attention_mask": np.ones((1, 17), np.int64),
                               "memory": memory})
    with pytest.raises(RuntimeInputError, match="input_ids must be a int64 numpy array, got int32"):
        rt.runner.check(spec, {"input_ids": np.zeros((1, 4), np.int32), "attention_mask": np.ones((1, 4), np.int64),
                               "memory": memory})
    with pytest.raises(RuntimeInputError, match=r"missing \['memory'\]"):
        rt.runner.check(spec, {"input_ids": np.zeros((1, 4), np.int64), "attention_mask": np.ones((1, 4), np.int64)})
    with pytest.raises(RuntimeInputError, match=r"memory shape \[2, 4, 32\] does not fit"):
        rt.runner.check(spec, {"input_ids": np.zeros((1, 4), np.int64), "attention_mask": np.ones((1, 4), np.int64),
                               "memory": rt.runner.empty((2, 4, 32), "float32")})


def test_memory_that_overflows_fp16_is_an_error_naming_the_segment_and_the_rows(bundle_factory):
    model, exported = bundle_factory("gpt2", "fp16")
    rt = RMTRuntime.load(exported.path)
    memory = np.repeat(model.initial_memory(1).detach().numpy(), 3, axis=0)
    memory[1] = 1e6  # only the middle sequence overflows; the error names it, not every row that ran
    state = rt.new_state(3, memory=memory)
    with pytest.raises(RuntimeInputError, match=r"\['memory'\] holds NaN or Inf in row\(s\) \[1\] after segment 1$"):
        rt.feed(state, [random_ids(97, 16)] * 3)


def test_bundle_whose_file_changed_is_refused(bundle_factory, tmp_path):
    import shutil

    _, exported = bundle_factory("gpt2", "fp32")
    copy = tmp_path / "bundle"
    shutil.copytree(exported.path, copy)
    np.save(copy / "memory_init.npy", np.zeros((4, 32), np.float32))
    with pytest.raises(BundleError, match="memory_init.npy differs from the manifest's sha256"):
        RMTRuntime.load(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="not a complete bundle"):
        RMTRuntime.load(copy)


def test_a_provider_that_falls_back_to_the_cpu_is_an_error(bundle_factory, monkeypatch):
    _, exported = bundle_factory("gpt2", "fp32")
    use_onnxruntime(monkeypatch, OnnxRuntimeStandIn(["CUDAExecutionProvider", "CPUExecutionProvider"]))
    with pytest.raises(BackendError, match=r"asked for CUDAExecutionProvider, but the \w+ session runs on "
                                           r"\['CPUExecutionProvider'\]"):
        RMTRuntime.load(exported.path, provider="cuda")
    # auto tries CUDA, sees the fallback, and says so in what it picked
    rt = RMTRuntime.load(exported.path)
    assert rt.picked.startswith("onnxruntime/CPUExecutionProvider (auto")
    assert "cuda: asked for CUDAExecutionProvider" in rt.picked


def test_a_provider_missing_from_the_build_is_an_error(bundle_factory, monkeypatch):
    _, exported = bundle_factory("gpt2", "fp32")
    use_onnxruntime(monkeypatch, OnnxRuntimeStandIn(["CPUExecutionProvider"]))
    with pytest.raises(BackendError, match="provider 'cuda' .* is not in this onnxruntime build"):
        RMTRuntime.load(exported.path, provider="cuda")
    rt = RMTRuntime.load(exported.path)
    assert rt.picked.startswith("onnxruntime/CPUExecutionProvider (auto")
    assert "cuda: provider 'cuda' (CUDAExecutionProvider) is not in this onnxruntime build" in rt.picked


def test_cuda_graphs_on_a_backend_without_them_is_an_error(bundle_factory):
    _, exported = bundle_factory("gpt2", "fp32")
    for backend in ("auto", "onnxruntime"):
        with pytest.raises(BackendError, match="cuda_graphs is a feature of the native tensorrt backend"):
            RMTRuntime.load(exported.path, backend=backend, cuda_graphs=True)


def test_torch_backend_is_the_reference(bundle_factory, tiny_checkpoint, tmp_path):
    ckpt, model = tiny_checkpoint
    from rmt_export.exporter import ExportOptions, export_model
    from rmt_export.reference_backend import reference_runtime
    from rmt_export.validate import ValidationPlan

    bundle = export_model(model, tmp_path / "b", ExportOptions(plan=ValidationPlan(segments=2), generation=False)).path
    ids = random_ids(97, (2, 100), seed=12)
    reference = reference_runtime(bundle, ckpt)
    assert reference.picked.startswith("torch/cpu (the PyTorch reference")
    np.testing.assert_array_equal(reference.run(ids).memory, pytorch_loop(model, ids).memory.numpy())
    np.testing.assert_allclose(RMTRuntime.load(bundle).run(ids).memory, reference.run(ids).memory,
                               rtol=0, atol=1e-4)
    with pytest.raises(BackendError, match="rmt_export.reference_backend.reference_runtime"):
        RMTRuntime.load(bundle, backend="torch")  # the runtime itself never imports torch
    _, other = bundle_factory("llama", "fp32")
    with pytest.raises(BackendError, match="does not hold the model of bundle"):
        reference_runtime(other.path, ckpt)
