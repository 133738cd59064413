"""An asyncio event loop running on its own daemon thread, driven from other threads.

Used by the rollout executor and the server fleet's supervisor: both keep their state on one
loop and offer blocking methods to the trainer's (or the command's) thread. Stopping cancels
every task still on the loop and waits for them, so nothing is left pending when the loop
closes (no "Task was destroyed but it is pending" at exit, however the stop was reached).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


class LoopThreadError(RuntimeError):
    """The loop could not be created, or is not running."""


class LoopThread:
    def __init__(self, name: str, loop_factory: LoopFactory | None = None) -> None:
        self.name = name
        self._loop_factory: LoopFactory = loop_factory or asyncio.new_event_loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._startup_error: BaseException | None = None

    def start(self, setup: Callable[[asyncio.AbstractEventLoop], None] | None = None) -> None:
        """Create the loop on a new thread and run it; `setup(loop)` runs on that thread first
        (to create asyncio objects bound to the loop, and the first tasks). Raises
        LoopThreadError when the loop or `setup` fails."""
        if self._thread is not None:
            raise LoopThreadError(f"{self.name}: already started")
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(setup, ready), name=self.name, daemon=True
        )
        self._thread.start()
        ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            raise LoopThreadError(f"{self.name}: the loop did not start: {self._startup_error!r}")

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise LoopThreadError(f"{self.name}: not started")
        return self._loop

    @property
    def started(self) -> bool:
        return self._thread is not None

    def running(self) -> bool:
        return self._loop is not None and self._loop.is_running()

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule `coro` on the loop; the future is cancelled if the loop stops first."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the loop and wait for its result from this (another) thread."""
        if self.in_loop_thread():
            coro.close()
            raise LoopThreadError(f"{self.name}: a blocking call from the loop's own thread")
        return self.submit(coro).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop (tasks still on it are cancelled and awaited on its thread) and join
        the thread. Idempotent; from the loop's own thread it only asks the loop to stop."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        if thread is not threading.current_thread():
            thread.join(timeout)

    def _run(
        self, setup: Callable[[asyncio.AbstractEventLoop], None] | None, ready: threading.Event
    ) -> None:
        loop: asyncio.AbstractEventLoop | None = None
        try:
            loop = self._loop_factory()
            asyncio.set_event_loop(loop)
            if setup is not None:
                setup(loop)
        except BaseException as exc:
            self._startup_error = exc
            if loop is not None:
                loop.close()
            ready.set()
            return
        self._loop = loop
        ready.set()
        try:
            loop.run_forever()
        finally:
            _cancel_remaining_tasks(loop)
            loop.close()


def _cancel_remaining_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is still pending when the loop stops, wait until it has finished (so callers
    waiting on it wake up), and finish async generators. Threads of `asyncio.to_thread` are
    not waited for: they cannot be cancelled, and a stop must not hang on one."""
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
