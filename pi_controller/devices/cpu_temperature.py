"""The Pi's own CPU temperature, from its thermal zone: millidegrees in a sysfs file, read as gpiozero's
CPUTemperature reads it. On simulated pins the zone is simulated (`kernel_files`): the laptop's own CPU is
not the Pi's; it reads `SIMULATED_C` unless a model (a room, say) drives it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pi_controller.clock import Clock
from pi_controller.devices.kernel_files import KernelFile, KernelFilePort, kernel_file
from pi_controller.devices.sensors import Sensor, SensorSettings

if TYPE_CHECKING:
    from gpiozero.pins import Factory

    from pi_controller.devices.simulation import SimulatedBoard

SIMULATED_C = 45.0  # a Pi's CPU at work, on simulated pins where no model drives it


def thermal_zone_text(celsius: float) -> str:
    return f"{round(celsius * 1000)}\n"


@dataclass(frozen=True, kw_only=True)
class CPUTemperatureSettings(SensorSettings):
    kind: Literal["cpu_temperature"]
    unit: str = "celsius"
    sensor_file: str = "/sys/class/thermal/thermal_zone0/temp"

    def sensor(self, factory: Factory | None, clock: Clock) -> Sensor:
        return CPUTemperature(self, kernel_file(self.sensor_file, factory, thermal_zone_text(SIMULATED_C)))

    def port(self, board: SimulatedBoard) -> KernelFilePort:
        return KernelFilePort(kernel_file(self.sensor_file, board.factory, thermal_zone_text(SIMULATED_C)),
                              thermal_zone_text)


class CPUTemperature(Sensor):
    def __init__(self, settings: CPUTemperatureSettings, zone: KernelFile):
        super().__init__(settings)
        self.zone = zone

    def _sample(self) -> float:
        return float(self.zone.read_text().strip()) / 1000

