"""The ONNX Runtime runner's sessions: failures come back as one BackendError and ONNX Runtime
prints nothing of its own, ``threads`` reaches the sessions, the generation graphs open on
first use only, and run results are host copies that outlive the runner's buffers."""
import shutil

import numpy as np
import pytest

from rmt_runtime import BackendError, Bundle, RMTRuntime
from rmt_runtime.backends.onnxruntime import OnnxRuntimeRunner


def test_a_graph_onnxruntime_cannot_load_is_one_error_and_nothing_on_stderr(bundle_factory, tmp_path, capfd):
    bundle_dir = tmp_path / "b"
    shutil.copytree(bundle_factory("gpt2", "fp32")[1].path, bundle_dir)
    graph = bundle_dir / "step.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    capfd.readouterr()
    with pytest.raises(BackendError) as info:
        RMTRuntime.load(Bundle.load(bundle_dir, verify_hashes=False), backend="onnxruntime")
    message = str(info.value)
    assert message.startswith(f"{bundle_dir / 'step.onnx'}: onnxruntime cannot load the step graph: ")
    assert "\n" not in message
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_a_failing_run_is_one_error_and_nothing_on_stderr(bundle_factory, capfd):
    rt = RMTRuntime.load(bundle_factory("gpt2", "fp32")[1].path, backend="onnxruntime")
    state = rt.new_state()
    runner = rt.runner
    capfd.readouterr()
    with pytest.raises(BackendError) as info:  # ids past the embedding table: ONNX Runtime's Gather fails
        runner.run("ingest", {"input_ids": np.full((1, 16), 10 ** 6, np.int64),
                              "attention_mask": np.ones((1, 16), np.int64), **state.handles}, ("last_logits",),
                   checked=True)
    assert str(info.value).startswith(f"onnxruntime could not run the ingest graph of {rt.bundle.path}: ")
    assert "\n" not in str(info.value)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_reach_every_session(bundle_factory, threads):
    bundle = Bundle.load(bundle_factory("gpt2", "fp32")[1].path)
    runner = OnnxRuntimeRunner(bundle, "cpu", threads=threads).activate()
    for graph in ("step", "ingest"):
        assert runner._session(graph).get_session_options().intra_op_num_threads == threads
    default = OnnxRuntimeRunner(bundle, "cpu").activate()
    assert default._session("step").get_session_options().intra_op_num_threads == 0  # ONNX Runtime decides


def test_generation_graphs_open_on_first_use_and_stay_open(bundle_factory):
    bundle = Bundle.load(bundle_factory("gpt2", "fp32")[1].path)
    runner = OnnxRuntimeRunner(bundle, "cpu").activate()
    assert sorted(runner._sessions) == ["ingest", "step"]
    first = runner._session("prefill")
    assert runner._session("prefill") is first and sorted(runner._sessions) == ["ingest", "prefill", "step"]
    runner.deactivate()
    assert runner._sessions == {}


def test_outputs_and_state_reads_are_host_copies(bundle_factory):
    rt = RMTRuntime.load(bundle_factory("gpt2", "fp32")[1].path, backend="onnxruntime")
    state = rt.new_state()
    rt.feed(state, np.arange(16) % 97)
    memory = rt.memory(state)
    memory[:] = 123.0  # a copy: the state is untouched
    assert not np.array_equal(rt.memory(state), memory)
    out = rt.runner.run("ingest", {"input_ids": np.arange(16, dtype=np.int64)[None],
                                   "attention_mask": np.ones((1, 16), np.int64), **state.handles}, ("last_logits",))
    assert set(out.host) == {"last_logits"} and out.host["last_logits"].shape == (1, 97)
    assert out.host["last_logits"].flags.owndata and set(out.device) == {"new_memory"}
    assert rt.runner.shape_of(out.device["new_memory"]) == (1, 4, 32)
