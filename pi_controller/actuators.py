"""Actuator kinds: their settings, the actions they accept, and how they drive gpiozero devices.

An actuator turns a validated action into a target value, applies targets, reports its state for the
plugin context, and knows its safe state. Targets are checked against the contract's range and the
configured bounds and rejected when outside: never clamped into action.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

from gpiozero import AngularServo, OutputDevice, PWMOutputDevice
from gpiozero.pins import Factory

from pi_controller.contract import Rejected, number
from pi_controller.schema import bcm_pin, bounded, device_id


@dataclass(frozen=True, kw_only=True)
class ActuatorSettings:
    id: str = device_id()
    kind: str
    pin: int = bcm_pin()

    def pins(self) -> dict[str, int]:
        return {"pin": self.pin}

    def bus_pins(self) -> dict[str, int]:
        return {}


@dataclass(frozen=True, kw_only=True)
class RelaySettings(ActuatorSettings):
    kind: Literal["relay"]
    active_high: bool = True
    safe_state: Literal["off", "on"] = "off"


@dataclass(frozen=True, kw_only=True)
class PwmSettings(ActuatorSettings):
    """A PWM output (LED strip, heater element, fan); duties in percent.

    A commanded duty outside [min_duty, max_duty] is rejected, except 0, which is always off.
    """

    kind: Literal["pwm"]
    active_high: bool = True
    frequency: float = bounded(1, 10_000, default=100.0)
    min_duty: float = bounded(0, 100, default=0.0)
    max_duty: float = bounded(0, 100, default=100.0)
    safe_state: float = bounded(0, 100, default=0.0)

    def __post_init__(self) -> None:
        if self.min_duty > self.max_duty:
            raise ValueError(f"min_duty {self.min_duty} is above max_duty {self.max_duty}")
        if self.safe_state != 0 and not self.min_duty <= self.safe_state <= self.max_duty:
            raise ValueError(f"safe_state {self.safe_state} is outside min_duty..max_duty")


@dataclass(frozen=True, kw_only=True)
class ServoSettings(ActuatorSettings):
    """A hobby servo (gpiozero AngularServo); `safe_state` is an angle or 'detached' (no pulses)."""

    kind: Literal["servo"]
    min_angle: float = -90.0
    max_angle: float = 90.0
    min_pulse_ms: float = bounded(0.1, 5, default=1.0)
    max_pulse_ms: float = bounded(0.1, 5, default=2.0)
    frame_ms: float = bounded(5, 100, default=20.0)
    safe_state: float | Literal["detached"] = "detached"

    def __post_init__(self) -> None:
        if self.min_angle >= self.max_angle:
            raise ValueError(f"min_angle {self.min_angle} must be below max_angle {self.max_angle}")
        if self.min_pulse_ms >= self.max_pulse_ms:
            raise ValueError("min_pulse_ms must be below max_pulse_ms")
        if isinstance(self.safe_state, float) and not self.min_angle <= self.safe_state <= self.max_angle:
            raise ValueError(f"safe_state {self.safe_state} is outside min_angle..max_angle")


KINDS: dict[str, type[ActuatorSettings]] = {
    "relay": RelaySettings, "pwm": PwmSettings, "servo": ServoSettings,
}

Target = float | None  # what an actuator is set to; None is a servo without pulses


class Actuator:
    """Holds the last applied target and its state as the plugin context shows it."""

    kind: str
    actions: tuple[str, ...] = ()

    def __init__(self, settings: ActuatorSettings, device: Any, safe_target: Target):
        self.settings = settings
        self.device = device
        self.safe_target = safe_target
        self.target: Target = safe_target
        self.state: dict[str, Any] = self._describe(safe_target)

    @property
    def id(self) -> str:
        return self.settings.id

    def command(self, action: str, parameters: Mapping[str, Any]) -> Target:
        """The target an action asks for; raises Rejected if the action or its value is not valid."""
        raise NotImplementedError

    def apply(self, target: Target) -> bool:
        """Drive the device to `target`; True if anything changed."""
        if target == self.target:
            return False
        self._write(target)
        self.target = target
        self.state = self._describe(target)
        return True

    def safe(self) -> None:
        self.apply(self.safe_target)

    def close(self) -> None:
        self.device.close()

    def _write(self, target: Target) -> None:
        raise NotImplementedError

    def _describe(self, target: Target) -> dict[str, Any]:
        raise NotImplementedError

    def _unknown(self, action: str) -> Rejected:
        return Rejected(f"action '{action}' is not valid for a {self.kind}; valid: {', '.join(self.actions)}")


class Relay(Actuator):
    kind = "relay"
    actions = ("set_high", "set_low")

    def command(self, action: str, parameters: Mapping[str, Any]) -> Target:
        if action == "set_high":
            return 1.0
        if action == "set_low":
            return 0.0
        raise self._unknown(action)

    def _write(self, target: Target) -> None:
        self.device.value = bool(target)

    def _describe(self, target: Target) -> dict[str, Any]:
        return {"type": "relay", "on": bool(target), "value": int(bool(target))}


class Pwm(Actuator):
    kind = "pwm"
    actions = ("set_high", "set_low", "pwm")
    settings: PwmSettings

    def command(self, action: str, parameters: Mapping[str, Any]) -> Target:
        if action == "set_low":
            return 0.0
        if action == "set_high":
            return self._within_bounds(100.0)
        if action == "pwm":
            return self._within_bounds(number(parameters, "duty_cycle", 0.0, 100.0))
        raise self._unknown(action)

    def _within_bounds(self, duty: float) -> float:
        low, high = self.settings.min_duty, self.settings.max_duty
        if duty != 0 and not low <= duty <= high:
            raise Rejected(f"duty_cycle {duty:g} is outside this output's bounds {low:g}..{high:g} (or 0)")
        return duty

    def _write(self, target: Target) -> None:
        self.device.value = (target or 0.0) / 100.0

    def _describe(self, target: Target) -> dict[str, Any]:
        duty = target or 0.0
        return {"type": "pwm", "on": duty > 0, "value": duty, "duty_cycle": duty}


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

    def _write(self, target: Target) -> None:
        if target is None:
            self.device.detach()
        else:
            self.device.angle = target

    def _describe(self, target: Target) -> dict[str, Any]:
        return {"type": "servo", "on": target is not None, "value": target, "angle": target}


def build(settings: ActuatorSettings, factory: Factory) -> Actuator:
    """Claim the pin already in the safe state, so that nothing switches on at start-up."""
    if isinstance(settings, RelaySettings):
        on = settings.safe_state == "on"
        device = OutputDevice(settings.pin, active_high=settings.active_high, initial_value=on,
                              pin_factory=factory)
        return Relay(settings, device, 1.0 if on else 0.0)
    if isinstance(settings, PwmSettings):
        device = PWMOutputDevice(settings.pin, active_high=settings.active_high,
                                 initial_value=settings.safe_state / 100.0, frequency=settings.frequency,
                                 pin_factory=factory)
        return Pwm(settings, device, settings.safe_state)
    if isinstance(settings, ServoSettings):
        safe = None if settings.safe_state == "detached" else float(settings.safe_state)
        device = AngularServo(settings.pin, initial_angle=safe, min_angle=settings.min_angle,
                              max_angle=settings.max_angle, min_pulse_width=settings.min_pulse_ms / 1000,
                              max_pulse_width=settings.max_pulse_ms / 1000,
                              frame_width=settings.frame_ms / 1000, pin_factory=factory)
        return Servo(settings, device, safe)
    raise TypeError(f"no actuator for {type(settings).__name__}")
