"""Telemetry's parts on their own: the inbox's table against a real broker (mosquitto on loopback, paho
clients), the outbox against a sender that records what it is handed."""

from __future__ import annotations

import itertools
import json
import os
import random
import threading
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, cast

import paho.mqtt.client as mqtt
import pytest
import yaml
from structlog.testing import capture_logs

from pi_controller import config
from pi_controller.config import MqttSettings
from pi_controller.contract import Reading, Rejected
from pi_controller.mqtt import former_node
from pi_controller.mqtt import outbox as outbox_module
from pi_controller.mqtt.inbox import (
    ANSWER_EVERY_S,
    BURST_S,
    COMMANDS,
    TOPICS_TRACKED,
    Gate,
    Inbound,
    Inbox,
    Route,
    commands,
)
from pi_controller.mqtt.outbox import Message, Outbox
from pi_controller.mqtt.policy import PublishPolicy
from pi_controller.mqtt.refusals import Refusals
from pi_controller.operator import (
    Answer,
    EnablePlugin,
    Operator,
    PromotePlugin,
    Release,
    Request,
    SetActuator,
    SetPluginConfig,
)
from pi_controller.safety.ownership import Failsafe
from pi_controller.safety.rules import Hold
from pi_controller.status import Status
from tests import test_mqtt
from tests.conftest import example_data
from tests.test_mqtt import Broker, Subscriber, poll

broker, subscriber = test_mqtt.broker, test_mqtt.subscriber  # a broker, and a client to publish with
pytestmark = test_mqtt.pytestmark

TOPIC_RATE, ALL_RATE = MqttSettings().max_commands_per_s_per_topic, MqttSettings().max_commands_per_s  # the defaults
TOPIC_BURST, ALL_BURST = TOPIC_RATE * BURST_S, ALL_RATE * BURST_S


class Attached:
    """A paho client the inbox is attached to, connected and subscribed as the link does it; the topics
    of messages that reached it without a row to take them (none, if the table is what is subscribed);
    whether the broker acknowledged an unsubscription."""

    def __init__(self, inbox: Inbox, broker: Broker):
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="inbox-under-test")
        self.strays: list[str] = []
        self.unsubscribed = threading.Event()
        self.client.on_message = lambda c, u, message: self.strays.append(message.topic)
        inbox.attach(self.client)
        acknowledged = threading.Event()
        on_subscribe, on_unsubscribe = self.client.on_subscribe, self.client.on_unsubscribe
        assert on_subscribe is not None and on_unsubscribe is not None  # the inbox's, for its sweep

        def subscribed(*args: Any) -> None:
            on_subscribe(*args)
            acknowledged.set()

        def unsubscribed(*args: Any) -> None:
            on_unsubscribe(*args)
            self.unsubscribed.set()

        self.client.on_subscribe = subscribed
        self.client.on_unsubscribe = unsubscribed
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
    swept: list[list[str]] = []  # what the sweep had taken when it was said to be over
    inbox = Inbox({"t/+/x": Route(recorder(got, "x")), "t/status": Route(recorder(got, "status")),
                   "t/sweep/+": Route(recorder(got, "sweep"), sweep=True)}, Gate.of(MqttSettings()),
                  lambda: swept.append([m.topic for _, m in got]))
    attached = Attached(inbox, broker)
    try:
        poll(attached.unsubscribed.is_set, "the sweep unsubscribed once the broker acknowledged it")
        poll(lambda: swept == [["t/sweep/old"]], "the sweep said over, once, after what it came for")
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


def test_a_sweep_ended_for_good_is_not_made_again_at_the_next_connection(broker, subscriber: Subscriber) -> None:
    """The former place's sweep (`former_node`) empties it once; the leftovers' is made at every connection."""
    for topic in ("t/once/old", "t/sweep/old"):
        subscriber.client.publish(topic, b"left over", qos=1, retain=True).wait_for_publish(5)
    got: list[tuple[str, Inbound]] = []
    swept: list[list[str]] = []
    inbox: Inbox

    def over() -> None:
        swept.append(sorted(m.topic for _, m in got))
        inbox.end_sweep(["t/once/+"])

    inbox = Inbox({"t/once/+": Route(recorder(got, "once"), sweep=True),
                   "t/sweep/+": Route(recorder(got, "sweep"), sweep=True)}, Gate.of(MqttSettings()), over)
    attached = Attached(inbox, broker)
    try:
        poll(lambda: len(swept) == 1, "the first connection's sweep over")
        attached.client.reconnect()
        poll(lambda: len(swept) == 2, "the second connection's sweep over")
    finally:
        attached.close()
    assert swept == [["t/once/old", "t/sweep/old"], ["t/once/old", "t/sweep/old", "t/sweep/old"]]


def test_a_refused_command_is_answered_and_a_failing_row_costs_only_its_message(broker, subscriber) -> None:
    def refuse(message: Inbound) -> None:
        raise Rejected("too_large", "over the bound")

    def fail(message: Inbound) -> None:
        raise KeyError("a bug of ours")

    got: list[tuple[str, Inbound]] = []
    inbox = Inbox({"t/command/+": Route(refuse, answered=True), "t/other": Route(fail),
                   "t/last": Route(recorder(got, "last"))}, Gate.of(MqttSettings()))
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


def test_the_gate_lets_commands_in_per_topic_and_in_all_and_answers_what_it_drops_once_a_second() -> None:
    clock = [0.0]
    gate = Gate(TOPIC_RATE, ALL_RATE, lambda: clock[0])
    verdicts = [gate.admit("a") for _ in range(int(TOPIC_BURST) + 5)]
    assert verdicts == [(True, False)] * int(TOPIC_BURST) + [(False, True)] + [(False, False)] * 4
    clock[0] = 1 / TOPIC_RATE  # one more token for "a"; its answer not due again yet
    assert [gate.admit("a") for _ in range(2)] == [(True, False), (False, False)]
    clock[0] += ANSWER_EVERY_S
    assert gate.admit("b")[0] and gate.admit("a") == (True, False)  # topics apart
    admitted = sum(gate.admit(f"t/{n}")[0] for n in range(10 * TOPICS_TRACKED))  # a flood over many topics
    assert admitted <= ALL_BURST and gate.dropped >= 10 * TOPICS_TRACKED - ALL_BURST
    assert len(gate._topics) <= TOPICS_TRACKED  # what it knows is bounded too


def test_a_command_flood_is_dropped_before_its_handler_and_answered_rate_limited_once_a_second(broker,
                                                                                               subscriber) -> None:
    got: list[tuple[str, Inbound]] = []
    inbox = Inbox({"t/command/+": Route(recorder(got, "command"), answered=True),
                   "t/last": Route(recorder(got, "last"))}, Gate(TOPIC_RATE, ALL_RATE))
    attached = Attached(inbox, broker)
    try:
        started = time.monotonic()
        for _ in range(300):
            subscriber.client.publish("t/command/a", b"x", qos=0)
        subscriber.publish("t/last", b"x")  # QoS 1, after them: when it is taken, every command was seen
        poll(lambda: got and got[-1][0] == "last", "the message after the flood taken")
        elapsed = time.monotonic() - started
    finally:
        attached.close()
    commands = [m for name, m in got if name == "command"]
    assert TOPIC_BURST <= len(commands) <= TOPIC_BURST + TOPIC_RATE * elapsed + 1
    assert inbox.gate.dropped == 300 - len(commands)
    answers = inbox.refused()
    assert 1 <= len(answers) <= 1 + elapsed / ANSWER_EVERY_S
    assert {(a.reply_to, a.ok, a.rule) for a in answers} == {("t/command/a/result", False, "rate_limited")}


# One payload per command; a new row of COMMANDS gets its example here.
EXAMPLES = {"actuator/+/set": b"ON", "actuator/+/release": b"RELEASE", "plugin/+/enable": b"off",
            "plugin/+/config/+/set": b"19.5", "plugin/+/promote": b"install"}


def test_every_command_row_is_subscribed_under_the_base_and_makes_its_request(broker, subscriber) -> None:
    assert set(EXAMPLES) == set(COMMANDS)
    subscriber.client.publish("base/node/actuator/old/set", b"ON", qos=1, retain=True).wait_for_publish(5)
    requests: list[Request] = []
    attached = Attached(Inbox(commands("base/node", requests.append), Gate.of(MqttSettings())), broker)
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
                        SetPluginConfig("one", "two", 19.5, result("plugin/one/config/two/set")),
                        PromotePlugin("one", result("plugin/one/promote"))]
    assert attached.strays == []


class Receipt:
    """What the sender hands back for a message: acknowledged by the broker or not."""

    def __init__(self, acked: bool) -> None:
        self.acked = acked

    def is_published(self) -> bool:
        return self.acked

    def wait_for_publish(self, timeout: float | None = None) -> None:
        pass  # the broker of this test answers at once, or never


class Recording:
    """The link's side of the outbox: connected or not, taking up to `room` messages, acknowledged by the
    broker while `acks`."""

    def __init__(self) -> None:
        self.up = False
        self.room = 1000
        self.acks = True
        self.sent: list[Message] = []

    def connected(self) -> bool:
        return self.up

    def publish(self, message: Message) -> Receipt | None:
        if len(self.sent) >= self.room:
            return None
        self.sent.append(message)
        return Receipt(self.acks)


B = "pi-controller/t"  # the base of node "t"


def outbox_on(sender: Recording, clock: list[float], tmp_path: Path, **mqtt: Any) -> Outbox:
    settings = MqttSettings(node_id="t", buffer_file=str(tmp_path / "outbox.jsonl"), **mqtt)
    return Outbox(settings, sender, lambda: clock[0])


def test_while_the_broker_is_away_states_wait_in_order_and_past_the_bound_the_oldest_go(tmp_path) -> None:
    sender, clock = Recording(), [0.0]
    outbox = outbox_on(sender, clock, tmp_path, buffer_messages=10, max_messages_per_s=100)
    outbox.put_state("s/a", b"1")
    outbox.put_answer("c/result", b"ok")
    outbox.put_state("s/a", b"2")  # away: not coalesced, history kept
    outbox.put_first([("config/a", b"{}")])
    assert list(outbox) == [("config/a", b"{}", True), ("s/a", b"1", True), ("s/a", b"2", True),
                            ("c/result", b"ok", False)]  # by priority: configs, states, answers
    for n in range(9):
        outbox.put_state(f"s/{n}", b"x")
    assert (len(outbox), outbox.dropped) == (12, 1)  # 10 states, the config, the answer
    outbox.pump()
    assert sender.sent == []  # nothing goes while away
    sender.up, clock[0] = True, 1.0
    outbox.pump()
    assert [m.topic for m in sender.sent] == ["config/a", "s/a"] + [f"s/{n}" for n in range(9)] + ["c/result"]


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


def test_a_flood_of_answers_never_holds_a_state_back_and_past_their_bound_the_oldest_go(tmp_path) -> None:
    sender, clock = Recording(), [0.0]
    sender.up = True
    outbox = outbox_on(sender, clock, tmp_path, max_messages_per_s=50)
    assert outbox.answer_bound == 50  # a second's worth of the rate cap
    for tick in range(1, 101):  # 10 s at 10 Hz: 100 answers a tick, and a state of each of 3 sensors a second
        for n in range(100):
            outbox.put_answer(f"c/{tick}/{n}/result", b"{}")
        if tick % 10 == 0:
            for sensor in "xyz":
                outbox.put_state(f"s/{sensor}", str(tick).encode())
        clock[0] = tick / 10
        outbox.pump()
        assert not {topic for topic in outbox.waiting() if topic.startswith("s/")}, tick  # out in their tick
    sent = [m.topic for m in sender.sent]
    states = [topic for topic in sent if topic.startswith("s/")]
    assert len(states) == 30 and 0.9 * 500 <= len(sent) <= 500  # the rate cap's 50/s: answers took the rest
    kept = [m.topic for m in outbox if m.topic.startswith("c/")]
    assert kept == [f"c/100/{n}/result" for n in range(100 - len(kept), 100)] and len(kept) >= 45  # the newest
    assert outbox.answers_dropped == 100 * 100 - (len(sent) - len(states)) - len(kept)


def test_at_a_stop_the_latest_states_go_past_the_backlog_and_each_is_confirmed_or_said_not_to_be(tmp_path) -> None:
    sender, clock = Recording(), [0.0]
    outbox = outbox_on(sender, clock, tmp_path, max_messages_per_s=5)
    outbox.put_state(f"{B}/sensor/x/state", b"1")  # the broker away: into the outage buffer
    sender.up = True
    for n in range(50):
        outbox.put_answer(f"{B}/actuator/relay/set/result", str(n).encode())
    outbox.put_state(f"{B}/actuator/relay/state", b"on")
    outbox.put_state(f"{B}/actuator/relay/state", b"off")  # the shut-down state, over the last one
    with capture_logs() as logs:
        outbox.flush(1.0)
    assert sender.sent == [(f"{B}/actuator/relay/state", b"off", True)]  # no answer, no older state after it
    assert outbox.answers_dropped == 50 and logs == []
    outbox.save()  # the outage buffer waits for the next start: sent now, it would be what is retained
    assert list(outbox_on(Recording(), clock, tmp_path)) == [(f"{B}/sensor/x/state", b"1", True)]
    without_file = Outbox(MqttSettings(node_id="t"), Recording(), lambda: clock[0])
    without_file.put_state(f"{B}/sensor/x/state", b"1")
    with capture_logs() as logs:
        without_file.save()
    assert [(e["event"], e["messages"]) for e in logs] == [("telemetry_unsent_at_stop", 1)]  # lost, and said

    sender.sent, sender.acks = [], False  # a broker that takes the states and never acknowledges them
    outbox.put_state(f"{B}/actuator/relay/state", b"off")
    with capture_logs() as logs:
        outbox.flush(1.0)
    (said,) = logs
    assert said["event"] == "telemetry_final_states_unconfirmed" and said["topics"] == [f"{B}/actuator/relay/state"]


def test_a_stop_with_the_broker_away_says_so_once_and_keeps_the_shut_down_states_for_the_next_start(tmp_path) -> None:
    sender, clock = Recording(), [0.0]
    outbox = outbox_on(sender, clock, tmp_path)
    outbox.put_state(f"{B}/actuator/relay/state", b"on")
    outbox.put_state(f"{B}/actuator/relay/state", b"off")  # the shut-down state, the broker away
    with capture_logs() as logs:
        outbox.flush(1.0)
    assert [e["event"] for e in logs] == ["telemetry_final_states_unsent"] and sender.sent == []
    outbox.save()
    assert [m.payload for m in outbox_on(Recording(), clock, tmp_path)] == [b"on", b"off"]  # the last word last


def test_what_is_unsent_at_a_stop_is_saved_and_first_out_after_the_next_start(tmp_path) -> None:
    sender, clock = Recording(), [0.0]
    sender.up = True
    outbox = outbox_on(sender, clock, tmp_path)
    outbox.put_state(f"{B}/s/a", b"1")  # waiting on the rate cap
    sender.up = False
    outbox.put_state(f"{B}/s/b", b"2")
    outbox.put_answer(f"{B}/c/result", b"ok")  # news: not kept across a restart
    outbox.save()
    restored = outbox_on(Recording(), clock, tmp_path)
    assert list(restored) == [(f"{B}/s/a", b"1", True), (f"{B}/s/b", b"2", True)]
    assert not (tmp_path / "outbox.jsonl").exists()


def test_the_buffer_file_publishes_only_to_our_topics_and_is_read_within_bounds(tmp_path) -> None:
    buffer, clock = tmp_path / "outbox.jsonl", [0.0]
    ours = json.dumps([f"{B}/sensor/x/state", "1", True])
    lines = [json.dumps(["homeassistant/switch/evil/config", "{}", True]), json.dumps([f"{B}/#", "1", True]),
             json.dumps(["pi-controller/other/sensor/x/state", "1", True]), '["' + "[" * 60_000 + '"]',
             "[" * 100_000, "x" * (2 * outbox_module.MAX_LINE_BYTES), json.dumps([f"{B}/\ud800", "1", True]), ours]
    buffer.write_text("\n".join(lines) + "\n")
    with capture_logs() as logs:
        restored = outbox_on(Recording(), clock, tmp_path)
    assert list(restored) == [(f"{B}/sensor/x/state", b"1", True)]
    (said,) = logs  # one line for the file
    assert said["skipped"] == 7 and said["not_ours"][0] == "homeassistant/switch/evil/config"
    assert not buffer.exists()


def test_a_buffer_file_of_one_endless_line_is_read_in_bounded_memory(tmp_path) -> None:
    buffer, clock = tmp_path / "outbox.jsonl", [0.0]
    with open(buffer, "wb") as f:  # just under the file's ceiling, and no newline in it
        f.write(b"[" * (outbox_module.MAX_FILE_BYTES - 1024))
    tracemalloc.start()
    try:
        with capture_logs() as logs:
            restored = outbox_on(Recording(), clock, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert list(restored) == [] and [(e["event"], e["skipped"]) for e in logs] == [("telemetry_restored", 1)]
    assert peak < 4 * outbox_module.MAX_LINE_BYTES  # a line at a time, never the file


def test_an_oversized_buffer_file_is_refused_in_one_line_and_kept_aside(tmp_path, monkeypatch) -> None:
    buffer, clock = tmp_path / "outbox.jsonl", [0.0]
    monkeypatch.setattr(outbox_module, "MAX_FILE_BYTES", 1000)
    buffer.write_text((json.dumps([f"{B}/sensor/x/state", "1", True]) + "\n") * 100)
    with capture_logs() as logs:
        restored = outbox_on(Recording(), clock, tmp_path)
    assert list(restored) == []
    (said,) = logs
    assert said["event"] == "telemetry_buffer_refused" and said["bytes"] > 1000
    assert not buffer.exists() and (tmp_path / "outbox.jsonl.refused").exists()  # not read again at each start


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_buffer_file_that_is_no_regular_file_is_skipped_in_one_line(tmp_path, kind: str) -> None:
    """Read at start-up, in Daemon.__init__: the open of a FIFO nothing writes to waited for good, and /dev/zero
    was read for good (a line at a time, none ending); neither is a buffer of ours, and it is left as it is."""
    buffer = tmp_path / "outbox.jsonl"
    os.mkfifo(buffer) if kind == "fifo" else buffer.symlink_to("/dev/zero")
    restored: list[tuple[Outbox, list[Any]]] = []

    def restore() -> None:
        with capture_logs() as logs:
            restored.append((outbox_on(Recording(), [0.0], tmp_path), logs))

    thread = threading.Thread(target=restore, daemon=True)
    thread.start()
    thread.join(timeout=60)
    if thread.is_alive() and kind == "fifo":  # a writer's open and close: the end of the file, and it returns
        os.close(os.open(buffer, os.O_WRONLY | os.O_NONBLOCK))
    assert not thread.is_alive() and restored, f"the outbox's restore of a {kind} did not return"
    outbox, logs = restored[0]
    assert list(outbox) == [] and [(e["event"], e["error"]) for e in logs] == [
        ("telemetry_restore_failed", "not a regular file")]
    assert buffer.is_fifo() if kind == "fifo" else buffer.is_symlink()


def test_a_fifo_where_the_buffer_is_written_fails_the_save_in_one_line_and_the_stop_goes_on(tmp_path) -> None:
    """The save's open of `<file>.partial` waited for a reader for good, at the stop, with pins still held."""
    outbox = outbox_on(Recording(), [0.0], tmp_path)
    outbox.put_state("s/a", b"1")
    os.mkfifo(tmp_path / "outbox.jsonl.partial")
    thread = threading.Thread(target=outbox.save, daemon=True)
    with capture_logs() as logs:
        thread.start()
        thread.join(timeout=60)
    if thread.is_alive():  # a reader's open and close: it returns
        os.close(os.open(tmp_path / "outbox.jsonl.partial", os.O_RDONLY | os.O_NONBLOCK))
    assert not thread.is_alive(), "the save waited on the FIFO for a reader"
    assert [(e["event"], e["error"]) for e in logs] == [
        ("telemetry_save_failed", f"[Errno 6] is a FIFO that nothing reads: '{tmp_path / 'outbox.jsonl.partial'}'")]


def test_refusals_fire_once_per_hold_and_for_each_refusal_and_failsafe() -> None:
    refusals = Refusals(wall=lambda: 1_800_000_000.0)
    hold = Hold("heater", "min_off", "switched 1.0 s ago, minimum 60 s", "thermostat", 59.0)
    (first,) = refusals.after_tick([hold], [])
    assert (first.event_type, first.rule, first.owner) == ("held", "min_off", "thermostat")
    assert first.until == "2027-01-15T08:00:59+00:00" and first.at == "2027-01-15T08:00:00+00:00"
    assert refusals.after_tick([hold], []) == []  # still held: no news
    assert refusals.after_tick([hold, Hold("lamp", "max_rate", "ramping", "operator")], []) == []  # on its way
    refused = Answer("t/result", False, "out_of_range", "angle 500 is above 180", device="servo", refused=True)
    held = Answer("t/result", False, "min_off", "held by the safety rules", device="heater")  # told as a hold
    refusals.failsafe(Failsafe("heater", "thermostat", "plugin 'thermostat' failed"))
    fired = refusals.after_tick([hold], [refused, held])
    assert [(r.device, r.event_type) for r in fired] == [("heater", "failsafe"), ("servo", "refused")]
    assert refusals.last["heater"].event_type == "failsafe" and refusals.last["servo"].rule == "out_of_range"
    assert [r.event_type for r in refusals.after_tick([], []) + refusals.after_tick([hold], [])] == ["held"]  # again


def test_an_unchanged_state_goes_out_again_before_its_heartbeat_is_over_whatever_the_ticks_jitter(tmp_path) -> None:
    """Virtual time: ticks at 10 Hz, each up to 0.45 of a period late (a loaded machine), a sensor whose
    value never moves. No two of its states are further apart than the heartbeat (the first tick after
    the heartbeat made that up to 2.1 s with 2 s), and it is not sent much more often than that either."""
    data = example_data()
    data["mqtt"] = {"enabled": True, "node_id": "t", "heartbeat_s": 2.0}
    settings = config.parse(yaml.safe_dump(data), tmp_path / "c.yaml")
    period, heartbeat = settings.loop.period, settings.mqtt.heartbeat_s
    clock = [0.0]
    sender = Recording()
    sender.up = True
    outbox = Outbox(settings.mqtt, sender, lambda: clock[0])
    status = SimpleNamespace(settings=settings, readings=lambda: [Reading("temperature", 20.0, "C", clock[0])],
                             actuator_states=dict, plugin_states=dict, guards=dict, loop_state=lambda: None,
                             values_written=lambda: True)
    policy = PublishPolicy(settings, cast(Status, status), cast(Operator, SimpleNamespace(overrides=dict)), outbox,
                           wall=lambda: clock[0])
    topic, jitter, sent = f"{B}/sensor/temperature/state", random.Random(28), []
    for tick in range(600):
        clock[0] = tick * period + jitter.uniform(0.0, 0.45 * period)
        before = len(sender.sent)
        policy.collect(clock[0], {})
        outbox.pump()
        sent += [clock[0] for message in sender.sent[before:] if message.topic == topic]
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert len(sent) > 25 and max(gaps) <= heartbeat, max(gaps)
    assert min(gaps) >= heartbeat - 2 * period, min(gaps)


def test_a_plugin_state_showing_an_operators_value_waits_until_the_value_is_on_disk(tmp_path) -> None:
    data = example_data()
    data["mqtt"] = {"enabled": True, "node_id": "t"}
    settings = config.parse(yaml.safe_dump(data), tmp_path / "c.yaml")
    sender, written, clock = Recording(), [False], [0.0]
    sender.up = True
    outbox = Outbox(settings.mqtt, sender, lambda: clock[0])
    state = {"state": "loaded", "enabled": True, "config": {"setpoint": 19.5}, "sha256": None, "candidate": None,
             "rollout": None}
    status = SimpleNamespace(readings=list, actuator_states=dict, plugin_states=lambda: {"thermostat": state},
                             guards=dict, loop_state=lambda: None, values_written=lambda: written[0], thermostats=dict)
    policy = PublishPolicy(settings, cast(Status, status), cast(Operator, SimpleNamespace(overrides=dict)), outbox)
    for now in (1.0, 1.1, 1.2, 1.3):
        clock[0], written[0] = now, now >= 1.2
        policy.collect(now, {})
        outbox.pump()
        assert [m.topic for m in sender.sent].count(f"{B}/plugin/thermostat/state") == (now >= 1.2)


def test_a_record_of_the_former_place_that_is_no_regular_file_is_set_aside_without_waiting(tmp_path: Path) -> None:
    """A FIFO where the record of the last place should be (a state directory tampered with): opened as a file,
    it would hold the daemon's start up for good, before any tick or watchdog."""
    os.mkfifo(tmp_path / former_node.RECORD)
    built: list[former_node.FormerNode] = []
    with capture_logs() as events:
        start = threading.Thread(target=lambda: built.append(
            former_node.FormerNode(MqttSettings(node_id="new"), tmp_path, lambda topics: None)), daemon=True)
        start.start()
        start.join(timeout=30)
    assert built and built[0].before == [], "the start waited on the FIFO"
    assert [e["event"] for e in events] == ["mqtt_place_unreadable"]
    assert (tmp_path / former_node.RECORD).is_file()  # replaced by the record of now


def test_a_former_place_that_shares_the_discovery_configs_of_now_sweeps_only_its_base(tmp_path: Path) -> None:
    """Only the base topic changed: the node id's discovery configs are this run's, and the leftovers' clean-up
    (under the same filter) keeps them; the former place's row in its stead would take that filter over."""
    old = MqttSettings(base_topic="old", node_id="pi")
    former_node.FormerNode(old, tmp_path, lambda topics: None)
    now = former_node.FormerNode(MqttSettings(base_topic="new", node_id="pi"), tmp_path, lambda topics: None)
    assert set(now.routes()) == {f"{former_node.Place.of(old).base}/#"}


def test_the_former_place_is_forgotten_only_once_a_sweep_finds_nothing_of_it_left(tmp_path: Path) -> None:
    """A sweep's emptying is only queued when the sweep is over: a SIGKILL or a power cut before the broker took it
    leaves the old place's messages retained. So the record still names the old place after a sweep that had
    something to empty; the next start sweeps it again, and forgets it once that sweep finds nothing left."""
    old = "pi-controller/old/sensor/t/state"
    former_node.FormerNode(MqttSettings(node_id="old"), tmp_path, lambda topics: None)  # a run under the old id
    emptied: list[list[str]] = []
    for found in ([old], [old], []):  # the first run stopped before its emptying went out; the second's did
        start = former_node.FormerNode(MqttSettings(node_id="new"), tmp_path, emptied.append)
        assert start.routes(), emptied  # the old place is swept at this start
        for topic in found:
            start._retained(Inbound(topic, b'{"value": 1}', True, ()))
        start.swept()
        assert start.before == []  # once in a run
    assert emptied == [[old], [old], []]
    assert former_node.FormerNode(MqttSettings(node_id="new"), tmp_path, emptied.append).routes() == {}


def test_the_former_place_another_pi_says_online_under_is_left_and_forgotten(tmp_path: Path) -> None:
    """Another Pi runs under the old id: its topics are its own, nothing is emptied, and the old place is forgotten
    at once (never swept again, at this start or the next)."""
    former_node.FormerNode(MqttSettings(node_id="old"), tmp_path, lambda topics: None)
    emptied: list[list[str]] = []
    start = former_node.FormerNode(MqttSettings(node_id="new"), tmp_path, emptied.append)
    start._retained(Inbound("pi-controller/old/status", b"online", True, ()))
    start._retained(Inbound("pi-controller/old/sensor/t/state", b'{"value": 1}', True, ()))
    start.swept()
    again = former_node.FormerNode(MqttSettings(node_id="new"), tmp_path, emptied.append)
    assert emptied == [] and again.routes() == {}


@pytest.mark.parametrize("said_by", ["this install", "another install", "an older pi-controller"])
def test_an_online_under_the_former_place_is_told_apart_by_the_install_that_said_it(tmp_path: Path,
                                                                                  said_by: str) -> None:
    """A broker that crashed while the node was connected comes back with its `online` (no last will said it was
    gone): said by this install (its `instance`), it is swept as an `offline` is; said by another install, or with
    no instance at all (an older pi-controller's), another Pi runs under the old id and its topics are left."""
    ours = former_node.FormerNode(MqttSettings(node_id="old"), tmp_path, lambda topics: None).instance
    assert ours != former_node.FormerNode(MqttSettings(node_id="old"), tmp_path / "copy", lambda t: None).instance
    emptied: list[list[str]] = []
    start = former_node.FormerNode(MqttSettings(node_id="new"), tmp_path, emptied.append)
    assert start.instance == ours  # kept in the record: what a broker's old autosave holds is still this install's
    start._retained(Inbound("pi-controller/old/status", b"online", True, ()))
    instance = {"this install": ours, "another install": "0123456789abcdef", "an older pi-controller": None}[said_by]
    if instance is not None:
        start._retained(Inbound("pi-controller/old/instance", instance.encode(), True, ()))
    start._retained(Inbound("pi-controller/old/sensor/t/state", b'{"value": 1}', True, ()))
    start.swept()
    ours_left = ["pi-controller/old/instance", "pi-controller/old/sensor/t/state", "pi-controller/old/status"]
    assert [sorted(topics) for topics in emptied] == ([ours_left] if said_by == "this install" else [])


def test_a_place_between_two_renames_is_swept_though_the_first_was_not_yet_found_empty(tmp_path: Path) -> None:
    """A node id changed twice (a typo fixed: 'old', then 'greenhous', then 'greenhouse') while the record still
    named the first place, its emptying not yet found done: the place in between was never recorded, and what the
    node published there (its status, states, discovery configs) was left retained for good."""
    former_node.FormerNode(MqttSettings(node_id="old"), tmp_path, lambda topics: None)  # a run under the old id
    emptied: list[list[str]] = []
    typo = former_node.FormerNode(MqttSettings(node_id="greenhous"), tmp_path, emptied.append)
    typo._retained(Inbound("pi-controller/old/sensor/t/state", b'{"value": 1}', True, ()))
    typo.swept()  # its emptying only queued: the old place is swept again at the next start
    fixed = former_node.FormerNode(MqttSettings(node_id="greenhouse"), tmp_path, emptied.append)
    assert set(fixed.routes()) >= {"pi-controller/old/#", "pi-controller/greenhous/#"}
    fixed._retained(Inbound("pi-controller/greenhous/status", b"offline", True, ()))
    fixed._retained(Inbound("pi-controller/greenhous/sensor/t/state", b'{"value": 1}', True, ()))
    fixed.swept()
    assert sorted(emptied[-1]) == ["pi-controller/greenhous/sensor/t/state", "pi-controller/greenhous/status"]
    again = former_node.FormerNode(MqttSettings(node_id="greenhouse"), tmp_path, emptied.append)
    assert set(again.routes()) == {"pi-controller/greenhous/#", "homeassistant/+/greenhous/+/config"}
    again.swept()  # nothing of it left: forgotten, the old one with it (found empty at the start before)
    assert former_node.FormerNode(MqttSettings(node_id="greenhouse"), tmp_path, emptied.append).routes() == {}
