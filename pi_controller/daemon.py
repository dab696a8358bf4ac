"""The composition root: builds hardware, plugins and the loop from settings, runs them, and puts
every actuator in its safe state on every way out."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import structlog

from pi_controller.clock import Clock, SystemClock
from pi_controller.config import Settings
from pi_controller.hardware import Hardware
from pi_controller.loop import ControlLoop
from pi_controller.pins import make_factory
from pi_controller.plugins import PluginSet
from pi_controller.safety import Safety, Watchdog

log = structlog.get_logger("pi_controller.daemon")


class Daemon:
    def __init__(self, settings: Settings, *, simulate: bool = False, plugins_dir: Path | None = None,
                 clock: Clock | None = None):
        self.settings = settings
        self.clock = clock or SystemClock()
        factory = make_factory(settings, simulate)
        world = None
        if simulate and settings.simulation:
            from pi_controller.simulators.world import World

            world = World(settings, factory)
        try:
            self.hardware = Hardware.build(settings, factory, self.clock)
        except BaseException:
            if world is not None:
                world.close()
            raise
        self.hardware.environment = world
        self.hardware.settle("startup", "starting")
        self.plugins = PluginSet(settings.plugins, plugins_dir or settings.plugins_directory(),
                                 settings.loop.plugin_budget_ms)
        try:
            self.plugins.load_all()
        except BaseException:
            self.close()
            raise
        safety = Safety(self.hardware.actuators, settings.sensors, settings.interlocks)
        self.watchdog = (Watchdog(self.hardware, settings.watchdog.timeout_s, self.clock.perf_counter)
                         if settings.watchdog.enabled else None)
        self.loop = ControlLoop(self.hardware, self.plugins, safety, self.clock, settings.loop.period,
                                [self.watchdog] if self.watchdog else [])

    async def serve(self, max_ticks: int | None = None) -> None:
        """Run the loop until SIGINT/SIGTERM or `max_ticks`; actuators end in their safe state."""
        stop = asyncio.Event()
        running = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            running.add_signal_handler(sig, stop.set)
        log.info("loop_started", rate_hz=self.settings.loop.rate_hz, plugins=len(self.plugins),
                 sensors=len(self.hardware.sensors), actuators=len(self.hardware.actuators))
        if self.watchdog:
            self.watchdog.start()
        try:
            await self.loop.run(stop, max_ticks)
        finally:
            if self.watchdog:
                self.watchdog.stop()
            log.info("loop_stopped", ticks=self.loop.ticks.count, missed=self.loop.ticks.missed)
            self.hardware.settle("shutdown", "stopping")
            for sig in (signal.SIGINT, signal.SIGTERM):  # only now: a second Ctrl-C must not cut this short
                running.remove_signal_handler(sig)

    def snapshot(self) -> dict[str, Any]:
        """Last readings, actuator states as the last tick left them, plugin and tick stats."""
        summary = self.loop.summary()
        plugins: dict[str, Any] = {}
        for name, status in self.plugins.status.items():
            entry: dict[str, Any] = {"state": status.state}
            if status.reason:
                entry["reason"] = status.reason
            plugins[name] = entry | summary["plugins"].get(name, {})
        return {
            "sensors": {r.sensor_id: r.as_json() for r in self.loop.readings},
            "actuators": self.loop.last_states,
            "plugins": plugins,
            "ticks": summary["ticks"],
            "safety": {"held": summary["held"], "watchdog_trips": self.watchdog.trips if self.watchdog else 0},
        }

    def close(self) -> None:
        self.plugins.close()
        self.hardware.close()
