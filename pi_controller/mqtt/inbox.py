"""What comes in: one table, `{topic filter: Route}`, that says both what is subscribed to and who takes
what arrives.

Each row is registered with paho's `message_callback_add`, so paho's own filter matching dispatches a
message to its row; the same rows are what `subscribe` asks the broker for, at every connection. A row
cannot be subscribed without a handler, nor handled without being subscribed. A `sweep` row is
subscribed (QoS 0) only until the broker acknowledges it: long enough for the retained messages it brings,
all handled before `swept` is called.

Handlers run on paho's thread: they only hand work over (the operator's thread-safe `submit`, a queue).
A handler that raises costs its message, logged; on a command's row the refusal is answered on the
command topic's `/result` (see `refused`). The commands themselves are the rows of `COMMANDS`.

Commands are let in by a `Gate` before anything is done with them (no decoding, no split of the topic):
a token bucket per topic and one for them all. What it keeps out is dropped and counted, and answered
`rate_limited` at most once a second per topic: a flood costs no work past the limits, only paho's
reading of each message (benchmarks/flood.py measures it).
"""

from __future__ import annotations

import json
import math
import queue
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import paho.mqtt.client as mqtt
import structlog

from pi_controller.config import MqttSettings
from pi_controller.contract import Rejected
from pi_controller.operator import Answer, EnablePlugin, PromotePlugin, Release, Request, SetActuator, SetPluginConfig
from pi_controller.token_bucket import TokenBucket

log = structlog.get_logger("pi_controller.telemetry")


@dataclass(frozen=True)
class Inbound:
    topic: str
    payload: bytes
    retained: bool
    levels: tuple[str, ...]  # what the filter's `+` levels matched, in order

    @property
    def reply_to(self) -> str:
        """Where a command's answer goes."""
        return f"{self.topic}/result"


Handler = Callable[[Inbound], None]


@dataclass(frozen=True)
class Route:
    handle: Handler
    sweep: bool = False  # subscribed until acknowledged: for the retained messages the subscription brings
    answered: bool = False  # a command: a message it refuses is answered on its /result topic
    on_demand: bool = False  # subscribed only within its filter, to what `fetch` asks for, until `unfetch`


BURST_S = 2.0  # a bucket holds this many seconds' worth of commands: a burst above the rate
TOPICS_TRACKED = 256  # topics with a bucket of their own; past this the longest known goes (the total still holds)
ANSWER_EVERY_S = 1.0  # a topic's `rate_limited` answers, at most


class Gate:
    """Which commands are let in, before any work is done for them (paho's thread): a token bucket per
    topic (`per_topic` a second) and one for them all (`total`; the settings' `max_commands_per_s...`).
    `dropped` counts those kept out."""

    def __init__(self, per_topic: float, total: float, timer: Callable[[], float] = time.monotonic):
        self._timer = timer
        self.per_topic, self.total = per_topic, total
        self._all = TokenBucket(total, total * BURST_S, timer())
        self._answers = TokenBucket(total, total * BURST_S, timer())  # a flood over many topics: answers bounded too
        self._topics: dict[str, tuple[TokenBucket, list[float]]] = {}  # topic -> (its bucket, [last answered])
        self.dropped = 0

    @classmethod
    def of(cls, mqtt: MqttSettings, timer: Callable[[], float] = time.monotonic) -> Gate:
        return cls(mqtt.max_commands_per_s_per_topic, mqtt.max_commands_per_s, timer)

    def admit(self, topic: str) -> tuple[bool, bool]:
        """(let in, answer `rate_limited`): the second only for one kept out, once a second per topic."""
        now = self._timer()
        known = self._topics.get(topic)
        if known is None:
            if len(self._topics) >= TOPICS_TRACKED:
                del self._topics[next(iter(self._topics))]
            bucket = TokenBucket(self.per_topic, self.per_topic * BURST_S, now)
            known = self._topics[topic] = (bucket, [-ANSWER_EVERY_S])
        bucket, answered = known
        if bucket.refill(now) >= 1 and self._all.refill(now) >= 1:
            bucket.take()
            self._all.take()
            return True, False
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 10_000 == 0:
            log.warning("mqtt_commands_rate_limited", dropped=self.dropped, topic=topic[:200],
                        per_topic_per_s=self.per_topic, all_per_s=self.total)
        if now - answered[0] < ANSWER_EVERY_S or self._answers.refill(now) < 1:
            return False, False
        self._answers.take()
        answered[0] = now
        return False, True


class Inbox:
    def __init__(self, routes: Mapping[str, Route], gate: Gate, swept: Callable[[], None] = lambda: None):
        """`swept`: called (paho's thread) once the sweep's retained messages are all handled."""
        self.routes = dict(routes)
        self.gate = gate
        self._swept = swept
        self._lasting = [(topic, 1) for topic, route in self.routes.items() if not (route.sweep or route.on_demand)]
        self._fetching: set[str] = set()  # what on-demand rows asked for (a topic within their filter)
        self._client: mqtt.Client | None = None
        self._sweeps = [topic for topic, route in self.routes.items() if route.sweep]
        self._sweep_mid: int | None = None  # the sweep's subscription, until acknowledged
        self._unsweep_mid: int | None = None  # its end, until acknowledged
        self._refused: queue.SimpleQueue[Answer] = queue.SimpleQueue()

    def attach(self, client: mqtt.Client) -> None:
        """Every row's handler on `client`, once: paho keeps them across reconnections."""
        for topic, route in self.routes.items():
            client.message_callback_add(topic, self._callback(topic, route))
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        self._client = client

    def fetch(self, topic: str) -> None:
        """Subscribe to `topic` (within an on-demand row's filter) now, and at each connection until `unfetch`."""
        if topic not in self._fetching and self._client is not None:
            self._fetching.add(topic)
            self._client.subscribe(topic, 1)  # while disconnected, the next connection's `subscribe` asks

    def unfetch(self, topic: str) -> None:
        if topic in self._fetching and self._client is not None:
            self._fetching.discard(topic)
            self._client.unsubscribe(topic)

    def subscribe(self, client: mqtt.Client) -> None:
        """Every row, at each connection (paho's thread)."""
        if self._lasting or self._fetching:
            client.subscribe(self._lasting + [(topic, 1) for topic in sorted(self._fetching)])
        if self._sweeps:
            # QoS 0: a broker holds back QoS 1 messages past its inflight window (mosquitto's 20) until they are
            # acknowledged, and sends the answer to the sweep's end before them; a sweep lost with its connection
            # is made again at the next.
            self._sweep_mid = client.subscribe([(topic, 0) for topic in self._sweeps])[1]

    def end_sweep(self, topics: Iterable[str]) -> None:
        """`topics`' sweep done for good (paho's thread, as `subscribe`): not made again at the next connection."""
        done = set(topics)
        self._sweeps = [topic for topic in self._sweeps if topic not in done]

    def refused(self) -> list[Answer]:
        """The answers to commands refused on arrival since the last call (the event loop's thread)."""
        return [self._refused.get_nowait() for _ in range(self._refused.qsize())]  # only this thread takes

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, properties: Any) -> None:
        """The retained messages a subscription brings come before its acknowledgement: once it is
        here, the sweep has seen them."""
        if mid == self._sweep_mid:
            self._unsweep_mid = client.unsubscribe(self._sweeps)[1]

    def _on_unsubscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, properties: Any) -> None:
        """The broker answers a client's packets in order: the sweep's retained messages, whether they came
        before its acknowledgement or just after, are all here before the acknowledgement of its end."""
        if mid == self._unsweep_mid:
            self._swept()

    def _callback(self, topic_filter: str, route: Route) -> Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None]:
        wildcards = [i for i, level in enumerate(topic_filter.split("/")) if level == "+"]

        def dispatch(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
            if route.answered and not message.retain and not self._admitted(message):
                return
            levels = message.topic.split("/")
            inbound = Inbound(message.topic, bytes(message.payload), bool(message.retain),
                              tuple(levels[i] for i in wildcards))
            try:
                route.handle(inbound)
            except Exception as exc:  # paho would end its thread over it; a bad message must not go unnoticed
                log.warning("mqtt_message_rejected", topic=message.topic[:200], error=str(exc)[:300])
                if route.answered and not inbound.retained:
                    rule = exc.rule if isinstance(exc, Rejected) else "malformed"
                    self._refused.put(Answer(inbound.reply_to, False, rule, str(exc)[:300]))

        return dispatch

    def _admitted(self, message: mqtt.MQTTMessage) -> bool:
        """A command let in by the gate; one kept out is answered `rate_limited` if the gate says so."""
        admitted, answer = self.gate.admit(message.topic)
        if answer:
            self._refused.put(Answer(f"{message.topic}/result", False, "rate_limited",
                                     f"over {self.gate.per_topic:g} commands a second on this topic or "
                                     f"{self.gate.total:g} in all: "
                                     "dropped (this is said once a second)"))
        return admitted


# -- the commands ----------------------------------------------------------------------------------

Parse = Callable[[Sequence[str], bytes, str], Request]  # the `+` levels, the payload, where the answer goes

# Each command: its topic under `<base_topic>/<node_id>`, and the operator's request its payload makes
# (raising `Rejected` for a payload it cannot take). A new command is a request type in `operator.py`
# and a row here: docs/design.md shows one added.
COMMANDS: dict[str, Parse] = {
    "actuator/+/set": lambda at, payload, reply: SetActuator(at[0], bounded(payload, MAX_SET_BYTES), reply),
    "actuator/+/release": lambda at, payload, reply: Release(at[0], reply),
    "plugin/+/enable": lambda at, payload, reply: EnablePlugin(at[0], switch(payload), reply),
    "plugin/+/config/+/set": lambda at, payload, reply: SetPluginConfig(at[0], at[1], config_value(payload), reply),
    "plugin/+/promote": lambda at, payload, reply: promotion(at[0], payload, reply),
}


def commands(base: str, submit: Callable[[Request], None]) -> dict[str, Route]:
    """The rows of `COMMANDS` under `base`, each handing its request to `submit`."""
    def route(parse: Parse) -> Route:
        def handle(message: Inbound) -> None:
            if not message.retained:  # a command left retained on the broker is not a fresh request
                submit(parse(message.levels, message.payload, message.reply_to))

        return Route(handle, answered=True)

    return {f"{base}/{topic}": route(parse) for topic, parse in COMMANDS.items()}


# What a command topic's payload may weigh, checked before it is decoded: a 1 MB value on a config
# topic was stored, logged whole and handed to the plugin every tick.
MAX_SET_BYTES = 1024  # {"action": ..., "parameters": {...}, "expires_s": ...}, or ON/OFF, or a number
MAX_ENABLE_BYTES = 16
MAX_CONFIG_VALUE_BYTES = 16 * 1024  # coarse: the operator checks the value itself (4 KiB a value, typed)
SWITCH = {b"ON": True, b"TRUE": True, b"1": True, b"OFF": False, b"FALSE": False, b"0": False}


def bounded(payload: bytes, limit: int) -> bytes:
    if len(payload) > limit:
        raise Rejected("too_large", f"a payload of {len(payload)} bytes, over the {limit} bytes this topic takes")
    return payload


def switch(payload: bytes) -> bool:
    word = bounded(payload, MAX_ENABLE_BYTES).strip().upper()
    if word not in SWITCH:
        raise Rejected("malformed", "expected ON or OFF")
    return SWITCH[word]


def promotion(name: str, payload: bytes, reply_to: str) -> PromotePlugin:
    """Any short payload: Home Assistant's update entity sends its payload_install."""
    bounded(payload, MAX_ENABLE_BYTES)
    return PromotePlugin(name, reply_to)


def config_value(payload: bytes) -> Any:
    """A config value from a payload: JSON if it parses (numbers, true/false), else the text."""
    text = bounded(payload, MAX_CONFIG_VALUE_BYTES).decode("utf-8", "replace").strip()
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, float) and not math.isfinite(value):
        raise Rejected("not_finite", "config values must be finite")
    return value
