"""The engine of `pi-controller simulate`: the real daemon (loop, plugins, validation, safety) against the
simulation models on a virtual clock, as fast as the machine allows, each tick handed as a row to sinks (the
verdict, a trace file, the plot's buckets, progress). The command itself is `sim.commands`.

The trace is recorded by wrapping the simulated world: the hardware advances it before every tick's
reads, which is when the previous tick is complete, so the loop stays untouched. Everything in the
trace runs on virtual time from a fixed start, so a seed gives a byte-identical trace; tick durations
(real time) are left out on purpose.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import math
import sys
import time
from array import array
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence, TextIO

import structlog

from pi_controller import config
from pi_controller.clock import VirtualClock
from pi_controller.sim.verdict import Row, Verdict, hms
from pi_controller.simulators.models import Model, SeededSettings

if TYPE_CHECKING:
    from pi_controller.daemon import Daemon
    from pi_controller.sim.record import Playback

START = 1_800_000_000.0  # Unix time of tick 0 on the virtual clock: the same every run
CLEAR_PIN_HISTORY_TICKS = 1000  # a mock pin's history of states is emptied this often

log = structlog.get_logger("pi_controller.simulation")


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
        dataclasses.replace(m, seed=seed + i) if isinstance(m, SeededSettings) else m
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
        counts: Row = {key: now - then for key, now, then in zip(self._count_columns, totals, self._totals)}
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
    hardware.set_sensors([RecordedSensor(s, playback, start)
                          if s.settings.id not in modelled and s.settings.id in playback.sensors else s
                          for s in hardware.sensors])
    return [s.settings.id for s in hardware.sensors if isinstance(s, RecordedSensor)]
