"""The ONNX Runtime runner's sessions: failures come back as one BackendError and ONNX Runtime
prints nothing of its own, ``threads`` reaches the sessions, the generation graphs open on
first use only, and run results are host copies that outlive the runner's buffers."""
import json
import shutil
import sys

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
    assert "Protobuf parsing failed" in message  # ONNX Runtime's own first line: what is wrong with the file
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
    message = str(info.value)
    assert message.startswith(f"onnxruntime could not run the ingest graph of {rt.bundle.path}: ")
    # ONNX Runtime's own first line follows: which node failed and why.
    assert "Gather node" in message and "indices element out of data bounds" in message
    assert "\n" not in message
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


def test_without_onnxruntime_installed_the_backend_says_how_to_get_it(bundle_factory, monkeypatch):
    bundle = Bundle.load(bundle_factory("gpt2", "fp32")[1].path)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without the package gives
    with pytest.raises(BackendError) as info:
        OnnxRuntimeRunner(bundle)
    assert str(info.value) == ("the onnxruntime backend needs ONNX Runtime: pip install onnxruntime "
                               "(or onnxruntime-gpu for CUDA/TensorRT)")


def test_the_provider_is_the_cpu_unless_named_and_must_be_known(bundle_factory):
    bundle = Bundle.load(bundle_factory("gpt2", "fp32")[1].path)
    runner = OnnxRuntimeRunner(bundle)
    assert runner.provider == "cpu" and runner.name == "onnxruntime/CPUExecutionProvider" and runner.state_on_host
    with pytest.raises(BackendError) as info:
        OnnxRuntimeRunner(bundle, "tpu")
    assert str(info.value) == "unknown provider 'tpu': expected one of ['cpu', 'cuda', 'tensorrt']"


def test_a_manifest_naming_an_output_the_graph_lacks_is_refused_at_load(bundle_factory, tmp_path):
    bundle_dir = tmp_path / "b"
    shutil.copytree(bundle_factory("gpt2", "fp32")[1].path, bundle_dir)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    for name in ("extra", "more"):
        manifest["graphs"]["step"]["spec"]["outputs"].append({"dims": ["batch"], "dtype": "float32", "name": name})
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendError) as info:
        RMTRuntime.load(bundle_dir, backend="onnxruntime")
    assert str(info.value) == (f"{bundle_dir / 'step.onnx'}: the graph does not match its manifest spec: "
                               "extra is not in the graph; more is not in the graph")


def test_a_session_that_falls_back_to_the_cpu_is_refused_word_for_word(bundle_factory, monkeypatch):
    """onnxruntime-gpu with a CUDA library missing: it lists CUDA, then runs on the CPU."""
    from tests.onnxruntime_stand_in import OnnxRuntimeStandIn, use_onnxruntime

    use_onnxruntime(monkeypatch, OnnxRuntimeStandIn(["CUDAExecutionProvider", "CPUExecutionProvider"]))
    with pytest.raises(BackendError) as info:
        RMTRuntime.load(bundle_factory("gpt2", "fp32")[1].path, provider="cuda")
    graph = str(info.value).split("the ")[1].split(" ")[0]
    assert graph in ("step", "ingest")
    assert str(info.value) == (f"asked for CUDAExecutionProvider, but the {graph} session runs on "
                               "['CPUExecutionProvider'] (a missing CUDA/TensorRT library makes onnxruntime fall "
                               "back silently); refusing to run on another provider")
