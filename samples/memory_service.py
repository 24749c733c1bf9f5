"""A small HTTP service holding per-session RMT memory, surviving restarts.

Each session is a stream of text:

    POST   /sessions/<id>/feed     body: UTF-8 text (at most 1 MiB) appended to the session
    GET    /sessions/<id>/answer   the top next token for the text so far (commits nothing)
    GET    /sessions/<id>/memory   the memory the text so far gives
    DELETE /sessions/<id>          forget the session (memory and file)

After every feed the session's state (memory + pending tokens) is saved atomically to
--state-dir, so a restarted service continues each conversation exactly where it stopped.
A feed is all or nothing: the body is read and checked in full first, and when the state
cannot be saved the session falls back to what is on disk, so a retry never feeds twice.
At most --max-sessions states stay in memory (least recently used leave first; they are on
disk). Errors say what was wrong without the server's paths. Standard library only
(http.server); one runtime shared by all request threads.

    .venv/bin/python samples/memory_service.py --bundle out/demo/keyrecall-fp32 --port 8080
    curl -X POST --data 'key=C; some text ...' localhost:8080/sessions/alice/feed
    curl localhost:8080/sessions/alice/answer
"""
from __future__ import annotations

import argparse
import json
import re
import threading
import zlib
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from rmt_runtime import RMTRuntime, RuntimeInputError, SequenceState, StateError

ROUTE = re.compile(r"^/sessions/([A-Za-z0-9_-]{1,64})(?:/(feed|answer|memory))?$")
MAX_BODY = 1 << 20
LOCK_STRIPES = 64


class SessionError(Exception):
    """A request the service refuses: ``status`` and a message without server paths."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class SessionStore:
    """Sessions by id: the most recently used in memory, every one on disk after each feed."""

    def __init__(self, runtime: RMTRuntime, directory: Path, max_sessions: int = 1024) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.runtime, self.directory, self.max_sessions = runtime, directory, max_sessions
        self.directory.mkdir(parents=True, exist_ok=True)
        self._states: OrderedDict[str, SequenceState] = OrderedDict()
        self._guard = threading.Lock()  # the table; per-session work holds a stripe lock
        self._stripes = [threading.Lock() for _ in range(LOCK_STRIPES)]

    def lock(self, session: str) -> threading.Lock:
        """The lock serialising requests of ``session`` (a fixed set, however many ids come)."""
        return self._stripes[zlib.crc32(session.encode()) % LOCK_STRIPES]

    def path(self, session: str) -> Path:
        return self.directory / f"{session}.npz"

    def in_memory(self) -> int:
        with self._guard:
            return len(self._states)

    def state(self, session: str, create: bool) -> SequenceState | None:
        """The session's state: in memory, else restored from disk, else new (``create``) or None."""
        with self._guard:
            if session in self._states:
                self._states.move_to_end(session)
                return self._states[session]
        path = self.path(session)
        if path.is_file():
            try:
                state = self.runtime.restore_state(path)
            except StateError:
                raise SessionError(500, f"session {session!r} cannot be restored: its state file is damaged or "
                                        "belongs to another model; DELETE it to start over") from None
        elif create:
            state = self.runtime.new_state()
        else:
            return None
        with self._guard:
            self._states[session] = state
            while len(self._states) > self.max_sessions:  # every state is on disk already
                self._states.popitem(last=False)
        return state

    def feed(self, session: str, ids: list[int]) -> SequenceState:
        """Append ``ids`` and save; memory and file move together or not at all."""
        state = self.state(session, create=True)
        try:
            self.runtime.feed(state, ids)
        except RuntimeInputError as exc:  # checked before the state changes
            raise SessionError(400, str(exc)) from None
        try:
            self.runtime.save_state(state, self.path(session))
        except StateError:  # the file cannot be written (disk full, permissions, a directory in the way)
            with self._guard:  # back to what is on disk: a retry feeds once, not twice
                self._states.pop(session, None)
            raise SessionError(503, f"session {session!r} could not be saved; nothing was committed, retry "
                                    "later") from None
        return state

    def forget(self, session: str) -> bool:
        """Drop the session from memory and disk; False when there was none."""
        with self._guard:
            known = self._states.pop(session, None) is not None
        path = self.path(session)
        if path.is_file():
            path.unlink()
            known = True
        return known


def _content_length(headers) -> int:
    raw = headers.get("Content-Length")
    if raw is None:
        raise SessionError(411, "a feed needs a Content-Length header")
    if not raw.strip().isdigit():
        raise SessionError(400, f"Content-Length must be a non-negative integer, got {raw[:20]!r}")
    length = int(raw)
    if length > MAX_BODY:
        raise SessionError(413, f"body of {length} bytes is over {MAX_BODY}; send the text in chunks")
    return length


def make_handler(store: SessionStore, tokenizer):
    runtime = store.runtime

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet: a service logs through its own channels
            pass

        def reply(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client is gone; nothing to tell
                pass

        def handle_route(self, method: str, work) -> None:
            match = ROUTE.match(self.path)
            if not match:
                self.reply(404, {"error": f"unknown path {self.path[:100]}; use /sessions/<id>/feed|answer|memory "
                                          "or /sessions/<id>"})
                return
            session, action = match.group(1), match.group(2)
            allowed = {"feed": "POST", "answer": "GET", "memory": "GET", None: "DELETE"}[action]
            if method != allowed:
                self.reply(405, {"error": f"{method} is not for {self.path}; use {allowed}"})
                return
            try:
                self.reply(200, work(session, action))
            except SessionError as exc:
                self.reply(exc.status, {"error": str(exc)})

        def read_body(self) -> str:
            length = _content_length(self.headers)
            body = b""
            while len(body) < length:  # a client that stops sending gets nothing committed
                chunk = self.rfile.read(length - len(body))
                if not chunk:
                    raise SessionError(400, f"body ended after {len(body)} of {length} bytes; nothing was fed")
                body += chunk
            try:
                return body.decode("utf-8")
            except UnicodeDecodeError:
                raise SessionError(400, "body must be UTF-8 text") from None

        def do_POST(self):
            def feed(session, action):
                text = self.read_body()  # all of it, checked, before the session is touched
                with store.lock(session):
                    state = store.feed(session, tokenizer.encode(text).ids)
                    return {"session": session, "tokens": int(state.tokens_seen[0]),
                            "segments": int(state.segments_done[0])}
            self.handle_route("POST", feed)

        def do_GET(self):
            def read(session, action):
                with store.lock(session):
                    state = store.state(session, create=False)
                    if state is None:
                        raise SessionError(404, f"no session {session!r}; POST text to /sessions/{session}/feed")
                    output = runtime.peek(state)
                if action == "memory":
                    return {"session": session, "memory": output.memory.tolist()}
                if output.last_logits is None or not int(state.tokens_seen[0]):
                    raise SessionError(409, "nothing read yet in this session")
                best = int(np.argmax(output.last_logits[0]))
                return {"session": session, "answer": tokenizer.decode([best]), "token_id": best}
            self.handle_route("GET", read)

        def do_DELETE(self):
            def forget(session, action):
                with store.lock(session):
                    if not store.forget(session):
                        raise SessionError(404, f"no session {session!r}")
                return {"session": session, "deleted": True}
            self.handle_route("DELETE", forget)

    return Handler


def serve(bundle: Path, state_dir: Path, host: str = "127.0.0.1", port: int = 8080,
          max_sessions: int = 1024) -> ThreadingHTTPServer:
    from tokenizers import Tokenizer

    runtime = RMTRuntime.load(bundle)
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    store = SessionStore(runtime, state_dir, max_sessions)
    server = ThreadingHTTPServer((host, port), make_handler(store, tokenizer))
    server.store = store  # for the operator (and the tests): sessions held in memory
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, default=Path("out/sessions"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--max-sessions", type=int, default=1024, help="sessions kept in memory (all stay on disk)")
    args = parser.parse_args()
    server = serve(args.bundle, args.state_dir, args.host, args.port, args.max_sessions)
    print(f"listening on http://{server.server_address[0]}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
