"""Sensor kinds: their settings (the config schema) and how each reads a value through gpiozero.

A sensor turns whatever its hardware does into a `Reading`: a number with its unit and timestamp, or
an invalid reading that says why. A read never raises: a failing sensor is data for the plugins, not
a reason for the loop to stop. Adding a kind means adding a settings class, a sensor class and an
entry in `KINDS`/`_BUILDERS` here.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from gpiozero import MCP3008, CPUTemperature, DigitalInputDevice, DistanceSensor, LightSensor
from gpiozero.pins import Factory

from pi_controller.clock import Clock
from pi_controller.schema import bcm_pin, bounded, device_id

# Pins of the Pi's SPI0 bus (BCM numbering); CE0/CE1 select the chip.
SPI0_PINS = {"clock": 11, "mosi": 10, "miso": 9}
SPI0_SELECT = {0: 8, 1: 7}
DEFAULT_W1_DIR = "/sys/bus/w1/devices"
I2C_PINS = (2, 3)  # fixed 1.8 kOhm pull-ups on the board: no input there can pull down


@dataclass(slots=True)  # not frozen: a frozen dataclass costs four times as much to make, 12 times a tick
class Reading:
    sensor_id: str
    value: float | None
    unit: str
    timestamp: float
    error: str | None = None

    @property
    def valid(self) -> bool:
        return self.error is None

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"sensor_id": self.sensor_id, "value": self.value, "unit": self.unit,
                                "timestamp": self.timestamp, "valid": self.error is None}
        if self.error is not None:
            data["error"] = self.error
        return data


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True, kw_only=True)
class SensorSettings:
    id: str = device_id()
    kind: str
    unit: str
    # The physical range: a value outside it is a failed read (a disconnected TMP36 reads -50 C).
    valid_min: float | None = None
    valid_max: float | None = None
    # Actuators that require this sensor go safe when its reading is older than this.
    max_age_s: float | None = bounded(0.01, 86400, default=None)

    def __post_init__(self) -> None:
        if self.valid_min is not None and self.valid_max is not None and self.valid_min >= self.valid_max:
            raise ValueError(f"valid_min {self.valid_min:g} must be below valid_max {self.valid_max:g}")

    def pins(self) -> dict[str, int]:
        """Pins this sensor claims for itself alone, by config key."""
        return {}

    def bus_pins(self) -> dict[str, int]:
        """Pins shared with other devices on the same bus (SPI)."""
        return {}


@dataclass(frozen=True, kw_only=True)
class DigitalSettings(SensorSettings):
    """A PIR motion sensor, a button or a line sensor: a GPIO input read as 0 or 1."""

    kind: Literal["motion", "button", "line"]
    pin: int = bcm_pin()
    unit: str = "boolean"
    pull_up: bool | None = None  # None: the kind's usual wiring (buttons pull up, the others down)

    @property
    def active_low(self) -> bool:
        """Pulled up, the input reads active when the pin is low."""
        return self.pull_up if self.pull_up is not None else self.kind == "button"

    def __post_init__(self) -> None:
        if self.pin in I2C_PINS and not self.active_low:
            raise ValueError(f"GPIO{self.pin} has a fixed pull-up on a Pi (I2C); use another pin, or pull_up: true")
        super().__post_init__()

    def pins(self) -> dict[str, int]:
        return {"pin": self.pin}


@dataclass(frozen=True, kw_only=True)
class MCP3008Settings(SensorSettings):
    """One channel of an MCP3008 ADC on SPI0; value = fraction of full scale * scale + offset.

    A TMP36 on 3.3 V reads celsius with scale 330 and offset -50.
    """

    kind: Literal["mcp3008"]
    channel: int
    chip_select: Literal[0, 1] = 0
    scale: float = 1.0
    offset: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.channel <= 7:
            raise ValueError(f"channel {self.channel} is out of range; an MCP3008 has channels 0 to 7")
        if self.scale == 0:
            raise ValueError("scale must not be 0")
        super().__post_init__()

    def bus_pins(self) -> dict[str, int]:
        return {**SPI0_PINS, "chip_select": SPI0_SELECT[self.chip_select]}


@dataclass(frozen=True, kw_only=True)
class LightSettings(SensorSettings):
    """An LDR and capacitor (gpiozero LightSensor); value = light level (0..1) * scale."""

    kind: Literal["light"]
    pin: int = bcm_pin()
    unit: str = "lux"
    scale: float = 1000.0

    def pins(self) -> dict[str, int]:
        return {"pin": self.pin}

    def __post_init__(self) -> None:
        if self.pin in I2C_PINS:
            raise ValueError(f"GPIO{self.pin} has a fixed pull-up (I2C): a capacitor never discharges there")
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class DistanceSettings(SensorSettings):
    """An HC-SR04 ultrasonic sensor (gpiozero DistanceSensor), in metres."""

    kind: Literal["distance"]
    echo: int = bcm_pin()
    trigger: int = bcm_pin()
    unit: str = "m"
    max_distance: float = bounded(0.01, 10, default=1.0)

    def pins(self) -> dict[str, int]:
        return {"echo": self.echo, "trigger": self.trigger}

    def __post_init__(self) -> None:
        if self.echo == self.trigger:
            raise ValueError("echo and trigger must be different pins")
        if self.echo in I2C_PINS:
            raise ValueError(f"echo on GPIO{self.echo} would fight its fixed pull-up (I2C); use another pin")
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class CPUTemperatureSettings(SensorSettings):
    kind: Literal["cpu_temperature"]
    unit: str = "celsius"
    sensor_file: str = "/sys/class/thermal/thermal_zone0/temp"


@dataclass(frozen=True, kw_only=True)
class DS18B20Settings(SensorSettings):
    """A 1-wire DS18B20 read from its sysfs file, on a thread of its own.

    The kernel converts on every read of w1_slave, which blocks for about 750 ms, far longer than a
    tick: the sensor is polled every `poll_interval_s` and the tick takes the last result. With
    `poll_interval_s: 0` it is read inline (for simulated sysfs trees, which answer at once).
    """

    kind: Literal["ds18b20"]
    device: str
    unit: str = "celsius"
    base_dir: str = DEFAULT_W1_DIR
    poll_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{2}-[0-9a-f]{12}", self.device):
            raise ValueError(f"device {self.device!r} is not a 1-wire id such as '28-0316a2790aff'")
        super().__post_init__()
        if self.poll_interval_s < 0:
            raise ValueError("poll_interval_s must be 0 (read inline) or more")
        if self.poll_interval_s == 0 and self.base_dir == DEFAULT_W1_DIR:
            raise ValueError("poll_interval_s: 0 reads in the tick, but the kernel's w1_slave takes ~750 ms; "
                             "poll it (the default) or point base_dir at a simulated tree")

    @property
    def w1_slave(self) -> Path:
        return Path(self.base_dir) / self.device / "w1_slave"


KINDS: dict[str, type[SensorSettings]] = {
    "motion": DigitalSettings, "button": DigitalSettings, "line": DigitalSettings,
    "mcp3008": MCP3008Settings, "light": LightSettings, "distance": DistanceSettings,
    "cpu_temperature": CPUTemperatureSettings, "ds18b20": DS18B20Settings,
}


# ---------------------------------------------------------------------------------------------
# Sensors


class Sensor:
    """Reads one value; subclasses implement `_sample` and may raise, `read` never does."""

    def __init__(self, settings: SensorSettings):
        self.settings = settings

    def read(self, now: float) -> Reading:
        try:
            value = float(self._sample())
        except Exception as exc:  # a sensor failure of any kind becomes an invalid reading
            return self._invalid(now, f"{type(exc).__name__}: {exc}")
        if not math.isfinite(value):
            return self._invalid(now, f"non-finite value {value}")
        low, high = self.settings.valid_min, self.settings.valid_max
        if low is not None and value < low:
            return self._invalid(now, f"{value:g} is below valid_min {low:g}")
        if high is not None and value > high:
            return self._invalid(now, f"{value:g} is above valid_max {high:g}")
        return Reading(self.settings.id, value, self.settings.unit, now)

    def _invalid(self, now: float, why: str) -> Reading:
        return Reading(self.settings.id, None, self.settings.unit, now, why)

    def _sample(self) -> float:
        raise NotImplementedError

    def close(self) -> None:
        """Release the pins and threads the sensor holds."""


class GpiozeroSensor(Sensor):
    """A sensor that is a gpiozero device and a function from it to a value."""

    def __init__(self, settings: SensorSettings, device: Any, sample: Callable[[Any], float]):
        super().__init__(settings)
        self.device = device
        self._sample_device = sample

    def _sample(self) -> float:
        return self._sample_device(self.device)

    def close(self) -> None:
        self.device.close()


class DS18B20(Sensor):
    """Parses the w1_slave file: a CRC verdict line, then the temperature in millidegrees."""

    POWER_ON_VALUE = 85.0  # what the chip reports before its first conversion, not a temperature
    CONVERSION_S = 0.75  # a 12-bit conversion

    settings: DS18B20Settings

    def __init__(self, settings: DS18B20Settings, clock: Clock):
        super().__init__(settings)
        self.clock = clock
        self.path = settings.w1_slave
        self._last: Reading | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if settings.poll_interval_s > 0:
            self._last = super().read(self.clock.time())
            self._thread = threading.Thread(target=self._poll, name=f"w1-{settings.id}", daemon=True)
            self._thread.start()

    def read(self, now: float) -> Reading:
        if self._thread is None:
            return super().read(now)
        last = self._last
        assert last is not None
        # A poll stuck on the bus must not serve its last value as fresh for ever.
        silent = now - last.timestamp
        if silent > 3 * max(self.settings.poll_interval_s, self.CONVERSION_S):
            return self._invalid(now, f"no reading for {silent:.1f} s: the 1-wire bus does not answer")
        return last

    def _poll(self) -> None:
        while not self._stop.wait(self.settings.poll_interval_s):
            self._last = super().read(self.clock.time())

    def _sample(self) -> float:
        lines = self.path.read_text(encoding="ascii").splitlines()
        if len(lines) < 2 or not lines[0].rstrip().endswith("YES"):
            raise ValueError("CRC check failed")
        _, _, raw = lines[1].rpartition("t=")
        value = int(raw) / 1000.0
        if value == self.POWER_ON_VALUE:
            raise ValueError("power-on value 85 C: the sensor has not converted yet")
        return value

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


SensorBuilder = Callable[[Any, Factory], Sensor]


def _digital(s: DigitalSettings, factory: Factory) -> Sensor:
    device = DigitalInputDevice(s.pin, pull_up=s.active_low, pin_factory=factory)
    return GpiozeroSensor(s, device, lambda d: d.value)


def _mcp3008(s: MCP3008Settings, factory: Factory) -> Sensor:
    device = MCP3008(channel=s.channel, device=s.chip_select, pin_factory=factory)
    return GpiozeroSensor(s, device, lambda d: d.value * s.scale + s.offset)


def _sampled(read: Callable[[Any], float]) -> Callable[[Any], float]:
    """For gpiozero's smoothed devices, built with partial=True so a read never blocks the tick.

    Without samples (no echo yet, a charge that never completes) gpiozero would report 0.0, a
    plausible value; that is a failed read. gpiozero has no public way to ask, hence `_queue`.
    """
    def sample(device: Any) -> float:
        if not device._queue.queue:
            raise ValueError("no sample yet: check the wiring")
        return read(device)

    return sample


def _light(s: LightSettings, factory: Factory) -> Sensor:
    device = LightSensor(s.pin, partial=True, pin_factory=factory)
    return GpiozeroSensor(s, device, _sampled(lambda d: d.value * s.scale))


def _distance(s: DistanceSettings, factory: Factory) -> Sensor:
    device = DistanceSensor(echo=s.echo, trigger=s.trigger, max_distance=s.max_distance, partial=True,
                            pin_factory=factory)
    return GpiozeroSensor(s, device, _sampled(lambda d: d.distance))


def _cpu_temperature(s: CPUTemperatureSettings, factory: Factory) -> Sensor:
    device = CPUTemperature(sensor_file=s.sensor_file, pin_factory=factory)
    return GpiozeroSensor(s, device, lambda d: d.temperature)


_BUILDERS: dict[type[SensorSettings], SensorBuilder] = {
    DigitalSettings: _digital, MCP3008Settings: _mcp3008, LightSettings: _light,
    DistanceSettings: _distance, CPUTemperatureSettings: _cpu_temperature,
}



def build(settings: SensorSettings, factory: Factory, clock: Clock) -> Sensor:
    if isinstance(settings, DS18B20Settings):
        return DS18B20(settings, clock)
    return _BUILDERS[type(settings)](settings, factory)
