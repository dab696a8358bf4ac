"""The link to the broker: paho-mqtt's client (2.x, callback API 2) with TLS, credentials and our last
will, never in the loop's way.

paho's own thread does the network: connecting in the background (a broker that is down never holds up
the daemon), reconnecting with back-off, QoS 1 retries. Why a connection fails is logged once per reason
(refused, host unknown, TLS, closed before the broker answered or before it acknowledged `online`), and once,
with the fix, when another client keeps taking our client id over. Once the broker accepts the connection the
link says `online` on the status topic (retained; the last will says `offline`) and calls `up` with the client,
for the inbox to subscribe; it is connected, and says so, once the broker acknowledges `online`.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable

import paho.mqtt.client as mqtt
import structlog

from pi_controller import config
from pi_controller.config import Settings
from pi_controller.mqtt.discovery import Topics
from pi_controller.mqtt.outbox import Message

log = structlog.get_logger("pi_controller.telemetry")

PAHO_QUEUE = 1000  # messages paho may hold itself (in flight, or handed over as the link dropped)
# A broker closes a client's connection when another connects with the same client id (two Pis left at
# one node_id); each reconnects and closes the other's within the reconnect delay. Connections ended by
# the broker this soon, this many times in a row, are that and not a flaky network.
TAKEOVER_LINK_S = 10.0
TAKEOVER_COUNT = 3
# A stop has systemd's TimeoutStopSec (10 s in our unit) for everything: the final states, then `offline`.
FINAL_STATES_WAIT_S = 4.0  # for the broker to acknowledge the actuators' shut-down states
OFFLINE_WAIT_S = 2.0  # for the broker to acknowledge `offline` at a stop; the last will says it otherwise
# paho's reconnect back-off: the first retry after this, doubling up to the cap, then every RECONNECT_MAX_S (a
# broker back after an outage is found within a minute; a broker down for a day costs a try a minute).
RECONNECT_FIRST_S = 1
RECONNECT_MAX_S = 60


class Link:
    def __init__(self, settings: Settings, timer: Callable[[], float], up: Callable[[mqtt.Client], None],
                 buffered: Callable[[], int], instance: str):
        """`up`: called on paho's thread once connected; `buffered`: the messages waiting, for the logs; `instance`:
        this install's id, said before each `online` (`former_node.py`)."""
        self.mqtt = settings.mqtt
        self.status_topic = Topics.of(self.mqtt).status
        self.instance_topic, self.instance = Topics.of(self.mqtt).instance, instance
        self.client_id = self.mqtt.client_id or f"pi-controller-{self.mqtt.node_id}"
        self.error: str | None = None  # why the last connection attempt failed, until one succeeds
        self.failures = 0
        self._timer = timer
        self._up = up
        self._buffered = buffered
        self._connected = threading.Event()
        self._stopping = False
        # `stop` and `_on_connect` (paho's thread): `online` is sent before `stop` looks whether to undo it, or never
        self._stop_lock = threading.Lock()
        self._refused = False  # this attempt's CONNACK refused it
        self._online: int | None = None  # the message id of this connection's `online`, once the broker accepted it
        self._connected_at = 0.0
        self._short_links = 0  # connections in a row the broker ended within TAKEOVER_LINK_S
        self.client = self._client(settings)

    def _client(self, settings: Settings) -> mqtt.Client:
        m, secrets = self.mqtt, config.mqtt_secrets(settings)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id)
        if m.username is not None:
            client.username_pw_set(m.username, secrets.password)
        if m.tls is not None:
            client.tls_set(ca_certs=m.tls.ca_file, certfile=m.tls.cert_file, keyfile=m.tls.key_file,
                           keyfile_password=secrets.key_password)
        client.will_set(self.status_topic, "offline", qos=1, retain=True)
        client.reconnect_delay_set(min_delay=RECONNECT_FIRST_S, max_delay=RECONNECT_MAX_S)
        client.max_queued_messages_set(PAHO_QUEUE)
        client.on_connect = self._on_connect
        client.on_publish = self._on_publish
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        return client

    def start(self) -> None:
        self.client.connect_async(self.mqtt.host, self.mqtt.port, self.mqtt.keepalive_s)
        self.client.loop_start()

    def connected(self) -> bool:
        return self._connected.is_set()

    def publish(self, message: Message) -> mqtt.MQTTMessageInfo | None:
        """Handed to paho (QoS 1): its receipt, published once the broker acknowledges it; None if paho's
        own queue is full."""
        info = self.client.publish(message.topic, message.payload, qos=1, retain=message.retain)
        return None if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE else info

    def stop(self) -> None:
        """Say offline (acknowledged, or the last will says it), disconnect, end paho's thread."""
        with self._stop_lock:
            self._stopping = True
            # Also once the broker took the connection but before it acknowledged `online` (not connected yet): it
            # may have `online` already, and a clean disconnect sends no last will to undo it.
            say_offline = self._connected.is_set() or self._online is not None
        if say_offline:  # the instance emptied first: an `online` said under this place later is another install's
            self.client.publish(self.instance_topic, b"", qos=1, retain=True)
            info = self.client.publish(self.status_topic, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=OFFLINE_WAIT_S)
            except (RuntimeError, ValueError):
                pass  # gone meanwhile: the last will says the same
        self._connected.clear()  # leaving on purpose is no disconnection to warn about
        self.client.disconnect()
        self.client.loop_stop()

    # -- paho's thread ---------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._refused = True  # paho closes the connection next: that is no second failure
            self._failed(f"refused by the broker: {reason}")
            return
        # Connected for the outbox once the broker acknowledges `online`: paho resends what it held from before
        # (states handed over as the link dropped) after this callback returns, and a clean-up sent first would
        # be undone by the state it empties.
        with self._stop_lock:
            if self._stopping:  # `stop` has looked: an `online` now would outlive the clean disconnect that follows
                return
            # Before `online` (QoS 1 keeps their order): an `online` here is always the install's named
            client.publish(self.instance_topic, self.instance, qos=1, retain=True)
            self._online = client.publish(self.status_topic, "online", qos=1, retain=True).mid
        self._up(client)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if mid == self._online and not self._connected.is_set():
            self._connected_at = self._timer()
            self.error = None
            log.info("mqtt_connected", host=self.mqtt.host, port=self.mqtt.port)  # before anything goes out on it
            self._connected.set()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        """paho calls this from within its `except OSError`: the exception says why (refused, host
        unknown, TLS)."""
        exc = sys.exc_info()[1]
        self._failed(f"{type(exc).__name__}: {exc}" if exc is not None else "connection failed")

    def _failed(self, reason: str) -> None:
        """paho retries with a back-off: say why once, and again only when the reason changes."""
        self.failures += 1
        if reason != self.error:
            self.error = reason
            log.warning("mqtt_connect_failed", host=self.mqtt.host, port=self.mqtt.port, reason=reason[:300],
                        buffered=self._buffered())

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self._connected.is_set():  # not leaving on purpose (stop() clears it first)
            log.warning("mqtt_disconnected", reason=str(reason), buffered=self._buffered())
            self._count_short_link()
        elif self._stopping or self._refused:
            pass  # leaving on purpose; or the refusal, said already
        elif self._online is not None:  # accepted, but gone before `online` was acknowledged: never connected
            self._failed(f"closed after the broker accepted the connection, before it acknowledged online: {reason}")
        else:  # closed before the broker's answer (TLS, say)
            tls = self.mqtt.tls
            hint = "; does the broker want a client certificate (mqtt.tls.cert_file, key_file)?" if (
                tls is not None and tls.cert_file is None) else ""
            self._failed(f"closed before the broker answered: {reason}{hint}")
        self._refused = False
        self._online = None
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
