"""What a plugin pays for the daemon's host functions, against a floor measured in the same run.

One plugin (tests/plugins/host_calls.wasm) called through the daemon's SandboxedPlugin on the same
context, in modes that differ only in their host calls:
- floor: parse the context and return `[]` (mode "log" with no line)
- one `pi_history` read of 10, 100 and 600 readings, parsed by the Zig PDK into a mean (mode "mean")
- eight `pi_history` reads of one reading each (mode "reads": the per-call maximum by default)
- one `pi_log` line at debug level with debug off (dropped before parsing), and at info level
  (rendered, to /dev/null)
Plus the tick's own share: `History.record` of 12 readings. Rounds alternate between modes so
machine noise hits all alike; medians are reported.

    python benchmarks/host_functions.py [--calls 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pi_controller import logs
from pi_controller.config import HostFunctionSettings, PluginSettings, PluginsSettings
from pi_controller.contract import Reading
from pi_controller.plugins.host_functions import History
from pi_controller.plugins.plugin_set import PluginSet
from pi_controller.plugins.sandbox import SandboxedPlugin

REPO = Path(__file__).resolve().parent.parent
MODES: dict[str, dict[str, Any]] = {
    "floor (no host call)": {"mode": "log", "count": 0},
    "pi_history x1, 10 readings": {"mode": "mean", "count": 10},
    "pi_history x1, 100 readings": {"mode": "mean", "count": 100},
    "pi_history x1, 600 readings": {"mode": "mean", "count": 600},
    "pi_history x8, 1 reading": {"mode": "reads", "count": 8},
    "pi_log x1, debug off": {"mode": "log", "count": 1, "level": 0},
    "pi_log x1, info": {"mode": "log", "count": 1, "level": 1},
}
SENSORS = 12


def readings(tick: int) -> list[Reading]:
    return [Reading(f"s{i}" if i else "temperature", 20.0 + i + tick * 0.001, "C", 1.7e9 + tick * 0.1)
            for i in range(SENSORS)]


def plugin_for(folder: Path, name: str, config: dict[str, Any]) -> tuple[PluginSet, SandboxedPlugin]:
    sub = folder / name.replace(" ", "_").replace(",", "")
    sub.mkdir()
    shutil.copy(REPO / "tests" / "plugins" / "host_calls.wasm", sub / "host_calls.wasm")
    host = HostFunctionSettings(log_lines_per_s=1000, log_burst=10_000)  # measure the line, not the limit
    # Fuel past the default 2,000,000: the Zig PDK's JSON parse of 600 readings takes about 4,500,000.
    settings = PluginSettings(config=config, fuel=20_000_000)
    plugins = PluginSet(PluginsSettings(host=host, settings={"host_calls": settings}), sub, budget_ms=1000)
    plugins.load_all()
    for tick in range(700):
        plugins.history.record(readings(tick))
    (plugin,) = plugins
    return plugins, plugin


def time_calls(plugin: SandboxedPlugin, context: bytes, calls: int) -> float:
    started = time.perf_counter()
    for tick in range(calls):
        plugin.call(context, tick)
    return (time.perf_counter() - started) / calls


def time_record(calls: int) -> float:
    history, batch = History(600), readings(0)
    started = time.perf_counter()
    for _ in range(calls):
        history.record(batch)
    return (time.perf_counter() - started) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    logs.configure("console", "info")
    sys.stderr = open("/dev/null", "w")  # the info lines are rendered, then thrown away
    context = json.dumps({"sensor_readings": [r.as_json() for r in readings(0)], "device_states": {},
                          "timestamp": 1.7e9, "tick": 0})[:-1].encode()  # the daemon splices config in
    with tempfile.TemporaryDirectory() as tmp:
        sets = {name: plugin_for(Path(tmp), name, config) for name, config in MODES.items()}
        samples: dict[str, list[float]] = {name: [] for name in MODES}
        samples["History.record, 12 readings"] = []
        for _ in range(args.rounds):
            for name, (_, plugin) in sets.items():
                samples[name].append(time_calls(plugin, context, args.calls))
            samples["History.record, 12 readings"].append(time_record(args.calls * 10))
        for plugins, _ in sets.values():
            plugins.close()
    floor = statistics.median(samples["floor (no host call)"])
    print(f"plugin call with host functions, medians of {args.rounds} rounds x {args.calls} calls", file=sys.__stdout__)
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"{name:>30}: {median * 1e6:8.1f} us  ({median / floor:5.2f}x a call with no host call)",
              file=sys.__stdout__)


if __name__ == "__main__":
    main()
