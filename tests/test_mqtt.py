"""MQTT with a real broker on loopback (mosquitto) and a real paho subscriber; the daemon a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import paho.mqtt.client as mqtt
import pytest
import yaml

from benchmarks.flood import until as poll
from pi_controller import config
from pi_controller.mqtt.link import TAKEOVER_COUNT
from tests.conftest import BUNDLED_PLUGINS, example_data, free_port
from tests.test_ha_discovery import render

NODE = "testpi"
BASE = f"pi-controller/{NODE}"

MOSQUITTO = shutil.which("mosquitto") or shutil.which("/usr/sbin/mosquitto")
AMQTT = shutil.which("amqtt", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")

pytestmark = pytest.mark.skipif(not (MOSQUITTO or AMQTT), reason="no broker: install Debian's mosquitto (.ci/run "
                                                                  "does) or amqtt from PyPI")


# Measured with amqtt 0.12.1: no last will on SIGKILL of a client, and no sessions across a restart.
needs_mosquitto = pytest.mark.skipif(not MOSQUITTO, reason="amqtt lacks what this test needs; install mosquitto")


class Broker:
    """A broker process on loopback: Debian's mosquitto (with persistence, so subscriber sessions
    survive a restart), or amqtt from PyPI where mosquitto is not installed."""

    def __init__(self, folder: Path):
        self.port = free_port()
        if MOSQUITTO:
            self.conf = folder / "mosquitto.conf"
            # As root, mosquitto runs as its own user, which cannot write into pytest's folder (mode 700):
            # persistence then fails without a word. `user` has no effect on one started by another user.
            self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                                 f"persistence_location {folder}/\nautosave_interval 1\nuser root\n")
            self.command = [MOSQUITTO, "-c", str(self.conf)]
        else:
            self.conf = folder / "amqtt.yaml"
            self.conf.write_text(yaml.safe_dump({
                "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
                "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}))
            self.command = [str(AMQTT), "-c", str(self.conf)]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"the broker did not start: {self.command}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()  # mosquitto saves its persistence file on SIGTERM
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    broker = Broker(tmp_path)
    broker.start()
    yield broker
    broker.stop()


class Subscriber:
    """A paho client recording every message under our base topic and the discovery prefix."""

    def __init__(self, port: int, client_id: str = "test-subscriber"):
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.subscribed = threading.Event()  # the broker acknowledged the subscriptions
        self.client.on_message = self._record
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(f"{BASE}/#", 1), ("homeassistant/#", 1)])
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.subscribed.set()
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _record(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, message.payload, bool(message.retain)))

    def on(self, topic: str) -> list[bytes]:
        with self._lock:
            return [payload for t, payload, _ in self.messages if t == topic]

    def wait_for(self, test: Callable[[], Any], seconds: float = 15) -> Any:
        try:
            return poll(test, "what the test waits for", seconds)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; topics seen: {sorted({t for t, _, _ in self.messages})}") from None

    def publish(self, topic: str, payload: str | bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscriber(broker: Broker) -> Iterator[Subscriber]:
    sub = Subscriber(broker.port)
    yield sub
    sub.close()


def daemon_config(tmp_path: Path, port: int, **mqtt_settings: Any) -> Path:
    data = example_data()
    data["mqtt"] = {"enabled": True, "port": port, "node_id": NODE, **mqtt_settings}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start_daemon(config: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pi_controller", "run", "--config", str(config), "--simulate",
                             "--log-format", "json", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(process: subprocess.Popen[str], stop: bool = True) -> tuple[str, list[dict[str, Any]]]:
    """Stop the daemon (or, with --ticks, let it end) and return its stdout and log events."""
    if stop and process.poll() is None:
        process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    return out, [json.loads(line) for line in err.splitlines() if line.startswith("{")]


def heartbeats(sub: Subscriber, topic: str, count: int) -> None:
    """Wait for `count` more messages on `topic` (with heartbeat_s 1, a state republished unchanged)."""
    seen = len(sub.on(topic))
    sub.wait_for(lambda: len(sub.on(topic)) >= seen + count)


def state(sub: Subscriber, topic: str) -> dict[str, Any] | None:
    payloads = sub.on(topic)
    return json.loads(payloads[-1]) if payloads else None


def test_discovery_states_and_availability(tmp_path, broker, subscriber) -> None:
    process = start_daemon(daemon_config(tmp_path, broker.port))
    try:
        subscriber.wait_for(lambda: subscriber.on(f"{BASE}/status") == [b"online"])
        temperature = subscriber.wait_for(lambda: state(subscriber, f"{BASE}/sensor/temperature_sensor/state"))
        subscriber.wait_for(lambda: state(subscriber, f"{BASE}/loop/state"))
        subscriber.wait_for(lambda: state(subscriber, f"{BASE}/plugin/motion_light/state"))
    finally:
        finish(process)
    assert temperature["unit"] == "celsius" and temperature["valid"] and isinstance(temperature["value"], float)
    configs = {t: json.loads(p) for t, p, _ in subscriber.messages if t.startswith("homeassistant/") and p}
    prefix = f"homeassistant/%s/{NODE}/%s/config"
    temp = configs[prefix % ("sensor", "temperature_sensor")]
    assert (temp["device_class"], temp["unit_of_measurement"], temp["state_class"]) == ("temperature", "°C",
                                                                                         "measurement")
    assert temp["unique_id"] == f"pi_controller_{NODE}_temperature_sensor"
    assert temp["default_entity_id"] == f"sensor.{NODE}_temperature_sensor" and "object_id" not in temp
    assert temp["state_topic"] == f"{BASE}/sensor/temperature_sensor/state"
    assert temp["availability"][0] == {"topic": f"{BASE}/status", "payload_available": "online",
                                       "payload_not_available": "offline"}
    assert temp["availability"][1]["topic"] == temp["state_topic"] and temp["availability_mode"] == "all"
    assert temp["device"]["identifiers"] == [f"pi-controller-{NODE}"]
    assert configs[prefix % ("sensor", "light_sensor")]["device_class"] == "illuminance"
    assert configs[prefix % ("binary_sensor", "motion_sensor")]["device_class"] == "motion"
    relay = configs[prefix % ("switch", "relay_switch")]
    assert relay["command_topic"] == f"{BASE}/actuator/relay_switch/set"
    light = configs[prefix % ("light", "led_strip")]
    assert light["schema"] == "json" and light["supported_color_modes"] == ["brightness"]
    servo = configs[prefix % ("number", "servo_motor")]
    assert (servo["min"], servo["max"]) == (0, 90)
    assert {prefix % ("sensor", "loop_rate_hz"), prefix % ("switch", "plugin_motion_light_enabled")} <= set(configs)
    assert len({c["device"]["identifiers"][0] for c in configs.values()}) == 1  # one device per Pi
    # said on the way out: acknowledged before the daemon exited, taken by our paho thread whenever it runs
    subscriber.wait_for(lambda: subscriber.on(f"{BASE}/status")[-1:] == [b"offline"])
    retained = {t for t, _, r in subscriber.messages if r}
    assert retained == set()  # a live subscription gets live copies; the broker keeps them retained


@needs_mosquitto
def test_the_last_will_says_offline_when_the_daemon_is_killed(tmp_path, broker, subscriber) -> None:
    process = start_daemon(daemon_config(tmp_path, broker.port))
    subscriber.wait_for(lambda: subscriber.on(f"{BASE}/status") == [b"online"])
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    subscriber.wait_for(lambda: subscriber.on(f"{BASE}/status")[-1:] == [b"offline"])
    late = Subscriber(broker.port, "late-subscriber")  # a dashboard that connects afterwards sees it too
    try:
        late.wait_for(lambda: late.on(f"{BASE}/status") == [b"offline"])
    finally:
        late.close()


def test_overrides_win_over_plugins_until_released_or_expired(tmp_path, broker, subscriber) -> None:
    process = start_daemon(daemon_config(tmp_path, broker.port, heartbeat_s=1))
    led = f"{BASE}/actuator/led_strip"
    try:
        subscriber.wait_for(lambda: state(subscriber, f"{led}/state"))
        subscriber.publish(f"{led}/set", json.dumps({"state": "ON", "brightness": 40}))
        on = subscriber.wait_for(lambda: (s := state(subscriber, f"{led}/state")) and s["override"] and s)
        assert (on["duty_cycle"], on["state"], on["brightness"]) == (40.0, "ON", 40.0)
        subscriber.publish(f"{led}/release", "")
        subscriber.wait_for(lambda: state(subscriber, f"{led}/state")["override"] is False)
        subscriber.publish(f"{led}/set", json.dumps({"action": "pwm", "parameters": {"duty_cycle": 30},
                                                     "expires_s": 1}))
        subscriber.wait_for(lambda: state(subscriber, f"{led}/state")["duty_cycle"] == 30.0)
        subscriber.wait_for(lambda: state(subscriber, f"{led}/state")["override"] is False)
    finally:
        _, events = finish(process)
    ended = [e["reason"] for e in events if e["event"] == "override_ended"]
    assert ended == ["released", "expired"]


def test_commands_are_validated_like_plugin_commands_and_bad_ones_rejected(tmp_path, broker, subscriber) -> None:
    process = start_daemon(daemon_config(tmp_path, broker.port))
    try:
        subscriber.wait_for(lambda: state(subscriber, f"{BASE}/actuator/led_strip/state"))
        for topic, payload in [("actuator/led_strip/set", '{"state": "ON", "brightness": 150}'),
                               ("actuator/led_strip/set", "\xff garbage"),
                               ("actuator/toaster/set", "ON"),
                               ("actuator/servo_motor/set", "1e999"),
                               ("plugin/temperature_control/config/setpoint/set", "NaN"),
                               ("actuator/relay_switch/set", "ON")]:
            subscriber.publish(f"{BASE}/{topic}", payload)
        subscriber.wait_for(lambda: (s := state(subscriber, f"{BASE}/actuator/relay_switch/state")) and s["override"])
    finally:
        _, events = finish(process)
    rejected = [(e.get("device"), e.get("rule")) for e in events if e["event"] == "operator_command_rejected"]
    assert rejected == [("led_strip", "out_of_range"), ("led_strip", "malformed"), ("toaster", "unknown_device"),
                        ("servo_motor", "not_finite")]
    assert any(e["event"] == "mqtt_message_rejected" for e in events)  # the NaN config value
    assert not any(e["event"] == "daemon_crashed" for e in events)


def test_plugins_are_switched_off_and_reconfigured_at_run_time(tmp_path, broker, subscriber) -> None:
    process = start_daemon(daemon_config(tmp_path, broker.port, heartbeat_s=1))
    plugin = f"{BASE}/plugin/temperature_control"
    relay = f"{BASE}/actuator/relay_switch/state"
    try:
        subscriber.wait_for(lambda: (s := state(subscriber, relay)) and s["on"])  # 19 C: heating to 21
        subscriber.publish(f"{plugin}/config/setpoint/set", "12")
        subscriber.wait_for(lambda: state(subscriber, relay)["on"] is False)  # 19 C is warm enough for 12
        subscriber.publish(f"{plugin}/enable", "OFF")
        subscriber.wait_for(lambda: state(subscriber, f"{plugin}/state")["enabled"] is False)
        calls = state(subscriber, f"{plugin}/state")["calls"]
        heartbeats(subscriber, f"{plugin}/state", 2)  # some twenty ticks later
        assert state(subscriber, f"{plugin}/state")["calls"] == calls  # not called while off
    finally:
        _, events = finish(process)
    assert [e["key"] for e in events if e["event"] == "plugin_config_set"] == ["setpoint"]


def discovered(sub: Subscriber, platform: str, object_id: str) -> dict[str, Any]:
    """An entity's discovery config, once it came."""
    return json.loads(sub.wait_for(lambda: sub.on(f"homeassistant/{platform}/{NODE}/{object_id}/config"))[-1])


def test_home_assistant_sets_the_thermostat_setpoint_through_its_number_entity(tmp_path, broker, subscriber) -> None:
    process = start_daemon(daemon_config(tmp_path, broker.port, loop_interval_s=1))
    try:
        setpoint = discovered(subscriber, "number", "plugin_temperature_control_config_setpoint")

        def shown() -> str:  # what Home Assistant shows, from the last plugin state
            return render(setpoint["value_template"], subscriber.on(setpoint["state_topic"])[-1])

        subscriber.wait_for(lambda: subscriber.on(setpoint["state_topic"]) and shown() == "21.0")
        subscriber.publish(setpoint["command_topic"], "19.5")  # what Home Assistant's number sends
        subscriber.wait_for(lambda: shown() == "19.5")  # published as soon as it changed
        subscriber.publish(setpoint["command_topic"], "45")  # above its max: refused, the old value stays
        heartbeats(subscriber, f"{BASE}/loop/state", 2)  # a second later: ten ticks took the command up
        assert shown() == "19.5"
    finally:
        _, events = finish(process)
    assert [e["rule"] for e in events if e["event"] == "plugin_config_refused"] == ["out_of_range"]


def test_an_override_shows_until_when_and_resume_automatic_ends_it(tmp_path, broker, subscriber) -> None:
    process = start_daemon(daemon_config(tmp_path, broker.port))
    led = f"{BASE}/actuator/led_strip/state"
    try:
        light = discovered(subscriber, "light", "led_strip")
        resume = discovered(subscriber, "button", "led_strip_resume")
        subscriber.wait_for(lambda: state(subscriber, led))
        subscriber.publish(light["command_topic"], '{"brightness": 30}')  # a brightness alone: on at 30 %
        held = subscriber.wait_for(lambda: (s := state(subscriber, led)) and s["override"] and s)
        assert (held["state"], held["brightness"], held["owner"]) == ("ON", 30.0, "operator")
        attributes = json.loads(render(light["json_attributes_template"], subscriber.on(led)[-1]))
        assert attributes["overridden"] and attributes["override_expires_at"] == held["override_expires_at"]
        assert render(resume["availability"][1]["value_template"], subscriber.on(led)[-1]) == "online"
        subscriber.publish(resume["command_topic"], resume["payload_press"])
        released = subscriber.wait_for(lambda: (s := state(subscriber, led)) and not s["override"] and s)
        assert released["override_expires_at"] is None
        assert render(resume["availability"][1]["value_template"], subscriber.on(led)[-1]) == "offline"
    finally:
        finish(process)


def test_read_only_mode_takes_no_command(tmp_path, broker, subscriber) -> None:
    process = start_daemon(daemon_config(tmp_path, broker.port, commands=False, heartbeat_s=1))
    try:
        subscriber.wait_for(lambda: state(subscriber, f"{BASE}/actuator/led_strip/state"))
        subscriber.publish(f"{BASE}/actuator/led_strip/set", "ON")
        heartbeats(subscriber, f"{BASE}/actuator/led_strip/state", 2)  # it would have been taken up by now
        assert not state(subscriber, f"{BASE}/actuator/led_strip/state")["override"]
    finally:
        _, events = finish(process)
    assert not any(e["event"].startswith("override") for e in events)


def test_deadband_keeps_small_changes_off_the_broker(tmp_path, broker, subscriber) -> None:
    config = daemon_config(tmp_path, broker.port, deadband={"light_sensor": 1e6}, discovery=False)
    out, _ = finish(start_daemon(config, "--ticks", "40"), stop=False)
    subscriber.wait_for(lambda: subscriber.on(f"{BASE}/status")[-1:] == [b"offline"])
    # Daylight changes every tick (the outage test sees it), but never by a million lux: the first
    # reading, and the same again when the connection came up and every state was republished.
    assert 1 <= len(subscriber.on(f"{BASE}/sensor/light_sensor/state")) <= 2
    assert json.loads(out)["telemetry"]["dropped"] == 0


def test_rate_cap_spreads_messages_out(tmp_path, broker, subscriber) -> None:
    arrivals: list[float] = []
    subscriber.client.on_message = lambda c, u, m: arrivals.append(time.monotonic())
    config = daemon_config(tmp_path, broker.port, deadband={"light_sensor": 0.0}, discovery=False,
                           max_messages_per_s=3)
    process = start_daemon(config)
    try:
        # 5 s past the first message, beyond the start-up burst (a stop flushes what is left: not counted)
        end = subscriber.wait_for(lambda: arrivals and arrivals[-1] - arrivals[0] >= 5 and arrivals[-1], seconds=60)
    finally:
        finish(process)
    # The light sensor alone offers 10 messages a second; at most 3 a second (and one second's burst)
    # may go out. A slow machine only sends fewer.
    assert len([t for t in arrivals if end - 3 <= t <= end]) <= 3 * 3 + 3


@needs_mosquitto
@pytest.mark.slow  # the broker stopped and started again
def test_a_broker_outage_loses_no_reading(tmp_path, broker, subscriber) -> None:
    config = daemon_config(tmp_path, broker.port, deadband={"light_sensor": 0.0}, discovery=False,
                           max_messages_per_s=1000)
    process = start_daemon(config, "--ticks", "120")  # paho retries 1, 2, 4 s apart: room for the third
    subscriber.wait_for(lambda: subscriber.on(f"{BASE}/status") == [b"online"])
    time.sleep(1.5)
    broker.stop()
    time.sleep(2.5)  # readings taken meanwhile wait in the daemon's outbox
    broker.start()
    out, events = finish(process, stop=False)
    snapshot = json.loads(out)
    readings = {(json.loads(p)["sensor_id"], json.loads(p)["timestamp"])
                for t, p, _ in subscriber.messages if "/sensor/" in t}

    def all_arrived() -> bool:
        return len({(json.loads(p)["sensor_id"], json.loads(p)["timestamp"])
                    for t, p, _ in subscriber.messages if "/sensor/" in t}) >= snapshot["telemetry"]["readings_queued"]

    subscriber.wait_for(all_arrived, seconds=20)
    readings = {(json.loads(p)["sensor_id"], json.loads(p)["timestamp"])
                for t, p, _ in subscriber.messages if "/sensor/" in t}
    assert len(readings) == snapshot["telemetry"]["readings_queued"]
    assert snapshot["telemetry"]["dropped"] == 0
    names = [e["event"] for e in events]
    assert names.count("mqtt_disconnected") == 1 and names.count("mqtt_connected") == 2
    assert snapshot["ticks"]["count"] == 120  # the loop ran on through the outage
    light = [json.loads(p)["timestamp"] for t, p, _ in subscriber.messages if t.endswith("light_sensor/state")]
    assert light == sorted(light)  # in order, with their original timestamps


def discovery_topics(sub: Subscriber) -> set[str]:
    return {t for t, p, _ in sub.messages if t.startswith("homeassistant/") and t.endswith("/config") and p}


def test_home_assistant_restart_gets_discovery_and_states_again(tmp_path, broker, subscriber) -> None:
    process = start_daemon(daemon_config(tmp_path, broker.port))
    try:
        subscriber.wait_for(lambda: state(subscriber, f"{BASE}/actuator/servo_motor/state"))
        first = discovery_topics(subscriber)  # all of them: discovery goes out before any state
        assert len(first) >= 15
        with subscriber._lock:
            subscriber.messages.clear()
        subscriber.publish("homeassistant/status", "online")
        subscriber.wait_for(lambda: discovery_topics(subscriber) == first)
        subscriber.wait_for(lambda: state(subscriber, f"{BASE}/actuator/servo_motor/state"))  # unchanged, resent
    finally:
        finish(process)


def test_a_device_removed_from_the_config_loses_its_entity_on_the_next_start(tmp_path, broker, subscriber) -> None:
    config = daemon_config(tmp_path, broker.port)
    servo = f"homeassistant/number/{NODE}/servo_motor/config"
    finish(start_daemon(config, "--ticks", "10"), stop=False)
    assert subscriber.wait_for(lambda: subscriber.on(servo))[-1] != b""
    data = yaml.safe_load(config.read_text())
    data["actuators"] = [a for a in data["actuators"] if a["id"] != "servo_motor"]
    data["simulation"] = [m for m in data["simulation"] if "servo_motor" not in m.values()]
    config.write_text(yaml.safe_dump(data))
    out, _ = finish(start_daemon(config, "--ticks", "20"), stop=False)
    assert json.loads(out)["ticks"]["count"] == 20
    subscriber.wait_for(lambda: subscriber.on(servo)[-1] == b"")  # an empty retained config removes it
    late = Subscriber(broker.port, "late-subscriber")
    try:
        late.wait_for(lambda: late.on(f"{BASE}/status"))  # retained messages come in one go, on subscribing
        late.wait_for(lambda: late.on(f"homeassistant/switch/{NODE}/relay_switch/config"))
        assert late.on(servo) == []  # nothing retained for it any more
        assert late.on(f"homeassistant/switch/{NODE}/relay_switch/config")  # the others stay
    finally:
        late.close()


@pytest.mark.slow  # a broker outage across a restart of the daemon
def test_buffered_messages_survive_a_restart_of_the_daemon(tmp_path) -> None:
    broker = Broker(tmp_path)  # not started: the first run never reaches it
    buffer = tmp_path / "outbox.jsonl"
    config = daemon_config(tmp_path, broker.port, buffer_file=str(buffer), discovery=False)
    out, events = finish(start_daemon(config, "--ticks", "10"), stop=False)
    queued = json.loads(out)["telemetry"]["readings_queued"]
    first_run_ended = time.time()
    assert queued >= 3 and buffer.exists()
    assert [e["messages"] for e in events if e["event"] == "telemetry_saved"]
    broker.start()
    sub = Subscriber(broker.port)
    try:
        sub.subscribed.wait(15)
        finish(start_daemon(config, "--ticks", "10"), stop=False)
        def from_first_run() -> set[tuple[str, float]]:
            readings = (json.loads(p) for t, p, _ in sub.messages if "/sensor/" in t)
            return {(r["sensor_id"], r["timestamp"]) for r in readings if r["timestamp"] < first_run_ended}

        sub.wait_for(lambda: len(from_first_run()) >= queued)
        assert len(from_first_run()) == queued  # every reading of the run the broker never saw
        assert not buffer.exists()  # taken up, not sent twice
    finally:
        sub.close()
        broker.stop()


def test_bad_config_values_are_refused_and_the_plugin_runs_on_without_an_error(tmp_path, broker, subscriber) -> None:
    process = start_daemon(daemon_config(tmp_path, broker.port))
    plugin = f"{BASE}/plugin/temperature_control"
    relay = f"{BASE}/actuator/relay_switch/state"
    try:
        subscriber.wait_for(lambda: (s := state(subscriber, relay)) and s["on"])  # 19 C: heating to 21
        for key, payload in [("setpoint", "hot"), ("setpoint", "80"), ("setpoint", "true"), ("sensor", "x" * 5000),
                             ("turbo", "1"), ("setpoint", "12")]:  # the last one is good
            subscriber.publish(f"{plugin}/config/{key}/set", payload)
        subscriber.wait_for(lambda: state(subscriber, relay)["on"] is False)  # 19 C is warm enough for 12
    finally:
        _, events = finish(process)
    refused = [(e["plugin"], e["key"], e["rule"]) for e in events if e["event"] == "plugin_config_refused"]
    assert refused == [("temperature_control", "setpoint", "wrong_type"),
                       ("temperature_control", "setpoint", "out_of_range"),
                       ("temperature_control", "setpoint", "wrong_type"),
                       ("temperature_control", "sensor", "too_large"),
                       ("temperature_control", "turbo", "unknown_key")]
    assert all(len(json.dumps(e)) < 1000 for e in events)  # nothing sent is logged whole
    assert [e["key"] for e in events if e["event"] == "plugin_config_set"] == ["setpoint"]
    assert not [e for e in events if e["event"] in ("plugin_call_failed", "actuator_failsafe")]


def test_a_failsafe_shows_in_the_actuator_state_and_in_metrics(tmp_path, broker, subscriber) -> None:
    port = free_port()
    config_path = daemon_config(tmp_path, broker.port)
    data = yaml.safe_load(config_path.read_text())
    data["metrics"] = {"enabled": True, "port": port}
    config_path.write_text(yaml.safe_dump(data))
    process = start_daemon(config_path)
    relay = f"{BASE}/actuator/relay_switch/state"
    try:
        heating = subscriber.wait_for(lambda: (s := state(subscriber, relay)) and s["on"] and s)
        assert (heating["owner"], heating["failsafe"]) == ("temperature_control", None)
        subscriber.publish(f"{BASE}/plugin/temperature_control/enable", "OFF")
        safe = subscriber.wait_for(lambda: (s := state(subscriber, relay)) and s["failsafe"] and s)
        assert (safe["on"], safe["owner"]) == (False, "safety")
        assert safe["failsafe"].startswith("plugin 'temperature_control' was disabled by the operator")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert 'pi_controller_failsafes_total{device="relay_switch"} 1.0' in response.read().decode()
    finally:
        _, events = finish(process)
    assert [e["device"] for e in events if e["event"] == "actuator_failsafe"] == ["relay_switch"]


@needs_mosquitto
@pytest.mark.slow  # the broker drops one daemon for the other, again and again
def test_two_daemons_left_at_the_default_node_id_say_once_why_they_keep_dropping(tmp_path, broker, subscriber) -> None:
    node = config.host_node_id(socket.gethostname())  # the default: both run on this host
    status = f"pi-controller/{node}/status"
    subscriber.client.subscribe(status, 1)
    paths = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        path = daemon_config(tmp_path / name, broker.port)
        data = yaml.safe_load(path.read_text())
        del data["mqtt"]["node_id"]
        path.write_text(yaml.safe_dump(data))
        paths.append(path)
    first = start_daemon(paths[0])
    try:
        subscriber.wait_for(lambda: subscriber.on(status) == [b"online"])
        second = start_daemon(paths[1])
        try:  # each connection takes the client id over from the other: "online" flips back and forth
            subscriber.wait_for(lambda: subscriber.on(status).count(b"online") >= 2 * TAKEOVER_COUNT + 4, 90)
        finally:
            _, second_events = finish(second)
    finally:
        _, first_events = finish(first)
    for events in (first_events, second_events):  # each was dropped at least four times in a row
        (started,) = [e for e in events if e["event"] == "mqtt_starting"]
        assert started["base"] == f"pi-controller/{node}" and started["client_id"] == f"pi-controller-{node}"
        (taken,) = [e for e in events if e["event"] == "mqtt_client_id_taken_over"]  # once, not at every flip
        assert taken["client_id"] == f"pi-controller-{node}" and "give each Pi its own mqtt.node_id" in taken["hint"]


HUGE = "7" * 1_048_576


def test_oversize_payloads_are_refused_before_decoding_and_logged_bounded(tmp_path, broker, subscriber) -> None:
    process = start_daemon(daemon_config(tmp_path, broker.port))
    try:
        subscriber.wait_for(lambda: state(subscriber, f"{BASE}/actuator/led_strip/state"))
        for topic, payload in [("plugin/temperature_control/config/setpoint/set", HUGE),
                               ("actuator/led_strip/set", '{"action": "pwm", "parameters": {"x": "' + HUGE + '"}}'),
                               ("plugin/temperature_control/enable", "ON" + " " * 100),
                               ("actuator/relay_switch/set", "ON")]:  # the last one comes through
            subscriber.publish(f"{BASE}/{topic}", payload)
        subscriber.wait_for(lambda: (s := state(subscriber, f"{BASE}/actuator/relay_switch/state")) and s["override"])
    finally:
        _, events = finish(process)
    rejected = [e["error"] for e in events if e["event"] == "mqtt_message_rejected"]
    assert rejected == ["a payload of 1048576 bytes, over the 16384 bytes this topic takes",
                        "a payload of 1048618 bytes, over the 1024 bytes this topic takes",
                        "a payload of 102 bytes, over the 16 bytes this topic takes"]
    assert not any(e["event"] in ("plugin_config_set", "operator_command_rejected") for e in events)
    assert max(len(str(value)) for e in events for value in e.values()) < 400


def test_a_forged_line_in_the_outage_buffer_file_is_never_published(tmp_path, broker, subscriber) -> None:
    buffer = tmp_path / "outbox.jsonl"
    forged = ["homeassistant/switch/evil/config", json.dumps({"name": "evil", "command_topic": "x/set"}), True]
    ours = [f"{BASE}/sensor/earlier/state", json.dumps({"value": 1}), True]  # after it in the file
    buffer.write_text("\n".join(json.dumps(line) for line in (forged, ours)) + "\n")
    process = start_daemon(daemon_config(tmp_path, broker.port, buffer_file=str(buffer)))
    try:
        subscriber.wait_for(lambda: subscriber.on(f"{BASE}/sensor/earlier/state"))
    finally:
        _, events = finish(process)
    assert subscriber.on("homeassistant/switch/evil/config") == []
    (restored,) = [e for e in events if e["event"] == "telemetry_restored"]
    assert (restored["messages"], restored["skipped"], restored["not_ours"]) == (
        1, 1, ["homeassistant/switch/evil/config"])


def test_entities_follow_the_plugin_set(tmp_path, broker, subscriber) -> None:
    """A plugin dropped in gets its entities while the daemon runs, and can be switched off from them
    at once; one taken out loses its entities and its retained state."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    for name in ("temperature_control", "motion_light"):
        for suffix in (".wasm", ".yaml"):
            shutil.copy(BUNDLED_PLUGINS / f"{name}{suffix}", folder / f"{name}{suffix}")
    config_path = daemon_config(tmp_path, broker.port)
    data = yaml.safe_load(config_path.read_text())
    data["plugins"]["directory"] = str(folder)
    config_path.write_text(yaml.safe_dump(data))
    saver = f"homeassistant/switch/{NODE}/plugin_energy_saver_enabled/config"
    light = f"homeassistant/sensor/{NODE}/plugin_motion_light/config"
    process = start_daemon(config_path)
    try:
        subscriber.wait_for(lambda: state(subscriber, f"{BASE}/plugin/motion_light/state"))
        assert not subscriber.on(saver)
        shutil.copy(BUNDLED_PLUGINS / "energy_saver.yaml", folder / "energy_saver.yaml")  # its manifest first
        shutil.copy(BUNDLED_PLUGINS / "energy_saver.wasm", folder / "energy_saver.wasm")
        switch = json.loads(subscriber.wait_for(lambda: subscriber.on(saver))[-1])
        subscriber.publish(switch["command_topic"], "OFF")  # what Home Assistant's switch sends
        subscriber.wait_for(lambda: (s := state(subscriber, f"{BASE}/plugin/energy_saver/state"))
                            and s["enabled"] is False and s["state"] == "disabled")
        (folder / "motion_light.wasm").unlink()
        subscriber.wait_for(lambda: subscriber.on(light)[-1] == b"")  # its entities go
        subscriber.wait_for(lambda: subscriber.on(f"{BASE}/plugin/motion_light/state")[-1] == b"")  # and its state
        assert subscriber.on(f"homeassistant/switch/{NODE}/plugin_motion_light_enabled/config")[-1] == b""
    finally:
        finish(process)
    late = Subscriber(broker.port, "late-subscriber")
    try:
        late.wait_for(lambda: late.on(saver))
        assert late.on(light) == [] and late.on(f"{BASE}/plugin/motion_light/state") == []  # nothing retained
    finally:
        late.close()


def test_a_config_of_an_earlier_unique_id_is_emptied_and_sent_again(tmp_path, broker, subscriber) -> None:
    """Home Assistant keeps an entity's first unique_id: a config of ours from before the prefix is
    removed (emptied) before the config of now goes out on the same topic."""
    topic = f"homeassistant/switch/{NODE}/relay_switch/config"
    old = {"name": "relay switch", "unique_id": f"{NODE}_relay_switch", "command_topic": "x", "state_topic": "y",
           "device": {"identifiers": [f"pi-controller-{NODE}"]}}
    subscriber.client.publish(topic, json.dumps(old), qos=1, retain=True).wait_for_publish(5)
    process = start_daemon(daemon_config(tmp_path, broker.port))
    try:
        now = f"pi_controller_{NODE}_relay_switch"
        subscriber.wait_for(lambda: len(subscriber.on(topic)) >= 2 and subscriber.on(topic)[-1]
                            and json.loads(subscriber.on(topic)[-1])["unique_id"] == now)
        subscriber.wait_for(lambda: b"" in subscriber.on(topic))
    finally:
        finish(process)
    sent = subscriber.on(topic)
    assert json.loads(sent[0])["unique_id"] == f"{NODE}_relay_switch"  # retained from before
    after = sent[len(sent) - 1 - sent[::-1].index(b""):]  # from the last emptying on: the config of now
    assert [json.loads(p)["unique_id"] for p in after[1:]] and all(
        json.loads(p)["unique_id"] == f"pi_controller_{NODE}_relay_switch" for p in after[1:])


def test_a_held_command_shows_its_rule_in_the_attributes_and_fires_the_event_entity(tmp_path, broker,
                                                                                     subscriber) -> None:
    """switch.turn_on held by min_off: the switch's attributes say which rule, why and until when, and
    its event entity fires; a refused value fires it too."""
    config_path = daemon_config(tmp_path, broker.port)
    data = yaml.safe_load(config_path.read_text())
    next(a for a in data["actuators"] if a["id"] == "relay_switch")["min_off_s"] = 600  # start-up counts
    config_path.write_text(yaml.safe_dump(data))
    process = start_daemon(config_path)
    events = f"{BASE}/actuator/relay_switch/event"
    try:
        switch = discovered(subscriber, "switch", "relay_switch")
        event = discovered(subscriber, "event", "relay_switch_refusals")
        assert event["state_topic"] == events and "held" in event["event_types"]
        subscriber.wait_for(lambda: subscriber.on(events))  # the thermostat's own command, held first
        subscriber.publish(switch["command_topic"], "ON")
        fired = subscriber.wait_for(lambda: [e for e in map(json.loads, subscriber.on(events))
                                             if e["owner"] == "operator"])
        assert fired[0]["event_type"] == "held" and fired[0]["rule"] == "min_off" and fired[0]["until"]

        def attributes() -> dict[str, Any]:
            states = subscriber.on(switch["state_topic"])
            return json.loads(render(switch["json_attributes_template"], states[-1])) if states else {"refusal": None}

        subscriber.wait_for(lambda: (attributes()["refusal"] or {}).get("owner") == "operator")
        refusal = attributes()["refusal"]
        assert refusal["rule"] == "min_off" and "minimum 600" in refusal["reason"]
        assert refusal["until"] > refusal["at"] and attributes()["overridden"]
        assert render(switch["value_template"], subscriber.on(switch["state_topic"])[-1]) == "OFF"  # held off
        servo = discovered(subscriber, "number", "servo_motor")
        subscriber.publish(servo["command_topic"], "500")  # beyond its angle
        refused = subscriber.wait_for(lambda: subscriber.on(f"{BASE}/actuator/servo_motor/event"))
        assert json.loads(refused[-1])["event_type"] == "refused"
    finally:
        finish(process)
    assert not [t for t, _, retained in subscriber.messages if t.endswith("/event") and retained]


def test_values_set_from_home_assistant_survive_a_sigkill_and_a_file_edit_wins(tmp_path, broker, subscriber) -> None:
    """A setpoint and a plugin switched off, set over MQTT, are in force again after a SIGKILL and a
    restart (and shown so); a value then changed in the config file replaces the kept one."""
    config_path = daemon_config(tmp_path, broker.port)
    state_dir = tmp_path / "state"
    plugin = f"{BASE}/plugin/temperature_control"
    saver = f"{BASE}/plugin/energy_saver"

    def shown(topic: str) -> dict[str, Any] | None:
        return state(subscriber, f"{topic}/state")

    process = start_daemon(config_path, "--state-dir", str(state_dir))
    try:
        setpoint = discovered(subscriber, "number", "plugin_temperature_control_config_setpoint")
        subscriber.wait_for(lambda: (s := shown(plugin)) and s["config"]["setpoint"] == 21.0)
        subscriber.publish(setpoint["command_topic"], "19.5")
        subscriber.publish(f"{saver}/enable", "OFF")
        subscriber.wait_for(lambda: shown(plugin)["config"]["setpoint"] == 19.5 and shown(saver)["enabled"] is False)
        process.send_signal(signal.SIGHUP)  # a reload loads the plugins again: the values stay in force
        subscriber.wait_for(lambda: (s := state(subscriber, f"{BASE}/loop/state")) and s["last_reload"] == "applied")
        assert shown(plugin)["config"]["setpoint"] == 19.5 and shown(saver)["enabled"] is False
    finally:
        process.kill()  # SIGKILL: no shutdown path runs
        process.wait(timeout=30)
    forget_retained(subscriber, plugin, saver)
    process = start_daemon(config_path, "--state-dir", str(state_dir))
    try:
        subscriber.wait_for(lambda: shown(plugin))
        assert shown(plugin)["config"]["setpoint"] == 19.5
        assert render(setpoint["value_template"], subscriber.on(setpoint["state_topic"])[-1]) == "19.5"
        subscriber.wait_for(lambda: (s := shown(saver)) and s["enabled"] is False and s["state"] == "disabled")
    finally:
        _, events = finish(process)
    assert [e["plugins"] for e in events if e["event"] == "operator_values_restored"] == [
        ["energy_saver", "temperature_control"]]
    data = yaml.safe_load(config_path.read_text())
    data["plugins"]["settings"]["temperature_control"]["config"]["setpoint"] = 20.0  # the owner's latest word
    config_path.write_text(yaml.safe_dump(data))
    forget_retained(subscriber, plugin, saver)
    process = start_daemon(config_path, "--state-dir", str(state_dir))
    try:
        subscriber.wait_for(lambda: shown(plugin) and shown(saver))
        assert shown(plugin)["config"]["setpoint"] == 20.0
        assert shown(saver)["enabled"] is False  # not edited in the file: still off
    finally:
        _, events = finish(process)
    assert [(e["plugin"], e["key"]) for e in events if e["event"] == "operator_value_forgotten"] == [
        ("temperature_control", "setpoint")]


def forget_retained(sub: Subscriber, *bases: str) -> None:
    """Empty the retained states of `bases` and what was seen: what comes next is the next run's."""
    for base in bases:
        sub.client.publish(f"{base}/state", b"", qos=1, retain=True).wait_for_publish(5)
    sub.wait_for(lambda: all(sub.on(f"{base}/state")[-1:] == [b""] for base in bases))
    with sub._lock:
        sub.messages.clear()


def test_installing_a_plugin_update_from_home_assistant_promotes_its_shadow(tmp_path, broker, subscriber) -> None:
    folder = tmp_path / "plugins"
    (folder / "shadow").mkdir(parents=True)
    for suffix in (".wasm", ".yaml"):
        shutil.copy(BUNDLED_PLUGINS / f"temperature_control{suffix}", folder / f"temperature_control{suffix}")
    candidate = folder / "shadow" / "temperature_control.wasm"
    shutil.copy(BUNDLED_PLUGINS / "motion_light.wasm", candidate)  # another module: another hash
    candidate_sha = hashlib.sha256(candidate.read_bytes()).hexdigest()
    config_path = daemon_config(tmp_path, broker.port)
    data = yaml.safe_load(config_path.read_text())
    data["plugins"]["directory"] = str(folder)
    config_path.write_text(yaml.safe_dump(data))
    process = start_daemon(config_path)
    plugin = f"{BASE}/plugin/temperature_control/state"
    try:
        update = discovered(subscriber, "update", "plugin_temperature_control_update")

        def shown() -> dict[str, str]:
            return json.loads(render(update["value_template"], subscriber.on(plugin)[-1]))

        subscriber.wait_for(lambda: subscriber.on(plugin) and (state(subscriber, plugin) or {}).get("candidate"))
        assert shown()["latest_version"] == f"? ({candidate_sha[:12]})" != shown()["installed_version"]  # no manifest
        subscriber.publish(update["command_topic"], update["payload_install"])  # what Home Assistant's install sends
        subscriber.wait_for(lambda: (s := state(subscriber, plugin)) and s["sha256"] == candidate_sha)
        subscriber.wait_for(lambda: state(subscriber, plugin)["candidate"] is None)  # the shadow went live
        assert shown()["latest_version"] == shown()["installed_version"]
        answer = json.loads(subscriber.wait_for(lambda: subscriber.on(f"{update['command_topic']}/result"))[-1])
        assert answer["ok"] and answer["applied"] == {"promoting": "temperature_control"}
    finally:
        finish(process)
    assert not candidate.exists()
