"""Rules between validated commands and the pins, and a watchdog that does not need the loop.

Plugins decide; this layer makes sure nothing they decide, and nothing failing around them, can hurt
the equipment. Each tick, every actuator's wanted target (the last one a plugin asked for) passes:

1. overrides that force the safe state: a required sensor invalid or stale (`requires`, Mycodo's
   "max age"), or on for longer than `max_on_s` (latched: it stays safe until a tick passes without
   a request to be on, so only a fresh request turns it on again);
2. wear rules that hold the current state: interlock groups (never on together, `wait_s` between one
   going off and another coming on), `min_on_s` and `min_off_s` (start-up counts as a switch);
3. shaping: a PWM duty below `min_duty` is off; `max_rate` and `max_speed` limit the change per second.

Going to a safe state is never held back or slowed down. A held command is reported once per state
change by the loop and counted per actuator and rule.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import structlog

from pi_controller.actuators import Actuator, ActuatorSettings, PwmSettings, ServoSettings, Target
from pi_controller.config import InterlockSettings
from pi_controller.contract import Command
from pi_controller.hardware import Hardware
from pi_controller.observer import LoopObserver, TickReport
from pi_controller.sensors import Reading, SensorSettings

log = structlog.get_logger("pi_controller.safety")

SAFETY = "safety"  # the "plugin" of commands this layer makes itself
FORCING = ("requires", "max_on")  # rules that force the safe state rather than hold a change


def is_on(target: Target) -> bool:
    return target is not None and target != 0.0


@dataclass(frozen=True, slots=True)
class Hold:
    device_id: str
    rule: str
    detail: str
    plugin: str


class Guard:
    """One actuator's rule state: what was asked, when it last switched, whether max_on tripped."""

    def __init__(self, actuator: Actuator):
        self.actuator = actuator
        self.wanted: Target = actuator.target
        self.plugin = SAFETY
        self.was_on = is_on(actuator.target)
        self.switched_at: float | None = None  # set by the first tick: start-up counts as a switch
        self.latched = False
        self.unruled = False  # no rule applies: the tick can skip them all (set by Safety)

    def observe(self, now: float) -> None:
        """Notice a switch made outside the rules (the watchdog, a shutdown) and when it happened."""
        on = is_on(self.actuator.target)
        if self.switched_at is None or on != self.was_on:
            self.switched_at, self.was_on = now, on


class Safety:
    def __init__(self, actuators: Mapping[str, Actuator], sensors: Iterable[SensorSettings],
                 interlocks: Iterable[InterlockSettings], previous: Safety | None = None):
        """`previous`: the rules before a reload, whose timers carry on for the actuators kept."""
        old = previous.guards if previous else {}
        self.guards = {key: old[key] if key in old and old[key].actuator is a else Guard(a)
                       for key, a in actuators.items()}
        self.max_age = {s.id: s.max_age_s for s in sensors if s.max_age_s is not None}
        self.partners: dict[str, list[tuple[str, float]]] = {key: [] for key in actuators}
        for group in interlocks:
            present = [m for m in group.actuators if m in actuators]  # one that failed to be claimed is off
            for member in present:
                self.partners[member] += [(other, group.wait_s) for other in present if other != member]
        for key, guard in self.guards.items():
            guard.unruled = not self.partners[key] and _unruled(guard.actuator.settings)
        self.held: dict[str, Counter[str]] = {key: previous.held.get(key, Counter()) if previous else Counter()
                                              for key in actuators}
        self._last_now: float | None = previous._last_now if previous else None

    def decide(self, commands: Iterable[Command], readings: Iterable[Reading], wall: float, now: float
               ) -> tuple[list[Command], list[Hold]]:
        """The commands to apply this tick, and the holds that kept others back.

        `now` is monotonic time, for every duration: a Pi without a clock battery jumps its wall
        clock at the first NTP sync. `wall` only dates readings.
        """
        dt = 0.0 if self._last_now is None else max(0.0, now - self._last_now)
        self._last_now = now
        stale = self._stale(readings, wall)
        asked = {c.device_id: c for c in commands}
        planned: dict[str, Target] = {}
        out: list[Command] = []
        holds: list[Hold] = []
        for key, guard in self.guards.items():
            guard.observe(now)
            if key in asked:
                guard.wanted, guard.plugin = asked[key].target, asked[key].plugin
            if guard.unruled:
                target, hold = guard.wanted, None
            else:
                target, hold = self._target(guard, key in asked and is_on(asked[key].target), stale, planned,
                                            now, dt)
            planned[key] = target
            if hold is not None:
                holds.append(hold)
                self.held[key][hold.rule] += 1
            if target != guard.actuator.target:
                forced = hold is not None and hold.rule in FORCING
                out.append(Command(key, "set", target, SAFETY if forced else guard.plugin, 0))
                if is_on(target) != guard.was_on:
                    guard.switched_at, guard.was_on = now, is_on(target)
        return out, holds

    def _stale(self, readings: Iterable[Reading], now: float) -> dict[str, str]:
        """Sensor id -> why it cannot be trusted now."""
        stale = {}
        for r in readings:
            age = self.max_age.get(r.sensor_id)
            if not r.valid:
                stale[r.sensor_id] = f"invalid: {r.error}"
            elif age is not None and now - r.timestamp > age:
                stale[r.sensor_id] = f"{now - r.timestamp:.1f} s old, max_age_s {age:g}"
        return stale

    def _target(self, guard: Guard, asks_on: bool, stale: Mapping[str, str], planned: Mapping[str, Target],
                now: float, dt: float) -> tuple[Target, Hold | None]:
        actuator = guard.actuator
        settings = actuator.settings
        hold = _Holder(actuator.id, guard.plugin)
        for sensor in settings.requires:
            if sensor in stale:
                return actuator.safe_target, hold("requires", f"sensor '{sensor}' {stale[sensor]}")
        if settings.max_on_s is not None and guard.was_on and now - guard.switched_at >= settings.max_on_s:
            guard.latched = True
            guard.wanted = actuator.safe_target  # only a fresh request turns it on again
        if guard.latched:
            guard.latched = asks_on
            return actuator.safe_target, hold("max_on", f"on for longer than max_on_s {settings.max_on_s:g}")
        current, wanted = actuator.target, guard.wanted
        if is_on(wanted) and not is_on(current):
            blocked = self._interlocked(actuator.id, planned, now)
            if blocked:
                return current, hold("interlock", blocked)
        if is_on(wanted) != is_on(current):
            wear = _wear(settings.min_on_s if is_on(current) else settings.min_off_s, now - guard.switched_at)
            if wear:
                return current, hold("min_on" if is_on(current) else "min_off", wear)
        return _shape(settings, current, wanted, dt, hold)

    def _interlocked(self, key: str, planned: Mapping[str, Target], now: float) -> str | None:
        for other, wait_s in self.partners[key]:
            partner = self.guards[other]
            if is_on(planned.get(other, partner.actuator.target)):
                return f"interlocked with '{other}', which is on"
            if not partner.was_on and partner.switched_at is not None and now - partner.switched_at < wait_s:
                return f"'{other}' went off {now - partner.switched_at:.1f} s ago; interlock wait_s {wait_s:g}"
        return None


def _unruled(settings: ActuatorSettings) -> bool:
    rate = getattr(settings, "max_rate", None) or getattr(settings, "max_speed", None)
    return not (settings.requires or settings.max_on_s is not None or settings.min_on_s or settings.min_off_s
                or getattr(settings, "min_duty", 0) or rate)


class _Holder:
    """Makes Holds for one actuator and plugin."""

    def __init__(self, device_id: str, plugin: str):
        self.device_id, self.plugin = device_id, plugin

    def __call__(self, rule: str, detail: str) -> Hold:
        return Hold(self.device_id, rule, detail, self.plugin)


def _wear(minimum_s: float, elapsed_s: float) -> str | None:
    if elapsed_s < minimum_s:
        return f"switched {elapsed_s:.1f} s ago, minimum {minimum_s:g} s"
    return None


def _shape(settings: object, current: Target, wanted: Target, dt: float, hold: _Holder
           ) -> tuple[Target, Hold | None]:
    """min_duty (below is off) and rate limits; a step towards the wanted target, never past it."""
    note = None
    if isinstance(settings, PwmSettings) and wanted is not None and 0 < wanted < settings.min_duty:
        note = hold("min_duty", f"duty {wanted:g} is below min_duty {settings.min_duty:g}: off")
        wanted = 0.0
    rate = settings.max_rate if isinstance(settings, PwmSettings) else (
        settings.max_speed if isinstance(settings, ServoSettings) else None)
    if rate is None or wanted is None or current is None or abs(wanted - current) <= rate * dt:
        return wanted, note
    step = rate * dt if wanted > current else -rate * dt
    return current + step, note or hold("max_rate", f"ramping towards {wanted:g} at {rate:g}/s")


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
