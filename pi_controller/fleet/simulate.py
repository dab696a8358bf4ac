"""`pi-controller fleet simulate N`: N daemons on simulated pins against one broker, on one machine, each
with its own node id, config, plugins folder and state folder, for trying a rollout (and for the tests
and benchmarks/fleet.py, which drive `SimulatedFleet` directly).

Each node is the example config's (or `--node-config`'s) world at `--rate-hz` (2 Hz by default: 50 nodes
fit 2 cores; benchmarks/fleet.py measures the CPU and memory per node), with the plugins of `--plugins`
(its one live version of each) and `--trusted-key` the key a rollout must be signed with.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from pi_controller.files import path_argument

DEFAULT_RATE_HZ = 2.0


class SimulatedFleet:
    def __init__(self, count: int, folder: Path, host: str, port: int, base_topic: str, plugins: Path,
                 trusted_key: Path, node_config: Path, rate_hz: float = DEFAULT_RATE_HZ,
                 plugin_settings: dict[str, Any] | None = None):
        self.folder = folder.resolve()
        self.nodes = [f"node-{index:02d}" for index in range(count)]
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        template = yaml.safe_load(node_config.read_text())
        for node in self.nodes:
            home = self.folder / node
            (home / "state").mkdir(parents=True, exist_ok=True)
            shutil.copytree(plugins, home / "plugins", dirs_exist_ok=True)
            data = dict(template)
            data["loop"] = {**data.get("loop", {}), "rate_hz": rate_hz}
            data["mqtt"] = {"enabled": True, "host": host, "port": port, "base_topic": base_topic, "node_id": node,
                            "fleet": True, "discovery": True}
            data["plugins"] = {**data.get("plugins", {}), "directory": str(home / "plugins"),
                               "trusted_keys": [str(trusted_key.resolve())], "watch": True,
                               "settings": plugin_settings or {}}
            data["metrics"] = {"enabled": False}
            (home / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    def start(self, node: str) -> None:
        home = self.folder / node
        log = (home / "daemon.log").open("ab")
        self.processes[node] = subprocess.Popen(
            [sys.executable, "-m", "pi_controller", "run", "--config", str(home / "config.yaml"), "--simulate",
             "--state-dir", str(home / "state"), "--log-format", "json"],
            stdout=subprocess.DEVNULL, stderr=log, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        log.close()

    def start_all(self, but: tuple[str, ...] = ()) -> None:
        for node in self.nodes:
            if node not in but:
                self.start(node)

    def stop(self, node: str) -> int:
        """SIGTERM, as systemd stops a node: it says offline on its way out."""
        process = self.processes.pop(node)
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(60)
        except subprocess.TimeoutExpired:  # a node stuck on its way out: its pins are simulated
            process.kill()
            return process.wait()

    def stop_all(self) -> None:
        for node in list(self.processes):
            self.stop(node)

    def log(self, node: str) -> str:
        return (self.folder / node / "daemon.log").read_text(errors="replace")


def add_command(actions: Any, run: Callable[[Callable[[argparse.Namespace, Any], int]], Callable[..., int]]) -> None:
    command = actions.add_parser("simulate", help="N daemons on simulated pins against the plan's broker")
    command.add_argument("count", type=int, help="how many nodes (node-00, node-01, ...)")
    command.add_argument("--config", type=path_argument, required=True, help="fleet.yaml (its broker)")
    command.add_argument("--dir", type=path_argument, required=True,
                         help="where each node's config, plugins and state go")
    command.add_argument("--plugins", type=path_argument, required=True, help="the plugins every node starts with")
    command.add_argument("--trusted-key", type=path_argument, required=True,
                         help="the public key rollouts are signed with")
    command.add_argument("--node-config", type=path_argument, default=Path("config/example.yaml"),
                         help="the config each node's is made from (default: config/example.yaml)")
    command.add_argument("--rate-hz", type=float, default=DEFAULT_RATE_HZ, help="each node's tick rate (default 2)")
    command.set_defaults(handler=run(_simulate))


def _simulate(args: argparse.Namespace, plan: Any) -> int:
    if not 1 <= args.count <= 200:
        print("error: fleet simulate runs 1 to 200 nodes", file=sys.stderr)
        return 2
    fleet = SimulatedFleet(args.count, args.dir, plan.broker.host, plan.broker.port, plan.broker.base_topic,
                           args.plugins, args.trusted_key, args.node_config, args.rate_hz)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    fleet.start_all()
    print(f"{args.count} nodes running ({', '.join(fleet.nodes[:3])}...), logs in {args.dir}/NODE/daemon.log; "
          "Ctrl-C stops them")
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        fleet.stop_all()
    return 0
