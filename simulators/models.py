"""Physical models: a heated room, people moving about, daylight plus a lamp.

Each model has a settings class (its YAML schema, under `simulation:`) and a class that advances the
model to a given time, reading actuators through `Probe`s and writing sensors through `Port`s.
Adding a model: a settings class, a model class, an entry in `KINDS` and `MODELS`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal, Protocol

from pi_controller.schema import bounded, device_id


class Port(Protocol):
    """Where a model writes a sensor's physical value (in the sensor's unit)."""

    def set(self, value: float) -> None: ...


class Probe(Protocol):
    """Where a model reads an actuator's output, 0 (off) to 1 (full)."""

    def level(self) -> float: ...


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    kind: str

    def references(self) -> dict[str, tuple[str, str]]:
        """Config key -> ("sensor" or "actuator", id) for every device the model is wired to."""
        return {}


@dataclass(frozen=True, kw_only=True)
class RoomSettings(ModelSettings):
    """First-order thermal model: the room relaxes to the outside temperature, the heater adds
    `heater_rise_c` to the temperature it would settle at."""

    kind: Literal["room"]
    sensor: str = device_id()
    heater: str = device_id()
    outside_c: float = bounded(-50, 60, default=12.0)
    start_c: float = bounded(-50, 80, default=18.0)
    time_constant_s: float = bounded(1, 1e6, default=600.0)
    heater_rise_c: float = bounded(0, 200, default=16.0)

    def references(self) -> dict[str, tuple[str, str]]:
        return {"sensor": ("sensor", self.sensor), "heater": ("actuator", self.heater)}


@dataclass(frozen=True, kw_only=True)
class MotionSettings(ModelSettings):
    """People come and go: exponential gaps and visits, from a seeded random generator."""

    kind: Literal["motion"]
    sensor: str = device_id()
    mean_gap_s: float = bounded(0.1, 1e6, default=40.0)
    mean_duration_s: float = bounded(0.1, 1e6, default=15.0)
    seed: int = 1

    def references(self) -> dict[str, tuple[str, str]]:
        return {"sensor": ("sensor", self.sensor)}


@dataclass(frozen=True, kw_only=True)
class DaylightSettings(ModelSettings):
    """Daylight on a sine curve (dark half of each day), plus what the lamp adds at its duty."""

    kind: Literal["daylight"]
    sensor: str = device_id()
    lamp: str | None = device_id(default=None)
    day_length_s: float = bounded(1, 1e7, default=86400.0)
    peak_lux: float = bounded(0, 200_000, default=800.0)
    lamp_lux: float = bounded(0, 200_000, default=150.0)

    def references(self) -> dict[str, tuple[str, str]]:
        refs = {"sensor": ("sensor", self.sensor)}
        if self.lamp is not None:
            refs["lamp"] = ("actuator", self.lamp)
        return refs


KINDS: dict[str, type[ModelSettings]] = {
    "room": RoomSettings, "motion": MotionSettings, "daylight": DaylightSettings,
}


class Room:
    def __init__(self, settings: RoomSettings, ports: dict[str, Port], probes: dict[str, Probe]):
        self.settings = settings
        self.thermometer = ports["sensor"]
        self.heater = probes["heater"]
        self.temperature = settings.start_c
        self._last: float | None = None

    def advance(self, now: float) -> None:
        s = self.settings
        if self._last is not None and now > self._last:
            # Exact solution over the step, so any step size is stable.
            settle = s.outside_c + s.heater_rise_c * self.heater.level()
            decay = math.exp(-(now - self._last) / s.time_constant_s)
            self.temperature = settle + (self.temperature - settle) * decay
        self._last = now
        self.thermometer.set(self.temperature)


class Motion:
    def __init__(self, settings: MotionSettings, ports: dict[str, Port], probes: dict[str, Probe]):
        self.settings = settings
        self.sensor = ports["sensor"]
        self._random = random.Random(settings.seed)
        self.present = False
        self._next_change: float | None = None

    def advance(self, now: float) -> None:
        if self._next_change is None:
            self._next_change = now + self._random.expovariate(1 / self.settings.mean_gap_s)
        while now >= self._next_change:
            self.present = not self.present
            mean = self.settings.mean_duration_s if self.present else self.settings.mean_gap_s
            self._next_change += self._random.expovariate(1 / mean)
        self.sensor.set(1.0 if self.present else 0.0)


class Daylight:
    def __init__(self, settings: DaylightSettings, ports: dict[str, Port], probes: dict[str, Probe]):
        self.settings = settings
        self.sensor = ports["sensor"]
        self.lamp = probes.get("lamp")
        self._start: float | None = None

    def advance(self, now: float) -> None:
        s = self.settings
        if self._start is None:
            self._start = now
        phase = ((now - self._start) / s.day_length_s) % 1.0
        daylight = s.peak_lux * max(0.0, math.sin(2 * math.pi * phase))
        lamp = s.lamp_lux * self.lamp.level() if self.lamp is not None else 0.0
        self.sensor.set(daylight + lamp)


Model = Room | Motion | Daylight
MODELS: dict[type[ModelSettings], type[Model]] = {
    RoomSettings: Room, MotionSettings: Motion, DaylightSettings: Daylight,
}
