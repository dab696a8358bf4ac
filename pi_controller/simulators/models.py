"""Physical models: a heated room, people moving about, daylight plus a lamp, a slow servo, a fan.

Each model has a settings class (its YAML schema, under `simulation:`) and a class that advances the
model to a given time, reading actuators through `Probe`s and writing sensors through `Port`s.

Adding a model:
1. a frozen settings dataclass with `kind: Literal["name"]`, its parameters (`bounded` fields are
   range-checked when the config loads) and `references()`, naming the sensors it drives and the
   actuators it reads by config key;
2. a model class built as `Model(settings, ports, probes)` (keyed as `references()` keys them) with
   `advance(now)`, which brings the physics to `now` and sets its ports, and `state()`, the physical
   quantities worth a column in `pi-controller simulate` traces;
3. an entry in `KINDS` and in `MODELS`, and the class in the `Model` union.
Randomness comes from a `random.Random(seed)` of the model's own, so a seed gives the same run: a model
that draws any has settings derived from `SeededSettings`, which `simulate --seed` reseeds.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Literal

from pi_controller.devices.simulation import Port, Probe
from pi_controller.schema import bounded, device_id


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    kind: str

    def references(self) -> dict[str, tuple[str, str]]:
        """Config key -> ("sensor" or "actuator", id) for every device the model is wired to."""
        return {}


@dataclass(frozen=True, kw_only=True)
class SeededSettings(ModelSettings):
    """A model that draws random numbers, from a generator of its own seeded with `seed`."""

    seed: int = 1


def wired(**references: tuple[str, str | None]) -> dict[str, tuple[str, str]]:
    """`references` without the optional devices left unset."""
    return {key: (kind, ref) for key, (kind, ref) in references.items() if ref is not None}


@dataclass(frozen=True, kw_only=True)
class RoomSettings(SeededSettings):
    """First-order thermal model: the room relaxes to the outside temperature through its walls (with
    `time_constant_s`); a heater, if any, adds `heater_rise_c` to the temperature it would settle at, at
    full power; a fan, if any, brings outside air in: at full speed the room relaxes to the outside with
    `fan_time_constant_s` as well (so it cools while it is warmer outside than in, and warms otherwise).
    A relay is full or off, a PWM output its duty, a motor its speed either way.

    Outside it is `outside_c` on average, `outside_swing_c` colder at the start of each day (dawn,
    as in the daylight model) and as much warmer half a day later. The thermometer reads the room
    with gaussian noise of `noise_c` (standard deviation), drawn from `seed`.
    """

    kind: Literal["room"]
    sensor: str = device_id()
    heater: str | None = device_id(default=None)
    fan: str | None = device_id(default=None)
    fan_time_constant_s: float = bounded(1, 1e6, default=120.0)
    outside_c: float = bounded(-50, 60, default=12.0)
    outside_swing_c: float = bounded(0, 50, default=0.0)
    day_length_s: float = bounded(1, 1e7, default=86400.0)
    start_c: float = bounded(-50, 80, default=18.0)
    time_constant_s: float = bounded(1, 1e6, default=600.0)
    heater_rise_c: float = bounded(0, 200, default=16.0)
    noise_c: float = bounded(0, 10, default=0.0)

    def references(self) -> dict[str, tuple[str, str]]:
        return wired(sensor=("sensor", self.sensor), heater=("actuator", self.heater), fan=("actuator", self.fan))


@dataclass(frozen=True, kw_only=True)
class MotionSettings(SeededSettings):
    """People come and go: exponential gaps and visits, from a seeded random generator."""

    kind: Literal["motion"]
    sensor: str = device_id()
    mean_gap_s: float = bounded(0.1, 1e6, default=40.0)
    mean_duration_s: float = bounded(0.1, 1e6, default=15.0)

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
        return wired(sensor=("sensor", self.sensor), lamp=("actuator", self.lamp))


@dataclass(frozen=True, kw_only=True)
class ServoModelSettings(ModelSettings):
    """A servo that moves towards its commanded angle at `speed_deg_s`, and stays where it is while
    detached; `sensor`, if given, reads its actual angle (a feedback potentiometer)."""

    kind: Literal["servo"]
    servo: str = device_id()
    sensor: str | None = device_id(default=None)
    speed_deg_s: float = bounded(0.01, 1e5, default=60.0)

    def references(self) -> dict[str, tuple[str, str]]:
        return wired(servo=("actuator", self.servo), sensor=("sensor", self.sensor))


@dataclass(frozen=True, kw_only=True)
class FanSettings(ModelSettings):
    """A fan on a motor: its airflow follows the motor's drive (signed: negative blows the other way) with
    the inertia of `spin_up_s` (a time constant); `sensor`, if given, reads the airflow (an anemometer)."""

    kind: Literal["fan"]
    motor: str = device_id()
    sensor: str | None = device_id(default=None)
    max_airflow_mps: float = bounded(0.01, 100, default=3.0)
    spin_up_s: float = bounded(0.01, 1e4, default=2.0)

    def references(self) -> dict[str, tuple[str, str]]:
        return wired(motor=("actuator", self.motor), sensor=("sensor", self.sensor))


KINDS: dict[str, type[ModelSettings]] = {
    "room": RoomSettings, "motion": MotionSettings, "daylight": DaylightSettings, "servo": ServoModelSettings,
    "fan": FanSettings,
}


def day_phase(now: float, start: float, day_length_s: float) -> float:
    """How far into its day `now` is, 0 (dawn of the first day, at `start`) to 1."""
    return ((now - start) / day_length_s) % 1.0


class Room:
    def __init__(self, settings: RoomSettings, ports: dict[str, Port], probes: dict[str, Probe]):
        self.settings = settings
        self.thermometer = ports["sensor"]
        self.heater, self.fan = probes.get("heater"), probes.get("fan")
        self.temperature = settings.start_c
        self.outside = settings.outside_c
        self._random = random.Random(settings.seed)
        self._start: float | None = None
        self._last: float | None = None

    def advance(self, now: float) -> None:
        s = self.settings
        self._start = now if self._start is None else self._start
        phase = day_phase(now, self._start, s.day_length_s)
        self.outside = s.outside_c - s.outside_swing_c * math.cos(2 * math.pi * phase)
        if self._last is not None and now > self._last:
            # Exact solution over the step (the outside and the actuators held as they are), so any step is
            # stable. The fan adds to the walls' conductance (1 without it: the same numbers, bit for bit).
            heat = self.heater.level() if self.heater is not None else 0.0
            conductance = 1.0 + (abs(self.fan.level()) * s.time_constant_s / s.fan_time_constant_s
                                 if self.fan is not None else 0.0)
            settle = self.outside + s.heater_rise_c * heat / conductance
            decay = math.exp(-(now - self._last) * conductance / s.time_constant_s)
            self.temperature = settle + (self.temperature - settle) * decay
        self._last = now
        noise = self._random.gauss(0.0, s.noise_c) if s.noise_c else 0.0
        self.thermometer.set(self.temperature + noise)

    def state(self) -> dict[str, float]:
        return {"temperature_c": self.temperature, "outside_c": self.outside}


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

    def state(self) -> dict[str, float]:
        return {"present": float(self.present)}


class Daylight:
    def __init__(self, settings: DaylightSettings, ports: dict[str, Port], probes: dict[str, Probe]):
        self.settings = settings
        self.sensor = ports["sensor"]
        self.lamp = probes.get("lamp")
        self.daylight = 0.0
        self._start: float | None = None

    def advance(self, now: float) -> None:
        s = self.settings
        self._start = now if self._start is None else self._start
        self.daylight = s.peak_lux * max(0.0, math.sin(2 * math.pi * day_phase(now, self._start, s.day_length_s)))
        lamp = s.lamp_lux * self.lamp.level() if self.lamp is not None else 0.0
        self.sensor.set(self.daylight + lamp)

    def state(self) -> dict[str, float]:
        return {"daylight_lux": self.daylight}


class ServoModel:
    def __init__(self, settings: ServoModelSettings, ports: dict[str, Port], probes: dict[str, Probe]):
        self.settings = settings
        self.servo = probes["servo"]
        self.feedback = ports.get("sensor")
        self.angle = 0.0
        self._last: float | None = None

    def advance(self, now: float) -> None:
        commanded = self.servo.level()
        if self._last is None:
            self.angle = commanded  # where the first pulses find it
        else:
            reach = self.settings.speed_deg_s * max(0.0, now - self._last)
            self.angle += max(-reach, min(reach, commanded - self.angle))
        self._last = now
        if self.feedback is not None:
            self.feedback.set(self.angle)

    def state(self) -> dict[str, float]:
        return {"angle_deg": self.angle}


class Fan:
    def __init__(self, settings: FanSettings, ports: dict[str, Port], probes: dict[str, Probe]):
        self.settings = settings
        self.motor = probes["motor"]
        self.anemometer = ports.get("sensor")
        self.airflow = 0.0  # m/s, signed as the motor's drive
        self._last: float | None = None

    def advance(self, now: float) -> None:
        s = self.settings
        wanted = self.motor.level() * s.max_airflow_mps
        if self._last is not None and now > self._last:
            self.airflow = wanted + (self.airflow - wanted) * math.exp(-(now - self._last) / s.spin_up_s)
        self._last = now
        if self.anemometer is not None:
            self.anemometer.set(self.airflow)

    def state(self) -> dict[str, float]:
        return {"airflow_mps": self.airflow}


Model = Room | Motion | Daylight | ServoModel | Fan
# A model's class, built on its own settings class (the key it is registered under) and its wiring.
ModelClass = Callable[[Any, dict[str, Port], dict[str, Probe]], Model]
MODELS: dict[type[ModelSettings], ModelClass] = {
    RoomSettings: Room, MotionSettings: Motion, DaylightSettings: Daylight, ServoModelSettings: ServoModel,
    FanSettings: Fan,
}
