"""What every actuator kind has, and the hooks through which the rest of the daemon asks a kind.

An actuator turns a validated action into a target value, applies targets, reports its state for the
plugin context, and knows its safe state. Targets are checked against the contract's range and the
configured bounds and rejected when outside: never clamped into action.

A kind is one module (`relay`, `pwm`, `servo`, `motor`) with a settings class and an actuator class,
listed in `registry`. Its settings answer what needs no device (the gpiozero device it builds, its Home
Assistant entity and payloads, its share of power and plot panel in a simulated run, its probe for the
simulation models); its actuator answers what the safety rules ask of a live device (what "on" means,
how a value is shaped towards a target). Nothing here imports gpiozero: a kind imports it when it
builds its device, so `check-config` never loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, NamedTuple

from pi_controller.contract import COMPACT, Rejected
from pi_controller.schema import bcm_pin, bounded, device_id

KNOWN_STATES = 16  # states an actuator keeps described and encoded (`Actuator._learn`)

if TYPE_CHECKING:
    from gpiozero.pins import Factory
    from gpiozero.pins.mock import MockFactory, MockPin

    from pi_controller.devices.simulation import Probe

Target = float | None  # what an actuator is set to; None is a servo without pulses
Note = tuple[str, str] | None  # (rule, detail) of a shaping step, for the safety rules' holds
PanelStyle = Literal["line", "binary", "duty", "angle"]  # how the plot draws a panel: its one vocabulary


class PlotPanel(NamedTuple):
    """How `pi-controller simulate --plot` draws an actuator's trace."""

    unit: str
    style: PanelStyle
    note: str
    limits: tuple[float, float] | None = None  # the y axis, where the kind has a fixed range
    with_models: bool = False  # the model quantities that follow it are drawn in its panel


@dataclass(frozen=True, kw_only=True)
class ActuatorSettings:
    """What every actuator has: a pin, its states for faults, start-up and shut-down, and the safety
    rules enforced between plugins and the pin (see `safety`)."""

    id: str = device_id()
    kind: str
    # Safety rules; "on" is what the kind's actuator says (`Actuator.is_on`).
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
        """Its GPIO pins, by config key."""
        raise NotImplementedError

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

    # The kind's hooks ------------------------------------------------------------------------

    def actuator(self, factory: Factory | None, target: Target) -> Actuator:
        """The actuator on its gpiozero device, claimed already at `target` (nothing switches at boot)."""
        raise NotImplementedError

    def entity(self) -> tuple[str, dict[str, Any]]:
        """Home Assistant's platform for this actuator and what its discovery config adds to the
        name, state and command topics."""
        raise NotImplementedError

    def entity_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """What the entity reads in the state topic beyond the actuator's state (`Actuator.state`)."""
        return {}

    def power(self, value: Target) -> float:
        """Its share of full power at `value`, 0 to 1: what a simulated run's energy counts."""
        raise NotImplementedError

    def summary(self, switches: int, share: float, energy: str) -> str:
        """A simulated run's verdict on it: `share` is its mean power in percent, `energy` in words."""
        raise NotImplementedError

    def panel(self, switches: int, share: float) -> PlotPanel:
        """Its panel in `pi-controller simulate --plot`."""
        raise NotImplementedError

    def probe(self, factory: MockFactory) -> Probe:
        """What the simulation models read of its output, from its mock pins (see `simulators.models`)."""
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class OnePinSettings(ActuatorSettings):
    """An actuator on one GPIO pin."""

    pin: int = bcm_pin()

    def pins(self) -> dict[str, int]:
        return {"pin": self.pin}


class Actuator:
    """Holds the last applied target and its state as the plugin context shows it."""

    kind: str
    actions: tuple[str, ...] = ()
    state: dict[str, Any]  # as the plugin context shows it; replaced on a change, never edited
    state_json: str  # `state` as the context's JSON (`contract.COMPACT`)
    # Its Home Assistant entity sends "ON" and then its level as two messages (a fan's turn_on with a
    # percentage): a bare "ON" waits a tick for a level that supersedes it (`operator.py`).
    level_follows_on = False

    def __init__(self, settings: ActuatorSettings, device: Any, claimed: Target):
        self.settings = settings
        self.id = settings.id  # an attribute, not a property: the safety rules ask it of every actuator, every tick
        self.device = device
        self.safe_target, self.startup_target, self.shutdown_target = settings.targets()
        self.target: Target = claimed
        # The states this actuator has been in, with their JSON, by target: an actuator goes back and forth
        # between a few (on and off, a plugin's levels) and each is described and encoded once.
        self._known: dict[tuple[type, Target], tuple[dict[str, Any], str]] = {}
        self.state, self.state_json = self._learn(claimed)

    def command(self, action: str, parameters: Mapping[str, Any]) -> Target:
        """The target an action asks for; raises Rejected if the action or its value is not valid."""
        raise NotImplementedError

    def parse_entity(self, data: Any) -> tuple[str, dict[str, Any]] | None:
        """(action, parameters) from what its Home Assistant entity sends (JSON-decoded where it
        parses), or None if the entity does not send that."""
        return None

    def overridden(self, target: Target) -> None:
        """An operator's override to `target` was accepted (a light remembers its brightness)."""

    def apply(self, target: Target, force: bool = False) -> bool:
        """Drive the device to `target`; True if anything changed. `force` writes even an unchanged
        target, so a safe state is asserted after a failed or partial write."""
        if target == self.target and not force:
            return False
        self._write(target)
        self.target = target
        # A state it has been in before, the usual case, is looked up here: a write calls nothing more.
        self.state, self.state_json = self._known.get((type(target), target)) or self._learn(target)
        return True

    def _learn(self, target: Target) -> tuple[dict[str, Any], str]:
        """`target`'s state and its JSON, kept for the next time. Encoded now rather than when first shown:
        every tick shows the states (`Hardware.states_json`), and an attribute is read with no call."""
        if len(self._known) >= KNOWN_STATES:  # a fade or a sweep: a few steps kept, never all
            self._known.clear()
        state = self._describe(target)
        # The target's type is part of the key: 1, 1.0 and True are one key to a dict, not one JSON.
        self._known[(type(target), target)] = known = (state, COMPACT.encode(state))
        return known

    def close(self) -> None:
        self.device.close()

    # Hooks for the safety rules ----------------------------------------------------------------

    # What "on" means for min_on_s, min_off_s, max_on_s and interlocks: `target is not None and target != 0.0`,
    # which `bool` of a float or None is (NaN on, -0.0 off), in C: the rules ask it of every actuator written,
    # every tick, and a Python function costs a frame each time.
    is_on: Callable[[Target], bool] = staticmethod(bool)

    def shapes(self) -> bool:
        """Whether `shape` may change a target: the tick skips the rules of an actuator with none."""
        return False

    def shape(self, wanted: Target, dt: float, off_for: float) -> tuple[Target, Note]:
        """A step from the current target towards `wanted`, never past it, `dt` seconds after the last
        tick; `off_for`: how long it has been off (0 while on). The note names the rule that acted."""
        return wanted, None

    def _write(self, target: Target) -> None:
        raise NotImplementedError

    def _describe(self, target: Target) -> dict[str, Any]:
        raise NotImplementedError

    def _unknown(self, action: str) -> Rejected:
        return Rejected("unknown_action", f"action '{action[:40]}' is not valid for a {self.kind}; "
                                          f"valid: {', '.join(self.actions)}")


def ramp(current: Target, wanted: Target, rate: float | None, dt: float) -> tuple[Target, Note]:
    """At most `rate` per second from `current` towards `wanted` (a soft start, a slow servo)."""
    if rate is None or wanted is None or current is None or abs(wanted - current) <= rate * dt:
        return wanted, None
    step = rate * dt if wanted > current else -rate * dt
    return current + step, ("max_rate", f"ramping towards {wanted:g} at {rate:g}/s")


class PinProbe:
    """An output's level from its mock pin, whatever the wiring's polarity."""

    def __init__(self, pin: MockPin, active_high: bool):
        self.pin = pin
        self.active_high = active_high

    def level(self) -> float:
        state = float(self.pin.state)
        return state if self.active_high else 1.0 - state


def build(settings: ActuatorSettings, factory: Factory | None, state: str = "startup") -> Actuator:
    """Claim the pin already in the start-up (or another named) state, so nothing switches at boot."""
    safe, startup, shutdown = settings.targets()
    return settings.actuator(factory, {"safe": safe, "startup": startup, "shutdown": shutdown}[state])
