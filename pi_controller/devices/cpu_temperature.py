"""The Pi's own CPU temperature (gpiozero CPUTemperature), from its thermal zone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pi_controller.clock import Clock
from pi_controller.devices.sensors import GpiozeroSensor, Sensor, SensorSettings

if TYPE_CHECKING:
    from gpiozero.pins import Factory


@dataclass(frozen=True, kw_only=True)
class CPUTemperatureSettings(SensorSettings):
    kind: Literal["cpu_temperature"]
    unit: str = "celsius"
    sensor_file: str = "/sys/class/thermal/thermal_zone0/temp"

    def sensor(self, factory: Factory | None, clock: Clock) -> Sensor:
        from gpiozero import CPUTemperature

        device = CPUTemperature(sensor_file=self.sensor_file, pin_factory=factory)
        return GpiozeroSensor(self, device, lambda d: d.temperature)
