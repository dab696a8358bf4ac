"""A hobby servo (gpiozero AngularServo); states are an angle or 'detached' (no pulses).

`max_speed` limits how fast it is moved, in degrees per second. It is on while it gets pulses (holding
a position, whatever the angle). Home Assistant sees a number slider.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Mapping

from pi_controller.contract import number
from pi_controller.devices.actuators import Actuator, Note, OnePinSettings, PlotPanel, Target, ramp
from pi_controller.schema import bounded

if TYPE_CHECKING:
    from gpiozero.pins import Factory
    from gpiozero.pins.mock import MockFactory, MockPin



@dataclass(frozen=True, kw_only=True)
class ServoSettings(OnePinSettings):
    kind: Literal["servo"]
    min_angle: float = -90.0
    max_angle: float = 90.0
    min_pulse_ms: float = bounded(0.1, 5, default=1.0)
    max_pulse_ms: float = bounded(0.1, 5, default=2.0)
    frame_ms: float = bounded(5, 100, default=20.0)
    max_speed: float | None = bounded(0.01, 1e6, default=None)
    safe_state: float | Literal["detached"] = "detached"
    startup_state: float | Literal["detached"] | None = None
    shutdown_state: float | Literal["detached"] | None = None

    def target(self, state: Any) -> Target:
        if state == "detached":
            return None
        if not self.min_angle <= state <= self.max_angle:
            raise ValueError(f"angle {state:g} is outside min_angle..max_angle")
        return float(state)

    def __post_init__(self) -> None:
        if self.min_angle >= self.max_angle:
            raise ValueError(f"min_angle {self.min_angle:g} must be below max_angle {self.max_angle:g}")
        if not self.min_pulse_ms < self.max_pulse_ms < self.frame_ms:
            raise ValueError("pulse widths must satisfy min_pulse_ms < max_pulse_ms < frame_ms")
        super().__post_init__()

    def actuator(self, factory: Factory | None, target: Target) -> Actuator:
        from gpiozero import AngularServo

        return Servo(self, AngularServo(self.pin, initial_angle=target, min_angle=self.min_angle,
                                        max_angle=self.max_angle, min_pulse_width=self.min_pulse_ms / 1000,
                                        max_pulse_width=self.max_pulse_ms / 1000, frame_width=self.frame_ms / 1000,
                                        pin_factory=factory), target)

    def entity(self) -> tuple[str, dict[str, Any]]:
        return "number", {"value_template": "{{ value_json.angle }}", "min": self.min_angle, "max": self.max_angle,
                          "step": 1, "unit_of_measurement": "°", "mode": "slider"}

    def power(self, value: Target) -> float:
        return 0.0 if value is None else 1.0  # powered while it gets pulses

    def summary(self, switches: int, share: float, energy: str) -> str:
        return f"(servo): powered {share:.1f} % of the time"

    def panel(self, switches: int, share: float) -> PlotPanel:
        return PlotPanel("angle °", "angle", "commanded angle, and where the servo is",
                         (self.min_angle - 5, self.max_angle + 5), with_models=True)

    def probe(self, factory: MockFactory) -> AngleProbe:
        return AngleProbe(factory.pin(self.pin), self)


class Servo(Actuator):
    kind = "servo"
    actions = ("set_angle", "set_low")
    settings: ServoSettings

    def command(self, action: str, parameters: Mapping[str, Any]) -> Target:
        if action == "set_low":
            return None
        if action == "set_angle":
            return number(parameters, "angle", self.settings.min_angle, self.settings.max_angle)
        raise self._unknown(action)

    def parse_entity(self, data: Any) -> tuple[str, dict[str, Any]] | None:
        """The number entity's value."""
        return None if isinstance(data, (dict, list, str)) else ("set_angle", {"angle": data})

    # Holding a position, 0 degrees as much as any other: `target is not None`, in C (see `Actuator.is_on`).
    is_on = staticmethod(functools.partial(operator.is_not, None))

    def shapes(self) -> bool:
        return self.settings.max_speed is not None

    def shape(self, wanted: Target, dt: float, off_for: float) -> tuple[Target, Note]:
        return ramp(self.target, wanted, self.settings.max_speed, dt)

    def _write(self, target: Target) -> None:
        if target is None:
            self.device.detach()
        else:
            self.device.angle = target

    def _describe(self, target: Target) -> dict[str, Any]:
        return {"type": "servo", "on": target is not None, "value": target, "angle": target}


class AngleProbe:
    """A servo's commanded angle, from the pulse width on its mock pin; while detached (no pulses)
    the last one, and before any, the middle of its range."""

    def __init__(self, pin: MockPin, settings: ServoSettings):
        self.pin = pin
        self.settings = settings
        self._last = (settings.min_angle + settings.max_angle) / 2

    def level(self) -> float:
        s = self.settings
        if self.pin.state:
            pulse_ms = self.pin.state * s.frame_ms
            share = (pulse_ms - s.min_pulse_ms) / (s.max_pulse_ms - s.min_pulse_ms)
            self._last = s.min_angle + share * (s.max_angle - s.min_angle)
        return self._last
