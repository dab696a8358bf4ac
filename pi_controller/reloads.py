"""SIGHUP reloads, coalesced: a storm of signals costs two reloads, not one each.

Twenty SIGHUPs 20 ms apart (a script looping `systemctl reload`, a config manager firing per file) used
to start twenty reloads at once: each compiles every plugin on a thread of its own, and their swaps
queued between ticks cost missed ticks, a watchdog trip and tens of MB. Here at most one reload runs and
one is pending. The first SIGHUP reloads at once; those that come while it runs make one more, started
once the signals have stopped for `SETTLE_S`, so that it reads the file as the last writer left it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable, Literal, Protocol, TypeVar

SETTLE_S = 0.25
T = TypeVar("T")

Outcome = Literal["applied", "refused", "failed"]


@dataclass(frozen=True)
class ReloadResult:
    outcome: Outcome
    message: str  # one line for people: systemctl status, logs


class Reloads:
    def __init__(self, reload: Callable[[], Awaitable[object]]):
        self._reload = reload
        self._task: asyncio.Task[None] | None = None  # referenced while it runs: the loop keeps weak ones
        self._pending = False
        self._last_request = float("-inf")

    def request(self) -> None:
        """A SIGHUP (called on the event loop's thread)."""
        running = asyncio.get_running_loop()
        self._last_request = running.time()
        if self._task is not None:
            self._pending = True
            return
        self._task = running.create_task(self._run(), name="reload")

    async def _run(self) -> None:
        try:
            await self._reload()
            while self._pending:
                quiet = asyncio.get_running_loop().time() - self._last_request
                if quiet < SETTLE_S:
                    await asyncio.sleep(SETTLE_S - quiet)
                    continue
                self._pending = False
                await self._reload()
        finally:
            self._task = None


class Gap(Protocol):
    """What runs work between two ticks (the loop's `in_gap`), for what swaps parts in below the loop."""

    async def in_gap(self, work: Callable[[], T], drop: Callable[[], None]) -> T: ...


async def prepared(make: Callable[[], T], close: Callable[[T], None]) -> T:
    """`make()` on a worker thread (compiling plugins takes seconds on a Pi), awaited. Cancelled meanwhile
    (the daemon stopping), what it makes is closed once it is made: no compiled set is left behind."""
    future = asyncio.get_running_loop().run_in_executor(None, make)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(lambda done: _close_made(done, close))
        raise


def _close_made(done: asyncio.Future[T], close: Callable[[T], None]) -> None:
    if not done.cancelled() and done.exception() is None:
        close(done.result())
