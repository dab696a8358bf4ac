"""How long the bundled plugins' calls take on a saturated machine, and whether any reaches its backstop.

The daemon runs the example config on simulated pins at its rate on the real clock, as the service does,
while `--busy` processes spin (`python3 -c 'while True: pass'`, four by default: both cores of this
machine saturated twice over). Every call's wall-clock time is noted. A call is cut off only at its
backstop (`plugins/backstop.py`); `--backstop-ms` replaces it for the run (a large one shows how long
calls take when nothing cuts them off, which is what the backstop must stay above).

    python benchmarks/stalls.py [--ticks 10000] [--busy 4] [--backstop-ms MS]

Prints the backstop each plugin got, the call times (p50, p99, p99.9, max) per plugin, how many calls
took longer than a few thresholds, the stalls and state resets the loop counted, missed ticks, and the
load average before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from pi_controller import config, logs
from pi_controller.clock import SystemClock
from pi_controller.daemon import Daemon
from pi_controller.observer import LoopObserver
from pi_controller.plugins import backstop, plugin_set

REPO = Path(__file__).resolve().parent.parent
THRESHOLDS_MS = (5, 13, 25, 50, 100, 250)


class FixedBackstop(backstop.Backstop):
    def __init__(self, ms: int):
        super().__init__(real=True)
        self._ms = ms

    def ms(self, fuel: int, timeout_ms: int) -> int:
        return self._ms


def measure(ticks: int, fixed_ms: int | None) -> tuple[dict[str, list[float]], dict[str, Any], dict[str, int]]:
    if fixed_ms is not None:
        plugin_set.Backstop = lambda real: FixedBackstop(fixed_ms)  # type: ignore[assignment,misc]  # this run only
    settings = config.load(REPO / "config" / "example.yaml")
    durations: dict[str, list[float]] = defaultdict(list)

    class Probe(LoopObserver):
        def plugin_called(self, plugin: str, seconds: float, failed: bool) -> None:
            durations[plugin].append(seconds)

    daemon = Daemon(settings, simulate=True, clock=SystemClock())
    daemon.loop.observers = [*daemon.loop.observers, Probe()]
    daemon.loop._call_observers = [*daemon.loop._call_observers, daemon.loop.observers[-1]]
    backstops = {p.name: p.backstop_ms for p in daemon.plugins}
    try:
        asyncio.run(daemon.serve(ticks))
        snapshot = daemon.status.snapshot()
    finally:
        daemon.close()
    return durations, snapshot, backstops


def percentile(ordered: list[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=10_000)
    parser.add_argument("--busy", type=int, default=4, help="spinning processes beside the daemon")
    parser.add_argument("--backstop-ms", type=int, help="every plugin's backstop for this run (default: as sized)")
    args = parser.parse_args()
    logs.configure("console", "warning")
    before = os.getloadavg()
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    started = time.monotonic()
    try:
        durations, snapshot, backstops = measure(args.ticks, args.backstop_ms)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    print(f"{args.ticks} ticks at 10 Hz with {args.busy} spinning processes, {time.monotonic() - started:.0f} s; "
          f"load average before {before[0]:.2f}, at the end {os.getloadavg()[0]:.2f} (1 min) "
          f"{os.getloadavg()[1]:.2f} (5 min)")
    print(f"ns per unit of fuel here: {backstop.ns_per_fuel():.3f}; missed ticks: {snapshot['ticks']['missed']}")
    for name, seconds in sorted(durations.items()):
        ordered = sorted(seconds)
        stats = snapshot["plugins"][name]
        over = ", ".join(f">{t} ms: {sum(s > t / 1000 for s in ordered)}" for t in THRESHOLDS_MS)
        print(f"{name}: backstop {backstops[name]} ms; {len(ordered)} calls; "
              f"us p50 {percentile(ordered, 0.5) * 1e6:.0f} p99 {percentile(ordered, 0.99) * 1e6:.0f} "
              f"p99.9 {percentile(ordered, 0.999) * 1e6:.0f} "
              f"max {ordered[-1] * 1e6:.0f}; {over}; stalls {stats['stalls']}, resets {stats['resets']}, "
              f"errors {stats['errors']}")


if __name__ == "__main__":
    main()
