"""The TensorRT path's control flow on the CPU, against the FAKE tensorrt and cuda-python of
tests/fakes: which context is captured, what happens when a capture fails, which engines
load, timing caches, TF32, the stream lock, buffer reuse, CUDA error names.

The fake engine runs the bundle's ONNX graph with ONNX Runtime on the fake device memory at
the addresses the runner binds, so its numbers equal ONNX Runtime's only when the runner's
plumbing is right. These tests pin logic; GPU results come from tests/gpu on a GPU.
"""
import gc
import json
import shutil
import threading

import numpy as np
import pytest

from rmt_runtime import Bundle, RMTRuntime
from rmt_runtime.engines import (BuildOptions, EngineError, build_bundle_engines, engine_fields, find_engines,
                                 timing_cache_path)
from rmt_runtime.errors import BackendError, RuntimeInputError
from tests import fakes


@pytest.fixture
def gpu(monkeypatch):
    """(fake tensorrt, fake cudart), installed for this test."""
    return fakes.install(monkeypatch)


@pytest.fixture
def bundle_dir(bundle_factory, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(bundle_factory("gpt2", "fp32")[1].path, target)
    return target


def ids_for(bundle_dir, shape, seed=0):
    vocab = Bundle.load(bundle_dir).vocab_size
    return np.random.default_rng(seed).integers(0, vocab, shape, dtype=np.int64)


def onnxruntime_result(bundle_dir, ids):
    return RMTRuntime.load(bundle_dir, provider="cpu").run(ids)


def assert_same(got, want):
    np.testing.assert_allclose(got.memory, want.memory, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.last_logits, want.last_logits, rtol=0, atol=1e-6)


# ---- defect 4: loading never builds; it takes the engines rmt-build made, with their options ----
def test_load_without_engines_is_an_error_naming_rmt_build_and_builds_nothing(gpu, bundle_dir):
    trt, _ = gpu
    with pytest.raises(EngineError, match=rf"no TensorRT engines for this machine.*rmt-build --bundle {bundle_dir}"):
        RMTRuntime.load(bundle_dir, backend="tensorrt")
    assert trt.state.builds == []
    assert not (bundle_dir / "engines").exists()


def test_engines_built_with_other_options_are_found_and_their_batch_limit_applies(gpu, bundle_dir):
    build_bundle_engines(bundle_dir, BuildOptions(max_batch=2))
    rt = RMTRuntime.load(bundle_dir, backend="tensorrt")
    assert rt.runner.engines.options == BuildOptions(max_batch=2)
    assert "rmt-build --max-batch 2" in rt.picked
    assert rt.runner.max_batch == 2
    assert_same(rt.run(ids_for(bundle_dir, (2, 40))), onnxruntime_result(bundle_dir, ids_for(bundle_dir, (2, 40))))
    with pytest.raises(RuntimeInputError, match=r"batch 3 is outside 1\.\.2"):
        rt.run(ids_for(bundle_dir, (3, 40)))


def test_the_newest_complete_set_is_taken_and_explicit_options_must_match(gpu, bundle_dir):
    build_bundle_engines(bundle_dir, BuildOptions(max_batch=2))
    build_bundle_engines(bundle_dir, BuildOptions(max_batch=4))
    bundle = Bundle.load(bundle_dir)
    for meta in (bundle_dir / "engines").glob("*.json"):  # the max-batch-4 set built later
        data = json.loads(meta.read_text())
        data["built_at"] = "2026-01-02T00:00:00+00:00" if data["max_batch"] == 4 else "2026-01-01T00:00:00+00:00"
        meta.write_text(json.dumps(data))
    found = find_engines(bundle)
    assert found.options.max_batch == 4 and found.others == 1
    assert find_engines(bundle, options=BuildOptions(max_batch=2)).options.max_batch == 2
    with pytest.raises(EngineError, match=r"was built for fp16_flag=False, not True.*rmt-build --bundle \S+ --fp16$"):
        find_engines(bundle, options=BuildOptions(max_batch=8, fp16_flag=True))


def test_engines_of_another_gpu_are_refused_naming_what_differs(monkeypatch, bundle_dir):
    fakes.install(monkeypatch, name="Fake Thor", capability=(11, 0))
    build_bundle_engines(bundle_dir, BuildOptions())
    fakes.install(monkeypatch, name="Fake Orin", capability=(8, 7))
    with pytest.raises(EngineError, match=r"was built for gpu='Fake Thor', not 'Fake Orin'"):
        RMTRuntime.load(bundle_dir, backend="tensorrt")


def test_a_plan_without_its_metadata_is_not_loaded(gpu, bundle_dir):
    """The metadata is written last: a build killed between the two files leaves no usable engine."""
    build_bundle_engines(bundle_dir, BuildOptions())
    for meta in (bundle_dir / "engines").glob("step-*.json"):
        meta.unlink()
    with pytest.raises(EngineError, match="no TensorRT engines for this machine"):
        find_engines(Bundle.load(bundle_dir))


# ---- defect 10: the key covers external weights; engine I/O and addresses are checked ----------
def test_the_engine_key_covers_the_graphs_external_weights(gpu, bundle_dir):
    bundle = Bundle.load(bundle_dir)
    files = dict(bundle.manifest["files"], **{"step.onnx.data": "a" * 64})
    with_data = Bundle(path=bundle.path, manifest=dict(bundle.manifest, files=files))
    changed = Bundle(path=bundle.path, manifest=dict(bundle.manifest, files=dict(files, **{"step.onnx.data": "b" * 64})))
    device = fakes.fake_tensorrt.state.cudart
    from rmt_runtime.engines import current_device

    here = current_device("tensorrt")
    a = engine_fields(with_data, "step", "tensorrt", "10.3.0", here, BuildOptions())
    b = engine_fields(changed, "step", "tensorrt", "10.3.0", here, BuildOptions())
    assert a["data_sha256"] == {"step.onnx.data": "a" * 64} and a != b
    assert engine_fields(bundle, "step", "tensorrt", "10.3.0", here, BuildOptions())["data_sha256"] == {}
    assert device.device_name == here.name


def test_an_engine_whose_tensor_dtype_differs_from_the_spec_is_refused_at_load(gpu, bundle_dir):
    trt, _ = gpu
    build_bundle_engines(bundle_dir, BuildOptions())
    trt.state.engine_dtype_override["memory"] = trt.DataType.HALF
    with pytest.raises(BackendError, match=r"memory: engine HALF, spec float32.*rmt-build"):
        RMTRuntime.load(bundle_dir, backend="tensorrt")


def test_a_refused_tensor_address_is_an_error(gpu, bundle_dir):
    trt, _ = gpu
    build_bundle_engines(bundle_dir, BuildOptions())
    rt = RMTRuntime.load(bundle_dir, backend="tensorrt")
    trt.state.refuse_address.add("input_ids")
    with pytest.raises(BackendError, match="refused the device address of input_ids"):
        rt.run(ids_for(bundle_dir, (1, 16)))


# ---- defect 7: TF32 off in fp32 engines unless asked for, and in the key -----------------------
def test_fp32_engines_clear_tf32_and_record_it(gpu, bundle_dir):
    trt, _ = gpu
    build_bundle_engines(bundle_dir, BuildOptions())
    assert [plan["tf32"] for plan in trt.state.builds] == [False, False]
    metadata = [json.loads(p.read_text()) for p in (bundle_dir / "engines").glob("*.json")]
    assert [m["tf32"] for m in metadata] == [False, False]
    build_bundle_engines(bundle_dir, BuildOptions(tf32=True))
    assert [plan["tf32"] for plan in trt.state.builds[2:]] == [True, True]
    assert len(list((bundle_dir / "engines").glob("*.plan"))) == 4  # another key: both sets kept


def test_tf32_is_refused_for_an_fp16_bundle(gpu, bundle_factory, tmp_path):
    target = tmp_path / "fp16"
    shutil.copytree(bundle_factory("gpt2", "fp16")[1].path, target)
    with pytest.raises(EngineError, match="--tf32 applies to fp32 bundles; this one is fp16"):
        build_bundle_engines(target, BuildOptions(tf32=True))


# ---- defect 5: one timing cache per TensorRT version and GPU; a rejected or missing one --------
def test_timing_caches_are_kept_per_tensorrt_version_and_gpu(monkeypatch, bundle_dir):
    fakes.install(monkeypatch, version="10.3.0", name="Fake Orin")
    build_bundle_engines(bundle_dir, BuildOptions())
    fakes.install(monkeypatch, version="10.13.0", name="Fake Thor", capability=(11, 0))
    build_bundle_engines(bundle_dir, BuildOptions())
    caches = sorted(p.name for p in (bundle_dir / "engines").glob("timing-*.cache"))
    assert caches == ["timing-tensorrt-10.13.0-Fake_Thor-sm11.0.cache", "timing-tensorrt-10.3.0-Fake_Orin-sm8.7.cache"]


def test_a_rejected_timing_cache_starts_a_new_one_and_the_build_succeeds(gpu, bundle_dir):
    trt, _ = gpu
    bundle = Bundle.load(bundle_dir)
    from rmt_runtime.engines import current_device

    cache = timing_cache_path(bundle, "tensorrt", trt.__version__, current_device("tensorrt"))
    cache.parent.mkdir()
    cache.write_bytes(b"a cache some other TensorRT wrote")
    trt.state.reject_timing_cache = True
    said = []
    engines = build_bundle_engines(bundle_dir, BuildOptions(), said.append)
    assert set(engines) == {"ingest", "step"}
    assert any("timing cache was made for another GPU or TensorRT version" in line for line in said)
    assert cache.read_bytes() == f"fake timing cache of TensorRT {trt.__version__}".encode()  # a new one


def test_no_timing_cache_back_from_the_builder_saves_none_and_keeps_the_engine(gpu, bundle_dir):
    trt, _ = gpu
    trt.state.no_timing_cache_back = True
    engines = build_bundle_engines(bundle_dir, BuildOptions())
    assert set(engines) == {"ingest", "step"}
    assert list((bundle_dir / "engines").glob("timing-*.cache")) == []


# ---- defect 6: CUDA errors by name, with the cuda-python pin where it is the cause -------------
def test_an_insufficient_driver_is_named_with_the_cuda_python_pin(gpu, bundle_dir):
    _, cudart = gpu
    cudart.device_count_error = cudart.cudaError_t.cudaErrorInsufficientDriver
    with pytest.raises(EngineError, match=r"cudaGetDeviceCount: cudaErrorInsufficientDriver.*cuda-python>=12.6,<13"):
        build_bundle_engines(bundle_dir, BuildOptions())


def test_a_failed_cuda_call_is_named_with_its_error(gpu, bundle_dir):
    _, cudart = gpu
    build_bundle_engines(bundle_dir, BuildOptions())
    rt = RMTRuntime.load(bundle_dir, backend="tensorrt")
    cudart.fail["cudaMalloc"] = cudart.cudaError_t.cudaErrorMemoryAllocation
    with pytest.raises(BackendError, match=r"cudaMalloc \(\d+ bytes\) failed: cudaErrorMemoryAllocation"):
        rt.new_state(batch=2)


# ---- defect 2: one execution context per captured graph, never changed after capture -----------
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_results_equal_onnxruntime_over_chained_segments(gpu, bundle_dir, cuda_graphs):
    trt, cudart = gpu
    build_bundle_engines(bundle_dir, BuildOptions())
    ids = ids_for(bundle_dir, (2, 16 * 12 + 5))   # 12 full segments and a partial one
    rt = RMTRuntime.load(bundle_dir, backend="tensorrt", cuda_graphs=cuda_graphs)
    assert_same(rt.run(ids), onnxruntime_result(bundle_dir, ids))
    assert trt.state.violations == [] and cudart.violations == []
    assert cudart.stream_flags and set(cudart.stream_flags.values()) == {cudart.cudaStreamNonBlocking}


def test_each_captured_graph_has_its_own_context_and_partial_segments_run_uncaptured(gpu, bundle_dir):
    trt, cudart = gpu
    build_bundle_engines(bundle_dir, BuildOptions())
    rt = RMTRuntime.load(bundle_dir, backend="tensorrt", cuda_graphs=True)
    state = rt.new_state()
    ids = ids_for(bundle_dir, 16 * 9 + 3)
    rt.feed(state, ids[:16 * 5 + 3])   # 5 full segments, 3 tokens pending
    rt.feed(state, ids[16 * 5 + 3:])   # 4 more full segments
    rt.flush(state)                    # the partial last one
    assert rt.runner.captured_graphs == 2            # the ingest graph, once per ping-pong arrangement
    captured = [c for c in trt.state.contexts if c.captured]
    assert len(captured) == 2 and len({id(c) for c in captured}) == 2
    plain = rt.runner._plain["ingest"]
    assert not plain.captured and plain.shapes["input_ids"] == (1, 3)  # the partial segment, on the plain context
    assert cudart.calls.count("cudaGraphLaunch") == 9 - 2  # every full segment after each first replayed
    assert trt.state.violations == [] and cudart.violations == []
    want = RMTRuntime.load(bundle_dir, provider="cpu")
    other = want.new_state()
    want.feed(other, ids)
    want.flush(other)
    np.testing.assert_allclose(rt.memory(state), want.memory(other), rtol=0, atol=1e-6)


# ---- defect 3: a failed capture is ended, cleared, said once, and the graph runs plainly --------
def test_a_failed_capture_falls_back_to_plain_execution_and_says_so_once(gpu, bundle_dir, capfd):
    trt, cudart = gpu
    build_bundle_engines(bundle_dir, BuildOptions())
    trt.state.uncapturable = True   # as CumSum's loop before TensorRT 10.8
    ids = ids_for(bundle_dir, (1, 16 * 8))
    rt = RMTRuntime.load(bundle_dir, backend="tensorrt", cuda_graphs=True)
    assert_same(rt.run(ids), onnxruntime_result(bundle_dir, ids))
    assert rt.runner.uncapturable == {"ingest"} and rt.runner.captured_graphs == 0
    assert cudart.calls.count("cudaStreamEndCapture") == 1 and "cudaGetLastError" in cudart.calls
    assert cudart.last_error == cudart.cudaError_t.cudaSuccess  # cleared: the next call sees no stale error
    assert "cudaGraphLaunch" not in cudart.calls
    err = capfd.readouterr().err
    assert err.count("CUDA graphs off for the ingest graph") == 1
    assert "cudaErrorStreamCaptureInvalidated" in err and "CumSum" in err
    assert "CUDA graphs off for the ingest graph" in rt.picked
    rt.run(ids)   # still plain, never captured again
    assert cudart.calls.count("cudaStreamBeginCapture") == 1


def test_a_capture_whose_instantiation_fails_is_destroyed_and_falls_back(gpu, bundle_dir):
    trt, cudart = gpu
    build_bundle_engines(bundle_dir, BuildOptions())
    cudart.fail["cudaGraphInstantiate"] = cudart.cudaError_t.cudaErrorMemoryAllocation
    rt = RMTRuntime.load(bundle_dir, backend="tensorrt", cuda_graphs=True)
    ids = ids_for(bundle_dir, (1, 16 * 4))
    assert_same(rt.run(ids), onnxruntime_result(bundle_dir, ids))
    assert "cudaGraphInstantiate: cudaErrorMemoryAllocation" in rt.picked
    assert "cudaGraphDestroy" in cudart.calls and cudart.graphs == {}


# ---- defect 8: one lock around all stream work -------------------------------------------------
class ObservedLock:
    """An RLock that says when a thread has to wait for it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.waiting = threading.Event()

    def acquire(self, blocking=True, timeout=-1):
        if self._lock.acquire(blocking=False):
            return True
        self.waiting.set()
        return self._lock.acquire(blocking, timeout)

    __enter__ = acquire

    def release(self):
        self._lock.release()

    def __exit__(self, *exc):
        self.release()


def test_no_other_thread_touches_the_stream_while_a_graph_is_captured(gpu, bundle_dir):
    trt, cudart = gpu
    build_bundle_engines(bundle_dir, BuildOptions())
    rt = RMTRuntime.load(bundle_dir, backend="tensorrt", cuda_graphs=True)
    rt.runner._stream_lock = lock = ObservedLock()
    other = {}
    finished = threading.Event()

    def new_state_elsewhere():
        other["state"] = rt.new_state(memory=np.ones((1, *rt.state_shapes["memory"]), np.float32))
        finished.set()

    def during_capture():  # a second thread makes a state (an upload) while the first one captures
        cudart.on_begin_capture = None
        worker = threading.Thread(target=new_state_elsewhere)
        worker.start()
        while not (lock.waiting.is_set() or finished.is_set()):
            lock.waiting.wait(0.01)
        other["worker"], other["waited"] = worker, lock.waiting.is_set()

    cudart.on_begin_capture = during_capture
    ids = ids_for(bundle_dir, (1, 16 * 3))
    got = rt.run(ids)
    other["worker"].join()
    assert other["waited"], "the second thread's upload ran while the stream was capturing"
    assert cudart.violations == [] and rt.runner.captured_graphs == 2
    np.testing.assert_array_equal(rt.memory(other["state"]), np.ones((1, *rt.state_shapes["memory"]), np.float32))
    assert_same(got, onnxruntime_result(bundle_dir, ids))


def test_buffers_dropped_during_a_capture_are_freed_after_it(gpu, bundle_dir):
    trt, cudart = gpu
    build_bundle_engines(bundle_dir, BuildOptions())
    rt = RMTRuntime.load(bundle_dir, backend="tensorrt", cuda_graphs=True)
    doomed = [rt.new_state()]
    pointers = {buffer.ptr for buffer in [*doomed[0].handles.values(), *doomed[0].scratch.values()]}

    def drop_a_state():
        cudart.on_begin_capture = None
        doomed.clear()   # its device buffers die here, mid-capture
        gc.collect()

    cudart.on_begin_capture = drop_a_state
    rt.run(ids_for(bundle_dir, (1, 16 * 2)))
    assert cudart.violations == []           # no cudaFree while capturing ...
    rt.new_state()
    assert pointers <= set(cudart.freed)     # ... but freed by a later locked call


# ---- defect 9: device buffers bounded by the batch sizes used, not by the lengths seen ---------
def test_io_buffers_are_allocated_once_per_graph_and_batch_at_full_size(gpu, bundle_dir):
    _, cudart = gpu
    build_bundle_engines(bundle_dir, BuildOptions())
    rt = RMTRuntime.load(bundle_dir, backend="tensorrt")
    state = rt.new_state()
    rt.feed(state, ids_for(bundle_dir, 16 + 5))   # a full segment and a partial one
    rt.flush(state)
    after_two_lengths = cudart.live_bytes()
    for length in range(1, 17):                   # every length a segment can have
        rt.feed(state, ids_for(bundle_dir, length, seed=length))
        rt.flush(state)
    assert cudart.live_bytes() == after_two_lengths  # nothing allocated per length
    assert all(buf.shape[1] == 16 for key, buf in rt.runner._io.items() if key[1] == "input_ids")
    assert cudart.violations == []
