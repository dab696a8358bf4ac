"""A flood of MQTT commands against the running daemon (issue 28): do states still go out, what does it cost,
and what is retained after a stop in the middle of it?

    .venv/bin/python benchmarks/flood.py [--rate 1000] [--seconds 10] [--heartbeat 2]

A mosquitto on loopback (/usr/sbin/mosquitto, started here on a free port), the daemon as a process on
simulated pins with the example config (MQTT on, `heartbeat_s` as given), and a paho client publishing
`--rate` commands a second, QoS 0, in turn to four command topics: an unknown actuator's, the LED at
80 %, the servo at 45 degrees, the heater ON (the issue's attack). Two phases of `--seconds` each in the
same run: the floor, the daemon with nobody sending it anything, then the flood; the flood goes on while
the daemon is stopped with SIGTERM, then a fresh client reads the retained actuator states.

Prints, per phase: the daemon's CPU share (its /proc CPU time over wall time), the largest gap between
two states of the same sensor as the subscriber received them (arrival) and as stamped (payload), the
threads and RSS at the end of the phase; for the flood also the commands sent, the answers delivered,
the counts the daemon gives on telemetry/state (answers dropped, commands rate-limited), the missed ticks
(the daemon's loop_stopped line), and the retained state of each actuator after the stop. The machine's
load average is printed beside them: on a shared machine every figure depends on it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml

REPO = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or shutil.which("/usr/sbin/mosquitto")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
WAIT_S = 60.0  # only how long a broken run waits for what it waits on
SENSORS = ["temperature_sensor", "motion_sensor", "light_sensor"]  # the example config's
ACTUATORS = ["led_strip", "servo_motor", "relay_switch"]

# The attack: an unknown id, and the three actuators driven away from their safe states.
COMMANDS = [("actuator/nope/set", b"ON"), ("actuator/led_strip/set", b'{"state": "ON", "brightness": 80}'),
            ("actuator/servo_motor/set", b"45"), ("actuator/relay_switch/set", b"ON")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def until(test: Callable[[], Any], what: str, seconds: float = WAIT_S) -> Any:
    """What `test` returns once it is true (a broker and a daemon in other processes: nothing to wait on
    but this); `seconds` bounds a wait that would otherwise hang a failing run (tests wait with it too)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if result := test():
            return result
        time.sleep(0.05)
    raise AssertionError(f"not within {seconds} s: {what}")


@contextmanager
def mosquitto(folder: Path) -> Iterator[int]:
    """A broker on a free loopback port, for the length of the block."""
    if MOSQUITTO is None:
        raise SystemExit("mosquitto is not installed (Debian: apt-get install mosquitto)")
    port = free_port()
    conf = folder / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    broker = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        until(lambda: _listening(port), "the broker listens")
        yield port
    finally:
        broker.terminate()
        broker.wait(timeout=10)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def client(port: int, name: str) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{name}-{os.getpid()}")
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


class Recorder:
    """Every message under `base`, with the time it arrived (monotonic)."""

    def __init__(self, port: int, base: str, name: str = "flood-recorder"):
        self.base = base
        self.messages: list[tuple[float, str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{name}-{os.getpid()}")
        self.client.on_message = self._record
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{base}/#", 1)
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        until(self.subscribed.is_set, "the recorder subscribed")

    def _record(self, c: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((time.monotonic(), message.topic, bytes(message.payload), bool(message.retain)))

    def since(self, start: float, end: float = float("inf")) -> list[tuple[float, str, bytes, bool]]:
        with self._lock:
            return [m for m in self.messages if start <= m[0] < end]

    def latest(self, topic: str) -> dict[str, Any] | None:
        with self._lock:
            payloads = [p for _, t, p, _ in self.messages if t == topic]
        return json.loads(payloads[-1]) if payloads else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def largest_gaps(messages: list[tuple[float, str, bytes, bool]], base: str, sensors: list[str], start: float,
                 end: float) -> dict[str, tuple[float, float]]:
    """Per sensor, the largest gap between two of its states received from `start` to `end` (monotonic):
    as received, the edges of the window included (a sensor with no state: the whole window), and as
    stamped in the payloads."""
    seen: dict[str, list[tuple[float, float]]] = {sensor: [] for sensor in sensors}
    for arrived, topic, payload, _ in messages:
        parts = topic.removeprefix(f"{base}/").split("/")
        if start <= arrived < end and len(parts) == 3 and parts[0] == "sensor" and parts[2] == "state":
            seen.setdefault(parts[1], []).append((arrived, json.loads(payload)["timestamp"]))
    gaps = {}
    for sensor, states in seen.items():
        received = [start] + [arrived for arrived, _ in states] + [end]
        stamped = [stamp for _, stamp in states]
        gaps[sensor] = (max(b - a for a, b in itertools.pairwise(received)),
                        max((b - a for a, b in itertools.pairwise(stamped)), default=end - start))
    return gaps


class Flood(threading.Thread):
    """`rate` commands a second (QoS 0), in turn to the COMMANDS topics under `base`, until `stop` is
    set or `limit` are sent; paced on the clock, in batches of a millisecond's worth."""

    def __init__(self, port: int, base: str, rate: float, limit: int):
        super().__init__(name="flood", daemon=True)
        self.client = client(port, "flood")
        self.base, self.rate, self.limit = base, rate, limit
        self.sent = 0
        self.stop = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        while not self.stop.is_set() and self.sent < self.limit:
            due = min(self.limit, int((time.monotonic() - started) * self.rate) + 1)
            for n in range(self.sent, due):
                topic, payload = COMMANDS[n % len(COMMANDS)]
                self.client.publish(f"{self.base}/{topic}", payload, qos=0)
            self.sent = max(self.sent, due)
            time.sleep(0.001)

    def close(self) -> None:
        self.stop.set()
        self.join(timeout=WAIT_S)
        self.client.disconnect()
        self.client.loop_stop()


def retained_states(port: int, base: str, devices: list[str]) -> dict[str, dict[str, Any]]:
    """What a client connecting now is given for each actuator's state topic (retained)."""
    reader = Recorder(port, f"{base}/actuator", "retained-reader")
    try:
        topics = {device: f"{base}/actuator/{device}/state" for device in devices}
        until(lambda: all(reader.latest(t) for t in topics.values()), "every actuator's retained state")
        return {device: reader.latest(topic) or {} for device, topic in topics.items()}
    finally:
        reader.close()


def daemon_config(folder: Path, port: int, node: str, heartbeat_s: float, metrics: int) -> Path:
    data = yaml.safe_load((REPO / "config" / "example.yaml").read_text())
    data["plugins"]["directory"] = str(REPO / "plugins")
    data["mqtt"] |= {"enabled": True, "host": "127.0.0.1", "port": port, "node_id": node, "heartbeat_s": heartbeat_s}
    data["metrics"] = {"enabled": True, "port": metrics}  # missed ticks, read at each phase's ends
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start_daemon(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pi_controller", "run", "--config", str(config), "--simulate",
                             "--log-format", "json"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)


def stop_daemon(process: subprocess.Popen[str]) -> list[dict[str, Any]]:
    """SIGTERM, and the daemon's log events once it has exited."""
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=WAIT_S)
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


class Usage:
    """The daemon's CPU time, threads and RSS, from /proc; its missed ticks, from its metrics."""

    def __init__(self, pid: int, metrics: int):
        self.pid = pid
        self.metrics = metrics

    def missed(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=10) as response:
            text = response.read().decode()
        return int(float(re.search(r"^pi_controller_missed_ticks_total (\S+)$", text, re.M)[1]))  # type: ignore[index]

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime

    def threads_and_rss_mb(self) -> tuple[int, float]:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[17]), int(fields[21]) * PAGE / 1e6  # num_threads, rss (pages)


def phase(name: str, usage: Usage, recorder: Recorder, seconds: float, during: Callable[[], None]) -> dict[str, Any]:
    """`seconds` of the daemon's life with `during` started at its beginning; what it cost and how states went."""
    missed, cpu, started = usage.missed(), usage.cpu_s(), time.monotonic()
    during()
    time.sleep(seconds)  # the phase is a length of time: this is what is measured over
    wall, ended = time.monotonic() - started, time.monotonic()
    missed = usage.missed() - missed
    threads, rss = usage.threads_and_rss_mb()
    gaps = largest_gaps(recorder.since(started, ended), recorder.base, SENSORS, started, ended)
    return {"phase": name, "cpu_share": (usage.cpu_s() - cpu) / wall, "threads": threads, "rss_mb": rss,
            "gap_received_s": max((g[0] for g in gaps.values()), default=None),
            "gap_stamped_s": max((g[1] for g in gaps.values()), default=None), "sensors": len(gaps),
            "missed": missed, "started": started, "ended": ended}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="commands a second")
    parser.add_argument("--seconds", type=float, default=10.0, help="of each phase")
    parser.add_argument("--heartbeat", type=float, default=2.0, help="the daemon's mqtt.heartbeat_s")
    args = parser.parse_args()
    load = Path("/proc/loadavg").read_text().strip()
    node = "flood"
    base = f"pi-controller/{node}"
    with tempfile.TemporaryDirectory(prefix="flood-") as tmp, mosquitto(Path(tmp)) as port:
        recorder = Recorder(port, base)
        metrics = free_port()
        daemon = start_daemon(daemon_config(Path(tmp), port, node, args.heartbeat, metrics))
        usage = Usage(daemon.pid, metrics)
        try:
            until(lambda: recorder.latest(f"{base}/loop/state"), "the daemon's first loop state")
            floor = phase("floor", usage, recorder, args.seconds, lambda: None)
            flood = Flood(port, base, args.rate, int(args.rate * args.seconds * 3))
            flooded = phase("flood", usage, recorder, args.seconds, flood.start)
            events = stop_daemon(daemon)  # the flood goes on meanwhile
        finally:
            if daemon.poll() is None:
                daemon.kill()
        flood.close()
        answers = sum(1 for _, t, _, _ in recorder.since(flooded["started"]) if t.endswith("/result"))
        counts = recorder.latest(f"{base}/telemetry/state") or {}
        stopped = next((e for e in events if e["event"] == "loop_stopped"), {})
        retained = retained_states(port, base, ACTUATORS)
        recorder.close()
    print(f"load average before/after: {load}  /  {Path('/proc/loadavg').read_text().strip()}")
    for p in (floor, flooded):
        print(f"{p['phase']:5}: CPU {100 * p['cpu_share']:5.1f} % of a core, largest state gap of a sensor "
              f"{p['gap_received_s']:.2f} s received / {p['gap_stamped_s']:.2f} s stamped ({p['sensors']} sensors, "
              f"heartbeat {args.heartbeat:g} s), {p['missed']} missed ticks, {p['threads']} threads, "
              f"RSS {p['rss_mb']:.1f} MB")
    print(f"flood: {flood.sent} commands sent in {args.seconds:g} s and through the stop; ratio of CPU to the floor "
          f"{flooded['cpu_share'] / max(floor['cpu_share'], 1e-9):.2f}")
    print(f"answers delivered {answers}, dropped {counts.get('answers_dropped')}, commands rate-limited "
          f"{counts.get('commands_rate_limited')} (telemetry/state, last received)")
    print(f"in all, start to stop: ticks {stopped.get('ticks')}, missed {stopped.get('missed')}")
    unconfirmed = [e for e in events if e["event"] in ("telemetry_final_states_unconfirmed",
                                                       "telemetry_final_states_unsent")]
    print(f"final states unconfirmed at the stop: {unconfirmed or 'none'}")
    for device, state in retained.items():
        shown = {k: state.get(k) for k in ("state", "on", "duty_cycle", "angle", "owner", "failsafe") if k in state}
        print(f"retained after the stop: {device}: {shown}")


if __name__ == "__main__":
    main()
