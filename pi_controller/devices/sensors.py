"""What every sensor kind has, and the hooks through which the rest of the daemon asks a kind.

A sensor turns whatever its hardware does into a `Reading`: a number with its unit and timestamp, or
an invalid reading that says why. A read never raises: a failing sensor is data for the plugins, not
a reason for the loop to stop.

A kind is one module (`digital`, `mcp3008`, `light`, `distance`, `cpu_temperature`, `ds18b20`) with
its settings class (the config schema), listed in `registry`. The settings build the sensor on its
gpiozero device (importing gpiozero only then: `check-config` never loads it), and answer for its Home
Assistant entity, its mock pins and its port for the simulation models.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from pi_controller.clock import Clock
from pi_controller.contract import Reading
from pi_controller.schema import bounded, device_id

if TYPE_CHECKING:
    from gpiozero.pins import Factory
    from gpiozero.pins.mock import MockFactory

    from pi_controller.devices.simulation import Port, SimulatedBoard

I2C_PINS = (2, 3)  # fixed 1.8 kOhm pull-ups on the board: no input there can pull down

# unit in the config -> (device_class, unit Home Assistant expects, decimals worth showing and sending)
UNITS = {
    "celsius": ("temperature", "°C", 1), "fahrenheit": ("temperature", "°F", 1), "lux": ("illuminance", "lx", 0),
    "m": ("distance", "m", 2), "cm": ("distance", "cm", 0), "V": ("voltage", "V", 2), "%": (None, "%", 0),
}
DEFAULT_PRECISION = 2  # decimals for a unit not listed
# A failed read (value null) is Home Assistant's "None": unknown, not "Clear" (OFF).
BINARY_TEMPLATE = "{% if value_json.value is none %}None{% elif value_json.value %}ON{% else %}OFF{% endif %}"


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
    # Decimals shown in Home Assistant and sent over MQTT; default: what suits the unit (UNITS).
    precision: int | None = bounded(0, 6, default=None)

    def __post_init__(self) -> None:
        if self.valid_min is not None and self.valid_max is not None and self.valid_min >= self.valid_max:
            raise ValueError(f"valid_min {self.valid_min:g} must be below valid_max {self.valid_max:g}")

    def pins(self) -> dict[str, int]:
        """Pins this sensor claims for itself alone, by config key."""
        return {}

    def bus_pins(self) -> dict[str, int]:
        """Pins shared with other devices on the same bus (SPI)."""
        return {}

    # The kind's hooks ------------------------------------------------------------------------

    def sensor(self, factory: Factory | None, clock: Clock) -> Sensor:
        """The sensor on its device, claimed on `factory`."""
        raise NotImplementedError

    def decimals(self) -> int | None:
        """The value's decimals on the wire and in Home Assistant; None for an on/off reading."""
        if self.unit == "boolean":
            return None
        if self.precision is not None:
            return self.precision
        return UNITS.get(self.unit, (None, None, DEFAULT_PRECISION))[2]

    def entity(self) -> tuple[str, dict[str, Any]]:
        """Home Assistant's platform for this sensor and what its discovery config adds to the name
        and state topic."""
        if self.unit == "boolean":
            return "binary_sensor", {"value_template": BINARY_TEMPLATE}
        device_class, unit, _ = UNITS.get(self.unit, (None, self.unit, None))
        return "sensor", {"value_template": "{{ value_json.value }}", "unit_of_measurement": unit,
                          "state_class": "measurement", "suggested_display_precision": self.decimals(),
                          **({"device_class": device_class} if device_class else {})}

    def simulated(self) -> SensorSettings:
        """These settings as a simulated run reads them (on a virtual clock, nothing may wait in real time)."""
        return self

    def mock_pins(self, factory: MockFactory) -> None:
        """Give its pins the mock classes that can play its hardware, before anything claims them."""

    def port(self, board: SimulatedBoard) -> Port | None:
        """Where a simulation model writes its physical value; None if no model can."""
        return None


class Sensor:
    """Reads one value; subclasses implement `_sample` and may raise, `read` never does."""

    _sample: Callable[[], float]  # a method of the kind's, or a callable set by the instance (GpiozeroSensor)

    def __init__(self, settings: SensorSettings):
        self.settings = settings

    def read(self, now: float) -> Reading:
        """What the tick reads: a sample, checked (`sample`); a kind may serve one taken on its own thread."""
        return sample(sampling((self,)), now)[0]

    def _invalid(self, now: float, why: str) -> Reading:
        return Reading(self.settings.id, None, self.settings.unit, now, why)

    def close(self) -> None:
        """Release the pins and threads the sensor holds."""


# What `sample` needs of a sensor: its sample function, id, unit and valid range (min, max).
Sampling = tuple[Callable[[], float], str, str, float | None, float | None]


def sampling(sensors: Iterable[Sensor]) -> list[Sampling]:
    """What `sample` needs of each sensor, taken once when the sensors are set (`Hardware.set_sensors`): a paced
    tick then touches one tuple a sensor, not the sensor and its settings (about 7 us a tick at 12 sensors here,
    in paced ticks taking turns)."""
    return [(s._sample, s.settings.id, s.settings.unit, s.settings.valid_min, s.settings.valid_max) for s in sensors]


def sample(sensors: Iterable[Sampling], now: float) -> list[Reading]:
    """Each sensor's value now, checked: a sample that fails, is not finite or is outside the sensor's valid
    range is an invalid reading that says why. All of them in one frame: the tick reads every sensor every
    tick, and on a paced tick each Python call of ours costs about a microsecond (`Hardware.read`)."""
    readings = []
    for read, sensor_id, unit, low, high in sensors:
        try:
            value = float(read())
        except Exception as exc:  # a sensor failure of any kind becomes an invalid reading
            why = f"{type(exc).__name__}: {exc}"
        else:
            if not math.isfinite(value):
                why = f"non-finite value {value}"
            elif low is not None and value < low:
                why = f"{value:g} is below valid_min {low:g}"
            elif high is not None and value > high:
                why = f"{value:g} is above valid_max {high:g}"
            else:
                readings.append(Reading(sensor_id, value, unit, now))
                continue
        readings.append(Reading(sensor_id, None, unit, now, why))
    return readings


class GpiozeroSensor(Sensor):
    """A sensor that is a gpiozero device and a function from it to a value."""

    def __init__(self, settings: SensorSettings, device: Any, sample: Callable[[Any], float]):
        super().__init__(settings)
        self.device = device
        # sample(device) bound once, in C: a read goes from `read` to gpiozero with no frame of ours between.
        self._sample = functools.partial(sample, device)

    def close(self) -> None:
        # A smoothed device's sampling thread first: gpiozero's DistanceSensor lets go of its trigger before
        # stopping it, and a read in between raised in that thread.
        queue = getattr(self.device, "_queue", None)
        if queue is not None and queue.is_alive():
            queue.stop()
        self.device.close()


def sampled(read: Callable[[Any], float]) -> Callable[[Any], float]:
    """For gpiozero's smoothed devices, built with partial=True so a read never blocks the tick.

    Without samples (no echo yet, a charge that never completes) gpiozero would report 0.0, a
    plausible value; that is a failed read. gpiozero has no public way to ask, hence `_queue`.
    """
    def sample(device: Any) -> float:
        if not device._queue.queue:
            raise ValueError("no sample yet: check the wiring")
        return read(device)

    return sample
