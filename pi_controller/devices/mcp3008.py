"""One channel of an MCP3008 ADC on SPI0; value = fraction of full scale * scale + offset.

A TMP36 on 3.3 V reads celsius with scale 330 and offset -50.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pi_controller.clock import Clock
from pi_controller.devices.sensors import GpiozeroSensor, Sensor, SensorSettings

if TYPE_CHECKING:
    from gpiozero.pins import Factory

    from pi_controller.devices.simulation import AdcChip, SimulatedBoard

# Pins of the Pi's SPI0 bus (BCM numbering); CE0/CE1 select the chip.
SPI0_PINS = {"clock": 11, "mosi": 10, "miso": 9}
SPI0_SELECT = {0: 8, 1: 7}


@dataclass(frozen=True, kw_only=True)
class MCP3008Settings(SensorSettings):
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

    def sensor(self, factory: Factory | None, clock: Clock) -> Sensor:
        from gpiozero import MCP3008

        device = MCP3008(channel=self.channel, device=self.chip_select, pin_factory=factory)
        return GpiozeroSensor(self, device, lambda d: d.value * self.scale + self.offset)

    def port(self, board: SimulatedBoard) -> AdcPort:
        return AdcPort(board.adc(self.chip_select), self)


class AdcPort:
    def __init__(self, adc: AdcChip, settings: MCP3008Settings):
        self.adc = adc
        self.settings = settings

    def set(self, value: float) -> None:
        self.adc.fractions[self.settings.channel] = (value - self.settings.offset) / self.settings.scale
