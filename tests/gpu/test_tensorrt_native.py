"""Native TensorRT backend on a GPU: parity with PyTorch over 100+ chained segments, ping-pong."""
import numpy as np
import pytest

from rmt_runtime import RMTRuntime

pytestmark = pytest.mark.usefixtures("needs_tensorrt")


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-3), ("fp16", 5e-2)])
def test_tensorrt_matches_onnxruntime_cpu_over_128_segments(bundle_factory, tmp_path, precision, tolerance):
    import shutil

    model, exported = bundle_factory("gpt2", precision)
    bundle = tmp_path / "bundle"
    shutil.copytree(exported.path, bundle)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 16 * 128))
    trt_runtime = RMTRuntime.load(bundle, backend="tensorrt")
    assert trt_runtime.runner.name.startswith("tensorrt/")
    a, b = trt_runtime.run(ids), RMTRuntime.load(bundle, provider="cpu").run(ids)
    assert np.abs(a.memory - b.memory).max() < tolerance
    assert np.abs(a.last_logits - b.last_logits).max() < tolerance
    state = trt_runtime.new_state()
    assert state.handles["memory"].ptr != state.scratch["memory"].ptr  # ping-pong buffers


def test_cuda_graph_replay_equals_plain_execution(bundle_factory, tmp_path):
    """Captured graphs (two per state: the ping-pong arrangements) replay to the same memory
    as plain execution, over enough segments that both graphs replay many times."""
    import shutil

    model, exported = bundle_factory("gpt2", "fp32")
    bundle = tmp_path / "bundle"
    shutil.copytree(exported.path, bundle)
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 16 * 64 + 5))
    plain = RMTRuntime.load(bundle, backend="tensorrt")
    graphed = RMTRuntime.load(bundle, backend="tensorrt", cuda_graphs=True)
    assert "CUDA graphs" in graphed.runner.name
    a, b = plain.run(ids), graphed.run(ids)
    np.testing.assert_array_equal(a.memory, b.memory)
    np.testing.assert_array_equal(a.last_logits, b.last_logits)
    assert len(graphed.runner._captured) == 2  # one ingest graph per ping-pong arrangement
