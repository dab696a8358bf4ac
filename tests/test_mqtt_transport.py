"""MQTT transport, command results and lifecycle against a real mosquitto: secrets from files, TLS with
certificates made here, connection failures said once, every command answered, read-only mode, the
shut-down states, clean-up of what is ours only, and the rate cap keeping the latest value per topic."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pi_controller import config
from pi_controller.clock import VirtualClock
from pi_controller.daemon import Daemon
from tests.conftest import free_port
from tests.test_mqtt import (BASE, NODE, Broker, Subscriber, broker, daemon_config, finish,  # noqa: F401 (fixtures)
                             needs_mosquitto, start_daemon, state, subscriber)

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
def test_mutual_tls_connects_and_an_untrusted_ca_or_no_client_certificate_is_said_once(tmp_path) -> None:
    certs = certificates(tmp_path / "certs")
    broker = ConfiguredBroker(tmp_path, f"allow_anonymous true\ncafile {certs['ca.crt']}\ncertfile {certs['server.crt']}"
                                        f"\nkeyfile {certs['server.key']}\nrequire_certificate true")
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
    assert broker.logged(f"New client connected from 127.0.0.1") >= 1
    for case, expected in [("untrusted", "certificate verify failed"), ("no client certificate", "want a client certificate")]:
        telemetry, events = results[case]
        assert telemetry["connected"] is False and telemetry["connect_failures"] >= 2, case
        (failed,) = events_named(events, "mqtt_connect_failed")  # once, not at every retry
        assert expected in failed["reason"] and failed["reason"] == telemetry["connect_error"], (case, failed)
        assert not events_named(events, "mqtt_connected")


@pytest.mark.parametrize("host, expected", [("127.0.0.1", "ConnectionRefusedError"),
                                            ("no-such-host.invalid", "gaierror")])
def test_a_refused_connection_or_an_unknown_host_is_said_once_with_the_reason(tmp_path, host, expected) -> None:
    path = daemon_config(tmp_path, free_port(), host=host, discovery=False)  # nothing listens there
    out, events = finish(start_daemon(path, "--ticks", "60"), stop=False)
    telemetry = json.loads(out)["telemetry"]
    assert telemetry["connect_failures"] >= 2 and json.loads(out)["ticks"]["count"] == 60
    (failed,) = events_named(events, "mqtt_connect_failed")
    assert failed["reason"].startswith(expected) and failed["host"] == host


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
            subscriber.wait_for(lambda: len(subscriber.on(reply)) > seen)
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
