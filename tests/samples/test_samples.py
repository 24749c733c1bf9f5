"""Every sample runs (at small sizes) on the shipped trained checkpoint."""
import json
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmt_runtime import RMTRuntime
from samples import accuracy_table, train_sample
from samples.byte_tokenizer import build_tokenizer
from samples.streaming_reader import read_and_answer
from samples.task import CHANCE, KEYS, make_batch, make_example

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = ROOT / "samples" / "keyrecall" / "model.pt"


@pytest.fixture(scope="module")
def sample_out(shared_once):
    """One directory holding the sample's fp32, fp16 and int8 bundles, exported once per run."""
    def export_all(path):
        path.mkdir()
        for precision in ("fp32", "fp16", "int8"):
            accuracy_table.bundle_for(precision, path, CHECKPOINT)
    return shared_once("sample", export_all)


@pytest.fixture(scope="module")
def sample_bundle(sample_out):
    return accuracy_table.bundle_for("fp32", sample_out, CHECKPOINT)


def test_byte_tokenizer_maps_each_byte_to_its_id():
    tokenizer = build_tokenizer()
    text = "key=K; é\n?"
    assert tokenizer.encode(text).ids == list(text.encode())
    assert tokenizer.decode(list(text.encode())) == text


def test_task_needs_memory_by_construction():
    text, answer = make_example(np.random.default_rng(0), segments=3, segment_size=32)
    assert len(text) == 3 * 32 - 1 and chr(answer) in KEYS
    assert text.startswith(f"key={chr(answer)};".encode()) and text.endswith(b"?key=")
    assert chr(answer).encode() not in text[32:]  # the key appears only in the first segment


def _task_loss(model, ids, answers):
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(torch.from_numpy(ids)).logits[:, -1],
                                                       torch.from_numpy(answers)))


def test_training_is_seeded_and_learns():
    ids, answers = make_batch(np.random.default_rng(123), 128, 2, 32)  # held out: training draws from seed 3
    untrained = train_sample.train(steps=0, seed=3, batch=8, log=lambda line: None)
    first = train_sample.train(steps=30, seed=3, batch=8, log=lambda line: None)
    second = train_sample.train(steps=30, seed=3, batch=8, log=lambda line: None)
    a, b = first.state_dict(), second.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # reproducible bit for bit
    # Measured held-out task loss: 5.50 untrained (ln 256, uniform over bytes), 3.68 after 30 steps
    # (on its way to ln 16 = 2.77, the answer being one of the 16 keys; reading the key from memory,
    # accuracy over chance, takes ~150 steps of batch 32, too long for this suite).
    before, after = _task_loss(untrained, ids, answers), _task_loss(first, ids, answers)
    assert after < before - 1.0, (before, after)


def test_shipped_model_answers_and_bundles_agree(sample_out, tmp_path):
    result = accuracy_table.measure(CHECKPOINT, sample_out, examples=64, segments=(2, 16))
    for row in result["rows"]:
        assert row["pytorch"] >= 0.95
        assert row["fp32_agrees_with_pytorch"] >= 0.99 and row["fp16_agrees_with_pytorch"] >= 0.99
        assert row["int8_agrees_with_pytorch"] >= 0.99  # issue 8's bar for the quantized bundle
        if "bf16" not in result["not_run"]:  # the fp32 bundle computed in bf16 by OpenVINO (issue 19's bar)
            assert row["bf16_agrees_with_pytorch"] >= 0.99
        assert row["memory_reset"] <= CHANCE + 0.15  # without memory: chance
    assert set(result["not_run"]) <= {"bf16"} and not result["refused"]
    png = accuracy_table.plot(result, tmp_path / "accuracy.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 16 |" in accuracy_table.table(result)


def test_streaming_reader_answers_from_chunks(sample_bundle):
    from tokenizers import Tokenizer

    runtime = RMTRuntime.load(sample_bundle)
    tokenizer = Tokenizer.from_file(str(sample_bundle / "tokenizer.json"))
    text, answer = make_example(np.random.default_rng(5), segments=12, segment_size=32)
    document = text.decode()
    chunks = [document[i:i + 37] for i in range(0, len(document), 37)]
    predicted, tokens = read_and_answer(runtime, tokenizer, chunks)
    assert predicted == chr(answer) and tokens == len(text)


# (checkpoint, what the parity line names, validation figures printed): the RMT's 4 step, 4
# ingest and 3 prefill/decode figures; the ARMT's 2 (logits) + 8 (4 state tensors) per
# segment graph, in 2 modes each, and the same 3.
DEMOS = {"rmt": (CHECKPOINT, "memory", 11), "armt": (ROOT / "samples" / "keyrecall_armt" / "model.pt",
                                                       r"state \(4 tensors\)", 23)}


@pytest.mark.parametrize("sample", sorted(DEMOS))
def test_demo_runs_end_to_end(tmp_path, sample):
    checkpoint, state, figures = DEMOS[sample]
    result = subprocess.run([sys.executable, str(ROOT / "samples" / "demo.py"), "--out", str(tmp_path),
                             "--checkpoint", str(checkpoint), "--segments", "8", "--examples", "16"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    answer = re.search(r"answer: '(.)'  \(expected '(.)': (right|WRONG)\)", out)
    assert answer and answer[1] == answer[2] and answer[3] == "right", out
    parity = re.search(state + r" max abs diff (\S+), same answer: (True|False)", out)
    # Measured: 9.5e-7 after 8 segments (fp32; the export suite bounds chained memory at 1e-5).
    assert parity and float(parity[1]) < 1e-5 and parity[2] == "True", out
    # The export's validation summary: worst errors measured 1.4e-6..5.7e-6 (logits up to ~12).
    errors = [float(x) for line in out.splitlines() if "max abs error" in line
              for x in re.findall(r" (\d\.\d+e[-+]\d+)", line.split("max abs error", 1)[1])]
    assert len(errors) == figures and max(errors) < 5e-5, out
    accuracy = re.search(r"16 examples of 8 segments, batched: accuracy (\d\.\d+) \(chance", out)
    assert accuracy and float(accuracy[1]) >= 0.9, out  # measured 1.000; chance is 0.062
    assert re.search(r"runtime [\d,]+ tokens/s, PyTorch eager [\d,]+ tokens/s", out), out


def _start_service(bundle, state_dir):
    process = subprocess.Popen([sys.executable, str(ROOT / "samples" / "memory_service.py"), "--bundle", str(bundle),
                                "--state-dir", str(state_dir), "--port", "0"], stdout=subprocess.PIPE, text=True,
                               cwd=ROOT)
    line = process.stdout.readline()
    assert line.startswith("listening on http://127.0.0.1:"), line
    return process, line.strip().split()[-1]


def _call(url, method="GET", data=None):
    request = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_service_keeps_sessions_across_a_restart(sample_bundle, tmp_path):
    text, answer = make_example(np.random.default_rng(9), segments=10, segment_size=32)
    document = text.decode()
    state_dir = tmp_path / "sessions"
    process, base = _start_service(sample_bundle, state_dir)
    try:
        _call(f"{base}/sessions/alice/feed", "POST", document[:150].encode())
        _call(f"{base}/sessions/bob/feed", "POST", b"key=B; unrelated")
    finally:
        process.send_signal(signal.SIGKILL)  # no clean shutdown: only what is on disk survives
        process.wait()
    process, base = _start_service(sample_bundle, state_dir)
    try:
        fed = _call(f"{base}/sessions/alice/feed", "POST", document[150:].encode())
        assert fed["tokens"] == len(text)
        reply = _call(f"{base}/sessions/alice/answer")
        memory = np.array(_call(f"{base}/sessions/alice/memory")["memory"], dtype=np.float32)
    finally:
        process.terminate()
        process.wait()
    assert reply["answer"] == chr(answer)
    runtime = RMTRuntime.load(sample_bundle)
    state = runtime.new_state()
    runtime.feed(state, list(text))
    np.testing.assert_array_equal(memory, runtime.peek(state).memory)  # nothing lost in the restart
    assert sorted(p.name for p in state_dir.iterdir()) == ["alice.npz", "bob.npz"]


def test_encoder_sample_classifies_long_documents(sample_out):
    """The trained encoder reads 12-segment documents; the runtime agrees with PyTorch."""
    from tokenizers import Tokenizer

    from rmt_export.exporter import ExportOptions, export_bundle
    from rmt_model import load_checkpoint
    from samples.classify_document import classify
    from samples.train_encoder_sample import make_documents

    checkpoint = ROOT / "samples" / "keyclass" / "model.pt"
    bundle = export_bundle(checkpoint, sample_out / "keyclass-fp32",
                           ExportOptions(force=True, tokenizer_dir=checkpoint.parent)).path
    runtime = RMTRuntime.load(bundle)
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    model = load_checkpoint(checkpoint)
    ids, labels = make_documents(np.random.default_rng(8), 32, 12 * 32 - 7)
    right = 0
    for row, label in zip(ids, labels):
        predicted, logits = classify(runtime, tokenizer, bytes(row.tolist()).decode("ascii"))
        with torch.no_grad():
            reference = model(torch.from_numpy(row[None])).logits[0].numpy()
        assert int(logits.argmax()) == int(reference.argmax())
        right += predicted == KEYS[label]
    assert right / len(labels) >= 0.9


def _classify_document(args, cwd, without=()):
    """samples/classify_document.py as a user runs it, in ``cwd``, with ``without`` unimportable."""
    from tests.without_modules import run_without

    script = ROOT / "samples" / "classify_document.py"
    code = f"import runpy\nsys.argv[0] = {str(script)!r}\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    return run_without(tuple(without), code, args, cwd=cwd)


def test_classify_document_exports_its_bundle_on_first_use_then_reuses_it(tmp_path):
    from samples.train_encoder_sample import make_documents

    ids, labels = make_documents(np.random.default_rng(21), 1, 12 * 32 - 7)
    document = tmp_path / "doc.txt"
    document.write_bytes(bytes(ids[0].tolist()))
    first = _classify_document(["--file", document], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    bundle = tmp_path / "out" / "keyclass-fp32"  # the default, under the working directory
    assert f"exporting {ROOT / 'samples' / 'keyclass' / 'model.pt'} to out/keyclass-fp32" in first.stderr
    assert "[tokenizer] tokenizer.json from" in first.stderr and (bundle / "tokenizer.json").is_file()
    again = _classify_document(["--file", document], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "exporting" not in again.stderr  # the bundle is there now
    for result in (first, again):
        assert re.fullmatch(rf"{len(ids[0])} characters -> class {KEYS[labels[0]]} \(logit \S+\)\n", result.stdout)


def test_classify_document_without_torch_says_the_command_that_creates_its_bundle(tmp_path):
    result = _classify_document([], cwd=tmp_path, without=("torch",))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        'error: out/keyclass-fp32 does not exist, and exporting it here needs the export extra (torch is not '
        'installed: pip install "rmt-edge[export]"); create it with: rmt-export --ckpt '
        f'{ROOT / "samples" / "keyclass" / "model.pt"} --out out/keyclass-fp32']
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("make, says", [
    (lambda path: None, "does not exist; create the sample's bundle with: rmt-export --ckpt "),
    (lambda path: path.mkdir(), "not a complete bundle"),
])
def test_classify_document_on_a_missing_or_broken_bundle_is_one_line(tmp_path, make, says):
    bundle = tmp_path / "mine"
    make(bundle)
    result = _classify_document(["--bundle", bundle], cwd=tmp_path, without=("torch",))
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ") and says in result.stderr
    assert f"--out {bundle}" in result.stderr  # the exact command that creates it


def test_rmt_generate_answers_the_key_and_remembers_it_across_turns(sample_bundle, tmp_path):
    """The trained sample through the real rmt-generate process: text in, text out, memory
    carrying the key from the first turn into the second after several segment rollovers."""
    text, answer = make_example(np.random.default_rng(8), segments=6, segment_size=32)
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(text)
    command = [sys.executable, "-m", "rmt_runtime.generate_cli", "--bundle", str(sample_bundle)]
    one = subprocess.run(command + ["--prompt-file", str(prompt), "--max-new-tokens", "3", "--json"],
                         capture_output=True, text=True, check=True)
    assert json.loads(one.stdout)["text"][0] == chr(answer)
    state = tmp_path / "chat.npz"
    filler = "the quick brown fox jumps over the lazy dog " * 3
    turns = [f"key={chr(answer)};{filler}", f"{filler}{filler}?key="]
    replies = [json.loads(subprocess.run(command + ["--prompt", turn, "--max-new-tokens", "2", "--state", str(state),
                                                    "--json"], capture_output=True, text=True, check=True).stdout)
               for turn in turns]
    assert replies[1]["segments_in_memory"] >= 5  # the key's segment was rolled into memory long ago
    assert replies[1]["text"][0] == chr(answer)


# ---- the HTTP service as a service: bad requests change nothing --------------------------------------
IDLE_TIMEOUT = 0.5  # the service's limit for a request's headers or body in these tests (a real one: 15 s)


@pytest.fixture
def service(sample_bundle, tmp_path):
    """The memory service in this process on a free loopback port: (host, port, its session store, state dir)."""
    import asyncio
    import threading

    from samples.memory_service import STORE, start

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = asyncio.run_coroutine_threadsafe(
        start(sample_bundle, tmp_path / "sessions", port=0, max_sessions=2, idle_timeout=IDLE_TIMEOUT), loop).result()
    host, port = runner.addresses[0][:2]
    yield host, port, runner.app[STORE], tmp_path / "sessions"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


def _reply(sock) -> tuple[int, str] | None:
    """The first response read from ``sock``: (status, body), or None when the server closed without one."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head)[1])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"the reply ended after {len(body)} of {length} bytes"
        body += chunk
    return int(head.split()[1]), body.decode()


def _raw(host, port, request: bytes, close_early: bool = False) -> tuple[int, str] | None:
    """Send ``request`` bytes as they are; (status, reply body) or None when the server closed without a reply."""
    import socket

    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(request)
        if close_early:
            sock.shutdown(socket.SHUT_WR)  # the client stops sending: the body stays short
        try:
            return _reply(sock)
        except ConnectionResetError:
            return None


def _request(host, port, method, path, body: bytes | None = None) -> tuple[int, dict]:
    import http.client

    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.request(method, path, body=body)
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def _nothing_fed(host, port, state_dir, session="alice") -> bool:
    return _request(host, port, "GET", f"/sessions/{session}/memory")[0] == 404 and \
        not (state_dir / f"{session}.npz").exists()


FEED = b"POST /sessions/alice/feed HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"


@pytest.mark.parametrize("headers, status, message", [
    (b"Content-Length: -1\r\n", 400, "Content-Length"),
    (b"Content-Length: lots\r\n", 400, "Content-Length"),
    (b"", 411, "a feed needs a Content-Length header"),  # then no body: bytes after it would be a second request
    (b"Content-Length: 2000000\r\n", 413, "body of 2000000 bytes is over 1048576"),
])
def test_service_refuses_bad_lengths_and_feeds_nothing(service, headers, status, message):
    host, port, _, state_dir = service
    got, reply = _raw(host, port, FEED + headers + b"\r\n" + (b"key=A;" if headers else b""))
    assert got == status and message in reply
    assert _nothing_fed(host, port, state_dir)


# Request smuggling (RFC 9112 6.3, 5.2) and malformed framing: each is refused by the HTTP parser,
# before a handler sees it, and the session is left as it was.
SMUGGLING = {
    "two different Content-Length": b"Content-Length: 6\r\nContent-Length: 7\r\n\r\nkey=A;x",
    "the same Content-Length twice": b"Content-Length: 6\r\nContent-Length: 6\r\n\r\nkey=A;",
    "a Content-Length list": b"Content-Length: 6, 7\r\n\r\nkey=A;x",
    "Content-Length with Transfer-Encoding": b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
                                             b"6\r\nkey=A;\r\n0\r\n\r\n",
    "a signed Content-Length": b"Content-Length: +6\r\n\r\nkey=A;",
    "a hexadecimal Content-Length": b"Content-Length: 0x6\r\n\r\nkey=A;",
    "a Content-Length with a space inside": b"Content-Length: 6 6\r\n\r\nkey=A;",
    "a space before the colon": b"Content-Length : 6\r\n\r\nkey=A;",
    "an unknown Transfer-Encoding": b"Transfer-Encoding: xchunked\r\n\r\n6\r\nkey=A;\r\n0\r\n\r\n",
    "a bad chunk size": b"Transfer-Encoding: chunked\r\n\r\n+6\r\nkey=A;\r\n0\r\n\r\n",
    "obs-fold": b"X-Note: a\r\n folded\r\nContent-Length: 6\r\n\r\nkey=A;",
    "a NUL in a header": b"X-Note: a\x00b\r\nContent-Length: 6\r\n\r\nkey=A;",
    "a huge header line": b"X-Note: " + b"a" * 100_000 + b"\r\nContent-Length: 6\r\n\r\nkey=A;",
    "a flood of headers": b"".join(b"X-%d: v\r\n" % i for i in range(1000)) + b"Content-Length: 6\r\n\r\nkey=A;",
}


@pytest.mark.parametrize("case", SMUGGLING)
def test_service_refuses_ambiguous_or_oversized_framing_and_feeds_nothing(service, case):
    host, port, _, state_dir = service
    assert _request(host, port, "POST", "/sessions/alice/feed", b"key=A; ")[1]["tokens"] == 7
    before = (state_dir / "alice.npz").read_bytes()
    reply = _raw(host, port, FEED + SMUGGLING[case])
    assert reply is not None and 400 <= reply[0] < 500, reply
    assert (state_dir / "alice.npz").read_bytes() == before
    status, fed = _request(host, port, "POST", "/sessions/alice/feed", b"k")
    assert (status, fed["tokens"]) == (200, 8)  # 7 + this one: the refused request fed nothing


@given(length=st.text(alphabet="0123456789abcdefx+-,;. \t", min_size=1, max_size=8).filter(
    lambda v: not re.fullmatch(r"[ \t]*[0-9]+[ \t]*", v)))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_content_length_that_is_not_digits_is_refused(service, length):
    host, port, _, state_dir = service
    reply = _raw(host, port, FEED + b"Content-Length: " + length.encode() + b"\r\n\r\nkey=A;")
    assert reply is not None and reply[0] == 400, (length, reply)
    assert _nothing_fed(host, port, state_dir)


def test_partial_headers_are_dropped_after_the_idle_timeout(service):
    """A slow-loris client (headers never finished) is closed by the server's limit, not held."""
    import socket

    host, port, _, state_dir = service
    with socket.create_connection((host, port), timeout=30 * IDLE_TIMEOUT) as sock:
        sock.sendall(b"POST /sessions/alice/feed HTTP/1.1\r\nHost: x\r\nContent-Le")
        assert sock.recv(65536) == b""  # closed by the server (a timeout here raises instead)
    assert _nothing_fed(host, port, state_dir)


def test_a_stalled_body_gets_408_after_the_idle_timeout_and_feeds_nothing(service):
    host, port, _, state_dir = service
    import socket

    with socket.create_connection((host, port), timeout=30 * IDLE_TIMEOUT) as sock:
        sock.sendall(FEED + b"Content-Length: 100\r\n\r\nkey=A; only part")
        status, reply = _reply(sock)
    assert status == 408 and "not all 100 bytes came" in json.loads(reply)["error"]
    assert _nothing_fed(host, port, state_dir)


def test_a_client_that_stops_mid_body_commits_nothing(service):
    host, port, _, state_dir = service
    request = b"POST /sessions/bob/feed HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nkey=B; only part"
    assert _raw(host, port, request, close_early=True) is None  # the connection ends; there is no one to answer
    assert _nothing_fed(host, port, state_dir, "bob")


def test_service_without_aiohttp_says_how_to_install_it(tmp_path):
    from tests.without_modules import run_without

    script = ROOT / "samples" / "memory_service.py"
    code = f"import runpy\nsys.argv[0] = {str(script)!r}\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    result = run_without(("aiohttp",), code, ["--bundle", tmp_path], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["the memory service needs aiohttp: pip install 'rmt-edge[service]'"]


def test_service_listens_on_loopback_only(service):
    host, _, _, _ = service  # start()'s default host, as the fixture passes none (and main's --host default)
    assert host == "127.0.0.1"


def test_a_failed_save_commits_nothing_and_a_retry_feeds_once(service):
    host, port, _, state_dir = service
    assert _request(host, port, "POST", "/sessions/carol/feed", b"key=C; ")[1]["tokens"] == 7
    (state_dir / "carol.npz").unlink()
    (state_dir / "carol.npz").mkdir()  # the next save cannot replace a directory
    status, reply = _request(host, port, "POST", "/sessions/carol/feed", b"more text")
    assert status == 503 and "nothing was committed" in reply["error"] and str(state_dir) not in reply["error"]
    (state_dir / "carol.npz").rmdir()
    status, reply = _request(host, port, "POST", "/sessions/carol/feed", b"more text")
    assert status == 200 and reply["tokens"] == 9  # what is on disk (nothing) + this feed, once


def test_sessions_are_bounded_in_memory_and_deletable(service, sample_bundle):
    host, port, store, state_dir = service
    texts = {"a": b"key=A; one", "b": b"key=B; two", "c": b"key=C; three"}
    for session, text in texts.items():
        assert _request(host, port, "POST", f"/sessions/{session}/feed", text)[0] == 200
    assert store.in_memory() == 2  # --max-sessions 2: the least recently used left memory, not disk
    assert _request(host, port, "GET", "/sessions/nobody/answer")[0] == 404  # no state kept for it
    assert store.in_memory() == 2
    runtime = RMTRuntime.load(sample_bundle)
    for session, text in texts.items():  # evicted or not, each session is intact
        state = runtime.new_state()
        runtime.feed(state, list(text))
        memory = np.array(_request(host, port, "GET", f"/sessions/{session}/memory")[1]["memory"], np.float32)
        np.testing.assert_array_equal(memory, runtime.peek(state).memory)
    assert _request(host, port, "DELETE", "/sessions/a") == (200, {"session": "a", "deleted": True})
    assert not (state_dir / "a.npz").exists() and _request(host, port, "GET", "/sessions/a/answer")[0] == 404
    assert _request(host, port, "DELETE", "/sessions/a")[0] == 404
    assert _request(host, port, "GET", "/sessions/b")[0] == 405 and _request(host, port, "GET", "/other")[0] == 404


def test_service_errors_do_not_show_server_paths(service):
    host, port, _, state_dir = service
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "dave.npz").write_bytes(b"not a state file")
    status, reply = _request(host, port, "GET", "/sessions/dave/answer")
    assert status == 500 and "cannot be restored" in reply["error"] and str(state_dir) not in reply["error"]
