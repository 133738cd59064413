"""Time for the simulation: a virtual-time event loop, or scaled wall time.

`VirtualTimeLoop` is an ordinary selector event loop whose clock jumps to the next timer as soon
as nothing is ready to run, instead of sleeping. Everything that awaits loop timers (asyncio.sleep,
wait_for, call_later) then runs in simulated seconds as fast as the CPU allows, and, because the
loop's scheduling is deterministic, the same seed gives the same run. Work submitted from other
threads still wakes the loop (the real selector is polled first), but the clock does not wait
for it, so a virtual-time simulation must drive itself from coroutines on the loop.

A timer moves the clock to its due time when it fires. asyncio runs every timer due within its
clock resolution (1e-9 s) of now, so without that a timer could fire with the clock a hair
before its deadline, and a wait that re-checks `deadline - loop.time() > 0` (the executor's
take, take-ahead and settle) would wait again for that hair forever: no time passes in between.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable
from contextvars import Context
from typing import Any


class VirtualClock:
    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def advance_to(self, when: float) -> None:
        self.now = max(self.now, when)


class _JumpingSelector(selectors.BaseSelector):
    """Delegates to a real selector, but turns a wait for the next timer into a clock jump."""

    def __init__(self, clock: VirtualClock) -> None:
        self._clock = clock
        self._inner = selectors.DefaultSelector()

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            # No timer pending: only another thread can wake the loop.
            return self._inner.select(None)
        ready = self._inner.select(0)
        if ready or timeout <= 0:
            return ready
        self._clock.advance_to(self._clock.now + timeout)
        return []

    def close(self) -> None:
        self._inner.close()

    def get_map(self) -> Any:
        return self._inner.get_map()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: VirtualClock | None = None) -> None:
        self.clock = clock or VirtualClock()
        super().__init__(selector=_JumpingSelector(self.clock))

    def time(self) -> float:
        return self.clock.now

    def call_at(
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: Context | None = None,
    ) -> asyncio.TimerHandle:
        # call_later, sleep, wait_for and wait all schedule through here.
        return super().call_at(when, self._fire, when, callback, args, context=context)

    def _fire(self, when: float, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        """Run a timer's callback at its due time, even when asyncio fires it a little early."""
        self.clock.advance_to(when)
        callback(*args)


class SimTime:
    """Simulated seconds on the running loop: virtual (scale 0) or wall seconds × time_scale."""

    def __init__(self, time_scale: float) -> None:
        # Loop seconds per simulated second.
        self.factor = time_scale if time_scale > 0 else 1.0
        self.virtual = time_scale <= 0

    def loop_seconds(self, sim_seconds: float) -> float:
        return sim_seconds * self.factor

    def now(self) -> float:
        return asyncio.get_running_loop().time() / self.factor

    async def sleep(self, sim_seconds: float) -> None:
        await asyncio.sleep(sim_seconds * self.factor)
