"""Typed plugin config: what an operator may set, with a schema and without one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pi_controller import config
from pi_controller.contract import Rejected
from pi_controller.plugins.manifest import Refused, load_manifest
from pi_controller.plugins.plugin_config import ConfigField, check_change

SCHEMA = {"setpoint": ConfigField("number", min=5, max=30), "steps": ConfigField("integer", min=0),
          "mode": ConfigField("string", allowed=("heat", "off")), "name": ConfigField("string", max_length=8),
          "eco": ConfigField("boolean")}
CURRENT = {"setpoint": 21.0, "mode": "heat", "curve": [1, 2]}


@pytest.mark.parametrize("key,value,rule", [
    ("setpoint", "hot", "wrong_type"), ("setpoint", True, "wrong_type"), ("setpoint", float("nan"), "not_finite"),
    ("setpoint", 80, "out_of_range"), ("setpoint", 4.9, "out_of_range"), ("steps", 1.5, "wrong_type"),
    ("mode", "cool", "not_allowed"), ("name", "x" * 9, "too_large"), ("eco", 1, "wrong_type"),
    ("turbo", 1, "unknown_key"),
])
def test_a_schema_refuses_what_it_does_not_allow(key: str, value: Any, rule: str) -> None:
    with pytest.raises(Rejected) as caught:
        check_change(key, value, SCHEMA, CURRENT)
    assert caught.value.rule == rule and key in str(caught.value)


@pytest.mark.parametrize("key,value", [("setpoint", 5), ("setpoint", 30.0), ("steps", 3), ("mode", "off"),
                                       ("name", "x" * 8), ("eco", False)])
def test_a_schema_takes_what_it_allows(key: str, value: Any) -> None:
    check_change(key, value, SCHEMA, CURRENT)


@pytest.mark.parametrize("key,value,rule", [
    ("turbo", 1, "unknown_key"), ("setpoint", "hot", "wrong_type"), ("setpoint", None, "wrong_type"),
    ("curve", {"a": 1}, "wrong_type"), ("curve", [0] * 2000, "too_large"), ("mode", "x" * 5000, "too_large"),
])
def test_without_a_schema_only_existing_keys_with_their_json_type_and_4_kib(key: str, value: Any, rule: str) -> None:
    with pytest.raises(Rejected) as caught:
        check_change(key, value, None, CURRENT)
    assert caught.value.rule == rule


def test_without_a_schema_a_whole_config_is_at_most_64_kib() -> None:
    current = {f"k{i}": "x" * 4000 for i in range(16)}
    with pytest.raises(Rejected) as caught:
        check_change("k0", "y" * 4000, None, current | {"k16": "x" * 4000})
    assert caught.value.rule == "too_large" and "whole config" in str(caught.value)
    check_change("k0", "y" * 4000, None, current)  # 16 values of 4 KB fit


def test_a_manifest_whose_defaults_break_its_own_schema_is_refused_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("name: p\nconfig: {setpoint: 99}\nconfig_schema:\n"
                                     "  setpoint: {type: number, max: 30}\n")
    with pytest.raises(Refused) as caught:
        load_manifest(tmp_path / "p.wasm")
    assert str(caught.value) == (f"manifest {tmp_path / 'p.yaml'}:2: config.setpoint: config 'setpoint': 99 is "
                                 "above the maximum 30")


def test_a_config_value_over_4_kib_in_the_daemon_s_config_is_an_error_with_its_line(tmp_path: Path) -> None:
    text = "plugins:\n  settings:\n    p:\n      config: {output: '" + "x" * 5000 + "'}\n"
    with pytest.raises(config.ConfigError) as caught:
        config.parse(text, tmp_path / "c.yaml")
    assert caught.value.line == 4 and caught.value.path == ("plugins", "settings", "p", "config", "output")
    assert "config 'output' is 5002 bytes of JSON, over 4096" in str(caught.value)


@pytest.mark.parametrize("field,why", [("{type: number, step: 0}", "0 is out of range"),
                                       ("{type: number, unit: '" + "x" * 17 + "'}", "up to 16 printable characters")])
def test_a_schema_s_unit_and_step_for_home_assistant_are_checked(tmp_path: Path, field: str, why: str) -> None:
    (tmp_path / "p.yaml").write_text(f"name: p\nconfig_schema:\n  setpoint: {field}\n")
    with pytest.raises(Refused, match=why):
        load_manifest(tmp_path / "p.wasm")
    (tmp_path / "p.yaml").write_text("name: p\nconfig_schema:\n  setpoint: {type: number, step: 0.5, unit: '°C'}\n")
    manifest = load_manifest(tmp_path / "p.wasm")
    assert manifest is not None and manifest.config_schema is not None
    assert (manifest.config_schema["setpoint"].step, manifest.config_schema["setpoint"].unit) == (0.5, "°C")


@pytest.mark.parametrize("role,why", [
    ("{current: sensor, target: hysteresis, heater: heater}", "thermostat.target: 'hysteresis' must be a number"),
    ("{current: probe, target: setpoint, heater: heater}", "thermostat.current: 'probe' must be a config key"),
    ("{current: sensor, target: setpoint}", "heater"),
])
def test_a_thermostat_role_names_a_bounded_target_and_default_ids(tmp_path: Path, role: str, why: str) -> None:
    schema = ("config_schema:\n  setpoint: {type: number, min: 5, max: 30}\n  hysteresis: {type: number}\n"
              "  sensor: {type: string}\n  heater: {type: string}\nconfig: {sensor: t, heater: h}\n")
    (tmp_path / "p.yaml").write_text(f"name: p\n{schema}thermostat: {role}\n")
    with pytest.raises(Refused, match=why):
        load_manifest(tmp_path / "p.wasm")
    good = "thermostat: {current: sensor, target: setpoint, heater: heater}\n"
    (tmp_path / "p.yaml").write_text(f"name: p\n{schema}{good}")
    manifest = load_manifest(tmp_path / "p.wasm")
    assert manifest.thermostat is not None
    climate = manifest.thermostat.resolve({"sensor": "t", "heater": "h"}, manifest.config_schema)
    assert climate is not None and (climate.sensor, climate.heater, climate.target) == ("t", "h", "setpoint")
