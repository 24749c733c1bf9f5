"""A real tritonserver (nvidia-pytriton's) serving the python-kind repository of an ARMT bundle
(2 x L named state pairs W_mem.{l}/z.{l}, no memory), driven over gRPC on 127.0.0.1: the state
stays in the server per sequence, concurrent sequences run batched, and every served result
equals the in-process runtime bit for bit (the same code path: RMTRuntime on ONNX Runtime CPU,
one thread, the same onnxruntime version on both sides; tests/triton/conftest.py checks that).

(The onnxruntime kind is not served here: the nvidia-pytriton wheel ships the Python backend
only, pytriton/tritonserver/backends/python; test_repository.py checks its ARMT config and
replays its implicit-state protocol with ONNX Runtime.)"""
import queue
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from rmt_export.triton import TritonOptions, write_triton_repository
from rmt_export.triton_server import LocalTritonServer
from rmt_runtime import BackendError, RMTRuntime
from rmt_runtime.triton_client import TritonRMTClient

from .conftest import live_sequences

ARMT = "armt"              # max batch 8, idle 60 s
ARMT_PAIRS = "armt_pairs"  # waits up to 20 s for 2 requests: the two concurrent sequences run as one batch


@pytest.fixture(scope="module")
def armt_path(armt_bundle_factory):
    return armt_bundle_factory("fp32")[1]


@pytest.fixture(scope="module")
def armt_runtime(armt_path):
    """What the served model must equal: the server runs exactly this (ONNX Runtime CPU, 1 thread)."""
    return RMTRuntime.load(armt_path, backend="onnxruntime", provider="cpu", threads=1)


@pytest.fixture(scope="module")
def armt_server(triton_install, armt_path, tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton-armt-repo")
    for options in (TritonOptions(name=ARMT, repository_kind="python", max_batch_size=8),
                    TritonOptions(name=ARMT_PAIRS, repository_kind="python", max_batch_size=2,
                                  max_queue_delay_us=20_000_000)):
        write_triton_repository(armt_path, repo, options)
    log = tmp_path_factory.mktemp("triton-armt-log") / "tritonserver.log"
    with LocalTritonServer(repo, log_path=log, venv=triton_install.venv) as running:
        yield running
        assert running.running, f"the server died during the tests:\n{running.log_tail()}"


def test_two_armt_sequences_streamed_concurrently_in_uneven_chunks_equal_runtime_run(armt_server, armt_runtime):
    """Two client threads each stream one sequence in chunks of uneven lengths (stopping short of,
    ending on and crossing segment boundaries), in lockstep so that every execution of
    armt_pairs holds one chunk of each (Triton's statistics say so). After every chunk the
    logits equal RMTRuntime.run on that sequence's input so far, bit for bit; at END the
    server forgets both."""
    segment = armt_runtime.segment_size
    assert "memory" not in armt_runtime.state_pairs and segment == 16
    rng = np.random.default_rng(21)
    vocab = armt_runtime.bundle.vocab_size
    documents = {11: rng.integers(0, vocab, 83), 12: rng.integers(0, vocab, 58)}
    cuts = {11: [0, 5, 16, 17, 40, 64, 70, 83], 12: [0, 13, 14, 32, 33, 47, 50, 58]}  # 7 chunks each
    client = grpcclient.InferenceServerClient(armt_server.grpc_url)

    def stats():
        (model,) = client.get_inference_statistics(ARMT_PAIRS, as_json=True)["model_stats"]
        return int(model.get("inference_count", 0)), int(model.get("execution_count", 0))

    before = stats()
    outputs, failures = {sid: [] for sid in documents}, queue.Queue()
    barrier = threading.Barrier(2)

    def stream(sid):
        try:
            sequence = TritonRMTClient(armt_server.grpc_url, ARMT_PAIRS).sequence(sid)
            barrier.wait(timeout=120)
            bounds = cuts[sid]
            for a, b in zip(bounds, bounds[1:]):
                outputs[sid].append(sequence.send(documents[sid][a:b], end=b == bounds[-1]))
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.put(f"sequence {sid}: {exc!r}")

    threads = [threading.Thread(target=stream, args=(sid,)) for sid in documents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures.empty(), list(failures.queue)
    for sid, ids in documents.items():
        assert len(outputs[sid]) == 7
        for b, output in zip(cuts[sid][1:], outputs[sid]):
            alone = armt_runtime.run(ids[:b])
            np.testing.assert_array_equal(output.last_logits, alone.last_logits[0], err_msg=f"{sid} at {b}")
            assert output.memory is None and output.tokens_seen == b
    after = stats()
    assert (after[0] - before[0], after[1] - before[1]) == (14, 7)  # 14 requests in 7 batches of 2
    assert live_sequences(armt_server, ARMT_PAIRS) == 0


def test_armt_end_frees_the_state_and_memory_tensors_are_refused_saying_why(armt_server, armt_runtime, tmp_path):
    """The state lives in the server only: END frees it and the id starts again from zeros; the
    client refuses keep_state, resume and want_memory (the ARMT's state is per layer), and a
    hand-made request with start_memory is refused by Triton (the config has no such input)."""
    client = TritonRMTClient(armt_server.grpc_url, ARMT)
    assert client.kind == "python" and client.memory_shape is None
    ids = np.random.default_rng(22).integers(0, armt_runtime.bundle.vocab_size, 50)
    sequence = client.sequence(31)
    sequence.send(ids[:20])
    assert live_sequences(armt_server, ARMT) == 1
    sequence.send(ids[20:], end=True)
    assert live_sequences(armt_server, ARMT) == 0
    again = client.read(ids[::-1].copy(), 31, chunk_size=7)
    np.testing.assert_array_equal(again.last_logits, armt_runtime.run(ids[::-1].copy()).last_logits[0])

    why = r"needs the RMT's memory tensors, and model 'armt' at 127\.0\.0\.1:\d+ has none: .*W_mem and z of every " \
          r"layer.*stays in the server"
    with pytest.raises(BackendError, match="keep_state=True " + why):
        client.sequence(32, keep_state=True)
    with pytest.raises(BackendError, match="want_memory=True " + why):
        client.read(ids, 33, want_memory=True)
    with pytest.raises(BackendError, match="want_memory=True " + why):
        client.sequence(34).send(ids[:3], want_memory=True)
    with pytest.raises(BackendError, match="resume" + r"\(\) " + why):
        client.resume(tmp_path / "never-written.npz", 35)
    ids_tensor = grpcclient.InferInput("input_ids", [1, 5], "INT64")
    ids_tensor.set_data_from_numpy(ids[None, :5])
    seed = grpcclient.InferInput("start_memory", [1, 4, 32], "FP32")
    seed.set_data_from_numpy(np.zeros((1, 4, 32), np.float32))
    raw = grpcclient.InferenceServerClient(armt_server.grpc_url)
    with pytest.raises(InferenceServerException, match="start_memory") as refused:
        raw.infer(ARMT, [ids_tensor, seed], sequence_id=36, sequence_start=True, sequence_end=True)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert armt_server.running and live_sequences(armt_server, ARMT) == 0
