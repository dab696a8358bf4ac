"""The real daemon, driven one tick at a time from a test, with every pin's history kept by tick.

`Rig` builds a `Daemon` as `pi-controller run --simulate` does (gpiozero's mock pins) and serves it on an
event loop of its own, on a `SteppedClock`: virtual time whose ticks are handed out one at a time. The
loop waits at each deadline until the test grants the next tick, so what lands between two ticks (a
hot reload, a SIGHUP reload, an operator's request) lands where the test says, at the same tick on any
machine under any load. Between ticks `settle` runs the event loop until nothing is left to do there (no
callback ready, no timer pending, nothing on a worker thread): the watcher has seen every file event and
its swap waits for the gap; a reload has read and compiled and waits for the gap, or has finished.

After each tick the rig records a `Tick`: the loop's own trace of it, the plugins that were in the set
during it and what each was granted, and every pin change it made (gpiozero's `MockPin.states`), with
the tick's virtual time. `tests/invariants.py` judges those records.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import signal
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, TypeVarTuple

from pi_controller import cli
from pi_controller.clock import VirtualClock
from pi_controller.daemon import Daemon
from pi_controller.metrics import Metrics
from pi_controller.observer import TickTrace

T = TypeVar("T")
Ts = TypeVarTuple("Ts")
SETTLE_LIMIT_S = 120.0  # only how long a broken rig hangs: nothing waits for a duration
MAX_GAP_TICKS = 8  # ticks for work queued for the gap to land (each batch of the watcher takes one)


class RigError(RuntimeError):
    """The rig could not drive the daemon (not a finding about the daemon's safety)."""


class StartRefused(Exception):
    """`run` would refuse the config (exit 2); the message is what it says."""


class SteppedClock(VirtualClock):
    """Virtual time whose ticks are granted one at a time by the test (`grant`); `parked` is set
    while the loop waits for the next grant."""

    def __init__(self) -> None:
        super().__init__()
        self._grants = 0
        self._wake = asyncio.Event()
        self.parked = asyncio.Event()
        self._stopping: tuple[asyncio.Event, asyncio.Future[Any]] | None = None

    def grant(self) -> None:
        self._grants += 1
        self._wake.set()

    async def sleep_until(self, deadline: float, stop: asyncio.Event) -> bool:
        while not stop.is_set() and not self._grants:
            self.parked.set()
            waking = asyncio.ensure_future(self._wake.wait())
            await asyncio.wait({waking, self._stop_waiter(stop)}, return_when=asyncio.FIRST_COMPLETED)
            waking.cancel()
            self._wake.clear()
        self.parked.clear()
        if stop.is_set():
            return False
        self._grants -= 1
        self._now = max(self._now, deadline)
        return True

    def _stop_waiter(self, stop: asyncio.Event) -> asyncio.Future[Any]:
        if self._stopping is None or self._stopping[0] is not stop:
            self._stopping = (stop, asyncio.ensure_future(stop.wait()))
        return self._stopping[1]


class QuietLoop(asyncio.SelectorEventLoop):
    """An event loop that can say whether anything is left for it to do: a callback ready, a timer
    pending, or work on a worker thread whose result it has not taken yet."""

    def __init__(self) -> None:
        super().__init__()
        self._offloaded: set[asyncio.Future[Any]] = set()

    def run_in_executor(self, executor: Executor | None, func: Callable[[*Ts], T],
                        *args: *Ts) -> asyncio.Future[T]:
        future = super().run_in_executor(executor, func, *args)
        self._offloaded.add(future)
        future.add_done_callback(self._offloaded.discard)
        return future

    def busy(self) -> bool:
        # The ready queue and the timer heap have no public view; both have been there since Python 3.4.
        return bool(self._ready) or bool(self._offloaded) or any(  # type: ignore[attr-defined]
            not timer.cancelled() for timer in self._scheduled)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class PinChange:
    device: str
    value: float
    real_at: float  # time.monotonic() of the change: orders changes within one tick


@dataclass(frozen=True)
class Standing:
    """A plugin in the set during a tick: what it was granted, and whether it was quarantined."""

    actuators: frozenset[str] | None  # None: every actuator
    quarantined: bool


@dataclass(frozen=True)
class Tick:
    number: int
    at: float  # the loop's monotonic (virtual) time
    period: float
    trace: TickTrace
    plugins: Mapping[str, Standing]  # the set as the tick found it
    changes: list[PinChange]  # in the order they happened, in the tick or in the gap after it
    pins: Mapping[str, float]  # every actuator's pin after it


@dataclass
class Life:
    """One run of the daemon, from its start to its stop: the ticks, and the pins at either end."""

    started_at: float
    first_pins: Mapping[str, float]
    ticks: list[Tick] = field(default_factory=list)
    last_pins: Mapping[str, float] | None = None  # once stopped


class Rig:
    """One daemon on mock pins, served on a `QuietLoop` and ticked by a `SteppedClock`."""

    def __init__(self, config_path: Path, pins: Mapping[str, int], on_tick: Callable[[Tick], None] | None = None,
                 state_dir: Path | None = None):
        """`pins`: the actuators' GPIO numbers by id; `on_tick`: called with each tick's record; `state_dir`: the
        daemon's (`run --state-dir`), none by default."""
        self.config_path = config_path
        self.state_dir = state_dir
        self.pin_numbers = dict(pins)
        self.on_tick = on_tick
        self.aio = QuietLoop()
        self.daemon: Daemon | None = None
        self.life: Life | None = None
        self._serving: asyncio.Task[None] | None = None
        self._seen: dict[str, int] = {}

    # -- start and stop ------------------------------------------------------------------------

    def start(self, plugins: Path | None = None) -> Daemon:
        """Build the daemon from the config file as `run --simulate [--plugins plugins]` does and serve it, parked
        before its first tick. StartRefused if `run` would refuse the config (nothing is then running)."""
        with contextlib.redirect_stderr(io.StringIO()) as said:
            loaded = cli._load(self.config_path, plugins)  # `run`'s own reading of its config
        if loaded is None:
            raise StartRefused(said.getvalue().strip())
        settings, _ = loaded  # what of the folder would not load, the daemon says as it loads it
        self.clock = SteppedClock()
        daemon = self.daemon = Daemon(settings, simulate=True, clock=self.clock, state_dir=self.state_dir,
                                      plugins_dir=plugins)
        # /ready's verdict, as the daemon's metrics give it, without a server (whose stop takes 0.25 s).
        self.readiness = Metrics(settings.loop.period, daemon.status, self.clock.monotonic)
        daemon.loop.observers = [*daemon.loop.observers, self.readiness]
        self._seen = {device: len(self._pin(device).states) - 1 for device in self.pin_numbers}
        self.life = Life(self.clock.monotonic(), self._pin_values())
        self._serving = self.aio.create_task(daemon.serve())
        self._run_until(self.clock.parked.is_set, "the loop to start")
        return daemon

    def stop(self) -> Life:
        """Stop as SIGTERM does; the daemon closed. The life it ends, with the pins as the stop left them."""
        assert self.daemon is not None and self.life is not None and self._serving is not None
        if not self._serving.done():
            signal.raise_signal(signal.SIGTERM)  # serve's own handler: its stop event
            self._run_until(self._serving.done, "the daemon to stop")
        life, self.life = self.life, None
        life.last_pins = self._pin_values()
        self._serving.result()  # what serve raised, if it did
        self.daemon.close()
        self.daemon = self._serving = None
        return life

    def close(self) -> None:
        """Stop (if running) and close the event loop, whatever state they are in."""
        try:
            if self.daemon is not None:
                self.stop()
        finally:
            if self.daemon is not None:
                self.daemon.close()
            self._close_loop()

    def _close_loop(self) -> None:
        """As `asyncio.run` ends: what is left cancelled and awaited, then the loop closed."""
        left = asyncio.all_tasks(self.aio)
        for task in left:
            task.cancel()
        if left:
            self.aio.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        self.aio.run_until_complete(self.aio.shutdown_asyncgens())
        self.aio.run_until_complete(self.aio.shutdown_default_executor())
        self.aio.close()

    # -- time ----------------------------------------------------------------------------------

    def tick(self) -> Tick:
        """Grant one tick and run it, and what it left for the gap after it; its record."""
        daemon, life = self._running()
        plugins = {p.name: Standing(p.grant.actuators, p.quarantine.quarantined) for p in daemon.plugins}
        self.clock.grant()
        self._run_until(lambda: self.clock.parked.is_set() and not self.clock._grants, "a tick")
        trace = daemon.loop.trace
        assert trace is not None
        record = Tick(trace.number, trace.monotonic, daemon.loop.period, trace, plugins, self._changes(),
                      self._pin_values())
        life.ticks.append(record)
        if self.on_tick is not None:
            self.on_tick(record)
        return record

    def ticks(self, count: int) -> None:
        for _ in range(count):
            self.tick()

    def stall(self, seconds: float) -> None:
        """The loop held up for `seconds` (a hung read, a blocked event loop): time passes between two
        ticks with none run; the next deadlines count as missed."""
        self.clock.advance(seconds)

    def settle(self) -> None:
        """Run the event loop until it has nothing left to do but wait for a tick: every file event
        read and acted on, every compile done, every reload finished or waiting for the gap."""
        deadline = time.monotonic() + SETTLE_LIMIT_S
        quiet = 0
        while quiet < 2:  # twice in a row: a callback that a worker thread's result queued is seen
            self.aio.run_until_complete(asyncio.sleep(0.001))
            quiet = 0 if self.aio.busy() else quiet + 1
            if time.monotonic() > deadline:
                raise RigError(f"the daemon's event loop never settled within {SETTLE_LIMIT_S:g} s")

    def finish(self, at_least: int = 1) -> None:
        """Settle, then tick until what is waiting for the gap has landed: at least `at_least` ticks."""
        self.settle()
        for count in range(MAX_GAP_TICKS + at_least):
            if count >= at_least and not self.gap_pending():
                return
            self.tick()
            self.settle()
        raise RigError(f"work still waited for the gap after {MAX_GAP_TICKS} more ticks")

    def gap_pending(self) -> bool:
        daemon, _ = self._running()
        return bool(daemon.loop._between)  # work queued by `ControlLoop.between_ticks`, not otherwise shown

    def sighup(self) -> None:
        """SIGHUP, as `systemctl reload` sends it: the daemon's own handler takes it."""
        self._running()
        signal.raise_signal(signal.SIGHUP)

    # -- pins ----------------------------------------------------------------------------------

    def _pin(self, device: str) -> Any:
        assert self.daemon is not None
        return self.daemon.hardware.factory.pin(self.pin_numbers[device])

    def _pin_values(self) -> dict[str, float]:
        return {device: float(self._pin(device).state) for device in self.pin_numbers}

    def _changes(self) -> list[PinChange]:
        changes: list[PinChange] = []
        for device in self.pin_numbers:
            pin = self._pin(device)
            states, last = pin.states, pin._last_change  # gpiozero keeps each change's delta to the one before
            new = states[self._seen[device] + 1:]
            at = last
            stamped = []
            for state in reversed(new):
                stamped.append(PinChange(device, float(state.state), at))
                at -= state.timestamp
            changes.extend(reversed(stamped))
            self._seen[device] = len(states) - 1
        return sorted(changes, key=lambda change: change.real_at)

    # -- the event loop ------------------------------------------------------------------------

    def _running(self) -> tuple[Daemon, Life]:
        if self.daemon is None or self.life is None or self._serving is None or self._serving.done():
            raise RigError("the daemon is not running")
        return self.daemon, self.life

    def _run_until(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + SETTLE_LIMIT_S
        while not condition():
            if self._serving is not None and self._serving.done() and condition is not self._serving.done:
                self._serving.result()  # serve ended: say why
                raise RigError(f"the daemon stopped while waiting for {what}")
            self.aio.run_until_complete(asyncio.sleep(0))
            if time.monotonic() > deadline:
                raise RigError(f"waited {SETTLE_LIMIT_S:g} s for {what}")
