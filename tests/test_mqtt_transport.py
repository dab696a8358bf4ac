"""MQTT transport, command results and lifecycle against a real mosquitto: secrets from files, TLS with
certificates made here, connection failures said once, every command answered, read-only mode, the
shut-down states, clean-up of what is ours only, and the rate cap keeping the latest value per topic."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import shutil
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from pi_controller import config
from pi_controller.clock import VirtualClock
from pi_controller.daemon import Daemon
from tests import test_mqtt
from tests.conftest import REPO, example_data, free_port, skip_unless_ci
from tests.test_mqtt import (
    BASE,
    NODE,
    Broker,
    Subscriber,
    daemon_config,
    finish,
    needs_mosquitto,
    poll,
    start_daemon,
    state,
)

broker, subscriber = test_mqtt.broker, test_mqtt.subscriber  # its fixtures: a broker, and a client recording it all

CLIENT_ID = f"pi-controller-{NODE}"


class ConfiguredBroker(Broker):
    """mosquitto with listener options of the test's (auth, TLS) and a log file to read what it saw."""

    def __init__(self, folder: Path, options: str):
        super().__init__(folder)
        self.log = folder / "mosquitto.log"
        # `user root`: started as root, mosquitto would otherwise drop to its own user, which cannot write
        # the log here (as any other user it means nothing).
        self.conf.write_text(f"listener {self.port} 127.0.0.1\n{options}\nuser root\nlog_dest file {self.log}\n"
                             "log_type all\n")

    def logged(self, text: str) -> int:
        return self.log.read_text(errors="replace").count(text) if self.log.exists() else 0


def events_named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name]


# -- secrets ------------------------------------------------------------------------------------------------


@needs_mosquitto
def test_a_password_from_password_file_is_accepted_and_a_wrong_one_refused_and_said_once(tmp_path) -> None:
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "pi", "correct horse"], check=True)
    broker = ConfiguredBroker(tmp_path, f"allow_anonymous false\npassword_file {passwords}")
    broker.start()
    try:
        (tmp_path / "right").write_text("correct horse\n")  # as an editor leaves it: the newline is not in it
        (tmp_path / "wrong").write_text("battery staple\n")
        good = daemon_config(tmp_path, broker.port, username="pi", password_file=str(tmp_path / "right"))
        out, events = finish(start_daemon(good, "--ticks", "20"), stop=False)
        assert events_named(events, "mqtt_connected") and not events_named(events, "mqtt_connect_failed")
        bad = daemon_config(tmp_path, broker.port, username="pi", password_file=str(tmp_path / "wrong"))
        process = start_daemon(bad, "--ticks", "60")  # paho retries 1 and 2 s apart: three attempts or more
        out, events = finish(process, stop=False)
    finally:
        broker.stop()
    telemetry = json.loads(out)["telemetry"]
    assert telemetry["connected"] is False and telemetry["connect_failures"] >= 2
    (failed,) = events_named(events, "mqtt_connect_failed")  # once, not at every retry
    assert failed["reason"] == telemetry["connect_error"] == "refused by the broker: Not authorized"
    assert "battery" not in json.dumps(events)


# -- TLS and connection failures ------------------------------------------------------------------------------


def openssl(*args: str) -> None:
    if not shutil.which("openssl"):
        skip_unless_ci("no openssl command to make the test's certificates: install Debian's openssl")
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost signed by it, a client certificate with an encrypted key,
    and a second CA that signed nothing of these."""
    folder.mkdir()
    p = {name: folder / name for name in ("ca.crt", "ca.key", "other-ca.crt", "other-ca.key", "server.crt",
                                          "server.key", "client.crt", "client.key", "san.ext", "key-password")}
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", *ec, "-nodes", "-keyout", str(p[f"{ca}.key"]), "-out", str(p[f"{ca}.crt"]),
                "-subj", f"/CN=test {ca}", "-days", "2")
    p["san.ext"].write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    p["key-password"].write_text("key passphrase\n")
    for name, extra in (("server", ["-nodes"]), ("client", ["-passout", "pass:key passphrase"])):
        csr = folder / f"{name}.csr"
        openssl("req", *ec, *extra, "-keyout", str(p[f"{name}.key"]), "-out", str(csr), "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", str(csr), "-CA", str(p["ca.crt"]), "-CAkey", str(p["ca.key"]),
                "-CAcreateserial", "-out", str(p[f"{name}.crt"]), "-days", "2", "-extfile", str(p["san.ext"]))
    return p


@needs_mosquitto
@pytest.mark.slow  # certificates made, three brokers with TLS
def test_mutual_tls_connects_and_an_untrusted_ca_or_no_client_certificate_is_said_once(tmp_path) -> None:
    certs = certificates(tmp_path / "certs")
    broker = ConfiguredBroker(tmp_path, f"allow_anonymous true\ncafile {certs['ca.crt']}\n"
                                        f"certfile {certs['server.crt']}\nkeyfile {certs['server.key']}\n"
                                        "require_certificate true")
    client = {"cert_file": str(certs["client.crt"]), "key_file": str(certs["client.key"]),
              "key_password_file": str(certs["key-password"])}
    broker.start()
    results = {}
    try:
        for case, tls in [("mutual", {"ca_file": str(certs["ca.crt"]), **client}),
                          ("untrusted", {"ca_file": str(certs["other-ca.crt"]), **client}),
                          ("no client certificate", {"ca_file": str(certs["ca.crt"])})]:
            (tmp_path / case).mkdir()
            path = daemon_config(tmp_path / case, broker.port, tls=tls, discovery=False)
            ticks = "20" if case == "mutual" else "60"  # failures: time for three attempts or more
            out, events = finish(start_daemon(path, "--ticks", ticks), stop=False)
            results[case] = json.loads(out)["telemetry"], events
    finally:
        broker.stop()
    telemetry, events = results["mutual"]
    assert events_named(events, "mqtt_connected") and telemetry["connect_failures"] == 0
    assert broker.logged("New client connected from 127.0.0.1") >= 1
    for case, expected in [("untrusted", "certificate verify failed"),
                           ("no client certificate", "want a client certificate")]:
        telemetry, events = results[case]
        assert telemetry["connected"] is False and telemetry["connect_failures"] >= 2, case
        (failed,) = events_named(events, "mqtt_connect_failed")  # once, not at every retry
        assert expected in failed["reason"] and failed["reason"] == telemetry["connect_error"], (case, failed)
        assert not events_named(events, "mqtt_connected")


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return response.read().decode()
    except OSError:
        return ""  # not serving yet


@contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port held bound and not listening: while this is held, a connection to it is refused. A port
    that was only free when looked up (`free_port`) may meanwhile be another test's broker's, or the source
    port the kernel picks for the connection to it, which then connects to itself (TCP's simultaneous open)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


@pytest.mark.slow  # no broker there: the link retries until the failure is said
@pytest.mark.parametrize("host, expected", [("127.0.0.1", "ConnectionRefusedError"),
                                            ("no-such-host.invalid", "gaierror")])
def test_a_refused_connection_or_an_unknown_host_is_said_once_and_counted_in_metrics(tmp_path, host,
                                                                                     expected) -> None:
    with refused_port() as port:  # nothing listens there, for as long as the daemon tries
        path = daemon_config(tmp_path, port, host=host, discovery=False)
        data = yaml.safe_load(path.read_text())
        data["metrics"] = {"enabled": True, "port": (metrics := free_port())}
        path.write_text(yaml.safe_dump(data))
        process = start_daemon(path)
        try:
            failures = re.compile(r"^pi_controller_mqtt_connect_failures_total ([0-9.]+)$", re.MULTILINE)
            text = poll(lambda: (m := failures.search(t := scrape(metrics))) and float(m.group(1)) >= 3 and t,
                        "three failed attempts counted")
            assert "\npi_controller_mqtt_connected 0.0\n" in text
        finally:
            _, events = finish(process)
    (failed,) = events_named(events, "mqtt_connect_failed")  # once for three attempts and more
    assert failed["reason"].startswith(expected) and failed["host"] == host


def exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        data += sock.recv(count - len(data)) or pytest.fail("closed mid-packet")
    return data


def packet(sock: socket.socket) -> bytes:
    """One MQTT packet read from `sock`: its first byte, its remaining length (a varint), the rest."""
    head = exactly(sock, 1)
    length, shift = 0, 0
    while True:
        byte = exactly(sock, 1)
        head += byte
        length += (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            return head + exactly(sock, length)


def relay(source: socket.socket, to: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            to.sendall(data)
        to.shutdown(socket.SHUT_WR)


def dropped_after_connack(client: socket.socket, upstream: socket.socket) -> None:
    """The connection ended as soon as the broker's CONNACK is passed on, nothing of the client's past its CONNECT
    let through: a link lost between the broker's accepting it and its acknowledging `online`."""
    upstream.sendall(packet(client))  # CONNECT
    client.sendall(exactly(upstream, 4))  # CONNACK, accepted
    client.shutdown(socket.SHUT_WR)


def answers_held_after_connack(client: socket.socket, upstream: socket.socket) -> None:
    """All the client sends passed on; of the broker's answers, its CONNACK alone: `online` reaches the broker,
    its acknowledgement never reaches the client (until the client closes the connection)."""
    upstream.sendall(packet(client))  # CONNECT
    client.sendall(exactly(upstream, 4))  # CONNACK, accepted
    relay(client, upstream)


@contextmanager
def relayed(port: int, first: Callable[[socket.socket, socket.socket], None]) -> Iterator[int]:
    """A port relaying to the broker at `port`: its first connection as `first` passes it on (the client's
    socket, the broker's), later ones whole."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        for number in itertools.count():
            try:
                client, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            upstream = socket.create_connection(("127.0.0.1", port))
            if number == 0:
                with client, upstream:
                    first(client, upstream)
                continue
            for source, to in ((client, upstream), (upstream, client)):
                threading.Thread(target=relay, args=(source, to), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        listener.close()


@needs_mosquitto
def test_a_link_lost_before_the_broker_acknowledged_online_is_a_failed_attempt_not_a_connection(
        tmp_path, broker, subscriber) -> None:
    """mqtt_connected was said at the broker's CONNACK: a link lost before `online` was acknowledged (the link's
    own test of being connected) was then 'closed before the broker answered', after 'connected'."""
    with relayed(broker.port, dropped_after_connack) as port:
        process = start_daemon(daemon_config(tmp_path, port, discovery=False))
        try:  # states go out once connected: through the second connection
            subscriber.wait_for(lambda: subscriber.on(f"{BASE}/actuator/relay_switch/state"), 60)
        finally:
            _, events = finish(process)
    (failed,) = events_named(events, "mqtt_connect_failed")
    assert "before it acknowledged online" in failed["reason"], failed
    (connected,) = events_named(events, "mqtt_connected")
    assert events.index(failed) < events.index(connected)


@needs_mosquitto
def test_a_daemon_stopped_before_the_broker_acknowledged_online_says_offline(tmp_path, broker, subscriber) -> None:
    """Stopped once the broker had its `online` but before the acknowledgement came (not connected yet), it said
    nothing: its clean DISCONNECT sends no last will, so `online` stayed retained and Home Assistant showed the
    entities of a stopped daemon available."""
    with relayed(broker.port, answers_held_after_connack) as port:
        process = start_daemon(daemon_config(tmp_path, port, discovery=False))
        try:
            subscriber.wait_for(lambda: subscriber.on(f"{BASE}/status")[-1:] == [b"online"], 60)
        finally:
            _, events = finish(process)
    assert not events_named(events, "mqtt_connected")  # the acknowledgement was held: it never was connected
    subscriber.wait_for(lambda: subscriber.on(f"{BASE}/status")[-1:] == [b"offline"])


# -- command results ------------------------------------------------------------------------------------------


def result(sub: Subscriber, command_topic: str) -> dict[str, Any] | None:
    return state(sub, f"{command_topic}/result")


def test_every_command_is_answered_on_its_result_topic(tmp_path, broker, subscriber) -> None:
    path = daemon_config(tmp_path, broker.port)
    data = yaml.safe_load(path.read_text())
    relay = next(a for a in data["actuators"] if a["id"] == "relay_switch")
    relay["min_off_s"] = 3600  # start-up counts as a switch: an hour before it may come on
    data["plugins"]["settings"]["temperature_control"]["enabled"] = False  # the operator alone asks
    path.write_text(yaml.safe_dump(data))
    process = start_daemon(path)
    commands = [("actuator/led_strip/set", '{"state": "ON", "brightness": 40}'),  # applied
                ("actuator/servo_motor/set", "200"),  # refused at validation
                ("actuator/relay_switch/set", "ON"),  # held by a safety rule
                ("actuator/led_strip/release", ""),
                ("plugin/motion_light/enable", "maybe"),  # refused before it reaches the tick
                ("plugin/nope/enable", "OFF"),
                ("plugin/energy_saver/config/bright_lux/set", "600"),
                ("plugin/energy_saver/config/bright_lux/set", "x" * 20_000)]
    answers: list[dict[str, Any]] = []
    try:
        subscriber.wait_for(lambda: state(subscriber, f"{BASE}/actuator/led_strip/state"))
        for topic, payload in commands:  # one at a time: each answered once, on its own topic
            reply = f"{BASE}/{topic}/result"
            seen = len(subscriber.on(reply))
            subscriber.publish(f"{BASE}/{topic}", payload)
            subscriber.wait_for(lambda reply=reply, seen=seen: len(subscriber.on(reply)) > seen)
            answers.append(json.loads(subscriber.on(reply)[-1]))
    finally:
        finish(process)
    assert all(set(a) == {"ok", "rule", "reason", "applied"} for a in answers)
    assert [(a["ok"], a["rule"]) for a in answers] == [
        (True, None), (False, "out_of_range"), (False, "min_off"), (True, None), (False, "malformed"),
        (False, "unknown_plugin"), (True, None), (False, "too_large")]
    led, servo, held = answers[:3]
    assert led["applied"]["duty_cycle"] == 40.0 and led["applied"]["on"] is True
    assert "200" in servo["reason"] and servo["applied"] is None
    assert held["applied"]["on"] is False and "minimum 3600 s" in held["reason"]
    assert answers[6]["applied"] == {"bright_lux": 600}
    results = [(t, r) for t, _, r in subscriber.messages if t.endswith("/result")]
    assert len(results) == len(commands) and not any(r for _, r in results)  # one each, never retained


# -- read-only mode -------------------------------------------------------------------------------------------


@needs_mosquitto
def test_read_only_mode_advertises_no_commands_and_subscribes_to_no_command_topic(tmp_path) -> None:
    broker = ConfiguredBroker(tmp_path, "allow_anonymous true")
    broker.start()
    sub = Subscriber(broker.port)
    try:
        sub.subscribed.wait(15)
        finish(start_daemon(daemon_config(tmp_path, broker.port, commands=False), "--ticks", "20"), stop=False)
        sub.wait_for(lambda: sub.on(f"{BASE}/status")[-1:] == [b"offline"])
        configs = {t: json.loads(p) for t, p, _ in sub.messages if t.endswith("/config") and p}
        emptied = {t for t, p, _ in sub.messages if t.endswith("/config") and not p}
    finally:
        sub.close()
        broker.stop()
    prefix = f"homeassistant/%s/{NODE}/%s/config"
    assert len(configs) >= 10 and not [t for t, c in configs.items() if "command_topic" in c]
    assert not [t for t in configs if t.startswith(("homeassistant/button/", "homeassistant/number/"))]
    led = configs[prefix % ("binary_sensor", "led_strip")]  # the light, as a sensor of its state
    assert led["state_topic"] == f"{BASE}/actuator/led_strip/state" and led["json_attributes_topic"]
    assert configs[prefix % ("sensor", "servo_motor")]["value_template"] == "{{ value_json.angle }}"
    # what a commandable run left retained goes, named (whatever the sweep finds)
    assert {prefix % ("light", "led_strip"), prefix % ("number", "servo_motor"), prefix % ("switch", "relay_switch"),
            prefix % ("switch", "plugin_motion_light_enabled")} <= emptied
    assert broker.logged("New client connected from 127.0.0.1") >= 2 and broker.logged(f"as {CLIENT_ID}")
    assert broker.logged("Received SUBSCRIBE from test-subscriber") >= 1  # the log sees subscriptions
    # No command topic: only its own retained configs and states, each until the broker acknowledged it.
    log = broker.log.read_text(errors="replace")
    subscribed = set(re.findall(rf"^\d+: {CLIENT_ID} 0 (\S+)$", log, re.MULTILINE))
    assert subscribed == {f"homeassistant/+/{NODE}/+/config"} | {f"{BASE}/{kind}/+/state"
                                                                for kind in ("sensor", "actuator", "plugin")}
    assert set(re.findall(rf"^\d+: {CLIENT_ID} (\S+)$", log, re.MULTILINE)) == subscribed  # unsubscribed


@needs_mosquitto
def test_commands_mode_sweeps_its_retained_configs_as_read_only_mode_does(tmp_path) -> None:
    """The discovery configs' filter was subscribed for the whole run with commands: every config the daemon sent
    came back to it, and anything published there later was taken in, where read-only mode swept it."""
    broker = ConfiguredBroker(tmp_path, "allow_anonymous true")
    broker.start()
    try:
        finish(start_daemon(daemon_config(tmp_path, broker.port), "--ticks", "20"), stop=False)
    finally:
        broker.stop()
    log = broker.log.read_text(errors="replace")
    configs = re.escape(f"homeassistant/+/{NODE}/+/config")
    assert re.search(rf"^\d+: {CLIENT_ID} 0 {configs}$", log, re.MULTILINE)  # QoS 0: a sweep's
    assert not re.search(rf"^\d+: {CLIENT_ID} [12] {configs}$", log, re.MULTILINE)  # never the lasting one
    assert re.search(rf"^\d+: {CLIENT_ID} {configs}$", log, re.MULTILINE)  # unsubscribed once acknowledged


# -- lifecycle ------------------------------------------------------------------------------------------------


def late_retained(port: int, topic: str, present: str) -> list[bytes]:
    """What a subscriber arriving now gets on `topic`, once `present` (retained) has come. The broker sends
    retained messages in no set order: a topic expected to be there is its own `present`; another one only
    suits a topic expected to be absent."""
    late = Subscriber(port, "late-subscriber")
    try:
        late.wait_for(lambda: late.on(present))  # retained messages come in one go, on subscribing
        return late.on(topic)
    finally:
        late.close()


def test_a_clean_stop_leaves_the_shut_down_states_retained_before_going_offline(tmp_path, broker, subscriber) -> None:
    process = start_daemon(daemon_config(tmp_path, broker.port))
    led = f"{BASE}/actuator/led_strip"
    try:
        subscriber.wait_for(lambda: state(subscriber, f"{led}/state"))
        subscriber.publish(f"{led}/set", json.dumps({"state": "ON", "brightness": 80}))
        subscriber.wait_for(lambda: (s := state(subscriber, f"{led}/state")) and s["on"] and s["override"])
        subscriber.wait_for(lambda: (s := state(subscriber, f"{BASE}/actuator/relay_switch/state")) and s["on"])
    finally:
        finish(process)  # SIGTERM
    subscriber.wait_for(lambda: subscriber.on(f"{BASE}/status")[-1:] == [b"offline"])
    topics = [t for t, _, _ in subscriber.messages]
    offline = len(topics) - 1 - topics[::-1].index(f"{BASE}/status")
    for device in ("led_strip", "relay_switch"):  # on before the stop, off after it
        topic = f"{BASE}/actuator/{device}/state"
        last = len(topics) - 1 - topics[::-1].index(topic)
        assert last < offline, device  # said before going offline
        final = json.loads(subscriber.on(topic)[-1])
        assert (final["on"], final["owner"], final["failsafe"]) == (False, "safety", "the daemon stopped")
        retained = late_retained(broker.port, topic, topic)
        assert json.loads(retained[-1])["on"] is False, device  # what a dashboard opened now sees
    assert json.loads(subscriber.on(f"{led}/state")[-1])["state"] == "OFF"  # Home Assistant's light too


def without(config_path: Path, actuator: str) -> None:
    data = yaml.safe_load(config_path.read_text())
    data["actuators"] = [a for a in data["actuators"] if a["id"] != actuator]
    data["simulation"] = [m for m in data["simulation"] if actuator not in m.values()]
    config_path.write_text(yaml.safe_dump(data))


def test_a_device_removed_from_the_config_leaves_no_retained_state(tmp_path, broker, subscriber) -> None:
    config_path = daemon_config(tmp_path, broker.port, discovery=False)
    servo = f"{BASE}/actuator/servo_motor/state"
    finish(start_daemon(config_path, "--ticks", "10"), stop=False)
    assert subscriber.wait_for(lambda: subscriber.on(servo))[-1] != b""
    elsewhere = "pi-controller/another-pi/actuator/servo_motor/state"  # not ours: left alone
    subscriber.client.publish(elsewhere, b'{"on": false}', qos=1, retain=True).wait_for_publish(5)
    without(config_path, "servo_motor")
    finish(start_daemon(config_path, "--ticks", "20"), stop=False)
    subscriber.wait_for(lambda: subscriber.on(servo)[-1] == b"")  # an empty retained message removes it
    assert late_retained(broker.port, servo, f"{BASE}/actuator/relay_switch/state") == []
    assert late_retained(broker.port, elsewhere, f"{BASE}/status") == []  # the late one subscribes to ours only
    other = Subscriber(broker.port, "other-subscriber")
    try:
        other.client.subscribe(elsewhere, 1)
        assert other.wait_for(lambda: other.on(elsewhere)) == [b'{"on": false}']
    finally:
        other.close()


def test_discovery_clean_up_leaves_another_integrations_config_alone(tmp_path, broker, subscriber) -> None:
    foreign = f"homeassistant/sensor/{NODE}/zigbee_temperature/config"  # another integration, same node id
    ours = f"homeassistant/sensor/{NODE}/old_sensor/config"  # an entity of ours no longer configured
    for topic, identifiers in ((foreign, ["zigbee2mqtt_0x00158d0001"]), (ours, [f"pi-controller-{NODE}"])):
        payload = json.dumps({"name": "t", "state_topic": "x/y", "device": {"identifiers": identifiers}})
        subscriber.client.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
    finish(start_daemon(daemon_config(tmp_path, broker.port), "--ticks", "20"), stop=False)
    subscriber.wait_for(lambda: subscriber.on(ours)[-1:] == [b""])
    assert late_retained(broker.port, ours, f"homeassistant/switch/{NODE}/relay_switch/config") == []
    left = late_retained(broker.port, foreign, foreign)
    assert json.loads(left[-1])["device"]["identifiers"] == ["zigbee2mqtt_0x00158d0001"]
    assert subscriber.on(foreign)[-1] != b""  # never emptied, not even for a moment


# -- the rate cap ---------------------------------------------------------------------------------------------


def serve_in_process(tmp_path: Path, port: int, ticks_offline: int, ticks: int, **mqtt: Any) -> Daemon:
    """A daemon on a virtual clock (time is ticks: exact, whatever the load): `ticks_offline` ticks before
    it connects, `ticks` after, then a clean stop. Closed; its telemetry and loop are left to read."""
    settings = config.load(daemon_config(tmp_path, port, discovery=False, **mqtt))
    clock = VirtualClock()
    daemon = Daemon(settings, simulate=True, clock=clock)
    telemetry = daemon.telemetry
    assert telemetry is not None

    async def run(count: int) -> None:
        await daemon.loop.run(asyncio.Event(), daemon.loop.ticks.count + count)
        clock.advance(daemon.loop.period)  # a run starts at once: the next tick is a period later

    try:
        asyncio.run(run(ticks_offline))
        telemetry.start()
        poll(lambda: telemetry.summary()["connected"], "connected")
        asyncio.run(run(ticks))
        daemon.hardware.settle("shutdown", "stopping")
        telemetry.stop()
    finally:
        daemon.close()
    return daemon


def test_the_rate_cap_sends_the_latest_value_of_each_topic_not_a_queue(tmp_path, broker, subscriber) -> None:
    cap, ticks = 5, 300  # 30 s of virtual time; the light changes every tick (deadband 0)
    daemon = serve_in_process(tmp_path, broker.port, 0, ticks, deadband={"light_sensor": 0.0},
                              max_messages_per_s=cap)
    subscriber.wait_for(lambda: subscriber.on(f"{BASE}/status")[-1:] == [b"offline"])
    light = [json.loads(p)["timestamp"] for p in subscriber.on(f"{BASE}/sensor/light_sensor/state")]
    latest = next(r for r in daemon.loop.readings if r.sensor_id == "light_sensor").timestamp
    assert light == sorted(set(light))  # in order, none twice
    assert light[-1] == latest  # the last one sent is the last one read
    coalesced = daemon.telemetry.summary()["coalesced"]
    assert len(light) < ticks / 2 and coalesced > 0  # not every reading: the latest of each
    # A topic waits for at most one turn of every other state topic: never older than that.
    topics = len({t for t, _, r in subscriber.messages if t.endswith("/state")})
    gaps = [b - a for a, b in itertools.pairwise(light)]
    assert max(gaps) <= (topics + 1) / cap + daemon.loop.period
    assert daemon.telemetry.summary()["dropped"] == 0


def test_states_go_out_once_on_the_first_connection_and_loop_state_waits_for_a_measured_rate(
        tmp_path, broker, subscriber) -> None:
    serve_in_process(tmp_path, broker.port, 5, 30)  # states queued before the broker was reached
    subscriber.wait_for(lambda: subscriber.on(f"{BASE}/status")[-1:] == [b"offline"])
    for device in ("led_strip", "relay_switch", "servo_motor"):
        payloads = subscriber.on(f"{BASE}/actuator/{device}/state")
        assert payloads and all(a != b for a, b in itertools.pairwise(payloads)), device  # none sent twice
    (first, *_) = [json.loads(p) for p in subscriber.on(f"{BASE}/loop/state")]
    assert first["rate_hz"] == 10.0  # measured over a second of ticks, not one tick after start-up


def test_a_damaged_outage_buffer_costs_its_bad_lines_not_a_start(tmp_path, write_config) -> None:
    from pi_controller.mqtt.telemetry import Telemetry

    buffer = tmp_path / "outbox.jsonl"
    good = json.dumps(["pi-controller/t/sensor/x/state", '{"value": 1}', False])
    buffer.write_text("\n".join(["5", '["t", 1, true]', '[null, "x", false]', "not json", good]) + "\n")
    data = example_data()
    data["mqtt"] = {"node_id": "t", "buffer_file": str(buffer)}
    daemon = Daemon(config.load(write_config(data)), simulate=True, clock=VirtualClock())
    try:
        telemetry = Telemetry(daemon.settings, daemon.status, daemon.operator)  # a restart: it reads the buffer
        assert list(telemetry.outbox) == [("pi-controller/t/sensor/x/state", b'{"value": 1}', False)]
        assert not buffer.exists()
    finally:
        daemon.close()


def test_the_documented_reconnect_back_off_is_the_one_paho_is_given() -> None:
    from pi_controller.mqtt import link

    text = " ".join((REPO / "docs" / "home-assistant.md").read_text().split())
    assert (f"back-off ({link.RECONNECT_FIRST_S} s, doubling to at most {link.RECONNECT_MAX_S} s between "
            f"tries") in text
