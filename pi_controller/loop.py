"""The scheduler and the tick: fixed rate against absolute deadlines, every step delegated.

Tick k is due at t0 + k * period, so the rate never drifts. A tick that overruns makes the next start
late, or skips the deadlines already past (counted as missed), never piles ticks up. The tick body is
synchronous and runs on the event loop's own thread: handing it to a worker thread cost 110 us a tick
here (a sixth of the whole tick on simulated pins), while nothing else of ours needs the event loop
during the millisecond a tick takes (paho, the watchdog and metrics have threads of their own; reloads
wait for the gap between ticks), and one thread means no plugin instance is ever called from two.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
from operator import methodcaller
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence, TypeVar

import msgspec
import structlog

from pi_controller import arbitration, contract, logs
from pi_controller.clock import Clock
from pi_controller.config import InterlockSettings
from pi_controller.contract import Command, Reading, Rejection
from pi_controller.devices.hardware import Hardware
from pi_controller.devices.sensors import SensorSettings
from pi_controller.logs import ChangeLog, kind_of
from pi_controller.observer import LoopObserver, TickReport, TickTrace, Verdicts
from pi_controller.operator import Operator
from pi_controller.plugins.plugin_set import PluginSet
from pi_controller.plugins.sandbox import PluginCallError, SandboxedPlugin, drain_log
from pi_controller.safety.ownership import Failsafe, Health
from pi_controller.safety.rules import FORCING, Hold, Safety
from pi_controller.stats import PluginStats, TickStats

if TYPE_CHECKING:
    from pi_controller.plugins.shadow import Shadows

T = TypeVar("T")
# libextism's log gets lines of failed calls (taken at once, as their reasons: `SandboxedPlugin`), of plugins
# that import its log functions (drained after every tick's calls while one is loaded), and of hardly
# anything else; a drain costs ~20 us on cold caches, so without such a plugin it is drained every so often,
# and its buffer stays bounded all the same.
DRAIN_EVERY = 64
log = structlog.get_logger("pi_controller.loop")


@contextlib.contextmanager
def collector_between_ticks() -> Iterator[None]:
    """The garbage collector out of the tick: what start-up built lives as long as the loop, so it is
    frozen (never scanned again: a full collection of it took 27 to 44 ms here, far more on a Pi Zero),
    and the collector runs only when `collect_if_due` calls it, in the gap after a tick."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def collect_if_due() -> None:
    """Collect what the automatic collector would have by now (its own thresholds), outside the tick."""
    counts, thresholds = gc.get_count(), gc.get_threshold()
    if counts[0] >= thresholds[0]:
        generation = 2 if counts[2] >= thresholds[2] else 1 if counts[1] >= thresholds[1] else 0
        gc.collect(generation)


class Call(msgspec.Struct):  # a Struct, as the tick's other records: made in C, once per plugin per tick
    """A plugin's call in this tick, before its answer is checked: when it was asked and when it ended (the
    times its verdicts are dated by), and its failure if it gave nothing."""

    plugin: SandboxedPlugin
    now: float
    ended: float = 0.0
    admitted: bool = True
    failure: Exception | None = None


def next_deadline(due: int, elapsed: float, period: float) -> int:
    """The index of the first deadline not yet past once tick `due` ends `elapsed` seconds after t0;
    the deadlines skipped on the way are missed ticks."""
    return max(due + 1, math.ceil(elapsed / period))


class ControlLoop:
    def __init__(self, hardware: Hardware, plugins: PluginSet, safety: Safety, clock: Clock, period: float,
                 observers: Sequence[LoopObserver] = (), operator: Operator | None = None,
                 shadows: Shadows | None = None):
        self.hardware = hardware
        self.plugins = plugins
        self.safety = safety
        self.operator = operator or Operator(expiry_s=3600)
        self.clock = clock
        self.period = period
        self.observers = observers
        # Those that follow plugin calls at all: the others need not be called three times a tick.
        self._call_observers = [o for o in observers if type(o).plugin_called is not LoopObserver.plugin_called]
        self._between: list[Callable[[], None]] = []
        self.ticks = TickStats()
        self.plugin_stats: dict[str, PluginStats] = {}
        self.readings: list[Reading] = []
        self.last_states: dict[str, dict[str, Any]] = hardware.states()
        self.health = Health(self._why_not_called, plugins.granted)
        self.verdicts = Verdicts()
        self.trace: TickTrace | None = None  # the last tick's, for a recorder
        self.shadows = shadows  # run beside the plugins, never applied
        self._problems = ChangeLog(log)

    async def run(self, stop: asyncio.Event, max_ticks: int | None = None) -> None:
        """Tick until `stop` is set or `max_ticks` ticks have run."""
        with collector_between_ticks():
            await self._run(stop, max_ticks)

    async def _run(self, stop: asyncio.Event, max_ticks: int | None) -> None:
        t0 = self.clock.monotonic()
        if self.ticks.first_at is None:
            self.ticks.first_at = t0
        due = 0
        while max_ticks is None or self.ticks.count < max_ticks:
            deadline = t0 + due * self.period
            if not await self.clock.sleep_until(deadline, stop):
                break
            started, work_started = self.clock.monotonic(), self.clock.perf_counter()
            self.tick(self.ticks.count)
            duration = self.clock.perf_counter() - work_started
            next_due = next_deadline(due, self.clock.monotonic() - t0, self.period)
            self._count(TickReport(self.ticks.count, duration, started - deadline, next_due - due - 1))
            due = next_due
            while self._between:
                self._between.pop(0)()
            self.plugins.history.file()  # the tick's readings, filed once its pins are written
            collect_if_due()

    def reconfigure(self, sensors: Iterable[SensorSettings], interlocks: Iterable[InterlockSettings],
                    failsafe_after_s: float) -> None:
        """New safety rules after a reload (call between two ticks): timers and owners carry on for the
        actuators kept."""
        self.safety = Safety(self.hardware.actuators, sensors, interlocks, self.safety, failsafe_after_s)

    def between_ticks(self, work: Callable[[], None]) -> None:
        """Run `work` after the current tick, before the next."""
        self._between.append(work)

    async def in_gap(self, work: Callable[[], T], drop: Callable[[], None]) -> T:
        """`work()` run between two ticks, awaited. Cancelled before it ran (the daemon stopping first),
        `drop()` releases what `work` would have taken over: a prepared plugin set is not left unclosed."""
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()

        def run() -> None:
            if done.cancelled():
                return
            try:
                done.set_result(work())
            except Exception as exc:  # for the awaiting side to handle, not the tick loop
                done.set_exception(exc)

        self.between_ticks(run)
        try:
            return await done
        except asyncio.CancelledError:
            if done.cancelled():
                drop()
            raise

    def _count(self, report: TickReport) -> None:
        self.ticks.count += 1
        self.ticks.durations.add(report.duration)
        self.ticks.jitter.add(report.jitter)
        if report.missed:
            self.ticks.missed += report.missed
            self._problems.problem("overrun", "tick_overrun", tick=report.number, missed=report.missed,
                                   period_ms=self.period * 1000)
        # methodcaller, not a lambda: each observer's tick_done called from C, with no frame of ours between
        self._notify(methodcaller("tick_done", report), report.number)

    def _notify(self, tell: Callable[[LoopObserver], None], number: int,
                observers: Sequence[LoopObserver] | None = None) -> None:
        for observer in self.observers if observers is None else observers:
            try:
                tell(observer)
            except Exception as exc:  # telemetry, metrics and the like must never end the loop
                self._problems.problem(("observer", type(observer).__name__, type(exc).__name__), "observer_failed",
                                       level="error", tick=number, observer=type(observer).__name__,
                                       error=str(exc)[:300])

    def tick(self, number: int) -> None:
        """Read, decide, arbitrate, guard, act: one pass of the control loop."""
        now, monotonic, started = self.clock.time(), self.clock.monotonic(), self.clock.perf_counter()
        self.readings = self.hardware.read(now)
        self._report_sensors(number)
        self.plugins.history.record(self.readings)  # filed after the tick (`_run`)
        states = self.hardware.states()
        context = contract.encode_context(self.readings, self.hardware.states_json(states), now, number,
                                          monotonic=monotonic)
        # Operator overrides come first: arbitration keeps the first command for a device.
        proposals = self.operator.commands(self.hardware.actuators, self.plugins, self.clock.monotonic(), number)
        self.health.begin()
        self.verdicts = Verdicts()
        # The calls back to back (libextism's and the Wasm runtime's code stays in the caches from one to
        # the next), then each answer checked and counted, in the same order.
        with logs.native_stderr or logs.UNHELD:  # one bracket for the calls' writes to fd 2, not one each
            asked = self._ask(self.operator.enabled(self.plugins.members), context, number)
        if self.plugins.logs_to_extism or number % DRAIN_EVERY == 0:
            drain_log()  # what libextism logged during the calls, before their verdicts
        proposals.extend(self._consult(asked, number))
        wanted, conflicts = arbitration.resolve(proposals)
        if conflicts:  # this report and the two below are called only when there is something to report
            self._report_conflicts(conflicts, number)
        decision = self.safety.enforce(wanted, self.readings, now, self.clock.monotonic(), self.health)
        if decision.failsafes:
            self._report_failsafes(decision.failsafes, number)
        if decision.holds:
            self._report_holds(decision.holds, number)
        for device, error in self.hardware.apply(decision.writes, number).items():
            self._problems.problem(("write", device), "actuator_write_failed", level="error", tick=number,
                                   device=device, error=error)
        self.last_states = self.hardware.states()
        self.trace = TickTrace(number, now, monotonic, self.readings, states, proposals, self.verdicts,
                               conflicts, decision, frozenset(self.operator.disabled))
        # After the pins are written: shadows never delay what is applied. Most daemons have none, and most
        # ticks no problem to clear: neither costs the tick a call then.
        if self.shadows is not None and self.shadows.plugins.members:
            self.shadows.consult(self.trace, context, self.hardware.actuators, self.safety, started)
        if self._problems.active:
            self._problems.end_tick(tick=number)

    def _report_sensors(self, number: int) -> None:
        for r in self.readings:
            if r.error is not None:  # not `r.valid`: a property is a Python call, for every reading of every tick
                self._problems.problem(("sensor", r.sensor_id, kind_of(r.error)), "sensor_invalid", tick=number,
                                       sensor=r.sensor_id, error=r.error)

    def _report_conflicts(self, conflicts: list[tuple[Command, Command]], number: int) -> None:
        for winner, loser in conflicts:
            self._problems.problem(("conflict", winner.device_id, winner.plugin, loser.plugin), "command_conflict",
                                   level="info", tick=number, device=winner.device_id, winner=winner.plugin,
                                   loser=loser.plugin)

    def _report_failsafes(self, failsafes: list[Failsafe], number: int) -> None:
        for f in failsafes:  # once each: the actuator has no owner left to fail
            log.warning("actuator_failsafe", tick=number, device=f.device_id, owner=f.owner, why=f.why)
            self._notify(lambda observer: observer.actuator_failsafe(f), number)  # noqa: B023 (called at once)

    def _why_not_called(self, plugin: str) -> str:
        if plugin in self.operator.disabled:
            return "was disabled by the operator"
        status = self.plugins.status.get(plugin)
        if status is None:
            return "was unloaded"
        return f"is {status.state}" + (f": {status.reason[:200]}" if status.reason else "")

    def _report_holds(self, holds: list[Hold], number: int) -> None:
        for h in holds:
            if h.plugin in self.plugin_stats:
                self.plugin_stats[h.plugin].held += 1
            self._problems.problem(("held", h.device_id, h.rule), "command_held", tick=number,
                                   level="warning" if h.rule in FORCING else "info",
                                   device=h.device_id, rule=h.rule, detail=h.detail, plugin=h.plugin)

    def _ask(self, plugins: Iterable[SandboxedPlugin], context: contract.Context, number: int) -> list[Call]:
        """Each plugin's call for this tick, in order, unless it is quarantined (not called until its backoff has
        passed). One frame for them all, as `_consult`: a paced tick pays about a microsecond a Python call."""
        asked = []
        for plugin in plugins:
            now, quarantine = self.clock.monotonic(), plugin.quarantine
            if quarantine.until is not None and not quarantine.admit(now, number):  # asked only while it rests
                asked.append(Call(plugin, now, admitted=False))
                continue
            try:
                plugin.ask(context, self.clock.perf_counter)
            except Exception as exc:  # whatever a call makes us do, it fails only this plugin
                asked.append(Call(plugin, now, self.clock.monotonic(), failure=exc))
            else:
                asked.append(Call(plugin, now, self.clock.monotonic()))
        return asked

    def _consult(self, asked: list[Call], number: int) -> list[Command]:
        """The plugins' commands for this tick, in call order; any failure of a plugin stays with the plugin."""
        proposals: list[Command] = []
        for call in asked:
            plugin, now = call.plugin, call.now
            if not call.admitted:
                self.health.failed(plugin.name, now, f"is quarantined: {plugin.quarantine.reason}")
                self.verdicts.failures[plugin.name] = "quarantined"
                continue
            stats = self.plugin_stats.get(plugin.name) or self.plugin_stats.setdefault(plugin.name, PluginStats())
            stats.calls += 1
            seconds = plugin.last_call_s
            stats.durations.add(seconds)
            try:
                if call.failure is not None:
                    raise call.failure
                commands, rejections = plugin.answer(self.hardware.actuators)
            except Exception as exc:  # whatever a plugin's output makes us do, it fails only this call
                self._failed(plugin, exc, stats, seconds, number, call.ended)
                continue
            self.health.ok(plugin.name, now, commands, rejections, plugin.grant.actuators)
            self.verdicts.answered.append(plugin.name)
            if self._call_observers:  # each told at once (`_notify`): the loop's variables are still this plugin's
                self._notify(lambda observer: observer.plugin_called(plugin.name, seconds, False),  # noqa: B023
                             number, self._call_observers)
            if rejections:
                self._rejected(plugin, rejections, stats, now, number)
            elif plugin.quarantine.probation:  # a clean call is news to its quarantine only then
                plugin.quarantine.record(now, number, 0, "")
            proposals += commands
        return proposals

    def _rejected(self, plugin: SandboxedPlugin, rejections: list[Rejection], stats: PluginStats, now: float,
                  number: int) -> None:
        """Commands of a plugin's answer that the contract or its grant refused: towards its quarantine, counted
        and reported."""
        if plugin.quarantine.record(now, number, len(rejections), rejections[0].reason):
            self.plugins.made_room()  # its share of the tick is free for a plugin waiting for one
        stats.rejected += len(rejections)
        self.verdicts.rejections.extend(rejections)
        for r in rejections:
            self._problems.problem(("rejected", r.plugin, r.device_id, r.rule), "command_rejected",
                                   plugin=r.plugin, tick=number, rule=r.rule, reason=r.reason,
                                   **({"device": r.device_id} if r.device_id is not None else {}))

    def _failed(self, plugin: SandboxedPlugin, exc: Exception, stats: PluginStats, seconds: float,
                number: int, ended: float) -> None:
        """A call that gave no usable output: the plugin's fault (counted, towards quarantine and the
        failsafe), or a stall of the machine's (counted apart; the plugin is neither blamed nor cleared)."""
        kind = PluginCallError.kind_of(exc)
        reset, fault = getattr(exc, "reset", False), getattr(exc, "plugin_s_fault", True)
        stats.resets += reset
        self.verdicts.failures[plugin.name] = kind
        self._notify(lambda observer: observer.plugin_called(plugin.name, seconds, fault), number, self._call_observers)
        if not fault:
            stats.stalls += 1
            self.health.stalled(plugin.name)
            self._problems.problem(("stall", plugin.name), "plugin_call_stalled", level="warning", plugin=plugin.name,
                                   tick=number, reason=str(exc)[:300], state_reset=reset)
            return
        stats.errors += 1
        self._problems.problem(("error", plugin.name, kind), "plugin_call_failed", level="error", plugin=plugin.name,
                               tick=number, kind=kind, reason=str(exc)[:300], state_reset=reset)
        if plugin.quarantine.record(ended, number, 1, f"{kind}: {str(exc)[:300]}"):
            self.plugins.made_room()
        self.health.failed(plugin.name, ended, f"has failed every call since ({kind})")

    def summary(self) -> dict[str, Any]:
        return {"ticks": self.ticks.summary(),
                "plugins": {name: s.summary() for name, s in self.plugin_stats.items()},
                "held": {key: dict(rules) for key, rules in self.safety.held.items() if rules},
                "failsafes": dict(self.safety.failsafes),
                "owners": {key: guard.plugin for key, guard in self.safety.guards.items()}}
