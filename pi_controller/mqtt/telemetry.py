"""MQTT telemetry and commands, never in the loop's way: the link, the inbox, the outbox and the publish
policy, wired, and followed by the loop.

Along Home Assistant's own seams:
- `link.py`: paho's client, TLS, credentials, the last will; connection failures and takeovers, said once.
- `inbox.py`: one `{topic filter: handler}` table that drives both subscribing and dispatch; the
  commands, which become `Operator` requests validated at the next tick and each answered on the
  command topic's `/result` (not retained). With `commands: false` the table holds only the clean-up's
  rows, subscribed at each connection until acknowledged: no command topic is ever subscribed.
- `outbox.py`: the queue by kind of message, the rate cap, the outage buffer and its file.
- `policy.py`: what is worth publishing and when (deadband, heartbeat), discovery, clean-up of leftovers.

After each tick (`tick_done`, on the event loop): discovery and clean-ups if due, the answers, the states,
then as much of the outbox as the rate cap lets out.

Topics (under `<base_topic>/<node_id>`): `status` (retained online/offline, with a last will),
`instance` (retained: which install says it),
`sensor/<id>/state`, `actuator/<id>/state` (JSON, retained), `actuator/<id>/set` and `/release`,
`actuator/<id>/event` (holds, refusals, failsafes; not retained),
`plugin/<name>/state`, `plugin/<name>/enable`, `plugin/<name>/config/<key>/set`, `loop/state`,
`telemetry/state` (what is buffered; what was dropped: states past the outage buffer's bound, answers
past theirs, commands over the rate limits). With `mqtt.fleet`, the rollouts' topics (`fleet/node.py`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import paho.mqtt.client as mqtt
import structlog

from pi_controller.config import Settings
from pi_controller.mqtt import inbox
from pi_controller.mqtt.former_node import FormerNode
from pi_controller.mqtt.inbox import Inbox, Route
from pi_controller.mqtt.link import FINAL_STATES_WAIT_S, Link
from pi_controller.mqtt.outbox import Outbox
from pi_controller.mqtt.policy import PublishPolicy
from pi_controller.observer import LoopObserver, TickReport
from pi_controller.operator import Operator
from pi_controller.safety.ownership import Failsafe
from pi_controller.status import Status

log = structlog.get_logger("pi_controller.telemetry")


class Rollouts(Protocol):
    """A node's part in fleet rollouts (`fleet/node.py`): rows of its own in the inbox's table, subscriptions
    it asks for and ends (`wire`), and its word after each tick, as retained states."""

    def routes(self) -> dict[str, Route]: ...

    def wire(self, fetch: Callable[[str], None], unfetch: Callable[[str], None]) -> None: ...

    def tick(self, publish: Callable[[str, bytes], None]) -> None: ...


class Telemetry(LoopObserver):
    def __init__(self, settings: Settings, status: Status, operator: Operator,
                 timer: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 fleet: Rollouts | None = None, state_dir: Path | None = None):
        """`fleet`: this node's part in rollouts (`mqtt.fleet`), whose rows join the inbox's; `state_dir`: where
        the place it publishes under is remembered (`former_node.py`)."""
        self.mqtt = settings.mqtt
        self.fleet = fleet
        self.status = status
        self.operator = operator
        self._timer = timer
        self.former = FormerNode(self.mqtt, state_dir, lambda topics: self.policy.empty(topics))  # its install id first
        self.link = Link(settings, timer, self._up, lambda: len(self.outbox), self.former.instance)
        self.outbox = Outbox(self.mqtt, self.link, timer)  # what a restart left in the buffer file, first
        self.policy = PublishPolicy(settings, status, operator, self.outbox, wall)
        routes, former = self._routes() if self.mqtt.commands else self._leftovers(), self.former.routes()
        self.inbox = Inbox(routes | former, inbox.Gate.of(self.mqtt), lambda: self._swept(former))
        self.inbox.attach(self.link.client)
        if fleet is not None:
            fleet.wire(self.inbox.fetch, self.inbox.unfetch)

    def _routes(self) -> dict[str, Route]:
        """Our commands; Home Assistant's restarts; the leftovers of runs before."""
        routes = inbox.commands(self.policy.topics.base, self.operator.submit)
        if self.mqtt.discovery:
            routes["homeassistant/status"] = Route(self.policy.home_assistant_status)
        return routes | self._leftovers() | (self.fleet.routes() if self.fleet is not None else {})

    def _leftovers(self) -> dict[str, Route]:
        """The retained discovery configs of our node that Home Assistant holds and the retained states of ours,
        swept at each connection: to empty those of entities, devices and plugins gone. In either mode (a run
        before left them whatever its mode); nothing that comes after the retained ones is taken in (the
        configs this run sends would each come back to it)."""
        policy = self.policy
        # Without discovery too: Home Assistant is then told of nothing, and what an earlier run told it goes.
        routes = {f"{self.mqtt.discovery_prefix}/+/{self.mqtt.node_id}/+/config":
                  Route(policy.leftover_config, sweep=True)}
        for kind in ("sensor", "actuator", "plugin"):
            routes[f"{policy.topics.base}/{kind}/+/state"] = Route(policy.leftover_state, sweep=True)
        return routes

    def _swept(self, former: Iterable[str]) -> None:
        """A connection's sweep over (paho's thread): the former place's once for all, the leftovers' again at the
        next connection."""
        self.former.swept()
        self.inbox.end_sweep(former)

    def _up(self, client: mqtt.Client) -> None:
        """Connected (paho's thread): subscribe, and send a subscriber that may have missed us everything."""
        self.inbox.subscribe(client)
        self.policy.resync()

    def start(self) -> None:
        """Connect in the background: a broker that is down never holds up the daemon."""
        self.policy.discover()
        self.policy.forget_restored()
        self.link.start()
        log.info("mqtt_starting", host=self.mqtt.host, port=self.mqtt.port, base=self.policy.topics.base,
                 client_id=self.link.client_id)

    def summary(self) -> dict[str, Any]:
        return {"connected": self.link.connected(), "readings_queued": self.policy.readings_queued,
                **self._counts(), "coalesced": self.outbox.coalesced,
                "connect_failures": self.link.failures, "connect_error": self.link.error}

    def _counts(self) -> dict[str, int]:
        """What is buffered, and what was lost: telemetry's own state on MQTT, and in the summary."""
        return {"buffered": len(self.outbox), "dropped": self.outbox.dropped,
                "answers_dropped": self.outbox.answers_dropped, "commands_rate_limited": self.inbox.gate.dropped}

    def tick_done(self, report: TickReport) -> None:
        self.policy.announce()
        answers = self.operator.answers(self.status.holds(), self.status.actuator_states())
        for answer in answers + self.inbox.refused():
            self.outbox.put_answer(answer.reply_to, json.dumps(answer.payload()).encode())
        self.policy.refused(answers)
        if self.fleet is not None:
            self.fleet.tick(self.outbox.put_state)
        self.policy.collect(self._timer(), self._counts())
        self.outbox.pump()

    def actuator_failsafe(self, failsafe: Failsafe) -> None:
        self.policy.refusals.failsafe(failsafe)

    def stop(self) -> None:
        """The actuators' shut-down states and the other latest states past any backlog, acknowledged by
        the broker (or said not to be), then offline, disconnect; the outage buffer kept on disk if asked."""
        self.policy.shutdown_states(self._timer())
        self.outbox.flush(FINAL_STATES_WAIT_S)
        self.link.stop()
        self.outbox.save()
