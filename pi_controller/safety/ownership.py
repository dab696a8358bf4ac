"""Whose command each actuator follows, and whether that owner can still be trusted with it.

An actuator follows one owner: the plugin whose command set what it wants, the operator, or nobody
(`names.SAFETY`: its start-up or safe state). A plugin keeps its actuators only while it is healthy and
granted them: `Health` hears from the loop how every plugin's call went this tick, and answers for an
owner since when it has been failing and why: failed calls in a row, quarantine, not being called at all
(disabled, unloaded, refused), or, for one actuator, every command for it rejected since some time (its
last word could not be applied: the actuator runs on an older one). The safety layer then drops what
the owner asked for and, after the actuator's `failsafe_after_s`, puts it in its safe state; an owner
no longer granted the actuator (a new manifest or settings) loses it at once (see `safety.Safety`).
Called from the tick thread only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Collection, Iterable

import msgspec

if TYPE_CHECKING:
    from pi_controller.contract import Command, Rejection


class Failsafe(msgspec.Struct, frozen=True, gc=False):  # made in C (see contract.Reading)
    """An actuator taken from its owner and put in its safe state."""

    device_id: str
    owner: str
    why: str


class Health:
    """How each plugin fared in the current tick, and since when the failing ones have been failing."""

    def __init__(self, why_absent: Callable[[str], str], granted: Callable[[str, str], bool]):
        """`why_absent(name)`: why a plugin was not called this tick (disabled, unloaded, ...);
        `granted(name, device)`: whether the plugin, as loaded now, may command the device."""
        self._why_absent = why_absent
        self.granted = granted
        self._failing: dict[str, tuple[float, str]] = {}  # plugin -> (since, why)
        self._refused: dict[tuple[str, str], tuple[float, str]] = {}  # (plugin, device) -> (since, why)
        self._heard: set[str] = set()  # plugins that ran, or were due to run, this tick
        # Plugins whose call this tick gave a usable output -> the actuators they are granted (None: all).
        self._answered: dict[str, Collection[str] | None] = {}
        # Those of them `sound` for every device: granted all actuators, with none whose commands are all
        # rejected. Nearly every owner in nearly every tick: the rules ask `sound` only of the others.
        self.sound_everywhere: set[str] = set()

    def begin(self) -> None:
        """A new tick: nothing heard yet."""
        self._heard.clear()
        self._answered.clear()
        self.sound_everywhere.clear()

    def ok(self, plugin: str, now: float, commands: Iterable[Command], rejections: Iterable[Rejection],
           granted: Collection[str] | None) -> None:
        """Its call returned a usable output: these commands, and these rejected; `granted`: the actuators it
        may command as it is loaded (None: all). A device whose commands are all rejected from some tick on is
        one the plugin fails for, until one is accepted again; if the plugin was failing (or not called) until
        now, since then: no word of its has reached the device since."""
        self._heard.add(plugin)
        self._answered[plugin] = granted
        was = self._failing.pop(plugin, None)
        for r in rejections:
            if r.device_id is not None and (plugin, r.device_id) not in self._refused:
                why = f"{r.rule}: {r.reason[:200]}"
                self._refused[(plugin, r.device_id)] = (now, why) if was is None else (
                    was[0], f"{why}; before that it {was[1]}")
        if self._refused:
            for c in commands:
                self._refused.pop((plugin, c.device_id), None)
        if granted is None and not (self._refused and any(p == plugin for p, _ in self._refused)):
            self.sound_everywhere.add(plugin)

    def failed(self, plugin: str, now: float, why: str) -> None:
        """Its call failed, or it was not called because it is quarantined."""
        self._heard.add(plugin)
        self._answered.pop(plugin, None)
        self.sound_everywhere.discard(plugin)
        since = self._failing[plugin][0] if plugin in self._failing else now
        self._failing[plugin] = (since, why)

    def stalled(self, plugin: str) -> None:
        """Its call ran past the backstop: the machine's doing, so it is neither failing nor cleared."""
        self._heard.add(plugin)

    def sound(self, plugin: str, device: str) -> bool:
        """Whether `plugin` answered this tick, may command `device` (as `granted` says, from what it answered
        with) and has not had every command for it rejected: what holds for nearly every owner in nearly every
        tick, asked first so that the tick looks into why an owner fails (`failing`) only for one that may."""
        if plugin not in self._answered:
            return False
        granted = self._answered[plugin]
        return (granted is None or device in granted) and (plugin, device) not in self._refused

    def failing(self, plugin: str, now: float, device: str) -> tuple[float, str] | None:
        """(since, why) if `plugin` is failing, was not called this tick, or has had every command for
        `device` rejected since; None while it is healthy. Since the earliest of these: a plugin quarantined
        for the rejections of its commands for `device` has been failing it since the first of them."""
        if plugin not in self._failing and plugin not in self._heard:
            self._failing[plugin] = (now, self._why_absent(plugin))
        whole, refused = self._failing.get(plugin), self._refused.get((plugin, device))
        if refused is None:
            return whole
        rejected = f"has had every command for '{device}' rejected since ({refused[1]})"
        if whole is None:
            return refused[0], rejected
        return min(whole[0], refused[0]), whole[1] if whole[0] <= refused[0] else f"{rejected}, and {whole[1]}"
