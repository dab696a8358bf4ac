"""Timing quality of the real-time loop: how late each tick starts, how long it takes, what CPU it costs.

The daemon runs the example config on simulated pins at its rate on the real clock, idle and with one
and two cores kept busy by spinning processes; beside it, in the same conditions, a bare asyncio loop
waking on `asyncio.sleep(deadline - now)` (the floor the event loop alone gives) is measured too.

    python benchmarks/jitter.py [--ticks 300] [--rate 10] [--policies default,nice,fifo]

Prints, per load: start jitter p50/p99/max and tick duration p50/p99/max in microseconds, and the
daemon's CPU share (process CPU time over wall time). With --policies the daemon is measured once per
scheduling policy, what the unit's `Nice=-5` (`nice`) or `CPUSchedulingPolicy=fifo` with
`CPUSchedulingPriority=10` (`fifo`) would give it (needs root, as the service has).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from pi_controller import config, logs
from pi_controller.clock import SystemClock
from pi_controller.daemon import Daemon
from pi_controller.observer import LoopObserver, TickReport

REPO = Path(__file__).resolve().parent.parent


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def spread(samples: list[float]) -> str:
    ordered = sorted(samples)
    p = lambda f: ordered[min(len(ordered) - 1, int(f * len(ordered)))] * 1e6
    return f"p50 {p(0.5):7.0f}  p99 {p(0.99):7.0f}  max {ordered[-1] * 1e6:7.0f}"


def daemon(ticks: int, rate: float) -> tuple[list[float], list[float], float]:
    settings = config.load(REPO / "config" / "example.yaml")
    settings = dataclasses.replace(settings, loop=dataclasses.replace(settings.loop, rate_hz=rate))
    jitters: list[float] = []
    durations: list[float] = []

    class Probe(LoopObserver):
        def tick_done(self, report: TickReport) -> None:
            jitters.append(max(0.0, report.jitter))
            durations.append(report.duration)

    instance = Daemon(settings, simulate=True, clock=SystemClock())
    instance.loop.observers = [*instance.loop.observers, Probe()]
    try:
        started_cpu, started = cpu_s(), time.monotonic()
        asyncio.run(instance.serve(ticks))
        share = (cpu_s() - started_cpu) / (time.monotonic() - started)
    finally:
        instance.close()
    return jitters, durations, share


@contextlib.contextmanager
def scheduled(policy: str) -> Iterator[None]:
    """This thread (and the threads it starts) under `policy`, as systemd would start the service."""
    if policy == "nice":
        os.setpriority(os.PRIO_PROCESS, 0, -5)
    elif policy == "fifo":
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    try:
        yield
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, 0, 0)


def floor(ticks: int, rate: float) -> list[float]:
    """A bare asyncio loop: sleep to each deadline, note how late it woke."""
    async def run() -> list[float]:
        period, late = 1.0 / rate, []
        t0 = time.monotonic()
        for k in range(1, ticks + 1):
            deadline = t0 + k * period
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            late.append(max(0.0, time.monotonic() - deadline))
        return late

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=300)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--policies", default="default", help="comma-separated: default, nice, fifo")
    args = parser.parse_args()
    policies = args.policies.split(",")
    logs.configure("console", "warning")
    print(f"{args.ticks} ticks at {args.rate:g} Hz; microseconds")
    for busy in (0, 1, 2):
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            bare = floor(args.ticks, args.rate)
            measured = {}
            for policy in policies:
                with scheduled(policy):
                    measured[policy] = daemon(args.ticks, args.rate)
        finally:
            for spinner in spinners:
                spinner.kill()
                spinner.wait()
        print(f"{busy} cores busy")
        print(f"  asyncio floor start jitter    {spread(bare)}")
        for policy, (jitters, durations, share) in measured.items():
            print(f"  daemon{'' if policies == ['default'] else f' under {policy}'}:")
            print(f"    start jitter              {spread(jitters)}")
            print(f"    tick duration             {spread(durations)}   (p99/median "
                  f"{sorted(durations)[int(0.99 * len(durations))] / statistics.median(durations):.1f})")
            print(f"    CPU share                 {share * 100:.1f} %")


if __name__ == "__main__":
    main()
