"""The ONNX Runtime runner's sessions: failures come back as one BackendError and ONNX Runtime
prints nothing of its own, ``threads`` reaches the sessions, the generation graphs open on
first use only, and run results are host copies that outlive the runner's buffers."""
import json
import shutil
import sys

import numpy as np
import pytest

from rmt_runtime import BackendError, Bundle, BundleError, RMTRuntime
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
    # The manifest's schema rebuilds the step graph's spec from its geometry: refused before any session.
    with pytest.raises(BundleError) as info:
        RMTRuntime.load(bundle_dir, backend="onnxruntime")
    assert str(info.value) == (f"{bundle_dir}: graph 'step' is not what a rmt decoder of vocab_size=97, M=4, D=32 "
                               "has: outputs ['logits', 'new_memory', 'extra', 'more'], expected ['logits', "
                               "'new_memory']")
    # (A spec that fits the geometry but not the graph file is the backend's to refuse:
    # tests/reliability/test_data_safety.py::test_a_manifest_vocabulary_other_than_the_graphs_is_refused.)


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


class _RecordingStandIn:
    """onnxruntime that lists the CUDA and TensorRT providers and records what each session was
    asked for (its sessions run on the CPU, so the runner's fallback guard then refuses them)."""

    def __init__(self):
        from tests.onnxruntime_stand_in import OnnxRuntimeStandIn

        self._stand_in = OnnxRuntimeStandIn(["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                             "CPUExecutionProvider"])
        self.asked = []

    def __getattr__(self, name):
        return getattr(self._stand_in, name)

    def InferenceSession(self, path, options=None, providers=None):  # noqa: N802 - onnxruntime's name
        self.asked.append((path, providers))
        return self._stand_in.InferenceSession(path, options, providers)


@pytest.fixture
def tensorrt_stand_in(monkeypatch):
    from tests.onnxruntime_stand_in import use_onnxruntime

    stand_in = _RecordingStandIn()
    use_onnxruntime(monkeypatch, stand_in)
    return stand_in


def _bundle_copy(bundle_factory, tmp_path, precision="fp32"):
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(bundle_factory("gpt2", precision)[1].path, bundle_dir)
    return Bundle.load(bundle_dir)


def _sha16(bundle, graph):
    return bundle.manifest["files"][bundle.manifest["graphs"][graph]["file"]][:16]


def test_tensorrt_provider_gets_engine_and_timing_caches_and_one_explicit_profile(
        bundle_factory, tmp_path, tensorrt_stand_in):
    """Engines and the timing cache in <bundle>/engines/onnxruntime-trt (one engine folder per
    graph file's sha256), batch 1..8, seq 1..segment, tuned for one full segment of batch 1."""
    bundle = _bundle_copy(bundle_factory, tmp_path)
    runner = OnnxRuntimeRunner(bundle, "tensorrt")
    assert runner.max_batch == 8 and OnnxRuntimeRunner(bundle, "cpu").max_batch is None
    root = bundle.path.resolve() / "engines" / "onnxruntime-trt"
    step = {
        "trt_engine_cache_enable": True, "trt_engine_cache_path": str(root / f"step-{_sha16(bundle, 'step')}"),
        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(root),
        "trt_profile_min_shapes": "input_ids:1x1,attention_mask:1x1,memory:1x4x32",
        "trt_profile_opt_shapes": "input_ids:1x16,attention_mask:1x16,memory:1x4x32",
        "trt_profile_max_shapes": "input_ids:8x16,attention_mask:8x16,memory:8x4x32",
    }
    assert runner._provider_list("step") == [("TensorrtExecutionProvider", step), "CUDAExecutionProvider"]
    assert (root / f"step-{_sha16(bundle, 'step')}").is_dir()
    # The decode cache: past 1 .. the backbone's last position (64 positions: generation without
    # rollover grows it there), tuned at M + segment / 2 = 12.
    decode = runner.tensorrt_options("decode")

    def caches(batch, past):  # 2 layers of 4 heads of 8
        return ",".join(f"past.{i}.{kv}:{batch}x4x{past}x8" for i in (0, 1) for kv in ("key", "value"))
    assert decode["trt_profile_min_shapes"] == "input_ids:1x1,attention_mask:1x2,position_ids:1x1," + caches(1, 1)
    assert decode["trt_profile_opt_shapes"] == "input_ids:1x1,attention_mask:1x13,position_ids:1x1," + caches(1, 12)
    assert decode["trt_profile_max_shapes"] == "input_ids:8x1,attention_mask:8x64,position_ids:8x1," + caches(8, 63)
    assert decode["trt_engine_cache_path"] == str(root / f"decode-{_sha16(bundle, 'decode')}")
    assert decode["trt_timing_cache_path"] == str(root)  # one timing cache for every graph
    # The sessions really get these options (the stand-in then runs on the CPU: refused).
    with pytest.raises(BackendError, match="refusing to run on another provider"):
        runner.activate()
    (path, providers), = tensorrt_stand_in.asked
    first = bundle.segment_graph_names[0]
    assert path == str(bundle.graph_path(first)) and providers == runner._provider_list(first)
    assert providers[0][1] == {**step, "trt_engine_cache_path": str(root / f"{first}-{_sha16(bundle, first)}")}


def test_tensorrt_provider_never_enables_fp16_on_an_fp16_bundle(bundle_factory, tmp_path, tensorrt_stand_in):
    """An fp16 bundle is an fp16 graph: trt_fp16_enable would make TensorRT a weakly typed network
    free to pick fp16 anywhere; nothing in the options sets any precision."""
    bundle = _bundle_copy(bundle_factory, tmp_path, "fp16")
    for graph in bundle.graph_names:
        options = OnnxRuntimeRunner(bundle, "tensorrt").tensorrt_options(graph)
        assert sorted(options) == sorted(["trt_engine_cache_enable", "trt_engine_cache_path", "trt_timing_cache_enable",
                                          "trt_timing_cache_path", "trt_profile_min_shapes", "trt_profile_opt_shapes",
                                          "trt_profile_max_shapes"]), graph
        assert not [key for key in options if "fp16" in key or "int8" in key or "bf16" in key]


def test_tensorrt_provider_takes_another_cache_directory_and_max_batch(bundle_factory, tmp_path, tensorrt_stand_in):
    bundle = _bundle_copy(bundle_factory, tmp_path)
    cache = tmp_path / "elsewhere" / "trt"
    runner = OnnxRuntimeRunner(bundle, "tensorrt", engine_cache=cache, max_batch=2)
    options = runner.tensorrt_options("ingest")
    assert options["trt_engine_cache_path"] == str(cache.resolve() / f"ingest-{_sha16(bundle, 'ingest')}")
    assert options["trt_timing_cache_path"] == str(cache.resolve())
    assert options["trt_profile_max_shapes"] == "input_ids:2x16,attention_mask:2x16,memory:2x4x32"
    assert not (bundle.path / "engines").exists()
    for bad in (0, -1, 2.0, True):
        with pytest.raises(BackendError, match="max_batch must be an integer >= 1"):
            OnnxRuntimeRunner(bundle, "tensorrt", max_batch=bad)


def test_a_batch_above_the_tensorrt_profile_is_refused_before_running(bundle_factory, tmp_path, tensorrt_stand_in):
    from rmt_runtime.errors import RuntimeInputError

    bundle = _bundle_copy(bundle_factory, tmp_path)
    runner = OnnxRuntimeRunner(bundle, "tensorrt", max_batch=2)
    inputs = {"input_ids": np.zeros((3, 16), np.int64), "attention_mask": np.ones((3, 16), np.int64),
              "memory": np.zeros((3, 4, 32), np.float32)}
    with pytest.raises(RuntimeInputError) as info:
        runner.run("step", inputs, ("logits",))
    assert str(info.value) == "batch 3 is outside 1..2 for onnxruntime/TensorrtExecutionProvider"
    assert tensorrt_stand_in.asked == [] and runner._sessions == {}  # no session was even opened


def test_a_read_only_bundle_is_one_clear_error_naming_the_cache_and_the_way_out(
        bundle_factory, tmp_path, tensorrt_stand_in, monkeypatch):
    import errno
    import os
    from pathlib import Path

    bundle = _bundle_copy(bundle_factory, tmp_path)
    mkdir = Path.mkdir

    def read_only_bundle(self, *args, **kwargs):  # what a read-only mount answers (tests run as root)
        if self.resolve().is_relative_to(bundle.path.resolve()):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_bundle)
    with pytest.raises(BackendError) as info:
        OnnxRuntimeRunner(bundle, "tensorrt").activate()
    assert str(info.value) == (
        f"the TensorRT provider keeps its engines and timing cache in {bundle.path / 'engines' / 'onnxruntime-trt'}, "
        "which cannot be created or written (Read-only file system; a read-only bundle?): pass another directory, "
        "OnnxRuntimeRunner(bundle, 'tensorrt', engine_cache=DIR)")
    assert tensorrt_stand_in.asked == []
    options = OnnxRuntimeRunner(bundle, "tensorrt", engine_cache=tmp_path / "cache").tensorrt_options("step")
    assert options["trt_timing_cache_path"] == str((tmp_path / "cache").resolve())


def test_the_tensorrt_providers_cache_is_never_written_through_a_link(bundle_factory, tmp_path, tensorrt_stand_in):
    """engines/ (or its onnxruntime-trt folder) linked elsewhere: refused before any folder is made
    there, as rmt-build refuses it (issue 29, class 5)."""
    bundle = _bundle_copy(bundle_factory, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (bundle.path / "engines").symlink_to(outside, target_is_directory=True)
    with pytest.raises(BackendError, match="engines is a symlink"):
        OnnxRuntimeRunner(bundle, "tensorrt").tensorrt_options("step")
    (bundle.path / "engines").unlink()
    (bundle.path / "engines").mkdir()
    (bundle.path / "engines" / "onnxruntime-trt").symlink_to(outside, target_is_directory=True)
    with pytest.raises(BackendError, match="onnxruntime-trt is a symlink"):
        OnnxRuntimeRunner(bundle, "tensorrt").tensorrt_options("step")
    assert list(outside.iterdir()) == []
