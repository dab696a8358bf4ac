"""The daemon's tick against the floor: the same work done directly, measured in the same run.

Work per tick: 12 sensor reads on gpiozero mock pins (4 MCP3008 channels over the simulated SPI bus, 8 GPIO
inputs), one context encode, 3 Extism plugin calls (two bundled plugins and `sweep`, which commands all
8 actuators with values that change every tick), 3 output decodes, 8 actuator writes.

The floor does exactly that with no validation, arbitration, stats or scheduling. The daemon is
measured twice: its tick body (`ControlLoop.tick`) and whole loop iterations (`Daemon.serve` on a
virtual clock, so scheduling costs are counted but no time is spent sleeping). Rounds alternate
between floor and daemon so machine noise hits both alike; medians of the rounds are reported.

    python benchmarks/tick.py [--ticks 1000] [--rounds 5] [--record FILE]

With --record the daemon records every tick (`record`): the loop iteration then includes encoding
each tick's line (after the tick, in `tick_done`), and a row measures that encode alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import extism
import yaml
from gpiozero import MCP3008, AngularServo, Device, DigitalInputDevice, OutputDevice, PWMOutputDevice
from pi_controller.simulators.adc import SimulatedMCP3008

from pi_controller import config, logs
from pi_controller.clock import VirtualClock
from pi_controller.daemon import Daemon
from pi_controller.devices.pins import mock_factory
from pi_controller.sim import record
from pi_controller.simulators.adc import SimulatedMCP3008

REPO = Path(__file__).resolve().parent.parent
PLUGINS = {"temperature_control": REPO / "plugins", "energy_saver": REPO / "plugins",
           "sweep": REPO / "tests" / "plugins"}
ADC_CHANNELS = 4
INPUT_PINS = (4, 5, 6, 16, 17, 22, 23, 24)
PWM_PINS = (18, 19, 25, 26)
RELAY_PINS = (20, 27)
SERVO_PINS = (12, 13)
MEMORY_PAGES, TIMEOUT_MS = 32, 10


def config_data(plugin_dir: Path) -> dict[str, Any]:
    sensors: list[dict[str, Any]] = [
        {"id": "temperature_sensor" if ch == 0 else f"adc{ch}", "kind": "mcp3008", "channel": ch,
         "unit": "celsius", "scale": 330.0, "offset": -50.0} for ch in range(ADC_CHANNELS)]
    sensors += [{"id": f"input{pin}", "kind": "motion", "pin": pin} for pin in INPUT_PINS]
    actuators: list[dict[str, Any]] = [{"id": f"pwm{pin}", "kind": "pwm", "pin": pin} for pin in PWM_PINS]
    actuators += [{"id": "relay_switch" if pin == 27 else f"relay{pin}", "kind": "relay", "pin": pin}
                  for pin in RELAY_PINS]
    actuators += [{"id": f"servo{pin}", "kind": "servo", "pin": pin} for pin in SERVO_PINS]
    return {
        "pins": {"factory": "mock"}, "sensors": sensors, "actuators": actuators,
        "plugins": {"directory": str(plugin_dir),
                    "defaults": {"memory_pages": MEMORY_PAGES, "timeout_ms": TIMEOUT_MS},
                    "settings": {"energy_saver": {"config": {"sensor": "adc1", "light": "pwm18"}}}},
    }


class Floor:
    """The same reads, encode, calls, decodes and writes, written directly against the libraries."""

    def __init__(self, settings: config.Settings):
        self.factory = mock_factory(settings)
        Device.pin_factory = self.factory  # gpiozero's software SPI needs the default factory
        self.adc = SimulatedMCP3008(self.factory, 0)
        self.adc.fractions[0] = 71 / 330
        self.sensors: list[tuple[str, Any, Callable[[Any], float]]] = [
            (s.id, MCP3008(channel=s.channel, pin_factory=self.factory), lambda d: d.value * 330 - 50)
            for s in settings.sensors if s.kind == "mcp3008"]
        self.sensors += [(s.id, DigitalInputDevice(s.pin, pull_up=False, pin_factory=self.factory),
                          lambda d: d.value) for s in settings.sensors if s.kind == "motion"]
        self.devices = {a.id: self._device(a) for a in settings.actuators}
        self.states = {a.id: {"type": a.kind, "on": False, "value": 0.0} for a in settings.actuators}
        self.plugins: list[tuple[extism.Plugin, bytes]] = []
        for name, folder in PLUGINS.items():
            own = settings.plugins.settings.get(name)
            manifest = {"wasm": [{"data": (folder / f"{name}.wasm").read_bytes()}],
                        "memory": {"max_pages": MEMORY_PAGES}, "timeout_ms": TIMEOUT_MS}
            suffix = b',"config":' + json.dumps(dict(own.config) if own else {}).encode() + b"}"
            self.plugins.append((extism.Plugin(manifest, wasi=False, functions=[]), suffix))

    def _device(self, a: Any) -> Any:
        if a.kind == "pwm":
            return PWMOutputDevice(a.pin, pin_factory=self.factory)
        if a.kind == "relay":
            return OutputDevice(a.pin, pin_factory=self.factory)
        return AngularServo(a.pin, pin_factory=self.factory)

    def tick(self, number: int) -> None:
        now = time.time()
        readings = [{"sensor_id": sid, "value": float(read(dev)), "unit": "x", "timestamp": now, "valid": True}
                    for sid, dev, read in self.sensors]
        body = {"sensor_readings": readings, "device_states": self.states, "timestamp": now, "tick": number}
        context = json.dumps(body, separators=(",", ":"))[:-1].encode()
        for plugin, config_suffix in self.plugins:
            commands = json.loads(plugin.call("control_logic", context + config_suffix))
            for c in commands:
                self._write(c)

    def _write(self, c: dict[str, Any]) -> None:
        device, parameters = self.devices[c["device_id"]], c.get("parameters", {})
        if c["action"] == "pwm":
            value = device.value = parameters["duty_cycle"] / 100
        elif c["action"] == "set_angle":
            value = device.angle = parameters["angle"]
        else:
            value = device.value = c["action"] == "set_high"
        self.states[c["device_id"]] = {"type": self.states[c["device_id"]]["type"], "on": bool(value),
                                       "value": float(value)}

    def close(self) -> None:
        self.adc.close()
        for _, device, _ in self.sensors:
            device.close()
        for device in self.devices.values():
            device.close()


def per_tick(run: Callable[[int], None], ticks: int) -> float:
    start = time.perf_counter()
    run(ticks)
    return (time.perf_counter() - start) / ticks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=1000)  # amortizes serve()'s start-up over many ticks
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--record", type=Path, help="record the daemon's ticks to this file (.gz: gzip)")
    args = parser.parse_args()
    logs.configure("console", "warning")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "plugins"
        folder.mkdir()
        for name, source in PLUGINS.items():
            (folder / f"{name}.wasm").write_bytes((source / f"{name}.wasm").read_bytes())
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump(config_data(folder)))
        settings = config.load(path)
        floor = Floor(settings)
        daemon = Daemon(settings, clock=VirtualClock(), record=args.record)
        adc = SimulatedMCP3008(daemon.hardware.factory, 0)
        adc.fractions[0] = 71 / 330
        counter = iter(range(10**9))

        def floor_run(n: int) -> None:
            for _ in range(n):
                floor.tick(next(counter))

        def body_run(n: int) -> None:
            for _ in range(n):
                daemon.loop.tick(next(counter))

        def loop_run(n: int) -> None:
            asyncio.run(daemon.serve(daemon.loop.ticks.count + n))

        def encode_run(n: int) -> None:
            trace = daemon.loop.trace
            assert trace is not None
            for _ in range(n):
                record.encode(trace, trace.states)

        results: dict[str, list[float]] = {"floor": [], "tick body": [], "loop iteration": []}
        if args.record:
            results["record encode"] = []
        for _ in range(args.rounds):
            results["floor"].append(per_tick(floor_run, args.ticks))
            results["tick body"].append(per_tick(body_run, args.ticks))
            results["loop iteration"].append(per_tick(loop_run, args.ticks))
            if args.record:
                results["record encode"].append(per_tick(encode_run, args.ticks))
        writes = sum(len(s.states) for s in daemon.hardware.factory.pins.values())
        stats = daemon.status.snapshot()
        adc.close()
        daemon.close()
        floor.close()
    floor_median = statistics.median(results["floor"])
    print(f"work per tick: {len(settings.sensors)} sensor reads, 1 encode, {len(PLUGINS)} plugin calls and "
          f"decodes, {len(settings.actuators)} actuator writes ({args.rounds} rounds x {args.ticks} ticks)")
    for name, samples in results.items():
        median = statistics.median(samples)
        print(f"{name:>15}: {median * 1e6:8.0f} us/tick  ({median / floor_median:.2f}x floor)")
    errors = {name: p["errors"] + p["rejected"] for name, p in stats["plugins"].items()}
    print(f"daemon plugin errors+rejections: {errors}; pin state changes recorded: {writes}")
    if args.record:
        print(f"recording: {args.record.stat().st_size / (args.rounds * args.ticks):.0f} bytes/tick on disk")


if __name__ == "__main__":
    main()
