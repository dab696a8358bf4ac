"""What the loop tells those who follow it from outside: the watchdog, systemd, metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from pi_controller.safety.ownership import Failsafe

if TYPE_CHECKING:
    from pi_controller.contract import Command, Reading, Rejection
    from pi_controller.safety.rules import Decision


# Made in C, as the tick's other records (see contract.Reading).
class TickReport(msgspec.Struct, frozen=True, gc=False):
    number: int
    duration: float  # seconds of work
    jitter: float  # seconds the tick started after its deadline
    missed: int  # deadlines this tick's overrun skipped

    @property
    def on_time(self) -> bool:
        return self.missed == 0


class Verdicts(msgspec.Struct):
    """What became of the plugins' calls in one tick, beyond their valid commands."""

    answered: list[str] = msgspec.field(default_factory=list)  # plugins whose call gave a usable output
    rejections: list[Rejection] = msgspec.field(default_factory=list)
    failures: dict[str, str] = msgspec.field(default_factory=dict)  # plugin -> kind of failed call


class TickTrace(msgspec.Struct):  # never changed once made
    """What one tick saw and did, kept by reference (nothing is copied in the tick) for whoever
    records it after the tick: the context's parts, every proposal, and what became of them."""

    number: int
    time: float  # the context's timestamp (wall clock)
    monotonic: float  # the context's monotonic time
    readings: list[Reading]
    states: dict[str, dict[str, Any]]  # the device states the plugins saw
    proposals: list[Command]  # operator overrides first, then each plugin's valid commands
    verdicts: Verdicts
    conflicts: list[tuple[Command, Command]]
    decision: Decision
    disabled: frozenset[str]  # plugins the operator has switched off


class LoopObserver:
    """Follows the loop from outside (watchdog, systemd, metrics). `tick_done` runs on the event loop
    after each tick; `plugin_called` on the tick thread, so it must be quick and thread-safe."""

    def tick_done(self, report: TickReport) -> None:
        pass

    def plugin_called(self, plugin: str, seconds: float, failed: bool) -> None:
        pass

    def actuator_failsafe(self, failsafe: Failsafe) -> None:
        """An actuator was taken from its failing owner and put in its safe state (on the tick thread)."""
