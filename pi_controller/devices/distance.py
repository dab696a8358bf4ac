"""An HC-SR04 ultrasonic sensor (gpiozero DistanceSensor), in metres."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pi_controller.clock import Clock
from pi_controller.devices.sensors import I2C_PINS, GpiozeroSensor, Sensor, SensorSettings, sampled
from pi_controller.schema import bcm_pin, bounded

if TYPE_CHECKING:
    from gpiozero.pins import Factory
    from gpiozero.pins.mock import MockFactory



@dataclass(frozen=True, kw_only=True)
class DistanceSettings(SensorSettings):
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

    def sensor(self, factory: Factory | None, clock: Clock) -> Sensor:
        from gpiozero import DistanceSensor

        device = DistanceSensor(echo=self.echo, trigger=self.trigger, max_distance=self.max_distance, partial=True,
                                pin_factory=factory)
        return GpiozeroSensor(self, device, sampled(lambda d: d.distance))

    def mock_pins(self, factory: MockFactory) -> None:
        from pi_controller.devices.mock_pins import TriggerPin

        echo = factory.pin(self.echo)
        factory.pin(self.trigger, pin_class=TriggerPin, echo_pin=echo)
