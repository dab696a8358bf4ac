"""An LDR and capacitor (gpiozero LightSensor); value = light level (0..1) * scale."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pi_controller.clock import Clock
from pi_controller.devices.sensors import I2C_PINS, GpiozeroSensor, Sensor, SensorSettings, sampled
from pi_controller.schema import bcm_pin

if TYPE_CHECKING:
    from gpiozero.pins import Factory
    from gpiozero.pins.mock import MockFactory



@dataclass(frozen=True, kw_only=True)
class LightSettings(SensorSettings):
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

    def sensor(self, factory: Factory | None, clock: Clock) -> Sensor:
        from gpiozero import LightSensor

        device = LightSensor(self.pin, partial=True, pin_factory=factory)
        return GpiozeroSensor(self, device, sampled(lambda d: d.value * self.scale))

    def mock_pins(self, factory: MockFactory) -> None:
        from pi_controller.devices.mock_pins import ChargingPin

        factory.pin(self.pin, pin_class=ChargingPin)
