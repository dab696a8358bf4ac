"""Hot reload: from a plugin file landing in the folder to the plugin being live, and what it costs the loop.

The daemon runs in real time at 10 Hz on mock pins (the example config, its simulation and the three
bundled plugins). Each round lands one plugin file, `late.wasm`, and times from the moment the file is
complete (the rename done, or the writer's close) to the moment the loop calls the new version:

- rename: written aside and renamed over (the atomic way to install a plugin);
- copy:   written in place, in two halves a tick apart, then closed;
- warm/cold: the same module again (wasmtime's compile cache hits) or one never seen (a custom section
  with a fresh nonce makes it new to the cache, so it pays a cold compile).

Then the same number of ticks without reloads, to compare the loop's tick duration and start jitter.

    python benchmarks/plugin_reload.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from pi_controller import config, logs
from pi_controller.clock import SystemClock
from pi_controller.daemon import Daemon
from pi_controller.observer import LoopObserver, TickReport

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "tests" / "plugins" / "counter.wasm"


def fresh(module: bytes) -> bytes:
    """`module` with a custom section holding a nonce: valid, same behaviour, new to every cache."""
    name, nonce = b"nonce", os.urandom(16)
    body = bytes([len(name)]) + name + nonce
    return module + b"\x00" + bytes([len(body)]) + body


async def land(folder: Path, content: bytes, how: str) -> float:
    """Write `late.wasm` as `how` says; the perf_counter time at which the file is complete."""
    target = folder / "late.wasm"
    if how == "rename":
        (folder / ".late.tmp").write_bytes(content)
        os.replace(folder / ".late.tmp", target)
        return time.perf_counter()
    with open(target, "wb") as out:
        out.write(content[:len(content) // 2])
        out.flush()
        await asyncio.sleep(0.1)
        out.write(content[len(content) // 2:])
    return time.perf_counter()


async def live_after(daemon: Daemon, landed: float, sha256: str) -> float:
    """Seconds from `landed` until the loop has called the version `sha256` of `late`."""
    while (status := daemon.plugins.status.get("late")) is None or status.sha256 != sha256:
        await asyncio.sleep(0.001)
    calls = daemon.loop.plugin_stats["late"].calls if "late" in daemon.loop.plugin_stats else 0
    while daemon.loop.plugin_stats.get("late") is None or daemon.loop.plugin_stats["late"].calls == calls:
        await asyncio.sleep(0.001)  # swapped in between two ticks: the next tick calls it
    return time.perf_counter() - landed


async def measure(daemon: Daemon, folder: Path, rounds: int) -> dict[str, list[float]]:
    module = SOURCE.read_bytes()
    warm = (module, fresh(module))  # two versions, each compiled once before timing: cache hits
    for content in warm:
        await live_after(daemon, await land(folder, content, "rename"), hashlib.sha256(content).hexdigest())
    results: dict[str, list[float]] = {}
    for how in ("rename", "copy"):
        for cache in ("warm", "cold"):
            samples = results.setdefault(f"{how:>6} {cache}", [])
            for index in range(rounds):
                content = fresh(module) if cache == "cold" else warm[index % 2]
                landed = await land(folder, content, how)
                samples.append(await live_after(daemon, landed, hashlib.sha256(content).hexdigest()))
                await asyncio.sleep(0.25)
    return results


def make_daemon(folder: Path) -> Daemon:
    data = yaml.safe_load((REPO / "config" / "example.yaml").read_text())
    data["plugins"]["directory"] = str(folder)
    path = folder.parent / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    for name in ("temperature_control", "motion_light", "energy_saver"):
        (folder / f"{name}.wasm").write_bytes((REPO / "plugins" / f"{name}.wasm").read_bytes())
    return Daemon(config.load(path), simulate=True, clock=SystemClock())


class Recorder(LoopObserver):
    """Every tick's report, as the loop gives it to its observers."""

    def __init__(self) -> None:
        self.reports: list[TickReport] = []

    def tick_done(self, report: TickReport) -> None:
        self.reports.append(report)

    def since(self, start: int) -> dict[str, Any]:
        """Tick count, missed ticks, p99 duration and p99 start jitter from report `start` on."""
        reports = self.reports[start:]
        durations = sorted(r.duration for r in reports)
        jitter = sorted(r.jitter for r in reports)
        return {"ticks": len(reports), "missed": sum(r.missed for r in reports),
                "duration_p99_ms": durations[int(0.99 * len(durations))] * 1e3,
                "jitter_p99_ms": jitter[int(0.99 * len(jitter))] * 1e3}


async def run(daemon: Daemon, folder: Path, rounds: int
              ) -> tuple[dict[str, list[float]], dict[str, Any], dict[str, Any]]:
    recorder = Recorder()
    daemon.loop.observers = [*daemon.loop.observers, recorder]
    serving = asyncio.create_task(daemon.serve())
    while len(recorder.reports) < 5:
        await asyncio.sleep(0.01)
    start = len(recorder.reports)
    latencies = await measure(daemon, folder, rounds)
    during = recorder.since(start)
    start = len(recorder.reports)
    while len(recorder.reports) < start + during["ticks"]:
        await asyncio.sleep(0.05)
    quiet = recorder.since(start)
    signal.raise_signal(signal.SIGINT)
    await serving
    return latencies, during, quiet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="files landed per kind (default 10)")
    args = parser.parse_args()
    logs.configure("console", "warning")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "plugins"
        folder.mkdir()
        daemon = make_daemon(folder)
        try:
            latencies, during, quiet = asyncio.run(run(daemon, folder, args.rounds))
        finally:
            daemon.close()
    print(f"file landed -> new version called by the loop ({args.rounds} rounds each, 10 Hz loop):")
    for kind, samples in latencies.items():
        print(f"  {kind}: median {statistics.median(samples) * 1e3:6.1f} ms   max {max(samples) * 1e3:6.1f} ms")
    worst = max(max(s) for s in latencies.values())
    print(f"  worst {worst * 1e3:.0f} ms = {worst:.2f} of the 1 s target")
    print(f"ticks while reloading: {during['ticks']}, missed {during['missed']}, "
          f"p99 duration {during['duration_p99_ms']:.2f} ms, p99 start jitter {during['jitter_p99_ms']:.2f} ms")
    print(f"ticks without reloads: {quiet['ticks']}, missed {quiet['missed']}, "
          f"p99 duration {quiet['duration_p99_ms']:.2f} ms, p99 start jitter {quiet['jitter_p99_ms']:.2f} ms")
    print(f"ratio reloading/quiet: p99 duration {during['duration_p99_ms'] / quiet['duration_p99_ms']:.2f}x, "
          f"p99 jitter {during['jitter_p99_ms'] / max(quiet['jitter_p99_ms'], 1e-3):.2f}x")


if __name__ == "__main__":
    main()
