"""What an operator asks for from outside (MQTT today): manual overrides, plugins on or off, plugin
config values changed at run time.

The requests are a closed union (`Request`), each taken up by its own case of one `match`; a new
command is a request type here plus a row of `mqtt.inbox.COMMANDS` (docs/design.md shows one).

Requests arrive on any thread through `submit` and are taken up by the tick, where they pass the same
validation as plugin commands (`Actuator.command`) and, as commands, the same safety rules. An override
wins over every plugin until it is released or expires; config values and plugins switched off are kept
across restarts (`operator_values.py`). Each request with a `reply_to` is answered
(`answers`, once the tick has passed the safety rules): applied, refused at validation, or held by a rule.
"""

from __future__ import annotations

import json
import queue
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, TypeGuard, assert_never

import structlog

from pi_controller.contract import Command, Rejected
from pi_controller.devices.actuators import Actuator
from pi_controller.names import OPERATOR
from pi_controller.plugins.plugin_config import check_change
from pi_controller.safety.rules import GRADUAL

if TYPE_CHECKING:
    from pi_controller.operator_values import OperatorValues
    from pi_controller.safety.rules import Hold

log = structlog.get_logger("pi_controller.operator")


@dataclass(frozen=True)
class SetActuator:
    device_id: str
    payload: bytes
    reply_to: str = ""  # where the answer goes (MQTT: the command topic's /result); "": no answer


@dataclass(frozen=True)
class Release:
    device_id: str
    reply_to: str = ""


@dataclass(frozen=True)
class EnablePlugin:
    name: str
    enabled: bool
    reply_to: str = ""


@dataclass(frozen=True)
class SetPluginConfig:
    name: str
    key: str
    value: Any
    reply_to: str = ""


@dataclass(frozen=True)
class PromotePlugin:
    """Make the plugin's shadow (its candidate version) live: Home Assistant's update entity's install."""

    name: str
    reply_to: str = ""


Request = SetActuator | Release | EnablePlugin | SetPluginConfig | PromotePlugin


@dataclass(frozen=True)
class Override:
    command: Command
    expiry: float  # on the loop's monotonic clock
    expires_at: float  # the same moment on the wall clock (Unix time), for people


@dataclass(frozen=True)
class Answer:
    """What became of a request: `rule` (Rejected's vocabulary, or the safety rule that held it) and
    `reason` when refused or held; `applied` what is in force now."""

    reply_to: str
    ok: bool
    rule: str | None = None
    reason: str | None = None
    applied: Any = None
    device: str | None = None  # the actuator a set concerns (taken up: the safety rules still have their say)
    refused: bool = False  # refused at validation: nothing was done

    def payload(self) -> dict[str, Any]:
        return {"ok": self.ok, "rule": self.rule, "reason": self.reason and self.reason[:MAX_REASON_CHARS],
                "applied": self.applied}


MAX_ANSWERS = 1000  # waiting to be sent: with nobody taking them (no MQTT), the oldest go
MAX_REASON_CHARS = 300


class Operator:
    def __init__(self, expiry_s: float, wall: Callable[[], float] = time.time, values: OperatorValues | None = None,
                 promote: Callable[[str], str | None] | None = None):
        """`values`: where config values and plugins switched off are kept across restarts; `promote`:
        starts making a plugin's shadow live (off the tick), or says why it cannot."""
        self.expiry_s = expiry_s
        self.values = values
        self.promote = promote
        self.disabled: set[str] = set()
        self._overrides: dict[str, Override] = {}  # by device
        self._inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._wall = wall
        self._answers: deque[Answer] = deque(maxlen=MAX_ANSWERS)
        self._waiting: list[Request] = []  # bare "ON"s held a tick for the level that may follow

    def submit(self, request: Request) -> None:
        """From any thread; taken up at the start of the next tick."""
        self._inbox.put(request)

    def enabled(self, plugins: Iterable[Any]) -> Iterable[Any]:
        """`plugins` but those the operator disabled: all of them, as given, while none is (most ticks)."""
        return [p for p in plugins if p.name not in self.disabled] if self.disabled else plugins

    def overrides(self) -> Mapping[str, Override]:
        return self._overrides

    def answers(self, holds: Iterable[Hold], states: Mapping[str, Mapping[str, Any]]) -> list[Answer]:
        """The answers to the requests this tick took up, given what the safety rules held (`holds`) and
        the actuators' states after the tick."""
        held = {h.device_id: h for h in holds if h.plugin == OPERATOR}
        answers = []
        while self._answers:
            answer = self._answers.popleft()
            if answer.device is not None and not answer.refused:
                answer = _as_held(answer, held.get(answer.device), states.get(answer.device))
            answers.append(answer)
        return answers

    def commands(self, actuators: Mapping[str, Actuator], plugins: Iterable[Any], now: float,
                 tick: int) -> list[Command]:
        """Take up pending requests, expire old overrides, and return the overrides in force."""
        if not (self._waiting or self._overrides) and self._inbox.empty():
            return []  # most ticks: nothing asked, nothing in force
        for request in self._intake(actuators):
            try:
                answer = self._take(request, actuators, plugins, now, tick)
            except Exception as exc:  # nothing from outside may stop the loop
                log.error("operator_request_failed", request=repr(request)[:200], tick=tick, error=str(exc))
                answer = Answer(request.reply_to, False, "internal_error", str(exc)[:200])
            if request.reply_to:
                self._answers.append(answer)
        for device, override in list(self._overrides.items()):
            if now >= override.expiry or device not in actuators:
                del self._overrides[device]
                log.info("override_ended", device=device, tick=tick,
                         reason="expired" if now >= override.expiry else "device removed")
        return [override.command for override in self._overrides.values()]

    def _intake(self, actuators: Mapping[str, Actuator]) -> list[Request]:
        """The requests to take up now, in order: those held from the last tick first. A bare "ON" to a
        kind whose entity sends its level next (`Actuator.level_follows_on`) waits a tick, unless a later
        set of the same device came with it: Home Assistant's "on at 40 %" is then one command, the
        level, never a start at the last speed corrected a tick later."""
        arrived = [self._inbox.get_nowait() for _ in range(self._inbox.qsize())]  # only the tick takes
        held, self._waiting = self._waiting, [
            r for i, r in enumerate(arrived) if _bare_on(r, actuators)
            and not any(isinstance(later, SetActuator) and later.device_id == r.device_id for later in arrived[i + 1:])]
        return held + [r for r in arrived if not any(r is w for w in self._waiting)]

    def _take(self, request: Request, actuators: Mapping[str, Actuator], plugins: Iterable[Any], now: float,
              tick: int) -> Answer:
        """Each request type by its own case: one the match does not name fails here (`assert_never`: mypy
        says so first), never as another request."""
        match request:
            case SetActuator():
                return self._override(request, actuators, now, tick)
            case Release():
                return self._release(request, actuators, tick)
            case EnablePlugin():
                return self._enable(request, plugins, tick)
            case SetPluginConfig():
                return self._configure(request, plugins, tick)
            case PromotePlugin():
                return self._promote(request, tick)
            case _:
                assert_never(request)

    def _enable(self, request: EnablePlugin, plugins: Iterable[Any], tick: int) -> Answer:
        if not any(p.name == request.name for p in plugins):
            log.warning("operator_command_rejected", plugin=request.name, tick=tick, reason="no such plugin")
            return _unknown_plugin(request)
        (self.disabled.discard if request.enabled else self.disabled.add)(request.name)
        if self.values is not None:
            self.values.enabled_set(next(p for p in plugins if p.name == request.name), request.enabled)
        log.info("plugin_enabled" if request.enabled else "plugin_disabled_by_operator", plugin=request.name,
                 tick=tick)
        return Answer(request.reply_to, True, applied={"enabled": request.enabled})

    def _override(self, request: SetActuator, actuators: Mapping[str, Actuator], now: float, tick: int) -> Answer:
        actuator = actuators.get(request.device_id)
        try:
            if actuator is None:
                raise Rejected("unknown_device", f"unknown device '{request.device_id[:64]}'")
            action, parameters, expires_s = parse_set(actuator, request.payload)
            target = actuator.command(action, parameters)
        except Rejected as exc:
            log.warning("operator_command_rejected", device=request.device_id, tick=tick, rule=exc.rule,
                        reason=str(exc))
            known = request.device_id if actuator is not None else None
            return Answer(request.reply_to, False, exc.rule, str(exc), device=known, refused=True)
        actuator.overridden(target)
        lasts = expires_s or self.expiry_s
        # Its priority is moot: operator commands go first, and arbitration keeps the first per device.
        self._overrides[actuator.id] = Override(Command(actuator.id, action, target, OPERATOR, 0), now + lasts,
                                                self._wall() + lasts)
        log.info("override_set", device=actuator.id, target=target, expires_in_s=lasts, tick=tick)
        return Answer(request.reply_to, True, device=actuator.id)

    def _release(self, request: Release, actuators: Mapping[str, Actuator], tick: int) -> Answer:
        """An actuator back to its plugins; one the daemon does not run is refused, as a set of it is (its override,
        if it had one, ended when it was removed)."""
        if request.device_id not in actuators:
            reason = f"unknown device '{request.device_id[:64]}'"
            log.warning("operator_command_rejected", device=request.device_id[:64], tick=tick, rule="unknown_device",
                        reason=reason)
            return Answer(request.reply_to, False, "unknown_device", reason, refused=True)
        if self._overrides.pop(request.device_id, None) is not None:
            log.info("override_ended", device=request.device_id, tick=tick, reason="released")
        return Answer(request.reply_to, True, applied={"override": False})

    def _configure(self, request: SetPluginConfig, plugins: Iterable[Any], tick: int) -> Answer:
        """A config value for a plugin, checked against its schema (or the keys and types it has) before
        it is used: a refused value changes nothing, and the plugin runs on with what it had."""
        plugin = next((p for p in plugins if p.name == request.name), None)
        if plugin is None:
            log.warning("operator_command_rejected", plugin=request.name, tick=tick, reason="no such plugin")
            return _unknown_plugin(request)
        try:  # against what this version runs with: a swapped-in plugin starts from its own config
            check_change(request.key, request.value, plugin.grant.config_schema, plugin.config)
        except Rejected as exc:
            log.warning("plugin_config_refused", plugin=request.name, key=request.key[:64], tick=tick,
                        rule=exc.rule, reason=str(exc))
            return Answer(request.reply_to, False, exc.rule, str(exc))
        plugin.set_config({**plugin.config, request.key: request.value})
        if self.values is not None:
            self.values.config_set(plugin, request.key, request.value)
        log.info("plugin_config_set", plugin=request.name, key=request.key, value=request.value, tick=tick)
        return Answer(request.reply_to, True, applied={request.key: request.value})


    def _promote(self, request: PromotePlugin, tick: int) -> Answer:
        refused = self.promote(request.name) if self.promote is not None else "this daemon runs no shadow plugins"
        if refused is not None:
            log.warning("operator_command_rejected", plugin=request.name[:64], tick=tick, reason=refused)
            return Answer(request.reply_to, False, "no_candidate", refused)
        log.info("plugin_promotion_started", plugin=request.name, tick=tick)
        return Answer(request.reply_to, True, applied={"promoting": request.name})


def _as_held(answer: Answer, hold: Hold | None, state: Mapping[str, Any] | None) -> Answer:
    """A taken-up set as the safety rules left it: applied, on its way (a ramp), or held."""
    if hold is None:
        return replace(answer, applied=state)
    if hold.rule in GRADUAL:
        return replace(answer, rule=hold.rule, applied=state, reason=f"on its way: {hold.detail}")
    return replace(answer, ok=False, rule=hold.rule, applied=state,
                   reason=f"held by the safety rules: {hold.detail}; the override stands until released or expired")


def _bare_on(request: Request, actuators: Mapping[str, Actuator]) -> TypeGuard[SetActuator]:
    if not isinstance(request, SetActuator):
        return False
    actuator = actuators.get(request.device_id)
    return actuator is not None and actuator.level_follows_on and request.payload.strip() == b"ON"


def _unknown_plugin(request: EnablePlugin | SetPluginConfig) -> Answer:
    return Answer(request.reply_to, False, "unknown_plugin", f"no plugin '{request.name[:64]}'")


def parse_set(actuator: Actuator, payload: bytes) -> tuple[str, dict[str, Any], float | None]:
    """(action, parameters, expiry) from a set payload: our own JSON command, or what Home Assistant
    sends to a switch ("ON"/"OFF"), a JSON-schema light ({"state", "brightness"}) or a number."""
    text = payload.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = text
    if isinstance(data, dict) and "action" in data:
        parameters = data.get("parameters", {})
        if not isinstance(parameters, dict) or not isinstance(data["action"], str):
            raise Rejected("malformed", "'action' must be a string and 'parameters' an object")
        expires = data.get("expires_s")
        if expires is not None and (isinstance(expires, bool) or not isinstance(expires, (int, float))
                                    or not 0 < expires <= 7 * 86400):
            raise Rejected("malformed", "'expires_s' must be a number of seconds up to a week")
        return data["action"], parameters, expires
    parsed = actuator.parse_entity(data)  # what the kind's Home Assistant entity sends
    if parsed is not None:
        return (*parsed, None)
    raise Rejected("malformed", f"cannot read {text[:60]!r} as a command for a {actuator.kind}")
