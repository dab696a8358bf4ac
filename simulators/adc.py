"""The slave side of an MCP3008 on gpiozero's mock SPI bus, serving voltages that models set."""

from __future__ import annotations

from typing import Any

from gpiozero.pins.mock import MockFactory, MockSPIClockPin, MockSPIDevice, MockSPISelectPin

from pi_controller.pins import SPIClockPin, SPISelectPin
from pi_controller.sensors import SPI0_PINS, SPI0_SELECT

BITS = 10


class _PwmPins:
    """Gives MockSPIDevice PWM-capable SPI pins: a factory of PWM pins refuses any other pin class."""

    _VARIANTS = {MockSPIClockPin: SPIClockPin, MockSPISelectPin: SPISelectPin}

    def __init__(self, factory: MockFactory):
        self._factory = factory

    def pin(self, name: Any, pin_class: type | None = None) -> Any:
        return self._factory.pin(name, pin_class=self._VARIANTS.get(pin_class, pin_class))


class SimulatedMCP3008(MockSPIDevice):
    """Answers single-ended and differential conversions with `fractions` of full scale (0..1)."""

    def __init__(self, factory: MockFactory, chip_select: int):
        super().__init__(SPI0_PINS["clock"], SPI0_PINS["mosi"], SPI0_PINS["miso"],
                         SPI0_SELECT[chip_select], pin_factory=_PwmPins(factory))
        self.fractions = [0.0] * 8
        self._request: list[int] | None = None

    def on_start(self) -> None:
        super().on_start()
        self._request = None

    def on_bit(self) -> None:
        bit = self.rx_buf[-1]
        if self._request is None:
            if bit:  # the start bit; the four bits after it say what to convert
                self._request = []
            return
        if len(self._request) < 4:
            self._request.append(int(bit))
            if len(self._request) == 4:
                self._answer(*self._request)

    def _answer(self, single: int, c2: int, c1: int, c0: int) -> None:
        channel = c2 << 2 | c1 << 1 | c0
        level = self.fractions[channel] if single else self.fractions[channel] - self.fractions[channel ^ 1]
        # A null bit and a sample bit come before the result, as on the chip.
        self.tx_word(round(min(1.0, max(0.0, level)) * (2 ** BITS - 1)), BITS + 2)

    def forget(self) -> None:
        """Drop the bus pins' histories: gpiozero's mock pins keep every change, and a bit-banged read
        is a hundred of them, so a day of simulated reads would be gigabytes nobody looks at."""
        for pin in (self.clock_pin, self.mosi_pin, self.miso_pin, self.select_pin):
            pin.clear_states()
