"""What every rmt-edge command shares: one-line errors, --json errors, Ctrl-C handling.

The --json contract: stdout carries exactly one JSON document and nothing else, in every
path that reaches the command (success ``{"ok": true, ...}``; an error, a usage error or an
interrupt ``{"ok": false, "error": ...}``); logs, progress and error lines go to stderr.

Torch-free, so that the runtime's CLI stays light; the export CLI uses it too.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
import threading
import traceback
from typing import Callable, TypeVar

import click

from .errors import library_message

T = TypeVar("T")


def fail(message: str, as_json: bool) -> None:
    """Exit 1 with ``Error: message`` on stderr (and ``{"ok": false, ...}`` on stdout with --json)."""
    if as_json:
        click.echo(json.dumps({"ok": False, "error": message}))
    raise click.ClickException(message)


def exit_interrupted(message: str, as_json: bool, **fields) -> None:
    """Exit 130 after Ctrl-C or SIGTERM: ``message`` on stderr; with --json also
    ``{"ok": false, "interrupted": true, "error": message, **fields}`` on stdout."""
    if as_json:
        click.echo(json.dumps({"ok": False, "interrupted": True, "error": message, **fields}))
    click.echo(message, err=True)
    sys.exit(130)


class JsonCommand(click.Command):
    """A click command whose usage errors (a missing or bad option: exit 2) also print
    ``{"ok": false, "error": ...}`` on stdout when --json is among the arguments, so a caller
    parsing stdout gets a document for them too."""

    def make_context(self, info_name, args, parent=None, **extra):
        wants_json = "--json" in args  # before parsing: the parser consumes ``args``
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            if wants_json:
                click.echo(json.dumps({"ok": False, "error": exc.format_message()}))
            raise

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # a check in the command's body (click.BadParameter)
            if ctx.params.get("as_json"):
                click.echo(json.dumps({"ok": False, "error": exc.format_message()}))
            raise


def _flush_native_stdout() -> None:
    """Flush C stdio buffers (native code's printf/std::cout) into the file descriptor they hold now."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def stdout_to_stderr(enabled: bool):
    """While inside (with --json), whatever writes to stdout goes to stderr instead: Python's
    ``print`` and native libraries writing to file descriptor 1 (TensorRT's and ONNX
    Runtime's loggers, the exporter's progress), so that stdout holds only the document
    printed after the work. Only on the main thread (where a command runs): stdout is the
    process's, and two threads swapping it would leave it swapped."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    with contextlib.suppress(AttributeError, ValueError, OSError):
        sys.stdout.flush()
    _flush_native_stdout()
    saved = None
    with contextlib.suppress(OSError):  # no descriptors to redirect (an embedding host): Python's stdout still is
        saved = os.dup(1)
        try:
            os.dup2(2, 1)
        except OSError:
            os.close(saved)
            saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _flush_native_stdout()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def run_guarded(verbose: bool, as_json: bool, work: Callable[[], T], expected: tuple[type[BaseException], ...],
                interrupted: Callable[[], str] = lambda: "interrupted: nothing was written") -> T:
    """Run ``work``: ``expected`` errors, OSErrors (naming the file) and MemoryError become one
    line (exit 1); anything else is a bug: one line labelled 'unexpected', with a hint; tracebacks
    only with --verbose; Ctrl-C exits 130 with ``interrupted()``.
    With --json, what ``work`` writes to stdout goes to stderr (``stdout_to_stderr``)."""
    try:
        with stdout_to_stderr(as_json):
            return work()
    except expected as exc:
        if verbose:
            traceback.print_exc()
        fail(str(exc), as_json)
    except OSError as exc:  # files the command reads or writes
        if verbose:
            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        if exc.filename2:  # a rename or a link: both paths
            where = f"{exc.filename} -> {exc.filename2}: "
        fail(f"{where}{exc.strerror or exc}", as_json)
    except MemoryError:  # an input or a batch larger than this machine holds
        if verbose:
            traceback.print_exc()
        fail("out of memory: the input, its batch or the model needs more memory than this machine has; "
             "run a smaller batch or a shorter input", as_json)
    except KeyboardInterrupt:
        exit_interrupted(interrupted(), as_json)
    except Exception as exc:  # noqa: BLE001 - the last line of defence of a CLI: a bug, so 'unexpected'
        if verbose:
            traceback.print_exc()
        fail(f"unexpected {type(exc).__name__}: {library_message(exc)} (rerun with --verbose for the traceback)",
             as_json)
    raise AssertionError("unreachable")  # fail() always raises


@contextlib.contextmanager
def stop_requests():
    """While inside, SIGINT and SIGTERM set the yielded event instead of killing the process,
    so a long loop can stop between two steps and leave consistent files behind."""
    requested = threading.Event()
    previous = {}

    def handler(signum, frame):
        requested.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


_interrupt_requested = threading.Event()


def terminate_as_interrupt() -> None:
    """Make SIGTERM raise KeyboardInterrupt like Ctrl-C, so that cleanup code (``finally``)
    runs for both, and remember the request: a KeyboardInterrupt raised while Python runs a
    finalizer (``__del__``, a weakref callback) is printed and dropped, so long jobs call
    ``raise_if_interrupted`` between their stages to honour a signal that was swallowed."""
    def handler(signum, frame):
        _interrupt_requested.set()
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if SIGINT/SIGTERM arrived since ``terminate_as_interrupt``."""
    if _interrupt_requested.is_set():
        raise KeyboardInterrupt
