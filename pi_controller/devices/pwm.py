"""A PWM output (LED strip, heater element, fan; gpiozero PWMOutputDevice); duties in percent.

A commanded duty above `max_duty` is rejected; one between 0 and `min_duty` means off (a motor or lamp
that cannot run that low), as ESPHome's min_power. `max_rate` limits the change of duty in percent per
second (soft start); going to a safe state is never slowed down. Home Assistant sees a JSON-schema
light whose brightness is the duty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Mapping

from pi_controller.contract import Rejected, number
from pi_controller.devices.actuators import Actuator, Note, OnePinSettings, PinProbe, PlotPanel, Target, ramp
from pi_controller.devices.relay import on_off
from pi_controller.schema import bounded

if TYPE_CHECKING:
    from gpiozero.pins import Factory
    from gpiozero.pins.mock import MockFactory



@dataclass(frozen=True, kw_only=True)
class PwmSettings(OnePinSettings):
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

    def actuator(self, factory: Factory | None, target: Target) -> Actuator:
        from gpiozero import PWMOutputDevice

        return Pwm(self, PWMOutputDevice(self.pin, active_high=self.active_high, initial_value=(target or 0.0) / 100.0,
                                         frequency=self.frequency, pin_factory=factory), target)

    def entity(self) -> tuple[str, dict[str, Any]]:
        # Full brightness is the output's max_duty, and brightness is the duty in percent.
        return "light", {"schema": "json", "supported_color_modes": ["brightness"], "brightness_scale": self.max_duty}

    def entity_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        return {"state": "ON" if state["on"] else "OFF", "brightness": state["duty_cycle"], "color_mode": "brightness"}

    def power(self, value: Target) -> float:
        return (value or 0.0) / 100.0

    def summary(self, switches: int, share: float, energy: str) -> str:
        return f"(pwm): {switches} switches, mean duty {share:.1f} %: {energy}"

    def panel(self, switches: int, share: float) -> PlotPanel:
        return PlotPanel("duty %", "duty", f"{switches} switches, mean duty {share:.1f} %", (0, 105))

    def probe(self, factory: MockFactory) -> PinProbe:
        return PinProbe(factory.pin(self.pin), self.active_high)


class Pwm(Actuator):
    kind = "pwm"
    actions = ("set_high", "set_low", "pwm")
    settings: PwmSettings

    def __init__(self, settings: PwmSettings, device: Any, claimed: Target):
        super().__init__(settings, device, claimed)
        self.brightness = settings.max_duty  # what "ON" alone turns it on at: the last brightness set

    def command(self, action: str, parameters: Mapping[str, Any]) -> Target:
        if action == "set_low":
            return 0.0
        if action == "set_high":
            duty = 100.0
        elif action == "pwm":
            given = parameters.get("duty_cycle")
            # A plain number in range, as nearly every command has it, needs none of `number`'s other checks
            # (NaN and the infinities are out of range): a call less for every command of every tick.
            duty = (float(given) if (type(given) is float or type(given) is int) and 0.0 <= given <= 100.0
                    else number(parameters, "duty_cycle", 0.0, 100.0))
        else:
            raise self._unknown(action)
        if duty > self.settings.max_duty:  # checked here, not in a helper: a call less for every command
            raise Rejected("above_max_duty",
                           f"duty_cycle {duty:g} is above this output's max_duty {self.settings.max_duty:g}")
        return duty

    def parse_entity(self, data: Any) -> tuple[str, dict[str, Any]] | None:
        """The JSON-schema light's {"state", "brightness"}, either alone (a brightness alone turns it
        on, as Zigbee2MQTT's lights), or a plain "ON"/"OFF". On without a brightness is the last
        brightness an operator set (its max_duty before any)."""
        if isinstance(data, dict) and (data.get("state") in ("ON", "OFF") or "brightness" in data):
            if data.get("state") == "OFF":
                return "set_low", {}
            return "pwm", {"duty_cycle": data.get("brightness", self.brightness)}
        if data == "ON":
            return "pwm", {"duty_cycle": self.brightness}
        return on_off(data)

    def overridden(self, target: Target) -> None:
        if target:
            self.brightness = target

    def shapes(self) -> bool:
        return bool(self.settings.min_duty or self.settings.max_rate)

    def shape(self, wanted: Target, dt: float, off_for: float) -> tuple[Target, Note]:
        """A duty below min_duty is off; max_rate limits the change per second."""
        s, note = self.settings, None
        if wanted is not None and 0 < wanted < s.min_duty:
            note, wanted = ("min_duty", f"duty {wanted:g} is below min_duty {s.min_duty:g}: off"), 0.0
        target, ramping = ramp(self.target, wanted, s.max_rate, dt)
        return target, note or ramping

    def _write(self, target: Target) -> None:
        self.device.value = (target or 0.0) / 100.0

    def _describe(self, target: Target) -> dict[str, Any]:
        duty = target or 0.0
        return {"type": "pwm", "on": duty > 0, "value": duty, "duty_cycle": duty}
