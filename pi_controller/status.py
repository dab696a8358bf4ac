"""What a running daemon looks like from outside: what telemetry, metrics, systemd and the CLI read.

The daemon builds one `Status` over the parts it wires (the loop, the plugin set, the operator, the
watchdog) and tells it of a reload. Metrics read it when scraped, on the server's thread: each answer
is a copy made in one step (the loop replaces these objects whole, or adds keys to the counters,
between and during ticks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

from pi_controller import __version__
from pi_controller.config import Settings
from pi_controller.plugins.manifest import Climate
from pi_controller.plugins.plugin_config import Schema
from pi_controller.readiness import Readiness
from pi_controller.stats import PluginStats

if TYPE_CHECKING:
    from pi_controller.contract import Reading
    from pi_controller.loop import ControlLoop
    from pi_controller.operator import Operator
    from pi_controller.plugins.plugin_set import PluginSet
    from pi_controller.plugins.sandbox import PluginStatus
    from pi_controller.plugins.shadow import Shadows
    from pi_controller.reloads import ReloadResult
    from pi_controller.safety.rules import Guard, Hold
    from pi_controller.safety.watchdog import Watchdog
    from pi_controller.sim.record import Recorder

_NEVER_CALLED = PluginStats()
STATUS_CHARS = 400  # systemctl status shows one line of it
RATE_WINDOW_S = 1.0  # the tick rate is told once it is measured over this long at least


class Summarised(Protocol):
    """A part whose state the status reports as it tells it (telemetry: the broker link, what is queued)."""

    def summary(self) -> dict[str, Any]: ...


class Status:
    def __init__(self, settings: Settings, plugins: PluginSet, operator: Operator, watchdog: Watchdog | None,
                 monotonic: Callable[[], float]):
        self.settings = settings  # the running config: replaced by a reload
        self.plugins = plugins
        self.operator = operator
        self.watchdog = watchdog
        self.loop: ControlLoop | None = None  # wired once the loop is built (it needs our readers first)
        self.telemetry: Summarised | None = None
        self.shadows: Shadows | None = None
        self.recorder: Recorder | None = None
        self.rollout_of: Callable[[str], dict[str, Any] | None] | None = None  # a fleet rollout of a plugin, shown
        self.last_reload: ReloadResult | None = None
        self._monotonic = monotonic
        self._started = monotonic()

    def wire(self, loop: ControlLoop, telemetry: Summarised | None, shadows: Shadows,
             recorder: Recorder | None) -> None:
        """The parts built after us, since they read us; the uptime counts from now."""
        self.loop, self.telemetry, self.shadows, self._started = loop, telemetry, shadows, self._monotonic()
        self.recorder = recorder

    def _loop(self) -> ControlLoop:
        assert self.loop is not None, "read before the daemon wired its loop"
        return self.loop

    # -- for telemetry, every tick ---------------------------------------------------------------

    def readings(self) -> list[Reading]:
        return self._loop().readings

    def actuator_states(self) -> Mapping[str, dict[str, Any]]:
        """As the last tick left them."""
        return self._loop().last_states

    def guards(self) -> Mapping[str, Guard]:
        """Each actuator's owner and why it was last put in its safe state."""
        return self._loop().safety.guards

    def holds(self) -> list[Hold]:
        """What the safety rules held back in the last tick."""
        trace = self._loop().trace
        return trace.decision.holds if trace is not None else []

    def settled_states(self) -> Mapping[str, dict[str, Any]]:
        """As the pins are now (after a shut-down: the shut-down states)."""
        return self._loop().hardware.states()

    def values_written(self) -> bool:
        """Whether every value an operator set is on disk (operator_values.py)."""
        return self.operator.values is None or self.operator.values.written()

    def plugin_states(self) -> dict[str, dict[str, Any]]:
        """Each plugin's state: loaded, quarantined, disabled (by its manifest or the operator) or failed
        (with why), its counts, the config it runs
        with (for its Home Assistant config entities) and, with a shadow, how far they agree."""
        configs = {p.name: p.config for p in self.plugins}
        states = {}
        for name, status in self.plugins.status.items():
            stats = self._loop().plugin_stats.get(name) or _NEVER_CALLED  # counters only: this runs every tick
            enabled = name not in self.operator.disabled
            states[name] = {"state": status.state if enabled or status.state == "failed" else "disabled",
                            "reason": status.reason if enabled else "disabled by the operator",
                            "enabled": enabled, "calls": stats.calls,
                            "errors": stats.errors, "rejected": stats.rejected, "held": stats.held,
                            "config": configs.get(name, {}), "version": status.version, "sha256": status.sha256,
                            "candidate": self._candidate(name),
                            "rollout": self.rollout_of(name) if self.rollout_of is not None else None}
            shadow = self.shadows.agreement_of(name) if self.shadows else None
            if shadow is not None:
                states[name]["shadow"] = shadow
        return states

    def _candidate(self, name: str) -> dict[str, Any] | None:
        """The version and hash of the shadow plugin of `name`, if one runs another file: what promoting
        it installs."""
        status = self.shadows.plugins.status.get(name) if self.shadows else None
        if status is None or status.state != "loaded" or status.sha256 == self.plugins.status[name].sha256:
            return None
        return {"version": status.version, "sha256": status.sha256}

    def loop_state(self) -> dict[str, Any] | None:
        """Tick statistics, and the daemon's health for Home Assistant's diagnostic entities. None until
        the rate is measured, over a second of ticks at least (one tick 17 ms after start-up is no rate
        of 59 Hz)."""
        stats, now = self._loop().ticks, self._monotonic()
        first = stats.first_at
        if first is None or now - first < RATE_WINDOW_S or stats.count < 2:
            return None
        ticks, elapsed = stats.summary(), now - self._started
        return {"rate_hz": round((ticks["count"] - 1) / (now - first), 2), "ticks": ticks["count"],
                "missed": ticks["missed"], "duration_median_ms": ticks["duration_median_us"] / 1000,
                "duration_p99_ms": ticks["duration_p99_us"] / 1000,
                "start_jitter_p99_ms": ticks["start_jitter_p99_us"] / 1000,
                "uptime_s": round(elapsed), "version": __version__, "watchdog_trips": self.watchdog_trips(),
                "failsafes": sum(self._loop().safety.failsafes.values()),
                "safety_holds": sum(self.safety_holds().values()),
                "last_reload": self.last_reload.outcome if self.last_reload else "none",
                "last_reload_message": self.last_reload.message if self.last_reload else None}

    def config_schemas(self) -> dict[str, Schema | None]:
        """Each plugin of the folder by name, with its config schema (None: none, or not loaded)."""
        schemas = {p.name: p.grant.config_schema for p in self.plugins}
        return {name: schemas.get(name) for name in self.plugins.status}

    def thermostats(self) -> dict[str, Climate]:
        """The loaded plugins whose manifest declares a thermostat role, resolved against their config, whose
        thermometer and heater are configured (the climate entity reads both)."""
        resolved = {p.name: p.grant.manifest.thermostat.resolve(p.config, p.grant.config_schema)
                    for p in self.plugins if p.grant.manifest.thermostat is not None}
        sensors, actuators = {s.id for s in self.settings.sensors}, {a.id for a in self.settings.actuators}
        return {name: climate for name, climate in resolved.items()
                if climate is not None and climate.sensor in sensors and climate.heater in actuators}

    def shadowed(self) -> list[str]:
        """The plugins of the folder a shadow plugin runs beside (one whose plugin is gone has no state to
        show its agreement in)."""
        return sorted(p.name for p in self.shadows.plugins if p.name in self.plugins.status) if self.shadows else []

    # -- for metrics (`metrics.Source`), at scrape time -------------------------------------------

    def plugin_statuses(self) -> Mapping[str, PluginStatus]:
        return self.plugins.status

    def readiness(self) -> Readiness:
        return self.plugins.readiness()

    def actuator_ids(self) -> list[str]:
        return [a.id for a in self.settings.actuators]

    def sensor_validity(self) -> Mapping[str, bool]:
        configured = dict.fromkeys((s.id for s in self.settings.sensors), False)  # invalid until read
        return configured | {r.sensor_id: r.valid for r in self._loop().readings}

    def safety_holds(self) -> Mapping[str, int]:
        return {device: sum(dict(rules).values()) for device, rules in list(self._loop().safety.held.items())}

    def watchdog_trips(self) -> int:
        return self.watchdog.trips if self.watchdog else 0

    def shadow_agreement(self) -> Mapping[tuple[str, str], tuple[int, int]]:
        return self.shadows.agreement() if self.shadows else {}

    def recording(self) -> tuple[bool, int] | None:
        if self.recorder is None:
            return None
        return self.recorder.error is None, self.recorder.dropped

    def mqtt_link(self) -> tuple[bool, int, int] | None:
        if self.telemetry is None:
            return None
        summary = self.telemetry.summary()
        return summary["connected"], summary["connect_failures"], summary["commands_rate_limited"]

    # -- for systemd and the CLI -------------------------------------------------------------------

    def line(self) -> str:
        """systemd's one-line STATUS=."""
        ticks = self._loop().ticks
        status = (f"{self.settings.loop.rate_hz:g} Hz, {ticks.count} ticks, {ticks.missed} missed, "
                  f"{self.plugins.readiness()}")
        if self.last_reload is not None and self.last_reload.outcome != "applied":  # until one is applied
            status += f"; last {self.last_reload.message}"
        return status[:STATUS_CHARS]

    def _recording(self) -> dict[str, Any]:
        r = self.recorder
        assert r is not None
        return {"file": str(r.path), "writing": r.error is None, "lines": r.lines, "dropped": r.dropped,
                "error": r.error}

    def snapshot(self) -> dict[str, Any]:
        """Last readings, actuator states as the last tick left them, plugin and tick stats."""
        summary = self._loop().summary()
        plugins: dict[str, Any] = {}
        for name, status in self.plugins.status.items():
            entry: dict[str, Any] = {"state": status.state}
            if status.reason:
                entry["reason"] = status.reason
            plugins[name] = entry | summary["plugins"].get(name, {})
        return {
            "sensors": {r.sensor_id: r.as_json() for r in self._loop().readings},
            "actuators": self._loop().last_states,
            "plugins": plugins,
            "ticks": summary["ticks"],
            "safety": {"held": summary["held"], "failsafes": summary["failsafes"], "owners": summary["owners"],
                       "watchdog_trips": self.watchdog_trips()},
        } | ({"telemetry": self.telemetry.summary()} if self.telemetry else {}) | (
            {"recording": self._recording()} if self.recorder else {}) | (
            {"shadows": self.shadows.snapshot()} if self.shadows and self.shadows.plugins.status else {})
