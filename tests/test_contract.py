"""The plugin ABI: the context plugins get, and every way a command is rejected."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory, MockPWMPin
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pi_controller import arbitration, contract
from pi_controller.contract import Command, OutputError, Reading
from pi_controller.devices import actuators
from pi_controller.devices.pwm import PwmSettings
from pi_controller.devices.relay import RelaySettings
from pi_controller.devices.servo import ServoSettings


@pytest.fixture
def targets() -> dict[str, actuators.Actuator]:
    factory = MockFactory(pin_class=MockPWMPin)
    built = [
        actuators.build(PwmSettings(id="led_strip", kind="pwm", pin=18, min_duty=10, max_duty=90), factory),
        actuators.build(RelaySettings(id="relay_switch", kind="relay", pin=27), factory),
        actuators.build(ServoSettings(id="servo_motor", kind="servo", pin=13, min_angle=0, max_angle=90),
                        factory),
    ]
    yield {a.id: a for a in built}
    for a in built:
        a.close()


def parse(raw: Any, targets) -> tuple[list[Command], list[contract.Rejection]]:
    data = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    return contract.parse_output(data, "p", 5, targets)


def test_context_is_the_seed_shape_with_the_plugin_config_spliced_in() -> None:
    readings = [Reading("temperature_sensor", 20.5, "celsius", 100.0),
                Reading("light_sensor", None, "lux", 100.0, "SPI read failed")]
    states = {"relay_switch": {"type": "relay", "on": False, "value": 0}}
    prefix = contract.encode_context(readings, contract.encode_states(states), 100.0, 7, monotonic=2.5).encoded
    context = json.loads(prefix + contract.encode_config({"setpoint": 21.0, "mode": "eco"}))
    assert context == {
        "sensor_readings": [
            {"sensor_id": "temperature_sensor", "value": 20.5, "unit": "celsius", "timestamp": 100.0,
             "valid": True},
            {"sensor_id": "light_sensor", "value": None, "unit": "lux", "timestamp": 100.0, "valid": False,
             "error": "SPI read failed"},
        ],
        "device_states": states,
        "timestamp": 100.0,
        "monotonic": 2.5,
        "tick": 7,
        "config": {"setpoint": 21.0, "mode": "eco"},
    }


def test_the_seed_actions_are_accepted(targets) -> None:
    commands, rejections = parse([
        {"device_id": "relay_switch", "action": "set_high", "parameters": {}},
        {"device_id": "led_strip", "action": "pwm", "parameters": {"duty_cycle": 42.5}},
        {"device_id": "servo_motor", "action": "set_angle", "parameters": {"angle": 45}},
        {"device_id": "led_strip", "action": "set_low"},  # parameters may be left out
    ], targets)
    assert rejections == []
    assert [(c.device_id, c.action, c.target, c.plugin, c.priority) for c in commands] == [
        ("relay_switch", "set_high", 1.0, "p", 5), ("led_strip", "pwm", 42.5, "p", 5),
        ("servo_motor", "set_angle", 45.0, "p", 5), ("led_strip", "set_low", 0.0, "p", 5)]


@pytest.mark.parametrize("command,device,rule,reason", [
    ({"device_id": "toaster", "action": "set_high"}, None, "unknown_device", "unknown device 'toaster'"),
    ({"device_id": "relay_switch", "action": "pwm", "parameters": {"duty_cycle": 5}}, "relay_switch",
     "unknown_action", "action 'pwm' is not valid for a relay; valid: set_high, set_low"),
    ({"device_id": "led_strip", "action": "pwm"}, "led_strip", "missing_parameter",
     "missing parameter 'duty_cycle'"),
    ({"device_id": "led_strip", "action": "pwm", "parameters": {"duty_cycle": "50"}}, "led_strip", "not_a_number",
     "parameter 'duty_cycle' must be a number, got str '50'"),
    ({"device_id": "led_strip", "action": "pwm", "parameters": {"duty_cycle": True}}, "led_strip", "not_a_number",
     "parameter 'duty_cycle' must be a number, got bool True"),
    ({"device_id": "led_strip", "action": "pwm", "parameters": {"duty_cycle": 150}}, "led_strip", "out_of_range",
     "parameter 'duty_cycle' = 150 is out of range 0..100"),
    ({"device_id": "led_strip", "action": "pwm", "parameters": {"duty_cycle": -1}}, "led_strip", "out_of_range",
     "parameter 'duty_cycle' = -1 is out of range 0..100"),
    ({"device_id": "led_strip", "action": "pwm", "parameters": {"duty_cycle": 95}}, "led_strip", "above_max_duty",
     "duty_cycle 95 is above this output's max_duty 90"),
    ({"device_id": "led_strip", "action": "set_high"}, "led_strip", "above_max_duty",
     "duty_cycle 100 is above this output's max_duty 90"),
    ({"device_id": "servo_motor", "action": "set_angle", "parameters": {"angle": 91}}, "servo_motor",
     "out_of_range", "parameter 'angle' = 91 is out of range 0..90"),
    ({"device_id": "led_strip", "action": "pwm", "parameters": [50]}, "led_strip", "malformed",
     "'parameters' must be an object, got list"),
    ({"device_id": 3, "action": "set_high"}, None, "malformed", "command #0 has no string 'device_id'"),
    ({"device_id": "led_strip"}, "led_strip", "malformed", "command #0 has no string 'action'"),
    ("set_high", None, "malformed", "command #0 must be an object, got str"),
])
def test_bad_commands_are_rejected_with_a_rule_and_a_reason(targets, command, device, rule, reason) -> None:
    commands, rejections = parse([command], targets)
    assert commands == []
    assert [(r.plugin, r.device_id, r.rule, r.reason) for r in rejections] == [("p", device, rule, reason)]


def test_an_integer_too_large_for_a_float_is_not_finite(targets) -> None:
    raw = b'[{"device_id":"led_strip","action":"pwm","parameters":{"duty_cycle":1' + b"0" * 400 + b"}}]"
    commands, rejections = parse(raw, targets)
    assert commands == [] and rejections[0].rule == "not_finite"


@pytest.mark.parametrize("actuators", ["all", "none"])  # none: the limit is what any output may hold
def test_a_flood_of_commands_is_refused_whole(targets, actuators) -> None:
    targets = targets if actuators == "all" else {}
    limit = contract.max_commands(len(targets))
    parse([1] * limit, targets)  # at the limit: each entry judged (and rejected)
    with pytest.raises(OutputError, match=f"output has {limit + 1} commands; at most {limit}") as caught:
        parse([1] * (limit + 1), targets)
    assert caught.value.kind == "too_many_commands"


@pytest.mark.parametrize("literal", [b"1e999", b"-1e999", b"NaN", b"Infinity"])
def test_non_finite_values_are_rejected_not_clamped(targets, literal) -> None:
    raw = b'[{"device_id":"led_strip","action":"pwm","parameters":{"duty_cycle":' + literal + b"}}]"
    commands, rejections = parse(raw, targets)
    assert commands == []
    assert "must be finite" in rejections[0].reason


def test_one_bad_command_does_not_spoil_the_good_ones(targets) -> None:
    commands, rejections = parse([
        {"device_id": "led_strip", "action": "pwm", "parameters": {"duty_cycle": 500}},
        {"device_id": "relay_switch", "action": "set_high"},
    ], targets)
    assert [c.device_id for c in commands] == ["relay_switch"]
    assert [r.device_id for r in rejections] == ["led_strip"]


@pytest.mark.parametrize("raw,message", [
    (b"this is not json {", "output is not JSON"),
    (b'{"device_id": "led_strip", "action": "set_high"}', "must be a JSON array of commands, got a dict"),
    (b"", "output is not JSON"),
    (b"[" * 100_000, "output is not JSON"),
    (b"\xff\xfe", "output is not JSON"),
])
def test_unusable_output_is_an_error_of_the_call(targets, raw, message) -> None:
    with pytest.raises(OutputError, match=message):
        parse(raw, targets)


def cmd(device: str, target: float | None, plugin: str, priority: int) -> Command:
    return Command(device, "x", target, plugin, priority)


def test_arbitration_first_in_priority_order_wins_and_conflicts_are_reported() -> None:
    high = cmd("led_strip", 0.0, "energy_saver", 20)
    low = cmd("led_strip", 80.0, "motion_light", 10)
    agree = cmd("relay_switch", 1.0, "a", 10)
    same = cmd("relay_switch", 1.0, "b", 5)
    winners, conflicts = arbitration.resolve([high, agree, low, same])
    assert winners == [high, agree]
    assert conflicts == [(high, low)]  # agreeing plugins are no conflict


def test_a_plugins_own_later_command_supersedes_its_earlier_one() -> None:
    first, second = cmd("led_strip", 10.0, "a", 1), cmd("led_strip", 20.0, "a", 1)
    winners, conflicts = arbitration.resolve([first, second])
    assert winners == [second] and conflicts == []


@pytest.mark.parametrize("value,timestamp", [(21.5, 1.8e9 + 0.1), (-50.0, 0.0), (1e-7, 3.0), (123456789.125, 2.5)])
def test_readings_are_encoded_as_json_dumps_would(value, timestamp) -> None:
    readings = [Reading("tëmp", value, "°C", timestamp), Reading("x", None, "lux", timestamp, "no \"echo\"")]
    expected = json.dumps([r.as_json() for r in readings], separators=(",", ":")).encode()
    # Dated by another time than the tick's, and by the tick's own (the usual case: its repr is written once).
    for tick_time in (0.5, timestamp):
        parts = contract.encode_context(readings, "{}", tick_time, 0, monotonic=0.0).parts
        assert ("[" + ",".join(parts) + "]").encode() == expected


# --- decoding output: msgspec where it can, json's answer always --------------------------------------

_EDGES = [b"[]", b" [ ] ", b"-0", b"1E400", b"-1E400", b"1.7976931348623159e308", b"4.9e-324", b"NaN", b"[Infinity]",
          b"123456789012345678901234567890", b"18446744073709551616", b'{"a":1,"a":2}', b'"\\ud800"',
          b'"\\u0000"', b"\xef\xbb\xbf[]", "[]".encode("utf-16"), b'"\xff"', b"[1.0,2]", b"[" * 5000 + b"]" * 5000,
          b'[{"device_id":"led_strip","action":"pwm","parameters":{"duty_cycle":4e1}}]', b"", b"[1,]", b"nul"]


def _decoded(decode: Any, raw: bytes) -> tuple[str, str]:
    """What a decode gives, compared by type and repr (NaN != NaN), or the error it raises, with its message."""
    try:
        value = decode(raw)
    except (ValueError, RecursionError) as exc:
        return type(exc).__name__, str(exc)
    return type(value).__name__, repr(value)


@pytest.mark.parametrize("raw", _EDGES, ids=range(len(_EDGES)))
def test_decode_gives_what_json_gives_at_the_edges(raw: bytes) -> None:
    """msgspec refuses some texts json takes (NaN, numbers past a float, surrogates, a BOM, UTF-16): those go
    to json.loads, so what a plugin's output decodes to, or the error it fails with, never changed."""
    assert _decoded(contract.decode, raw) == _decoded(json.loads, raw)


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=4), inner, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_JSON.map(lambda value: json.dumps(value).encode()),
                 _JSON.map(lambda value: json.dumps(value, ensure_ascii=False, indent=1).encode()),
                 st.binary(max_size=40)))
def test_decode_gives_what_json_gives(raw: bytes) -> None:
    assert _decoded(contract.decode, raw) == _decoded(json.loads, raw)


_TYPED_COMMANDS = st.lists(st.fixed_dictionaries(
    {"device_id": st.sampled_from(["led_strip", "relay_switch", "servo_motor", "heater"]),
     "action": st.sampled_from(["set_high", "set_low", "pwm", "set_angle", "detach", ""])},
    optional={"parameters": st.dictionaries(st.sampled_from(["duty_cycle", "angle", "x"]), _JSON, max_size=2)}),
    min_size=1, max_size=6)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(commands=_TYPED_COMMANDS)
def test_commands_msgspec_types_and_commands_checked_by_hand_get_the_same_verdicts(targets, commands) -> None:
    """Commands with the contract's types are typed by msgspec as they decode; a value only json takes
    anywhere in the output (NaN, here in a field no check reads) sends the whole output through the checks
    by hand instead: the verdicts are the same."""
    by_hand = [{**command, "note": math.nan} for command in commands]
    assert parse(commands, targets) == parse(by_hand, targets)
