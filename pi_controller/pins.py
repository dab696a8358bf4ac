"""Pin factories: the only difference between a Raspberry Pi and a simulated run.

On a Pi the factory is pinned to lgpio (gpiozero's fallback chain ends in confusing errors on a Pi 5
when lgpio is missing). Simulated runs use gpiozero's MockFactory with PWM-capable pins; sensors that
time a capacitor's charge or an ultrasonic echo get the mock pin classes that can do so.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable, NoReturn

from gpiozero import Device
from gpiozero.pins import Factory
from gpiozero.pins.mock import (MockChargingPin, MockFactory, MockPWMPin, MockSPIClockPin, MockSPISelectPin,
                                MockTriggerPin)

from pi_controller.config import Settings
from pi_controller.hardware import HardwareError
from pi_controller.sensors import SPI0_PINS, SPI0_SELECT, DistanceSettings, LightSettings, MCP3008Settings


class _ChargingPin(MockChargingPin, MockPWMPin):
    """A charging pin the PWM-pin factory accepts (it refuses a non-PWM pin in a PWM factory)."""


class _TriggerPin(MockTriggerPin, MockPWMPin):
    """A trigger pin that echoes on its partner pin, accepted by the PWM-pin factory."""


class SPIClockPin(MockSPIClockPin, MockPWMPin):
    """A clock pin a simulated SPI device can listen on, accepted by the PWM-pin factory."""

    def _get_state(self) -> bool:
        return bool(super()._get_state())  # MockSPIDevice xors it with bools; a PWM pin holds floats


class SPISelectPin(MockSPISelectPin, MockPWMPin):
    """A chip-select pin a simulated SPI device can listen on, accepted by the PWM-pin factory."""


def make_factory(settings: Settings, simulate: bool) -> Factory:
    """The factory every device is built on, also made gpiozero's default.

    Devices get it explicitly, but gpiozero 2.0.1's software SPI bus builds its own device without
    passing the factory on, so it must be the default too, or an MCP3008 on mock pins fails with
    "Unable to load any default pin factory!".
    """
    if simulate or settings.pins.factory == "mock":
        factory: Factory = mock_factory(settings)
    else:
        factory = _lgpio_factory()
    Device.pin_factory = factory
    return factory


def _lgpio_factory() -> Factory:
    try:
        from gpiozero.pins.lgpio import LGPIOFactory

        return LGPIOFactory()
    except Exception as exc:  # gpiozero raises several kinds here: no Pi, no lgpio, no permission
        raise HardwareError(f"cannot open the Pi's GPIO through lgpio ({type(exc).__name__}: {exc}); not on a "
                            f"Pi? run with --simulate or set pins.factory: mock. On a Pi: is the user in the "
                            f"'gpio' group?") from exc


def mock_factory(settings: Settings) -> MockFactory:
    factory = MockFactory(pin_class=MockPWMPin)
    for sensor in settings.sensors:
        if isinstance(sensor, LightSettings):
            factory.pin(sensor.pin, pin_class=_ChargingPin)
        elif isinstance(sensor, DistanceSettings):
            echo = factory.pin(sensor.echo)
            factory.pin(sensor.trigger, pin_class=_TriggerPin, echo_pin=echo)
        elif isinstance(sensor, MCP3008Settings):
            # So that a simulated chip can be attached to the bus at any time.
            factory.pin(SPI0_PINS["clock"], pin_class=SPIClockPin)
            factory.pin(SPI0_SELECT[sensor.chip_select], pin_class=SPISelectPin)
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
