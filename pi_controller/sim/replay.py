"""`pi-controller replay`: a recording's readings and device states fed to plugins again, on a virtual
clock and as fast as they run, their commands validated and passed through the safety rules, and
compared with what was recorded, per plugin and per actuator.

The plugins see what the recorded ones saw (the recorded device states, not those their own commands
would have made), so a difference shows where a plugin decides otherwise, tick by tick, and never
snowballs. The safety rules run on mock actuators driven by the replayed commands: what would have
been held or failed safe, and where the applied commands differ from the recorded ones. Plugins start
fresh at `--from`, as after a restart.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import structlog

from pi_controller import arbitration, config
from pi_controller.clock import VirtualClock
from pi_controller.contract import Command, Context, Reading, Rejection, encode_context, encode_states
from pi_controller.devices import actuators
from pi_controller.devices.hardware import Hardware
from pi_controller.names import OPERATOR
from pi_controller.plugins.agreement import Agreement, Verdict, verdict, verdict_of
from pi_controller.plugins.manifest import Devices
from pi_controller.plugins.plugin_set import PluginSet
from pi_controller.plugins.sandbox import PluginCallError, SandboxedPlugin
from pi_controller.safety.ownership import Health
from pi_controller.safety.rules import Hold, Safety
from pi_controller.sim import record
from pi_controller.sim.record import Reader, RecordingError

log = structlog.get_logger("pi_controller.replay")


class Replay:
    """The plugins of a folder and the safety rules of a config, fed one recorded tick after another."""

    def __init__(self, settings: config.Settings, plugins_dir: Path, start: float, picture: Picture | None = None):
        """`picture`: takes each tick's recorded and replayed actuator states, for `--plot`."""
        from pi_controller.devices.mock_pins import mock_factory  # gpiozero: only when a replay runs, not check-config

        self.settings = settings
        self.plugins_dir = plugins_dir
        self.clock = VirtualClock(start)
        factory = mock_factory(settings.sensors)
        self.hardware = Hardware([], [actuators.build(a, factory) for a in settings.actuators], factory)
        self.plugins = self._load(settings)
        self.safety = Safety(self.hardware.actuators, settings.sensors, settings.interlocks,
                             failsafe_after_s=settings.safety.failsafe_after_s)
        self.health = Health(lambda plugin: "was not called",
                             lambda plugin, device: self.plugins.granted(plugin, device))  # replaced on a restart
        self.compared: dict[str, Agreement] = {p.name: Agreement("recorded", "replayed") for p in self.plugins}
        self.segments: list[dict[str, Any]] = []  # from which tick which plugins were live, as recorded
        self.not_recorded: Counter[str] = Counter()  # ticks a plugin was not called in the recording
        self.applied = Agreement("recorded", "replayed")
        self.ticks = 0
        self.states: dict[str, Any] = {}
        self.picture = picture
        self.events: Counter[str] = Counter()  # this tick's replayed errors and rejections, for the picture
        if picture is not None:
            picture.start(settings, [p.name for p in self.plugins])

    def _load(self, settings: config.Settings) -> PluginSet:
        plugins = PluginSet(settings.plugins, self.plugins_dir, settings.loop.plugin_budget_ms, clock=self.clock,
                            devices=Devices.of(settings))
        plugins.load_all()
        return plugins

    def restart(self, header: dict[str, Any], line: dict[str, Any], settings: config.Settings | None) -> None:
        """A header line: from `line` on, the recording ran under it (a reload, or a new run). With
        `settings` (the recorded config, when no other was given), the plugins restart fresh under them
        and the safety rules follow them, as the daemon's did."""
        self.segments.append({"tick": line["n"], "time": line["t"], "reason": header.get("reason", "start"),
                              "plugins": header.get("plugins", {})})
        if settings is None or not self.segments[:-1]:
            return
        self.plugins.close()
        self.settings, self.plugins = settings, self._load(settings)
        for plugin in self.plugins:
            self.compared.setdefault(plugin.name, Agreement("recorded", "replayed"))
        self.safety = Safety(self.hardware.actuators, settings.sensors, settings.interlocks, self.safety,
                             settings.safety.failsafe_after_s)

    def feed(self, line: dict[str, Any], units: dict[str, str]) -> None:
        """One recorded tick: the plugins called on its context, compared, arbitrated and guarded."""
        number, now = line["n"], line["t"]
        self.clock.advance(max(0.0, line.get("m", 0.0) - self.clock.monotonic()))
        readings = record.readings(line, units, now)
        self.states.update(line.get("s", {}))
        self.plugins.history.record(readings)
        context = encode_context(readings, encode_states(self.states), now, number, monotonic=self.clock.monotonic())
        proposals = [Command(device, action, target, OPERATOR, 0) for device, action, target in line.get("o", [])
                     if device in self.hardware.actuators]
        self.health.begin()
        self.events.clear()
        for plugin in self.plugins:
            if plugin.name not in line.get("d", ()):
                proposals.extend(self._consult(plugin, context, line))
        wanted, _ = arbitration.resolve(proposals)
        decision = self.safety.enforce(wanted, readings, now, self.clock.monotonic(), self.health)
        if self.picture is not None:  # the states this tick's plugins saw, as recorded and as replayed
            self.picture.add(line, readings, self.states, self.hardware.states(), decision.holds, self.events)
        self.hardware.apply(decision.writes, number)
        self.applied.add(number, now, {device: [target, plugin] for device, target, plugin in line.get("a", [])},
                         {w.device_id: [w.target, w.plugin] for w in decision.writes})
        self.ticks += 1

    def _consult(self, plugin: SandboxedPlugin, context: Context, line: dict[str, Any]) -> list[Command]:
        failed = None
        commands: list[Command] = []
        rejections: list[Rejection] = []
        try:
            commands, rejections = plugin.decide(context, self.hardware.actuators)
            self.health.ok(plugin.name, self.clock.monotonic(), commands, rejections, plugin.grant.actuators)
        except Exception as exc:  # a failed call is a verdict to compare, as the loop counts it
            failed = PluginCallError.kind_of(exc)
            self.health.failed(plugin.name, self.clock.monotonic(), f"has failed every call since ({failed})")
            self.events[f"{plugin.name}.errors"] += 1
        self.events[f"{plugin.name}.rejected"] += len(rejections)
        recorded = _recorded(line, plugin.name)
        if recorded is None:
            self.not_recorded[plugin.name] += 1
        else:
            self.compared[plugin.name].add(line["n"], line["t"], recorded[0], verdict_of(commands, rejections),
                                           (recorded[1], failed))
        return commands

    def report(self, recording: Path, header: dict[str, Any], skipped: int) -> dict[str, Any]:
        recorded_plugins = header.get("plugins", {})
        live = {p.name: p for p in self.plugins}
        plugins = {}
        for name, agreement in self.compared.items():  # a plugin a reload unloaded keeps its counts
            entry = agreement.summary()
            if name in live:
                entry["sha256"] = live[name].sha256
            if name in recorded_plugins:
                entry["recorded_sha256"] = recorded_plugins[name]
            if self.not_recorded[name]:
                entry["ticks_not_recorded"] = self.not_recorded[name]
            plugins[name] = entry
        return {"recording": str(recording), "ticks": self.ticks, "skipped_lines": skipped,
                "plugins": plugins, "segments": self.segments,
                "not_loaded": {name: s.reason or s.state for name, s in self.plugins.status.items()
                               if s.state != "loaded"},
                "safety": {"held": {key: dict(rules) for key, rules in self.safety.held.items() if rules},
                           "failsafes": dict(self.safety.failsafes),
                           "applied": self.applied.summary()}}

    def close(self) -> None:
        self.plugins.close()
        for actuator in self.hardware.actuators.values():
            actuator.close()


class Picture:
    """`replay --plot`: per tick, the readings, each actuator's state as recorded and as replayed, and the
    replayed plugin errors, rejections and safety holds, reduced as they come (see `plot.Buckets`)."""

    VARIANTS = ((".recorded", " recorded"), (".replayed", " replayed"))

    def __init__(self, path: Path):
        from pi_controller.sim import plot

        self.path = path
        self.buckets = plot.Buckets()
        self.first: float | None = None
        self.empty: dict[str, float | None] = {}

    def start(self, settings: config.Settings, plugins: list[str]) -> None:
        self.settings, self.plugins = settings, plugins
        devices = [a.id for a in settings.actuators]
        columns = ["time_s", "tick", *(s.id for s in settings.sensors),
                   *(f"{a}{suffix}" for a in devices for suffix, _ in self.VARIANTS),
                   *(f"{p}.{what}" for p in plugins for what in ("errors", "rejected")),
                   *(f"{a}.held" for a in devices)]
        self.empty = dict.fromkeys(columns, 0)
        self.empty.update((s.id, None) for s in settings.sensors)
        self.buckets.start(columns)

    def add(self, line: dict[str, Any], readings: list[Reading], recorded: dict[str, Any],
            replayed: dict[str, dict[str, Any]], holds: list[Hold], events: Counter[str]) -> None:
        self.first = line["t"] if self.first is None else self.first
        row = dict(self.empty, time_s=line["t"] - self.first, tick=line["n"])
        row.update((r.sensor_id, r.value) for r in readings if r.sensor_id in row)
        for key, state in replayed.items():
            row[f"{key}.replayed"] = state.get("value")
            row[f"{key}.recorded"] = recorded.get(key, {}).get("value")
        row.update((key, n) for key, n in events.items() if key in row)
        for hold in holds:
            row[f"{hold.device_id}.held"] += 1
        self.buckets.add(row)

    def draw(self, recording: Path, report: dict[str, Any]) -> None:
        from pi_controller.sim import plot

        binned = self.buckets.view()
        layout = plot.layout(self.settings, binned, self.plugins, variants=self.VARIANTS)
        agreement = ", ".join(f"{name} {p['agreement_percent']:g} %" for name, p in report["plugins"].items())
        plot.render(layout, binned, [f"replay of {recording.name}: {report['ticks']} ticks",
                                     f"agreement with the recording: {agreement or 'no plugin'}; events: replayed"],
                    self.path)


def _recorded(line: dict[str, Any], plugin: str) -> tuple[Verdict, str | None] | None:
    """The recorded verdict of `plugin` in this tick and its failed call's kind; None if not called."""
    failed = line.get("e", {}).get(plugin)
    if plugin not in line.get("p", {}) and failed is None:
        return None
    if failed == "quarantined":
        return None
    rejected = ((device, rule) for device, rule, _ in line.get("x", {}).get(plugin, []))
    return verdict(line.get("p", {}).get(plugin, []), rejected), failed


def replay(recording: Path, settings: config.Settings | None, plugins_dir: Path | None,
           start: float | None = None, end: float | None = None, plot: Path | None = None) -> dict[str, Any]:
    """Replay `recording` (within [start, end], Unix seconds) and return the report; with `plot`, draw
    its picture there. Raises RecordingError, and ConfigError for the config given or recorded."""
    reader = Reader(recording)
    session: Replay | None = None
    header: dict[str, Any] = {}
    given = settings
    under: dict[str, Any] | None = None  # the header the last line read was under
    before: dict[str, Any] = {}  # the device states the lines before the window left (they carry changes)
    try:
        for header, line in reader:
            if header is not under and session is not None:
                session.restart(header, line, given or _recorded_settings(header, recording))
            under = header
            if (start is not None and line["t"] < start) or (end is not None and line["t"] > end):
                if session is None and isinstance(line.get("s"), dict):
                    before.update(line["s"])
                continue
            if session is None:
                settings = given or _recorded_settings(header, recording)
                folder = config.check_plugins_directory(settings, plugins_dir)
                session = Replay(settings, folder, line["t"] - line.get("m", 0.0), Picture(plot) if plot else None)
                session.states.update(before)
                session.restart(header, line, None)
            try:
                session.feed(line, header.get("sensors", {}))
            except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError) as exc:  # not by us
                raise reader.refusal(f"tick {line['n']}: malformed line ({type(exc).__name__}: {exc})") from exc
        if session is None:
            raise RecordingError(f"{recording}: no tick recorded" + (" in the range given" if start or end else ""))
        report = session.report(recording, header, reader.skipped)
        if session.picture is not None:
            session.picture.draw(recording, report)
        return report
    finally:
        if session is not None:
            session.close()


def _recorded_settings(header: dict[str, Any], recording: Path) -> config.Settings:
    text = header.get("config")
    if not isinstance(text, str):
        raise RecordingError(f"{recording}: the recording holds no config: give one with --config")
    return config.parse(text, Path(header.get("config_file") or recording))
