"""The motor kind, added by one module and its registry line: actions, the reversal interlock, the
safe state, its Home Assistant fan and its simulation model, on gpiozero's mock pins."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from pi_controller import config
from pi_controller.clock import VirtualClock
from pi_controller.contract import Rejected
from pi_controller.devices import actuators
from pi_controller.devices.mock_pins import SimulatedFactory
from pi_controller.devices.motor import Motor, MotorSettings
from pi_controller.mqtt import discovery
from pi_controller.operator import parse_set
from pi_controller.plugins import tools
from pi_controller.simulators.models import FanSettings
from pi_controller.simulators.world import World

FORWARD, BACKWARD, ENABLE = 20, 21, 16


def motor(factory: SimulatedFactory, **settings: Any) -> Motor:
    built = actuators.build(MotorSettings(id="fan", kind="motor", forward=FORWARD, backward=BACKWARD, enable=ENABLE,
                                          **settings), factory)
    assert isinstance(built, Motor)
    return built


def pins(factory: SimulatedFactory) -> tuple[float, float, float]:
    return tuple(float(factory.pin(p).state) for p in (FORWARD, BACKWARD, ENABLE))  # type: ignore[return-value]


def test_actions_drive_the_pins_and_bad_ones_are_rejected() -> None:
    factory = SimulatedFactory()
    fan = motor(factory)
    assert pins(factory) == (0.0, 0.0, 1.0) and fan.target == 0.0  # claimed stopped, enable held high
    fan.apply(fan.command("forward", {"speed": 60}))
    assert pins(factory) == (0.6, 0.0, 1.0)
    assert fan.state == {"type": "motor", "on": True, "value": 60.0, "speed": 60.0, "direction": "forward"}
    fan.apply(fan.command("backward", {"speed": 25}))
    assert pins(factory) == (0.0, 0.25, 1.0) and fan.state["direction"] == "backward"
    for action in ("stop", "set_low"):
        fan.apply(-25.0)
        fan.apply(fan.command(action, {}))
        assert pins(factory) == (0.0, 0.0, 1.0) and fan.state["direction"] == "stopped"
    assert fan.command("backward", {"speed": 0}) == 0.0  # no "minus zero": stopped either way
    for action, parameters, rule in [("forward", {"speed": 101}, "out_of_range"), ("backward", {}, "missing_parameter"),
                                     ("forward", {"speed": "fast"}, "not_a_number"), ("pwm", {}, "unknown_action"),
                                     ("set_high", {}, "unknown_action")]:
        with pytest.raises(Rejected) as caught:
            fan.command(action, parameters)
        assert caught.value.rule == rule
    fan.close()


def test_settings_are_checked_when_the_config_loads(write_config) -> None:
    data = {"pins": {"factory": "mock"}, "actuators": [
        {"id": "fan", "kind": "motor", "forward": FORWARD, "backward": BACKWARD, "reverse_delay_s": 2}]}
    (loaded,) = config.load(write_config(data)).actuators
    assert isinstance(loaded, MotorSettings) and loaded.targets() == (0.0, 0.0, 0.0)
    assert loaded.pins() == {"forward": FORWARD, "backward": BACKWARD}
    for change, message in [({"backward": FORWARD}, "must be different pins"),
                            ({"safe_state": "forward"}, "safe_state"),
                            ({"startup_state": 120}, "outside -100..100")]:
        data["actuators"][0].update({"backward": BACKWARD, **change})
        with pytest.raises(config.ConfigError) as caught:
            config.load(write_config(data))
        assert message in str(caught.value)
        data["actuators"][0].pop("safe_state", None)
        data["actuators"][0].pop("startup_state", None)


def echo(*commands: tuple[str, dict[str, float]], **fan: Any) -> dict[str, Any]:
    output = [{"device_id": "fan", "action": a, "parameters": p} for a, p in commands]
    return {"pins": {"factory": "mock"},
            "actuators": [{"id": "fan", "kind": "motor", "forward": FORWARD, "backward": BACKWARD, **fan}],
            "plugins": {"defaults": {"timeout_ms": 20},
                        "settings": {"echo_output": {"config": {"output": json.dumps(output)}}}}}


class PinHistory:
    """The environment of a test: each pin's state at every tick, as the previous tick left it."""

    def __init__(self, factory: SimulatedFactory):
        self.factory = factory
        self.ticks: list[tuple[float, float]] = []

    def advance(self, now: float) -> None:
        self.ticks.append((float(self.factory.pin(FORWARD).state), float(self.factory.pin(BACKWARD).state)))

    def close(self) -> None:
        pass


def run(run_daemon, plugin_dir, data: dict[str, Any], ticks: int) -> tuple[Any, list[tuple[float, float]]]:
    daemon = run_daemon(data, 0, simulate=False, plugins=plugin_dir("echo_output"), clock=VirtualClock())
    daemon.hardware.environment = history = PinHistory(daemon.hardware.factory)
    asyncio.run(daemon.serve(ticks + 1))
    return daemon, history.ticks[1:]


def test_a_reversal_goes_through_stop_for_reverse_delay_s(run_daemon, plugin_dir) -> None:
    """Started forward, a plugin asks for backward: stopped at once, kept stopped for reverse_delay_s
    (1 s: 10 ticks), then backward; never both pins driven."""
    data = echo(("backward", {"speed": 40}), startup_state=50, reverse_delay_s=1.0)
    daemon, history = run(run_daemon, plugin_dir, data, 20)
    assert history == [(0.0, 0.0)] * 10 + [(0.0, 0.4)] * 10
    assert daemon.status.snapshot()["safety"]["held"]["fan"]["reverse_delay"] == 10


def test_after_start_up_a_motor_waits_reverse_delay_s_since_it_may_still_turn(run_daemon, plugin_dir) -> None:
    data = echo(("forward", {"speed": 70}), reverse_delay_s=0.5)
    _, history = run(run_daemon, plugin_dir, data, 10)
    assert history == [(0.0, 0.0)] * 5 + [(0.7, 0.0)] * 5


def test_without_a_reverse_delay_it_follows_the_plugin_at_once(run_daemon, plugin_dir) -> None:
    _, history = run(run_daemon, plugin_dir, echo(("backward", {"speed": 100}), startup_state=50, reverse_delay_s=0), 3)
    assert history == [(0.0, 1.0)] * 3


def test_its_safe_state_is_stopped() -> None:
    factory = SimulatedFactory()
    fan = actuators.build(MotorSettings(id="fan", kind="motor", forward=FORWARD, backward=BACKWARD,
                                        startup_state=-80), factory, state="safe")
    assert fan.target == 0.0 and pins(factory)[:2] == (0.0, 0.0)
    fan.close()


def test_home_assistant_sees_a_fan_with_a_percentage_and_a_direction() -> None:
    settings = config.parse(
        "pins: {factory: mock}\nmqtt: {enabled: true, node_id: pi}\nactuators:\n"
        f"  - {{id: fan, kind: motor, forward: {FORWARD}, backward: {BACKWARD}}}\n", Path("c.yaml"))
    (entity,) = (c for topic, c in discovery.configs(settings, {}).items() if topic.split("/")[1] == "fan")
    assert entity["command_topic"].endswith("/actuator/fan/set")
    assert entity["percentage_value_template"] == "{{ value_json.speed | round | int }}"  # HA takes whole numbers
    # Home Assistant reads a percentage and a direction only from their own state topics, and offers
    # setting them only with their own command topics: here both are the fan's.
    for feature in ("percentage", "direction"):
        assert entity[f"{feature}_state_topic"] == entity["state_topic"]
        assert entity[f"{feature}_command_topic"] == entity["command_topic"]
    assert "value_json.direction" in entity["direction_value_template"]
    factory = SimulatedFactory()
    fan = motor(factory)
    assert parse_set(fan, b"ON") == ("forward", {"speed": 100.0}, None)
    fan.apply(-30.0)
    assert parse_set(fan, b"55") == ("backward", {"speed": 55}, None)  # a speed keeps the direction
    assert parse_set(fan, b"forward") == ("forward", {"speed": 30.0}, None)  # a direction keeps the speed
    assert parse_set(fan, b"OFF") == ("stop", {}, None)
    fan.apply(0.0)
    with pytest.raises(Rejected, match="stopped"):
        parse_set(fan, b"reverse")
    fan.close()


def test_the_fan_model_blows_as_the_motor_drives_it(write_config) -> None:
    data = {"pins": {"factory": "mock"},
            "sensors": [{"id": "airflow", "kind": "mcp3008", "channel": 0, "unit": "m/s", "scale": 10.0}],
            "actuators": [{"id": "fan", "kind": "motor", "forward": FORWARD, "backward": BACKWARD}],
            "simulation": [{"kind": "fan", "motor": "fan", "sensor": "airflow", "spin_up_s": 1.0}]}
    settings = config.load(write_config(data))
    assert isinstance(settings.simulation[0], FanSettings)
    factory = SimulatedFactory()
    world = World(settings.sensors, settings.actuators, settings.simulation, factory)
    fan = actuators.build(settings.actuators[0], factory)
    (model,) = world.models
    fan.apply(-100.0)
    for second in range(6):
        world.advance(float(second))
    assert model.state()["airflow_mps"] == pytest.approx(-3.0, abs=0.03)  # full speed backward, spun up
    fan.apply(0.0)
    world.advance(6.0)
    assert -3.0 < model.state()["airflow_mps"] < -1.0  # spinning down, not stopped at once
    fan.close()
    world.close()


def test_plugin_call_gives_a_motor_in_the_context_its_pins() -> None:
    settings = tools.settings_for({"device_states": {"fan": {"type": "motor"}, "lamp": {"type": "pwm"}}})
    fan, lamp = settings.actuators
    assert isinstance(fan, MotorSettings) and fan.forward != fan.backward and lamp.pin not in fan.pins().values()
