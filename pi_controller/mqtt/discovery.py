"""Home Assistant MQTT discovery: one retained config per entity, all under one device per Pi.

Current conventions: per-entity configs with `unique_id`, a `device` block and `default_entity_id`
(`object_id` is deprecated since Home Assistant 2025.10), availability on our status topic, the JSON
light schema with `supported_color_modes`. A Pi's entities are named after the config's ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from pi_controller import __version__
from pi_controller.config import MqttSettings, Settings
from pi_controller.devices.actuators import ActuatorSettings
from pi_controller.devices.sensors import SensorSettings


@dataclass(frozen=True)
class Topics:
    """The topic layout, documented in the README."""

    base: str

    @classmethod
    def of(cls, mqtt: MqttSettings) -> Topics:
        return cls(f"{mqtt.base_topic}/{mqtt.node_id}")

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def loop(self) -> str:
        return f"{self.base}/loop/state"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/telemetry/state"

    def sensor(self, sensor_id: str) -> str:
        return f"{self.base}/sensor/{sensor_id}/state"

    def actuator(self, actuator_id: str, leaf: str = "state") -> str:
        return f"{self.base}/actuator/{actuator_id}/{leaf}"

    def plugin(self, name: str, leaf: str = "state") -> str:
        return f"{self.base}/plugin/{name}/{leaf}"


def configs(settings: Settings, plugins: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Discovery topic -> config payload for every entity of this Pi."""
    mqtt = settings.mqtt
    topics = Topics.of(mqtt)
    common = _common(mqtt, topics)
    entities: list[tuple[str, str, dict[str, Any]]] = []
    entities += [_sensor(s, topics) for s in settings.sensors]
    entities += [_actuator(a, topics) for a in settings.actuators]
    entities += _loop_health(topics)
    entities += [e for name in sorted(plugins) for e in _plugin(name, topics)]
    result = {}
    for platform, object_id, payload in entities:
        unique_id = f"{mqtt.node_id}_{object_id}"
        slug = unique_id.lower().replace("-", "_")  # entity ids are lower case, with underscores
        result[f"{mqtt.discovery_prefix}/{platform}/{mqtt.node_id}/{object_id}/config"] = {
            **common, "unique_id": unique_id, "default_entity_id": f"{platform}.{slug}", **payload}
    return result


def _common(mqtt: MqttSettings, topics: Topics) -> dict[str, Any]:
    return {
        "availability": [{"topic": topics.status, "payload_available": "online",
                          "payload_not_available": "offline"}],
        "device": {"identifiers": [f"pi-controller-{mqtt.node_id}"], "name": f"pi-controller {mqtt.node_id}",
                   "manufacturer": "pi-controller", "model": "Raspberry Pi", "sw_version": __version__},
        "origin": {"name": "pi-controller", "sw_version": __version__},
    }


def _sensor(s: SensorSettings, topics: Topics) -> tuple[str, str, dict[str, Any]]:
    platform, entity = s.entity()
    return platform, s.id, {"name": s.id.replace("_", " "), "state_topic": topics.sensor(s.id), **entity}


def _actuator(a: ActuatorSettings, topics: Topics) -> tuple[str, str, dict[str, Any]]:
    platform, entity = a.entity()
    return platform, a.id, {"name": a.id.replace("_", " "), "state_topic": topics.actuator(a.id),
                            "command_topic": topics.actuator(a.id, "set"), **entity}


def _loop_health(topics: Topics) -> list[tuple[str, str, dict[str, Any]]]:
    def stat(key: str, name: str, unit: str | None, state_class: str) -> tuple[str, str, dict[str, Any]]:
        payload = {"name": name, "state_topic": topics.loop, "value_template": f"{{{{ value_json.{key} }}}}",
                   "state_class": state_class, "entity_category": "diagnostic"}
        return "sensor", f"loop_{key}", payload | ({"unit_of_measurement": unit} if unit else {})

    return [stat("rate_hz", "tick rate", "Hz", "measurement"),
            stat("missed", "missed ticks", None, "total_increasing"),
            stat("duration_p99_ms", "tick time p99", "ms", "measurement")]


def _plugin(name: str, topics: Topics) -> list[tuple[str, str, dict[str, Any]]]:
    state = {"name": f"plugin {name}", "state_topic": topics.plugin(name), "value_template": "{{ value_json.state }}",
             "json_attributes_topic": topics.plugin(name), "entity_category": "diagnostic"}
    switch = {"name": f"plugin {name} enabled", "state_topic": topics.plugin(name),
              "command_topic": topics.plugin(name, "enable"),
              "value_template": "{{ 'ON' if value_json.enabled else 'OFF' }}", "payload_on": "ON",
              "payload_off": "OFF", "state_on": "ON", "state_off": "OFF", "entity_category": "config"}
    return [("sensor", f"plugin_{name}", state), ("switch", f"plugin_{name}_enabled", switch)]
