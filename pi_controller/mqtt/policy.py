"""What is worth publishing, and when: the publish policy, after each tick.

A sensor's state when it moved beyond its deadband (or its validity or error changed), an actuator's or
a plugin's when what its entities show changed, each at least every `heartbeat_s`; the loop's state
every `loop_interval_s`, once its rate is measured. An unchanged state goes out again at the last tick
before its heartbeat is over, not at the first after it, so no two of its states are further apart than
the heartbeat (see `REPUBLISH_EARLY_PERIODS`). Home Assistant's discovery configs go out ahead of
the states whenever a subscriber needs everything again (our connection, Home Assistant's restart), and
with them every state again.

The entities follow the plugin set: when it changes between two ticks (a plugin dropped in or taken out,
a reload), or an operator's value makes a thermostat plugin name another thermometer or heater, `rediscover`
queues the difference: configs new or changed, configs gone emptied, and the
retained state of a plugin, sensor or actuator gone emptied too, so nothing shows one that is not there.

Retained leftovers of ours are emptied once connected: discovery configs of our device that are no
longer configured, and state topics of sensors, actuators and plugins the daemon does not run. The inbox's rows for
them (`leftover_config`, `leftover_state`, `home_assistant_status`) run on paho's thread and only hand
work over to the next tick.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from datetime import UTC, datetime
from typing import Any, Callable

from pi_controller.config import Settings
from pi_controller.mqtt import discovery
from pi_controller.mqtt.discovery import Topics
from pi_controller.mqtt.inbox import Inbound
from pi_controller.mqtt.outbox import Outbox
from pi_controller.mqtt.refusals import Refusal, Refusals
from pi_controller.names import SAFETY
from pi_controller.operator import Answer, Operator, Override
from pi_controller.plugins.manifest import Climate
from pi_controller.safety.rules import Guard
from pi_controller.status import Status

Changed = Callable[[Any, Any], bool]  # (what was sent, what is new): worth sending before the heartbeat?

# How many tick periods before its heartbeat is over an unchanged state is due again. The first tick at
# least `heartbeat - 1.5 periods` after the last send comes less than `heartbeat - 0.5 period` after it
# when ticks are a period apart: half a period is left for the loop's jitter, and none of the gap
# between two states is a tick's wait past the heartbeat (with 2 s and 10 Hz it was up to 2.1 s).
REPUBLISH_EARLY_PERIODS = 1.5


class PublishPolicy:
    def __init__(self, settings: Settings, status: Status, operator: Operator, outbox: Outbox,
                 wall: Callable[[], float] = time.time):
        self.mqtt = settings.mqtt  # and the loop's period: what a reload cannot change (the rest: status.settings)
        self.topics = Topics.of(self.mqtt)
        self._republish_after = max(0.0, self.mqtt.heartbeat_s - REPUBLISH_EARLY_PERIODS * settings.loop.period)
        self.status = status  # readings, actuator states, plugin states, loop stats
        self.operator = operator
        self.outbox = outbox
        self.readings_queued = 0
        self.refusals = Refusals(wall)
        self._published: dict[str, tuple[Any, float]] = {}  # topic -> (what was sent, when)
        self._sensor_policies: dict[str, tuple[str, int | None, Changed]] = {}  # by sensor id
        self._discovery: dict[str, dict[str, Any]] = {}  # topic -> config: what Home Assistant is told exists
        self._resync = threading.Event()
        self._states: set[str] = set()  # the state topics of the sensors, actuators and plugins discovered
        self._thermostats: dict[str, Climate] = {}  # the climate entities discovered, as their plugins' config says
        # Retained topics of ours to set: emptied, or emptied and sent again (a config of an earlier id).
        self._stale: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        self._again: dict[str, bytes] = {}  # configs to send once their emptying is out (the outbox keeps one a topic)

    def discover(self) -> None:
        """The entities Home Assistant is told of: the configured devices, and the plugins of the folder
        now, failed ones too (their entities say why)."""
        schemas, settings = self.status.config_schemas(), self.status.settings
        self._sensor_policies.clear()  # a reload may have changed a sensor's kind, and its decimals
        self._states = ({self.topics.sensor(s.id) for s in settings.sensors}
                        | {self.topics.actuator(a.id) for a in settings.actuators}
                        | {self.topics.plugin(name) for name in schemas})
        self._thermostats = self.status.thermostats()
        self._discovery = (discovery.configs(settings, schemas, self.status.shadowed(), self._thermostats)
                           if self.mqtt.discovery else {})

    def forget_restored(self) -> None:
        """At start, once discovered: the states the outage buffer's file kept for a sensor, actuator or plugin
        this run does not have are emptied, not sent (sent after the sweep at connecting, they would be
        retained for good)."""
        kinds = tuple(f"{self.topics.base}/{kind}/" for kind in ("sensor", "actuator", "plugin"))
        gone = {topic for topic in self.outbox.waiting()
                if topic.startswith(kinds) and topic.endswith("/state") and topic not in self._states}
        self.outbox.put_first((topic, b"") for topic in sorted(gone))

    def rediscover(self) -> None:
        """The plugin set or the config changed (between two ticks): the difference, ahead of the states; the
        retained states of the sensors, actuators and plugins gone emptied."""
        before, states = self._discovery, self._states
        self.discover()
        gone = sorted(states - self._states)
        changes = [(t, c) for t, c in self._discovery.items() if before.get(t) != c]
        changes += [(t, {}) for t in before if t not in self._discovery]
        self.outbox.put_first([(t, json.dumps(c).encode() if c else b"") for t, c in changes]
                              + [(topic, b"") for topic in gone])
        for topic in gone:  # back again, it is news
            self._published.pop(topic, None)

    def resync(self) -> None:
        """A subscriber needs everything again: discovery and every state (any thread)."""
        self._resync.set()

    # -- the event loop --------------------------------------------------------------------------

    def announce(self) -> None:
        """Discovery when a resync is due, and the emptying of leftovers, ahead of everything queued."""
        if self._resync.is_set():
            self._resync.clear()
            self.outbox.put_first((t, json.dumps(c).encode() if c else b"") for t, c in self._discovery.items())
            # Every state again, for a subscriber that just arrived; not those still waiting to go out
            # (the first connection would otherwise send every state twice).
            waiting = self.outbox.waiting()
            self._published = {t: sent for t, sent in self._published.items() if t in waiting}
        stale = [self._stale.get_nowait() for _ in range(self._stale.qsize())]  # only we take
        self.outbox.put_first([(topic, b"") for topic, _ in stale])  # over what discovery queued for the topic
        self._again |= {topic: config for topic, config in stale if config}
        waiting = self.outbox.waiting()
        ready = {topic: config for topic, config in self._again.items() if topic not in waiting}
        self.outbox.put_first(ready.items())  # the emptying went out: the config of now after it
        self._again = {topic: config for topic, config in self._again.items() if topic not in ready}

    def refused(self, answers: list[Answer]) -> None:
        """What the tick held back, refused or took to its safe state: an event each, not retained (news,
        never coalesced: the outbox's door for answers)."""
        for refusal in self.refusals.after_tick(self.status.holds(), answers):
            event = json.dumps(refusal.payload()).encode()
            self.outbox.put_answer(self.topics.actuator(refusal.device, "event"), event)

    def collect(self, now: float, telemetry: dict[str, Any]) -> None:
        """The states worth sending now; `telemetry`: the counts of telemetry's own state."""
        heartbeat = self._republish_after  # the heartbeat, a tick and a half early
        for reading in self.status.readings():
            topic, decimals, moved = self._sensor_policy(reading.sensor_id)
            self.readings_queued += self._offer(topic, reading.as_json(decimals), now, heartbeat, moved)
        overrides = self.operator.overrides()
        guards = self.status.guards()
        for device, state in self.status.actuator_states().items():
            self._offer(self.topics.actuator(device), _actuator_payload(
                state, overrides.get(device), guards.get(device), self.refusals.last.get(device)), now, heartbeat)
        if self.status.values_written():  # what Home Assistant is shown of an operator's value is on disk
            queued = False
            for name, state in self.status.plugin_states().items():
                queued |= self._offer(self.topics.plugin(name), state, now, heartbeat, _plugin_changed)
            if queued and self.status.thermostats() != self._thermostats:  # an operator's value named another
                self.rediscover()  # thermometer or heater: the climate entity reads that one now
        last_loop = self._published.get(self.topics.loop)
        if last_loop is None or now - last_loop[1] >= self.mqtt.loop_interval_s:  # percentiles are not free
            loop_state = self.status.loop_state()
            if loop_state is not None:  # the rate measured
                self._offer(self.topics.loop, loop_state, now, 0.0)
        # Not on every change of `buffered`: during an outage that would fill the buffer with itself.
        self._offer(self.topics.telemetry, telemetry, now, heartbeat, _losses_changed)

    def shutdown_states(self, now: float) -> None:
        """The states the pins were left in, retained, so that nothing says "on" once we are gone."""
        guards = self.status.guards()
        for device, state in self.status.settled_states().items():
            payload = _actuator_payload(state, None, guards.get(device), self.refusals.last.get(device))
            self._offer(self.topics.actuator(device), payload | {"owner": SAFETY, "failsafe": "the daemon stopped"},
                        now, 0.0)

    def _sensor_policy(self, sensor_id: str) -> tuple[str, int | None, Changed]:
        """A sensor's topic, its decimals on the wire and what counts as a change worth publishing:
        made once, used every tick."""
        policy = self._sensor_policies.get(sensor_id)
        if policy is None:
            band = self.mqtt.deadband.get(sensor_id, 0.0)
            decimals = next((s.decimals() for s in self.status.settings.sensors if s.id == sensor_id), None)
            policy = self._sensor_policies[sensor_id] = (self.topics.sensor(sensor_id), decimals,
                                                         lambda old, new: _moved(old, new, band))
        return policy

    def _offer(self, topic: str, data: dict[str, Any], now: float, every: float,
               changed: Changed = lambda old, new: old != new) -> bool:
        """Queue `data` if it changed enough or is due again; True if queued."""
        last = self._published.get(topic)
        if last is not None and now - last[1] < every and not changed(last[0], data):
            return False
        self._published[topic] = (data, now)
        self.outbox.put_state(topic, json.dumps(data).encode())
        return True

    # -- the inbox's rows (paho's thread) --------------------------------------------------------

    def home_assistant_status(self, message: Inbound) -> None:
        if message.payload == b"online":
            self.resync()  # Home Assistant restarted: it needs discovery and states again

    def leftover_config(self, message: Inbound) -> None:
        """A retained discovery config of our device for an entity no longer configured, or with an id of
        an earlier scheme: Home Assistant keeps an entity's first unique_id, so it is emptied (the entity
        goes) and sent again (it comes back under the id of now)."""
        if not message.payload or not discovery.ours(message.payload, self.mqtt):
            return
        current = self._discovery.get(message.topic)
        if current is None:
            self._stale.put((message.topic, b""))
        elif current and json.loads(message.payload).get("unique_id") != current["unique_id"]:
            self._stale.put((message.topic, b""))
            self._stale.put((message.topic, json.dumps(current).encode()))

    def empty(self, topics: list[str]) -> None:
        """Retained topics of ours to empty, found by a sweep (any thread)."""
        for topic in topics:
            self._stale.put((topic, b""))

    def leftover_state(self, message: Inbound) -> None:
        """The retained state of a sensor, actuator or plugin the daemon does not run (a run before had it)."""
        if message.retained and message.payload and message.topic not in self._states:  # replaced whole, not changed
            self._stale.put((message.topic, b""))


def _plugin_changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Its state, its switch or its config (what its entities show), a rollout's progress; a shadow's agreement
    by a tenth."""
    def shown(state: dict[str, Any]) -> tuple[Any, ...]:
        shadow = state.get("shadow")
        return (state["state"], state["enabled"], state["config"], state["sha256"], state["candidate"],
                state["rollout"], None if shadow is None else round(shadow["agreement_percent"], 1))

    return shown(old) != shown(new)


def _losses_changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """What was dropped or kept out, not what is buffered."""
    return {k: v for k, v in old.items() if k != "buffered"} != {k: v for k, v in new.items() if k != "buffered"}


def _moved(old: dict[str, Any], new: dict[str, Any], band: float) -> bool:
    if old["valid"] != new["valid"] or old.get("error") != new.get("error"):
        return True
    if old["value"] is None or new["value"] is None:
        return bool(old["value"] != new["value"])
    return abs(new["value"] - old["value"]) > band if band else bool(new["value"] != old["value"])


def _actuator_payload(state: dict[str, Any], override: Override | None, guard: Guard | None,
                      refusal: Refusal | None) -> dict[str, Any]:
    """The state, whether an override holds it and until when (ISO 8601, UTC), whose command it follows
    (`owner`: a plugin, "operator" or "safety"), why it was last put in its safe state (`failsafe`,
    until an owner takes it again) and the last refusal (`refusal`: see refusals.py)."""
    held = {"override": override is not None, "override_expires_at": None if override is None else
            datetime.fromtimestamp(override.expires_at, UTC).isoformat(timespec="seconds"),
            "refusal": None if refusal is None else refusal.payload()}
    if guard is None:
        return {**state, **held, "owner": None, "failsafe": None}
    # and what its Home Assistant entity reads, as its kind says
    return {**state, **held, "owner": guard.plugin, "failsafe": guard.failsafe,
            **guard.actuator.settings.entity_state(state)}
