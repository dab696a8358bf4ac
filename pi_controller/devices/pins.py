"""Pin factories: the only difference between a Raspberry Pi and a simulated run.

On a Pi the factory is pinned to lgpio (gpiozero's fallback chain ends in confusing errors on a Pi 5
when lgpio is missing). Simulated runs use gpiozero's MockFactory with PWM-capable pins; sensors that
time a capacitor's charge or an ultrasonic echo get the mock pin classes that can do so.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Iterable, NoReturn, Protocol

from gpiozero import Device
from gpiozero.mixins import SharedMixin
from gpiozero.pins import SPI, Factory
from gpiozero.pins.mock import MockChargingPin, MockFactory, MockPWMPin, MockTriggerPin

from pi_controller.config import Settings
from pi_controller.devices.hardware import HardwareError
from pi_controller.devices.kernel_files import SimulatedFile


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


def factory_kind(settings: Settings, simulate: bool) -> str:
    """The pin factory a run gets: "lgpio" on a Pi, "mock" simulated (--simulate, or pins.factory: mock)."""
    return "mock" if simulate or settings.pins.factory == "mock" else "lgpio"


def make_factory(settings: Settings, simulate: bool) -> Factory:
    """The factory every device is built on, also made gpiozero's default.

    Devices get it explicitly, but gpiozero 2.0.1's software SPI bus builds its own device without
    passing the factory on, so it must be the default too, or an MCP3008 on software SPI fails with
    "Unable to load any default pin factory!".
    """
    if factory_kind(settings, simulate) == "mock":
        factory: Factory = mock_factory(settings)
    else:
        factory = _lgpio_factory()
    Device.pin_factory = factory
    return factory


def reentrant_reservations(factory: Factory) -> None:
    """gpiozero 2.0.1 reserves pins under a plain Lock, and a shared SPI bus left in a reference cycle
    releases its pins from `__del__`: a garbage collection that starts inside `reserve_pins` (a new
    MCP3008 allocating) then waits for the lock its own thread holds, and the process hangs. A
    re-entrant lock lets that release go through; the reservations it edits are plain lists."""
    factory._res_lock = threading.RLock()


def _lgpio_factory() -> Factory:
    try:
        from gpiozero.pins.lgpio import LGPIOFactory

        factory = LGPIOFactory()
    except Exception as exc:  # gpiozero raises several kinds here: no Pi, no lgpio, no permission
        raise HardwareError(f"cannot open the Pi's GPIO through lgpio ({type(exc).__name__}: {exc}); not on a "
                            f"Pi? run with --simulate or set pins.factory: mock. On a Pi: is the user in the "
                            f"'gpio' group?") from exc
    reentrant_reservations(factory)
    return factory


def mock_factory(settings: Settings) -> SimulatedFactory:
    factory = SimulatedFactory()
    for sensor in settings.sensors:
        sensor.mock_pins(factory)
    return factory


_held: list[Any] = []


def hold(devices: Iterable[Any]) -> None:
    """Keep these devices, and so their pins' levels, until the process exits.

    gpiozero returns a pin to a floating input when its device is closed or garbage-collected, and
    at exit; a relay would then follow its board's pull resistors. Held devices are never closed,
    and `exit_holding_pins` leaves without gpiozero's exit handler, so on Raspberry Pi OS, whose kernel
    keeps a released line's output level (unless strict_gpiod is set), outputs stay where we left them.
    """
    _held.extend(devices)


def exit_holding_pins(code: int) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
