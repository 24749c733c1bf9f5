"""The openvino backend: real OpenVINO running real bundles, against ONNX Runtime and PyTorch.

fp32 must equal ONNX Runtime to rounding over many chained segments (same graph, other
kernels); bf16 must differ from fp32 (it really computes in bf16: a silent fp32 fallback
would be caught) and stay within the bf16 validation bound of docs/VALIDATION.md. The
state is the same named float32 tensors every backend carries, so streaming, resume and
generation work unchanged. Refusals (int8 bundles, a precision OpenVINO does not run here)
come before any work, with the reason.
"""
import threading

import numpy as np
import pytest

from rmt_runtime import GenerationConfig, RMTRuntime
from rmt_runtime.bundle import Bundle
from rmt_runtime.errors import BackendError

openvino = pytest.importorskip("openvino")

from rmt_runtime.backends.openvino import (OpenVinoRunner, check_precision_available,  # noqa: E402
                                           compile_graph)

BF16 = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
needs_bf16 = pytest.mark.skipif(not BF16, reason="this CPU has no bf16 instructions (AVX-512 BF16 or AMX)")
SEGMENTS = 12  # full segments per sequence, then a partial one


def _ids(bundle: Bundle, batch: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` rows of SEGMENTS full segments and a half one; the second row right-padded."""
    size = bundle.segment_size
    length = SEGMENTS * size + size // 2
    ids = np.random.default_rng(seed).integers(4, bundle.vocab_size, (batch, length))
    mask = np.ones_like(ids)
    mask[1:, length - size:] = 0
    return ids, mask


def assert_within_fp32_bound(got: np.ndarray, expected: np.ndarray) -> None:
    """|got - expected| within the fp32 validation bound (1e-4 + 1e-4 x max|expected|, the one
    ONNX Runtime's graphs are held to against PyTorch): other kernels, same graph."""
    from rmt_export.validate import TOLERANCES

    assert got.shape == expected.shape
    error, bound = np.abs(got - expected).max(), TOLERANCES["fp32"].bound(np.abs(expected).max())
    assert error <= bound, f"max abs error {error:.3g} > bound {bound:.3g}"


@pytest.fixture(scope="module")
def gpt2(bundle_factory):
    return Bundle.load(bundle_factory("gpt2", initializer_range=0.2)[1].path)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_fp32_equals_onnxruntime_over_chained_segments(bundle_factory, family):
    bundle = Bundle.load(bundle_factory(family, initializer_range=0.2)[1].path)
    ids, mask = _ids(bundle)
    expected = RMTRuntime.load(bundle, backend="onnxruntime").run(ids, mask)
    got = RMTRuntime.load(bundle, backend="openvino").run(ids, mask)
    # Same fp32 graph, other kernels: rounding-level differences only, not growing over 12 segments.
    for name in expected.state:
        assert_within_fp32_bound(got.state[name], expected.state[name])
    assert_within_fp32_bound(got.last_logits, expected.last_logits)


def test_fp32_step_graph_logits_equal_onnxruntime(gpt2):
    ids, mask = _ids(gpt2)
    expected = RMTRuntime.load(gpt2, backend="onnxruntime").run(ids, mask, return_logits=True)
    got = RMTRuntime.load(gpt2, backend="openvino", precision="fp32").run(ids, mask, return_logits=True)
    assert_within_fp32_bound(got.logits, expected.logits)


def test_armt_named_state_pairs_equal_onnxruntime(armt_bundle_factory):
    bundle = Bundle.load(armt_bundle_factory("fp32")[1])
    ids, mask = _ids(bundle)
    expected = RMTRuntime.load(bundle, backend="onnxruntime").run(ids, mask)
    got = RMTRuntime.load(bundle, backend="openvino").run(ids, mask)
    assert set(got.state) == set(expected.state) and len(got.state) > 2  # W_mem.{l} and z.{l}
    for name in expected.state:
        assert_within_fp32_bound(got.state[name], expected.state[name])
    assert_within_fp32_bound(got.last_logits, expected.last_logits)


@needs_bf16
def test_bf16_really_runs_and_stays_within_the_bf16_bound(gpt2):
    from rmt_export.validate import TOLERANCES

    ids, mask = _ids(gpt2)
    fp32 = RMTRuntime.load(gpt2, backend="openvino", precision="fp32").run(ids, mask)
    bf16 = RMTRuntime.load(gpt2, backend="openvino", precision="bf16").run(ids, mask)
    error = np.abs(bf16.last_logits - fp32.last_logits).max()
    memory_error = np.abs(bf16.memory - fp32.memory).max()
    # bf16 keeps 8 mantissa bits: a silent fp32 run would agree to ~1e-6.
    assert error > 1e-4 and memory_error > 1e-4
    bound = TOLERANCES["bf16"]
    assert error <= bound.bound(np.abs(fp32.last_logits).max())
    assert memory_error <= bound.bound(np.abs(fp32.memory).max())
    assert (bf16.last_logits.argmax(-1) == fp32.last_logits.argmax(-1)).all()


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=needs_bf16)])
def test_streamed_chunks_and_resume_equal_one_run(gpt2, tmp_path, precision):
    ids, _ = _ids(gpt2, batch=1)
    rt = RMTRuntime.load(gpt2, backend="openvino", precision=precision)
    whole = rt.run(ids[0])
    state = rt.new_state()
    cut = 5 * gpt2.segment_size + 3
    for start in range(0, cut, 7):  # uneven chunks
        rt.feed(state, ids[0, start:min(start + 7, cut)])
    rt.save_state(state, tmp_path / "seq.npz")
    fresh = RMTRuntime.load(gpt2, backend="openvino", precision=precision)
    resumed = fresh.restore_state(tmp_path / "seq.npz")
    fresh.feed(resumed, ids[0, cut:])
    out = fresh.flush(resumed)
    np.testing.assert_array_equal(out.memory, whole.memory)
    np.testing.assert_array_equal(out.last_logits, whole.last_logits)


def test_a_state_moves_between_onnxruntime_and_openvino(gpt2, tmp_path):
    ids, _ = _ids(gpt2, batch=1)
    half = 6 * gpt2.segment_size
    ort = RMTRuntime.load(gpt2, backend="onnxruntime")
    state = ort.new_state()
    ort.feed(state, ids[0, :half])
    ort.save_state(state, tmp_path / "seq.npz")
    ov = RMTRuntime.load(gpt2, backend="openvino")
    moved = ov.restore_state(tmp_path / "seq.npz")
    ov.feed(moved, ids[0, half:])
    assert_within_fp32_bound(ov.flush(moved).memory, ort.run(ids[0]).memory)


def test_generation_with_rollover_gives_onnxruntime_tokens(gpt2):
    prompts = np.random.default_rng(3).integers(4, gpt2.vocab_size, (2, 2 * gpt2.segment_size + 5)).tolist()
    config = GenerationConfig(max_new_tokens=2 * gpt2.segment_size, stop_tokens=())  # rolls over a segment
    expected = RMTRuntime.load(gpt2, backend="onnxruntime").generate(prompts, config)
    got = RMTRuntime.load(gpt2, backend="openvino").generate(prompts, config)
    assert got.tokens == expected.tokens


def test_threads_running_their_own_sequences_match_one_thread(gpt2):
    rt = RMTRuntime.load(gpt2, backend="openvino")
    inputs = [_ids(gpt2, batch=1, seed=seed)[0][0] for seed in range(4)]
    alone = [rt.run(ids).last_logits for ids in inputs]
    together: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, rt.run(inputs[i]).last_logits))
               for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, logits in enumerate(alone):
        np.testing.assert_array_equal(together[i], logits)


def test_an_output_bound_once_is_never_written_again_by_a_later_call(gpt2):
    """A call that gives no buffer for new_memory must not write into the one the last call
    was given: the caller may now be reading it (the state handed back as the input)."""
    runner = OpenVinoRunner(gpt2).activate()
    ids = np.random.default_rng(0).integers(4, gpt2.vocab_size, (1, gpt2.segment_size))
    mask = np.ones_like(ids)
    start = runner.to_device(np.asarray(gpt2.initial_state()["memory"])[None])
    buffer = runner.empty(runner.shape_of(start), "float32")
    runner.run("ingest", {"input_ids": ids, "attention_mask": mask, "memory": start}, into={"new_memory": buffer})
    first = runner.to_host(buffer)
    second = runner.run("ingest", {"input_ids": ids[:, ::-1].copy(), "attention_mask": mask, "memory": buffer},
                        want=("new_memory",)).host["new_memory"]
    np.testing.assert_array_equal(runner.to_host(buffer), first)
    assert not np.array_equal(second, first)


def test_int8_and_fp16_bundles_are_refused_with_the_reason(bundle_factory):
    int8 = Bundle.load(bundle_factory("gpt2", "int8")[1].path)
    with pytest.raises(BackendError, match="int8.*in float.*--backend onnxruntime"):
        RMTRuntime.load(int8, backend="openvino")
    fp16 = Bundle.load(bundle_factory("gpt2", "fp16")[1].path)
    with pytest.raises(BackendError, match="fp16 bundles are for GPUs"):
        RMTRuntime.load(fp16, backend="openvino", precision="bf16")


def test_precision_and_provider_requests_that_would_not_run_are_errors(gpt2):
    with pytest.raises(BackendError, match="unknown precision 'fp16'.*bf16.*fp32"):
        RMTRuntime.load(gpt2, backend="openvino", precision="fp16")
    with pytest.raises(BackendError, match="onnxruntime backend computes in the bundle's own precision \\(fp32\\), "
                                           "not bf16.*openvino"):
        RMTRuntime.load(gpt2, backend="onnxruntime", precision="bf16")
    with pytest.raises(BackendError, match="auto backend computes in the bundle's own precision"):
        RMTRuntime.load(gpt2, precision="bf16")
    with pytest.raises(BackendError, match="provider 'cuda' is an onnxruntime provider"):
        RMTRuntime.load(gpt2, backend="openvino", provider="cuda")
    assert RMTRuntime.load(gpt2, backend="onnxruntime", precision="fp32").runner.name.startswith("onnxruntime")


class FakeCompiled:
    """Stands in for a compiled model: reports the precision the fake plugin chose."""

    def __init__(self, running: str) -> None:
        self.running = running

    def get_property(self, name):
        assert name == "INFERENCE_PRECISION_HINT"
        return openvino.Type.bf16 if self.running == "bf16" else openvino.Type.f32


class FakeCore:
    """Stands in for openvino.Core on a CPU without bf16: it compiles every request in f32, as
    OpenVINO does there, and says so in its capabilities."""

    def __init__(self) -> None:
        self.configs = []

    def get_property(self, device, name):
        assert (device, name) == ("CPU", "OPTIMIZATION_CAPABILITIES")
        return ["FP32", "INT8"]

    def compile_model(self, path, device, config):
        self.configs.append(config)
        return FakeCompiled("f32")


def test_bf16_on_a_cpu_without_it_is_refused_not_run_in_fp32(gpt2):
    core = FakeCore()
    with pytest.raises(BackendError, match="cannot compute in bf16.*FP32, INT8.*AVX-512 BF16 or AMX"):
        check_precision_available("bf16", core)
    with pytest.raises(BackendError, match="asked for bf16, but OpenVINO compiles ingest.onnx in f32"):
        compile_graph(core, gpt2.graph_path("ingest"), "bf16", threads=2)
    assert core.configs == [{"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                             "INFERENCE_NUM_THREADS": 2}]
    check_precision_available("fp32", core)  # fp32 runs anywhere


def test_fp32_is_asked_for_explicitly_not_left_to_the_plugin_default(gpt2):
    """OpenVINO's default on AMX CPUs is bf16: fp32 must be requested (pinned on the recorded
    config, since on a CPU without AMX the default would pass too), and is read back as f32."""
    core = FakeCore()
    compile_graph(core, gpt2.graph_path("ingest"), "fp32")
    assert core.configs == [{"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}]
    compiled = compile_graph(openvino.Core(), gpt2.graph_path("ingest"), "fp32")
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.f32


@needs_bf16
def test_picked_says_when_bf16_was_not_validated_at_export(gpt2):
    rt = RMTRuntime.load(gpt2, backend="openvino", precision="bf16")
    assert rt.picked == ("openvino/CPU (bf16) (asked for); bf16 was not validated when this bundle was exported "
                         "(rmt-export --bf16 validates it)")
    assert RMTRuntime.load(gpt2, backend="openvino").picked == "openvino/CPU (fp32) (asked for)"


def test_a_state_buffer_of_another_shape_is_resized_in_place_and_holds_the_output(gpt2):
    """The ``into`` handle is the Tensor OpenVINO writes: given one of another shape, OpenVINO
    resizes that same Tensor, so the output is never left somewhere the caller does not read."""
    runner = OpenVinoRunner(gpt2).activate()
    ids = np.random.default_rng(0).integers(4, gpt2.vocab_size, (2, gpt2.segment_size))
    start = runner.to_device(np.repeat(np.asarray(gpt2.initial_state()["memory"])[None], 2, axis=0))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "memory": start}
    expected = runner.run("ingest", feeds, want=("new_memory",)).host["new_memory"]
    small = runner.empty((1, *runner.shape_of(start)[1:]), "float32")
    result = runner.run("ingest", feeds, into={"new_memory": small})
    assert result.device["new_memory"] is small and runner.shape_of(small) == expected.shape
    np.testing.assert_array_equal(runner.to_host(small), expected)
