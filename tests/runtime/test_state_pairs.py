"""State as named pairs: a bundle whose graphs carry TWO state tensors runs through the same
runtime and runners as the RMT (no runner code of its own): segments, streaming, batches,
state files and resume. The graphs are written by hand with onnx.helper and checked
against a numpy implementation of the same recurrence.
"""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from rmt_runtime import RMTRuntime, StateError
from rmt_runtime.bundle import MANIFEST_SCHEMA_VERSION, write_manifest
from rmt_runtime.spec import BATCH, SEQ, SPEC_VERSION, GraphSpec, TensorSpec

VOCAB, SEGMENT, M, D, K = 11, 8, 2, 3, 4
MEMORY_INIT = np.arange(M * D, dtype=np.float32).reshape(M, D) / 10
SCALE = (np.arange(VOCAB, dtype=np.float32) + 1) / 100


def _graph(name: str) -> onnx.ModelProto:
    """memory' = 0.5 memory + 0.01 sum(ids*mask); counter' = counter + sum(mask) + mean(memory);
    logits = ids*mask x scale + sum(counter') (step: every position; ingest: the segment sum).
    A row with no tokens keeps its state."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=f),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=f),
        helper.make_node("Mul", ["ids_f", "mask_f"], ["x"]),
        helper.make_node("ReduceSum", ["x", "axis1"], ["s"], keepdims=1),                  # [B, 1]
        helper.make_node("ReduceSum", ["mask_f", "axis1"], ["n"], keepdims=1),             # [B, 1]
        helper.make_node("Mul", ["memory", "half"], ["decayed"]),
        helper.make_node("Mul", ["s", "hundredth"], ["s_small"]),
        helper.make_node("Unsqueeze", ["s_small", "axis2"], ["s_3d"]),                       # [B, 1, 1]
        helper.make_node("Add", ["decayed", "s_3d"], ["updated_memory"]),
        helper.make_node("ReduceMean", ["memory", "axes12"], ["memory_mean"], keepdims=0),  # [B]
        helper.make_node("Unsqueeze", ["memory_mean", "axis1"], ["memory_mean_2d"]),       # [B, 1]
        helper.make_node("Add", ["counter", "n"], ["counted"]),
        helper.make_node("Add", ["counted", "memory_mean_2d"], ["updated_counter"]),
        # Rows with no tokens keep their state, as the RMT's graphs do.
        helper.make_node("Greater", ["n", "zero"], ["has_tokens"]),                         # [B, 1]
        helper.make_node("Unsqueeze", ["has_tokens", "axis2"], ["has_tokens_3d"]),
        helper.make_node("Where", ["has_tokens_3d", "updated_memory", "memory"], ["new_memory"]),
        helper.make_node("Where", ["has_tokens", "updated_counter", "counter"], ["new_counter"]),
        helper.make_node("ReduceSum", ["new_counter", "axis1"], ["total"], keepdims=1),     # [B, 1]
    ]
    if name == "step":
        nodes += [helper.make_node("Unsqueeze", ["x", "axis2"], ["x_3d"]),
                  helper.make_node("Mul", ["x_3d", "scale"], ["scaled"]),
                  helper.make_node("Unsqueeze", ["total", "axis2"], ["total_3d"]),
                  helper.make_node("Add", ["scaled", "total_3d"], ["logits"])]
        first = helper.make_tensor_value_info("logits", f, ["batch", "seq", VOCAB])
    else:
        nodes += [helper.make_node("Mul", ["s", "scale"], ["scaled"]),
                  helper.make_node("Add", ["scaled", "total"], ["last_logits"])]
        first = helper.make_tensor_value_info("last_logits", f, ["batch", VOCAB])
    constants = [helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
                 helper.make_tensor("axis2", TensorProto.INT64, [1], [2]),
                 helper.make_tensor("axes12", TensorProto.INT64, [2], [1, 2]),
                 helper.make_tensor("half", f, [], [0.5]), helper.make_tensor("hundredth", f, [], [0.01]),
                 helper.make_tensor("zero", f, [], [0.0]),
                 helper.make_tensor("scale", f, [VOCAB], SCALE.tolist())]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("memory", f, ["batch", M, D]),
         helper.make_tensor_value_info("counter", f, ["batch", K])],
        [first, helper.make_tensor_value_info("new_memory", f, ["batch", M, D]),
         helper.make_tensor_value_info("new_counter", f, ["batch", K])], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _spec(name: str) -> GraphSpec:
    inputs = (TensorSpec("input_ids", "int64", (BATCH, SEQ)), TensorSpec("attention_mask", "int64", (BATCH, SEQ)),
              TensorSpec("memory", "float32", (BATCH, M, D)), TensorSpec("counter", "float32", (BATCH, K)))
    first = (TensorSpec("logits", "float32", (BATCH, SEQ, VOCAB)) if name == "step"
             else TensorSpec("last_logits", "float32", (BATCH, VOCAB)))
    outputs = (first, TensorSpec("new_memory", "float32", (BATCH, M, D)), TensorSpec("new_counter", "float32", (BATCH, K)))
    return GraphSpec(name, inputs, outputs, {"memory": "new_memory", "counter": "new_counter"})


@pytest.fixture(scope="module")
def two_state_bundle(tmp_path_factory):
    directory = tmp_path_factory.mktemp("two-state")
    for name in ("step", "ingest"):
        onnx.save(_graph(name), directory / f"{name}.onnx")
    np.save(directory / "memory_init.npy", MEMORY_INIT)
    write_manifest(directory, {
        "schema_version": MANIFEST_SCHEMA_VERSION, "spec_version": SPEC_VERSION, "kind": "decoder",
        "family": "synthetic", "num_mem_tokens": M, "segment_size": SEGMENT, "hidden_size": D,
        "vocab_size": VOCAB, "precision": "fp32", "opset": 18, "memory_init": "memory_init.npy",
        "graphs": {name: {"file": f"{name}.onnx", "spec": _spec(name).to_dict()} for name in ("step", "ingest")},
        "files": {"step.onnx": "", "ingest.onnx": "", "memory_init.npy": ""}, "producer": {}, "validation": None})
    return directory


def _reference(ids: np.ndarray) -> dict[str, np.ndarray]:
    """The same recurrence in numpy (float64), left-aligned segments, one row."""
    memory, counter = MEMORY_INIT.astype(np.float64), np.zeros(K)
    for start in range(0, len(ids), SEGMENT):
        segment = ids[start:start + SEGMENT].astype(np.float64)
        memory, counter = 0.5 * memory + 0.01 * segment.sum(), counter + len(segment) + memory.mean()
        last_logits = segment.sum() * SCALE + counter.sum()
    return {"memory": memory[None], "counter": counter[None], "last_logits": last_logits[None]}


def _ids(length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, length)


def test_a_bundle_with_two_state_pairs_runs_as_its_recurrence(two_state_bundle):
    rt = RMTRuntime.load(two_state_bundle, backend="onnxruntime")
    assert rt.state_pairs == {"memory": "new_memory", "counter": "new_counter"}
    ids = _ids(45, 0)  # 5 full segments and a partial one
    out = rt.run(ids)
    expected = _reference(ids)
    assert set(out.state) == {"memory", "counter"}
    for name in ("memory", "counter"):
        np.testing.assert_allclose(out.state[name], expected[name], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(out.last_logits, expected["last_logits"], rtol=1e-6, atol=1e-5)
    assert out.memory is out.state["memory"]


def test_two_state_pairs_stream_batch_save_and_resume_exactly(two_state_bundle, tmp_path):
    rt = RMTRuntime.load(two_state_bundle, backend="onnxruntime")
    rows = [_ids(37, 1), _ids(20, 2), _ids(3, 3)]
    alone = [rt.run(row) for row in rows]
    state = rt.new_state(3)
    for chunk_start in range(0, 37, 7):  # ragged chunks, rows of different lengths
        rt.feed(state, [row[chunk_start:chunk_start + 7] for row in rows])
        if chunk_start == 14:
            rt.save_state(state, tmp_path / "mid.npz")
    together = rt.flush(state)
    for r, single in enumerate(alone):
        for name in ("memory", "counter"):
            np.testing.assert_array_equal(together.state[name][r], single.state[name][0])
        np.testing.assert_array_equal(together.last_logits[r], single.last_logits[0])
    with np.load(tmp_path / "mid.npz") as saved:
        assert {"state.memory", "state.counter"} <= set(saved.files)
        assert json.loads(bytes(saved["header"]).decode())["state"] == ["counter", "memory"]
    resumed = rt.restore_state(tmp_path / "mid.npz")
    for chunk_start in range(21, 37, 7):
        rt.feed(resumed, [row[chunk_start:chunk_start + 7] for row in rows])
    again = rt.flush(resumed)
    for name in ("memory", "counter"):
        np.testing.assert_array_equal(again.state[name], together.state[name])
    rows_again = rt.unstack(rt.stack(rt.unstack(rt.restore_state(tmp_path / "mid.npz"))))
    assert [rt.state_tensors(s)["counter"].shape for s in rows_again] == [(1, K)] * 3


def test_a_state_file_missing_a_named_state_is_refused(two_state_bundle, tmp_path):
    rt = RMTRuntime.load(two_state_bundle, backend="onnxruntime")
    state = rt.new_state()
    rt.feed(state, _ids(10, 4))
    rt.save_state(state, tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as saved:
        arrays = {name: saved[name] for name in saved.files if name != "state.counter"}
    np.savez(tmp_path / "partial.npz", **arrays)
    with pytest.raises(StateError, match=r"holds state \['memory'\], this bundle's state is \['counter', 'memory'\]"):
        rt.restore_state(tmp_path / "partial.npz")
    with pytest.raises(Exception, match=r"counter must be float32 \[1, 4\]"):
        rt.new_state(1, state={"counter": np.zeros((1, 3), np.float32)})


def test_version_1_state_files_of_an_rmt_still_restore(bundle_factory, tmp_path):
    _, exported = bundle_factory("gpt2", "fp32")
    rt = RMTRuntime.load(exported.path)
    state = rt.new_state()
    rt.feed(state, np.random.default_rng(5).integers(0, 97, 40))
    rt.save_state(state, tmp_path / "v2.npz")
    with np.load(tmp_path / "v2.npz") as saved:
        arrays = {("memory" if name == "state.memory" else name): saved[name] for name in saved.files}
    header = json.loads(bytes(arrays["header"]).decode())
    header.pop("state")
    arrays["header"] = np.frombuffer(json.dumps(dict(header, version=1)).encode(), np.uint8)
    np.savez(tmp_path / "v1.npz", **arrays)  # the layout rmt-edge wrote before named state
    old = rt.restore_state(tmp_path / "v1.npz")
    np.testing.assert_array_equal(rt.memory(old), rt.memory(state))
    np.testing.assert_array_equal(rt.flush(old).last_logits, rt.flush(state).last_logits)
