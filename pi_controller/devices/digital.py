"""A PIR motion sensor, a button or a line sensor: a GPIO input read as 0 or 1."""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Literal

from pi_controller.clock import Clock
from pi_controller.devices.sensors import BINARY_TEMPLATE, I2C_PINS, GpiozeroSensor, Sensor, SensorSettings
from pi_controller.schema import bcm_pin

if TYPE_CHECKING:
    from gpiozero.pins import Factory
    from gpiozero.pins.mock import MockPin

    from pi_controller.devices.simulation import SimulatedBoard


@dataclass(frozen=True, kw_only=True)
class DigitalSettings(SensorSettings):
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

    def sensor(self, factory: Factory | None, clock: Clock) -> Sensor:
        from gpiozero import DigitalInputDevice

        device = DigitalInputDevice(self.pin, pull_up=self.active_low, pin_factory=factory)
        return GpiozeroSensor(self, device, attrgetter("value"))  # no Python frame per read

    def entity(self) -> tuple[str, dict[str, Any]]:
        klass = {"motion": "motion"}.get(self.kind)
        return "binary_sensor", {"value_template": BINARY_TEMPLATE,
                                 **({"device_class": klass} if klass else {})}

    def port(self, board: SimulatedBoard) -> DigitalPort:
        return DigitalPort(board.factory.pin(self.pin), self.active_low)


class DigitalPort:
    def __init__(self, pin: MockPin, active_low: bool):
        self.pin = pin
        self.active_low = active_low

    def set(self, value: float) -> None:
        if (value >= 0.5) != self.active_low:
            self.pin.drive_high()
        else:
            self.pin.drive_low()
