"""The daemon's tick against the floor: the same work done directly, measured in the same run.

Work per tick, in two workloads: `adc` reads 12 sensors on gpiozero mock pins (4 MCP3008 channels over
the simulated SPI bus, 8 GPIO inputs), `light` reads 12 GPIO inputs and no ADC (the simulated SPI reads
dominate `adc` and hide the daemon's own cost). Then one context encode, N Extism plugin calls (copies of
`tests/plugins/echo_output.wasm`, each returning two fixed commands from its config), N output decodes,
and the actuator writes (8 actuators: copy i commands actuators 2i and 2i+1, modulo 8).

The floor does exactly that with no validation, arbitration, stats or scheduling, but its plugins are
compiled as the daemon compiles them: the same memory limit, the same fuel limit and the same wall-clock
backstop (`plugins.backstop`), both part of the honest cost of a call. The daemon is measured twice: its
tick body (`ControlLoop.tick`) and whole loop iterations (`Daemon.serve` on a virtual clock, so
scheduling costs are counted but no time is spent sleeping). Rounds alternate between floor and daemon so
machine noise hits both alike; medians of the rounds are reported, of wall-clock time and of the
process's CPU time (steadier on a busy machine).

    python benchmarks/tick.py [--plugins 3] [--workload adc|light|both] [--ticks 1000] [--rounds 5]
                              [--record FILE] [--profile FILE]

With --record the daemon records every tick (`record`): the loop iteration then includes encoding
each tick's line (after the tick, in `tick_done`), and a row measures that encode alone. With --profile
the daemon's tick body and its loop iterations are run once more under cProfile, into
FILE.<workload>.tick and FILE.<workload>.loop.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import extism
import yaml
from gpiozero import MCP3008, AngularServo, Device, DigitalInputDevice, OutputDevice, PWMOutputDevice

from pi_controller import config, logs
from pi_controller.clock import VirtualClock
from pi_controller.daemon import Daemon
from pi_controller.devices.digital import DigitalSettings
from pi_controller.devices.mcp3008 import MCP3008Settings
from pi_controller.devices.mock_pins import mock_factory
from pi_controller.plugins.backstop import Backstop
from pi_controller.plugins.extism_adapter import Module, compile_module
from pi_controller.sim import record
from pi_controller.simulators.adc import SimulatedMCP3008

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "tests" / "plugins" / "echo_output.wasm"
ADC_CHANNELS = 4
INPUT_PINS = (4, 5, 6, 16, 17, 22, 23, 24)
LIGHT_PINS = INPUT_PINS + (7, 8, 9, 10)  # in place of the ADC's four channels (SPI pins unused)
PWM_PINS = (18, 19, 25, 26)
RELAY_PINS = (20, 27)
SERVO_PINS = (12, 13)
MEMORY_PAGES, TIMEOUT_MS = 32, 10


def actuators() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = [{"id": f"pwm{pin}", "kind": "pwm", "pin": pin} for pin in PWM_PINS]
    found += [{"id": f"relay{pin}", "kind": "relay", "pin": pin} for pin in RELAY_PINS]
    return found + [{"id": f"servo{pin}", "kind": "servo", "pin": pin} for pin in SERVO_PINS]


def command(actuator: dict[str, Any]) -> dict[str, Any]:
    """A fixed command that moves `actuator` away from its start-up state."""
    if actuator["kind"] == "pwm":
        return {"device_id": actuator["id"], "action": "pwm", "parameters": {"duty_cycle": 40}}
    if actuator["kind"] == "servo":
        return {"device_id": actuator["id"], "action": "set_angle", "parameters": {"angle": 30}}
    return {"device_id": actuator["id"], "action": "set_high"}


def plugin_settings(count: int) -> dict[str, dict[str, Any]]:
    """Copy i of the plugin returns two fixed commands, for actuators 2i and 2i+1 (modulo 8)."""
    targets = actuators()
    return {f"echo{i:02}": {"config": {"output": json.dumps(
        [command(targets[(2 * i) % len(targets)]), command(targets[(2 * i + 1) % len(targets)])])}}
        for i in range(count)}


def config_data(plugin_dir: Path, workload: str, count: int) -> dict[str, Any]:
    sensors: list[dict[str, Any]] = []
    if workload == "adc":
        sensors += [{"id": f"adc{ch}", "kind": "mcp3008", "channel": ch, "unit": "celsius", "scale": 330.0,
                     "offset": -50.0} for ch in range(ADC_CHANNELS)]
    sensors += [{"id": f"input{pin}", "kind": "line", "pin": pin}
                for pin in (INPUT_PINS if workload == "adc" else LIGHT_PINS)]
    return {
        "pins": {"factory": "mock"}, "sensors": sensors, "actuators": actuators(),
        "plugins": {"directory": str(plugin_dir),
                    "defaults": {"memory_pages": MEMORY_PAGES, "timeout_ms": TIMEOUT_MS},
                    "settings": plugin_settings(count)},
        # A slow rate, so that the plugins' timeouts fit a tick at any count (the clock is virtual anyway).
        "loop": {"rate_hz": 1, "plugin_budget": 0.9}, "watchdog": {"timeout_s": 5},
    }


class Floor:
    """The same reads, encode, calls, decodes and writes, written directly against the libraries."""

    def __init__(self, settings: config.Settings):
        self.factory = mock_factory(settings.sensors)
        Device.pin_factory = self.factory  # gpiozero's software SPI needs the default factory
        self.adc = SimulatedMCP3008(self.factory, 0)
        self.adc.fractions[0] = 71 / 330
        self.sensors: list[tuple[str, Any, Callable[[Any], float]]] = [
            (s.id, MCP3008(channel=s.channel, pin_factory=self.factory), lambda d: d.value * 330 - 50)
            for s in settings.sensors if isinstance(s, MCP3008Settings)]
        self.sensors += [(s.id, DigitalInputDevice(s.pin, pull_up=False, pin_factory=self.factory),
                          lambda d: d.value)
                         for s in settings.sensors if isinstance(s, DigitalSettings) and s.kind == "line"]
        self.devices = {a.id: self._device(a) for a in settings.actuators}
        self.states = {a.id: {"type": a.kind, "on": False, "value": 0.0} for a in settings.actuators}
        defaults = settings.plugins.defaults
        backstop_ms = Backstop().ms(defaults.fuel, defaults.timeout_ms)  # as the daemon sizes it
        data = base64.b64encode(PLUGIN.read_bytes()).decode()
        self.plugins: list[tuple[extism.Plugin, bytes]] = []
        self.modules: list[Module] = []
        self.stalls = 0
        for own in settings.plugins.settings.values():
            manifest = json.dumps({"wasm": [{"data": data}], "memory": {"max_pages": defaults.memory_pages},
                                   "timeout_ms": backstop_ms})
            module = compile_module(manifest.encode(), False, defaults.fuel, None)
            suffix = b',"config":' + json.dumps(dict(own.config)).encode() + b"}"
            self.modules.append(module)
            self.plugins.append((module.instantiate(), suffix))

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
            try:
                commands = json.loads(plugin.call("control_logic", context + config_suffix))
            except extism.Error:  # past the backstop on a busy machine: counted, as the daemon counts it
                self.stalls += 1
                continue
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
        for plugin, _ in self.plugins:
            plugin.__exit__(None, None, None)
        for module in self.modules:
            module.free()


def per_tick(run: Callable[[int], None], ticks: int) -> tuple[float, float]:
    """Wall-clock and CPU seconds per tick: on a busy machine the process's CPU time is the steadier."""
    start, cpu = time.perf_counter(), time.process_time()
    run(ticks)
    return (time.perf_counter() - start) / ticks, (time.process_time() - cpu) / ticks


def measure(workload: str, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "plugins"
        folder.mkdir()
        for name in plugin_settings(args.plugins):
            (folder / f"{name}.wasm").write_bytes(PLUGIN.read_bytes())
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump(config_data(folder, workload, args.plugins)))
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

        results: dict[str, list[tuple[float, float]]] = {"floor": [], "tick body": [], "loop iteration": []}
        if args.record:
            results["record encode"] = []
        for _ in range(args.rounds):
            results["floor"].append(per_tick(floor_run, args.ticks))
            results["tick body"].append(per_tick(body_run, args.ticks))
            results["loop iteration"].append(per_tick(loop_run, args.ticks))
            if args.record:
                results["record encode"].append(per_tick(encode_run, args.ticks))
        if args.profile:
            for what, run in (("tick", body_run), ("loop", loop_run)):
                cProfile.runctx("run(n)", globals(), {"run": run, "n": args.ticks}, f"{args.profile}.{workload}.{what}")
        writes = sum(len(s.states) for s in daemon.hardware.factory.pins.values())
        stats = daemon.status.snapshot()
        adc.close()
        daemon.close()
        floor.close()
    floor_wall, floor_cpu = (statistics.median(column) for column in zip(*results["floor"]))
    print(f"{workload} workload: {len(settings.sensors)} sensor reads, 1 encode, {args.plugins} plugin calls "
          f"and decodes, {len(settings.actuators)} actuators ({args.rounds} rounds x {args.ticks} ticks)")
    for name, samples in results.items():
        wall, cpu = (statistics.median(column) for column in zip(*samples))
        print(f"{name:>15}: {wall * 1e6:8.0f} us/tick  ({wall / floor_wall:.2f}x floor)   "
              f"CPU {cpu * 1e6:8.0f} us/tick  ({cpu / floor_cpu:.2f}x floor)")
    errors = {name: bad for name, p in stats["plugins"].items() if (bad := p["errors"] + p["rejected"] + p["stalls"])}
    print(f"daemon plugin errors+rejections+stalls: {errors or 'none'}; floor stalls: {floor.stalls}; "
          f"pin state changes recorded: {writes}")
    if args.record:
        print(f"recording: {args.record.stat().st_size / (args.rounds * args.ticks):.0f} bytes/tick on disk")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugins", type=int, default=3, help="copies of the plugin called each tick")
    parser.add_argument("--workload", choices=("adc", "light", "both"), default="both")
    parser.add_argument("--ticks", type=int, default=1000)  # amortizes serve()'s start-up over many ticks
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--record", type=Path, help="record the daemon's ticks to this file (.gz: gzip)")
    parser.add_argument("--profile", type=Path,
                        help="cProfile the daemon's tick body and loop into FILE.<workload>.tick and .loop")
    args = parser.parse_args()
    logs.configure("console", "warning")
    for workload in ("light", "adc") if args.workload == "both" else (args.workload,):
        measure(workload, args)


if __name__ == "__main__":
    main()
