"""Plugins in AssemblyScript, built with the upstream Extism PDK (@extism/as-pdk) and our helper
plugins/assemblyscript/pi.ts, run by the real host: the example daylight_dimmer (Var and Config
through the upstream PDK, our manifest and grants) and a test plugin on the host functions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from pi_controller import contract
from pi_controller.config import PluginSettings
from pi_controller.contract import Reading
from pi_controller.plugins.plugin_set import PluginSet
from pi_controller.plugins.sandbox import PluginCallError, SandboxedPlugin
from tests.conftest import CONTEXT, REPO, only

EXAMPLES = REPO / "plugins" / "examples"


def dimmer(plugin_set: Any, tmp_path: Path, schema: bool = True, **settings: Any) -> SandboxedPlugin:
    return only(dimmer_set(plugin_set, tmp_path, schema, **settings))


def dimmer_set(plugin_set: Any, tmp_path: Path, schema: bool = True, **settings: Any) -> PluginSet:
    """daylight_dimmer with its manifest, as an operator would drop it into the plugins folder (without
    its config_schema when `schema` is false, so that a bad value reaches the plugin)."""
    folder = tmp_path / "plugins"
    folder.mkdir(exist_ok=True)
    manifest = yaml.safe_load((EXAMPLES / "daylight_dimmer.yaml").read_text())
    if not schema:
        del manifest["config_schema"]
    (folder / "daylight_dimmer.yaml").write_text(yaml.safe_dump(manifest))
    return plugin_set("daylight_dimmer", settings={"daylight_dimmer": PluginSettings(**settings)})


def context(lux: float | None, other: float = 0.0) -> bytes:
    readings = [Reading("temperature_sensor", other, "celsius", 1.0),
                Reading("light_sensor", lux, "lux", 1.0, None if lux is not None else "no echo")]
    body = {"sensor_readings": [r.as_json() for r in readings], "device_states": {}, "timestamp": 1.0, "tick": 1}
    return json.dumps(body, separators=(",", ":"))[:-1].encode()  # the host splices the config in


def duties(plugin: SandboxedPlugin, *lux: float | None) -> list[Any]:
    result = []
    for value in lux:
        commands = json.loads(plugin.call(context(value)))
        result.append([(c["device_id"], c["action"], c["parameters"].get("duty_cycle")) for c in commands])
    return result


def test_the_dimmer_tops_the_light_up_smoothing_it_in_an_extism_var(plugin_set, tmp_path) -> None:
    plugin = dimmer(plugin_set, tmp_path, config={"smoothing": 0.5})  # target_lux 400 from the manifest
    assert duties(plugin, 100, 100, 300, 500, 500) == [
        [("led_strip", "pwm", 75.0)],  # first reading: nothing to smooth yet
        [("led_strip", "pwm", 75.0)],
        [("led_strip", "pwm", 50.0)],  # smoothed 200 of 400
        [("led_strip", "pwm", 12.5)],  # smoothed 350
        [("led_strip", "pwm", 0.0)],  # 425: daylight is enough
    ]


def test_an_invalid_reading_commands_nothing(plugin_set, tmp_path) -> None:
    assert duties(dimmer(plugin_set, tmp_path), None) == [[]]


def test_its_manifest_grants_it_the_light_and_the_strip_only(plugin_set, tmp_path) -> None:
    plugin = dimmer(plugin_set, tmp_path)
    assert plugin.grant.sensors == {"light_sensor"} and plugin.grant.actuators == {"led_strip"}
    readings = [Reading("temperature_sensor", 0.0, "celsius", 1.0), Reading("light_sensor", 100.0, "lux", 1.0)]
    seen = json.loads(plugin.view(contract.encode_context(readings, "{}", 1.0, 1, monotonic=0.5)) + b"}")
    assert [r["sensor_id"] for r in seen["sensor_readings"]] == ["light_sensor"]


def test_a_bad_config_is_refused_by_the_manifest_s_schema(plugin_set, tmp_path) -> None:
    plugins = dimmer_set(plugin_set, tmp_path, config={"target_lux": -5})
    assert not list(plugins)
    assert plugins.status["daylight_dimmer"].reason == (
        "plugins.settings.daylight_dimmer.config.target_lux: config 'target_lux': -5 is below the minimum 1 "
        "(the manifest's config_schema)")


def test_a_bad_config_fails_the_call_with_the_plugin_s_own_message(plugin_set, tmp_path) -> None:
    plugin = dimmer(plugin_set, tmp_path, schema=False, config={"target_lux": -5})
    with pytest.raises(PluginCallError) as caught:
        plugin.call(context(100.0))
    assert caught.value.kind == "error_return"
    assert str(caught.value).startswith(
        "need 0 < smoothing <= 1 and target_lux > 0 at plugins/examples/daylight_dimmer.ts")


def test_thousands_of_calls_fit_the_default_limits(plugin_set, tmp_path) -> None:
    plugin = dimmer(plugin_set, tmp_path)  # 32 pages, 2,000,000 fuel, 10 ms: the defaults
    assert plugin.grant.memory_pages == 32
    for tick in range(3000):  # the incremental runtime frees what each call allocated
        json.loads(plugin.call(context(float(tick % 800))))


def test_host_functions_through_the_assemblyscript_helper(plugin_set) -> None:
    plugins = plugin_set("smoothed_light_as")
    with capture_logs() as logs:
        assert json.loads(only(plugins).call(CONTEXT, 1)) == []
        for tick, lux in enumerate((20.0, 40.0, 50.0, 70.0), start=1):
            plugins.history.record([Reading("light", lux, "lux", float(tick))])
        assert json.loads(only(plugins).call(CONTEXT, 5)) == [
            {"device_id": "led_strip", "action": "pwm", "parameters": {"duty_cycle": 45.0}}]
    lines = [(e["log_level"], e["message"], e.get("fields")) for e in logs if e["event"] == "plugin_log"]
    assert lines == [("warning", "no light history", None), ("info", "dimming to the mean", {"window": 4})]
