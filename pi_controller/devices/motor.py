"""A DC motor on an H-bridge (gpiozero Motor): `forward` and `backward` pins, optionally `enable`.

Its target is a signed speed in percent: positive forward, negative backward, 0 stopped (its safe
state). Actions: `forward` and `backward` with `speed` 0 to 100, `stop` (and `set_low`, the off every
kind takes). A change of direction goes through stop, and the motor stays stopped for `reverse_delay_s`
before it turns the other way (a motor still spinning must not be driven backwards: current spikes,
stripped gears); after start-up it waits as well, since it may still turn from before. Home Assistant
sees a fan with a percentage and a direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Mapping

from pi_controller.contract import Rejected, number
from pi_controller.devices.actuators import Actuator, ActuatorSettings, Note, PlotPanel, Target
from pi_controller.schema import bcm_pin, bounded

if TYPE_CHECKING:
    from gpiozero.pins import Factory
    from gpiozero.pins.mock import MockFactory, MockPin


Speed = Literal["stopped"] | float


@dataclass(frozen=True, kw_only=True)
class MotorSettings(ActuatorSettings):
    kind: Literal["motor"]
    forward: int = bcm_pin()
    backward: int = bcm_pin()
    enable: int | None = bcm_pin(default=None)  # held high while the motor is claimed, for boards that need it
    reverse_delay_s: float = bounded(0, 60, default=0.5)
    safe_state: Literal["stopped"] = "stopped"
    startup_state: Speed | None = None  # "stopped" or a signed speed in percent
    shutdown_state: Speed | None = None

    def pins(self) -> dict[str, int]:
        return {"forward": self.forward, "backward": self.backward,
                **({"enable": self.enable} if self.enable is not None else {})}

    def __post_init__(self) -> None:
        if len(set(self.pins().values())) < len(self.pins()):
            raise ValueError("forward, backward and enable must be different pins")
        super().__post_init__()

    def target(self, state: Any) -> Target:
        if state == "stopped":
            return 0.0
        if not -100 <= state <= 100:
            raise ValueError(f"speed {state:g} is outside -100..100 (negative: backward)")
        return float(state)

    def actuator(self, factory: Factory | None, target: Target) -> Actuator:
        from gpiozero import Motor as GpiozeroMotor

        device = GpiozeroMotor(self.forward, self.backward, enable=self.enable, pin_factory=factory)
        device.value = (target or 0.0) / 100.0
        return Motor(self, device, target)

    def entity(self) -> tuple[str, dict[str, Any]]:
        """A fan: on/off, a percentage and a direction, all read from the one state topic and sent to the
        one command topic (Home Assistant sends the percentage as a whole number)."""
        return "fan", {"state_value_template": "{{ 'ON' if value_json.on else 'OFF' }}",
                       "payload_on": "ON", "payload_off": "OFF",
                       "percentage_value_template": "{{ value_json.speed | round | int }}", "speed_range_min": 1,
                       "speed_range_max": 100,
                       "direction_value_template":
                           "{{ 'reverse' if value_json.direction == 'backward' else 'forward' }}"}

    def power(self, value: Target) -> float:
        return abs(value or 0.0) / 100.0

    def summary(self, switches: int, share: float, energy: str) -> str:
        return f"(motor): {switches} starts and stops, mean speed {share:.1f} %: {energy}"

    def panel(self, switches: int, share: float) -> PlotPanel:
        return PlotPanel("speed % (< 0 backward)", "duty", f"{switches} starts and stops, mean speed {share:.1f} %",
                         (-105, 105))

    def probe(self, factory: MockFactory) -> MotorProbe:
        enable = factory.pin(self.enable) if self.enable is not None else None
        return MotorProbe(factory.pin(self.forward), factory.pin(self.backward), enable)


class Motor(Actuator):
    kind = "motor"
    actions = ("forward", "backward", "stop", "set_low")
    settings: MotorSettings
    level_follows_on = True  # Home Assistant's fan.turn_on: ON, then the percentage

    def __init__(self, settings: MotorSettings, device: Any, claimed: Target):
        super().__init__(settings, device, claimed)
        self.direction = _sign(claimed)  # of its last run; 0: not known (it may still turn from before)
        self.speed = 100.0  # what "ON" alone starts it at: the last speed an operator set, as a light's brightness

    def command(self, action: str, parameters: Mapping[str, Any]) -> Target:
        if action in ("stop", "set_low"):
            return 0.0
        if action in ("forward", "backward"):
            speed = number(parameters, "speed", 0.0, 100.0)
            return speed if action == "forward" or not speed else -speed
        raise self._unknown(action)

    def parse_entity(self, data: Any) -> tuple[str, dict[str, Any]] | None:
        """The fan's "ON"/"OFF", a percentage, or a direction ("forward"/"reverse"); a speed keeps the
        direction and a direction the speed; "ON" when stopped starts it at the last speed set."""
        speed = abs(self.target or 0.0)
        way = "backward" if self.direction < 0 else "forward"
        if data == "OFF":
            return "stop", {}
        if data == "ON":
            return way, {"speed": speed or self.speed}
        if data in ("forward", "reverse"):
            if not speed:
                raise Rejected("malformed", "the motor is stopped: set its speed, then its direction")
            return ("forward" if data == "forward" else "backward"), {"speed": speed}
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return way, {"speed": data}
        return None

    def overridden(self, target: Target) -> None:
        if target:
            self.speed = abs(target)

    def shapes(self) -> bool:
        return self.settings.reverse_delay_s > 0

    def shape(self, wanted: Target, dt: float, off_for: float) -> tuple[Target, Note]:
        """Through stop, and `reverse_delay_s` stopped, before it turns the other way."""
        delay, current = self.settings.reverse_delay_s, self.target or 0.0
        if not wanted:
            return wanted, None  # stopping is never held back
        if current and _sign(current) != _sign(wanted):
            return 0.0, ("reverse_delay", f"stopping before it turns the other way (reverse_delay_s {delay:g})")
        if not current and _sign(wanted) != self.direction and off_for < delay:
            return 0.0, ("reverse_delay", f"stopped {off_for:.1f} s ago; reverse_delay_s {delay:g}")
        return wanted, None

    def _write(self, target: Target) -> None:
        self.device.value = (target or 0.0) / 100.0
        self.direction = _sign(target) or self.direction

    def _describe(self, target: Target) -> dict[str, Any]:
        speed = target or 0.0
        direction = "forward" if speed > 0 else "backward" if speed < 0 else "stopped"
        return {"type": "motor", "on": speed != 0, "value": speed, "speed": abs(speed), "direction": direction}


def _sign(target: Target) -> int:
    return 0 if not target else 1 if target > 0 else -1


class MotorProbe:
    """The motor's signed drive from its mock pins: -1 (full backward) to 1 (full forward)."""

    def __init__(self, forward: MockPin, backward: MockPin, enable: MockPin | None):
        self.forward, self.backward, self.enable = forward, backward, enable

    def level(self) -> float:
        enabled = 1.0 if self.enable is None else float(self.enable.state)
        return (float(self.forward.state) - float(self.backward.state)) * enabled
