"""The Triton model repositories, both kinds, without a server: their configs parse with
Triton's own protobuf, the onnxruntime kind's state matches the step spec and its request
protocol reproduces the runtime; the python kind holds a model.py and a verified bundle copy.
(tests/triton/test_live.py serves the python kind from a real server.)"""
import ast

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from rmt_export.cli import triton_main
from rmt_export.errors import ExportError
from rmt_export.triton import INITIAL_STATE_FILE, MODEL_MARKER, TritonOptions, write_triton_repository
from rmt_runtime import BackendError, Bundle, RMTRuntime
from rmt_runtime.triton_client import TritonRMTClient, repository_kind, segment_requests


@pytest.fixture(scope="module")
def served(bundle_factory, tmp_path_factory):
    _, exported = bundle_factory("gpt2", "fp32")
    repo = tmp_path_factory.mktemp("triton")
    model_dir = write_triton_repository(exported.path, repo, TritonOptions(name="rmt", max_batch_size=4))
    return Bundle.load(exported.path), model_dir


def test_config_parses_with_tritons_model_config_protobuf(served):
    bundle, model_dir = served
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "rmt" and config.backend == "onnxruntime" and config.max_batch_size == 4
    spec = bundle.graph_spec("ingest")
    assert [i.name for i in config.input] == ["input_ids", "attention_mask"]
    assert all(i.data_type == model_config_pb2.TYPE_INT64 and list(i.dims) == [-1] for i in config.input)
    assert [(o.name, list(o.dims)) for o in config.output] == [("last_logits", [bundle.vocab_size])]
    (state,) = config.sequence_batching.state
    assert (state.input_name, state.output_name) == next(iter(spec.state.items()))
    assert state.data_type == model_config_pb2.TYPE_FP32
    assert list(state.dims) == [bundle.num_mem_tokens, bundle.hidden_size]
    (initial,) = state.initial_state
    assert list(initial.dims) == list(state.dims) and initial.data_file == INITIAL_STATE_FILE
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    assert parameters["rmt.segment_size"] == str(bundle.segment_size)


def test_repository_holds_the_graph_and_the_initial_memory(served):
    bundle, model_dir = served
    assert (model_dir / "1" / "model.onnx").read_bytes() == bundle.graph_path("ingest").read_bytes()
    raw = np.fromfile(model_dir / "initial_state" / INITIAL_STATE_FILE, dtype="<f4")
    np.testing.assert_array_equal(raw.reshape(bundle.num_mem_tokens, bundle.hidden_size),
                                  np.load(bundle.memory_init_path))


def _serve_like_triton(model_dir, sequences, segment_size):
    """Run the served graph as Triton's sequence batcher does, from the repository alone: the
    requests of several sequences batched into one step, each ``state`` entry of config.pbtxt
    carried from its output to its input at the sequence's next request, starting from its
    initial_state (``data_file`` under initial_state/, or zeros for ``zero_data``).
    Returns the last logits [S, V] and the final state {input name: [S, ...]}."""
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    state = {}
    for entry in config.sequence_batching.state:
        (initial,) = entry.initial_state
        assert entry.data_type == initial.data_type == model_config_pb2.TYPE_FP32 and initial.dims == entry.dims
        if initial.WhichOneof("state_data") == "zero_data":
            value = np.zeros(list(initial.dims), np.float32)
        else:
            value = np.fromfile(model_dir / "initial_state" / initial.data_file, dtype="<f4").reshape(initial.dims)
        state[entry.input_name] = np.stack([value] * len(sequences))
    outputs = {entry.output_name: entry.input_name for entry in config.sequence_batching.state}
    (logits_name,) = [o.name for o in config.output]
    requests = [segment_requests(ids, segment_size) for ids in sequences]
    last = [None] * len(sequences)
    for step in range(max(len(r) for r in requests)):
        active = [i for i, r in enumerate(requests) if step < len(r)]
        feeds = {"input_ids": np.concatenate([requests[i][step].input_ids for i in active]),
                 "attention_mask": np.concatenate([requests[i][step].attention_mask for i in active]),
                 **{name: value[active] for name, value in state.items()}}
        names = [logits_name, *outputs]
        result = dict(zip(names, session.run(names, feeds)))
        for output, state_input in outputs.items():
            state[state_input][active] = result[output]
        for row, i in enumerate(active):
            last[i] = result[logits_name][row]
    return np.stack(last), state


def test_client_protocol_reproduces_the_runtime(served):
    """Fixed-size requests with a padded last one, batched across sequences, equal rt.run."""
    bundle, model_dir = served
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, bundle.vocab_size, n) for n in (100, 37, 16)]
    logits, state = _serve_like_triton(model_dir, sequences, bundle.segment_size)
    runtime = RMTRuntime.load(bundle)
    for row, ids in enumerate(sequences):
        alone = runtime.run(ids)
        np.testing.assert_allclose(state["memory"][row], alone.memory[0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(logits[row], alone.last_logits[0], rtol=0, atol=1e-5)


def test_segment_requests_flags_and_padding():
    requests = segment_requests(np.arange(40), 16)
    assert [(r.start, r.end) for r in requests] == [(True, False), (False, False), (False, True)]
    assert all(r.input_ids.shape == (1, 16) for r in requests)
    assert requests[-1].attention_mask.sum() == 8 and requests[-1].input_ids[0, 8:].sum() == 0
    with pytest.raises(Exception, match="non-empty 1-D integer"):
        segment_requests(np.zeros(0, np.int64), 16)
    with pytest.raises(Exception, match="token ids must lie in 0..9"):
        segment_requests(np.array([3, 10]), 16, vocab_size=10)


def test_cli_writes_and_refuses_to_overwrite(bundle_factory, tmp_path):
    _, exported = bundle_factory("gpt2", "fp32")
    args = ["--bundle", str(exported.path), "--repo", str(tmp_path / "models"), "--cpu"]
    result = CliRunner().invoke(triton_main, args)
    assert result.exit_code == 0, result.output
    assert "kind: KIND_CPU" in (tmp_path / "models" / "rmt" / "config.pbtxt").read_text()
    again = CliRunner().invoke(triton_main, args)
    assert again.exit_code == 1 and "already exists; pass --force" in again.output
    assert CliRunner().invoke(triton_main, [*args, "--force", "--graph", "step"]).exit_code == 0
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["rmt"]


def test_bad_options_are_refused(served, tmp_path):
    bundle, _ = served
    with pytest.raises(ExportError, match="model name"):
        write_triton_repository(bundle.path, tmp_path, TritonOptions(name="a b"))
    with pytest.raises(ExportError, match="graph must be"):
        write_triton_repository(bundle.path, tmp_path, TritonOptions(graph="decode"))


def test_client_without_a_server_says_so():
    with pytest.raises(BackendError, match="cannot read model 'rmt' from Triton at 127.0.0.1:9"):
        TritonRMTClient("127.0.0.1:9", "rmt")


# ---- the python kind ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def python_served(bundle_factory, tmp_path_factory):
    _, exported = bundle_factory("gpt2", "fp32")
    repo = tmp_path_factory.mktemp("triton-python")
    options = TritonOptions(name="rmt", repository_kind="python", max_batch_size=4, instances=2, threads=2)
    return Bundle.load(exported.path), write_triton_repository(exported.path, repo, options)


def test_python_kind_config_parses_with_tritons_model_config_protobuf(python_served):
    bundle, model_dir = python_served
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.backend == "python" and config.max_batch_size == 4
    ids, seed = config.input
    assert (ids.name, ids.data_type, list(ids.dims), ids.allow_ragged_batch) == (
        "input_ids", model_config_pb2.TYPE_INT64, [-1], True)
    memory_dims = [bundle.num_mem_tokens, bundle.hidden_size]
    assert (seed.name, seed.data_type, list(seed.dims), seed.optional) == (
        "start_memory", model_config_pb2.TYPE_FP32, memory_dims, True)
    assert [(o.name, list(o.dims)) for o in config.output] == [
        ("last_logits", [bundle.vocab_size]), ("memory", memory_dims), ("resume_memory", memory_dims),
        ("tokens_seen", [1])]
    batching = config.sequence_batching
    assert not batching.state  # the Python backend does not carry implicit state: the model keeps it
    kinds = {c.name: c.control[0].kind for c in batching.control_input}
    Control = model_config_pb2.ModelSequenceBatching.Control
    assert kinds == {"START": Control.CONTROL_SEQUENCE_START, "END": Control.CONTROL_SEQUENCE_END,
                     "READY": Control.CONTROL_SEQUENCE_READY, "CORRID": Control.CONTROL_SEQUENCE_CORRID}
    assert batching.oldest.max_candidate_sequences == 16 and list(batching.oldest.preferred_batch_size) == [4]
    assert batching.max_sequence_idle_microseconds == 60_000_000
    assert (config.instance_group[0].count, config.instance_group[0].kind) == (
        2, model_config_pb2.ModelInstanceGroup.KIND_CPU)
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    assert parameters == {"rmt.repository_kind": "python", "rmt.segment_size": str(bundle.segment_size),
                          "rmt.bundle_identity": bundle.identity, "rmt.threads": "2"}


def test_python_kind_holds_a_model_py_importing_only_rmt_runtime_and_a_verified_bundle_copy(python_served):
    bundle, model_dir = python_served
    tree = ast.parse((model_dir / "1" / "model.py").read_text())
    imports = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imports += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert imports == ["rmt_runtime.triton_model"]
    copy = Bundle.load(model_dir / "1" / "bundle")
    assert copy.identity == bundle.identity
    assert sorted(p.name for p in model_dir.iterdir()) == [MODEL_MARKER, "1", "config.pbtxt"]


def test_the_client_tells_the_repository_kinds_apart(served, python_served):
    def served_config(model_dir):
        config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        return json_format.MessageToDict(config, preserving_proto_field_name=True)  # as Triton returns it

    assert repository_kind(served_config(served[1])) == "onnxruntime"
    assert repository_kind(served_config(python_served[1])) == "python"
    with pytest.raises(BackendError, match="not written by rmt-triton"):
        repository_kind({"name": "other", "backend": "python"})
    mixed = served_config(python_served[1]) | {"backend": "onnxruntime"}
    with pytest.raises(BackendError, match="repository kind 'python' with backend 'onnxruntime'"):
        repository_kind(mixed)


def test_cli_writes_the_python_kind(bundle_factory, tmp_path):
    _, exported = bundle_factory("gpt2", "fp32")
    args = ["--bundle", str(exported.path), "--repo", str(tmp_path / "models"), "--kind", "python",
            "--max-batch", "2", "--max-sequences", "64", "--idle-seconds", "2.5", "--instances", "3", "--threads", "2",
            "--queue-delay-us", "250"]
    result = CliRunner().invoke(triton_main, args)
    assert result.exit_code == 0, result.output
    text = (tmp_path / "models" / "rmt" / "config.pbtxt").read_text()
    for line in ('backend: "python"', "max_candidate_sequences: 64", "max_sequence_idle_microseconds: 2500000",
                 "count: 3", "kind: KIND_CPU", 'key: "rmt.threads" value: { string_value: "2" }',
                 "max_queue_delay_microseconds: 250"):
        assert line in text
    step = CliRunner().invoke(triton_main, [*args, "--force", "--graph", "step"])
    assert step.exit_code == 2 and "--graph step is for the onnxruntime kind" in step.output
    threads = CliRunner().invoke(triton_main, [*args[:4], "--threads", "2", "--repo", str(tmp_path / "gpu")])
    assert threads.exit_code == 2 and "--threads is for the python kind" in threads.output


@pytest.mark.parametrize("options, message", [
    (TritonOptions(repository_kind="python", kind="KIND_GPU"), "the python kind runs ONNX Runtime on the CPU"),
    (TritonOptions(repository_kind="triton"), "repository kind must be one of"),
    (TritonOptions(repository_kind="python", graph="step"), "the python kind returns last-token logits"),
    (TritonOptions(max_batch_size=8, max_sequences=4), r"max_sequences \(4\) must be >= max_batch_size \(8\)"),
    (TritonOptions(repository_kind="python", threads=0), "threads must be >= 1"),
])
def test_bad_python_kind_options_are_refused(served, tmp_path, options, message):
    bundle, _ = served
    with pytest.raises(ExportError, match=message):
        write_triton_repository(bundle.path, tmp_path, options)


# ---- an ARMT bundle: 2 x L named state pairs starting from zeros, no memory ------------------------
@pytest.fixture(scope="module")
def armt_served(armt_bundle_factory, tmp_path_factory):
    _, path = armt_bundle_factory("fp32")
    repo = tmp_path_factory.mktemp("triton-armt")
    onnx_kind = write_triton_repository(path, repo, TritonOptions(name="armt", max_batch_size=4))
    python_kind = write_triton_repository(path, repo, TritonOptions(name="armt_py", repository_kind="python"))
    return Bundle.load(path), onnx_kind, python_kind


def test_armt_config_has_one_zero_initialised_state_per_named_pair_matching_the_graph(armt_served):
    """config.pbtxt lists 2 x L states W_mem.{l} -> new_W_mem.{l}, z.{l} -> new_z.{l}, FP32, dims
    the state shapes after the batch axis, zero_data initial states (no initial_state folder);
    the graph in the repository has exactly the config's inputs and outputs plus those states."""
    bundle, model_dir, _ = armt_served
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    layers = len(bundle.state_pairs) // 2
    assert layers >= 2 and "memory" not in bundle.state_pairs
    states = {s.input_name: s for s in config.sequence_batching.state}
    expected = {f"{kind}.{layer}": f"new_{kind}.{layer}" for kind in ("W_mem", "z") for layer in range(layers)}
    assert len(config.sequence_batching.state) == 2 * layers
    assert {name: s.output_name for name, s in states.items()} == expected == bundle.state_pairs
    shapes = bundle.state_shapes()
    for name, state in states.items():
        assert state.data_type == model_config_pb2.TYPE_FP32 and tuple(state.dims) == shapes[name], name
        (initial,) = state.initial_state
        assert initial.WhichOneof("state_data") == "zero_data" and initial.zero_data, name
        assert initial.data_type == model_config_pb2.TYPE_FP32 and list(initial.dims) == list(state.dims), name
        assert initial.name == f"{name}_init"
    assert all(not bundle.initial_state()[name].any() for name in states)
    assert sorted(p.name for p in model_dir.iterdir()) == [MODEL_MARKER, "1", "config.pbtxt"]  # no initial_state/ files

    graph = onnx.load(str(model_dir / "1" / "model.onnx")).graph
    initializers = {i.name for i in graph.initializer}
    inputs = {i.name: i for i in graph.input if i.name not in initializers}
    outputs = {o.name: o for o in graph.output}
    assert set(inputs) == {i.name for i in config.input} | set(states) == {"input_ids", "attention_mask",
                                                                           *expected}
    assert set(outputs) == {o.name for o in config.output} | set(expected.values()) == {"last_logits",
                                                                                          *expected.values()}
    for name, state in states.items():
        for tensor in (inputs[name], outputs[state.output_name]):
            dims = [d.dim_value or d.dim_param for d in tensor.type.tensor_type.shape.dim]
            assert dims == ["batch", *state.dims], tensor.name
            assert tensor.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_armt_onnxruntime_kind_protocol_reproduces_the_runtime(armt_served):
    """Whole-segment requests (the last right-padded), three sequences batched per step, every
    state carried as Triton carries implicit state from the config alone: equal to RMTRuntime.run
    on each whole sequence (measured on the tiny ARMT: logits equal, state within 1.2e-7; the bound is the
    RMT test's)."""
    bundle, model_dir, _ = armt_served
    rng = np.random.default_rng(2)
    sequences = [rng.integers(0, bundle.vocab_size, n) for n in (100, 37, 16)]
    logits, state = _serve_like_triton(model_dir, sequences, bundle.segment_size)
    runtime = RMTRuntime.load(bundle, backend="onnxruntime", provider="cpu")
    for row, ids in enumerate(sequences):
        alone = runtime.run(ids)
        np.testing.assert_allclose(logits[row], alone.last_logits[0], rtol=0, atol=1e-5)
        for name, value in alone.state.items():
            np.testing.assert_allclose(state[name][row], value[0], rtol=0, atol=1e-5, err_msg=name)


def test_armt_python_kind_config_has_no_memory_tensors(armt_served):
    bundle, _, model_dir = armt_served
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.backend == "python"
    assert [i.name for i in config.input] == ["input_ids"]
    assert [(o.name, list(o.dims)) for o in config.output] == [("last_logits", [bundle.vocab_size]),
                                                                ("tokens_seen", [1])]
    assert not config.sequence_batching.state
    assert Bundle.load(model_dir / "1" / "bundle").identity == bundle.identity


def test_a_state_with_a_non_zero_initial_value_gets_its_own_data_file(armt_served, tmp_path, monkeypatch):
    """Not an ARMT's (zeros), but a bundle's state_init may hold any values: such a state starts
    from initial_state/<name>_init.bin (row-major float32), the others stay zero_data."""
    bundle, _, _ = armt_served
    initial = bundle.initial_state()
    initial["z.0"] = np.arange(initial["z.0"].size, dtype=np.float32).reshape(initial["z.0"].shape) + 1
    monkeypatch.setattr(Bundle, "initial_state", lambda self: {k: v.copy() for k, v in initial.items()})
    model_dir = write_triton_repository(bundle.path, tmp_path, TritonOptions(name="seeded"))
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    sources = {s.input_name: s.initial_state[0].WhichOneof("state_data") for s in config.sequence_batching.state}
    assert sources == {name: "data_file" if name == "z.0" else "zero_data" for name in bundle.state_pairs}
    (seeded,) = [s for s in config.sequence_batching.state if s.input_name == "z.0"]
    assert seeded.initial_state[0].data_file == "z.0_init.bin"
    assert sorted(p.name for p in (model_dir / "initial_state").iterdir()) == ["z.0_init.bin"]
    raw = np.fromfile(model_dir / "initial_state" / "z.0_init.bin", dtype="<f4").reshape(initial["z.0"].shape)
    np.testing.assert_array_equal(raw, initial["z.0"])
