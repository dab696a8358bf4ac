"""Start to first tick, and memory, of the daemon against a floor doing the same start-up work (issue 17).

The daemon runs `pi-controller run --simulate` as systemd would start it: the time is from the process's
start to its READY=1 (sent after the first tick) on a NOTIFY_SOCKET of ours; its memory is the resident
set (VmRSS, and the peak VmHWM) read from /proc while it runs `--ticks` ticks. Two setups: the bundled
example (3 plugins) and the example with every bundled plugin copied to make `--plugins` in all.

The floor, started the same way in the same run: a Python process that imports the same libraries
(extism, gpiozero, yaml, structlog, paho), compiles the same modules through the SDK with the same fuel
limit, instantiates them and calls each once. Caches are warm: one unmeasured start of each goes first.

    python benchmarks/startup.py [--runs 5] [--plugins 10] [--ticks 30]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from copy import deepcopy as copy_of
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "example.yaml"

FLOOR = """
import sys, extism, gpiozero, yaml, structlog, paho.mqtt.client
from pi_controller.plugins.extism_adapter import compile_module, call
import json, base64
paths = sys.argv[1:]
instances = []
for path in paths:
    data = base64.b64encode(open(path, "rb").read()).decode()
    manifest = json.dumps({"wasm": [{"data": data}], "memory": {"max_pages": 32}, "timeout_ms": 100})
    instances.append(compile_module(manifest.encode(), False, 2_000_000, None).instantiate())
context = b'{"sensor_readings":[],"device_states":{},"timestamp":0.0,"tick":0,"config":{}}'
for instance in instances:
    try:
        call(instance, b"control_logic", context)
    except extism.Error:
        pass
import os, socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
import time
time.sleep(float(os.environ["FLOOR_HOLD_S"]))
"""


def started(command: list[str], env: dict[str, str], folder: Path) -> tuple[float, int, int]:
    """Seconds from start to READY=1, then the last VmRSS and the VmHWM seen until it exits (KiB)."""
    address = str(folder / f"notify-{time.monotonic_ns()}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    begun = time.monotonic()
    process = subprocess.Popen(command, env={**os.environ, **env, "NOTIFY_SOCKET": address},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sock.settimeout(60)
        while not sock.recv(4096).startswith(b"READY=1"):
            pass
        ready = time.monotonic() - begun
        rss = peak = 0
        while process.poll() is None:
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
                fields = dict(line.split(":", 1) for line in status.splitlines())
            except (OSError, ValueError):
                break
            if "VmRSS" not in fields:  # exiting: its memory is gone already
                break
            rss, peak = int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
            time.sleep(0.02)
        return ready, rss, peak
    finally:
        process.kill()
        process.wait()
        sock.close()


def copies(folder: Path, count: int) -> Path:
    """The example's config with its bundled plugins copied (with their manifests and settings) to `count`."""
    data = yaml.safe_load(EXAMPLE.read_text())
    source = (EXAMPLE.parent / data["plugins"]["directory"]).resolve()
    plugins = folder / "plugins"
    plugins.mkdir()
    bundled = sorted(path.stem for path in source.glob("*.wasm"))
    settings = data["plugins"].setdefault("settings", {})
    for i in range(count):
        name = bundled[i % len(bundled)]
        copy = name if i < len(bundled) else f"{name}_{i}"
        shutil.copy(source / f"{name}.wasm", plugins / f"{copy}.wasm")
        manifest = yaml.safe_load((source / f"{name}.yaml").read_text())
        (plugins / f"{copy}.yaml").write_text(yaml.safe_dump({**manifest, "name": copy}))
        if name in settings and copy != name:
            settings[copy] = copy_of(settings[name])
    data["plugins"]["directory"] = str(plugins)
    data["plugins"]["defaults"]["timeout_ms"] = 5  # so that ten timeouts fit the tick's plugin budget
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def measure(label: str, daemon: list[str], floor: list[str], runs: int, folder: Path) -> None:
    results: dict[str, list[tuple[float, int, int]]] = {"daemon": [], "floor": []}
    for command in (daemon, floor):  # warm caches, unmeasured
        started(command, {"FLOOR_HOLD_S": "1"}, folder)
    for _ in range(runs):  # alternating, so machine noise hits both alike
        results["daemon"].append(started(daemon, {}, folder))
        results["floor"].append(started(floor, {"FLOOR_HOLD_S": "1"}, folder))
    medians = {who: [statistics.median(column) for column in zip(*samples)] for who, samples in results.items()}
    (d_ready, d_rss, d_peak), (f_ready, f_rss, f_peak) = medians["daemon"], medians["floor"]
    print(f"{label}:")
    print(f"  start to first tick: daemon {d_ready:5.2f} s, floor {f_ready:5.2f} s ({d_ready / f_ready:.2f}x floor)")
    print(f"  resident memory:     daemon {d_rss / 1024:5.1f} MiB (peak {d_peak / 1024:5.1f}), "
          f"floor {f_rss / 1024:5.1f} MiB (peak {f_peak / 1024:5.1f}) ({d_rss / f_rss:.2f}x floor)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--plugins", type=int, default=10)
    parser.add_argument("--ticks", type=int, default=30, help="ticks the daemon runs while its memory is read")
    args = parser.parse_args()
    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for label, config in (("bundled example (3 plugins)", EXAMPLE),
                              (f"example with {args.plugins} plugins", copies(folder, args.plugins))):
            settings = yaml.safe_load(config.read_text())
            plugin_dir = (config.parent / settings["plugins"]["directory"]).resolve()
            daemon = [python, "-m", "pi_controller", "run", "--simulate", "--config", str(config),
                      "--ticks", str(args.ticks), "--log-level", "warning"]
            floor = [python, "-c", FLOOR, *map(str, sorted(plugin_dir.glob("*.wasm")))]
            measure(label, daemon, floor, args.runs, folder)


if __name__ == "__main__":
    main()
