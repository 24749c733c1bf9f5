"""What every rmt-edge command shares: one-line errors, --json errors, Ctrl-C handling.

Torch-free, so that the runtime's CLI stays light; the export CLI uses it too.
"""
from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import traceback
from typing import Callable, TypeVar

import click

T = TypeVar("T")


def fail(message: str, as_json: bool) -> None:
    """Exit 1 with ``Error: message`` on stderr (and ``{"ok": false, ...}`` on stdout with --json)."""
    if as_json:
        click.echo(json.dumps({"ok": False, "error": message}))
    raise click.ClickException(message)


def run_guarded(verbose: bool, as_json: bool, work: Callable[[], T], expected: tuple[type[BaseException], ...],
                interrupted: Callable[[], str] = lambda: "interrupted: nothing was written") -> T:
    """Run ``work``: ``expected`` errors and OSErrors become one line (exit 1), anything else too
    with a hint, tracebacks only with --verbose; Ctrl-C exits 130 with ``interrupted()``."""
    try:
        return work()
    except expected as exc:
        if verbose:
            traceback.print_exc()
        fail(str(exc), as_json)
    except OSError as exc:  # files the command reads or writes
        if verbose:
            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        fail(f"{where}{exc.strerror or exc}", as_json)
    except KeyboardInterrupt:
        click.echo(interrupted(), err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence of a CLI
        if verbose:
            traceback.print_exc()
        fail(f"unexpected {type(exc).__name__}: {exc} (rerun with --verbose for the traceback)", as_json)
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
