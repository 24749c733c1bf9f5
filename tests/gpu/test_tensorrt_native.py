"""Native TensorRT backend on a GPU: parity with PyTorch over 100+ chained segments, ping-pong."""
import shutil

import numpy as np
import pytest
import torch

from rmt_runtime import RMTRuntime

pytestmark = pytest.mark.usefixtures("needs_tensorrt")


# As tests/gpu/test_onnxruntime_gpu.py: ONNX Runtime CPU is at 1.2e-6 (fp32) and 1.1e-2 (fp16) from
# PyTorch on these 128 segments; each run records the TensorRT figures in the JUnit XML.
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-3), ("fp16", 5e-2)])
def test_tensorrt_matches_pytorch_over_128_segments(bundle_factory, tmp_path, precision, tolerance, record_property):
    model, exported = bundle_factory("gpt2", precision)
    bundle = tmp_path / "bundle"
    shutil.copytree(exported.path, bundle)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 16 * 128))
    trt_runtime = RMTRuntime.load(bundle, backend="tensorrt")
    assert sorted(p.name.split("-")[0] for p in (bundle / "engines").glob("*.plan")) == ["ingest", "step"]
    got = trt_runtime.run(ids)
    with torch.no_grad():
        reference = model(torch.from_numpy(ids))
    errors = {"memory": float(np.abs(got.memory - reference.memory.numpy()).max()),
              "last_logits": float(np.abs(got.last_logits - reference.logits[:, -1].numpy()).max())}
    for name, error in errors.items():
        record_property(f"{precision}_{name}_max_abs", error)
    assert max(errors.values()) < tolerance, errors
    state = trt_runtime.new_state()
    assert state.handles["memory"].ptr != state.scratch["memory"].ptr  # ping-pong buffers


def test_cuda_graph_replay_equals_plain_execution(bundle_factory, tmp_path):
    """Captured graphs (two per state: the ping-pong arrangements) replay to the same memory
    as plain execution, over enough segments that both graphs replay many times."""
    model, exported = bundle_factory("gpt2", "fp32")
    bundle = tmp_path / "bundle"
    shutil.copytree(exported.path, bundle)
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 16 * 64 + 5))
    plain = RMTRuntime.load(bundle, backend="tensorrt")
    graphed = RMTRuntime.load(bundle, backend="tensorrt", cuda_graphs=True)
    a, b = plain.run(ids), graphed.run(ids)
    np.testing.assert_array_equal(a.memory, b.memory)
    np.testing.assert_array_equal(a.last_logits, b.last_logits)
    assert len(graphed.runner._captured) == 2  # one ingest graph per ping-pong arrangement: graphs really replayed
    assert len(plain.runner._captured) == 0
