"""Issue 28's acceptance, small: a flood of commands against the daemon (a process) through a real mosquitto
starves no sensor state, and a SIGTERM in the middle of it leaves every actuator's shut-down state
retained. `benchmarks/flood.py` runs the big one and measures what it costs."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import yaml

from benchmarks.flood import ACTUATORS, SENSORS, Flood, Recorder, largest_gaps, retained_states
from tests import test_mqtt
from tests.conftest import example_data, free_port
from tests.test_mqtt import BASE, NODE, finish, poll, start_daemon

broker = test_mqtt.broker
pytestmark = test_mqtt.pytestmark

HEARTBEAT_S = 1.0
RATE = 1000.0  # commands a second: the attack
# A state is republished at the last tick before its heartbeat is over (test_mqtt_parts shows the bound in
# virtual time), but ticks come late on a machine whose cores are saturated: the slack for that. Before the
# outbox had priorities, the flood held every state back for as long as it lasted (several seconds here;
# 50 s in the issue).
SLACK_S = 1.0


def test_a_command_flood_starves_no_state_and_a_stop_in_it_leaves_the_shut_down_states_retained(tmp_path,
                                                                                               broker) -> None:
    recorder = Recorder(broker.port, BASE)
    metrics = free_port()
    process = start_daemon(flood_config(tmp_path, broker.port, metrics))
    flood = Flood(broker.port, BASE, RATE, limit=int(RATE * 20))
    try:
        poll(lambda: all(recorder.latest(f"{BASE}/sensor/{s}/state") for s in SENSORS), "every sensor's first state")
        started = time.monotonic()
        flood.start()
        # The flood's commands get through the rate limits: the actuators are driven away from their safe states.
        poll(lambda: all(overridden(recorder, device) for device in ACTUATORS), "every actuator overridden")
        poll(lambda: flood.sent >= RATE * 4, "four seconds' worth of commands sent")
        ended = time.monotonic()
        limited = re.search(r"^pi_controller_mqtt_commands_rate_limited_total ([0-9.e+]+)$", scrape(metrics), re.M)
        poll(lambda: (c := recorder.latest(f"{BASE}/telemetry/state")) and c["commands_rate_limited"] > RATE,
             "the commands dropped counted on telemetry/state")
        _, events = finish(process)  # SIGTERM in the middle of the flood
    finally:
        flood.close()
        if process.poll() is None:
            process.kill()
        recorder.close()
    gaps = largest_gaps(recorder.since(started, ended), BASE, SENSORS, started, ended)
    assert all(stamped <= HEARTBEAT_S + SLACK_S for _, stamped in gaps.values()), gaps
    assert all(received <= HEARTBEAT_S + 2 * SLACK_S for received, _ in gaps.values()), gaps
    retained = retained_states(broker.port, BASE, ACTUATORS)
    assert {device: state["failsafe"] for device, state in retained.items()} == dict.fromkeys(ACTUATORS,
                                                                                            "the daemon stopped")
    assert retained["led_strip"]["duty_cycle"] == 0.0 and retained["relay_switch"]["on"] is False
    assert retained["servo_motor"]["angle"] == 0.0
    assert [e for e in events if e["event"].startswith("telemetry_final_states")] == []  # each one acknowledged
    (said,) = [e for e in events if e["event"] == "mqtt_commands_rate_limited"]  # said once
    assert said["dropped"] == 1
    assert limited and float(limited.group(1)) > RATE  # four seconds' worth, at most a few hundred let in


def flood_config(tmp_path: Path, port: int, metrics: int) -> Path:
    data = example_data()
    data["mqtt"] = {"enabled": True, "port": port, "node_id": NODE, "heartbeat_s": HEARTBEAT_S}
    data["metrics"] = {"enabled": True, "port": metrics}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def overridden(recorder: Recorder, device: str) -> bool:
    state = recorder.latest(f"{BASE}/actuator/{device}/state")
    return bool(state and state["override"])
