"""The composition root: builds hardware, plugins and the loop from settings and wires them, runs them,
reloads them, and puts every actuator in its shut-down state on every way out. What the daemon looks
like from outside is its `Status`."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import platform
import signal
from pathlib import Path
from typing import Any

import structlog

from pi_controller import __version__, config
from pi_controller.clock import Clock, SystemClock
from pi_controller.config import Settings
from pi_controller.devices.hardware import Environment, Hardware
from pi_controller.devices.pins import factory_kind, make_factory
from pi_controller.fleet.node import FleetNode
from pi_controller.loop import ControlLoop
from pi_controller.metrics import Metrics, MetricsServer
from pi_controller.mqtt.telemetry import Telemetry
from pi_controller.operator import Operator
from pi_controller.operator_values import OperatorValues
from pi_controller.plugins import checks
from pi_controller.plugins.extism_adapter import runtime_version
from pi_controller.plugins.host_functions import History
from pi_controller.plugins.manifest import Devices
from pi_controller.plugins.plugin_set import PluginSet
from pi_controller.plugins.shadow import Shadows, promote
from pi_controller.plugins.shadow_supervisor import ShadowSupervisor
from pi_controller.plugins.watch import PluginWatcher
from pi_controller.reloads import ReloadResult, Reloads, prepared
from pi_controller.safety import known_good
from pi_controller.safety.rules import Safety
from pi_controller.safety.watchdog import Watchdog
from pi_controller.sim import record
from pi_controller.sim.record import Recorder
from pi_controller.status import STATUS_CHARS, Status
from pi_controller.systemd import Notifier

log = structlog.get_logger("pi_controller.daemon")

# What a reload cannot change under a running loop: the rate, the pin factory, the simulated world,
# and the threads and sockets set up at start.
_RESTART_ONLY = ("loop", "pins", "simulation", "watchdog", "metrics", "mqtt", "record")


class Daemon:
    def __init__(self, settings: Settings, *, simulate: bool = False, plugins_dir: Path | None = None,
                 clock: Clock | None = None, state_dir: Path | None = None, record: Path | None = None):
        """`record`: a recording of every tick (overrides record.path)."""
        self.settings = settings
        self.simulate = simulate
        self.plugins_dir = plugins_dir
        self.state_dir = state_dir  # the config it runs with, for safe-state; the operator's kept values
        self.clock = clock or SystemClock()
        self.recorder: Recorder | None = None
        self._record_to = record
        self._watcher: asyncio.Task[None] | None = None
        self._say_starting()
        self.hardware = self._build_hardware()
        self.hardware.settle("startup", "starting")
        try:
            self._build_rest(settings)
        except BaseException:  # pins are claimed: leave them in their shut-down states
            self.hardware.close()
            raise

    def _say_starting(self) -> None:
        """The first event of a run, before any pin moves: what runs, from where, on what."""
        log.info("daemon_starting", version=__version__, config=str(self.settings.source),
                 plugins=str(self._plugins_directory(self.settings)),
                 pins=factory_kind(self.settings.pins, self.simulate),
                 runtime=f"libextism {runtime_version()}", python=platform.python_version(),
                 machine=platform.machine(), pid=os.getpid())

    def _build_rest(self, settings: Settings) -> None:
        self.plugins = self._load_plugins(settings)
        safety = Safety(self.hardware.actuators, settings.sensors, settings.interlocks,
                        failsafe_after_s=settings.safety.failsafe_after_s)
        self.watchdog = (Watchdog(self.hardware, settings.watchdog.timeout_s, self.clock.perf_counter)
                         if settings.watchdog.enabled else None)
        self.values = OperatorValues(self.state_dir, self.clock.monotonic)
        self.operator = Operator(settings.mqtt.override_expiry_s, self.clock.time, self.values, self._promote)
        self.values.apply(self.plugins, settings.plugins, self.operator.disabled, self.plugins.directory,
                          self.plugins.listed)
        self.status = Status(settings, self.plugins, self.operator, self.watchdog, self.clock.monotonic)
        # Time from the one clock; only the watchdog keeps a real timer, since it must catch a stuck loop.
        self.notifier = Notifier(self.status.line, timer=self.clock.monotonic)
        self.metrics = Metrics(settings.loop.period, self.status, self.clock.monotonic) \
            if settings.metrics.enabled else None
        fleet = FleetNode(settings, self.status, self.state_dir) if settings.mqtt.enabled and settings.mqtt.fleet \
            else None
        self.status.rollout_of = fleet.shown if fleet is not None else None
        self.telemetry = Telemetry(settings, self.status, self.operator, self.clock.monotonic, self.clock.time,
                                   fleet, self.state_dir) if settings.mqtt.enabled else None
        self.recorder = self._recorder(settings)
        # /ready, then READY=1; an operator's value on disk before Home Assistant is shown it
        observers = [o for o in (self.watchdog, self.metrics, self.notifier, self.values, self.telemetry,
                                 self.recorder) if o is not None]
        self.shadows = ShadowSupervisor(settings.plugins, self.plugins, self.clock, self._shadows_adopted)
        self.loop = ControlLoop(self.hardware, self.plugins, safety, self.clock, settings.loop.period, observers,
                                self.operator, self.shadows.current)
        self.status.wire(self.loop, self.telemetry, self.shadows.current, self.recorder)

    def _shadows_adopted(self, shadows: Shadows) -> None:
        """Between two ticks: a shadow's agreement has an entity while it runs."""
        self.loop.shadows = self.status.shadows = shadows
        if self.telemetry is not None:
            self.telemetry.policy.rediscover()

    def _promote(self, name: str) -> str | None:
        """From the tick: make the running shadow of `name` live, or say why not. The files move on a
        thread; the watcher then swaps the new version in, as for any file dropped in."""
        if name not in {p.name for p in self.shadows.current.plugins}:
            return f"no shadow plugin '{name[:64]}' runs beside it"
        rollout = self.status.rollout_of(name) if self.status.rollout_of is not None else None
        if rollout is not None and rollout["in_progress"]:  # it keeps the running version's files first
            return f"a fleet rollout of version {rollout['version']} is under way: it promotes its shadow itself"
        if not self.settings.plugins.watch:
            return "plugins.watch is off: the promoted file would not be loaded until a reload"
        moved = asyncio.get_running_loop().run_in_executor(None, promote, self.plugins.directory, name)
        moved.add_done_callback(lambda done: done.exception() and log.error(
            "plugin_promotion_failed", plugin=name, error=str(done.exception())))
        return None

    def _recorder(self, settings: Settings) -> Recorder | None:
        path = self._record_to or (settings.source.parent / settings.record.path if settings.record.path else None)
        if path is None:
            return None
        first = record.header(settings, self._live(), self.clock.time())
        return Recorder(settings.record, path, lambda: self.loop.trace, first)

    def _live(self) -> dict[str, str]:
        return {p.name: p.sha256 for p in self.plugins}

    def _plugins_changed(self) -> None:
        """Between two ticks, after a reload or a plugin swapped in or out: Home Assistant's entities
        follow the plugin set, the operator's kept values apply to the plugins as loaded now, the shadows get
        what the live plugins leave of the tick, and a recording
        says from which tick on which plugins and config were live."""
        self.values.apply(self.plugins, self.settings.plugins, self.operator.disabled, self.plugins.directory,
                          self.plugins.listed)
        self.shadows.live_changed()
        if self.telemetry is not None:
            self.telemetry.policy.rediscover()
        if self.recorder is not None:
            self.recorder.reheader(record.header(self.settings, self._live(), self.clock.time(),
                                                 self.loop.ticks.count, "reload"))

    def _build_hardware(self) -> Hardware:
        factory = make_factory(self.settings.pins, self.settings.sensors, self.simulate)
        world = self._world(factory)
        try:
            hardware = Hardware.build(self.settings.actuators, self.settings.sensors, factory, self.clock)
        except BaseException:
            if world is not None:
                world.close()
            raise
        hardware.environment = world
        return hardware

    def _world(self, factory: Any) -> Environment | None:
        if not (self.simulate and self.settings.simulation):
            return None
        from pi_controller.simulators.world import World

        return World(self.settings.sensors, self.settings.actuators, self.settings.simulation, factory)

    def _plugins_directory(self, settings: Settings) -> Path:
        return self.plugins_dir or settings.plugins_directory()

    def _load_plugins(self, settings: Settings, history: History | None = None) -> PluginSet:
        plugins = PluginSet(settings.plugins, self._plugins_directory(settings), settings.loop.plugin_budget_ms,
                            history, self.clock, devices=Devices.of(settings))
        try:
            plugins.load_all()
        except BaseException:
            plugins.close()
            raise
        return plugins

    async def serve(self, max_ticks: int | None = None) -> None:
        """Run the loop until SIGINT/SIGTERM or `max_ticks`; actuators end in their shut-down state.
        SIGHUP reloads the config between two ticks."""
        stop = asyncio.Event()
        running = asyncio.get_running_loop()
        reloads = Reloads(self._reload_and_report)
        handlers = {signal.SIGINT: stop.set, signal.SIGTERM: stop.set, signal.SIGHUP: reloads.request}
        for sig, handler in handlers.items():
            running.add_signal_handler(sig, handler)
        server = self._metrics_server()
        plugins = self.plugins.readiness()
        log.info("loop_started", rate_hz=self.settings.loop.rate_hz, plugins=len(self.plugins),
                 sensors=len(self.hardware.sensors), actuators=len(self.hardware.actuators),
                 **({} if plugins.complete else {"plugins_failed": list(plugins.failed), "ready": str(plugins)}))
        if self.telemetry:
            self.telemetry.start()
        self._watch_plugins()
        self.shadows.start(self.loop)
        try:
            # Off the event loop (signals and the watcher run meanwhile), but before the first tick: after a crash
            # in the first ticks, safe-state drives what they drove, not what an earlier config named.
            await asyncio.to_thread(known_good.keep, self.settings, self.state_dir)
            await asyncio.to_thread(known_good.keep_running_loop, self.settings.loop, self.state_dir)
            if self.watchdog:  # its time runs from the first tick, not from the start-up steps above
                self.watchdog.start()
            await self.loop.run(stop, max_ticks)
        finally:
            self._stop_watching()
            self.shadows.stop()
            self.notifier.stopping()
            if self.watchdog:
                self.watchdog.stop()
            log.info("loop_stopped", ticks=self.loop.ticks.count, missed=self.loop.ticks.missed)
            self.hardware.settle("shutdown", "stopping")
            steps = ([self.values.close] + ([self.telemetry.stop] if self.telemetry else [])
                     + ([server.close] if server else []))
            for step in steps:
                try:
                    step()
                except Exception:  # the pins are settled; what is left must not hide why we stopped
                    log.exception("shutdown_step_failed", step=step.__qualname__)
            for sig in handlers:  # only now: a second Ctrl-C must not cut the shut-down short
                running.remove_signal_handler(sig)

    def _watch_plugins(self) -> None:
        """Hot reload of the plugins folder (`plugins.watch`), beside the ticks on the event loop."""
        if self.settings.plugins.watch:
            self._watcher = asyncio.create_task(
                PluginWatcher(self.plugins, self.loop, self._plugins_changed, self.shadows.folder_changed).run(),
                name="plugin-watch")

    def _stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    def _metrics_server(self) -> MetricsServer | None:
        if self.metrics is None:
            return None
        server = MetricsServer(self.metrics, self.settings.metrics.host, self.settings.metrics.port)
        server.start()
        return server

    async def _reload_and_report(self) -> None:
        """One coalesced SIGHUP: the reload inside systemd's notify-reload protocol, its result kept for
        the status line and counted."""
        self.notifier.reloading()
        try:
            result = await self.reload()
        except Exception as exc:  # a bug of ours: say so, and never leave systemd waiting for READY=1
            log.exception("reload_failed", file=str(self.settings.source))
            result = ReloadResult("failed", f"reload failed, running config kept: {type(exc).__name__}: {exc}")
        self.status.last_reload = result
        if self.metrics:
            self.metrics.reloaded(result.outcome)
        self.notifier.reloaded(result.message[:STATUS_CHARS])

    async def reload(self) -> ReloadResult:
        """Re-read the config file (SIGHUP); apply it between two ticks if valid, else keep the old one.

        Reading the file and compiling the plugins (up to seconds, cold, on a Pi) happen on a thread;
        only the swap waits for the gap between two ticks, so the loop and the watchdog never wait."""
        try:
            read, new, foreseen = await asyncio.to_thread(self._read_config)
        except config.ConfigError as exc:
            log.error("reload_refused", file=exc.file, line=exc.line, key=config.format_path(exc.path),
                      problem=exc.message, note="kept the running config and plugins")
            return ReloadResult("refused", f"reload refused, running config kept: {exc}")
        for section in _RESTART_ONLY:
            if getattr(read, section) != getattr(self.settings, section):
                log.warning("reload_needs_restart", section=section, note="kept the running value")
        # The sensor history goes on, unless its length changed.
        history = self.plugins.history if self.plugins.history.length == new.plugins.host.history_length else None
        try:
            plugins = await prepared(lambda: self._load_plugins(new, history), PluginSet.close)  # no pin changed
        except Exception as exc:
            log.exception("reload_failed", file=str(new.source))
            return ReloadResult("failed", f"reload failed, running config kept: {type(exc).__name__}: {exc}")
        # What the checks could not see (a compile, a health check, a pinned sha256): the running version stays.
        # What they saw check-config said too (a dropped-in plugin past the budget): the reload goes ahead.
        lost = {name: why for name, why in self.plugins.lost_to(plugins).items() if name not in foreseen}
        if lost:
            plugins.close()
            name, reason = next(iter(lost.items()))
            log.error("reload_refused", file=str(new.source), plugin=name, problem=reason,
                      note="kept the running config and plugins")
            return ReloadResult("refused", f"reload refused, running config kept: plugin '{name}' would not load "
                                           f"under it: {reason}")
        try:
            shadows = await self.shadows.prepare(new.plugins, plugins)
        except asyncio.CancelledError:
            plugins.close()
            raise

        def drop() -> None:  # the stop came first: what was prepared is never swapped in
            plugins.close()
            if shadows is not None:
                shadows.close()

        result = await self.loop.in_gap(lambda: self._apply(new, plugins, shadows), drop)
        if result.outcome == "applied":
            await asyncio.to_thread(known_good.keep, new, self.state_dir)
        return result

    def _read_config(self) -> tuple[Settings, Settings, dict[str, checks.Problem]]:
        """On a worker thread (reading the file and every module of the folder took 20 ms here, more on a Pi, and
        the loop ticks on the event loop's thread): the file as read, as it applies now (the sections that need a
        restart kept), and the plugins it would not load; ConfigError for a config check-config refuses."""
        read = config.load(self.settings.source)
        new = dataclasses.replace(read, **{section: getattr(self.settings, section) for section in _RESTART_ONLY})
        folder = config.check_plugins_directory(new, self.plugins_dir)
        foreseen = checks.problems(new, folder)  # the plugins it would not load, each for a reason of its own
        checks.check_reload(read, new.loop, folder, foreseen)  # as check-config beside this daemon does
        if read.loop != new.loop:  # and as the next start will, on the file's loop: check-config's verdict too
            checks.check(read, folder)
        return read, new, foreseen

    def _apply(self, new: Settings, plugins: PluginSet, shadows: Shadows | None) -> ReloadResult:
        try:
            self._swap(new, plugins, shadows)
        except Exception as exc:  # a reload must never end the loop: it carries on with what is in place
            log.exception("reload_failed", file=str(new.source))
            return ReloadResult("failed", f"reload failed while applied: {type(exc).__name__}: {exc}")
        return ReloadResult("applied", f"config reloaded: {self.plugins.readiness()}")

    def _swap(self, new: Settings, plugins: PluginSet, shadows: Shadows | None) -> None:
        failed = self.hardware.reconfigure(new.actuators, new.sensors, self.clock)
        for device, error in failed.items():
            log.error("reload_device_failed", device=device, error=error)
        watching = (self.plugins.directory, self.settings.plugins.watch)
        self.plugins.adopt(plugins)
        self.loop.reconfigure(new.sensors, new.interlocks, new.safety.failsafe_after_s)
        self.settings = self.status.settings = new
        if watching != (self.plugins.directory, new.plugins.watch):  # follow the folder the plugins now come from
            self._stop_watching()
            self._watch_plugins()
        self.shadows.reload(new.plugins, shadows)
        self._plugins_changed()
        log.info("config_reloaded", file=str(new.source), sensors=len(self.hardware.sensors),
                 actuators=len(self.hardware.actuators), plugins=len(self.plugins))

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
        self.shadows.close()
        self.plugins.close()
        self.hardware.close()
        self.notifier.close()
