"""Pin factories: the only difference between a Raspberry Pi and a simulated run.

On a Pi the factory is pinned to lgpio (gpiozero's fallback chain ends in confusing errors on a Pi 5
when lgpio is missing). Simulated runs use gpiozero's MockFactory with PWM-capable pins (`mock_pins`);
sensors that time a capacitor's charge or an ultrasonic echo get the mock pin classes that can do so.
gpiozero is imported only when a factory is made: `check-config` reads `PinSettings` without it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Literal, NoReturn

from pi_controller.devices.hardware import HardwareError, reentrant_reservations

if TYPE_CHECKING:
    from gpiozero.pins import Factory

    from pi_controller.devices.sensors import SensorSettings


@dataclass(frozen=True)
class PinSettings:
    """The config's `pins:` section."""

    factory: Literal["lgpio", "mock"] = "lgpio"


def factory_kind(pins: PinSettings, simulate: bool) -> Literal["lgpio", "mock"]:
    """The pin factory a run gets: "lgpio" on a Pi, "mock" simulated (--simulate, or pins.factory: mock)."""
    return "mock" if simulate or pins.factory == "mock" else "lgpio"


def make_factory(pins: PinSettings, sensors: Iterable[SensorSettings], simulate: bool) -> Factory:
    """The factory every device is built on, also made gpiozero's default.

    Devices get it explicitly, but gpiozero 2.0.1's software SPI bus builds its own device without
    passing the factory on, so it must be the default too, or an MCP3008 on software SPI fails with
    "Unable to load any default pin factory!".
    """
    from gpiozero import Device

    if factory_kind(pins, simulate) == "mock":
        from pi_controller.devices.mock_pins import mock_factory

        factory: Factory = mock_factory(sensors)
    else:
        factory = _lgpio_factory()
    Device.pin_factory = factory
    return factory


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
