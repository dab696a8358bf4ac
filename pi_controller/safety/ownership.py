"""Whose command each actuator follows, and whether that owner can still be trusted with it.

An actuator follows one owner: the plugin whose command set what it wants, the operator, or nobody
(`names.SAFETY`: its start-up or safe state). A plugin keeps its actuators only while it is healthy:
`Health` hears from the loop how every plugin's call went this tick, and answers for an owner since
when it has been failing and why: failed calls in a row, quarantine, or not being called at all
(disabled, unloaded, refused). The safety layer then drops what the owner asked for and, after the
actuator's `failsafe_after_s`, puts it in its safe state (see `safety.Safety`). Called from the tick
thread only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True, slots=True)
class Failsafe:
    """An actuator taken from its owner and put in its safe state."""

    device_id: str
    owner: str
    why: str


class Health:
    """How each plugin fared in the current tick, and since when the failing ones have been failing."""

    def __init__(self, why_absent: Callable[[str], str]):
        """`why_absent(name)`: why a plugin was not called this tick (disabled, unloaded, ...)."""
        self._why_absent = why_absent
        self._failing: dict[str, tuple[float, str]] = {}  # plugin -> (since, why)
        self._heard: set[str] = set()  # plugins that ran, or were due to run, this tick

    def begin(self) -> None:
        """A new tick: nothing heard yet."""
        self._heard.clear()

    def ok(self, plugin: str) -> None:
        """Its call returned a usable output."""
        self._heard.add(plugin)
        if plugin in self._failing:
            del self._failing[plugin]

    def failed(self, plugin: str, now: float, why: str) -> None:
        """Its call failed, or it was not called because it is quarantined."""
        self._heard.add(plugin)
        since = self._failing[plugin][0] if plugin in self._failing else now
        self._failing[plugin] = (since, why)

    def stalled(self, plugin: str) -> None:
        """Its call ran past the backstop: the machine's doing, so it is neither failing nor cleared."""
        self._heard.add(plugin)

    def failing(self, plugin: str, now: float) -> tuple[float, str] | None:
        """(since, why) if `plugin` is failing, or was not called this tick; None while it is healthy."""
        if plugin in self._failing:
            return self._failing[plugin]
        if plugin in self._heard:
            return None
        self._failing[plugin] = (now, self._why_absent(plugin))
        return self._failing[plugin]
