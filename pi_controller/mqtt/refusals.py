"""What an actuator was refused, for Home Assistant: the last refusal in the actuator's state (shown as
its entity's `refusal` attribute) and an event per refusal on `actuator/<id>/event` (not retained), which
the actuator's MQTT `event` entity fires, so an automation or a notification can react.

Three kinds, Home Assistant's event types: `held` (a safety rule keeps a command back: `min_off`,
`requires`, `interlock`, ...), `refused` (an operator's command refused at validation: `out_of_range`,
`above_max_duty`, ...) and `failsafe` (the actuator taken from its failing owner to its safe state). A
hold is told when it starts, not at every tick it lasts; a ramp (`max_rate`, `reverse_delay`) gets
where it was asked and is no refusal.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Callable, Iterable

from pi_controller.operator import Answer
from pi_controller.safety.rules import GRADUAL

if TYPE_CHECKING:
    from pi_controller.safety.ownership import Failsafe
    from pi_controller.safety.rules import Hold

EVENT_TYPES = ["held", "refused", "failsafe"]


@dataclass(frozen=True)
class Refusal:
    device: str
    event_type: str  # one of EVENT_TYPES
    rule: str
    reason: str
    owner: str | None  # whose command it was: a plugin, "operator"
    at: str  # ISO 8601, UTC
    until: str | None  # when the rule lets it through at the latest, if it knows

    def payload(self) -> dict[str, Any]:
        """As the event entity takes it: `event_type`, and the rest as the event's attributes."""
        return {"event_type": self.event_type, "rule": self.rule, "reason": self.reason, "owner": self.owner,
                "at": self.at, "until": self.until}


class Refusals:
    def __init__(self, wall: Callable[[], float]):
        self._wall = wall
        self.last: dict[str, Refusal] = {}  # by device
        self._holding: set[tuple[str, str, str]] = set()  # (device, rule, owner) held last tick
        self._failsafes: queue.SimpleQueue[Failsafe] = queue.SimpleQueue()

    def failsafe(self, failsafe: Failsafe) -> None:
        """From the loop's observer hook (the tick's thread)."""
        self._failsafes.put(failsafe)

    def after_tick(self, holds: Iterable[Hold], answers: Iterable[Answer]) -> list[Refusal]:
        """The refusals new since the last tick (each now its device's last), given the tick's holds and
        the answers to the operator's commands it took up."""
        now = self._wall()
        fresh = [self._refusal(f.device_id, "failsafe", "failsafe", f.why, f.owner, now)
                 for f in (self._failsafes.get_nowait() for _ in range(self._failsafes.qsize()))]
        fresh += [self._refusal(a.device, "refused", a.rule or "refused", a.reason or "", "operator", now)
                  for a in answers if a.refused and a.device is not None]
        holding = set()
        for hold in holds:
            if hold.rule in GRADUAL:
                continue
            key = (hold.device_id, hold.rule, hold.plugin)
            holding.add(key)
            if key not in self._holding:
                fresh.append(self._refusal(hold.device_id, "held", hold.rule, hold.detail, hold.plugin, now,
                                           hold.remaining_s))
        self._holding = holding
        self.last |= {refusal.device: refusal for refusal in fresh}
        return fresh

    @staticmethod
    def _refusal(device: str, event_type: str, rule: str, reason: str, owner: str | None, now: float,
                 remaining_s: float | None = None) -> Refusal:
        until = None if remaining_s is None else _iso(now + remaining_s)
        return Refusal(device, event_type, rule, reason[:300], owner, _iso(now), until)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")
