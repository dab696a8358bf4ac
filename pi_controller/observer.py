"""What the loop tells those who follow it from outside: the watchdog, systemd, metrics."""

from __future__ import annotations

from dataclasses import dataclass

from pi_controller.ownership import Failsafe


@dataclass(frozen=True, slots=True)
class TickReport:
    number: int
    duration: float  # seconds of work
    jitter: float  # seconds the tick started after its deadline
    missed: int  # deadlines this tick's overrun skipped

    @property
    def on_time(self) -> bool:
        return self.missed == 0


class LoopObserver:
    """Follows the loop from outside (watchdog, systemd, metrics). `tick_done` runs on the event loop
    after each tick; `plugin_called` on the tick thread, so it must be quick and thread-safe."""

    def tick_done(self, report: TickReport) -> None:
        pass

    def plugin_called(self, plugin: str, seconds: float, failed: bool) -> None:
        pass

    def actuator_failsafe(self, failsafe: Failsafe) -> None:
        """An actuator was taken from its failing owner and put in its safe state (on the tick thread)."""
