"""A small HTTP service holding per-session RMT memory, surviving restarts.

Each session is a stream: ``POST /sessions/<id>/feed`` with text appends to it, ``GET
/sessions/<id>/answer`` says what the text so far gives (the top next token, without
committing the partial segment), ``DELETE /sessions/<id>`` forgets it. After every feed
the session's state (memory + pending tokens) is saved atomically to --state-dir, so a
restarted service continues each conversation exactly where it stopped. Standard library
only (http.server); one runtime shared by all request threads, one lock per session.

    .venv/bin/python samples/memory_service.py --bundle out/demo/keyrecall-fp32 --port 8080
    curl -X POST --data 'key=C; some text ...' localhost:8080/sessions/alice/feed
    curl localhost:8080/sessions/alice/answer
"""
from __future__ import annotations

import argparse
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from rmt_runtime import RMTRuntime, RuntimeInputError, StateError

SESSION = re.compile(r"^/sessions/([A-Za-z0-9_-]{1,64})/(feed|answer|memory)$")
MAX_BODY = 1 << 20


class SessionStore:
    """Sessions by id: in memory while the service runs, on disk between runs."""

    def __init__(self, runtime: RMTRuntime, directory: Path) -> None:
        self.runtime = runtime
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._states: dict[str, object] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def lock(self, session: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(session, threading.Lock())

    def path(self, session: str) -> Path:
        return self.directory / f"{session}.npz"

    def state(self, session: str):
        """The session's state: in memory, else restored from disk, else new."""
        if session not in self._states:
            path = self.path(session)
            self._states[session] = (self.runtime.restore_state(path) if path.is_file()
                                     else self.runtime.new_state())
        return self._states[session]

    def save(self, session: str) -> None:
        self.runtime.save_state(self._states[session], self.path(session))

    def forget(self, session: str) -> None:
        self._states.pop(session, None)
        self.path(session).unlink(missing_ok=True)


def make_handler(store: SessionStore, tokenizer):
    runtime = store.runtime

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet: a service logs through its own channels
            pass

        def reply(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def route(self):
            match = SESSION.match(self.path)
            if not match:
                self.reply(404, {"error": f"unknown path {self.path}; use /sessions/<id>/feed|answer|memory"})
                return None
            return match.group(1), match.group(2)

        def do_POST(self):
            route = self.route()
            if route is None:
                return
            session, action = route
            if action != "feed":
                self.reply(405, {"error": f"POST goes to /sessions/{session}/feed"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self.reply(413, {"error": f"body over {MAX_BODY} bytes; send the text in chunks"})
                return
            try:
                text = self.rfile.read(length).decode("utf-8")
            except UnicodeDecodeError:
                self.reply(400, {"error": "body must be UTF-8 text"})
                return
            with store.lock(session):
                try:
                    state = store.state(session)
                    runtime.feed(state, tokenizer.encode(text).ids)
                    store.save(session)
                except (RuntimeInputError, StateError) as exc:
                    self.reply(400, {"error": str(exc)})
                    return
                self.reply(200, {"session": session, "tokens": int(state.tokens_seen[0]),
                                 "segments": int(state.segments_done[0])})

        def do_GET(self):
            route = self.route()
            if route is None:
                return
            session, action = route
            with store.lock(session):
                try:
                    output = runtime.peek(store.state(session))
                except StateError as exc:
                    self.reply(500, {"error": str(exc)})
                    return
            if action == "memory":
                self.reply(200, {"session": session, "memory": output.memory.tolist()})
                return
            if output.last_logits is None:
                self.reply(409, {"error": "nothing read yet in this session"})
                return
            best = int(np.argmax(output.last_logits[0]))
            self.reply(200, {"session": session, "answer": tokenizer.decode([best]), "token_id": best})

        def do_DELETE(self):
            route = self.route()
            if route is None:
                return
            with store.lock(route[0]):
                store.forget(route[0])
            self.reply(200, {"session": route[0], "deleted": True})

    return Handler


def serve(bundle: Path, state_dir: Path, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    from tokenizers import Tokenizer

    runtime = RMTRuntime.load(bundle)
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    return ThreadingHTTPServer((host, port), make_handler(SessionStore(runtime, state_dir), tokenizer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, default=Path("out/sessions"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    args = parser.parse_args()
    server = serve(args.bundle, args.state_dir, args.host, args.port)
    print(f"listening on http://{server.server_address[0]}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
