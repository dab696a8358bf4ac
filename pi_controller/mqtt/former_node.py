"""What the node published under the id it had before: emptied once it runs under another.

A Pi given another node id (`mqtt.node_id`, or a new hostname when the id is left to it), base topic or
discovery prefix is a new device to Home Assistant; what it published under the old ones stays retained, and
Home Assistant keeps the old device with every entity unavailable. The daemon remembers where it published
(`RECORD`, in its state directory: systemd's StateDirectory=); started under another place, it sweeps the old
one once connected (subscribed until the broker acknowledges it, as the clean-up of leftovers is) and empties
every retained message there, unless the old node's `status` says `online`: then another Pi runs under the old
id, and its topics are its own. The record moves to the place of now once a sweep finds nothing of ours left
there (or that other Pi): an emptying is only queued when its sweep is over, and one that a SIGKILL or a power
cut took before the broker had it is made again at the next start.

Without a state directory nothing is remembered; docs/home-assistant.md says how to empty an old id by hand.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import structlog

from pi_controller.config import MqttSettings
from pi_controller.files import write_atomically
from pi_controller.keys import read_small
from pi_controller.mqtt.discovery import Topics
from pi_controller.mqtt.inbox import Inbound, Route

log = structlog.get_logger("pi_controller.telemetry")

RECORD = "mqtt-place.json"
MAX_RECORD_BYTES = 4096
MAX_TOPICS = 10_000  # emptied at most: a node publishes some hundreds; past this a broker holds what is not ours


@dataclass(frozen=True)
class Place:
    """Where a node publishes: its topics' base, and its discovery configs' prefix and node level."""

    base: str
    discovery_prefix: str
    node_id: str

    @classmethod
    def of(cls, mqtt: MqttSettings) -> Place:
        return cls(Topics.of(mqtt).base, mqtt.discovery_prefix, mqtt.node_id)

    def configs(self) -> str:
        return f"{self.discovery_prefix}/+/{self.node_id}/+/config"

    def holds(self, topic: str) -> bool:
        parts = topic.split("/")
        return topic.startswith(f"{self.base}/") or (
            topic.startswith(f"{self.discovery_prefix}/") and parts[-1] == "config" and len(parts) >= 4
            and parts[-3] == self.node_id)


class FormerNode:
    def __init__(self, mqtt: MqttSettings, state_dir: Path | None, empty: Callable[[list[str]], None]):
        """`empty`: queues the emptying of retained topics (from paho's thread)."""
        self.now = Place.of(mqtt)
        self._file = state_dir / RECORD if state_dir is not None else None
        self._empty = empty
        self._lock = threading.Lock()
        self._found: set[str] = set()
        self._status: bytes | None = None
        recorded = self._read()
        self.before = recorded if recorded is not None and recorded != self.now else None
        if recorded is None:
            self._remember()

    def routes(self) -> dict[str, Route]:
        """The old place's retained messages, swept: its base and its configs, unless they are ours now (the
        leftovers' clean-up has those)."""
        if self.before is None:
            return {}
        filters = {f"{self.before.base}/#"} if self.before.base != self.now.base else set()
        if self.before.configs() != self.now.configs():
            filters.add(self.before.configs())
        return {topic: Route(self._retained, sweep=True) for topic in sorted(filters)}

    def _retained(self, message: Inbound) -> None:
        before = self.before
        if before is None or not message.retained or not message.payload or self.now.holds(message.topic):
            return
        with self._lock:
            if message.topic == f"{before.base}/status":
                self._status = message.payload
            elif len(self._found) < MAX_TOPICS:
                self._found.add(message.topic)

    def swept(self) -> None:
        """The sweep acknowledged (paho's thread): its retained messages came before. Empty them, unless
        another node is online under the old place; forget the old place once nothing of ours is left there."""
        before = self.before
        if before is None:
            return
        with self._lock:
            found, status = sorted(self._found), self._status
            self._found.clear()
        another_node = status == b"online" and before.base != self.now.base
        if another_node:
            log.warning("mqtt_former_node_online", node_id=before.node_id, base=before.base, left=len(found),
                        note="another client says online under the node id this Pi had: its topics are left")
        else:
            self._empty(found + ([f"{before.base}/status"] if status is not None else []))
            log.info("mqtt_former_node_emptied", node_id=before.node_id, base=before.base, topics=len(found))
        self.before = None  # swept once in a run
        if another_node or not (found or status is not None):  # else its emptying, only queued, is swept for again
            self._remember()

    def _read(self) -> Place | None:
        if self._file is None:
            return None
        try:  # a regular file only: a FIFO there would hold the start up for good
            data = json.loads(read_small(self._file, MAX_RECORD_BYTES, "a record of where this node published"))
            return Place(str(data["base"]), str(data["discovery_prefix"]), str(data["node_id"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("mqtt_place_unreadable", file=str(self._file), error=str(exc)[:300])
            return None

    def _remember(self) -> None:
        if self._file is None:
            return
        try:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self._file, json.dumps(asdict(self.now)).encode(), flush=False)
        except OSError as exc:
            log.warning("mqtt_place_not_kept", file=str(self._file), error=str(exc)[:300])
