"""The one source of time: the loop, sensors and simulators ask a clock, never `time` directly.

A simulation swaps in a virtual clock, so that a day of control runs in seconds with the same results.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never jumps: scheduling and durations."""

    def time(self) -> float:
        """Wall-clock Unix time: timestamps that plugins and telemetry see."""

    async def sleep_until(self, deadline: float, stop: asyncio.Event) -> bool:
        """Wait until monotonic() reaches `deadline`; False if `stop` was set first."""


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep_until(self, deadline: float, stop: asyncio.Event) -> bool:
        delay = deadline - time.monotonic()
        if stop.is_set():
            return False
        if delay <= 0:
            return True
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except TimeoutError:
            return True
        return False
