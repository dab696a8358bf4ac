"""Telemetry's parts on their own: the inbox's table against a real broker (mosquitto on loopback, paho
clients), the outbox against a sender that records what it is handed."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt

from pi_controller.config import MqttSettings
from pi_controller.contract import Rejected
from pi_controller.mqtt.inbox import COMMANDS, Inbound, Inbox, Route, commands
from pi_controller.mqtt.outbox import Message, Outbox
from pi_controller.operator import EnablePlugin, Release, Request, SetActuator, SetPluginConfig
from tests import test_mqtt
from tests.test_mqtt import Broker, Subscriber, poll

broker, subscriber = test_mqtt.broker, test_mqtt.subscriber  # a broker, and a client to publish with
pytestmark = test_mqtt.pytestmark


class Attached:
    """A paho client the inbox is attached to, connected and subscribed as the link does it; the topics
    of messages that reached it without a row to take them (none, if the table is what is subscribed);
    whether the broker acknowledged an unsubscription."""

    def __init__(self, inbox: Inbox, broker: Broker):
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="inbox-under-test")
        self.strays: list[str] = []
        self.unsubscribed = threading.Event()
        self.client.on_message = lambda c, u, message: self.strays.append(message.topic)
        self.client.on_unsubscribe = lambda *args: self.unsubscribed.set()
        inbox.attach(self.client)
        acknowledged = threading.Event()
        on_subscribe = self.client.on_subscribe
        assert on_subscribe is not None  # the inbox's, for its sweep

        def subscribed(*args: Any) -> None:
            on_subscribe(*args)
            acknowledged.set()

        self.client.on_subscribe = subscribed
        self.client.on_connect = lambda c, u, f, reason, p: inbox.subscribe(c)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        poll(acknowledged.is_set, "the inbox's subscriptions acknowledged")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def recorder(into: list[tuple[str, Inbound]], name: str) -> Callable[[Inbound], None]:
    return lambda message: into.append((name, message))


def test_the_table_is_both_what_is_subscribed_and_who_takes_each_message(broker, subscriber: Subscriber) -> None:
    subscriber.client.publish("t/sweep/old", b"left over", qos=1, retain=True).wait_for_publish(5)
    got: list[tuple[str, Inbound]] = []
    inbox = Inbox({"t/+/x": Route(recorder(got, "x")), "t/status": Route(recorder(got, "status")),
                   "t/sweep/+": Route(recorder(got, "sweep"), sweep=True)})
    attached = Attached(inbox, broker)
    try:
        poll(attached.unsubscribed.is_set, "the sweep unsubscribed once the broker acknowledged it")
        for topic in ("t/sweep/new", "t/a/y", "t/a/x", "t/status"):  # in order: the last one says all came
            subscriber.publish(topic, topic)
        poll(lambda: got[-1][0] == "status", "the last message taken")
    finally:
        attached.close()
    assert [(name, m.topic, m.levels, m.retained) for name, m in got] == [
        ("sweep", "t/sweep/old", ("old",), True),  # what the sweep came for, and nothing after it
        ("x", "t/a/x", ("a",), False),
        ("status", "t/status", (), False)]
    assert attached.strays == []  # t/a/y has no row: never subscribed, so the broker never sent it


def test_a_refused_command_is_answered_and_a_failing_row_costs_only_its_message(broker, subscriber) -> None:
    def refuse(message: Inbound) -> None:
        raise Rejected("too_large", "over the bound")

    def fail(message: Inbound) -> None:
        raise KeyError("a bug of ours")

    got: list[tuple[str, Inbound]] = []
    inbox = Inbox({"t/command/+": Route(refuse, answered=True), "t/other": Route(fail),
                   "t/last": Route(recorder(got, "last"))})
    attached = Attached(inbox, broker)
    try:
        for topic in ("t/command/a", "t/other", "t/last"):
            subscriber.publish(topic, b"x")
        poll(lambda: got, "the message after two failing ones taken: paho's thread goes on")
    finally:
        attached.close()
    assert [(a.reply_to, a.ok, a.rule, a.reason) for a in inbox.refused()] == [
        ("t/command/a/result", False, "too_large", "over the bound")]  # the other row is no command
    assert inbox.refused() == []  # each answered once


# One payload per command; a new row of COMMANDS gets its example here.
EXAMPLES = {"actuator/+/set": b"ON", "actuator/+/release": b"RELEASE", "plugin/+/enable": b"off",
            "plugin/+/config/+/set": b"19.5"}


def test_every_command_row_is_subscribed_under_the_base_and_makes_its_request(broker, subscriber) -> None:
    assert set(EXAMPLES) == set(COMMANDS)
    subscriber.client.publish("base/node/actuator/old/set", b"ON", qos=1, retain=True).wait_for_publish(5)
    requests: list[Request] = []
    attached = Attached(Inbox(commands("base/node", requests.append)), broker)
    try:
        for row, payload in EXAMPLES.items():
            subscriber.publish("base/node/" + row.replace("+", "one", 1).replace("+", "two"), payload)
        poll(lambda: len(requests) == len(EXAMPLES), "every command taken")
    finally:
        attached.close()
    result = "base/node/{}/result".format
    assert requests == [SetActuator("one", b"ON", result("actuator/one/set")),  # not the retained one: stale
                        Release("one", result("actuator/one/release")),
                        EnablePlugin("one", False, result("plugin/one/enable")),
                        SetPluginConfig("one", "two", 19.5, result("plugin/one/config/two/set"))]
    assert attached.strays == []


class Recording:
    """The link's side of the outbox: connected or not, taking up to `room` messages."""

    def __init__(self) -> None:
        self.up = False
        self.room = 1000
        self.sent: list[Message] = []

    def connected(self) -> bool:
        return self.up

    def publish(self, message: Message) -> bool:
        if len(self.sent) >= self.room:
            return False
        self.sent.append(message)
        return True


def outbox_on(sender: Recording, clock: list[float], tmp_path: Path, **mqtt: Any) -> Outbox:
    settings = MqttSettings(node_id="t", buffer_file=str(tmp_path / "outbox.jsonl"), **mqtt)
    return Outbox(settings, sender, lambda: clock[0])


def test_while_the_broker_is_away_every_kind_waits_in_order_and_past_the_bound_the_oldest_go(tmp_path) -> None:
    sender, clock = Recording(), [0.0]
    outbox = outbox_on(sender, clock, tmp_path, buffer_messages=10, max_messages_per_s=100)
    outbox.put_state("s/a", b"1")
    outbox.put_answer("c/result", b"ok")
    outbox.put_state("s/a", b"2")  # away: not coalesced, history kept
    outbox.put_first([("config/a", b"{}")])
    assert list(outbox) == [("config/a", b"{}", True), ("s/a", b"1", True), ("c/result", b"ok", False),
                            ("s/a", b"2", True)]
    for n in range(7):
        outbox.put_state(f"s/{n}", b"x")
    assert (len(outbox), outbox.dropped, next(iter(outbox)).topic) == (10, 1, "s/a")
    outbox.pump()
    assert sender.sent == []  # nothing goes while away
    sender.up, clock[0] = True, 1.0
    outbox.pump()
    assert [m.topic for m in sender.sent] == ["s/a", "c/result", "s/a"] + [f"s/{n}" for n in range(7)]


def test_while_connected_a_state_waits_as_its_topics_latest_value_behind_the_rate_cap(tmp_path) -> None:
    sender, clock = Recording(), [0.0]
    sender.up = True
    outbox = outbox_on(sender, clock, tmp_path, max_messages_per_s=2)
    for topic, payload in (("s/a", b"1"), ("s/b", b"1"), ("s/a", b"2")):
        outbox.put_state(topic, payload)
    outbox.pump()
    assert sender.sent == [] and outbox.coalesced == 1  # no token yet; a=1 replaced by a=2
    clock[0] = 0.5
    outbox.pump()
    assert sender.sent == [("s/a", b"2", True)]  # one token: a kept its place ahead of b
    sender.room = 1  # the link holds all it may: the rest stays with us
    clock[0] = 1.5
    outbox.pump()
    assert sender.sent == [("s/a", b"2", True)] and outbox.waiting() == {"s/b"}


def test_what_is_unsent_at_a_stop_is_saved_and_first_out_after_the_next_start(tmp_path) -> None:
    sender, clock = Recording(), [0.0]
    sender.up = True
    outbox = outbox_on(sender, clock, tmp_path)
    outbox.put_state("s/a", b"1")  # waiting on the rate cap
    sender.up = False
    outbox.put_answer("c/result", b"ok")
    outbox.save()
    restored = outbox_on(Recording(), clock, tmp_path)
    assert list(restored) == [("c/result", b"ok", False), ("s/a", b"1", True)]  # the latest states last
    assert not (tmp_path / "outbox.jsonl").exists()
