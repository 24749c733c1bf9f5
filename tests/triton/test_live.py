"""A real tritonserver (nvidia-pytriton's) serving the python-kind repository of the sample model,
driven over gRPC on 127.0.0.1: every served result equals the in-process runtime bit for bit."""
import queue
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from rmt_export.triton import TritonOptions, write_triton_repository
from rmt_export.triton_server import LocalTritonServer
from rmt_runtime import BackendError
from rmt_runtime.triton_client import TritonRMTClient

from .conftest import BATCH, IDLE, IDLE_SECONDS, MAIN, keyrecall_example, live_sequences, wait_for


def assert_equals_alone(output, runtime, ids, memory=True):
    alone = runtime.run(ids)
    np.testing.assert_array_equal(output.last_logits, alone.last_logits[0])
    if memory:
        np.testing.assert_array_equal(output.memory, alone.memory[0])
    assert output.tokens_seen == len(ids)


def raw_infer(server, model, ids, sequence_id, start=False, end=False, datatype="INT64", extra=()):
    """One request built by hand (what a client outside rmt-edge might send)."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensor = grpcclient.InferInput("input_ids", list(ids.shape), datatype)
    tensor.set_data_from_numpy(ids)
    return client.infer(model, [tensor, *extra], sequence_id=sequence_id, sequence_start=start, sequence_end=end,
                        outputs=[grpcclient.InferRequestedOutput("last_logits")])


def test_one_sequence_in_chunks_equals_runtime_run(server, runtime):
    """Chunks that stop short of, end on and cross segment boundaries: after every chunk the
    logits and the memory equal RMTRuntime.run on the input so far, bit for bit, and the
    sample model recalls the key."""
    client = TritonRMTClient(server.grpc_url, MAIN)
    assert client.kind == "python" and "python kind" in client.describe()
    ids, answer = keyrecall_example(seed=7)            # 127 tokens, 4 segments of 32
    sequence = client.sequence(101)
    cuts = [0, 1, 8, 32, 33, 70, 96, len(ids)]
    for a, b in zip(cuts, cuts[1:]):
        output = sequence.send(ids[a:b], end=b == len(ids), want_memory=True)
        assert_equals_alone(output, runtime, ids[:b])
    assert int(output.last_logits.argmax()) == answer
    assert client.read(ids, 102, chunk_size=13).last_logits.argmax() == answer


class Recording:
    """Wraps tritonclient's client: records the keyword arguments of every infer call."""

    def __init__(self, client):
        self.client, self.calls = client, []

    def __getattr__(self, name):
        return getattr(self.client, name)

    def infer(self, *args, **kwargs):
        self.calls.append(kwargs)
        return self.client.infer(*args, **kwargs)


def test_every_request_carries_its_sequence_id_in_a_header_for_load_balancers(server, runtime):
    client = TritonRMTClient(server.grpc_url, MAIN)
    client.client = Recording(client.client)
    ids, _ = keyrecall_example(seed=9)
    assert_equals_alone(client.read(ids, 123456, chunk_size=50, want_memory=True), runtime, ids)
    assert [call["headers"] for call in client.client.calls] == [{"x-rmt-sequence-id": "123456"}] * 3
    assert [call["sequence_id"] for call in client.client.calls] == [123456] * 3


def test_sixteen_sequences_from_eight_threads_each_equal_their_solo_run(server, runtime):
    """8 client threads, each interleaving 2 sequences in chunks of random sizes: the server
    batches rows of different sequences, and every sequence still equals its solo run."""
    rng = np.random.default_rng(3)
    documents = {2000 + i: rng.integers(0, 256, int(rng.integers(20, 140))) for i in range(16)}
    results, failures = {}, []
    barrier = threading.Barrier(8)

    def worker(index):
        try:
            client = TritonRMTClient(server.grpc_url, MAIN)
            chunks = np.random.default_rng(100 + index)
            mine = {sid: client.sequence(sid) for sid in (2000 + index, 2008 + index)}
            position = dict.fromkeys(mine, 0)
            barrier.wait(timeout=120)
            while position:
                for sid in list(position):
                    ids = documents[sid]
                    end = min(len(ids), position[sid] + int(chunks.integers(1, 40)))
                    output = mine[sid].send(ids[position[sid]:end], end=end == len(ids), want_memory=end == len(ids))
                    position[sid] = end
                    if end == len(ids):
                        results[sid] = output
                        del position[sid]
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(f"thread {index}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert sorted(results) == sorted(documents)
    for sid, ids in documents.items():
        assert_equals_alone(results[sid], runtime, ids)
    assert live_sequences(server, MAIN) == 0


def test_requests_of_different_sequences_run_as_one_batch(server, runtime):
    """rmt_batch forms a batch when 4 requests are queued: 4 sequences' chunks of different
    lengths run in one execution (Triton's statistics say so) and equal their solo runs."""
    client = grpcclient.InferenceServerClient(server.grpc_url)

    def stats():
        (model,) = client.get_inference_statistics(BATCH, as_json=True)["model_stats"]
        return int(model.get("inference_count", 0)), int(model.get("execution_count", 0))

    rng = np.random.default_rng(11)
    documents = [rng.integers(0, 256, n) for n in (70, 40, 33, 90)]
    cuts = [5, 32, 17, 64]
    for step in range(2):
        before = stats()
        answers = queue.Queue()
        for row, (ids, cut) in enumerate(zip(documents, cuts)):
            chunk = ids[:cut] if step == 0 else ids[cut:]
            tensor = grpcclient.InferInput("input_ids", [1, len(chunk)], "INT64")
            tensor.set_data_from_numpy(chunk[None])
            client.async_infer(BATCH, [tensor], callback=lambda result, error, row=row: answers.put((row, result, error)),
                               sequence_id=3000 + row, sequence_start=step == 0, sequence_end=step == 1,
                               outputs=[grpcclient.InferRequestedOutput("last_logits"),
                                        grpcclient.InferRequestedOutput("memory")])
        received = [answers.get(timeout=120) for _ in documents]
        assert [error for _, _, error in received] == [None] * 4
        for row, result, _ in received:
            ids = documents[row][:cuts[row]] if step == 0 else documents[row]
            alone = runtime.run(ids)
            np.testing.assert_array_equal(result.as_numpy("last_logits")[0], alone.last_logits[0])
            np.testing.assert_array_equal(result.as_numpy("memory")[0], alone.memory[0])
        after = stats()
        assert (after[0] - before[0], after[1] - before[1]) == (4, 1)


def test_end_frees_the_state_and_the_same_id_starts_again_from_the_initial_memory(server, runtime):
    client = TritonRMTClient(server.grpc_url, MAIN)
    first, _ = keyrecall_example(seed=1)
    second, answer = keyrecall_example(seed=2)
    before = live_sequences(server, MAIN)
    sequence = client.sequence(77)
    sequence.send(first[:40])
    assert live_sequences(server, MAIN) == before + 1
    sequence.send(first[40:], end=True)
    assert live_sequences(server, MAIN) == before
    with pytest.raises(InferenceServerException, match="sequence 77 .* must specify the START flag"):
        raw_infer(server, MAIN, second[None, :5], 77)
    again = client.read(second, 77, chunk_size=50, want_memory=True)
    assert_equals_alone(again, runtime, second)
    assert int(again.last_logits.argmax()) == answer


def test_an_idle_sequence_is_dropped_and_its_next_request_gets_a_clear_error(server, runtime):
    """rmt_idle drops a sequence after 0.5 s without a request: the model frees its memory
    (its gauge falls to 0), the next request of that sequence is refused with an error that
    says why, and the id starts again from the initial memory, not from the old one's."""
    client = TritonRMTClient(server.grpc_url, IDLE)
    old, _ = keyrecall_example(seed=3)
    new, answer = keyrecall_example(seed=4)
    abandoned = client.sequence(5)
    abandoned.send(old[:50])
    other = client.sequence(6)
    other.send(new[:40])
    wait_for(lambda: live_sequences(server, IDLE) == 0, f"both sequences dropped after {IDLE_SECONDS} s idle")
    with pytest.raises(BackendError, match=r"sequence 5 after 50 tokens: .*must specify the START flag.*no longer "
                                           r"knows this sequence.*idle"):
        abandoned.send(old[50:])
    restarted = client.read(new, 5, chunk_size=len(new), want_memory=True)  # one request: no idle gap
    assert_equals_alone(restarted, runtime, new)
    assert int(restarted.last_logits.argmax()) == answer


def test_bad_requests_get_error_responses_and_the_server_keeps_serving(server, runtime):
    ids, _ = keyrecall_example(seed=5)
    client = TritonRMTClient(server.grpc_url, MAIN)
    live = client.sequence(400)
    live.send(ids[:20])
    seed = grpcclient.InferInput("start_memory", [1, 4, 64], "FP32")
    seed.set_data_from_numpy(np.zeros((1, 4, 64), np.float32))
    bad_seed = grpcclient.InferInput("start_memory", [1, 4, 63], "FP32")
    bad_seed.set_data_from_numpy(np.zeros((1, 4, 63), np.float32))
    cases = [
        ("wrong dtype", lambda: raw_infer(server, MAIN, ids[None, 20:30].astype(np.float32), 400, datatype="FP32"),
         "inference input 'input_ids' data-type is 'FP32', but model 'rmt' expects 'INT64'"),
        ("ids outside the vocabulary", lambda: raw_infer(server, MAIN, np.array([[3, 256, 4]]), 400),
         r"sequence 400: token id 256 at row 0, position 1 is outside the vocabulary 0..255"),
        ("negative id", lambda: raw_infer(server, MAIN, np.array([[-1]]), 400), "token id -1"),
        ("empty chunk", lambda: raw_infer(server, MAIN, np.zeros((1, 0), np.int64), 400),
         "sequence 400: input_ids is empty; every request carries at least one token"),
        ("no sequence id", lambda: raw_infer(server, MAIN, ids[None, 20:30], 0),
         "must specify a non-zero or non-empty correlation ID"),
        ("no START", lambda: raw_infer(server, MAIN, ids[None, 20:30], 401),
         "sequence 401 .* must specify the START flag"),
        ("start_memory without START", lambda: raw_infer(server, MAIN, ids[None, 20:30], 400, extra=[seed]),
         "sequence 400: start_memory seeds a new sequence; send it only with START"),
        ("start_memory of another shape", lambda: raw_infer(server, MAIN, ids[None, 20:30], 402, start=True,
                                                            extra=[bad_seed]),
         r"unexpected shape for input 'start_memory' for model 'rmt'. Expected \[-1,4,64\], got \[1,4,63\]"),
        ("two rows in one request", lambda: raw_infer(server, MAIN, np.stack([ids[20:30]] * 2), 400),
         "must specify batch-size 1 due to requirements of sequence batcher"),
    ]
    for what, send, message in cases:
        with pytest.raises(InferenceServerException, match=message) as refused:
            send()
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT", what
        assert server.running, what
    # The live sequence was untouched by the refused requests, and others are served.
    output = live.send(ids[20:], end=True, want_memory=True)
    assert_equals_alone(output, runtime, ids)
    assert_equals_alone(client.read(ids[:45], 403, want_memory=True), runtime, ids[:45])


def test_a_saved_state_continues_in_process_and_as_a_new_served_sequence(server, runtime, tmp_path):
    """keep_state: the client can save a live sequence as an rmt-edge state file at any chunk;
    RMTRuntime.restore_state continues it in process and TritonRMTClient.resume on the server,
    both bit-identical to an uninterrupted run; a state saved in process resumes on the server."""
    ids, answer = keyrecall_example(seed=6)
    client = TritonRMTClient(server.grpc_url, MAIN)
    sequence = client.sequence(500, keep_state=True)
    sequence.send(ids[:20])
    sequence.send(ids[20:45])                   # one full segment in memory, 13 tokens pending
    saved = sequence.save_state(tmp_path / "served.npz")
    sequence.send(ids[45:], end=True)
    state = runtime.restore_state(saved)
    runtime.feed(state, ids[45:])
    flushed = runtime.flush(state)
    alone = runtime.run(ids)
    np.testing.assert_array_equal(flushed.memory, alone.memory)
    np.testing.assert_array_equal(flushed.last_logits, alone.last_logits)
    resumed = client.resume(saved, 501).send(ids[45:], end=True, want_memory=True)
    assert_equals_alone(resumed, runtime, ids)
    assert int(resumed.last_logits.argmax()) == answer
    local = runtime.new_state()
    runtime.feed(local, ids[:70])
    runtime.save_state(local, tmp_path / "local.npz")
    continued = client.resume(tmp_path / "local.npz", 502)
    output = continued.send(ids[70:90])
    assert_equals_alone(output, runtime, ids[:90], memory=False)
    continued.send(ids[90:], end=True)


def test_killing_the_server_mid_stream_gives_a_clear_error_and_a_saved_state_resumes(
        triton_install, sample_bundle, runtime, tmp_path):
    """The memory lives in the server: killed mid-stream, the client's next request fails
    with an error that says so and how to recover; a new server resumes the saved state."""
    repo = tmp_path / "repo"
    write_triton_repository(sample_bundle, repo, TritonOptions(name=MAIN, repository_kind="python"))
    ids, answer = keyrecall_example(seed=8)
    with LocalTritonServer(repo, log_path=tmp_path / "first.log", venv=triton_install.venv) as first:
        sequence = TritonRMTClient(first.grpc_url, MAIN).sequence(9, keep_state=True)
        sequence.send(ids[:40])
        saved = sequence.save_state(tmp_path / "state.npz")
        first.kill()
        with pytest.raises(BackendError, match=r"Triton at 127\.0\.0\.1:\d+ did not answer for sequence 9 after 40 "
                                               r"tokens .*memory lived in that server.*resume"):
            sequence.send(ids[40:])
    with LocalTritonServer(repo, log_path=tmp_path / "second.log", venv=triton_install.venv) as second:
        client = TritonRMTClient(second.grpc_url, MAIN)
        output = client.resume(saved, 9).send(ids[40:], end=True, want_memory=True)
        assert_equals_alone(output, runtime, ids)
        assert int(output.last_logits.argmax()) == answer
