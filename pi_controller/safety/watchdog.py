"""A watchdog that does not need the loop: the safe state when ticks stop completing."""

from __future__ import annotations

import threading
from typing import Callable

import structlog

from pi_controller.devices.hardware import Hardware
from pi_controller.observer import LoopObserver, TickReport

log = structlog.get_logger("pi_controller.safety")


class Watchdog(LoopObserver):
    """Drives every actuator to its safe state when no tick has completed for `timeout_s`.

    A thread of its own, on a real timer, so a blocked event loop, a hung tick or a bug of ours cannot
    keep a heater on; the systemd watchdog would only catch it much later, by killing the process.
    When ticks complete again, control resumes with the next tick.
    """

    def __init__(self, hardware: Hardware, timeout_s: float, timer: Callable[[], float]):
        self.hardware = hardware
        self.timeout_s = timeout_s
        self.trips = 0
        self._timer = timer
        self._last = timer()
        self._tripped = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._last = self._timer()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._thread.start()

    def tick_done(self, report: TickReport) -> None:
        self._last = self._timer()
        if self._tripped:
            self._tripped = False
            log.warning("watchdog_recovered", trips=self.trips)

    def _watch(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            silent = self._timer() - self._last
            if silent >= self.timeout_s and not self._tripped:
                self._tripped = True
                self.trips += 1
                log.error("watchdog_tripped", silent_s=round(silent, 3), timeout_s=self.timeout_s)
                self.hardware.settle("safe", f"watchdog: no tick completed for {silent:.2f} s")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
