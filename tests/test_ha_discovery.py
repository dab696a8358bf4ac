"""Home Assistant discovery checked against Home Assistant itself: every key of every payload is one its
MQTT platforms accept, and every template renders, with Jinja as Home Assistant does, to a valid state
from what the daemon really publishes on the template's topic (the telemetry's outbox after real ticks)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pi_controller import config
from pi_controller.clock import VirtualClock
from pi_controller.config import ConfigError
from pi_controller.contract import Reading
from pi_controller.daemon import Daemon
from pi_controller.mqtt import discovery, inbox
from pi_controller.mqtt.telemetry import Telemetry
from pi_controller.operator import SetActuator
from pi_controller.plugins.plugin_config import ConfigField
from tests.conftest import BUNDLED_PLUGINS, example_data

# What Home Assistant's MQTT discovery accepts, per platform. Its DISCOVERY_SCHEMAs drop any other key
# without a word (extra=vol.REMOVE_EXTRA), so a misspelt or misplaced key would silently do nothing.
# From home-assistant/core, homeassistant/components/mqtt/:
#   config.py   MQTT_BASE_SCHEMA (qos, encoding), MQTT_RO_SCHEMA (+ state_topic, value_template),
#               MQTT_RW_SCHEMA (+ command_topic, optimistic, retain, state_topic)
#   schemas.py  MQTT_AVAILABILITY_SCHEMA (single and list forms) and MQTT_ENTITY_COMMON_SCHEMA; the
#               2025.10 `default_entity_id` (schemas.py, `vol.Optional(CONF_DEFAULT_ENTITY_ID)`), which
#               replaces the deprecated `object_id`; `entity_picture` (2024.1)
BASE = {"qos", "encoding"}
RO = BASE | {"state_topic", "value_template"}
RW = BASE | {"command_topic", "optimistic", "retain", "state_topic"}
COMMON = {"availability", "availability_mode", "availability_template", "availability_topic", "payload_available",
          "payload_not_available", "device", "origin", "enabled_by_default", "entity_category", "entity_picture",
          "icon", "json_attributes_topic", "json_attributes_template", "object_id", "default_entity_id",
          "unique_id", "platform"}
ACCEPTED = {
    # sensor.py _PLATFORM_SCHEMA_BASE
    "sensor": RO | COMMON | {"device_class", "expire_after", "force_update", "last_reset_value_template", "name",
                             "options", "suggested_display_precision", "state_class", "unit_of_measurement"},
    # binary_sensor.py PLATFORM_SCHEMA_MODERN
    "binary_sensor": RO | COMMON | {"device_class", "expire_after", "force_update", "name", "off_delay",
                                    "payload_off", "payload_on"},
    # switch.py PLATFORM_SCHEMA_MODERN
    "switch": RW | COMMON | {"command_template", "name", "payload_off", "payload_on", "state_off", "state_on",
                             "value_template", "device_class"},
    # number.py _PLATFORM_SCHEMA_BASE
    "number": RW | COMMON | {"command_template", "device_class", "max", "min", "mode", "name", "payload_reset",
                             "step", "unit_of_measurement", "value_template"},
    # select.py PLATFORM_SCHEMA_MODERN
    "select": RW | COMMON | {"command_template", "name", "options", "value_template"},
    # button.py PLATFORM_SCHEMA_MODERN
    "button": BASE | COMMON | {"command_template", "command_topic", "device_class", "name", "payload_press",
                               "retain"},
    # light/schema_json.py _PLATFORM_SCHEMA_BASE, with light/schema.py's `schema`
    "light": RW | COMMON | {"schema", "brightness", "brightness_scale", "color_temp_kelvin", "effect", "effect_list",
                            "flash", "flash_time_long", "flash_time_short", "max_mireds", "min_mireds",
                            "max_kelvin", "min_kelvin", "name", "supported_color_modes", "transition",
                            "white_scale"},
    # fan.py _PLATFORM_SCHEMA_BASE
    "fan": RW | COMMON | {"name", "command_template", "direction_command_topic", "direction_command_template",
                          "direction_state_topic", "direction_value_template", "oscillation_command_topic",
                          "oscillation_command_template", "oscillation_state_topic", "oscillation_value_template",
                          "percentage_command_topic", "percentage_command_template", "percentage_state_topic",
                          "percentage_value_template", "preset_mode_command_topic", "preset_modes",
                          "preset_mode_command_template", "preset_mode_state_topic", "preset_mode_value_template",
                          "speed_range_min", "speed_range_max", "payload_reset_percentage",
                          "payload_reset_preset_mode", "payload_off", "payload_on", "payload_oscillation_off",
                          "payload_oscillation_on", "state_value_template"},
    # climate.py _PLATFORM_SCHEMA_BASE (MQTT_BASE_SCHEMA: no state_topic nor command_topic of its own)
    "climate": BASE | COMMON | {"name", "optimistic", "payload_off", "payload_on", "retain", "temperature_unit",
                                "value_template", "precision", "initial", "min_temp", "max_temp", "temp_step",
                                "modes", "mode_command_template", "mode_command_topic", "mode_state_template",
                                "mode_state_topic", "action_template", "action_topic", "current_temperature_template",
                                "current_temperature_topic", "current_humidity_template", "current_humidity_topic",
                                "temperature_command_template", "temperature_command_topic",
                                "temperature_state_template", "temperature_state_topic",
                                "temperature_high_command_template", "temperature_high_command_topic",
                                "temperature_high_state_template", "temperature_high_state_topic",
                                "temperature_low_command_template", "temperature_low_command_topic",
                                "temperature_low_state_template", "temperature_low_state_topic",
                                "power_command_template", "power_command_topic", "fan_modes",
                                "fan_mode_command_template", "fan_mode_command_topic", "fan_mode_state_template",
                                "fan_mode_state_topic", "preset_modes", "preset_mode_command_template",
                                "preset_mode_command_topic", "preset_mode_state_topic", "preset_mode_value_template",
                                "swing_modes", "swing_mode_command_template", "swing_mode_command_topic",
                                "swing_mode_state_template", "swing_mode_state_topic", "swing_horizontal_modes",
                                "swing_horizontal_mode_command_template", "swing_horizontal_mode_command_topic",
                                "swing_horizontal_mode_state_template", "swing_horizontal_mode_state_topic",
                                "max_humidity", "min_humidity", "target_humidity_command_template",
                                "target_humidity_command_topic", "target_humidity_state_template",
                                "target_humidity_state_topic"},
    # update.py PLATFORM_SCHEMA_MODERN (MQTT_RO_SCHEMA; command_topic optional)
    "update": RO | COMMON | {"command_topic", "device_class", "display_precision", "latest_version_template",
                             "latest_version_topic", "name", "payload_install", "release_summary", "release_url",
                             "retain", "title"},
    # event.py _PLATFORM_SCHEMA_BASE (MQTT_RO_SCHEMA; event_types required)
    "event": RO | COMMON | {"device_class", "name", "event_types"},
}
COMMANDED = {"switch", "number", "select", "button", "light", "fan"}  # command_topic is required
# schemas.py: MQTT_ENTITY_DEVICE_INFO_SCHEMA, MQTT_ORIGIN_INFO_SCHEMA, the availability list's entries
DEVICE = {"identifiers", "connections", "manufacturer", "model", "model_id", "name", "hw_version", "serial_number",
          "sw_version", "via_device", "suggested_area", "configuration_url"}
ORIGIN = {"name", "sw_version", "support_url"}
AVAILABILITY = {"topic", "payload_available", "payload_not_available", "value_template"}
# The templates Home Assistant renders, and the topic each renders a message of.
TEMPLATES = {"value_template": "state_topic", "state_value_template": "state_topic",
             "mode_state_template": "mode_state_topic", "temperature_state_template": "temperature_state_topic",
             "current_temperature_template": "current_temperature_topic", "action_template": "action_topic",
             "percentage_value_template": "percentage_state_topic",
             "direction_value_template": "direction_state_topic", "json_attributes_template": "json_attributes_topic"}

JINJA = ImmutableSandboxedEnvironment()  # what Home Assistant renders templates with


def render(template: str, payload: bytes) -> str:
    """As Home Assistant's MqttValueTemplate.async_render_with_possible_json_value: `value` and `value_json`."""
    text = payload.decode()
    return JINJA.from_string(template).render(value=text, value_json=json.loads(text)).strip()


# A plugin's config keys of every kind that gets an entity, and two that get none.
SCHEMA_EXTRA = {"mode": {"type": "string", "allowed": ["eco", "comfort"]}, "boost": {"type": "boolean"},
                "level": {"type": "integer", "allowed": [1, 2, 3]}, "days": {"type": "integer", "min": 0, "max": 7},
                "label": {"type": "string"}, "ceiling": {"type": "number", "min": 0}}


@pytest.fixture
def published(tmp_path: Path, write_config):
    """A daemon on mock pins with the bundled plugins (one shadowed, one with every kind of config key),
    a motor, an operator's override of the LED strip, run 30 ticks; its discovery configs, per topic the
    last payload the telemetry queued, and the failsafes and safety holds the loop counted."""
    folder = tmp_path / "plugins"
    (folder / "shadow").mkdir(parents=True)
    for name in ("temperature_control", "motion_light", "energy_saver"):
        shutil.copy(BUNDLED_PLUGINS / f"{name}.wasm", folder / f"{name}.wasm")
        shutil.copy(BUNDLED_PLUGINS / f"{name}.yaml", folder / f"{name}.yaml")
    shutil.copy(BUNDLED_PLUGINS / "temperature_control.wasm", folder / "shadow" / "temperature_control.wasm")
    manifest = yaml.safe_load((folder / "temperature_control.yaml").read_text())
    manifest["config_schema"] |= SCHEMA_EXTRA
    (folder / "temperature_control.yaml").write_text(yaml.safe_dump(manifest))
    data = example_data()
    data["plugins"]["directory"] = str(folder)
    data["actuators"].append({"id": "fan", "kind": "motor", "forward": 20, "backward": 21})
    next(a for a in data["actuators"] if a["id"] == "led_strip")["max_rate"] = 5.0  # the override ramps: holds
    data["mqtt"] = {"node_id": "testpi", "heartbeat_s": 30}
    daemon = Daemon(config.load(write_config(data)), simulate=True, clock=VirtualClock())
    try:
        daemon.operator.submit(SetActuator("led_strip", b'{"brightness": 30}'))
        asyncio.run(daemon.serve(30))
        telemetry = Telemetry(daemon.settings, daemon.status, daemon.operator)
        telemetry.tick_done(None)  # type: ignore[arg-type]  # it reads the status, not the report
        payloads = {topic: payload for topic, payload, _ in telemetry.outbox}
        configs = {topic: config_ for topic, config_ in discovery.configs(
            daemon.settings, daemon.status.config_schemas(), daemon.status.shadowed(),
            daemon.status.thermostats()).items() if config_}  # not removals
        counted = {"failsafes": sum(daemon.loop.safety.failsafes.values()),
                   "safety_holds": sum(sum(rules.values()) for rules in daemon.loop.safety.held.values())}
        yield configs, payloads, counted
    finally:
        daemon.close()


def platform_of(topic: str) -> str:
    return topic.split("/")[1]


def test_every_discovery_payload_uses_only_keys_home_assistant_accepts(published) -> None:
    configs, _, _ = published
    platforms = {platform_of(topic) for topic in configs}
    assert platforms == set(ACCEPTED), "every platform we emit is checked, and each is emitted"
    for topic, payload in configs.items():
        check_accepted(topic, payload)
    assert len({payload["unique_id"] for payload in configs.values()}) == len(configs)
    assert all(payload["unique_id"].startswith(discovery.UNIQUE_ID_PREFIX) for payload in configs.values())


def test_read_only_payloads_are_accepted_too(write_config) -> None:
    """Read-only mode's own payloads: its stand-ins for what takes commands are sensors, in no config
    category (which Home Assistant refuses on a sensor or binary_sensor)."""
    data = example_data()
    data["mqtt"] = {"node_id": "testpi", "commands": False}
    schemas = {"temperature_control": {"setpoint": ConfigField("number", min=5, max=30)}}
    read_only = {t: c for t, c in discovery.configs(config.load(write_config(data)), schemas).items() if c}
    assert {platform_of(topic) for topic in read_only} == {"sensor", "binary_sensor", "event"}
    for topic, payload in read_only.items():
        check_accepted(topic, payload)
    enabled = read_only["homeassistant/binary_sensor/testpi/plugin_temperature_control_enabled/config"]
    assert "entity_category" not in enabled


def check_accepted(topic: str, payload: dict[str, Any]) -> None:
    """What Home Assistant's discovery schema of the topic's platform takes, or fail saying why not."""
    platform = platform_of(topic)
    assert set(payload) <= ACCEPTED[platform], f"{topic}: {set(payload) - ACCEPTED[platform]}"
    assert set(payload["device"]) <= DEVICE and set(payload["origin"]) <= ORIGIN
    assert all(set(entry) <= AVAILABILITY and "topic" in entry for entry in payload["availability"])
    assert payload.get("availability_mode", "all") == "all"
    assert "object_id" not in payload and payload["default_entity_id"].startswith(f"{platform}.")
    assert payload.get("entity_category") in (None, "config", "diagnostic")
    assert platform in COMMANDED | {"update"} or "command_topic" not in payload
    assert platform not in COMMANDED or payload["command_topic"]
    assert platform in ("button", "climate") or payload["state_topic"]
    for template, topic_key in TEMPLATES.items():
        assert template not in payload or payload.get(topic_key), f"{topic}: {template} without {topic_key}"
    if platform in ("sensor", "binary_sensor"):  # entity.py: "cannot be added as the entity category is set to config"
        assert payload.get("entity_category") != "config", f"{topic}: a sensor's category may only be diagnostic"
    if platform == "sensor":  # sensor.py validate_sensor_state_and_device_class_config
        if "options" in payload:
            assert payload["device_class"] == "enum" and payload["options"]
            assert "state_class" not in payload and "unit_of_measurement" not in payload
        assert payload.get("suggested_display_precision", 0) >= 0  # cv.positive_int
    if platform == "number":  # number.py validate_config; its step is at least 0.001
        assert payload["min"] < payload["max"] and payload["step"] >= 0.001
    if platform == "select":
        assert payload["options"] and all(isinstance(option, str) for option in payload["options"])
    if platform == "climate":  # climate.py: modes from HVACMode, precision one of three, bounds in order
        assert set(payload["modes"]) <= {"off", "heat", "cool", "heat_cool", "auto", "dry", "fan_only"}
        assert payload["precision"] in (0.1, 0.5, 1.0) and payload["min_temp"] < payload["max_temp"]
        assert payload.get("temperature_unit", "C") in ("C", "F")
    if platform == "event":
        assert payload["event_types"] and all(isinstance(kind, str) for kind in payload["event_types"])


def test_every_template_renders_to_a_valid_state_from_what_is_published(published) -> None:
    configs, payloads, _ = published
    rendered = 0
    for topic, config_ in configs.items():
        platform = platform_of(topic)
        for entry in config_["availability"][1:]:  # the first is the status topic, without a template
            assert render(entry["value_template"], payloads[entry["topic"]]) in ("online", "offline")
        for template, topic_key in TEMPLATES.items():
            if template in config_:
                value = render(config_[template], payloads[config_[topic_key]])
                check_state(platform, template, value, config_, topic)
                rendered += 1
    assert rendered >= len([topic for topic in configs if platform_of(topic) != "event"])  # events: no template


def check_state(platform: str, template: str, value: str, entity: dict[str, Any], topic: str) -> None:
    """What Home Assistant's entity would take `value` as, or fail saying why it would not."""
    where = f"{topic} {template} gave {value!r}"
    if template == "json_attributes_template":
        assert isinstance(json.loads(value), dict), where
    elif template == "percentage_value_template":
        assert entity["speed_range_min"] - 1 <= int(value) <= entity["speed_range_max"], where
    elif platform == "update":  # update.py MQTT_JSON_UPDATE_SCHEMA
        state = json.loads(value)
        progress = {key: state.pop(key, default) for key, default in (("in_progress", False),
                                                                      ("update_percentage", None))}
        summary = state.pop("release_summary", "")
        assert isinstance(summary, str) and len(summary) <= 255, where  # Home Assistant's own limit
        assert set(state) <= {"installed_version", "latest_version", "title"}, where
        assert all(isinstance(v, str) and v for v in state.values()), where
        assert isinstance(progress["in_progress"], bool), where
        assert progress["update_percentage"] is None or 0 <= progress["update_percentage"] <= 100, where
    elif template == "mode_state_template":
        assert value in entity["modes"], where
    elif template == "action_template":  # climate.py: an HVACAction
        assert value in ("off", "heating", "cooling", "drying", "idle", "fan", "preheating", "defrosting"), where
    elif template in ("temperature_state_template", "current_temperature_template"):
        assert value == "None" or entity["min_temp"] - 50 <= float(value) <= entity["max_temp"] + 50, where
    elif template == "direction_value_template":
        assert value in ("forward", "reverse"), where
    elif value == "None" and entity.get("entity_category") == "config" and "/plugin/" in entity["state_topic"]:
        pass  # a config key the plugin's config leaves out: unknown
    elif template == "state_value_template" or platform == "switch":
        assert value in (entity.get("state_on", entity.get("payload_on")),
                         entity.get("state_off", entity.get("payload_off"))), where
    elif platform == "binary_sensor":
        assert value in ("ON", "OFF", "None"), where
    elif platform == "number":
        assert entity["min"] <= float(value) <= entity["max"], where
    elif platform in ("select",) or "options" in entity:
        assert value in entity["options"], where
    elif platform == "sensor" and ("unit_of_measurement" in entity or "state_class" in entity):
        number = float(value)  # a numeric sensor refuses anything else
        digits = entity.get("suggested_display_precision")
        if "/sensor/" in entity["state_topic"]:  # a reading: rounded on the wire to what is shown
            assert round(number, digits) == number, f"{where}: more than {digits} decimals on the wire"
    else:
        assert value and value != "None", where  # the version


def test_plugin_config_keys_become_number_select_and_switch_entities(published) -> None:
    configs, payloads, _ = published
    prefix = "homeassistant/%s/testpi/plugin_temperature_control_config_%s/config"
    setpoint = configs[prefix % ("number", "setpoint")]
    assert (setpoint["min"], setpoint["max"], setpoint["step"], setpoint["unit_of_measurement"]) == (5, 30, 0.1, "°C")
    assert setpoint["entity_category"] == "config" and setpoint["mode"] == "box"
    assert setpoint["device_class"] == "temperature"  # converted for those who read °F
    assert "device_class" not in configs[prefix % ("number", "days")]
    assert setpoint["command_topic"] == "pi-controller/testpi/plugin/temperature_control/config/setpoint/set"
    assert render(setpoint["value_template"], payloads[setpoint["state_topic"]]) == "21.0"  # the config's value
    assert configs[prefix % ("number", "days")]["step"] == 1  # an integer
    assert configs[prefix % ("select", "mode")]["options"] == ["eco", "comfort"]
    assert configs[prefix % ("select", "level")]["options"] == ["1", "2", "3"]  # as the command is parsed
    boost = configs[prefix % ("switch", "boost")]
    assert (boost["payload_on"], boost["payload_off"]) == ("true", "false")  # JSON, as config values are read
    names = {topic.split("/")[3] for topic in configs}
    assert not {"plugin_temperature_control_config_label", "plugin_temperature_control_config_ceiling",
                "plugin_temperature_control_config_sensor"} & names  # no control fits: no entity


def test_read_only_mode_offers_no_config_entity_no_resume_button_and_no_update(write_config) -> None:
    schemas = {"temperature_control": {"setpoint": ConfigField("number", min=5, max=30)}}
    data = example_data()
    entities = {}
    for commands in (True, False):
        data["mqtt"] = {"node_id": "testpi", "commands": commands}
        entities[commands] = {t.split("/")[3] for t, c in discovery.configs(config.load(write_config(data)),
                                                                              schemas).items() if c}
    assert entities[True] - entities[False] == {
        "plugin_temperature_control_config_setpoint", "led_strip_resume", "servo_motor_resume", "relay_switch_resume",
        "plugin_temperature_control_update"}  # its install is a command


def test_each_mode_empties_the_other_modes_entities(write_config) -> None:
    """Switching between read-only and commands leaves no orphan: each mode empties the configs of the
    other's stand-ins, by name (whatever the clean-up's subscription finds)."""
    schemas = {"temperature_control": {"setpoint": ConfigField("number", min=5, max=30)}}
    data = example_data()
    configs = {}
    for commands in (True, False):
        data["mqtt"] = {"node_id": "testpi", "commands": commands}
        configs[commands] = discovery.configs(config.load(write_config(data)), schemas)
    shown = {commands: {t for t, c in configs[commands].items() if c} for commands in (True, False)}
    emptied = {commands: {t for t, c in configs[commands].items() if not c} for commands in (True, False)}
    swapped = shown[False] - shown[True]  # the read-only stand-ins
    assert "homeassistant/binary_sensor/testpi/plugin_temperature_control_enabled/config" in swapped
    assert "homeassistant/sensor/testpi/servo_motor/config" in swapped
    assert emptied[True] == swapped
    assert emptied[False] == shown[True] - shown[False]  # commandable, config controls and resume buttons too
    assert "homeassistant/button/testpi/led_strip_resume/config" in emptied[False]


def test_an_override_shows_until_when_with_a_resume_button(published) -> None:
    configs, payloads, _ = published
    state = json.loads(payloads["pi-controller/testpi/actuator/led_strip/state"])
    assert state["override"] and state["owner"] == "operator" and state["override_expires_at"].endswith("+00:00")
    light = configs["homeassistant/light/testpi/led_strip/config"]
    attributes = json.loads(render(light["json_attributes_template"], payloads[light["json_attributes_topic"]]))
    assert attributes["overridden"] and attributes["override_expires_at"] == state["override_expires_at"]
    button = configs["homeassistant/button/testpi/led_strip_resume/config"]
    assert button["command_topic"] == "pi-controller/testpi/actuator/led_strip/release"
    assert render(button["availability"][1]["value_template"], payloads[button["availability"][1]["topic"]]) == "online"
    relay = json.loads(payloads["pi-controller/testpi/actuator/relay_switch/state"])
    assert not relay["override"] and relay["override_expires_at"] is None


def test_diagnostics_come_from_loop_state(published) -> None:
    configs, payloads, counted = published
    loop = json.loads(payloads["pi-controller/testpi/loop/state"])
    assert isinstance(loop["uptime_s"], int) and loop["version"] and loop["last_reload"] == "none"
    assert loop["watchdog_trips"] == 0
    assert (loop["failsafes"], loop["safety_holds"]) == (counted["failsafes"], counted["safety_holds"])
    assert counted["safety_holds"] > 0  # the override's ramp at least: the numbers are not zeros by default
    for key in ("uptime_s", "version", "watchdog_trips", "failsafes", "safety_holds", "last_reload"):
        entity = configs[f"homeassistant/sensor/testpi/loop_{key}/config"]
        assert entity["entity_category"] == "diagnostic" and entity["state_topic"].endswith("/loop/state")
    assert configs["homeassistant/sensor/testpi/loop_last_reload/config"]["options"] == discovery.RELOAD_OUTCOMES


def test_the_plugin_state_is_an_enum_sensor(published) -> None:
    configs, payloads, _ = published
    entity = configs["homeassistant/sensor/testpi/plugin_motion_light/config"]
    assert entity["device_class"] == "enum" and entity["options"] == ["loaded", "quarantined", "disabled", "failed"]
    assert render(entity["value_template"], payloads[entity["state_topic"]]) == "loaded"


def test_a_shadow_shows_its_agreement(published) -> None:
    configs, payloads, _ = published
    entity = configs["homeassistant/sensor/testpi/plugin_temperature_control_shadow_agreement/config"]
    assert entity["entity_category"] == "diagnostic" and entity["unit_of_measurement"] == "%"
    assert float(render(entity["value_template"], payloads[entity["state_topic"]])) == 100.0  # the same plugin
    attributes = json.loads(render(entity["json_attributes_template"], payloads[entity["json_attributes_topic"]]))
    assert attributes["ticks"] > 0 and attributes["actuators"] == {"relay_switch": 100.0}
    assert "homeassistant/sensor/testpi/plugin_motion_light_shadow_agreement/config" not in configs  # no shadow


def test_sensor_values_go_out_rounded_to_their_precision(published) -> None:
    configs, payloads, _ = published
    temperature = json.loads(payloads["pi-controller/testpi/sensor/temperature_sensor/state"])
    assert round(temperature["value"], 1) == temperature["value"]
    assert configs["homeassistant/sensor/testpi/temperature_sensor/config"]["suggested_display_precision"] == 1
    assert configs["homeassistant/sensor/testpi/light_sensor/config"]["suggested_display_precision"] == 0
    assert "suggested_display_precision" not in configs["homeassistant/binary_sensor/testpi/motion_sensor/config"]


def test_a_sensor_precision_in_the_config_is_checked_and_used(write_config) -> None:
    data = example_data()
    data["sensors"][0]["precision"] = 3
    settings = config.load(write_config(data))
    assert settings.sensors[0].decimals() == 3
    assert Reading("t", 21.123456, "celsius", 1.0).as_json(3)["value"] == 21.123
    for bad in (7, 1.5, "two"):
        data["sensors"][0]["precision"] = bad
        with pytest.raises(ConfigError, match="precision"):
            config.load(write_config(data))


def test_a_failed_read_is_unknown_and_its_sensor_unavailable(published) -> None:
    configs, _, _ = published
    failed = json.dumps(Reading("motion_sensor", None, "boolean", 1.0, "OSError: no pin").as_json()).encode()
    motion = configs["homeassistant/binary_sensor/testpi/motion_sensor/config"]
    assert render(motion["value_template"], failed) == "None"  # Home Assistant: unknown, not "Clear"
    assert render(motion["value_template"], json.dumps(Reading("m", 1.0, "boolean", 1.0).as_json()).encode()) == "ON"
    assert render(motion["value_template"], json.dumps(Reading("m", 0.0, "boolean", 1.0).as_json()).encode()) == "OFF"
    (availability,) = motion["availability"][1:]
    assert availability["topic"] == motion["state_topic"]
    assert render(availability["value_template"], failed) == "offline"
    temperature = configs["homeassistant/sensor/testpi/temperature_sensor/config"]
    assert render(temperature["value_template"], failed) == "None"
    # A state that stops coming (a daemon hung with its connection up) expires after 2.5 heartbeats.
    assert motion["expire_after"] == temperature["expire_after"] == 75


def test_the_thermostat_is_a_climate_entity(published) -> None:
    """Current temperature from its thermometer, target from its config within the schema's bounds and
    step, heat/off switching the plugin, heating/idle/off from its heater."""
    configs, payloads, _ = published
    climate = configs["homeassistant/climate/testpi/plugin_temperature_control_climate/config"]
    base = "pi-controller/testpi"
    assert (climate["min_temp"], climate["max_temp"], climate["temp_step"], climate["temperature_unit"]) == (
        5, 30, 0.1, "C")
    assert climate["temperature_command_topic"] == f"{base}/plugin/temperature_control/config/setpoint/set"
    assert climate["mode_command_topic"] == f"{base}/plugin/temperature_control/enable"
    assert climate["current_temperature_topic"] == f"{base}/sensor/temperature_sensor/state"
    assert climate["action_topic"] == f"{base}/actuator/relay_switch/state"
    command = JINJA.from_string(climate["mode_command_template"])
    assert (command.render(value="heat"), command.render(value="off")) == ("ON", "OFF")  # what enable takes
    plugin = payloads[climate["temperature_state_topic"]]
    assert render(climate["temperature_state_template"], plugin) == "21.0"
    assert render(climate["mode_state_template"], plugin) == "heat"
    reading = json.loads(payloads[climate["current_temperature_topic"]])
    assert float(render(climate["current_temperature_template"], payloads[climate["current_temperature_topic"]])) \
        == reading["value"]
    relay = json.loads(payloads[climate["action_topic"]])
    expected = "heating" if relay["on"] else "off" if relay["owner"] == "safety" else "idle"
    assert render(climate["action_template"], payloads[climate["action_topic"]]) == expected
    off = json.dumps({**relay, "on": False, "owner": "safety"}).encode()
    assert render(climate["action_template"], off) == "off"
    idle = json.dumps({**relay, "on": False, "owner": "temperature_control"}).encode()
    assert render(climate["action_template"], idle) == "idle"
    failed = json.dumps(Reading("temperature_sensor", None, "celsius", 1.0, "OSError").as_json()).encode()
    assert render(climate["current_temperature_template"], failed) == "None"  # Home Assistant: unknown


def test_the_climate_entity_heats_the_simulated_room_to_the_target_set_from_home_assistant(run_daemon) -> None:
    """What Home Assistant's climate sends on its temperature command topic goes through the daemon's own
    command table, and the simulated room (19 °C at the start) is heated into the band around it."""
    data = example_data()
    data["mqtt"] = {"node_id": "testpi"}
    daemon = run_daemon(data, 0)
    climate = discovery.configs(daemon.settings, daemon.status.config_schemas(), (), daemon.status.thermostats())[
        "homeassistant/climate/testpi/plugin_temperature_control_climate/config"]
    routes = inbox.commands("pi-controller/testpi", daemon.operator.submit)
    topic = climate["temperature_command_topic"]
    (route,) = [r for f, r in routes.items() if mqtt.topic_matches_sub(f, topic)]
    route.handle(inbox.Inbound(topic, b"23.5", False, ("temperature_control", "setpoint")))  # as HA sends it
    asyncio.run(daemon.serve(9000))  # 15 simulated minutes
    (temperature,) = [r.value for r in daemon.status.readings() if r.sensor_id == "temperature_sensor"]
    assert daemon.status.plugin_states()["temperature_control"]["config"]["setpoint"] == 23.5
    assert 23.0 <= temperature <= 24.5, temperature  # within the hysteresis band, as far as the room lags


def test_each_plugin_is_an_update_whose_candidate_is_its_shadow(published) -> None:
    configs, payloads, _ = published
    update = configs["homeassistant/update/testpi/plugin_temperature_control_update/config"]
    assert update["command_topic"] == "pi-controller/testpi/plugin/temperature_control/promote"
    state = json.loads(payloads[update["state_topic"]])
    shown = json.loads(render(update["value_template"], payloads[update["state_topic"]]))
    assert shown["installed_version"] == f"1.0.0 ({state['sha256'][:12]})"
    assert shown["latest_version"] == shown["installed_version"]  # its shadow is the same file: nothing new
    newer = json.dumps({**state, "candidate": {"version": "1.1.0", "sha256": "f" * 64}}).encode()
    assert json.loads(render(update["value_template"], newer))["latest_version"] == "1.1.0 (ffffffffffff)"
    alone = json.loads(render(update["value_template"], payloads[configs[
        "homeassistant/update/testpi/plugin_motion_light_update/config"]["state_topic"]]))
    assert alone["latest_version"] == alone["installed_version"]  # no shadow: up to date


def test_an_announced_rollout_is_the_latest_version_with_this_node_s_progress(published) -> None:
    configs, payloads, _ = published
    update = configs["homeassistant/update/testpi/plugin_temperature_control_update/config"]
    state = json.loads(payloads[update["state_topic"]])
    rollout = {"version": "2.0.0", "sha256": "e" * 64, "phase": "shadow", "in_progress": True, "percent": 30}
    shown = json.loads(render(update["value_template"], json.dumps({**state, "rollout": rollout}).encode()))
    assert shown["latest_version"] == "2.0.0 (eeeeeeeeeeee)" and shown["installed_version"].startswith("1.0.0 (")
    assert shown["in_progress"] is True and shown["update_percentage"] == 30
    check_state("update", "value_template", json.dumps(shown), update, "update")
    done = {**rollout, "phase": "live", "in_progress": False, "percent": 100}
    shown = json.loads(render(update["value_template"], json.dumps({**state, "rollout": done}).encode()))
    assert shown["in_progress"] is False and shown["update_percentage"] is None and shown["release_summary"] == ""
    failed = {**rollout, "phase": "rollback_failed", "in_progress": False, "percent": 0,
              "summary": "rollback_failed: the version it replaced could not be put back"}
    shown = json.loads(render(update["value_template"], json.dumps({**state, "rollout": failed}).encode()))
    assert shown["release_summary"] == failed["summary"] and shown["in_progress"] is False
    check_state("update", "value_template", json.dumps(shown), update, "update")
