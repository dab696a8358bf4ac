"""What the node published under the id it had before: emptied once it runs under another.

A Pi given another node id (`mqtt.node_id`, or a new hostname when the id is left to it), base topic or discovery
prefix is a new device to Home Assistant; what it published under the old ones stays retained, and Home Assistant
keeps the old device with every entity unavailable. The daemon remembers where it published (`RECORD`, in its state
directory: systemd's StateDirectory=); started under another place, it sweeps the old one once connected (subscribed
until the broker acknowledges it, as the clean-up of leftovers is) and empties every retained message there, unless
the old node's `status` says `online` and another install said it: then another Pi runs under the old id, and its
topics are its own. Which install says `online` is said just before it, on `instance` (retained): a hash of a secret
drawn once, kept in the record, and the board's MAC address (`uuid.getnode`; the secret keeps it from the broker's
other clients). An old place's `online` this install said is its own, left by a broker that crashed while the daemon
was connected (no last will; it came back from its autosave) and never retracted: it is swept as an `offline` is. A
clean stop empties `instance` before it says `offline`, so that an older pi-controller's `online` under the old id
later is not taken for ours (after a SIGKILL or a power cut, the last will says `offline` and `instance` stays: that
one case is left). The id is kept across restarts, not drawn at each, so that it is still the one a broker holds
whose autosave is older than the daemon's last connection; the board's MAC in it makes an SD card copied to another
Pi, state directory and all, another install. The record names the place of now, and each old place until a sweep
finds nothing of ours left there (or that other Pi): an emptying is only queued when its sweep is over, and one that
a SIGKILL or a power cut took before the broker had it is made again at the next start, also under a place renamed
once more meanwhile (a typo in a node id fixed at once), whose own leftovers are then swept too.

Without a state directory nothing is remembered; docs/home-assistant.md says how to empty an old id by hand.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import uuid
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
MAX_FORMER = 8  # former places still to be found empty, kept in the record besides the one of now
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
        self._status: dict[str, bytes] = {}  # an old place's base -> its retained status
        self._instances: dict[str, bytes] = {}  # an old place's base -> its retained instance
        recorded, install = self._read()
        self._install = install or secrets.token_hex(16)
        # Said before `online` (see the module's docstring for why the board's MAC is in it)
        self.instance = hashlib.sha256(f"{self._install} {uuid.getnode()}".encode()).hexdigest()[:16]
        # The places to sweep: the one recorded, and those whose emptying no sweep found done yet
        self.before = [place for place in dict.fromkeys(recorded) if place != self.now]
        if not recorded or not install:
            self._remember(self.before)

    def routes(self) -> dict[str, Route]:
        """The old places' retained messages, swept: their bases and their configs, unless they are ours now (the
        leftovers' clean-up has those)."""
        filters = {f"{place.base}/#" for place in self.before if place.base != self.now.base}
        filters |= {place.configs() for place in self.before if place.configs() != self.now.configs()}
        return {topic: Route(self._retained, sweep=True) for topic in sorted(filters)}

    def _retained(self, message: Inbound) -> None:
        before = self.before
        if not before or not message.retained or not message.payload or self.now.holds(message.topic):
            return  # swept already (until the broker acknowledges its end), or not an old place's
        with self._lock:
            if any(message.topic == f"{place.base}/status" for place in before):
                self._status[message.topic.removesuffix("/status")] = message.payload
            else:
                if any(message.topic == f"{place.base}/instance" for place in before):
                    self._instances[message.topic.removesuffix("/instance")] = message.payload
                if len(self._found) < MAX_TOPICS:  # emptied with the place, as its `status` is
                    self._found.add(message.topic)

    def swept(self) -> None:
        """The sweep acknowledged (paho's thread): its retained messages came before. Empty each old place's,
        unless another install is online under it; forget a place once nothing of ours is left there."""
        if not self.before:
            return
        with self._lock:
            found, statuses, instances = sorted(self._found), dict(self._status), dict(self._instances)
            self._found.clear()
            self._status.clear()
            self._instances.clear()
        ours = self.instance.encode()
        others = [p for p in self.before if statuses.get(p.base) == b"online" and instances.get(p.base) != ours
                  and p.base != self.now.base]
        for place in others:
            log.warning("mqtt_former_node_online", node_id=place.node_id, base=place.base,
                        left=sum(place.holds(t) for t in found),
                        note="another install says online under the node id this Pi had: its topics are left")
        emptied: list[str] = []
        left: list[Place] = []
        for place in (p for p in self.before if p not in others):
            here, status = [t for t in found if place.holds(t)], statuses.get(place.base)
            emptied += here + ([f"{place.base}/status"] if status is not None else [])
            log.info("mqtt_former_node_emptied", node_id=place.node_id, base=place.base, topics=len(here))
            if here or status is not None:  # its emptying, only queued, is swept for again at the next start
                left.append(place)
        if len(others) < len(self.before):
            self._empty(emptied)
        self.before = []  # swept once in a run
        self._remember(left)

    def _read(self) -> tuple[list[Place], str]:
        """The place recorded, then the former ones still to be found empty, and this install's secret; [] and "" if
        none."""
        if self._file is None:
            return [], ""
        try:  # a regular file only: a FIFO there would hold the start up for good
            data = json.loads(read_small(self._file, MAX_RECORD_BYTES, "a record of where this node published"))
            return [Place(str(p["base"]), str(p["discovery_prefix"]), str(p["node_id"]))
                    for p in [data, *data.get("former", [])]], str(data.get("install", ""))
        except FileNotFoundError:
            return [], ""
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("mqtt_place_unreadable", file=str(self._file), error=str(exc)[:300])
            return [], ""

    def _remember(self, left: list[Place]) -> None:
        """The place of now recorded, with the former ones `left` to sweep again."""
        if self._file is None:
            return
        # The newest first, a few: a record past MAX_RECORD_BYTES would be unreadable, and every place forgotten
        former = [asdict(place) for place in left[:MAX_FORMER]]
        record = asdict(self.now) | {"install": self._install} | ({"former": former} if former else {})
        try:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self._file, json.dumps(record).encode(), flush=False)
        except OSError as exc:
            log.warning("mqtt_place_not_kept", file=str(self._file), error=str(exc)[:300])
