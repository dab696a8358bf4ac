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

Target = float | None  # what an actuator is set to; None is a servo without pulses


@dataclass(frozen=True, kw_only=True)
class ActuatorSettings:
    """What every actuator has: a pin, its states for faults, start-up and shut-down, and the safety
    rules enforced between plugins and the pin (see `safety`)."""

    id: str = device_id()
    kind: str
    pin: int = bcm_pin()
    # Safety rules; "on" means a relay closed, a duty above 0, a servo holding a position.
    requires: tuple[str, ...] = ()  # sensor ids: safe state while any is invalid or stale
    min_on_s: float = bounded(0, 86400, default=0.0)
    min_off_s: float = bounded(0, 86400, default=0.0)
    max_on_s: float | None = bounded(0.1, 7 * 86400, default=None)
    # Ownership: safe state once the plugin it follows has failed for this long (None: safety's default),
    # and, when set, once this long has passed without its command being renewed (a lease).
    failsafe_after_s: float | None = bounded(0, 3600, default=None)
    command_ttl_s: float | None = bounded(0.1, 7 * 86400, default=None)

    safe_state: Any
    startup_state: Any = None  # None: the safe state
    shutdown_state: Any = None  # None: the safe state

    def pins(self) -> dict[str, int]:
        return {"pin": self.pin}

    def bus_pins(self) -> dict[str, int]:
        return {}

    def target(self, state: Any) -> Target:
        """The target a configured state stands for; raises ValueError for a state out of bounds."""
        raise NotImplementedError

    def targets(self) -> tuple[Target, Target, Target]:
        """(safe, startup, shutdown) targets."""
        safe = self.target(self.safe_state)
        pick = (lambda state: safe if state is None else self.target(state))
        return safe, pick(self.startup_state), pick(self.shutdown_state)

    def __post_init__(self) -> None:
        for name in ("safe_state", "startup_state", "shutdown_state"):
            state = getattr(self, name)
            try:
                if state is not None:
                    self.target(state)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from exc


@dataclass(frozen=True, kw_only=True)
class RelaySettings(ActuatorSettings):
    kind: Literal["relay"]
    active_high: bool = True
    safe_state: Literal["off", "on"] = "off"
    startup_state: Literal["off", "on"] | None = None
    shutdown_state: Literal["off", "on"] | None = None

    def target(self, state: Any) -> Target:
        return 1.0 if state == "on" else 0.0


@dataclass(frozen=True, kw_only=True)
class PwmSettings(ActuatorSettings):
    """A PWM output (LED strip, heater element, fan); duties in percent.

    A commanded duty above `max_duty` is rejected; one between 0 and `min_duty` means off (a motor or
    lamp that cannot run that low), as ESPHome's min_power. `max_rate` limits the change of duty in
    percent per second (soft start); going to a safe state is never slowed down.
    """

    kind: Literal["pwm"]
    active_high: bool = True
    frequency: float = bounded(1, 10_000, default=100.0)
    min_duty: float = bounded(0, 100, default=0.0)
    max_duty: float = bounded(0, 100, default=100.0)
    max_rate: float | None = bounded(0.01, 1e6, default=None)
    safe_state: float = bounded(0, 100, default=0.0)
    startup_state: float | None = bounded(0, 100, default=None)
    shutdown_state: float | None = bounded(0, 100, default=None)

    def target(self, state: Any) -> Target:
        if state != 0 and not self.min_duty <= state <= self.max_duty:
            raise ValueError(f"duty {state:g} is outside min_duty..max_duty ({self.min_duty:g}..{self.max_duty:g})")
        return float(state)

    def __post_init__(self) -> None:
        if self.min_duty > self.max_duty:
            raise ValueError(f"min_duty {self.min_duty:g} is above max_duty {self.max_duty:g}")
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class ServoSettings(ActuatorSettings):
    """A hobby servo (gpiozero AngularServo); states are an angle or 'detached' (no pulses).
    `max_speed` limits how fast it is moved, in degrees per second."""

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


KINDS: dict[str, type[ActuatorSettings]] = {
    "relay": RelaySettings, "pwm": PwmSettings, "servo": ServoSettings,
}

class Actuator:
    """Holds the last applied target and its state as the plugin context shows it."""

    kind: str
    actions: tuple[str, ...] = ()

    def __init__(self, settings: ActuatorSettings, device: Any, claimed: Target):
        self.settings = settings
        self.device = device
        self.safe_target, self.startup_target, self.shutdown_target = settings.targets()
        self.target: Target = claimed
        self.state: dict[str, Any] = self._describe(claimed)

    @property
    def id(self) -> str:
        return self.settings.id

    def command(self, action: str, parameters: Mapping[str, Any]) -> Target:
        """The target an action asks for; raises Rejected if the action or its value is not valid."""
        raise NotImplementedError

    def apply(self, target: Target, force: bool = False) -> bool:
        """Drive the device to `target`; True if anything changed. `force` writes even an unchanged
        target, so a safe state is asserted after a failed or partial write."""
        if target == self.target and not force:
            return False
        self._write(target)
        self.target = target
        self.state = self._describe(target)
        return True

    def close(self) -> None:
        self.device.close()

    def _write(self, target: Target) -> None:
        raise NotImplementedError

    def _describe(self, target: Target) -> dict[str, Any]:
        raise NotImplementedError

    def _unknown(self, action: str) -> Rejected:
        return Rejected("unknown_action", f"action '{action[:40]}' is not valid for a {self.kind}; "
                                          f"valid: {', '.join(self.actions)}")


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
        if duty > self.settings.max_duty:
            raise Rejected("above_max_duty",
                           f"duty_cycle {duty:g} is above this output's max_duty {self.settings.max_duty:g}")
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


def build(settings: ActuatorSettings, factory: Factory, state: str = "startup") -> Actuator:
    """Claim the pin already in the start-up (or another named) state, so nothing switches at boot."""
    safe, startup, shutdown = settings.targets()
    target = {"safe": safe, "startup": startup, "shutdown": shutdown}[state]
    if isinstance(settings, RelaySettings):
        return Relay(settings, OutputDevice(settings.pin, active_high=settings.active_high,
                                            initial_value=bool(target), pin_factory=factory), target)
    if isinstance(settings, PwmSettings):
        return Pwm(settings, PWMOutputDevice(settings.pin, active_high=settings.active_high,
                                             initial_value=(target or 0.0) / 100.0,
                                             frequency=settings.frequency, pin_factory=factory), target)
    if isinstance(settings, ServoSettings):
        return Servo(settings, AngularServo(settings.pin, initial_angle=target, min_angle=settings.min_angle,
                                            max_angle=settings.max_angle,
                                            min_pulse_width=settings.min_pulse_ms / 1000,
                                            max_pulse_width=settings.max_pulse_ms / 1000,
                                            frame_width=settings.frame_ms / 1000, pin_factory=factory), target)
    raise TypeError(f"no actuator for {type(settings).__name__}")
