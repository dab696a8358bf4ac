"""`pi-controller simulate`: the real daemon (loop, plugins, validation, safety) against the simulation
models on a virtual clock, as fast as the machine allows; a trace of every tick, a verdict, a plot.

The trace is recorded by wrapping the simulated world: the hardware advances it before every tick's
reads, which is when the previous tick is complete, so the loop stays untouched. Everything in the
trace runs on virtual time from a fixed start, so a seed gives a byte-identical trace; tick durations
(real time) are left out on purpose.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import dataclasses
import importlib.util
import math
import os
import re
import sys
import time
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence, TextIO, TypeGuard

import structlog

from pi_controller import config, logs
from pi_controller.clock import VirtualClock
from pi_controller.devices.actuators import ActuatorSettings
from pi_controller.simulators.models import Model, RoomSettings

if TYPE_CHECKING:
    from pi_controller.daemon import Daemon
    from pi_controller.sim.record import Playback

START = 1_800_000_000.0  # Unix time of tick 0 on the virtual clock: the same every run
EXIT_CONFIG = 2
EXIT_FAILED = 1
CLEAR_PIN_HISTORY_TICKS = 1000  # a mock pin's history of states is emptied this often

log = structlog.get_logger("pi_controller.simulation")

Row = dict[str, float | None]


# ---------------------------------------------------------------------------------------------
# Settings of a reproducible run


def prepare(settings: config.Settings, rate_hz: float | None = None, seed: int | None = None) -> config.Settings:
    """The settings of a run whose trace depends on nothing but the config and the seed.

    No watchdog: it is a real-time thread and would trip on a busy machine, not on a stuck tick. No
    metrics server and no MQTT: simulated data must not be served or published as if it were real. A
    simulated DS18B20 is read in the tick, because its poll thread sleeps in real time. `seed` reseeds
    every model that draws random numbers, each with its own (two motion sensors must not move in step).
    """
    loop = settings.loop if rate_hz is None else dataclasses.replace(settings.loop, rate_hz=rate_hz)
    sensors = tuple(s.simulated() for s in settings.sensors)
    models = settings.simulation if seed is None else tuple(
        dataclasses.replace(m, seed=seed + i) if hasattr(m, "seed") else m
        for i, m in enumerate(settings.simulation))
    off = {name: dataclasses.replace(getattr(settings, name), enabled=False)
           for name in ("watchdog", "metrics", "mqtt")}
    return dataclasses.replace(settings, loop=loop, sensors=sensors, simulation=models, **off)


def model_names(settings: config.Settings) -> list[str]:
    """A name per model for trace columns: its kind, numbered from the second of a kind on (room_2)."""
    seen: Counter[str] = Counter()
    names = []
    for model in settings.simulation:
        seen[model.kind] += 1
        names.append(model.kind if seen[model.kind] == 1 else f"{model.kind}_{seen[model.kind]}")
    return names


@dataclass(frozen=True)
class Band:
    """A plugin's setpoint ± hysteresis on the sensor it controls."""

    plugin: str
    sensor: str
    setpoint: float
    hysteresis: float

    def holds(self, value: float) -> bool:
        return self.setpoint - self.hysteresis <= value <= self.setpoint + self.hysteresis


def bands(settings: config.Settings) -> list[Band]:
    """The band of every enabled plugin with a numeric `setpoint` in its config, on the config's `sensor`
    or, when it names none, on the sensor of the (only) room model."""
    rooms = [m.sensor for m in settings.simulation if isinstance(m, RoomSettings)]
    found = []
    for name, plugin in sorted(settings.plugins.settings.items()):
        setpoint, hysteresis = plugin.config.get("setpoint"), plugin.config.get("hysteresis", 0.0)
        sensor = plugin.config.get("sensor", rooms[0] if len(rooms) == 1 else None)
        if plugin.enabled and _number(setpoint) and _number(hysteresis) and isinstance(sensor, str):
            found.append(Band(name, sensor, float(setpoint), float(hysteresis)))
    return found


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# Recording


class Sink(Protocol):
    def start(self, columns: list[str]) -> None: ...

    def add(self, row: Row) -> None: ...


class Recorder:
    """The environment of a simulated run: advances the world and hands each finished tick, as a row,
    to the sinks (the verdict, and as asked the trace file, the plot's columns, progress)."""

    def __init__(self, daemon: Daemon, clock: VirtualClock):
        self.daemon = daemon
        self.world = daemon.hardware.environment
        self.start = clock.time()
        self.sinks: list[Sink] = []
        self.models: list[Model] = list(getattr(self.world, "models", []))
        self.plugins = sorted(p.name for p in daemon.plugins)
        self.model_columns = [f"{name}.{key}" for name, m in zip(model_names(daemon.settings), self.models)
                              for key in m.state()]
        self._actuator_ids = [a.id for a in daemon.settings.actuators]
        self._count_columns = [*(f"{p}.{what}" for p in self.plugins for what in ("errors", "rejected")),
                               *(f"{a}.held" for a in self._actuator_ids)]
        self.columns = ["time_s", "tick", *(s.id for s in daemon.settings.sensors), *self._actuator_ids,
                        *self.model_columns, *self._count_columns]
        self._pending: tuple[float, list[float]] | None = None  # the tick under way: its time, model state
        self._ticks = 0
        self._totals = [0] * len(self._count_columns)
        self._no_counts: Row = dict.fromkeys(self._count_columns, 0)  # most ticks: nothing failed or held

    def advance(self, now: float) -> None:
        self.flush()
        if self.world is not None:
            self.world.advance(now)
        self._pending = (now, [v for m in self.models for v in m.state().values()])
        # gpiozero's mock pins keep every state change they go through: with bit-banged SPI, a
        # simulated day would be gigabytes of history nobody reads. Now and then is enough to bound it.
        if self._ticks % CLEAR_PIN_HISTORY_TICKS == 0:
            for pin in self.daemon.hardware.factory.pins.values():
                pin.clear_states()

    def flush(self) -> None:
        """Hand on the tick under way: called before the next tick's reads and once after the last tick."""
        if self._pending is None:
            return
        now, model_state = self._pending
        self._pending = None
        loop = self.daemon.loop
        row: Row = {"time_s": now - self.start, "tick": self._ticks}
        row |= {r.sensor_id: r.value for r in loop.readings}
        row |= {key: state["value"] for key, state in loop.last_states.items()}
        row |= dict(zip(self.model_columns, model_state))
        row |= self._counts()
        self._ticks += 1
        for sink in self.sinks:
            sink.add(row)

    def _counts(self) -> Row:
        """This tick's plugin errors, rejections and safety holds: the counters' growth since the last row."""
        loop = self.daemon.loop
        totals: list[int] = []
        for name in self.plugins:
            stats = loop.plugin_stats.get(name)
            totals += (stats.errors, stats.rejected) if stats else (0, 0)
        held = loop.safety.held
        totals += [sum(held[key].values()) if key in held else 0 for key in self._actuator_ids]
        if totals == self._totals:
            return self._no_counts
        counts = {key: now - then for key, now, then in zip(self._count_columns, totals, self._totals)}
        self._totals = totals
        return counts

    def close(self) -> None:
        if self.world is not None:
            self.world.close()


class TraceWriter:
    """CSV, one row per tick, columns in a fixed order and numbers in a fixed format."""

    def __init__(self, stream: TextIO):
        self.columns: list[str] = []
        self._csv = csv.writer(stream, lineterminator="\n")

    def start(self, columns: list[str]) -> None:
        self.columns = columns
        self._csv.writerow(columns)

    def add(self, row: Row) -> None:
        self._csv.writerow([_cell(row[c]) for c in self.columns])


def _cell(value: float | None) -> str:
    if value is None:
        return ""  # an invalid reading, a detached servo
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}"


class Columns:
    """The run's columns as numbers, whole, for a test to look into (compact arrays);
    an empty cell is NaN."""

    def __init__(self) -> None:
        self.values: dict[str, array[float]] = {}

    def start(self, columns: list[str]) -> None:
        self.values = {column: array("d") for column in columns}

    def add(self, row: Row) -> None:
        for column, values in self.values.items():
            value = row[column]
            values.append(math.nan if value is None else value)


class Progress:
    """How far the run is, on stderr: one line kept up to date on a terminal (at most every 0.2 s of
    real time), else a plain line every 10 %."""

    def __init__(self, ticks: int, period_s: float, stream: TextIO | None = None):
        stream = stream or sys.stderr  # as it is now: the console entry points it at the real stderr
        self.ticks, self.stream, self.period_s = ticks, stream, period_s
        self.terminal = stream.isatty()
        self.done = 0
        self._shown = -1.0  # a real time on a terminal, else the last tenth shown

    def start(self, columns: list[str]) -> None:
        pass

    def add(self, row: Row) -> None:
        self.done += 1
        if self.terminal:
            now = time.monotonic()
            if now - self._shown >= 0.2 or self.done == self.ticks:
                self._shown = now
                self.stream.write(f"\r{self._line()}" + ("\n" if self.done == self.ticks else ""))
                self.stream.flush()
        elif self.done * 10 // self.ticks > self._shown:
            self._shown = self.done * 10 // self.ticks
            self.stream.write(self._line() + "\n")
            self.stream.flush()

    def _line(self) -> str:
        return (f"simulated {hms(self.done * self.period_s)} of {hms(self.ticks * self.period_s)} "
                f"({100 * self.done // self.ticks} %)")


# ---------------------------------------------------------------------------------------------
# Verdict


@dataclass
class BandTally:
    """Time in a band, counted from warm-up: the first tick whose reading is in it. The lowest and
    highest readings are those after warm-up, or of the whole run if it never got there."""

    band: Band
    reached_at: float | None = None
    inside: int = 0
    after: int = 0
    low: float = float("inf")
    high: float = float("-inf")

    def add(self, row: Row) -> None:
        value = row[self.band.sensor]
        inside = value is not None and self.band.holds(value)
        if self.reached_at is None and inside:
            self.reached_at = row["time_s"]
            self.low, self.high = float("inf"), float("-inf")  # from now on: after warm-up
        if self.reached_at is not None:
            self.after += 1
            self.inside += inside
        if value is not None:
            self.low, self.high = min(self.low, value), max(self.high, value)

    @property
    def share(self) -> float:
        return self.inside / self.after if self.after else 0.0


FLAPPING_WINDOW_S = 60.0
#: More switches than this within a minute is flapping: a relay or a lamp no one would accept (a
#: compressor's usual minimum is minutes; the example's heater may switch every 10 s at most).
FLAPPING_SWITCHES = 6


@dataclass
class Flapping:
    """A stretch of time in which every minute-long window held more than FLAPPING_SWITCHES switches."""

    start_s: float
    end_s: float
    most: int  # the most switches in one window of it
    most_at_s: float  # when that window ended


@dataclass
class ActuatorTally:
    settings: ActuatorSettings
    switches: int = 0
    duty_sum: float = 0.0  # per-tick duties added up: times the period, the energy in full-power seconds
    on: bool = field(init=False)
    flapping: list[Flapping] = field(default_factory=list)
    _recent: deque[float] = field(default_factory=deque)  # the last minute's switch times
    _flapping_now: bool = False

    def __post_init__(self) -> None:
        self.on = self.settings.power(self.settings.targets()[1]) > 0  # start-up state

    def add(self, value: float | None, time_s: float) -> None:
        level = self.settings.power(value)
        switched = (level > 0) != self.on
        self.on = level > 0
        self.duty_sum += level
        self.switches += switched
        if switched:
            self._recent.append(time_s)
        while self._recent and self._recent[0] <= time_s - FLAPPING_WINDOW_S:
            self._recent.popleft()
        self._track_flapping(time_s)

    def _track_flapping(self, time_s: float) -> None:
        flapping = len(self._recent) > FLAPPING_SWITCHES
        if flapping and not self._flapping_now:
            self.flapping.append(Flapping(self._recent[0], time_s, len(self._recent), time_s))
        elif flapping:
            last = self.flapping[-1]
            last.end_s = time_s
            if len(self._recent) > last.most:
                last.most, last.most_at_s = len(self._recent), time_s
        self._flapping_now = flapping


class Verdict:
    """What a plugin author needs to know of a run: time in the setpoint bands, switches and energy
    per actuator, plugin failures and what the safety rules held back."""

    def __init__(self, settings: config.Settings):
        self.settings = settings
        self.period = settings.loop.period
        self.ticks = 0
        self.bands = [BandTally(b) for b in bands(settings)]
        self.actuators = {a.id: ActuatorTally(a) for a in settings.actuators}
        self.plugins: dict[str, str] = {}  # plugin -> what went wrong, if anything
        self.held: dict[str, dict[str, int]] = {}
        self.failsafes: dict[str, int] = {}  # actuator -> times it was taken from a failing owner
        self.played: list[str] = []  # sensors read from a recording

    def start(self, columns: list[str]) -> None:
        pass

    def add(self, row: Row) -> None:
        self.ticks += 1
        for band in self.bands:
            band.add(row)
        for key, tally in self.actuators.items():
            tally.add(row[key], row["time_s"] or 0.0)

    def finish(self, daemon: Daemon) -> None:
        summary = daemon.loop.summary()
        self.held, self.failsafes = summary["held"], summary["failsafes"]
        stats = daemon.loop.plugin_stats
        for name, status in sorted(daemon.plugins.status.items()):
            if status.state != "loaded":
                self.plugins[name] = f"{status.state}{': ' + status.reason if status.reason else ''}"
            elif name in stats and (stats[name].errors or stats[name].rejected):
                self.plugins[name] = (f"{stats[name].errors} errors in {stats[name].calls} calls, "
                                      f"{stats[name].rejected} rejected commands")
            else:
                self.plugins[name] = ""

    def lines(self) -> list[str]:
        # Nothing of the machine's speed: the same config and seed print the same verdict anywhere.
        out = [f"simulated {hms(self.ticks * self.period)} at {self.settings.loop.rate_hz:g} Hz: {self.ticks} ticks"]
        if self.played:
            out.append(f"from the recording (no model drives them): {', '.join(self.played)}")
        out += [self._band_line(b) for b in self.bands]
        out += [self._actuator_line(key, t) for key, t in self.actuators.items()]
        out += [self._flapping_line(key, t) for key, t in self.actuators.items() if t.flapping]
        if not any(t.flapping for t in self.actuators.values()):
            out.append(f"no actuator flapped (more than {FLAPPING_SWITCHES} switches in a minute)")
        failing = {name: why for name, why in self.plugins.items() if why}
        ok = [name for name, why in self.plugins.items() if not why]
        if ok:
            out.append(f"plugins without errors or rejected commands: {', '.join(ok)}")
        out += [f"plugin {name}: {why}" for name, why in failing.items()]
        out += [f"safety held back {key}: " + ", ".join(f"{rule} {n} ticks" for rule, n in sorted(rules.items()))
                for key, rules in self.held.items()]
        out += [f"failsafe: {key} put in its safe state {n} times, its owner failing or silent"
                for key, n in self.failsafes.items()]
        return out

    def _band_line(self, tally: BandTally) -> str:
        b = tally.band
        unit = next(s.unit for s in self.settings.sensors if s.id == b.sensor)
        head = f"{b.plugin}: {b.sensor} at {b.setpoint:g} ± {b.hysteresis:g} {unit}"
        if tally.reached_at is None:
            return f"{head}: never in the band; {tally.low:.2f} to {tally.high:.2f}"
        return (f"{head}: in the band {100 * tally.share:.1f} % of the time after warm-up (reached at "
                f"{hms(tally.reached_at)}); {tally.low:.2f} to {tally.high:.2f} after warm-up")

    def _actuator_line(self, key: str, tally: ActuatorTally) -> str:
        share = tally.duty_sum / self.ticks if self.ticks else 0.0
        energy = f"{tally.duty_sum * self.period / 3600:.2f} h at full power"
        return f"{key} {tally.settings.summary(tally.switches, 100 * share, energy)}"


    @staticmethod
    def _flapping_line(key: str, tally: ActuatorTally) -> str:
        worst = max(tally.flapping, key=lambda f: f.most)
        shown = ", ".join(f"{hms(f.start_s)} to {hms(f.end_s)}" for f in tally.flapping[:3])
        more = f" and {len(tally.flapping) - 3} more" if len(tally.flapping) > 3 else ""
        return (f"FLAPPING: {key} switched more than {FLAPPING_SWITCHES} times a minute from {shown}{more}; "
                f"at worst {worst.most} switches in the minute to {hms(worst.most_at_s)}")


def hms(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


# ---------------------------------------------------------------------------------------------
# Running


def ticks_in(settings: config.Settings, duration_s: float) -> int:
    return max(1, round(duration_s * settings.loop.rate_hz))


def run(settings: config.Settings, duration_s: float, sinks: Sequence[Sink] = (), plugins_dir: Path | None = None,
        record: Path | None = None, playback: Playback | None = None) -> Verdict:
    """Simulate `duration_s` with prepared settings, hand every tick to `sinks` (a trace file, the plot's
    columns, progress; with `record`, write a recording for `replay`, the format a Pi records in), and
    return the verdict. With `playback`, the sensors no model drives read what it recorded.

    Raises SimulationError (a model the devices cannot carry) and HardwareError as the daemon does.
    """
    from pi_controller.daemon import Daemon

    clock = VirtualClock(START)
    daemon = Daemon(settings, simulate=True, plugins_dir=plugins_dir, clock=clock, record=record)
    verdict = Verdict(settings)
    ticks = ticks_in(settings, duration_s)
    try:
        if playback is not None:
            verdict.played = _play(daemon, playback, clock.time())
        recorder = Recorder(daemon, clock)
        recorder.sinks = [verdict, *sinks]
        for sink in recorder.sinks:
            sink.start(recorder.columns)
        daemon.hardware.environment = recorder
        log.info("simulation_started", ticks=ticks, rate_hz=settings.loop.rate_hz)
        started = time.perf_counter()
        asyncio.run(daemon.serve(ticks))
        recorder.flush()
        verdict.finish(daemon)
        wall_s = time.perf_counter() - started
    finally:
        daemon.close()
    log.info("simulation_finished", ticks=verdict.ticks, wall_s=round(wall_s, 2),
             speed=f"{verdict.ticks * settings.loop.period / wall_s:.0f}x real time" if wall_s else None)
    return verdict


def _play(daemon: Daemon, playback: Playback, start: float) -> list[str]:
    """Feed the sensors that no model drives and the recording has from the recording; their ids."""
    from pi_controller.sim.record import RecordedSensor

    modelled = {ref for model in daemon.settings.simulation for role, ref in model.references().values()
                if role == "sensor"}
    hardware = daemon.hardware
    hardware.sensors = [RecordedSensor(s, playback, start)
                        if s.settings.id not in modelled and s.settings.id in playback.sensors else s
                        for s in hardware.sensors]
    return [s.settings.id for s in hardware.sensors if isinstance(s, RecordedSensor)]


# ---------------------------------------------------------------------------------------------
# The command


_RATE = next(f for f in dataclasses.fields(config.LoopSettings) if f.name == "rate_hz")  # its bounds


def add_command(commands: Any) -> None:
    """Register `simulate` on the CLI's subcommands (argparse's subparsers action)."""
    low, high = _RATE.metadata["low"], _RATE.metadata["high"]
    sim = commands.add_parser("simulate", help="run the loop and plugins against the models, faster than real time")
    sim.add_argument("--config", required=True, type=Path, help="YAML config file, with a simulation: section")
    sim.add_argument("--duration", type=parse_duration, default=parse_duration("24h"),
                     help="simulated time: 90s, 30m, 24h, 2d (default 24h)")
    sim.add_argument("--rate", type=_rate, help=f"ticks per simulated second, {low:g} to {high:g} "
                                                f"(default: the config's loop.rate_hz)")
    sim.add_argument("--seed", type=int, help="reseed the models' random numbers (default: the config's seeds)")
    sim.add_argument("--trace", type=Path, help="write a CSV trace, a row per tick, to this file")
    sim.add_argument("--record", type=Path, help="also record every tick to this file, for replay (.gz: gzip)")
    sim.add_argument("--plot", type=Path, help="draw the trace to this PNG (needs pi-controller[plot])")
    sim.add_argument("--from-recording", type=Path, help="drive the sensors no model drives from this recording "
                                                         "(run --record or simulate --record)")
    sim.add_argument("--plugins", type=Path, help="plugins folder (overrides plugins.directory)")
    sim.add_argument("--log-format", choices=["console", "json"], default="console")
    sim.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="warning",
                     help="the daemon's own events from this level on; the plugins' pi_log lines show from info on")
    sim.set_defaults(handler=command, plugin_log_level="info")  # what an author simulates for


def parse_duration(text: str) -> float:
    """Seconds in '90', '90s', '30m', '24h' or '2d'."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not match or float(match[1]) == 0:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a duration such as 90s, 30m, 24h or 2d")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number") from None
    if not _RATE.metadata["low"] <= value <= _RATE.metadata["high"]:
        raise argparse.ArgumentTypeError(f"{value:g} is out of range; valid: {_RATE.metadata['low']:g} to "
                                         f"{_RATE.metadata['high']:g}")
    return value


def unwritable(path: Path) -> str | None:
    """Why a file cannot be written at `path` (checked before a run, not found after it), or None."""
    folder = path.parent
    if path.is_dir():
        return "is a folder; give a file name"
    if not folder.is_dir():
        return f"the folder {folder} does not exist" if not folder.exists() else f"{folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK) or path.exists() and not os.access(path, os.W_OK):
        return "not writable"
    return None


def command(args: argparse.Namespace) -> int:
    from pi_controller.devices.hardware import EXIT_HARDWARE, HardwareError
    from pi_controller.plugins import checks
    from pi_controller.sim.record import Playback, RecordingError
    from pi_controller.devices.simulation import SimulationError

    refusal = _refusal(args)  # before a long run, not after it
    if refusal:
        logs.refusal("argument_error", refusal[1])
        return refusal[0]
    try:
        settings = prepare(config.load(args.config), args.rate, args.seed)
        folder = config.check_plugins_directory(settings, args.plugins)  # a typo'd folder: not a run of no plugins
        checks.check(settings, folder)  # a plugin the config names that would not load: not a day without it
    except config.ConfigError as exc:
        exc.refuse()
        return EXIT_CONFIG
    try:
        playback = Playback(args.from_recording) if args.from_recording else None
    except (RecordingError, OSError) as exc:
        logs.refusal("recording_error", f"error: --from-recording {args.from_recording}: {exc}")
        return EXIT_CONFIG
    buckets = None
    with contextlib.ExitStack() as files:
        sinks: list[Sink] = [Progress(ticks_in(settings, args.duration), settings.loop.period)]
        if args.trace:
            sinks.append(TraceWriter(files.enter_context(args.trace.open("w", newline="", encoding="utf-8"))))
        if args.plot:
            from pi_controller.sim import plot

            buckets = plot.Buckets(periods=plot.periods(settings))
            sinks.append(buckets)
        try:
            verdict = run(settings, args.duration, sinks, args.plugins, args.record, playback)
        except SimulationError as exc:
            logs.refusal("simulation_error", f"simulation error: {args.config}: {exc}", file=str(args.config))
            return EXIT_CONFIG
        except HardwareError as exc:
            logs.refusal("hardware_error", f"hardware error: {exc}")
            return EXIT_HARDWARE
        except RecordingError as exc:
            logs.refusal("recording_error", f"error: {exc}")
            return EXIT_CONFIG
    written = [f"{what}: {path}" for what, path in (("trace", args.trace), ("recording", args.record)) if path]
    print("\n".join([*verdict.lines(), *written]))
    if buckets is not None:
        plot.draw(buckets, verdict, args.plot)
        print(f"plot: {args.plot}")
    return 0


def plot_refusal(path: Path | None) -> tuple[int, str] | None:
    """The exit code and the line that refuse `--plot path` before a run, or None."""
    if path and importlib.util.find_spec("matplotlib") is None:
        return EXIT_FAILED, "--plot needs matplotlib: pip install 'pi-controller[plot]'"
    problem = unwritable(path) if path else None
    return (EXIT_CONFIG, f"error: --plot {path}: {problem}") if problem else None


def _refusal(args: argparse.Namespace) -> tuple[int, str] | None:
    """The exit code and the line that refuse a run the arguments would make fail, or None."""
    refusal = plot_refusal(args.plot)
    if refusal:
        return refusal
    for option, path in (("--trace", args.trace), ("--record", args.record)):
        problem = unwritable(path) if path else None
        if problem:
            return EXIT_CONFIG, f"error: {option} {path}: {problem}"
    return None
