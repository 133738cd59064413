"""How a command stops on a signal: the one place that installs signal handlers.

Library classes (the server fleet, the executor) install none; they clean up in `finally` blocks
and `stop()` methods, which run because a signal becomes an exception in the main thread here:
SIGINT raises KeyboardInterrupt (exit 130) and SIGTERM raises `Terminated` (exit 143 unless the
command maps it to something else). Both handlers are installed explicitly because a process
started in the background by a shell script inherits SIGINT as ignored, and Python then installs
no handler of its own: `kill -INT` would do nothing.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(SystemExit):
    """SIGTERM arrived. A SystemExit (exit code 143) so that no `except Exception` on the way
    swallows it, `finally` blocks run, and a program that does not catch it exits as if killed
    by SIGTERM, without a traceback."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def _in_main_thread() -> bool:
    # Python accepts signal handlers only from the main thread.
    return threading.current_thread() is threading.main_thread()


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside: SIGINT raises KeyboardInterrupt and SIGTERM raises Terminated in the main
    thread, whatever the process inherited; the previous handlers come back afterwards."""
    if not _in_main_thread():
        yield
        return
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
        signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_terminated),
    }
    try:
        yield
    finally:
        _restore(previous)


@contextmanager
def signals_ignored() -> Iterator[None]:
    """Shield a clean shutdown from a second Ctrl-C or SIGTERM, which would otherwise cut it
    short and leave servers behind."""
    if not _in_main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        _restore(previous)


def _restore(handlers: dict[signal.Signals, object]) -> None:
    for signum, handler in handlers.items():
        # A handler installed outside Python reads back as None; the default is the best guess.
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)  # type: ignore[arg-type]
