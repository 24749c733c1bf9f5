"""Start and stop a local Triton server (the one the ``nvidia-pytriton`` wheel ships) on 127.0.0.1.

The server runs from an environment of its own, not the caller's: the wheel requires
numpy<2, and rightly (Triton 2.51's Python backend stub sends empty output tensors under
numpy 2), while clients and everything else of rmt-edge run on numpy 2. That environment
(``requirements-triton.txt``: nvidia-pytriton, numpy<2, onnxruntime and rmt-edge itself;
``make test`` creates it as ``.venv-triton``) is chosen by ``server_venv``: the ``venv``
argument, else ``$RMT_TRITON_VENV``, else ``.venv-triton`` at the root of this source tree
when it exists, else the running interpreter's own environment.

In that environment the wheel carries ``pytriton/tritonserver/bin/tritonserver`` (Triton
2.51 with the Python backend only), its libraries in ``nvidia_pytriton.libs`` and one
Python-backend stub per Python version in ``pytriton/tritonserver/python_backend_stubs/<X.Y>``.
The stub for the environment's Python goes into a backend directory of our own (symbolic
links), and the stub finds that environment (rmt_runtime, onnxruntime, numpy<2) through the
``python3`` first on ``PATH``: the environment's ``bin/``.

Used by the tests (tests/triton), benchmarks/triton_load.py and anyone serving a ``python``
kind repository on a CPU node. Binds every endpoint to 127.0.0.1 on free ports.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rmt_runtime.owned_files import remove_tree

from .errors import ExportError

HOST = "127.0.0.1"
VENV_VARIABLE = "RMT_TRITON_VENV"
DEFAULT_VENV = ".venv-triton"
SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the repository, when running from a checkout
SETUP = "make .venv-triton/.installed (make test does it), or: python3 -m venv .venv-triton && " \
        ".venv-triton/bin/pip install -r requirements-triton.txt"

# Run by the server environment's Python: what is installed there, without importing it.
_PROBE = """
import importlib.metadata as md, importlib.util as iu, json, sys
sys.path[:] = [p for p in sys.path if p not in ("", ".")]  # python -c puts the working directory first
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
def location(name):
    spec = iu.find_spec(name)
    return None if spec is None else (list(spec.submodule_search_locations or []) or [spec.origin])[0]
print(json.dumps({"python": "%d.%d" % sys.version_info[:2], "pytriton": location("pytriton"),
                  "rmt_runtime": location("rmt_runtime"),
                  "versions": {n: version(n) for n in ("nvidia-pytriton", "numpy", "onnxruntime", "rmt-edge")}}))
"""


def _server_environ() -> dict[str, str]:
    """This process's environment less what would point Python at the caller's packages."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


class TritonUnavailable(ExportError):
    """No Triton server can run here (nvidia-pytriton missing or not for this platform)."""


def server_venv(venv: str | os.PathLike | None = None) -> Path | None:
    """The server's environment: ``venv``, else ``$RMT_TRITON_VENV``, else ``.venv-triton`` at
    the root of this source tree when it exists; None: the running interpreter's environment."""
    if venv is None and os.environ.get(VENV_VARIABLE):
        venv = os.environ[VENV_VARIABLE]
    if venv is None and (SOURCE_ROOT / DEFAULT_VENV).is_dir():
        venv = SOURCE_ROOT / DEFAULT_VENV
    return None if venv is None else Path(venv).absolute()


@dataclass(frozen=True)
class TritonInstall:
    """Where the nvidia-pytriton wheel keeps the server, in the environment that runs it."""

    binary: Path
    libs: Path
    python_backend: Path
    stub: Path
    python: Path                  # the environment's interpreter; its bin/ goes first on the server's PATH
    venv: Path | None             # None: the running interpreter's environment
    versions: dict                # distribution -> version there (None: not installed)
    runtime_source: Path | None   # where rmt_runtime imports from there

    @classmethod
    def find(cls, venv: str | os.PathLike | None = None) -> "TritonInstall":
        """The server installed in ``venv`` (default: ``server_venv()``), with the
        Python-backend stub for that environment's Python."""
        venv = server_venv(venv)
        python = venv / "bin" / "python" if venv else Path(sys.executable)
        where = venv or (f"{sys.prefix} (this interpreter's environment: neither ${VENV_VARIABLE} nor "
                         f"{SOURCE_ROOT / DEFAULT_VENV} names one)")
        if not python.exists():
            raise TritonUnavailable(f"no Triton server environment at {where} (no bin/python): {SETUP}")
        probe = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=120,
                               env=_server_environ())
        if probe.returncode != 0:
            raise TritonUnavailable(f"{python} does not run: {probe.stderr.strip()[-2000:]}")
        found = json.loads(probe.stdout)
        if not found["pytriton"]:
            raise TritonUnavailable(f"no Triton server in {where}: the nvidia-pytriton wheel (x86_64 or aarch64 "
                                    f"Linux, glibc >= 2.35) ships one; {SETUP}")
        root = Path(found["pytriton"]) / "tritonserver"
        install = cls(binary=root / "bin" / "tritonserver", libs=root.parent.parent / "nvidia_pytriton.libs",
                      python_backend=root / "backends" / "python",
                      stub=root / "python_backend_stubs" / found["python"] / "triton_python_backend_stub",
                      python=python, venv=venv, versions=found["versions"],
                      runtime_source=Path(found["rmt_runtime"]) if found["rmt_runtime"] else None)
        missing = [str(p) for p in (install.binary, install.libs, install.python_backend / "libtriton_python.so",
                                    install.stub) if not p.exists()]
        if missing:
            raise TritonUnavailable(f"nvidia-pytriton in {where} is incomplete for Python {found['python']}: "
                                    f"missing {', '.join(missing)}")
        numpy = found["versions"]["numpy"]
        if numpy is None or int(numpy.split(".")[0]) >= 2 or install.runtime_source is None:
            raise TritonUnavailable(f"{where} cannot serve rmt-edge: it needs numpy<2 (Triton 2.51's Python backend "
                                    f"sends empty output tensors under numpy 2; found {numpy}) and rmt_runtime "
                                    f"(found {install.runtime_source}); {SETUP}")
        return install

    def backend_directory(self, into: Path) -> Path:
        """A backend directory holding the Python backend with the environment's stub (links)."""
        python = into / "backends" / "python"
        python.mkdir(parents=True, exist_ok=True)
        for source in (self.python_backend / "libtriton_python.so",
                       self.python_backend / "triton_python_backend_utils.py", self.stub):
            link = python / source.name
            if not link.exists():
                link.symlink_to(source)
        return into / "backends"


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 now (the server binds them right after)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LocalTritonServer:
    """``tritonserver`` on 127.0.0.1 serving ``repository``; a context manager.

    The server and its Python models run from ``venv`` (default: ``server_venv()``: the
    argument, ``$RMT_TRITON_VENV``, ``.venv-triton`` at the source root, this interpreter's
    environment), which needs nvidia-pytriton, numpy<2, onnxruntime and rmt-edge
    (requirements-triton.txt); the caller's own environment may run numpy 2.
    ``start`` waits until the server is ready (polls /v2/health/ready with a deadline) and
    raises with the server's log tail if it exits or does not become ready. ``stop`` ends it
    (SIGTERM, then SIGKILL); ``kill`` ends it at once, as a crash would.
    """

    def __init__(self, repository: str | os.PathLike, log_path: str | os.PathLike | None = None,
                 ready_timeout_s: float = 180.0, extra_args: tuple[str, ...] = (),
                 venv: str | os.PathLike | None = None):
        self.repository = Path(repository)
        self.ready_timeout_s = ready_timeout_s
        self.extra_args = tuple(extra_args)
        self.venv = server_venv(venv)
        self._workdir = Path(tempfile.mkdtemp(prefix="rmt-triton-"))
        self.log_path = Path(log_path) if log_path else self._workdir / "tritonserver.log"
        self.process: subprocess.Popen | None = None
        self.http_port = self.grpc_port = self.metrics_port = 0

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"

    def command(self, install: TritonInstall) -> list[str]:
        return [str(install.binary), f"--model-repository={self.repository}",
                f"--backend-directory={install.backend_directory(self._workdir)}",
                f"--http-address={HOST}", f"--http-port={self.http_port}",
                f"--grpc-address={HOST}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={HOST}", f"--metrics-port={self.metrics_port}",
                "--allow-cpu-metrics=false", "--allow-gpu-metrics=false", "--exit-timeout-secs=5",
                *self.extra_args]

    def environment(self, install: TritonInstall) -> dict[str, str]:
        env = _server_environ()  # no PYTHONPATH/PYTHONHOME: the server's Python is the environment's own
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(install.libs), env.get("LD_LIBRARY_PATH")) if p)
        # The stub embeds Python and finds its environment (site-packages) by the python3 on PATH:
        # the server environment's bin/ (not resolved: a venv's python is a link to the base one).
        env["PATH"] = os.pathsep.join([str(install.python.parent), env.get("PATH", "")])
        return env

    def start(self) -> "LocalTritonServer":
        if self.process is not None:
            raise ExportError("this server is already started")
        install = TritonInstall.find(self.venv)
        if not self.repository.is_dir():
            raise ExportError(f"{self.repository}: no model repository there")
        for attempt in range(3):  # a port taken between choosing and binding: choose again
            self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(self.command(install), env=self.environment(install), stdout=log,
                                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True)
            try:
                self._wait_ready()
                return self
            except ExportError:
                taken = "address already in use" in self.log_tail().lower()
                self._end(signal.SIGKILL)
                if not taken or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self._ready():
                return
            try:  # waits for the process to exit, at most 0.2 s: the pause between polls
                code = self.process.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            raise ExportError(f"tritonserver exited with code {code} before it was ready:\n{self.log_tail()}")
        raise ExportError(f"tritonserver was not ready within {self.ready_timeout_s:g} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        kept = [line for line in text.splitlines() if not line.startswith(("+", "|"))]  # drop the banner tables
        return "\n".join(kept[-lines:])

    def _end(self, sig: int, timeout_s: float = 30.0) -> int | None:
        if self.process is None:
            return None
        process, self.process = self.process, None
        if process.poll() is None:
            try:  # SIGTERM to tritonserver alone (it stops its stubs); SIGKILL to the whole session
                os.killpg(process.pid, sig) if sig == signal.SIGKILL else process.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        try:
            os.killpg(process.pid, signal.SIGKILL)  # stubs left behind by the parent
        except ProcessLookupError:
            pass
        remove_tree(self._workdir / "backends")  # its own mkdtemp folder; the links in it, not their targets
        if self._workdir not in self.log_path.parents:
            remove_tree(self._workdir)
        return process.returncode

    def stop(self) -> int | None:
        """Stop the server (SIGTERM: Triton finishes in-flight requests, up to 5 s); its exit code."""
        return self._end(signal.SIGTERM)

    def kill(self) -> int | None:
        """End the server at once (SIGKILL), as a crash would."""
        return self._end(signal.SIGKILL)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> "LocalTritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
