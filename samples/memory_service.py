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
disk). Errors say what was wrong without the server's paths. One runtime is shared by all
requests, which run in a thread pool.

HTTP is aiohttp's, not parsed here (pip install 'rmt-edge[service]'; wheels for x86 and
aarch64, Python 3.10+, no torch). It was chosen by probing raw requests against the
candidates: aiohttp's parser (llhttp, and its pure-Python fallback alike) answers 400 to two
Content-Length headers, Content-Length with Transfer-Encoding, a length with a sign or
other characters, obs-fold, bare LF, bad chunk sizes, header lines over 8 KiB and floods
of headers. http.server took most of these (request smuggling); uvicorn with h11 took
Content-Length with Transfer-Encoding, obs-fold and header floods; waitress took the
floods and a repeated Transfer-Encoding. A connection that sends no complete request is
closed after --idle-timeout seconds, and a body that stalls gets 408 after as long.

    .venv/bin/python samples/memory_service.py --bundle out/demo/keyrecall-fp32 --port 8080
    curl -X POST --data 'key=C; some text ...' localhost:8080/sessions/alice/feed
    curl localhost:8080/sessions/alice/answer
"""
from __future__ import annotations

import argparse
import asyncio
import threading
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

try:
    from aiohttp import web
except ImportError:
    raise SystemExit("the memory service needs aiohttp: pip install 'rmt-edge[service]'") from None

from rmt_runtime import RMTRuntime, RuntimeInputError, SequenceState, StateError

SESSION = "/sessions/{session:[A-Za-z0-9_-]{1,64}}"
MAX_BODY = 1 << 20
LOCK_STRIPES = 64
IDLE_TIMEOUT = 15.0  # seconds a connection may take to send a request's headers, or its body


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


STORE = web.AppKey("store", SessionStore)


def make_app(store: SessionStore, tokenizer, idle_timeout: float = IDLE_TIMEOUT) -> web.Application:
    """The service's routes over ``store``; every error is ``{"error": ...}`` with its status."""
    runtime = store.runtime

    def feed(session: str, text: str) -> dict:
        with store.lock(session):
            state = store.feed(session, tokenizer.encode(text).ids)
            return {"session": session, "tokens": int(state.tokens_seen[0]), "segments": int(state.segments_done[0])}

    def read(session: str, action: str) -> dict:
        with store.lock(session):
            state = store.state(session, create=False)
            if state is None:
                raise SessionError(404, f"no session {session!r}; POST text to /sessions/{session}/feed")
            output = runtime.peek(state)
            seen = int(state.tokens_seen[0])  # read under the session's lock, as the peek was
        if action == "memory":
            return {"session": session, "memory": output.memory.tolist()}
        if output.last_logits is None or not seen:
            raise SessionError(409, "nothing read yet in this session")
        best = int(np.argmax(output.last_logits[0]))
        return {"session": session, "answer": tokenizer.decode([best]), "token_id": best}

    def forget(session: str) -> dict:
        with store.lock(session):
            if not store.forget(session):
                raise SessionError(404, f"no session {session!r}")
        return {"session": session, "deleted": True}

    async def read_text(request: web.Request) -> str:
        """The whole body, checked, before the session is touched (a cut body feeds nothing)."""
        length = request.content_length
        if length is None:  # the parser has refused malformed and conflicting lengths already
            raise SessionError(411, "a feed needs a Content-Length header (chunked bodies are not taken)")
        if length > MAX_BODY:
            raise SessionError(413, f"body of {length} bytes is over {MAX_BODY}; send the text in chunks")
        try:
            body = await asyncio.wait_for(request.read(), idle_timeout)
        except asyncio.TimeoutError:
            raise SessionError(408, f"body stalled: not all {length} bytes came within {idle_timeout:g} s; "
                                    "nothing was fed") from None
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise SessionError(400, "body must be UTF-8 text") from None

    async def on_feed(request: web.Request) -> web.Response:
        session = request.match_info["session"]
        text = await read_text(request)
        return web.json_response(await asyncio.to_thread(feed, session, text))

    async def on_read(request: web.Request) -> web.Response:
        session, action = request.match_info["session"], request.path.rsplit("/", 1)[1]
        return web.json_response(await asyncio.to_thread(read, session, action))

    async def on_delete(request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(forget, request.match_info["session"]))

    @web.middleware
    async def json_errors(request: web.Request, handler):
        try:
            return await handler(request)
        except SessionError as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        except web.HTTPMethodNotAllowed as exc:
            return web.json_response({"error": f"{request.method} is not for {request.path[:100]}; use "
                                               f"{', '.join(sorted(exc.allowed_methods))}"}, status=405)
        except web.HTTPNotFound:
            return web.json_response({"error": f"unknown path {request.path[:100]}; use "
                                               "/sessions/<id>/feed|answer|memory or /sessions/<id>"}, status=404)

    app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY)
    app.add_routes([web.post(f"{SESSION}/feed", on_feed), web.get(f"{SESSION}/answer", on_read),
                    web.get(f"{SESSION}/memory", on_read), web.delete(SESSION, on_delete)])
    app[STORE] = store  # for the operator (and the tests): sessions held in memory
    return app


async def start(bundle: Path, state_dir: Path, host: str = "127.0.0.1", port: int = 8080, max_sessions: int = 1024,
                idle_timeout: float = IDLE_TIMEOUT) -> web.AppRunner:
    """The service listening on ``host:port`` (0: a free port; ``runner.addresses`` says which)."""
    from tokenizers import Tokenizer

    runtime = RMTRuntime.load(bundle)
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    app = make_app(SessionStore(runtime, state_dir, max_sessions), tokenizer, idle_timeout)
    # keepalive_timeout also closes a connection that has not sent a whole request in that time.
    runner = web.AppRunner(app, keepalive_timeout=idle_timeout, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def serve_forever(args: argparse.Namespace) -> None:
    runner = await start(args.bundle, args.state_dir, args.host, args.port, args.max_sessions, args.idle_timeout)
    host, port = runner.addresses[0][:2]
    print(f"listening on http://{host}:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, default=Path("out/sessions"))
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default): this machine only")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--max-sessions", type=int, default=1024, help="sessions kept in memory (all stay on disk)")
    parser.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT,
                        help="seconds a client may take to send a request's headers, or its body")
    args = parser.parse_args()
    try:
        asyncio.run(serve_forever(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
