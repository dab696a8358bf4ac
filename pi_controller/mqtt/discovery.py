"""Home Assistant MQTT discovery: one retained config per entity, all under one device per Pi.

Current conventions: per-entity configs with `unique_id`, a `device` block and `default_entity_id`
(`object_id` is deprecated since Home Assistant 2025.10), availability on our status topic, the JSON
light schema with `supported_color_modes`. A Pi's entities are named after the config's ids.

Besides the devices: each plugin's state (an `enum` sensor), an on/off switch for it, a `number`,
`select` or `switch` per key of its `config_schema` (entity category `config`), the agreement of its
shadow; per actuator a "resume automatic" button that ends an override and an `event` entity firing on its holds,
refusals and failsafes; diagnostics of the daemon
(uptime, version, watchdog trips, failsafes, safety holds, last reload) from `loop/state`.
`tests/test_ha_discovery.py` checks every payload against the keys Home Assistant's MQTT platforms accept.

Read-only (`commands: false`): no entity has a `command_topic`. Buttons and config entities are left
out; what else would take commands (actuators, plugin switches) is shown as a sensor of its state (in no
entity category: Home Assistant refuses `config` on a sensor), and its commandable config is emptied
by name, whatever the clean-up's subscription finds (a broker may refuse a read-only client's reads). With
commands, the read-only stand-ins are emptied the same way, so switching back leaves no orphan.

Home Assistant 2024.4 is the oldest that takes these configs: 2024.3 and older refuse a JSON-schema light
without `color_mode: true`, which 2025.3 and newer warn about as a removed option (docs/home-assistant.md).

Every `unique_id` starts with `UNIQUE_ID_PREFIX`; configs of ours still carrying an id of an earlier
scheme are emptied and sent again (`policy.py`), as Home Assistant keeps an entity's first id for good.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from pi_controller import __version__
from pi_controller.config import MqttSettings, Settings
from pi_controller.devices.actuators import ActuatorSettings
from pi_controller.devices.sensors import SensorSettings
from pi_controller.mqtt.refusals import EVENT_TYPES
from pi_controller.plugins.manifest import Climate
from pi_controller.plugins.plugin_config import ConfigField, Schema
from pi_controller.schema import ID_PATTERN

Entity = tuple[str, str, dict[str, Any]]  # platform, object id, what its config adds to the common keys

PLUGIN_STATES = ["loaded", "quarantined", "disabled", "failed"]  # `PluginStatus.state`
RELOAD_OUTCOMES = ["none", "applied", "refused", "failed"]  # `reloads.Outcome`, and none yet
UNIQUE_ID_PREFIX = "pi_controller_"
CLIMATE_UNITS = {"°C": "C", "°F": "F"}  # a target's unit: the climate entity's temperature_unit
NUMBER_CLASSES = {"°C": "temperature", "°F": "temperature", "K": "temperature"}  # a config key's unit: its class
# A sensor is republished at least every heartbeat_s: silent for this many heartbeats, it is unavailable
# (a daemon that hangs with its connection up, a state that stopped coming).
EXPIRE_HEARTBEATS = 2.5


@dataclass(frozen=True)
class Topics:
    """The topic layout, documented in docs/home-assistant.md."""

    base: str

    @classmethod
    def of(cls, mqtt: MqttSettings) -> Topics:
        return cls(f"{mqtt.base_topic}/{mqtt.node_id}")

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def instance(self) -> str:
        """Which install says `online` on `status` (retained, sent before it): `former_node.py` tells by it."""
        return f"{self.base}/instance"

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


def configs(settings: Settings, plugins: Mapping[str, Schema | None], shadowed: Iterable[str] = (),
            thermostats: Mapping[str, Climate] | None = None) -> dict[str, dict[str, Any]]:
    """Discovery topic -> config payload for every entity of this Pi; `plugins`: each plugin of the
    folder with its config schema (None: it has none, or did not load); `shadowed`: plugins that have
    a shadow plugin beside them; `thermostats`: plugins that are thermostats, each a climate entity."""
    mqtt = settings.mqtt
    topics = Topics.of(mqtt)
    common = _common(mqtt, topics)
    expire_after = math.ceil(EXPIRE_HEARTBEATS * mqtt.heartbeat_s)
    entities: list[Entity] = []
    entities += [_sensor(s, topics, expire_after) for s in settings.sensors]
    entities += [_actuator(a, topics) for a in settings.actuators]
    entities += [_refusals(a.id, topics) for a in settings.actuators]
    entities += _diagnostics(topics)
    commands_only = [_resume(a.id, topics) for a in settings.actuators]  # nothing to show without commands
    for name in sorted(plugins):
        entities += _plugin(name, topics)
        commands_only.append(_update(name, topics))
        schema = plugins[name] or {}
        commands_only += [_config_entity(name, key, schema[key], topics) for key in sorted(schema)
                          if re.fullmatch(ID_PATTERN, key) and _platform_of(schema[key])]  # a key fit for a topic
    entities += [_shadow(name, topics) for name in sorted(shadowed)]
    entities += [_climate(name, climate, topics) for name, climate in sorted((thermostats or {}).items())]
    result: dict[str, dict[str, Any]] = {}
    emptied = []  # the other mode's entities: Home Assistant drops them

    def topic(platform: str, object_id: str) -> str:
        return f"{mqtt.discovery_prefix}/{platform}/{mqtt.node_id}/{object_id}/config"

    tagged = [(e, True) for e in entities] + [(e, False) for e in commands_only]  # True: has a read-only stand-in
    for (platform, object_id, payload), stands_in in tagged:
        slug = f"{mqtt.node_id}_{object_id}".lower().replace("-", "_")  # entity ids: lower case, underscores
        if any(key.endswith("command_topic") for key in payload):
            read_only, shown = _read_only(platform, payload) if stands_in else (None, {})
            if mqtt.commands:
                emptied += [topic(read_only, object_id)] if read_only else []
            else:
                emptied.append(topic(platform, object_id))
                if read_only is None:
                    continue
                platform, payload = read_only, shown
        result[topic(platform, object_id)] = {**common, "unique_id": f"{UNIQUE_ID_PREFIX}{slug}",
                                              "default_entity_id": f"{platform}.{slug}", **payload}
    return {t: {} for t in emptied if t not in result} | result


# What a read-only entity keeps of a commandable one; its platform instead of each commandable platform
# (None: nothing to show, such as a button). Switches, lights and fans show on/off; numbers and selects
# their value.
READ_ONLY_KEYS = ("name", "state_topic", "entity_category", "json_attributes_topic", "unit_of_measurement",
                  "icon", "value_template")
READ_ONLY = {"switch": "binary_sensor", "light": "binary_sensor", "fan": "binary_sensor", "number": "sensor",
             "select": "sensor", "text": "sensor"}


def _read_only(platform: str, payload: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    if platform == "climate":  # shows the temperatures, the mode and the action, and sets nothing
        return platform, {k: v for k, v in payload.items() if "_command_" not in k}
    kept = {k: v for k, v in payload.items() if k in READ_ONLY_KEYS and (k, v) != ("entity_category", "config")}
    read_only = READ_ONLY.get(platform)
    if read_only == "binary_sensor":
        on = payload.get("value_template") if platform == "switch" else "{{ 'ON' if value_json.on else 'OFF' }}"
        kept |= {"value_template": on, "payload_on": payload.get("payload_on", "ON"),
                 "payload_off": payload.get("payload_off", "OFF")}
        if platform != "switch":  # an actuator: its duty, speed or direction as attributes
            kept["json_attributes_topic"] = payload["state_topic"]
    return read_only, kept


def identifier(mqtt: MqttSettings) -> str:
    """Our device's identifier in Home Assistant: what tells our configs from another integration's."""
    return f"pi-controller-{mqtt.node_id}"


MAX_CONFIG_BYTES = 64 * 1024  # a retained discovery config read back; ours are under 2 KiB


def ours(payload: bytes, mqtt: MqttSettings) -> bool:
    """Whether a retained discovery config belongs to our device (its identifiers say so)."""
    if len(payload) > MAX_CONFIG_BYTES:
        return False
    try:
        config = json.loads(payload)
    except ValueError:
        return False
    device = config.get("device") if isinstance(config, dict) else None
    identifiers = device.get("identifiers") if isinstance(device, dict) else None
    return isinstance(identifiers, list) and identifier(mqtt) in identifiers


def _common(mqtt: MqttSettings, topics: Topics) -> dict[str, Any]:
    return {
        "availability": [_online(topics)],
        "device": {"identifiers": [identifier(mqtt)], "name": f"pi-controller {mqtt.node_id}",
                   "manufacturer": "pi-controller", "model": "Raspberry Pi", "sw_version": __version__},
        "origin": {"name": "pi-controller", "sw_version": __version__},
    }


def _online(topics: Topics) -> dict[str, Any]:
    return {"topic": topics.status, "payload_available": "online", "payload_not_available": "offline"}


def _available_while(topic: str, condition: str, topics: Topics) -> dict[str, Any]:
    """Availability while the Pi is online and `condition` (a Jinja test of `value_json`) holds on `topic`."""
    return {"availability": [_online(topics), {"topic": topic, "payload_available": "online",
                                               "payload_not_available": "offline",
                                               "value_template": f"{{{{ 'online' if {condition} else 'offline' }}}}"}],
            "availability_mode": "all"}


def _name(*words: str) -> str:
    """An entity's name: its words (ids, with their underscores as spaces) in sentence case, as Home
    Assistant names its own ("Led strip resume automatic", "Temperature control setpoint")."""
    text = " ".join(words).replace("_", " ")
    return text[:1].upper() + text[1:]


def _sensor(s: SensorSettings, topics: Topics, expire_after: int) -> Entity:
    """Unavailable while its reads fail (or read outside its valid range), and when its state stops
    coming: never frozen at a last good value."""
    platform, entity = s.entity()
    topic = topics.sensor(s.id)
    return platform, s.id, {"name": _name(s.id), "state_topic": topic, "expire_after": expire_after,
                            **_available_while(topic, "value_json.valid", topics), **entity}


def _actuator(a: ActuatorSettings, topics: Topics) -> Entity:
    platform, entity = a.entity()
    state, command = topics.actuator(a.id), topics.actuator(a.id, "set")
    payload = {"name": _name(a.id), "state_topic": state, "command_topic": command, **entity,
               # Whether an operator holds it, until when, whose command it follows, why it went safe.
               "json_attributes_topic": state,
               "json_attributes_template": "{{ {'overridden': value_json.override, 'override_expires_at': "
                                           "value_json.override_expires_at, 'owner': value_json.owner, "
                                           "'failsafe': value_json.failsafe, 'refusal': value_json.refusal} "
                                           "| tojson }}"}
    # What else the entity reads (a fan's percentage and direction) comes on the same state topic,
    # and what else it sends goes to the same command topic (see the kind's `parse_entity`).
    for feature in ("percentage", "direction"):
        if f"{feature}_value_template" in entity:
            payload |= {f"{feature}_state_topic": state, f"{feature}_command_topic": command}
    return platform, a.id, payload


def _refusals(actuator_id: str, topics: Topics) -> Entity:
    """An event entity that fires when the actuator is held, refused or taken to its safe state, with
    the rule, the reason, whose command and until when as the event's attributes (refusals.py)."""
    return "event", f"{actuator_id}_refusals", {
        "name": _name(actuator_id, "refusals"), "state_topic": topics.actuator(actuator_id, "event"),
        "event_types": EVENT_TYPES, "icon": "mdi:hand-back-left"}


def _resume(actuator_id: str, topics: Topics) -> Entity:
    """A button that ends an operator's override: the plugins decide again. Available while one holds."""
    return "button", f"{actuator_id}_resume", {
        "name": _name(actuator_id, "resume automatic"), "command_topic": topics.actuator(actuator_id, "release"),
        "payload_press": "RELEASE", "icon": "mdi:robot",
        **_available_while(topics.actuator(actuator_id), "value_json.override", topics)}


def _diagnostics(topics: Topics) -> list[Entity]:
    """The loop's health and the daemon's, all from `loop/state`."""
    def stat(key: str, name: str, **extra: Any) -> Entity:
        return "sensor", f"loop_{key}", {"name": _name(name), "state_topic": topics.loop,
                                         "value_template": f"{{{{ value_json.{key} }}}}",
                                         "entity_category": "diagnostic", **extra}

    count = {"state_class": "total_increasing", "suggested_display_precision": 0}
    return [stat("rate_hz", "tick rate", unit_of_measurement="Hz", state_class="measurement",
                 suggested_display_precision=1),
            stat("missed", "missed ticks", **count),
            stat("duration_p99_ms", "tick time p99", unit_of_measurement="ms", state_class="measurement",
                 suggested_display_precision=2),
            stat("uptime_s", "uptime", device_class="duration", unit_of_measurement="s",
                 state_class="total_increasing", suggested_display_precision=0),
            stat("version", "version", icon="mdi:tag"),
            stat("watchdog_trips", "watchdog trips", **count),
            stat("failsafes", "failsafes", **count),
            stat("safety_holds", "safety holds", **count),
            stat("last_reload", "last reload", device_class="enum", options=RELOAD_OUTCOMES,
                 json_attributes_topic=topics.loop,
                 json_attributes_template="{{ {'message': value_json.last_reload_message} | tojson }}")]


def _plugin(name: str, topics: Topics) -> list[Entity]:
    state = {"name": _name(name, "plugin"), "state_topic": topics.plugin(name),
             "value_template": "{{ value_json.state }}",
             "device_class": "enum", "options": PLUGIN_STATES,
             "json_attributes_topic": topics.plugin(name), "entity_category": "diagnostic"}
    switch = {"name": _name(name, "enabled"), "state_topic": topics.plugin(name),
              "command_topic": topics.plugin(name, "enable"),
              "value_template": "{{ 'ON' if value_json.enabled else 'OFF' }}", "payload_on": "ON",
              "payload_off": "OFF", "state_on": "ON", "state_off": "OFF", "entity_category": "config"}
    return [("sensor", f"plugin_{name}", state), ("switch", f"plugin_{name}_enabled", switch)]


def _version(of: str) -> str:
    """A plugin's version as its update entity shows it (a Jinja expression): the manifest's version and
    the file's hash, so that any other file (a shadow built from changed source, same version) is news."""
    return f"(({of}.version or '?') ~ ((' (' ~ {of}.sha256[:12] ~ ')') if {of}.sha256 else ''))"


def _update(name: str, topics: Topics) -> Entity:
    """The plugin as an update: installed, the running file; latest, the version a fleet rollout announced
    (with this node's progress: in_progress and update_percentage), else its shadow if one runs (install
    promotes it, plugin/<name>/promote), else the installed one."""
    installed = _version("value_json")
    rollout = "value_json.rollout"
    latest = (f"({_version(rollout)} if {rollout} else "
              f"({_version('value_json.candidate')} if value_json.candidate else {installed}))")
    return "update", f"plugin_{name}_update", {
        "name": _name(name), "state_topic": topics.plugin(name), "command_topic": topics.plugin(name, "promote"),
        "payload_install": "install", "entity_category": "config",
        "value_template": f"{{{{ {{'installed_version': {installed}, 'latest_version': {latest}, "
                          f"'in_progress': ({rollout}.in_progress if {rollout} else false), "
                          f"'update_percentage': ({rollout}.percent if {rollout} and {rollout}.in_progress "
                          f"else none), 'release_summary': ({rollout}.summary or '' if {rollout} else ''), "
                          f"'title': {json.dumps(_name(name, 'plugin'))}}} | tojson }}}}"}


def _platform_of(field: ConfigField) -> str | None:
    """The entity a config key gets: a switch for a boolean, a select for a list of allowed values,
    a number for a number with bounds; None for what Home Assistant has no fitting control for."""
    if field.type == "boolean":
        return "switch"
    if field.allowed:
        return "select"
    bounded = field.min is not None and field.max is not None and field.min < field.max
    return "number" if field.type in ("number", "integer") and bounded else None


def _config_entity(plugin: str, key: str, field: ConfigField, topics: Topics) -> Entity:
    """A config key of a plugin: the value it runs with, read from the plugin's state, set through
    `plugin/<name>/config/<key>/set` (checked against the schema there, as any operator's value)."""
    platform = _platform_of(field)
    assert platform is not None
    value = f"value_json.config[{json.dumps(key)}]"
    known = f"{json.dumps(key)} in value_json.config"  # else "None": unknown (a key the config leaves out)
    payload: dict[str, Any] = {"name": _name(plugin, key), "state_topic": topics.plugin(plugin),
                               "command_topic": topics.plugin(plugin, f"config/{key}/set"),
                               "value_template": f"{{{{ {value} if {known} else 'None' }}}}",
                               "entity_category": "config"}
    if platform == "switch":  # the command is parsed as JSON: true or false
        payload |= {"value_template": f"{{{{ ('ON' if {value} else 'OFF') if {known} else 'None' }}}}",
                    "payload_on": "true", "payload_off": "false", "state_on": "ON", "state_off": "OFF"}
    elif platform == "select":  # strings as they are; numbers as their JSON, which is how they come back
        payload["options"] = [v if isinstance(v, str) else json.dumps(v) for v in field.allowed or ()]
    else:
        step = field.step or (1 if field.type == "integer" else 0.01)
        payload |= {"min": field.min, "max": field.max, "step": step, "mode": "box",
                    **({"unit_of_measurement": field.unit} if field.unit else {}),
                    # Home Assistant converts it for those who read °F, and sends back ours
                    **({"device_class": NUMBER_CLASSES[field.unit]} if field.unit in NUMBER_CLASSES else {})}
    return platform, f"plugin_{plugin}_config_{key}", payload


def _climate(plugin: str, climate: Climate, topics: Topics) -> Entity:
    """A thermostat plugin: the current temperature from its thermometer, the target from its config
    (set within the schema's bounds and step), heat/off switching the plugin on and off (off: its heater
    goes to its safe state), and heating/idle/off from the heater's state (off: the safety rules hold it,
    its owner gone)."""
    field, state = climate.field, topics.plugin(plugin)
    step = field.step or 0.1
    target = f"value_json.config[{json.dumps(climate.target)}]"
    return "climate", f"plugin_{plugin}_climate", {
        "name": _name(plugin), "modes": ["off", "heat"],
        "mode_state_topic": state, "mode_state_template": "{{ 'heat' if value_json.enabled else 'off' }}",
        "mode_command_topic": topics.plugin(plugin, "enable"),
        "mode_command_template": "{{ 'ON' if value == 'heat' else 'OFF' }}",
        "temperature_state_topic": state, "temperature_state_template": f"{{{{ {target} }}}}",
        "temperature_command_topic": topics.plugin(plugin, f"config/{climate.target}/set"),
        "min_temp": field.min, "max_temp": field.max, "temp_step": step,
        "precision": 1.0 if step >= 1 else 0.5 if step == 0.5 else 0.1,  # the three Home Assistant takes
        "current_temperature_topic": topics.sensor(climate.sensor),
        "current_temperature_template": "{{ value_json.value if value_json.valid else 'None' }}",
        "action_topic": topics.actuator(climate.heater),
        "action_template": "{{ 'heating' if value_json.on else ('off' if value_json.owner == 'safety' else 'idle') }}",
        **({"temperature_unit": CLIMATE_UNITS[field.unit]} if field.unit in CLIMATE_UNITS else {})}


def _shadow(name: str, topics: Topics) -> Entity:
    """How often the shadow of `name` decides as `name` does (whole calls; per actuator in attributes)."""
    return "sensor", f"plugin_{name}_shadow_agreement", {
        "name": _name(name, "shadow agreement"), "state_topic": topics.plugin(name),
        "value_template": "{{ value_json.shadow.agreement_percent if value_json.shadow is defined else 'None' }}",
        "unit_of_measurement": "%", "state_class": "measurement", "suggested_display_precision": 1,
        "json_attributes_topic": topics.plugin(name),
        "json_attributes_template": "{{ value_json.shadow | default({}) | tojson }}",
        "entity_category": "diagnostic"}
