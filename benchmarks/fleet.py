"""A fleet on one machine (issue 31): N simulated nodes (`pi_controller.fleet.simulate`) on one mosquitto,
a good version rolled out through a canary and a stage, then a version that traps rolled back.

For each N (default 10 and 50) it reports:
- each node's resident set (VmRSS) and CPU (a share of one core) while idle at the rate given, and the
  broker's, read from /proc over the same window;
- announce -> live on all: from `fleet rollout`'s start to its return (canary, then the rest), and its floor:
  the windows themselves (shadow_ticks + live_ticks per stage at the rate);
- the rollback: from `fleet rollout` of the trapping version to its return (the canary promoted it, saw it
  trap within its live window, put the old version back and said so), and on the canary from its
  promotion to its `rolled_back` verdict;
- messages and bytes per node through the broker during the good rollout, from mosquitto's $SYS counters,
  beside the same counters over an idle window of the same length (the nodes' own telemetry).

    .venv/bin/python benchmarks/fleet.py [--nodes 10 50] [--rate-hz 2] [--windows 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pi_controller import cli
from pi_controller.fleet.simulate import SimulatedFleet
from pi_controller.fleet.tool import Broker, Plan, Watcher, rollout

TICKS_PER_S = os.sysconf("SC_CLK_TCK")
BASE = "bench"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class SysCounters:
    """mosquitto's $SYS totals (published every second with sys_interval 1)."""

    TOPICS = ("messages/sent", "messages/received", "bytes/sent", "bytes/received")

    def __init__(self, port: int):
        self.values: dict[str, int] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_message = self._message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([(f"$SYS/broker/{topic}", 0) for topic in self.TOPICS])
        self.client.loop_start()

    def _message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.values[message.topic.removeprefix("$SYS/broker/")] = int(message.payload)

    def now(self) -> dict[str, int]:
        time.sleep(1.1)  # the next $SYS publication: counters as of now
        with self.lock:
            return dict(self.values)


def prepare(folder: Path) -> dict[str, Path]:
    keys = folder / "keys"
    keys.mkdir()
    cli.main(["plugin", "keygen", str(keys / "owner.pem")])
    made = {"key": keys / "owner.pem.pub"}
    for label, module, number in (("live", "counter", "1.0.0"), ("good", "switchboard", "2.0.0"),
                                  ("bad", "trap_sometimes", "3.0.0")):
        (folder / label).mkdir()
        shutil.copy(REPO / "tests" / "plugins" / f"{module}.wasm", folder / label / "probe.wasm")
        (folder / label / "probe.yaml").write_text(f'version: "{number}"\n')
        cli.main(["plugin", "sign", str(folder / label / "probe.wasm"), "--key", str(keys / "owner.pem")])
        made[label] = folder / label / "probe.wasm"
    return made


def measure(count: int, rate: float, windows: int, folder: Path, made: dict[str, Path]) -> None:
    port = 20000 + os.getpid() % 10000
    conf = folder / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nsys_interval 1\nmax_queued_messages 100000\n")
    broker = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    site = Broker("127.0.0.1", port, BASE)
    nodes = SimulatedFleet(count, folder / "nodes", "127.0.0.1", port, BASE, made["live"].parent, made["key"],
                           REPO / "config" / "example.yaml", rate)
    try:
        nodes.start_all()
        seen = Watcher(site)
        started = time.monotonic()
        seen.wait(lambda: all(seen.online.get(n) for n in nodes.nodes), 900)
        print(f"N={count}: all online after {time.monotonic() - started:.1f} s (load {loadavg()})")
        time.sleep(10)  # past start-up: compiles and discovery
        sys_counters = SysCounters(port)
        pids = [p.pid for p in nodes.processes.values()]
        before = [cpu_seconds(pid) for pid in pids], cpu_seconds(broker.pid), sys_counters.now()
        idle_from = time.monotonic()
        time.sleep(30)
        idle_s = time.monotonic() - idle_from
        after = [cpu_seconds(pid) for pid in pids], cpu_seconds(broker.pid), sys_counters.now()
        node_cpu = [(b - a) / idle_s * 100 for a, b in zip(before[0], after[0])]
        rss = [rss_mib(pid) for pid in pids]
        print(f"  idle at {rate:g} Hz: per node CPU {sum(node_cpu) / count:.1f} % of a core (max {max(node_cpu):.1f}), "
              f"RSS {sum(rss) / count:.0f} MiB (max {max(rss):.0f}); broker CPU "
              f"{(after[1] - before[1]) / idle_s * 100:.1f} %, RSS {rss_mib(broker.pid):.1f} MiB (load {loadavg()})")
        idle_counts = {k: (after[2][k] - before[2][k]) / idle_s for k in after[2]}
        plan = Plan(tuple(nodes.nodes), site, stages=("100%",), shadow_ticks=windows, live_ticks=windows,
                    stage_timeout_s=900)
        counters, cpu_from, began = sys_counters.now(), cpu_seconds(broker.pid), time.monotonic()
        assert rollout(made["good"], plan, lambda line: None) == 0, "the good version did not reach every node"
        took = time.monotonic() - began
        counters_after, cpu_to = sys_counters.now(), cpu_seconds(broker.pid)
        floor = 2 * 2 * windows / rate
        print(f"  announce -> live on all {count}: {took:.1f} s, {took / floor:.2f}x its floor (the windows: "
              "shadow_ticks "
              f"and live_ticks at {rate:g} Hz, for the canary and then the rest: {floor:.0f} s; load {loadavg()})")
        print(f"  broker during it: CPU {(cpu_to - cpu_from) / took * 100:.1f} %, RSS {rss_mib(broker.pid):.1f} MiB")
        span = took + 1.1
        for key in ("messages/sent", "bytes/sent", "messages/received", "bytes/received"):
            total = counters_after[key] - counters[key]
            print(f"  {key} per node: {total / count:,.0f} during the rollout; idle telemetry over as long: "
                  f"{idle_counts[key] * span / count:,.0f}")
        began = time.monotonic()
        assert rollout(made["bad"], Plan(tuple(nodes.nodes), site, shadow_ticks=3, live_ticks=windows,
                                         stage_timeout_s=900), lambda line: None) == 1
        print(f"  bad version: announce -> rolled back on the canary and stopped: {time.monotonic() - began:.1f} s "
              f"(load {loadavg()})")
        seen.close()
        sys_counters.client.loop_stop()
    finally:
        nodes.stop_all()
        broker.terminate()
        broker.wait()


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--rate-hz", type=float, default=2.0)
    parser.add_argument("--windows", type=int, default=10, help="shadow_ticks and live_ticks")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        made = prepare(Path(tmp))
        for count in args.nodes:
            folder = Path(tmp) / f"n{count}"
            folder.mkdir()
            measure(count, args.rate_hz, args.windows, folder, made)


if __name__ == "__main__":
    main()
