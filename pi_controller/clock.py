"""The one source of time: the loop, sensors and simulators ask a clock, never `time` directly.

A simulation swaps in a virtual clock, so that a day of control runs in seconds with the same results.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    real: bool  # whether monotonic() is real time: what wall-clock limits may rest on (see `backstop`)

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps: scheduling and durations."""

    def time(self) -> float:
        """Wall-clock Unix time: timestamps that plugins and telemetry see."""

    def perf_counter(self) -> float:
        """A real high-resolution timer for measuring work, even when scheduling time is virtual."""

    async def sleep_until(self, deadline: float, stop: asyncio.Event) -> bool:
        """Wait until monotonic() reaches `deadline`; False if `stop` was set first."""


FINE_S = 0.005  # the last stretch before a deadline, waited for precisely (see SystemClock.sleep_until)


class SystemClock:
    real = True
    # time's own functions, not methods that call them: the tick reads these clocks a few times per plugin,
    # and a Python frame around each read cost more than the read.
    monotonic = staticmethod(time.monotonic)
    perf_counter = staticmethod(time.perf_counter)
    time = staticmethod(time.time)  # last: the name `time` is the method's from here on in the class

    async def sleep_until(self, deadline: float, stop: asyncio.Event) -> bool:
        """A coarse sleep on the event loop until `FINE_S` before the deadline, then a fine one.

        The event loop's timers and epoll's millisecond timeout round up: waking on them alone lands
        a tick ~0.9 ms late at the median, and a few milliseconds late now and then. The last 5 ms are
        a blocking `time.sleep` (a kernel hrtimer, accurate to tens of microseconds, no core burnt):
        the loop has nothing else to do then, and paho, the watchdog and the log writer have threads.
        """
        if stop.is_set():
            return False
        coarse = deadline - FINE_S - time.monotonic()
        if coarse > 0:
            try:
                await asyncio.wait_for(stop.wait(), coarse)
                return False
            except TimeoutError:
                pass
        fine = deadline - time.monotonic()
        if fine > 0:
            time.sleep(fine)  # noqa: ASYNC251 (the last FINE_S on purpose: asyncio's timer is coarser)
        return not stop.is_set()


class VirtualClock:
    """Time that passes only when the loop waits: a waited-for deadline is reached at once.

    Scheduling is exact and runs as fast as the work allows; durations of work are still measured
    with the real timer.
    """

    real = False

    def __init__(self, start: float = 1_800_000_000.0):
        self._start = start
        self._now = 0.0

    def monotonic(self) -> float:
        return self._now

    perf_counter = staticmethod(time.perf_counter)  # real time, as SystemClock's (before `time` names the method)

    def time(self) -> float:
        return self._start + self._now

    def advance(self, seconds: float) -> None:
        """Let virtual time pass during work, as a slow read or a stalled call would."""
        self._now += seconds

    async def sleep_until(self, deadline: float, stop: asyncio.Event) -> bool:
        await asyncio.sleep(0)  # let signal handlers and other tasks run
        if stop.is_set():
            return False
        self._now = max(self._now, deadline)
        return True
