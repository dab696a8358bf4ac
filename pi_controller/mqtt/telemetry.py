"""MQTT telemetry and commands, through paho-mqtt (2.x, callback API 2), never in the loop's way.

After each tick (`tick_done`, on the event loop) this decides what is worth publishing (on change
beyond a sensor's deadband, or at the heartbeat), queues it in a bounded outbox and hands the outbox
to paho at up to `max_messages_per_s`, only while connected. paho's own thread does the network:
connecting, reconnecting with backoff, QoS 1 retries; why a connection fails is logged once per reason.
While the broker is away the outbox keeps messages in order with their original timestamps; past its
bound the oldest are dropped and counted. While connected but held back by the rate cap, a state
waits as the latest value of its topic (`pending`): a dashboard sees the present, not a queue.
Inbound commands become `Operator` requests, validated at the next tick, each answered on the command
topic's `/result` (not retained). With `commands: false` nothing is subscribed at all.

Topics (under `<base_topic>/<node_id>`): `status` (retained online/offline, with a last will),
`sensor/<id>/state`, `actuator/<id>/state` (JSON, retained), `actuator/<id>/set` and `/release`,
`plugin/<name>/state`, `plugin/<name>/enable`, `plugin/<name>/config/<key>/set`, `loop/state`,
`telemetry/state` (buffered and dropped counts).

Retained leftovers of ours are emptied once connected: discovery configs of our device that are no
longer configured, and state topics of sensors and actuators no longer configured.
"""

from __future__ import annotations

import json
import math
import os
import queue
import sys
import threading
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
import structlog

from pi_controller import config
from pi_controller.config import Settings
from pi_controller.contract import Rejected
from pi_controller.mqtt import discovery
from pi_controller.mqtt.discovery import Topics
from pi_controller.names import SAFETY
from pi_controller.observer import LoopObserver, TickReport
from pi_controller.operator import Answer, EnablePlugin, Operator, Override, Release, SetActuator, SetPluginConfig
from pi_controller.safety.rules import Guard
from pi_controller.status import Status
from pi_controller.token_bucket import TokenBucket

log = structlog.get_logger("pi_controller.telemetry")

Message = tuple[str, bytes, bool]  # topic, payload, retain
PAHO_QUEUE = 1000  # messages paho may hold itself (in flight, or handed over as the link dropped)
# A broker closes a client's connection when another connects with the same client id (two Pis left at
# one node_id); each reconnects and closes the other's within the reconnect delay. Connections ended by
# the broker this soon, this many times in a row, are that and not a flaky network.
TAKEOVER_LINK_S = 10.0
TAKEOVER_COUNT = 3


class Telemetry(LoopObserver):
    def __init__(self, settings: Settings, status: Status, operator: Operator,
                 timer: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.mqtt = settings.mqtt
        self.topics = Topics.of(self.mqtt)
        self.status = status  # readings, actuator states, plugin states, loop stats
        self.operator = operator
        self._timer = timer
        self.outbox: deque[Message] = deque()  # in order, kept while the broker is away
        self.pending: dict[str, Message] = {}  # while connected: the latest state per topic, oldest first
        self.coalesced = 0  # states replaced by a newer one before they could be sent (the rate cap)
        self.dropped = 0
        self.readings_queued = 0
        self._published: dict[str, tuple[Any, float]] = {}  # topic -> (what was sent, when)
        self._sensor_policies: dict[str, tuple[str, int | None, Callable[[Any, Any], bool]]] = {}  # by sensor id
        rate = self.mqtt.max_messages_per_s
        self._bucket = TokenBucket(rate, rate, timer(), tokens=0.0)  # a second's worth at most
        self._connected = threading.Event()
        self._resync = threading.Event()
        self._stale: queue.SimpleQueue[str] = queue.SimpleQueue()  # retained topics of ours to empty
        self._answers: queue.SimpleQueue[Answer] = queue.SimpleQueue()  # refused before reaching the operator
        self._sweep_mid: int | None = None  # the subscription to our own retained states, while it lasts
        self.link_error: str | None = None  # why the last connection attempt failed, until one succeeds
        self.connect_failures = 0
        self._stopping = False
        self._refused = False  # this attempt's CONNACK refused it
        self._discovery: dict[str, dict[str, Any]] = {}
        self.client_id = self.mqtt.client_id or f"pi-controller-{self.mqtt.node_id}"
        self._connected_at = 0.0
        self._short_links = 0  # connections in a row the broker ended within TAKEOVER_LINK_S
        self.client = self._client()
        self._restore()

    # -- lifecycle -----------------------------------------------------------------------------

    def _client(self) -> mqtt.Client:
        m, secrets = self.mqtt, config.mqtt_secrets(self.settings)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id)
        if m.username is not None:
            client.username_pw_set(m.username, secrets.password)
        if m.tls is not None:
            client.tls_set(ca_certs=m.tls.ca_file, certfile=m.tls.cert_file, keyfile=m.tls.key_file,
                           keyfile_password=secrets.key_password)
        client.will_set(self.topics.status, "offline", qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=60)
        client.max_queued_messages_set(PAHO_QUEUE)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def start(self) -> None:
        """Connect in the background: a broker that is down never holds up the daemon. Discovery covers
        the plugins of the folder then, failed ones too: their entities say why."""
        self._discovery = (discovery.configs(self.settings, self.status.config_schemas(), self.status.shadowed())
                           if self.mqtt.discovery else {})
        self.client.connect_async(self.mqtt.host, self.mqtt.port, self.mqtt.keepalive_s)
        self.client.loop_start()
        log.info("mqtt_starting", host=self.mqtt.host, port=self.mqtt.port, base=self.topics.base,
                 client_id=self.client_id)

    def summary(self) -> dict[str, Any]:
        return {"connected": self._connected.is_set(), "readings_queued": self.readings_queued,
                "buffered": len(self.outbox), "dropped": self.dropped, "coalesced": self.coalesced,
                "connect_failures": self.connect_failures, "connect_error": self.link_error}

    def stop(self) -> None:
        """Publish what can be published and the actuators' shut-down states, say offline, disconnect;
        keep the rest on disk if asked."""
        self._stopping = True
        if self._connected.is_set():
            self._publish_shutdown_states()
            self._pump(budget=len(self.outbox) + len(self.pending))
            info = self.client.publish(self.topics.status, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2)
            except (RuntimeError, ValueError):
                pass  # gone meanwhile: the last will says the same
        self._connected.clear()  # leaving on purpose is no disconnection to warn about
        self.client.disconnect()
        self.client.loop_stop()
        self._persist()

    def _publish_shutdown_states(self) -> None:
        """The states the pins were left in, retained, so that nothing says "on" once we are gone."""
        now, guards = self._timer(), self.status.guards()
        for device, state in self.status.settled_states().items():
            payload = _actuator_payload(state, None, guards.get(device))
            self._offer(self.topics.actuator(device), payload | {"owner": SAFETY, "failsafe": "the daemon stopped"},
                        now, 0.0)

    # -- paho's thread ---------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._refused = True  # paho closes the connection next: that is no second failure
            self._link_failed(f"refused by the broker: {reason}")
            return
        client.publish(self.topics.status, "online", qos=1, retain=True)
        if self.mqtt.commands:  # read-only: nothing subscribed, not even to tidy up (see discovery.configs)
            client.subscribe(self._subscriptions())
            b = self.topics.base
            self._sweep_mid = client.subscribe([(f"{b}/sensor/+/state", 1), (f"{b}/actuator/+/state", 1)])[1]
        self._connected_at = self._timer()
        self.link_error = None
        self._connected.set()
        self._resync.set()
        log.info("mqtt_connected", host=self.mqtt.host, port=self.mqtt.port)

    def _subscriptions(self) -> list[tuple[str, int]]:
        b = self.topics.base
        subscriptions = [(f"{b}/actuator/+/set", 1), (f"{b}/actuator/+/release", 1), (f"{b}/plugin/+/enable", 1),
                         (f"{b}/plugin/+/config/+/set", 1)]
        if self.mqtt.discovery:
            subscriptions += [("homeassistant/status", 1),
                              (f"{self.mqtt.discovery_prefix}/+/{self.mqtt.node_id}/+/config", 1)]
        return subscriptions

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, properties: Any) -> None:
        """Our retained states come with the subscription's acknowledgement: once it is here, the sweep
        has seen them, and our own states need not come back to us."""
        if mid == self._sweep_mid:
            b = self.topics.base
            client.unsubscribe([f"{b}/sensor/+/state", f"{b}/actuator/+/state"])

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        """paho calls this from within its `except OSError`: the exception says why (refused, host
        unknown, TLS)."""
        exc = sys.exc_info()[1]
        self._link_failed(f"{type(exc).__name__}: {exc}" if exc is not None else "connection failed")

    def _link_failed(self, reason: str) -> None:
        """paho retries with a back-off: say why once, and again only when the reason changes."""
        self.connect_failures += 1
        if reason != self.link_error:
            self.link_error = reason
            log.warning("mqtt_connect_failed", host=self.mqtt.host, port=self.mqtt.port, reason=reason[:300],
                        buffered=len(self.outbox))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self._connected.is_set():  # not leaving on purpose (stop() clears it first)
            log.warning("mqtt_disconnected", reason=str(reason), buffered=len(self.outbox))
            self._count_short_link()
        elif not self._stopping and not self._refused:  # closed before the broker's answer (TLS, say)
            tls = self.mqtt.tls
            hint = "; does the broker want a client certificate (mqtt.tls.cert_file, key_file)?" if (
                tls is not None and tls.cert_file is None) else ""
            self._link_failed(f"closed before the broker answered: {reason}{hint}")
        self._refused = False
        self._connected.clear()

    def _count_short_link(self) -> None:
        """Say once, with the fix, when another client keeps taking our client id over."""
        short = self._timer() - self._connected_at < TAKEOVER_LINK_S
        self._short_links = self._short_links + 1 if short else 0
        if self._short_links == TAKEOVER_COUNT:
            log.error("mqtt_client_id_taken_over", client_id=self.client_id, node_id=self.mqtt.node_id,
                      disconnects=self._short_links, within_s=TAKEOVER_LINK_S,
                      hint="another client (another Pi left at the same mqtt.node_id?) connects with this client "
                           "id and the broker drops one of the two each time; give each Pi its own mqtt.node_id "
                           "(default: its hostname) or mqtt.client_id")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self._route(message.topic, message.payload, message.retain)
        except Exception as exc:  # paho would swallow it silently; a bad message must not go unnoticed
            log.warning("mqtt_message_rejected", topic=message.topic[:200], error=str(exc)[:300])
            if not message.retain and message.topic.startswith(self.topics.base + "/"):  # a command of ours
                rule = exc.rule if isinstance(exc, Rejected) else "malformed"
                self._answers.put(Answer(f"{message.topic}/result", False, rule, str(exc)[:300]))

    def _route(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic == "homeassistant/status":
            if payload == b"online":
                self._resync.set()  # Home Assistant restarted: it needs discovery and states again
            return
        if topic.endswith("/config") and topic.startswith(self.mqtt.discovery_prefix + "/"):
            if payload and topic not in self._discovery and discovery.ours(payload, self.mqtt):
                self._stale.put(topic)  # an entity of ours no longer in the config
            return
        parts = topic[len(self.topics.base) + 1:].split("/")
        if retained:
            if payload and parts[-1:] == ["state"] and self._unconfigured(parts):
                self._stale.put(topic)  # the retained state of a device no longer in the config
            return  # a command left retained on the broker is not a fresh request
        reply = f"{topic}/result"
        match parts:
            case ["actuator", device, "set"]:
                self.operator.submit(SetActuator(device, _within(payload, MAX_SET_BYTES), reply))
            case ["actuator", device, "release"]:
                self.operator.submit(Release(device, reply))
            case ["plugin", name, "enable"]:
                switch = {b"ON": True, b"TRUE": True, b"1": True, b"OFF": False, b"FALSE": False, b"0": False}
                if _within(payload, MAX_ENABLE_BYTES).strip().upper() not in switch:
                    raise Rejected("malformed", "expected ON or OFF")
                self.operator.submit(EnablePlugin(name, switch[payload.strip().upper()], reply))
            case ["plugin", name, "config", key, "set"]:
                value = _scalar(_within(payload, MAX_CONFIG_VALUE_BYTES))
                self.operator.submit(SetPluginConfig(name, key, value, reply))

    def _unconfigured(self, parts: list[str]) -> bool:
        """Whether `<kind>/<id>/state` names a sensor or actuator the running config does not have."""
        running = self.status.settings
        match parts:
            case ["sensor", device, "state"]:
                return all(s.id != device for s in running.sensors)
            case ["actuator", device, "state"]:
                return all(a.id != device for a in running.actuators)
        return False

    # -- the event loop --------------------------------------------------------------------------

    def tick_done(self, report: TickReport) -> None:
        now = self._timer()
        if self._resync.is_set():
            self._resync.clear()
            self._queue_front([(t, json.dumps(c).encode() if c else b"", True) for t, c in self._discovery.items()])
            # Every state again, for a subscriber that just arrived; not those still waiting to go out
            # (the first connection would otherwise send every state twice).
            waiting = {topic for topic, _, _ in self.outbox} | set(self.pending)
            self._published = {t: sent for t, sent in self._published.items() if t in waiting}
        while not self._stale.empty():
            self._queue_front([(self._stale.get_nowait(), b"", True)])
        refused = [self._answers.get_nowait() for _ in range(self._answers.qsize())]  # only we take from it
        for answer in self.operator.answers(self.status.holds(), self.status.actuator_states()) + refused:
            self._queue((answer.reply_to, json.dumps(answer.payload()).encode(), False))
        self._collect(now)
        self._pump()

    def _collect(self, now: float) -> None:
        heartbeat = self.mqtt.heartbeat_s
        for reading in self.status.readings():
            topic, decimals, moved = self._sensor_policy(reading.sensor_id)
            self.readings_queued += self._offer(topic, reading.as_json(decimals), now, heartbeat, moved)
        overrides = self.operator.overrides()
        guards = self.status.guards()
        for device, state in self.status.actuator_states().items():
            self._offer(self.topics.actuator(device),
                        _actuator_payload(state, overrides.get(device), guards.get(device)), now, heartbeat)
        for name, state in self.status.plugin_states().items():
            self._offer(self.topics.plugin(name), state, now, heartbeat, _plugin_changed)
        last_loop = self._published.get(self.topics.loop)
        if last_loop is None or now - last_loop[1] >= self.mqtt.loop_interval_s:  # percentiles are not free
            loop_state = self.status.loop_state()
            if loop_state is not None:  # the rate measured
                self._offer(self.topics.loop, loop_state, now, 0.0)
        telemetry = {"buffered": len(self.outbox), "dropped": self.dropped}
        # Not on every change of `buffered`: during an outage that would fill the buffer with itself.
        self._offer(self.topics.telemetry, telemetry, now, heartbeat, _dropped_changed)

    def _sensor_policy(self, sensor_id: str) -> tuple[str, int | None, Callable[[Any, Any], bool]]:
        """A sensor's topic, its decimals on the wire and what counts as a change worth publishing:
        made once, used every tick."""
        policy = self._sensor_policies.get(sensor_id)
        if policy is None:
            band = self.mqtt.deadband.get(sensor_id, 0.0)
            decimals = next((s.decimals() for s in self.settings.sensors if s.id == sensor_id), None)
            policy = self._sensor_policies[sensor_id] = (self.topics.sensor(sensor_id), decimals,
                                                         lambda old, new: _moved(old, new, band))
        return policy

    def _offer(self, topic: str, data: dict[str, Any], now: float, every: float,
               changed: Callable[[Any, Any], bool] = lambda old, new: old != new) -> bool:
        """Queue `data` if it changed enough or is due again; True if queued."""
        last = self._published.get(topic)
        if last is not None and now - last[1] < every and not changed(last[0], data):
            return False
        self._published[topic] = (data, now)
        self._queue((topic, json.dumps(data).encode(), True))
        return True

    def _queue(self, message: Message) -> None:
        """While connected, a retained state waits as its topic's latest value; otherwise (the broker
        away, or an answer to a command, which is news each time) it keeps its place in the outbox."""
        topic, _, retain = message
        if retain and self._connected.is_set():
            if topic in self.pending:
                self.coalesced += 1
            self.pending[topic] = message  # keeps the topic's place: a busy topic does not starve the rest
        else:
            self._keep(message)

    def _keep(self, message: Message) -> None:
        """In the outbox, in order; past its bound the oldest go."""
        if len(self.outbox) >= self.mqtt.buffer_messages:
            self.outbox.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("telemetry_dropped", dropped=self.dropped, bound=self.mqtt.buffer_messages)
        self.outbox.append(message)

    def _queue_front(self, messages: list[Message]) -> None:
        self.outbox.extendleft(reversed(messages))

    def _pump(self, budget: int | None = None) -> None:
        """The outbox first (it is older), then the latest states, as far as the rate cap allows."""
        if not self._connected.is_set():
            self._unpend()  # the broker went away: they wait in order now
            return
        tokens = self._bucket.refill(self._timer())
        allowed = int(tokens) if budget is None else budget
        sent = 0
        while (self.outbox or self.pending) and sent < allowed and self._connected.is_set():
            topic, payload, retain = self.outbox[0] if self.outbox else next(iter(self.pending.values()))
            # Even when the connection dropped a moment ago (NO_CONN), paho keeps a QoS 1 message and
            # sends it after reconnecting; only its own queue being full leaves the message with us.
            if self.client.publish(topic, payload, qos=1, retain=retain).rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                break
            if self.outbox:
                self.outbox.popleft()
            else:
                del self.pending[topic]
            sent += 1
        self._bucket.take(sent)

    # -- a restart of the daemon -----------------------------------------------------------------

    def _unpend(self) -> None:
        """The latest states waiting on the rate cap into the outbox, in their order."""
        for message in self.pending.values():
            self._keep(message)
        self.pending.clear()

    def _persist(self) -> None:
        self._unpend()
        if not self.mqtt.buffer_file or not self.outbox:
            return
        partial = f"{self.mqtt.buffer_file}.partial"  # replaced whole: a crash mid-write leaves the old file
        with open(partial, "w", encoding="utf-8") as f:
            for topic, payload, retain in self.outbox:
                f.write(json.dumps([topic, payload.decode(), retain]) + "\n")
        os.replace(partial, self.mqtt.buffer_file)
        log.info("telemetry_saved", messages=len(self.outbox), file=self.mqtt.buffer_file)

    def _restore(self) -> None:
        path = Path(self.mqtt.buffer_file) if self.mqtt.buffer_file else None
        if path is None or not path.exists():
            return
        skipped = 0
        try:
            for line in path.read_text(encoding="utf-8").splitlines():
                message = _restored(line)
                if message is None:  # a file anyone could edit: a bad line is skipped, never a crash loop
                    skipped += 1
                else:
                    self._keep(message)
        except (OSError, ValueError) as exc:
            log.warning("telemetry_restore_failed", file=str(path), error=str(exc))
        path.unlink(missing_ok=True)
        log.info("telemetry_restored", messages=len(self.outbox), skipped=skipped, file=str(path))


def _restored(line: str) -> Message | None:
    """A saved message, if the line is one: [topic, payload text, retain]."""
    try:
        topic, payload, retain = json.loads(line)
    except (ValueError, TypeError):
        return None
    if not (isinstance(topic, str) and topic and isinstance(payload, str) and isinstance(retain, bool)):
        return None
    return topic, payload.encode(), retain


def _plugin_changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Its state, its switch or its config (what its entities show); a shadow's agreement by a tenth."""
    def shown(state: dict[str, Any]) -> tuple[Any, ...]:
        shadow = state.get("shadow")
        return (state["state"], state["enabled"], state["config"],
                None if shadow is None else round(shadow["agreement_percent"], 1))

    return shown(old) != shown(new)


def _dropped_changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return bool(old["dropped"] != new["dropped"])


def _moved(old: dict[str, Any], new: dict[str, Any], band: float) -> bool:
    if old["valid"] != new["valid"] or old.get("error") != new.get("error"):
        return True
    if old["value"] is None or new["value"] is None:
        return old["value"] != new["value"]
    return abs(new["value"] - old["value"]) > band if band else new["value"] != old["value"]


def _actuator_payload(state: dict[str, Any], override: Override | None, guard: Guard | None) -> dict[str, Any]:
    """The state, whether an override holds it and until when (ISO 8601, UTC), whose command it follows
    (`owner`: a plugin, "operator" or "safety") and why it was last put in its safe state (`failsafe`,
    until an owner takes it again)."""
    held = {"override": override is not None, "override_expires_at": None if override is None else
            datetime.fromtimestamp(override.expires_at, UTC).isoformat(timespec="seconds")}
    if guard is None:
        return {**state, **held, "owner": None, "failsafe": None}
    # and what its Home Assistant entity reads, as its kind says
    return {**state, **held, "owner": guard.plugin, "failsafe": guard.failsafe,
            **guard.actuator.settings.entity_state(state)}


# What a command topic's payload may weigh, checked before it is decoded: a 1 MB value on a config
# topic was stored, logged whole and handed to the plugin every tick.
MAX_SET_BYTES = 1024  # {"action": ..., "parameters": {...}, "expires_s": ...}, or ON/OFF, or a number
MAX_ENABLE_BYTES = 16
MAX_CONFIG_VALUE_BYTES = 16 * 1024  # coarse: the operator checks the value itself (4 KiB a value, typed)


def _within(payload: bytes, limit: int) -> bytes:
    if len(payload) > limit:
        raise Rejected("too_large", f"a payload of {len(payload)} bytes, over the {limit} bytes this topic takes")
    return payload


def _scalar(payload: bytes) -> Any:
    """A config value from a payload: JSON if it parses (numbers, true/false), else the text."""
    text = payload.decode("utf-8", "replace").strip()
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, float) and not math.isfinite(value):
        raise Rejected("not_finite", "config values must be finite")
    return value
