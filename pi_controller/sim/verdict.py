"""The verdict of a simulated run: time in each plugin's setpoint band, switches, energy and flapping per
actuator, plugin failures and what the safety rules held back. It takes the run's rows as they come (a
`simulation.Sink`) and prints the same lines for the same config and seed on any machine.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard

from pi_controller import config
from pi_controller.devices.actuators import ActuatorSettings
from pi_controller.simulators.models import RoomSettings

if TYPE_CHECKING:
    from pi_controller.daemon import Daemon

Row = dict[str, float | None]  # a tick of the run: time_s, tick, and a value per column (None: empty)


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
