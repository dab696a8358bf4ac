"""What a device kind and the simulation models say to each other, so that neither imports the other.

A model writes a sensor's physical value into a `Port` and reads an actuator's output from a `Probe`;
a sensor kind finds its port on the `SimulatedBoard` that a simulated run sets up (its mock pins and the
simulated chips on its buses), an actuator kind its probe on the mock pins. `pi_controller.simulators`
builds on these; nothing under `devices/` imports the models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from gpiozero.pins.mock import MockFactory


class SimulationError(Exception):
    """A model wired to a device it cannot drive or read."""


class Port(Protocol):
    """Where a model writes a sensor's physical value (in the sensor's unit)."""

    def set(self, value: float) -> None: ...


class Probe(Protocol):
    """Where a model reads an actuator's output: 0 (off) to 1 (full) for relays and PWM, the
    commanded angle in degrees for a servo, -1 (full backward) to 1 (full forward) for a motor."""

    def level(self) -> float: ...


class AdcChip(Protocol):
    """A simulated analogue-to-digital converter: each channel's input as a fraction of full scale."""

    fractions: list[float]


class SimulatedBoard(Protocol):
    """The Pi of a simulated run, as a sensor kind needs it to place its port."""

    @property
    def factory(self) -> MockFactory: ...

    def adc(self, chip_select: int) -> AdcChip:
        """The simulated ADC on this chip select, shared by the sensors on its channels."""
        ...
