"""Rules between validated commands and the pins.

Plugins decide; this layer makes sure nothing they decide, and nothing failing around them, can hurt
the equipment. Each tick, every actuator's wanted target (the last one its owner asked for) passes:

1. ownership (see `ownership`): while the owner is failing (failed calls in a row, quarantined,
   disabled, unloaded, every command for this actuator rejected) nothing more is applied on its
   behalf, and after `failsafe_after_s` the actuator is taken from it and put in its safe state;
   likewise when a command with a lease (`command_ttl_s`) is not renewed in time, and when an
   operator's override has ended (released or expired) and no plugin took the actuator back; at once
   when the owner is no longer granted the actuator. Only a command from a healthy owner moves it again;
2. overrides that force the safe state: a required sensor invalid or stale (`requires`, Mycodo's
   "max age"), or on for longer than `max_on_s` (latched: it stays safe until a tick passes without
   a request to be on, so only a fresh request turns it on again);
3. wear rules that hold the current state: interlock groups (never on together, `wait_s` between one
   going off and another coming on), `min_on_s` and `min_off_s` (start-up counts as a switch). A held
   request belongs to its plugin: it lapses in the first tick the plugin does not ask for it again
   (unless it asks for the safe state, which always stands);
4. shaping, as the actuator's kind says (`Actuator.shape`): a PWM duty below `min_duty` is off;
   `max_rate` and `max_speed` limit the change per second.

Going to a safe state is never held back or slowed down. A held command is reported once per state
change by the loop and counted per actuator and rule; a failsafe is reported once, when it happens.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Iterable, Mapping

import msgspec
import structlog

from pi_controller.config import InterlockSettings
from pi_controller.contract import Command, Reading
from pi_controller.devices.actuators import Actuator, Target
from pi_controller.devices.hardware import Write
from pi_controller.devices.sensors import SensorSettings
from pi_controller.names import OPERATOR, SAFETY
from pi_controller.safety.ownership import Failsafe, Health

log = structlog.get_logger("pi_controller.safety")

FORCING = ("requires", "max_on")  # rules that force the safe state rather than hold a change
WEAR = ("interlock", "min_on", "min_off")  # rules that hold the current state while a request waits
GRADUAL = ("max_rate", "reverse_delay")  # shaping on the way to what was asked: it gets there, later
_UNSEEN = object()  # a guard's `seen` before its first tick: no target is equal to it


class Hold(msgspec.Struct, frozen=True, gc=False):  # made in C (see contract.Reading)
    device_id: str
    rule: str
    detail: str
    plugin: str
    remaining_s: float | None = None  # how long it holds at most, when the rule knows (min_on, min_off)


class Decision(msgspec.Struct):
    writes: list[Write]  # what to apply this tick
    holds: list[Hold]  # what the rules kept back
    failsafes: list[Failsafe]  # actuators taken from their owner this tick


class Guard:
    """One actuator's rule state: its owner and what it asked, when it last switched, whether max_on
    tripped, whether a request is waiting on a wear rule."""

    def __init__(self, actuator: Actuator):
        self.actuator = actuator
        self.wanted: Target = actuator.target
        self.plugin = SAFETY  # the owner: whose command `wanted` is
        self.commanded_at = 0.0  # when the owner last asked (monotonic), for the lease
        self.failsafe: str | None = None  # why it was last put in its safe state, until an owner takes it
        self.failsafe_after_s = 0.0  # the actuator's own, or the default (set by Safety)
        self.was_on = actuator.is_on(actuator.target)
        self.switched_at: float | None = None  # set by the first tick: start-up counts as a switch
        self.seen: Target | object = _UNSEEN  # the actuator's target when last observed or planned
        self.latched = False
        self.held = False  # its request waits on a wear rule
        self.unruled = False  # no rule applies: the tick can skip them all (set by Safety)
        self.leased = actuator.settings.command_ttl_s is not None  # its owner's command lapses

    def follow(self, command: Command, now: float) -> None:
        self.wanted, self.plugin, self.commanded_at, self.failsafe = command.target, command.plugin, now, None

    def drop_request(self) -> None:
        """Forget what the owner asked for and did not get yet; a request for the safe state stands."""
        if self.wanted != self.actuator.safe_target:
            self.wanted = self.actuator.target
        self.held = False

    def take_back(self, why: str) -> Failsafe:
        """From its owner, to its safe state."""
        failsafe = Failsafe(self.actuator.id, self.plugin, why)
        self.wanted, self.plugin, self.failsafe, self.held = self.actuator.safe_target, SAFETY, why, False
        return failsafe

    def since_switch(self, now: float) -> float:
        """How long it has been on, or off; not yet observed by a tick, it has only just started."""
        return 0.0 if self.switched_at is None else now - self.switched_at

    def observe(self, now: float) -> None:
        """Notice a switch made outside the rules (the watchdog, a shutdown) and when it happened: asked
        by the tick only of a target other than the one it last saw or planned, the only kind that can be."""
        self.seen = target = self.actuator.target
        on = self.actuator.is_on(target)
        if self.switched_at is None or on != self.was_on:
            self.switched_at, self.was_on = now, on


class Safety:
    def __init__(self, actuators: Mapping[str, Actuator], sensors: Iterable[SensorSettings],
                 interlocks: Iterable[InterlockSettings], previous: Safety | None = None,
                 failsafe_after_s: float = 1.0):
        """`previous`: the rules before a reload, whose timers and owners carry on for the actuators kept.
        `failsafe_after_s`: for actuators that do not set their own."""
        old: Mapping[str, Guard] = previous.guards if previous else {}
        self.guards: dict[str, Guard] = {key: old[key] if key in old and old[key].actuator is a else Guard(a)
                       for key, a in actuators.items()}
        for guard in self.guards.values():
            own = guard.actuator.settings.failsafe_after_s
            guard.failsafe_after_s = failsafe_after_s if own is None else own
        self.max_age = {s.id: s.max_age_s for s in sensors if s.max_age_s is not None}
        self.partners: dict[str, list[tuple[str, float]]] = {key: [] for key in actuators}
        for group in interlocks:
            present = [m for m in group.actuators if m in actuators]  # one that failed to be claimed is off
            for member in present:
                self.partners[member] += [(other, group.wait_s) for other in present if other != member]
        for key, guard in self.guards.items():
            guard.unruled = not self.partners[key] and _unruled(guard.actuator)
        # Which sensors are stale matters only to an actuator that requires some: most configs have none,
        # and the tick need not look at every reading for them.
        self._requiring = any(guard.actuator.settings.requires for guard in self.guards.values())
        self.held: dict[str, Counter[str]] = {key: previous.held.get(key, Counter()) if previous else Counter()
                                              for key in actuators}
        self.failsafes: Counter[str] = Counter({key: previous.failsafes[key] for key in actuators}
                                               if previous else {})
        self._last_now: float | None = previous._last_now if previous else None
        self._dt = 0.0  # the last tick's step, for a dry run in the same tick

    def dry_run(self, commands: Iterable[Command], readings: Iterable[Reading], wall: float,
                now: float) -> list[Hold]:
        """What the rules would hold back of `commands` (a shadow plugin's) if they came now, to the
        actuators as this tick left them; changes nothing: no owner, timer, latch, count or pin. Ownership
        is left out: the commands' plugin is not the actuators' owner."""
        stale = self._stale(readings, wall) if self._requiring else {}
        planned: dict[str, Target] = {}
        holds = []
        for key, command in {c.device_id: c for c in commands}.items():
            guard = copy.copy(self.guards[key])  # `_target` may latch max_on or drop the request
            guard.follow(command, now)
            if guard.unruled:
                continue
            target, hold = self._target(guard, guard.actuator.is_on(command.target), stale, planned, now, self._dt)
            planned[key] = target
            if hold is not None:
                holds.append(hold)
        return holds

    def enforce(self, commands: Iterable[Command], readings: Iterable[Reading], wall: float, now: float,
               health: Health) -> Decision:
        """The commands to apply this tick, the holds that kept others back, and the actuators taken
        from owners that `health` says are failing.

        `now` is monotonic time, for every duration: a Pi without a clock battery jumps its wall
        clock at the first NTP sync. `wall` only dates readings.
        """
        dt = self._dt = 0.0 if self._last_now is None else max(0.0, now - self._last_now)
        self._last_now = now
        stale = self._stale(readings, wall) if self._requiring else {}
        asked = {c.device_id: c for c in commands}
        planned: dict[str, Target] = {}
        decision = Decision([], [], [])
        for key, guard in self.guards.items():
            actuator = guard.actuator
            if actuator.target != guard.seen:
                guard.observe(now)
            command = asked.get(key)
            if command is not None:  # `Guard.follow`, written out: it runs for every command of every tick (a test
                # holds the two to the same fields and values)
                guard.wanted, guard.plugin, guard.commanded_at, guard.failsafe = (command.target, command.plugin,
                                                                                 now, None)
            elif guard.held:  # a request held back lapses when its plugin stops asking for it
                guard.drop_request()
            owner = guard.plugin
            failsafe = (None if owner == SAFETY or (not guard.leased and (owner in health.sound_everywhere
                                                                           or health.sound(owner, key)))
                        else self._ownership(guard, health, now))
            if failsafe is not None:
                decision.failsafes.append(failsafe)
                self.failsafes[key] += 1
            if guard.unruled or failsafe is not None:  # a failsafe is never held back or slowed down
                target, hold = guard.wanted, None
            else:
                target, hold = self._target(guard, command is not None and actuator.is_on(command.target), stale,
                                            planned, now, dt)
            planned[key] = target
            if hold is None:
                guard.held = False
            else:
                guard.held = hold.rule in WEAR
                decision.holds.append(hold)
                self.held[key][hold.rule] += 1
            if target != actuator.target:
                forced = hold is not None and hold.rule in FORCING
                decision.writes.append(Write(key, target, SAFETY if forced else guard.plugin))
                guard.seen = target  # the next tick observes it only if the write did not take
                if actuator.is_on(target) != guard.was_on:
                    guard.switched_at, guard.was_on = now, not guard.was_on
        return decision

    def _ownership(self, guard: Guard, health: Health, now: float) -> Failsafe | None:
        """Whether the owner still has the actuator: one no longer granted it loses it at once; a failing
        owner gets nothing more applied and, after `failsafe_after_s`, loses it; so does one whose lease
        (`command_ttl_s`) ran out, and an override that ended with no plugin taking the actuator back. Not
        asked of an actuator in its start-up or safe state (owner `SAFETY`): nobody's to lose; nor of a
        sound owner (`Health.sound`) without a lease: nothing to lose it by."""
        owner, key = guard.plugin, guard.actuator.id
        if owner == OPERATOR:  # an override is asked for again every tick until it is released or expires
            ended = now - guard.commanded_at
            if ended >= guard.failsafe_after_s and ended > 0:
                return guard.take_back(f"the operator's override ended {ended:.1f} s ago and no plugin took the "
                                       f"actuator back (failsafe_after_s {guard.failsafe_after_s:g})")
            return None
        if not health.granted(owner, key):
            return guard.take_back(f"plugin '{owner}' is no longer granted '{key}' (its manifest or settings "
                                   "changed)")
        failing = health.failing(owner, now, key)
        if failing is not None:
            since, why = failing
            guard.drop_request()  # nothing more is applied on its behalf
            if now - since >= guard.failsafe_after_s:
                return guard.take_back(f"plugin '{owner}' {why} ({now - since:.1f} s, "
                                       f"failsafe_after_s {guard.failsafe_after_s:g})")
        ttl = guard.actuator.settings.command_ttl_s
        if ttl is not None and now - guard.commanded_at >= ttl:
            return guard.take_back(f"no command from plugin '{owner}' for {now - guard.commanded_at:.1f} s "
                                   f"(command_ttl_s {ttl:g})")
        return None

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
        if settings.max_on_s is not None and guard.was_on and guard.since_switch(now) >= settings.max_on_s:
            guard.latched = True
            guard.wanted = actuator.safe_target  # only a fresh request turns it on again
        if guard.latched:
            guard.latched = asks_on
            return actuator.safe_target, hold("max_on", f"on for longer than max_on_s {settings.max_on_s:g}")
        current, wanted, on = actuator.target, guard.wanted, actuator.is_on
        if on(wanted) and not on(current):
            blocked = self._interlocked(actuator.id, planned, now)
            if blocked:
                return current, hold("interlock", blocked)
        if on(wanted) != on(current):
            minimum_s, elapsed_s = settings.min_on_s if on(current) else settings.min_off_s, guard.since_switch(now)
            wear = _wear(minimum_s, elapsed_s)
            if wear:
                return current, hold("min_on" if on(current) else "min_off", wear, minimum_s - elapsed_s)
        target, note = actuator.shape(wanted, dt, 0.0 if guard.was_on else guard.since_switch(now))
        return target, None if note is None else hold(*note)

    def _interlocked(self, key: str, planned: Mapping[str, Target], now: float) -> str | None:
        for other, wait_s in self.partners[key]:
            partner = self.guards[other]
            if partner.actuator.is_on(planned.get(other, partner.actuator.target)):
                return f"interlocked with '{other}', which is on"
            if not partner.was_on and partner.switched_at is not None and now - partner.switched_at < wait_s:
                return f"'{other}' went off {now - partner.switched_at:.1f} s ago; interlock wait_s {wait_s:g}"
        return None


def _unruled(actuator: Actuator) -> bool:
    settings = actuator.settings
    return not (settings.requires or settings.max_on_s is not None or settings.min_on_s or settings.min_off_s
                or actuator.shapes())


class _Holder:
    """Makes Holds for one actuator and plugin."""

    def __init__(self, device_id: str, plugin: str):
        self.device_id, self.plugin = device_id, plugin

    def __call__(self, rule: str, detail: str, remaining_s: float | None = None) -> Hold:
        return Hold(self.device_id, rule, detail, self.plugin, remaining_s)


def _wear(minimum_s: float, elapsed_s: float) -> str | None:
    if elapsed_s < minimum_s:
        return f"switched {elapsed_s:.1f} s ago, minimum {minimum_s:g} s"
    return None
