"""Operator requests taken up by the tick: validation, expiry, config values that cannot be encoded."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from gpiozero import Device

from pi_controller.contract import Rejected
from pi_controller.devices import actuators
from pi_controller.devices.mock_pins import SimulatedFactory
from pi_controller.devices.motor import MotorSettings
from pi_controller.devices.pwm import PwmSettings
from pi_controller.devices.relay import RelaySettings
from pi_controller.names import OPERATOR
from pi_controller.operator import EnablePlugin, Operator, Release, SetActuator, SetPluginConfig, parse_set
from pi_controller.plugins.sandbox import SandboxedPlugin
from pi_controller.safety.rules import Hold


@pytest.fixture
def devices():
    factory = SimulatedFactory()
    Device.pin_factory = factory
    built = [actuators.build(PwmSettings(id="lamp", kind="pwm", pin=18, max_duty=80), factory),
             actuators.build(RelaySettings(id="heater", kind="relay", pin=27), factory)]
    return {a.id: a for a in built}


class FakePlugin(SimpleNamespace):
    """Only what the operator touches of a plugin: its name, grant config and config suffix."""

    set_config = SandboxedPlugin.set_config


def plugin(name: str = "thermostat", **config: Any) -> FakePlugin:
    made = FakePlugin(name=name, grant=SimpleNamespace(config=config or {"setpoint": 21}, config_schema=None))
    made.set_config({})  # as a plugin starts: its grant's config
    return made


@pytest.mark.parametrize("payload,expected", [
    (b"ON", ("pwm", {"duty_cycle": 80.0})),  # full is the output's max_duty, not 100 %
    (b'{"state": "ON", "brightness": 40}', ("pwm", {"duty_cycle": 40})),
    (b'{"state": "OFF"}', ("set_low", {})),
    (b'{"action": "pwm", "parameters": {"duty_cycle": 10}, "expires_s": 5}', ("pwm", {"duty_cycle": 10})),
])
def test_home_assistant_and_our_own_payloads(devices, payload, expected) -> None:
    assert parse_set(devices["lamp"], payload)[:2] == expected


@pytest.mark.parametrize("payload", [b"MAYBE", b"[1]", b'{"action": 3}', b'{"action": "pwm", "expires_s": -1}'])
def test_unreadable_payloads_are_rejected(devices, payload) -> None:
    with pytest.raises(Rejected):
        parse_set(devices["heater"], payload)


def test_overrides_expire_and_release(devices) -> None:
    operator = Operator(expiry_s=10)
    operator.submit(SetActuator("heater", b"ON"))
    assert [c.target for c in operator.commands(devices, [], now=0.0, tick=0)] == [1.0]
    assert operator.commands(devices, [], now=9.9, tick=1)  # still in force
    assert operator.commands(devices, [], now=10.0, tick=2) == []  # expired
    operator.submit(SetActuator("heater", b"ON"))
    operator.submit(Release("heater"))
    assert operator.commands(devices, [], now=11.0, tick=3) == []


def test_a_config_value_that_cannot_be_encoded_blocks_nothing_after_it(devices) -> None:
    operator, thermostat = Operator(expiry_s=10), plugin()
    operator.submit(SetPluginConfig("thermostat", "curve", [float("nan")]))
    operator.submit(SetPluginConfig("thermostat", "setpoint", 19.5))
    operator.commands(devices, [thermostat], now=0.0, tick=0)
    assert thermostat.config_suffix == b',"config":{"setpoint":19.5}}'
    assert thermostat.config == {"setpoint": 19.5}


def test_a_swapped_in_plugin_runs_its_own_config_not_the_values_set_on_the_version_before(devices) -> None:
    operator, old = Operator(expiry_s=10), plugin()
    operator.submit(SetPluginConfig("thermostat", "setpoint", 19.5))
    operator.commands(devices, [old], now=0.0, tick=0)
    new = plugin(setpoint=21, band=1.0)  # hot-swapped in under the same name
    operator.submit(SetPluginConfig("thermostat", "band", 2.0))
    operator.commands(devices, [new], now=1.0, tick=1)
    assert new.config == {"setpoint": 21, "band": 2.0}  # 19.5 was the old version's, unchecked against this one


def test_a_release_of_a_device_the_daemon_does_not_run_is_refused(devices) -> None:
    """Found by the entities machine: a release for an actuator a reload removed (its "resume automatic" button
    kept by a dashboard) was answered ok, as if there were such a device, where a set of it is refused."""
    operator = Operator(expiry_s=10)
    operator.submit(Release("boiler", "reply"))
    operator.submit(Release("heater", "reply"))
    operator.commands(devices, [], now=0.0, tick=0)
    gone, there = operator.answers([], {})
    assert (gone.ok, gone.rule, gone.reason) == (False, "unknown_device", "unknown device 'boiler'")
    assert (there.ok, there.applied) == (True, {"override": False})


def test_enabling_an_unknown_plugin_is_refused(devices) -> None:
    operator = Operator(expiry_s=10)
    operator.submit(EnablePlugin("nobody", False))
    operator.submit(EnablePlugin("thermostat", False))
    operator.commands(devices, [plugin()], now=0.0, tick=0)
    assert operator.disabled == {"thermostat"}


def test_a_brightness_alone_turns_the_light_on_at_it(devices) -> None:
    assert parse_set(devices["lamp"], b'{"brightness": 30}')[:2] == ("pwm", {"duty_cycle": 30})
    assert parse_set(devices["lamp"], b'{"brightness": 0}')[:2] == ("pwm", {"duty_cycle": 0})  # and 0 is off
    assert parse_set(devices["lamp"], b'{"state": "OFF", "brightness": 30}')[:2] == ("set_low", {})


def test_on_alone_restores_the_last_brightness_set_not_max_duty(devices) -> None:
    operator, lamp = Operator(expiry_s=10), devices["lamp"]
    operator.submit(SetActuator("lamp", b'{"brightness": 35}'))
    assert [c.target for c in operator.commands(devices, [], now=0.0, tick=0)] == [35.0]
    operator.submit(SetActuator("lamp", b'{"state": "OFF"}'))
    assert [c.target for c in operator.commands(devices, [], now=1.0, tick=1)] == [0.0]
    for on in (b'{"state": "ON"}', b"ON"):
        operator.submit(SetActuator("lamp", on))
        assert [c.target for c in operator.commands(devices, [], now=2.0, tick=2)] == [35.0]
    operator.submit(SetActuator("lamp", b'{"brightness": 95}'))  # above max_duty: refused, and not remembered
    operator.commands(devices, [], now=3.0, tick=3)
    assert parse_set(lamp, b'{"state": "ON"}')[:2] == ("pwm", {"duty_cycle": 35.0})


def test_an_override_knows_when_it_ends_on_the_wall_clock(devices) -> None:
    operator = Operator(expiry_s=10, wall=lambda: 1_000_000.0)
    operator.submit(SetActuator("heater", b'{"action": "set_high", "parameters": {}, "expires_s": 60}'))
    operator.commands(devices, [], now=5.0, tick=0)
    override = operator.overrides()["heater"]
    assert (override.expiry, override.expires_at) == (65.0, 1_000_060.0)


@pytest.mark.parametrize("rule, ok", [("max_rate", True), ("reverse_delay", True), ("min_off", False),
                                      ("requires", False), ("min_duty", False)])
def test_a_set_on_its_way_is_answered_ok_and_one_held_is_not(devices, rule: str, ok: bool) -> None:
    operator = Operator(expiry_s=10)
    operator.submit(SetActuator("lamp", b'{"brightness": 80}', reply_to="lamp/set/result"))
    operator.commands(devices, [], now=0.0, tick=0)
    (answer,) = operator.answers([Hold("lamp", rule, "what the rule says", OPERATOR)], {"lamp": {"value": 0.1}})
    assert (answer.ok, answer.rule, answer.applied) == (ok, rule, {"value": 0.1})
    assert ("on its way" in answer.reason) == ok and "what the rule says" in answer.reason


@dataclass(frozen=True)
class Reboot:
    """A request type the operator's match does not name (as one added to the union but not handled)."""

    name: str
    reply_to: str = ""


def test_a_request_the_operator_does_not_handle_is_an_internal_error_not_another_request(devices) -> None:
    operator, thermostat = Operator(expiry_s=10), plugin()
    operator.submit(Reboot("thermostat", reply_to="reboot/result"))  # type: ignore[arg-type]
    operator.submit(EnablePlugin("thermostat", False, reply_to="enable/result"))  # and what follows is taken up
    operator.commands(devices, [thermostat], now=0.0, tick=0)
    unhandled, enabled = operator.answers([], {})
    assert (unhandled.reply_to, unhandled.ok, unhandled.rule) == ("reboot/result", False, "internal_error")
    assert thermostat.config == {"setpoint": 21} and (enabled.ok, operator.disabled) == (True, {"thermostat"})


def test_a_fan_turned_on_at_a_percentage_is_one_command_and_on_alone_restores_the_last(devices) -> None:
    """Home Assistant's fan.turn_on with a percentage sends ON, then the percentage: the ON waits a tick
    for it, so the fan never starts at another speed first; ON alone starts it at the last speed set."""
    fan = actuators.build(MotorSettings(id="fan", kind="motor", forward=20, backward=21), Device.pin_factory)
    devices, operator = {**devices, "fan": fan}, Operator(expiry_s=10)
    operator.submit(SetActuator("fan", b"ON"))
    assert operator.commands(devices, [], now=0.0, tick=0) == []  # waits for a level
    operator.submit(SetActuator("fan", b"40"))  # the percentage, a tick later at worst
    assert [c.target for c in operator.commands(devices, [], now=0.1, tick=1)] == [40.0]
    operator.submit(SetActuator("fan", b"ON"))
    operator.submit(SetActuator("fan", b"55"))  # both in one tick: the level alone
    assert [c.target for c in operator.commands(devices, [], now=0.2, tick=2)] == [55.0]
    operator.submit(SetActuator("fan", b"OFF"))
    assert [c.target for c in operator.commands(devices, [], now=0.3, tick=3)] == [0.0]
    operator.submit(SetActuator("fan", b"ON"))  # alone
    assert [c.target for c in operator.commands(devices, [], now=0.4, tick=4)] == [0.0]  # a tick's wait
    assert [c.target for c in operator.commands(devices, [], now=0.5, tick=5)] == [55.0]  # the last speed set
    fan.close()
