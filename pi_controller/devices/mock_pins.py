"""gpiozero's mock pins as a simulated run needs them: PWM-capable pins, the mock pin classes that time a
capacitor's charge or an ultrasonic echo in a PWM-pin factory, and hardware SPI that hands whole transfers
to the simulated chip on its chip-select pin. Imported only when a simulated run builds its factory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Protocol

from gpiozero.mixins import SharedMixin
from gpiozero.pins import SPI
from gpiozero.pins.mock import MockChargingPin, MockFactory, MockPWMPin, MockTriggerPin

from pi_controller.devices.hardware import reentrant_reservations
from pi_controller.devices.kernel_files import SimulatedFile

if TYPE_CHECKING:
    from pi_controller.devices.sensors import SensorSettings


class ChargingPin(MockChargingPin, MockPWMPin):
    """A charging pin the PWM-pin factory accepts (it refuses a non-PWM pin in a PWM factory)."""


class TriggerPin(MockTriggerPin, MockPWMPin):
    """A trigger pin that echoes on its partner pin, accepted by the PWM-pin factory."""


class SpiChip(Protocol):
    """A simulated chip on the SPI bus: answers a whole transfer, as the kernel's spidev would."""

    def transfer(self, words: list[int]) -> list[int]: ...


class MockHardwareSPI(SPI):
    """Hardware SPI on mock pins: whole transfers to the chip registered for the chip-select pin.

    gpiozero's own mock SPI bit-bangs every clock edge through mock pins (about half a millisecond
    per ADC read here, most of a simulated tick); a Pi's hardware SPI does not pass bits through
    Python either. Without a chip on the select pin the bus reads zeros, like a floating MISO.
    """

    def __init__(self, clock_pin: str, mosi_pin: str, miso_pin: str, select_pin: str, pin_factory: Any):
        super().__init__(pin_factory=pin_factory)
        self._select = select_pin
        self._open = True
        self.pin_factory.reserve_pins(self, clock_pin, mosi_pin, miso_pin, select_pin)

    def _conflicts_with(self, other: Any) -> bool:
        return not (isinstance(other, MockHardwareSPI) and other._select != self._select)

    @property
    def closed(self) -> bool:
        return not self._open

    def close(self) -> None:
        self._open = False
        self.pin_factory.release_all(self)
        super().close()

    def transfer(self, data: list[int]) -> list[int]:
        chip = self.pin_factory.spi_chips.get(self._select)
        return chip.transfer(list(data)) if chip is not None else [0] * len(data)


class _SharedMockHardwareSPI(SharedMixin, MockHardwareSPI):
    @classmethod
    def _shared_key(cls, clock_pin: str, mosi_pin: str, miso_pin: str, select_pin: str, pin_factory: Any) -> Any:
        return (pin_factory, clock_pin, select_pin)  # shared within one factory, not across them


class SimulatedFactory(MockFactory):
    """gpiozero's mock factory with PWM-capable pins and SPI chips that a simulation attaches."""

    def __init__(self) -> None:
        super().__init__(pin_class=MockPWMPin)
        reentrant_reservations(self)
        self.spi_chips: dict[str, SpiChip] = {}  # select pin name ("GPIO8") -> chip
        self.kernel_files: dict[str, SimulatedFile] = {}  # what sensors read under /sys, by path (kernel_files)

    def _get_spi_class(self, shared: bool, hardware: bool) -> type:
        if hardware:
            return _SharedMockHardwareSPI if shared else MockHardwareSPI
        return super()._get_spi_class(shared, hardware)


def mock_factory(sensors: Iterable[SensorSettings]) -> SimulatedFactory:
    """A simulated factory whose pins the `sensors` have given the mock classes that can play them."""
    factory = SimulatedFactory()
    for sensor in sensors:
        sensor.mock_pins(factory)
    return factory
