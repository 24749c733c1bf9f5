"""The python-kind model's sequence logic, in process (no server): rmt_runtime.triton_model.SequenceTable."""
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rmt_runtime import RMTRuntime, RuntimeInputError
from rmt_runtime.triton_model import (LAST_LOGITS, MEMORY_OUT, RESUME_MEMORY, TOKENS_SEEN, SequenceRequestError,
                                      SequenceTable, check_numpy_for_python_backend)

ALL = {LAST_LOGITS, MEMORY_OUT, RESUME_MEMORY}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture(scope="module")
def runtime(bundle_factory):
    _, exported = bundle_factory("gpt2", "fp32")
    return RMTRuntime.load(exported.path, backend="onnxruntime", provider="cpu", threads=1)


def test_chunks_of_many_sequences_run_together_equal_each_sequence_alone(runtime):
    """Rows of 8 sequences (chunks of random sizes, sequences starting and ending at different
    calls) batched in each call: every response equals RMTRuntime.run on that sequence's input
    so far, bit for bit (full segments batched; partial ones batched by equal length)."""
    table = SequenceTable(runtime, idle_seconds=60)
    rng = np.random.default_rng(0)
    vocab = runtime.bundle.vocab_size
    documents = {i + 1: rng.integers(0, vocab, n) for i, n in enumerate((5, 16, 20, 47, 64, 81, 1, 33))}
    position = dict.fromkeys(documents, 0)
    calls = 0
    while position:
        requests = []
        for sid in list(position)[calls % 3:]:  # sequences join the calls at different times
            ids = documents[sid]
            end = min(len(ids), position[sid] + int(rng.integers(1, 24)))
            requests.append(table.check(sid, position[sid] == 0, end == len(ids), ids[position[sid]:end], ALL))
            position[sid] = end
        for request, result in zip(requests, table.execute(requests)):
            ids = documents[request.sequence_id][:position[request.sequence_id]]
            alone = runtime.run(ids)
            np.testing.assert_array_equal(result.last_logits, alone.last_logits[0])
            np.testing.assert_array_equal(result.memory, alone.memory[0])
            assert result.tokens_seen == len(ids)
            if request.end:
                del position[request.sequence_id]
        calls += 1
    assert len(table) == 0 and calls > 3


def test_resume_memory_is_the_memory_after_the_last_full_segment(runtime):
    table = SequenceTable(runtime, idle_seconds=60)
    ids = np.arange(40) % runtime.bundle.vocab_size
    (result,) = table.execute([table.check(1, True, False, ids, ALL)])
    np.testing.assert_array_equal(result.resume_memory, runtime.run(ids[:32]).memory[0])
    np.testing.assert_array_equal(result.memory, runtime.run(ids).memory[0])


def test_two_chunks_of_one_sequence_in_one_call_run_in_order(runtime):
    table = SequenceTable(runtime, idle_seconds=60)
    ids = np.arange(30) % runtime.bundle.vocab_size
    first, second = table.execute([table.check(4, True, False, ids[:10], ALL),
                                   table.check(4, False, True, ids[10:], ALL)])
    np.testing.assert_array_equal(first.memory, runtime.run(ids[:10]).memory[0])
    np.testing.assert_array_equal(second.memory, runtime.run(ids).memory[0])
    assert 4 not in table


@pytest.mark.parametrize("ids, kwargs, message", [
    (np.array([1, 2], np.int32), {}, "sequence 3: input_ids must be INT64 token ids, got int32"),
    (np.zeros((2, 3), np.int64), {}, r"must be \[1, n\] \(one chunk per request\), got \[2, 3\]"),
    (np.zeros((1, 0), np.int64), {}, "input_ids is empty; every request carries at least one token"),
    (np.array([[1, 999]]), {}, r"token id 999 at row 0, position 1 is outside the vocabulary 0\.\.\d+"),
    (np.array([1]), {"start": False, "start_memory": np.zeros((4, 32), np.float32)},
     "start_memory seeds a new sequence; send it only with START"),
    (np.array([1]), {"start_memory": np.zeros((4, 31), np.float32)},
     r"start_memory must be FP32 \[4, 32\], got float32 \[4, 31\]"),
    (np.array([1]), {"start_memory": np.zeros((4, 32), np.float64)}, r"must be FP32 \[4, 32\], got float64"),
    (np.array([1]), {"start_memory": np.full((4, 32), np.nan, np.float32)}, "start_memory holds NaN or Inf"),
    (np.array([1]), {"outputs": {LAST_LOGITS, "logits"}}, r"unknown outputs \['logits'\]"),
])
def test_bad_requests_are_refused_naming_what_was_wrong(runtime, ids, kwargs, message):
    table = SequenceTable(runtime, idle_seconds=60)
    assert runtime.bundle.num_mem_tokens == 4 and runtime.bundle.hidden_size == 32
    arguments = {"start": True, "outputs": {LAST_LOGITS}, "start_memory": None} | kwargs
    with pytest.raises(SequenceRequestError, match=message):
        table.check(3, arguments["start"], False, ids, arguments["outputs"], arguments["start_memory"])


def test_a_sequence_the_table_does_not_hold_gets_an_error_not_another_sequences_memory(runtime):
    table = SequenceTable(runtime, idle_seconds=60)
    ids = np.arange(20) % runtime.bundle.vocab_size
    started, unknown = table.execute([table.check(1, True, False, ids, ALL), table.check(2, False, False, ids, ALL)])
    np.testing.assert_array_equal(started.memory, runtime.run(ids).memory[0])
    assert isinstance(unknown, SequenceRequestError)
    assert "sequence 2 has no state in this model instance: it was not started" in str(unknown)
    assert 1 in table and 2 not in table


def test_end_forgets_and_idle_sequences_are_dropped_by_the_clock(runtime):
    clock = Clock()
    table = SequenceTable(runtime, idle_seconds=10, clock=clock)
    ids = np.arange(8)
    table.execute([table.check(sid, True, False, ids, {LAST_LOGITS}) for sid in (1, 2, 3)])
    table.execute([table.check(3, False, True, ids, {LAST_LOGITS})])
    assert len(table) == 2 and 3 not in table
    clock.now = 6.0
    table.execute([table.check(2, False, False, ids, {LAST_LOGITS})])
    assert table.seconds_to_next_expiry() == pytest.approx(4.0)
    clock.now = 10.5
    assert table.drop_idle() == [1] and len(table) == 1
    clock.now = 16.5
    assert table.drop_idle() == [2] and len(table) == 0
    (refused,) = table.execute([table.check(1, False, False, ids, {LAST_LOGITS})])
    assert isinstance(refused, SequenceRequestError) and "idle longer than max_sequence_idle_microseconds (10 s)" \
        in str(refused)


class FailsOnce:
    """A runtime whose next feed fails (a backend error in the middle of a batch)."""

    def __init__(self, runtime):
        self.runtime, self.failed = runtime, False

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def feed(self, *args, **kwargs):
        if not self.failed:
            self.failed = True
            raise RuntimeError("the backend failed")
        return self.runtime.feed(*args, **kwargs)


def test_a_failing_batch_gives_every_row_the_error_and_leaves_every_state_as_it_was(runtime):
    failing = FailsOnce(runtime)
    table = SequenceTable(failing, idle_seconds=60)
    ids = np.arange(40) % runtime.bundle.vocab_size
    failing.failed = True
    table.execute([table.check(1, True, False, ids[:10], ALL), table.check(2, True, False, ids[:25], ALL)])
    failing.failed = False
    errors = table.execute([table.check(1, False, False, ids[10:30], ALL), table.check(2, False, True, ids[25:], ALL)])
    assert [str(e) for e in errors] == ["the backend failed"] * 2
    assert 1 in table and 2 not in table  # END forgets the sequence even when its request failed
    (retried,) = table.execute([table.check(1, False, True, ids[10:], ALL)])
    np.testing.assert_array_equal(retried.memory, runtime.run(ids).memory[0])


def test_only_decoder_bundles_are_served():
    encoder = SimpleNamespace(kind="encoder", state_pairs={"memory": "new_memory"})
    with pytest.raises(RuntimeInputError, match="serves decoder bundles; this bundle is a encoder"):
        SequenceTable(encoder, idle_seconds=1)


# ---- an ARMT bundle: 2 x L named state pairs, no memory -------------------------------------------
@pytest.fixture(scope="module")
def armt_runtime(armt_bundle_factory):
    _, path = armt_bundle_factory("fp32")
    return RMTRuntime.load(path, backend="onnxruntime", provider="cpu", threads=1)


def test_armt_chunks_of_many_sequences_run_together_equal_each_sequence_alone(armt_runtime):
    """The ARMT's per-layer state (W_mem.{l}, z.{l}) kept per sequence: 8 sequences in chunks of
    random sizes, batched per call; every response's logits and every stored state tensor equal
    RMTRuntime on that sequence's input so far, bit for bit (measured: identical)."""
    runtime = armt_runtime
    assert "memory" not in runtime.state_pairs and len(runtime.state_pairs) >= 4
    table = SequenceTable(runtime, idle_seconds=60)
    assert table.memory_shape is None and table.outputs == {LAST_LOGITS, TOKENS_SEEN}
    rng = np.random.default_rng(1)
    documents = {i + 1: rng.integers(0, runtime.bundle.vocab_size, n)
                 for i, n in enumerate((5, 16, 20, 47, 64, 81, 1, 33))}
    position = dict.fromkeys(documents, 0)
    calls = 0
    while position:
        requests = []
        for sid in list(position)[calls % 3:]:
            ids = documents[sid]
            end = min(len(ids), position[sid] + int(rng.integers(1, 24)))
            requests.append(table.check(sid, position[sid] == 0, end == len(ids), ids[position[sid]:end],
                                        {LAST_LOGITS, TOKENS_SEEN}))
            position[sid] = end
        for request, result in zip(requests, table.execute(requests)):
            ids = documents[request.sequence_id][:position[request.sequence_id]]
            np.testing.assert_array_equal(result.last_logits, runtime.run(ids).last_logits[0])
            assert result.memory is None and result.resume_memory is None and result.tokens_seen == len(ids)
            if request.end:
                del position[request.sequence_id]
                continue
            alone = runtime.new_state()
            runtime.feed(alone, ids)
            stored = runtime.state_tensors(table._states[request.sequence_id])
            for name, value in runtime.state_tensors(alone).items():
                np.testing.assert_array_equal(stored[name], value, err_msg=name)
        calls += 1
    assert len(table) == 0 and calls > 3


@pytest.mark.parametrize("kwargs, message", [
    ({"start_memory": np.zeros((4, 32), np.float32)},
     r"start_memory is the RMT's memory; this model's state is \['W_mem.0', .*keeps server-side only"),
    ({"outputs": {LAST_LOGITS, MEMORY_OUT}}, r"unknown outputs \['memory'\] \(this model has \['last_logits', "
                                             r"'tokens_seen'\]\)"),
    ({"outputs": {RESUME_MEMORY}}, r"unknown outputs \['resume_memory'\]"),
])
def test_armt_memory_tensors_are_refused(armt_runtime, kwargs, message):
    table = SequenceTable(armt_runtime, idle_seconds=60)
    arguments = {"outputs": {LAST_LOGITS}, "start_memory": None} | kwargs
    with pytest.raises(SequenceRequestError, match=message):
        table.check(3, True, False, np.array([1, 2]), arguments["outputs"], arguments["start_memory"])


def test_numpy_2_is_refused_in_the_server_unless_allowed():
    with pytest.raises(RuntimeError, match=r"numpy 2\.1\.0 .*sends empty output tensors under numpy 2; install "
                                           r"numpy<2"):
        check_numpy_for_python_backend("2.1.0", allowed=False)
    check_numpy_for_python_backend("2.1.0", allowed=True)
    check_numpy_for_python_backend("1.26.4", allowed=False)


# ---- every refused request kind, with and without START and END: what the table holds after ----------
class FakeTensor:
    def __init__(self, array):
        self.array = np.asarray(array)

    def as_numpy(self):
        return self.array


class FakeTritonError:
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, message, code=None):
        self.message, self.code = message, code


# The few names of triton_python_backend_utils that TritonPythonModel.execute uses.
FAKE_PB = SimpleNamespace(
    get_input_tensor_by_name=lambda request, name: request.inputs.get(name),
    InferenceResponse=lambda output_tensors=None, error=None: SimpleNamespace(output_tensors=output_tensors,
                                                                              error=error),
    TritonError=FakeTritonError, Tensor=lambda name, array: SimpleNamespace(name=name, array=array))


class FakeRequest:
    def __init__(self, inputs, outputs=(LAST_LOGITS, MEMORY_OUT)):
        self.inputs = {name: value if isinstance(value, FakeTensor) else FakeTensor(value)
                       for name, value in inputs.items()}
        self.outputs = list(outputs)

    def requested_output_names(self):
        return self.outputs


def served(table):
    """The Python backend's model over ``table``, without a server (initialize needs Triton)."""
    from rmt_runtime.triton_model import TritonPythonModel

    model = TritonPythonModel.__new__(TritonPythonModel)
    model.pb, model.table, model.live = FAKE_PB, table, SimpleNamespace(set=lambda value: None)
    return model


def request(sid, ids, start=False, end=False, **inputs):
    controls = {"START": [[int(start)]], "END": [[int(end)]], "READY": [[1]], "CORRID": [[sid]]}
    return FakeRequest({"input_ids": np.asarray(ids, np.int64)[None], **controls, **inputs})


def without(name):
    def make(sid, ids, start, end):
        made = request(sid, ids, start, end)
        del made.inputs[name]
        return made
    return make


# Every way the model refuses a request: (sid, ids, start, end) -> the request. The sequence-table
# kinds (unknown sequence, a failed backend run) reach execute; the others fail the checks first.
REFUSALS = {
    "ids of int32": lambda sid, ids, start, end: FakeRequest({**request(sid, ids, start, end).inputs,
                                                             "input_ids": FakeTensor(np.int32(ids)[None])}),
    "two rows of ids": lambda sid, ids, start, end: FakeRequest({**request(sid, ids, start, end).inputs,
                                                                "input_ids": FakeTensor(np.zeros((2, 3), np.int64))}),
    "no ids": lambda sid, ids, start, end: request(sid, np.zeros(0, np.int64), start, end),
    "an id outside the vocabulary": lambda sid, ids, start, end: request(sid, [1, 10 ** 6], start, end),
    "input_ids missing": without("input_ids"),
    "READY missing": without("READY"),
    "start_memory of another shape": lambda sid, ids, start, end: request(
        sid, ids, start, end, start_memory=np.zeros((1, 4, 31), np.float32)),
    "start_memory of NaN": lambda sid, ids, start, end: request(
        sid, ids, start, end, start_memory=np.full((1, 4, 32), np.nan, np.float32)),
    "an unknown output": lambda sid, ids, start, end: FakeRequest(request(sid, ids, start, end).inputs,
                                                                  outputs=(LAST_LOGITS, "logits")),
    "a sequence the table does not hold": lambda sid, ids, start, end: request(sid + 100, ids, start, end),
    "a failed backend run": lambda sid, ids, start, end: request(sid, ids, start, end),
}


# A START for a sequence the table does not hold starts it: not a refusal, so not a case here.
CASES = [pytest.param(kind, start, end, id=f"{kind}-{'START' if start else 'no START'}-{'END' if end else 'no END'}")
         for kind in sorted(REFUSALS) for start in (False, True) for end in (False, True)
         if not (kind == "a sequence the table does not hold" and start)]


@pytest.mark.parametrize("kind, start, end", CASES)
def test_a_refused_request_ends_its_sequence_with_END_restarts_it_with_START_and_otherwise_changes_nothing(
        runtime, kind, start, end):
    """Triton acts on a request's controls whether the model refused it or not: END ends the
    sequence (the table frees its state), START began a new one (no earlier state is continued);
    without either the sequence goes on as if the refused request was never sent. Every other
    sequence is untouched."""
    failing = FailsOnce(runtime)
    failing.failed = True  # runs until the backend-failure kind arms it
    table = SequenceTable(failing, idle_seconds=60)
    model = served(table)
    ids = np.arange(40) % runtime.bundle.vocab_size
    first = model.execute([request(1, ids[:10], start=True), request(2, ids[:5], start=True)])
    assert [r.error for r in first] == [None, None]
    before = {sid: runtime.state_tensors(table._states[sid]) for sid in (1, 2)}
    failing.failed = kind != "a failed backend run"
    (response,) = model.execute([REFUSALS[kind](1, ids[10:20], start, end)])
    assert response.error is not None, f"{kind} was not refused"
    unknown = kind == "a sequence the table does not hold"  # the refused request was for sequence 101
    assert 101 not in table
    if not unknown and (start or end):
        assert 1 not in table, f"{kind} carrying {'END' if end else 'START'} left the sequence's state behind"
        (later,) = model.execute([request(1, ids[10:20])])
        assert "sequence 1 has no state in this model instance" in later.error.message
    else:
        assert 1 in table
        for name, value in runtime.state_tensors(table._states[1]).items():
            np.testing.assert_array_equal(value, before[1][name])
        (later,) = model.execute([request(1, ids[10:20], end=True)])
        assert later.error is None
        np.testing.assert_array_equal(later.output_tensors[1].array[0], runtime.run(ids[:20]).memory[0])
    for name, value in runtime.state_tensors(table._states[2]).items():  # the other sequence: untouched
        np.testing.assert_array_equal(value, before[2][name])
    assert len(table) == 1 + (1 in table)


def test_a_request_without_CORRID_names_no_sequence_and_changes_no_state(runtime):
    table = SequenceTable(runtime, idle_seconds=60)
    model = served(table)
    ids = np.arange(10)
    model.execute([request(1, ids, start=True)])
    kept = runtime.state_tensors(table._states[1])
    (response,) = model.execute([without("CORRID")(1, ids, True, True)])
    assert "control input CORRID is missing" in response.error.message
    assert 1 in table and len(table) == 1
    for name, value in runtime.state_tensors(table._states[1]).items():
        np.testing.assert_array_equal(value, kept[name])


# ---- any interleaving of served, refused and failed requests: the table against a model of it -------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(1, 2), st.sampled_from(["runs", "no ids", "ids of int32", "a failed backend run"]),
                          st.booleans(), st.booleans(), st.integers(1, 20)), min_size=1, max_size=8))
# Always tried: a refused END and a refused START on a live sequence, then a request continuing it.
@example(operations=[(1, "runs", True, False, 5), (1, "no ids", False, True, 1), (1, "runs", False, False, 3)])
@example(operations=[(1, "runs", True, False, 5), (1, "a failed backend run", True, False, 4),
                     (1, "runs", False, True, 3)])
def test_any_interleaving_of_refused_and_served_requests_leaves_the_table_its_model_says(runtime, operations):
    """The table's live sequences and their memory follow a model of Triton's sequences: a served
    request continues (or, with START, begins) its sequence; any refused one acts on its START
    and END only (SequenceTable._refused); END always frees the sequence."""
    failing = FailsOnce(runtime)
    table = SequenceTable(failing, idle_seconds=60)
    model = served(table)
    vocab = runtime.bundle.vocab_size
    live: dict[int, np.ndarray] = {}  # the model: sequence id -> every token it was served
    for step, (sid, kind, start, end, length) in enumerate(operations):
        chunk = (np.arange(length) * 7 + step) % vocab
        failing.failed = kind != "a failed backend run"
        made = {"runs": request, "a failed backend run": request}.get(kind) or REFUSALS[kind]
        (response,) = model.execute([made(sid, chunk, start, end)])
        failing.failed = True
        runs = kind == "runs" and (start or sid in live)
        if runs:
            assert response.error is None, response.error.message
            history = chunk if start else np.concatenate([live[sid], chunk])
            np.testing.assert_array_equal(response.output_tensors[1].array[0], runtime.run(history).memory[0])
            live[sid] = history
            if end:
                del live[sid]
        else:
            assert response.error is not None
            if start or end:
                live.pop(sid, None)
        assert set(table._states) == set(live), f"after {operations[:step + 1]}"
    for sid, history in live.items():  # every live sequence holds exactly its own tokens' memory
        alone = runtime.new_state()
        runtime.feed(alone, history)
        np.testing.assert_array_equal(runtime.memory(table._states[sid]), runtime.memory(alone))
        assert list(table._states[sid].pending[0]) == list(alone.pending[0])
