"""How often two deciders agreed on each actuator, tick by tick: a recorded plugin and its replay, a
live plugin and its shadow. Each tick's verdict is, per actuator, the command a plugin gave (its
action and target) or the rule that rejected it; a failed call is a verdict of the whole call.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

from pi_controller.contract import Command, Rejection

Verdict = dict[str, list[Any]]  # actuator -> [action, target], or ["rejected", rule]


def verdict(commands: Iterable[tuple[str, str, Any]], rejected: Iterable[tuple[str | None, str]]) -> Verdict:
    """One plugin's verdict in a tick: its valid commands, a later one for an actuator winning (as in
    arbitration), over its rejected ones."""
    result: Verdict = {device: ["rejected", rule] for device, rule in rejected if device is not None}
    result.update((device, [action, target]) for device, action, target in commands)
    return result


def verdict_of(commands: Iterable[Command], rejections: Iterable[Rejection]) -> Verdict:
    return verdict(((c.device_id, c.action, c.target) for c in commands),
                   ((r.device_id, r.rule) for r in rejections))


class Agreement:
    """Agreement of `actual` with `expected` over the ticks compared: per actuator (an actuator neither
    commanded in a tick agrees), and of whole calls (failed calls included); the first and last
    difference of each, with both sides."""

    def __init__(self, expected: str, actual: str):
        self.names = (expected, actual)
        self.ticks = 0
        self.seen: set[str] = set()  # actuators commanded (or rejected) by either side
        self.differing: Counter[str] = Counter()  # actuator -> ticks; "" for whole calls
        self.first: dict[str, dict[str, Any]] = {}
        self.last: dict[str, dict[str, Any]] = {}

    def add(self, tick: int, time: float, expected: Verdict, actual: Verdict,
            failed: tuple[str | None, str | None] = (None, None)) -> bool:
        """Compare one tick; `failed`: each side's kind of failed call, if it failed. True if all agreed."""
        self.ticks += 1
        devices = expected.keys() | actual.keys()
        self.seen |= devices
        for device in sorted(devices):
            if expected.get(device) != actual.get(device):
                self._differ(device, tick, time, expected.get(device), actual.get(device))
        if failed[0] != failed[1] or expected != actual:
            self._differ("", tick, time, expected if failed[0] is None else {"failed": failed[0]},
                         actual if failed[1] is None else {"failed": failed[1]})
            return False
        return True

    def _differ(self, key: str, tick: int, time: float, expected: Any, actual: Any) -> None:
        self.differing[key] += 1
        difference = {"tick": tick, "time": time, self.names[0]: expected, self.names[1]: actual}
        self.first.setdefault(key, difference)
        self.last[key] = difference

    def percent(self, key: str = "") -> float:
        return round(100.0 * (self.ticks - self.differing[key]) / self.ticks, 3) if self.ticks else 100.0

    def summary(self, last: bool = False) -> dict[str, Any]:
        """Counts and the first (and with `last`, the last) difference, whole and per actuator."""
        def one(key: str) -> dict[str, Any]:
            entry: dict[str, Any] = {"ticks": self.ticks, "agree": self.ticks - self.differing[key],
                                     "agreement_percent": self.percent(key)}
            if key in self.first:
                entry["first_difference"] = self.first[key]
                if last:
                    entry["last_difference"] = self.last[key]
            return entry

        return one("") | {"actuators": {key: one(key) for key in sorted(self.seen)}}
