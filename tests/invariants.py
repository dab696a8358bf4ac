"""The safety invariants of docs/safety.md ("What holds whatever happens"), as code that judges what a
test saw: pin histories by tick (`daemon_rig.Tick`), and what the test did and knows (the files it put in
the plugins folder, the configs it wrote and what check-config said of them).

Each invariant has a name (`NAMES`); a violation raises `Violation`, which names it. `PinLaws` follows a
daemon's life tick by tick; the functions below it judge one event (a reload, a start, an install, a
stop). They take the daemon's reports of its own decisions (a tick's trace, a plugin's status) as the
record of what happened, and judge them against the pins and against what the test knows independently
(which plugin files are valid, which config it wrote, which sensor faults it caused).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from pi_controller import arbitration
from pi_controller.devices.hardware import Write
from pi_controller.names import OPERATOR, SAFETY
from tests.daemon_rig import PinChange, Tick

OWNER = "owner"  # an actuator is driven only on behalf of its current owner, within that owner's grant
FAILSAFE = "failsafe"  # failing, quarantined, disabled, unloaded or without the grant: safe within failsafe_after_s
LEASE = "lease"  # no command outlives its lease (command_ttl_s, an override's end)
REQUIRES = "requires"  # an actuator is safe while a sensor it requires is invalid
INTERLOCK = "interlock"  # interlocked actuators are never on together, and wait_s apart
WEAR = "wear"  # min_on_s, min_off_s and max_on_s hold on the pin history
REFUSED_RELOAD = "refused_reload"  # a reload that is refused changes nothing
RELOAD_KEEPS = "reload_keeps"  # an applied reload loses no plugin named in the config that was running
CHECK_CONFIG = "check_config"  # what check-config accepts the daemon loads; what it refuses the daemon refuses
SHUTDOWN = "shutdown"  # after a stop every pin is in its shut-down state
CONFIGURED = "configured"  # plugins named in the config are loaded when their files are valid, whatever else is there
READY = "ready"  # /ready answers ok only while every plugin named in the config is loaded
INSTALL = "install"  # what `plugin install` accepts the daemon loads; what it refuses changes nothing
SHARE = "share"  # the shadows run in what the live plugins leave of the plugin budget, never in their share
SWITCH = "switch"  # the operator's switch of a running plugin stands through a reload that leaves it enabled
RUNS_AS_CHECKED = "runs_as_checked"  # after a reload or a start, the loop rate and the timeouts are the config's
CALLED = "called"  # a plugin of the config that is due is called every tick, whatever was dropped in beside it
GRANT_ENDS = "grant_ends"  # an owner no longer granted its actuator leaves it at once: safe, or another's
SWITCH_REPLACED = "switch_replaced"  # the operator's switch of a plugin stands through the replacement of its file

NAMES = (OWNER, FAILSAFE, LEASE, REQUIRES, INTERLOCK, WEAR, REFUSED_RELOAD, RELOAD_KEEPS, CHECK_CONFIG, SHUTDOWN,
         CONFIGURED, READY, INSTALL, SHARE, SWITCH, RUNS_AS_CHECKED, CALLED, GRANT_ENDS, SWITCH_REPLACED)

EPSILON = 1e-6  # virtual times are sums of tick periods


class Violation(AssertionError):
    def __init__(self, invariant: str, message: str):
        super().__init__(f"[{invariant}] {message}")
        self.invariant = invariant


@dataclass(frozen=True)
class Judged:
    """Which violations count: of these invariants, and (when `matching` is given) whose message
    matches it, to look for one kind of finding while another is known."""

    invariants: Collection[str] = NAMES
    matching: str | None = None

    def __call__(self, invariant: str, message: str) -> Violation | None:
        if invariant in self.invariants and (self.matching is None or re.search(self.matching, message)):
            return Violation(invariant, message)
        return None


@dataclass(frozen=True)
class Actuator:
    """What the config says of one actuator, as the test wrote it."""

    id: str
    safe: float  # the pin's value in the safe state
    shutdown: float
    min_on_s: float = 0.0
    min_off_s: float = 0.0
    max_on_s: float | None = None
    command_ttl_s: float | None = None
    requires: tuple[str, ...] = ()
    interlocked: tuple[tuple[str, float], ...] = ()  # (other actuator, wait_s)

    def on(self, value: float) -> bool:
        return value != 0.0


@dataclass(frozen=True)
class Plant:
    actuators: Mapping[str, Actuator]
    failsafe_after_s: float


@dataclass
class _Owner:
    """Who an actuator follows, as the trace shows it: the last winner of arbitration for it."""

    plugin: str = SAFETY
    target_on: bool = False
    commanded_at: float = 0.0
    asked_safe: bool = False  # its last command asked for the safe state: that request stands (docs/safety.md)


class PinLaws:
    """The invariants that hold tick by tick over one life of the daemon, checked as each tick lands."""

    def __init__(self, plant: Plant, started_at: float, first_pins: Mapping[str, float],
                 judged: Judged = Judged()):
        self.plant = plant
        self.judged = judged
        self.found: list[Violation] = []  # this tick's, raised once its bookkeeping is done
        self.pins = dict(first_pins)
        self.owners = {key: _Owner() for key in plant.actuators}
        self.bad_since: dict[tuple[str, str], tuple[float, str]] = {}  # (plugin, device) -> since, why
        self.rejected: dict[tuple[str, str], float] = {}  # every command for the device rejected, since
        self.switched_at = dict.fromkeys(plant.actuators, started_at)  # start-up counts as a switch
        self.invalid_sensors: set[str] = set()  # what the test made fail, for REQUIRES

    def fail(self, invariant: str, tick: Tick | None, message: str) -> None:
        where = f"tick {tick.number} at {tick.at:.1f} s: " if tick is not None else ""
        violation = self.judged(invariant, where + message)
        if violation is not None:
            self.found.append(violation)

    def _raise_found(self) -> None:
        found, self.found = self.found, []
        if found:
            raise found[0]

    def tick(self, tick: Tick) -> None:
        self._owners(tick)
        self._standing(tick)
        self._changes(tick)
        for key, actuator in self.plant.actuators.items():
            if tick.pins[key] != actuator.safe:
                self._not_safe(tick, actuator, tick.pins[key])
        self.pins = dict(tick.pins)
        self._raise_found()

    def _owners(self, tick: Tick) -> None:
        winners, _ = arbitration.resolve(tick.trace.proposals)
        for command in winners:
            if command.device_id in self.owners:
                actuator = self.plant.actuators[command.device_id]
                on = actuator.on(command.target or 0.0)
                self.owners[command.device_id] = _Owner(command.plugin, on, tick.at, on == actuator.on(actuator.safe))

    def _standing(self, tick: Tick) -> None:
        """Since when each plugin has been unfit to drive each actuator, and why."""
        verdicts = tick.trace.verdicts
        answered = set(verdicts.answered)
        accepted = {(c.plugin, c.device_id) for c in tick.trace.proposals}
        for r in verdicts.rejections:
            if r.device_id is not None and (r.plugin, r.device_id) not in accepted:
                self.rejected.setdefault((r.plugin, r.device_id), tick.at)
        for key in list(self.rejected):
            if key in accepted:
                del self.rejected[key]
        for device in self.plant.actuators:
            for plugin in {owner.plugin for owner in self.owners.values()} - {SAFETY, OPERATOR}:
                why = self._unfit(tick, plugin, device, answered)
                if why is None:
                    self.bad_since.pop((plugin, device), None)
                elif verdicts.failures.get(plugin) != "stalled":  # a stall is the machine's: no verdict
                    self.bad_since.setdefault((plugin, device), (tick.at, why))

    def _unfit(self, tick: Tick, plugin: str, device: str, answered: set[str]) -> str | None:
        standing = tick.plugins.get(plugin)
        failure = tick.trace.verdicts.failures.get(plugin)
        if standing is None:
            return "not in the plugin set (unloaded or refused)"
        if plugin in tick.trace.disabled:
            return "disabled by the operator"
        if failure is not None:
            return f"its call failed ({failure})"
        if plugin not in answered:
            return "not called"
        if standing.actuators is not None and device not in standing.actuators:
            return f"not granted '{device}' (granted {sorted(standing.actuators)})"
        if (plugin, device) in self.rejected:
            return f"every command it sent for '{device}' since {self.rejected[(plugin, device)]:.1f} s was rejected"
        return None

    def _not_safe(self, tick: Tick, actuator: Actuator, value: float) -> None:
        owner = self.owners[actuator.id]
        limit = self.plant.failsafe_after_s + tick.period - EPSILON  # the tick after the deadline
        if owner.plugin == OPERATOR:
            if not any(c.plugin == OPERATOR and c.device_id == actuator.id for c in tick.trace.proposals):
                since = owner.commanded_at + tick.period
                if tick.at - since >= limit:
                    self.fail(LEASE, tick, f"'{actuator.id}' at {value:g} {tick.at - since:.1f} s after the "
                                           f"operator's override ended, with no plugin in charge of it")
        elif owner.plugin != SAFETY:
            bad = self.bad_since.get((owner.plugin, actuator.id))
            if bad is not None and tick.at - bad[0] >= limit:
                self.fail(FAILSAFE, tick, f"'{actuator.id}' at {value:g}, not its safe state "
                                          f"{actuator.safe:g}, {tick.at - bad[0]:.1f} s after its owner "
                                          f"'{owner.plugin}' became unfit to drive it: {bad[1]}")
        ttl = actuator.command_ttl_s
        if ttl is not None and owner.plugin != SAFETY and tick.at - owner.commanded_at >= ttl + tick.period - EPSILON:
            self.fail(LEASE, tick, f"'{actuator.id}' at {value:g} {tick.at - owner.commanded_at:.1f} s after "
                                   f"'{owner.plugin}' last commanded it (command_ttl_s {ttl:g})")
        missing = [s for s in actuator.requires if s in self.invalid_sensors]
        if missing:
            self.fail(REQUIRES, tick, f"'{actuator.id}' at {value:g} while the sensor it requires, "
                                      f"{missing[0]}, is invalid")

    def _changes(self, tick: Tick) -> None:
        writes = {w.device_id: w for w in tick.trace.decision.writes}
        pins = dict(self.pins)
        for change in tick.changes:
            actuator = self.plant.actuators[change.device]
            write = writes.get(change.device)
            self._driven_by_owner(tick, actuator, change, write)
            was_on, now_on = actuator.on(pins[change.device]), actuator.on(change.value)
            pins[change.device] = change.value
            if was_on != now_on:
                forced = write is not None and write.plugin == SAFETY
                self._wear(tick, actuator, now_on, forced)
                self.switched_at[actuator.id] = tick.at
            if now_on:
                self._interlock(tick, actuator, pins)
        for key, actuator in self.plant.actuators.items():
            on_since = self.switched_at[key]
            if actuator.max_on_s is not None and actuator.on(pins[key]) and \
                    tick.at - on_since >= actuator.max_on_s + tick.period - EPSILON:
                self.fail(WEAR, tick, f"'{key}' on for {tick.at - on_since:.1f} s, max_on_s {actuator.max_on_s:g}")

    def _driven_by_owner(self, tick: Tick, actuator: Actuator, change: PinChange, write: Write | None) -> None:
        if write is None:
            self.fail(OWNER, tick, f"'{actuator.id}' changed to {change.value:g} with no write of the tick for it")
            return
        if write.plugin == SAFETY:
            if change.value != actuator.safe:
                self.fail(OWNER, tick, f"'{actuator.id}' driven to {change.value:g} by the safety layer, "
                                       f"which drives only the safe state {actuator.safe:g}")
            return
        owner = self.owners[actuator.id]
        if write.plugin != owner.plugin:
            self.fail(OWNER, tick, f"'{actuator.id}' driven to {change.value:g} on behalf of '{write.plugin}', "
                                   f"while it follows '{owner.plugin}'")
        if write.plugin == OPERATOR:
            return
        why = self._unfit(tick, write.plugin, actuator.id, set(tick.trace.verdicts.answered))
        standing = owner.asked_safe and change.value == actuator.safe  # held, it stands whatever the owner became
        if why is not None and not standing:
            self.fail(OWNER, tick, f"'{actuator.id}' driven to {change.value:g} on behalf of '{write.plugin}', "
                                   f"which is {why}")
        if actuator.on(change.value) and not owner.target_on:
            self.fail(OWNER, tick, f"'{actuator.id}' switched on on behalf of '{write.plugin}', whose last "
                                   f"command for it was off")

    def _wear(self, tick: Tick, actuator: Actuator, now_on: bool, forced: bool) -> None:
        held_for = tick.at - self.switched_at[actuator.id]
        if now_on and held_for < actuator.min_off_s - EPSILON:
            self.fail(WEAR, tick, f"'{actuator.id}' on {held_for:.1f} s after it last switched, "
                                  f"min_off_s {actuator.min_off_s:g}")
        if not now_on and not forced and held_for < actuator.min_on_s - EPSILON:
            self.fail(WEAR, tick, f"'{actuator.id}' off {held_for:.1f} s after it last switched, "
                                  f"min_on_s {actuator.min_on_s:g}, and not by the safety layer")

    def _interlock(self, tick: Tick, actuator: Actuator, pins: Mapping[str, float]) -> None:
        for other, wait_s in actuator.interlocked:
            partner = self.plant.actuators[other]
            if partner.on(pins[other]):
                self.fail(INTERLOCK, tick, f"'{actuator.id}' and '{other}' on together")
            elif tick.at - self.switched_at[other] < wait_s - EPSILON:
                self.fail(INTERLOCK, tick, f"'{actuator.id}' on {tick.at - self.switched_at[other]:.1f} s after "
                                           f"'{other}' went off; wait_s {wait_s:g}")

    def stopped(self, last_pins: Mapping[str, float]) -> None:
        for key, actuator in self.plant.actuators.items():
            if last_pins[key] != actuator.shutdown:
                self.fail(SHUTDOWN, None, f"after the stop '{key}' is at {last_pins[key]:g}, not its shut-down "
                                          f"state {actuator.shutdown:g}")
        self._raise_found()


# -- one event at a time ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PluginView:
    """A plugin of the set as its status shows it."""

    state: str  # loaded, quarantined, disabled, failed
    sha256: str | None
    reason: str | None = None

    @property
    def live(self) -> bool:
        return self.state in ("loaded", "quarantined")


@dataclass
class Judge:
    """Judges events against what the test knows."""

    judged: Judged = field(default_factory=Judged)

    def fail(self, invariant: str, message: str) -> None:
        violation = self.judged(invariant, message)
        if violation is not None:
            raise violation

    def configured_loaded(self, plugins: Mapping[str, PluginView], due: Iterable[str], when: str) -> None:
        """`due`: the plugins named in the config in force whose files and settings are valid and
        which fit the budget together: each must be loaded (or quarantined)."""
        for name in sorted(due):
            view = plugins.get(name)
            if view is None or not view.live:
                self.fail(CONFIGURED, f"{when}: '{name}' is named in the config and its files are valid, but it "
                                      f"is {view.state if view else 'not in the set'}"
                                      f"{': ' + (view.reason or '')[:300] if view else ''}")

    def shares(self, live: Mapping[str, int], shadows: Mapping[str, int], budget_ms: float, when: str) -> None:
        """`live`, `shadows`: the timeout_ms of each plugin loaded, and of each shadow; together within the budget."""
        if sum(live.values()) + sum(shadows.values()) > budget_ms:
            self.fail(SHARE, f"{when}: the shadows {dict(shadows)} run beside the live plugins {dict(live)}, past the "
                             f"{budget_ms:g} ms plugin budget")

    def switch(self, name: str, on: bool, held_off: bool, when: str) -> None:
        """The operator switched the running plugin `name` on (`on`) or off, and the config in force since leaves
        it enabled; `held_off`: whether the daemon holds it off now."""
        if held_off == on:
            self.fail(SWITCH, f"{when}: the operator switched '{name}' {'on' if on else 'off'}, and the daemon "
                              f"holds it {'off' if held_off else 'on'}")

    def runs_as_checked(self, period_s: float, rate_hz: float, timeouts: Mapping[str, int | None],
                        expected: Mapping[str, int], when: str) -> None:
        """`period_s`: a tick's period since; `rate_hz`: the loop rate of the config in force (a reload keeps the
        running one); `timeouts`: the timeout_ms each plugin of `expected` runs with (None: not loaded);
        `expected`: what the config and the manifests give the plugins due."""
        if abs(period_s - 1.0 / rate_hz) > EPSILON:
            self.fail(RUNS_AS_CHECKED, f"{when}: the loop ticks every {period_s * 1000:g} ms, the config in force "
                                       f"says {rate_hz:g} Hz")
        for name, timeout_ms in sorted(expected.items()):
            if timeouts.get(name) != timeout_ms:
                self.fail(RUNS_AS_CHECKED, f"{when}: '{name}' runs with timeout_ms {timeouts.get(name)}, the config "
                                           f"and its manifest give it {timeout_ms}")

    def at_budget(self, accepted_under: bool, accepted_at: bool, budget_ms: float) -> None:
        """check-config's verdicts on a config whose plugins' timeouts add up to 2 ms under the plugin budget
        (`accepted_under`) and to the budget exactly (`accepted_at`), and nothing else differs."""
        if accepted_under and not accepted_at:
            self.fail(CHECK_CONFIG, f"check-config accepted timeouts 2 ms under the {budget_ms:g} ms plugin budget, "
                                    f"and refused them adding up to it exactly")

    def called(self, due: Iterable[str], answered: Collection[str], failed: Collection[str],
               disabled: Collection[str], when: str) -> None:
        """`due`: the plugins of the config in force that must be loaded; each is called in a tick (answers or
        fails, or rests in quarantine), unless the operator switched it off."""
        uncalled = [name for name in sorted(due) if name not in answered and name not in failed
                    and name not in disabled]
        if uncalled:
            self.fail(CALLED, f"{when}: '{uncalled[0]}', named in the config and due, was not called in the tick "
                              f"(called: {sorted(answered)}, failed: {sorted(failed)})")

    def grant_ends(self, device: str, plugin: str, value: float, safe: float, owner: str, when: str) -> None:
        """`plugin` drove `device` off its safe state and lost its grant for it: `value`, the pin, and `owner`,
        whose word it follows, a tick after the new grant landed."""
        if value != safe and owner == plugin:
            self.fail(GRANT_ENDS, f"{when}: '{device}' at {value:g}, not its safe state {safe:g}, still on the last "
                                  f"word of '{plugin}', which is no longer granted it")

    def switch_replaced(self, name: str, on: bool, called: bool, when: str) -> None:
        """The operator switched the running plugin `name` on (`on`) or off, and its file was replaced: `called`,
        whether it was called in a tick after both."""
        if called != on:
            self.fail(SWITCH_REPLACED, f"{when}: the operator switched '{name}' {'on' if on else 'off'}, and after "
                                       f"its file was replaced it was {'called' if called else 'not called'}")

    def ready(self, ready: bool, plugins: Mapping[str, PluginView], configured: Iterable[str], when: str) -> None:
        missing = [name for name in sorted(configured) if not (name in plugins and plugins[name].live)]
        if ready and missing:
            self.fail(READY, f"{when}: /ready answers ok while '{missing[0]}', named in the config, is "
                             f"{plugins[missing[0]].state if missing[0] in plugins else 'not loaded'}")

    def reload(self, accepted: bool, outcome: str, message: str, before: Mapping[str, PluginView],
               after: Mapping[str, PluginView], settings_kept: bool, configured: Iterable[str],
               expected: Iterable[str], unloadable: Collection[str] = ()) -> None:
        """A SIGHUP after the test wrote a config that check-config `accepted` (exit 0) or refused;
        `expected`: the plugins of the new config whose files are valid, which fit the budget together;
        `unloadable`: plugins running on a version whose file in the folder only loading can refuse (a
        module that is none): a reload that would lose one is refused, though check-config cannot see it."""
        if outcome != "applied":
            if accepted and not unloadable:
                self.fail(CHECK_CONFIG, f"check-config accepted the config, the reload was {outcome}: {message}")
            if before != after or not settings_kept:
                self.fail(REFUSED_RELOAD, f"the reload was {outcome}, yet the plugins went from {_show(before)} "
                                          f"to {_show(after)}" + ("" if settings_kept else " and the settings changed"))
            return
        if not accepted:
            self.fail(CHECK_CONFIG, f"check-config refused the config, the reload applied it: {message}")
        lost = [name for name in sorted(configured) if before.get(name, _GONE).live and not after.get(name, _GONE).live]
        if lost:
            self.fail(RELOAD_KEEPS, f"the reload was applied and '{lost[0]}', named in the config and running "
                                    f"before, is now {after.get(lost[0], _GONE).state}: "
                                    f"{(after.get(lost[0], _GONE).reason or '')[:300]}")
        if accepted:
            refused = [name for name in sorted(expected) if not after.get(name, _GONE).live]
            if refused:
                self.fail(CHECK_CONFIG, f"check-config accepted the config, and after the reload '{refused[0]}' "
                                        f"is {after.get(refused[0], _GONE).state}: "
                                        f"{(after.get(refused[0], _GONE).reason or '')[:300]}")

    def start(self, accepted: bool, started: bool, why: str, plugins: Mapping[str, PluginView],
              expected: Iterable[str]) -> None:
        """A start from a config that check-config `accepted` or refused; `expected`: the plugins it
        names whose files are valid, which fit the budget together."""
        if accepted != started:
            self.fail(CHECK_CONFIG, f"check-config {'accepted' if accepted else 'refused'} the config, "
                                    f"the daemon {'started' if started else 'refused to start'}: {why}")
        refused = [name for name in sorted(expected) if not plugins.get(name, _GONE).live]
        if accepted and started and refused:
            self.fail(CHECK_CONFIG, f"check-config accepted the config, and after the start '{refused[0]}' is "
                                    f"{plugins.get(refused[0], _GONE).state}: "
                                    f"{(plugins.get(refused[0], _GONE).reason or '')[:300]}")

    def install(self, name: str, installed: bool, why: str, valid: bool, folder_kept: bool,
                after: PluginView | None) -> None:
        """`valid`: whether the test made the plugin valid (module, manifest, and its settings in the
        config); `after`: what the daemon made of it (a plugin the config disables is not loaded)."""
        if not installed:
            if not folder_kept:
                self.fail(INSTALL, f"plugin install refused '{name}' ({why}) and yet changed the plugins folder")
            return
        if not valid:
            self.fail(INSTALL, f"plugin install accepted '{name}', whose files are not valid")
        if after is None or not (after.live or after.state == "disabled"):
            self.fail(INSTALL, f"plugin install accepted '{name}', the daemon then "
                               f"{'left it out' if after is None else after.state}: "
                               f"{(after.reason if after else '') or ''}"[:400])


_GONE = PluginView("not in the set", None)


def _show(plugins: Mapping[str, PluginView]) -> str:
    return "{" + ", ".join(f"{name}: {view.state}" for name, view in sorted(plugins.items())) + "}"
