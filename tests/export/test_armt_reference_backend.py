"""The PyTorch reference backend on an ARMT bundle: rmt_export.reference_backend runs the
ARMT's own step (export/armt_graphs.py's ARMTStepModule, what the graphs were traced from)
behind the runner interface, with every named state pair, and ONNX Runtime agrees with it.
"""
import numpy as np
import pytest
import torch

from rmt_export.reference_backend import reference_runtime
from rmt_runtime import BackendError, RMTRuntime

SEGMENT = 16


def ids_of(rows, length, seed=21):
    return np.random.default_rng(seed).integers(0, 97, size=(rows, length)).astype(np.int64)


def test_the_reference_runs_the_armt_and_onnxruntime_agrees_over_chained_segments(armt_bundle_factory,
                                                                                   armt_checkpoint):
    model, bundle = armt_bundle_factory("fp32")
    reference = reference_runtime(bundle, armt_checkpoint)
    assert reference.picked.startswith("torch/cpu (the PyTorch reference")
    ids = ids_of(2, 6 * SEGMENT)
    mask = np.ones_like(ids)
    mask[1, 4 * SEGMENT + 7:] = 0  # a row that ends mid-segment: padding in the last two segments
    torch_out = reference.run(ids, mask)
    ort_out = RMTRuntime.load(bundle, backend="onnxruntime").run(ids, mask)
    assert torch_out.memory is None and sorted(torch_out.state) == sorted(ort_out.state)
    assert sorted(torch_out.state) == sorted(model.state_shapes(1))
    # The reference is the model: its state equals the model's own segment loop, bit for bit.
    with torch.no_grad():
        loop = model(torch.from_numpy(ids), torch.from_numpy(mask))
    for name, value in loop.state.items():
        np.testing.assert_array_equal(torch_out.state[name], value.numpy(), err_msg=name)
    # ONNX Runtime vs PyTorch, fp32, 6 chained segments: measured 1.0e-7 in the last logits,
    # 2.7e-7 in z (scale 1.5) and 7e-9 in W_mem (scale 0.03); the bundle's own validation
    # allows 1e-4 over 32 segments. 1e-5 (relative to a scale of at least 1) leaves room for
    # other ONNX Runtime kernels and thread counts and is far below what a swapped state pair
    # or a dropped segment moves (the memory moves the logits by > 1e-2: test_armt_bundle.py).
    assert np.abs(torch_out.last_logits - ort_out.last_logits).max() < 1e-5
    for name, value in torch_out.state.items():
        scale = max(1.0, float(np.abs(value).max()))
        assert np.abs(ort_out.state[name] - value).max() <= 1e-5 * scale, name
        assert np.abs(value).max() > 0, name  # every layer wrote


def test_a_checkpoint_of_another_model_is_refused(armt_bundle_factory, armt_checkpoint, tiny_checkpoint,
                                                  bundle_factory):
    _, bundle = armt_bundle_factory("fp32")
    with pytest.raises(BackendError, match="does not hold the model of bundle"):
        reference_runtime(bundle, tiny_checkpoint[0])  # an RMT checkpoint for the ARMT bundle
    with pytest.raises(BackendError, match="does not hold the model of bundle"):
        reference_runtime(bundle_factory("gpt2")[1].path, armt_checkpoint)  # and the other way round
