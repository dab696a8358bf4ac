"""A relay (gpiozero OutputDevice): on or off."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Mapping

from pi_controller.devices.actuators import Actuator, OnePinSettings, PinProbe, PlotPanel, Target

if TYPE_CHECKING:
    from gpiozero.pins import Factory
    from gpiozero.pins.mock import MockFactory


SWITCH = {"payload_on": "ON", "payload_off": "OFF", "state_on": "ON", "state_off": "OFF"}


@dataclass(frozen=True, kw_only=True)
class RelaySettings(OnePinSettings):
    kind: Literal["relay"]
    active_high: bool = True
    safe_state: Literal["off", "on"] = "off"
    startup_state: Literal["off", "on"] | None = None
    shutdown_state: Literal["off", "on"] | None = None

    def target(self, state: Any) -> Target:
        return 1.0 if state == "on" else 0.0

    def actuator(self, factory: Factory | None, target: Target) -> Actuator:
        from gpiozero import OutputDevice

        return Relay(self, OutputDevice(self.pin, active_high=self.active_high, initial_value=bool(target),
                                        pin_factory=factory), target)

    def entity(self) -> tuple[str, dict[str, Any]]:
        return "switch", {"value_template": "{{ 'ON' if value_json.on else 'OFF' }}", **SWITCH}

    def power(self, value: Target) -> float:
        return float(value or 0.0)

    def summary(self, switches: int, share: float, energy: str) -> str:
        return f"(relay): {switches} switches, on {share:.1f} % of the time: {energy}"

    def panel(self, switches: int, share: float) -> PlotPanel:
        return PlotPanel("relay", "binary", f"{switches} switches, on {share:.1f} %")

    def probe(self, factory: MockFactory) -> PinProbe:
        return PinProbe(factory.pin(self.pin), self.active_high)


def on_off(data: Any) -> tuple[str, dict[str, Any]] | None:
    """A switch's "ON"/"OFF"."""
    return (("set_high" if data == "ON" else "set_low"), {}) if data in ("ON", "OFF") else None


class Relay(Actuator):
    kind = "relay"
    actions = ("set_high", "set_low")

    def command(self, action: str, parameters: Mapping[str, Any]) -> Target:
        if action == "set_high":
            return 1.0
        if action == "set_low":
            return 0.0
        raise self._unknown(action)

    def parse_entity(self, data: Any) -> tuple[str, dict[str, Any]] | None:
        return on_off(data)

    def _write(self, target: Target) -> None:
        self.device.value = bool(target)

    def _describe(self, target: Target) -> dict[str, Any]:
        return {"type": "relay", "on": bool(target), "value": int(bool(target))}
