"""The daemon's tick against a floor doing the same work, both paced in real time as the daemon runs.

Work per tick: 12 GPIO reads (gpiozero mock pins), one context encode, N plugin calls, N output decodes and
the writes to 8 actuators (copy i of the plugin commands actuators 2i and 2i+1, modulo 8). Two plugins, a
row each: `reading` (`tests/plugins/alternating.wasm`, the plugin of issue 30) copies its whole context
through the PDK and answers differently on alternate calls, so no output is the one before it; `echo`
(`tests/plugins/echo_output.wasm`) parses its whole context (as a plugin on `pdk.run` does, ~10x the cost of
a copy) and always returns the same two commands.

The floor does that work directly against the libraries: reads, `json.dumps`, the plugins compiled as the
daemon compiles them (the same memory pages, fuel and wall-clock backstop) and called through libextism's
plain `extism_plugin_call`, `json.loads`, the writes; no validation, arbitration, safety or stats. Both run
on the real clock at `--rates` (10 and 50 Hz), sleeping to absolute deadlines (`SystemClock.sleep_until`): a
loop that sleeps between ticks pays more per tick than one that runs ticks back to back (cold caches, threads
to wake), so only the same cadence compares. They run side by side in one event loop, the floor's deadlines
half a period after the daemon's (both skip deadlines already past), so that every daemon tick has a floor tick
beside it under the same conditions; each daemon tick is paired with the floor tick that begins within a
period after it. Rounds that took turns (floor, daemon, daemon, floor, ...) put the two on a host whose clock
speed and neighbours changed from one round to the next: on an idle machine the same plugin on both sides
came out 0.68x to 2.27x that way (benchmarks/README.md has the runs).
The daemon is the real `Daemon.serve`, with its watchdog thread and native stderr capture, as `run` has them.
A row is measured in `--processes` fresh processes, one after the other, their pairs pooled: each process
lays out the daemon's and the floor's code and data its own way, and a row of one process measured that
layout's luck as much as the code (`measured`). Medians over the paired ticks: the wall time of the tick's
work; the CPU time its thread spent in it (what other processes on the machine change least); the CPU time
its thread spent awake, from waking for the tick to sleeping again (the daemon's work after its tick too:
observers, the garbage collection it does between ticks); the middle half (quartiles) of the ratios of each
daemon tick's CPU time to its floor tick's; and the lowest and highest of the processes' own wall ratios.

Last, the CPU share of one core the daemon takes running `config/example.yaml` on simulated pins at 10 Hz
(`pi-controller run --simulate` as a process, its threads' CPU time from /proc over `--share-seconds` after
READY=1), and with `--baseline REF` the same for the code at git REF, alternating, in the same run.

    python benchmarks/tick.py [--plugins 3 10] [--rates 10 50] [--rows reading echo] [--processes 4]
                              [--ticks 160] [--share-seconds 8] [--baseline REF]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Callable

import extism
import yaml
from gpiozero import AngularServo, DigitalInputDevice, OutputDevice, PWMOutputDevice

from pi_controller import config, logs
from pi_controller.clock import SystemClock
from pi_controller.daemon import Daemon
from pi_controller.devices.mock_pins import mock_factory
from pi_controller.loop import next_deadline
from pi_controller.plugins.backstop import Backstop
from pi_controller.plugins.extism_adapter import Module, call, compile_module

REPO = Path(__file__).resolve().parent.parent
PLUGINS = {"reading": REPO / "tests" / "plugins" / "alternating.wasm",
           "echo": REPO / "tests" / "plugins" / "echo_output.wasm"}
EXAMPLE = REPO / "config" / "example.yaml"
INPUT_PINS = (4, 5, 6, 7, 8, 9, 10, 16, 17, 22, 23, 24)
PWM_PINS = (18, 19, 25, 26)
RELAY_PINS = (20, 27)
SERVO_PINS = (12, 13)
MEMORY_PAGES, TIMEOUT_MS = 32, 1  # 1 ms: ten plugins' claims fit the plugin budget of a tick at 50 Hz
ENTRY_POINT = b"control_logic"


def actuators() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = [{"id": f"pwm{pin}", "kind": "pwm", "pin": pin} for pin in PWM_PINS]
    found += [{"id": f"relay{pin}", "kind": "relay", "pin": pin} for pin in RELAY_PINS]
    return found + [{"id": f"servo{pin}", "kind": "servo", "pin": pin} for pin in SERVO_PINS]


def command(actuator: dict[str, Any], odd: bool = False) -> dict[str, Any]:
    """A command that moves `actuator` away from its start-up state; another one on odd calls."""
    if actuator["kind"] == "pwm":
        return {"device_id": actuator["id"], "action": "pwm", "parameters": {"duty_cycle": 60 if odd else 40}}
    if actuator["kind"] == "servo":
        return {"device_id": actuator["id"], "action": "set_angle", "parameters": {"angle": 60 if odd else 30}}
    return {"device_id": actuator["id"], "action": "set_low" if odd else "set_high"}


def plugin_settings(row: str, count: int) -> dict[str, dict[str, Any]]:
    """Copy i of the plugin commands actuators 2i and 2i+1 (modulo 8)."""
    targets = actuators()
    settings = {}
    for i in range(count):
        mine = [targets[(2 * i) % len(targets)], targets[(2 * i + 1) % len(targets)]]
        own = ({"odd": json.dumps([command(a, odd=True) for a in mine]), "even": json.dumps([command(a) for a in mine])}
               if row == "reading" else {"output": json.dumps([command(a) for a in mine])})
        settings[f"{row}{i:02}"] = {"config": own}
    return settings


def config_data(plugin_dir: Path, row: str, count: int, rate: float) -> dict[str, Any]:
    return {
        "pins": {"factory": "mock"},
        "sensors": [{"id": f"input{pin}", "kind": "line", "pin": pin} for pin in INPUT_PINS],
        "actuators": actuators(),
        "plugins": {"directory": str(plugin_dir),
                    "defaults": {"memory_pages": MEMORY_PAGES, "timeout_ms": TIMEOUT_MS},
                    "settings": plugin_settings(row, count)},
        "loop": {"rate_hz": rate, "plugin_budget": 0.9}, "watchdog": {"timeout_s": 1.0},
    }


def settings_for(folder: Path, row: str, count: int, rate: float) -> config.Settings:
    plugins = folder / f"{row}-{count}"
    if not plugins.exists():
        plugins.mkdir()
        for name in plugin_settings(row, count):
            (plugins / f"{name}.wasm").write_bytes(PLUGINS[row].read_bytes())
    path = folder / f"{row}-{count}-{rate:g}.yaml"
    path.write_text(yaml.safe_dump(config_data(plugins, row, count, rate)))
    return config.load(path)


class Floor:
    """The same reads, encode, calls, decodes and writes, written directly against the libraries."""

    def __init__(self, settings: config.Settings, wasm: bytes):
        factory = mock_factory(settings.sensors)
        self.sensors = [(s.id, DigitalInputDevice(s.pins()["pin"], pull_up=False, pin_factory=factory))
                        for s in settings.sensors]
        self.devices = {a.id: self._device(a, factory) for a in settings.actuators}
        self.states = {a.id: self._state(a.kind, 0.0 if a.kind != "servo" else None) for a in settings.actuators}
        defaults = settings.plugins.defaults
        backstop_ms = Backstop().ms(defaults.fuel, defaults.timeout_ms)  # as the daemon sizes it
        self.modules: list[Module] = []
        self.plugins: list[tuple[extism.Plugin, bytes]] = []
        self.stalls = 0
        data = base64.b64encode(wasm).decode()
        for own in settings.plugins.settings.values():
            manifest = json.dumps({"wasm": [{"data": data}], "memory": {"max_pages": defaults.memory_pages},
                                   "timeout_ms": backstop_ms, "config": dict(own.config)})  # as the daemon has it
            module = compile_module(manifest.encode(), False, defaults.fuel, None)
            self.modules.append(module)
            config_json = json.dumps(dict(own.config), separators=(",", ":"))
            self.plugins.append((module.instantiate(), b',"config":' + config_json.encode() + b"}"))

    @staticmethod
    def _device(a: Any, factory: Any) -> Any:
        if a.kind == "pwm":
            return PWMOutputDevice(a.pin, pin_factory=factory)
        if a.kind == "relay":
            return OutputDevice(a.pin, pin_factory=factory)
        return AngularServo(a.pin, pin_factory=factory)

    def tick(self, number: int) -> None:
        now = time.time()
        readings = [{"sensor_id": sid, "value": float(device.value), "unit": "boolean", "timestamp": now, "valid": True}
                    for sid, device in self.sensors]
        body = {"sensor_readings": readings, "device_states": self.states, "timestamp": now, "tick": number}
        context = json.dumps(body, separators=(",", ":"))[:-1].encode()
        for plugin, config_suffix in self.plugins:
            try:
                commands = json.loads(call(plugin, ENTRY_POINT, context + config_suffix))
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
        self.states[c["device_id"]] = self._state(self.states[c["device_id"]]["type"], value)

    @staticmethod
    def _state(kind: str, value: Any) -> dict[str, Any]:
        """An actuator's state as the daemon's context shows it (the same keys, so the same bytes to parse)."""
        if kind == "pwm":
            return {"type": kind, "on": value > 0, "value": value, "duty_cycle": value}
        if kind == "servo":
            return {"type": kind, "on": value is not None, "value": value, "angle": value}
        return {"type": kind, "on": bool(value), "value": int(bool(value))}

    async def run(self, ticks: int, period: float, timed: Timed, daemon_t0: asyncio.Future[float]) -> None:
        """`ticks` ticks at the daemon's rate, half a period after the daemon's own (whose first deadline is
        `daemon_t0`); deadlines already past are skipped, as the daemon's loop skips them."""
        stop, tick = asyncio.Event(), timed.around(self.tick)
        t0 = await daemon_t0 + period / 2
        due = 0
        for _ in range(ticks):
            await timed.clock.sleep_until(t0 + due * period, stop)
            tick(due)
            due = next_deadline(due, timed.clock.monotonic() - t0, period)

    def close(self) -> None:
        for _, device in self.sensors:
            device.close()
        for device in self.devices.values():
            device.close()
        for plugin, _ in self.plugins:
            plugin.__exit__(None, None, None)
        for module in self.modules:
            module.free()


class Awake(SystemClock):
    """The real clock, noting the CPU time its thread spends awake from one wake-up to the next sleep: the
    tick and whatever runs after it before the loop sleeps again (the daemon's observers, its garbage
    collection), none of which `Timed` sees."""

    def __init__(self) -> None:
        self.first_deadline: asyncio.Future[float] | None = None
        self.awake: list[float] = []  # CPU seconds from each wake-up to the next sleep
        self._woke: float | None = None

    async def sleep_until(self, deadline: float, stop: asyncio.Event) -> bool:
        if self._woke is not None:
            self.awake.append(time.thread_time() - self._woke)
        if self.first_deadline is not None and not self.first_deadline.done():
            self.first_deadline.set_result(deadline)
        woken = await super().sleep_until(deadline, stop)
        self._woke = time.thread_time()
        return woken


class Timed:
    """Each tick's work: when it began, its wall time and the CPU time of its thread in it (what another
    process's use of the core does not change); and, through `clock`, the CPU time awake around it."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self.clock = Awake()

    def around(self, tick: Callable[[int], None]) -> Callable[[int], None]:
        def timed(number: int) -> None:
            begun, wall, cpu = time.monotonic(), time.perf_counter(), time.thread_time()
            tick(number)
            self.samples.append((begun, time.perf_counter() - wall, time.thread_time() - cpu))

        return timed

    def clear(self) -> None:
        self.samples.clear()
        self.clock.awake.clear()

    def ticks(self) -> list[Tick]:
        """(began, wall, CPU, CPU awake) of every tick but the last, whose time awake ends with the run."""
        return [(*sample, awake) for sample, awake in zip(self.samples, self.clock.awake)]


Tick = tuple[float, float, float, float]  # when it began, its wall time, its CPU time, CPU time awake


def pairs(daemon: list[Tick], floor: list[Tick], period: float) -> list[tuple[Tick, Tick]]:
    """Each daemon tick with the floor tick that began within a period after it (a tick late or skipped on
    either side leaves one unpaired)."""
    found, k = [], 0
    for d in daemon:
        while k < len(floor) and floor[k][0] <= d[0]:
            k += 1
        if k < len(floor) and floor[k][0] < d[0] + period:
            found.append((d, floor[k]))
    return found


@dataclass
class Sample:
    """One process's measurement of a row: its paired ticks (daemon's wall, CPU, CPU awake, then the floor's),
    its missed ticks and problems (plugin errors, rejections and stalls on either side)."""

    pairs: list[tuple[float, float, float, float, float, float]]
    missed: int
    problems: int


@dataclass
class Row:
    row: str
    plugins: int
    rate: float
    floor: tuple[float, float, float]  # medians over the paired ticks: wall, CPU, CPU awake (seconds)
    daemon: tuple[float, float, float]
    spread: tuple[float, float]  # quartiles of the ratios of a daemon tick's CPU time to its floor tick's
    processes: list[float]  # each process's ratio of wall medians, daemon to floor
    paired: int
    missed: int
    problems: int


def measure(folder: Path, row: str, count: int, rate: float, ticks: int) -> Sample:
    """The daemon and the floor side by side in one event loop, at the same rate, the floor's ticks half a
    period after the daemon's: each tick is paired with one under the same conditions (the host's clock
    speed, its neighbours, what the other left in the caches), as rounds run one after the other are not."""
    settings = settings_for(folder, row, count, rate)
    floor = Floor(settings, PLUGINS[row].read_bytes())
    daemon = Daemon(settings, simulate=False)
    timed = {"floor": Timed(), "daemon": Timed()}
    daemon.loop.tick = timed["daemon"].around(daemon.loop.tick)  # type: ignore[method-assign, assignment]
    daemon.loop.clock = timed["daemon"].clock
    period = settings.loop.period

    async def side_by_side(ticks: int) -> None:
        daemon_t0 = timed["daemon"].clock.first_deadline = asyncio.get_running_loop().create_future()
        # One tick fewer: the floor's last would come after the daemon's loop has ended.
        floor_ticks = asyncio.create_task(floor.run(ticks - 1, period, timed["floor"], daemon_t0))
        try:
            await daemon.serve(daemon.loop.ticks.count + ticks)
        finally:
            await floor_ticks

    try:
        asyncio.run(side_by_side(max(5, round(rate))))  # a second, unmeasured
        for side in timed.values():
            side.clear()
        asyncio.run(side_by_side(max(5, ticks)))
        stats = daemon.status.snapshot()
    finally:
        daemon.close()
        floor.close()
    problems = sum(p["errors"] + p["rejected"] + p["stalls"] for p in stats["plugins"].values()) + floor.stalls
    paired = pairs(timed["daemon"].ticks(), timed["floor"].ticks(), period)
    return Sample([(*d[1:], *f[1:]) for d, f in paired], daemon.loop.ticks.missed, problems)


def measured(row: str, count: int, rate: float, args: argparse.Namespace) -> Row:
    """The row measured in `args.processes` processes one after the other, their paired ticks pooled. Each
    process has a layout of its own (where the allocator, ASLR and the Wasm compiler put the daemon's and the
    floor's code and data), and with it a ratio of its own: one process a row, the same code gave 0.99x to
    1.27x here from one run to the next (benchmarks/README.md). pyperf runs 20 processes a benchmark for the
    same reason; its runner times a function back to back, not two loops paced side by side, so it is not used."""
    samples = [_in_child(row, count, rate, args.ticks) for _ in range(args.processes)]
    pooled = [pair for sample in samples for pair in sample.pairs]
    quartiles = statistics.quantiles([pair[1] / pair[4] for pair in pooled], n=4)

    def medians(first: int) -> tuple[float, float, float]:
        wall, cpu, awake = (statistics.median(pair[first + k] for pair in pooled) for k in range(3))
        return wall, cpu, awake

    ratios = [statistics.median(p[0] for p in s.pairs) / statistics.median(p[3] for p in s.pairs) for s in samples]
    return Row(row, count, rate, medians(3), medians(0), (quartiles[0], quartiles[2]), ratios, len(pooled),
               sum(s.missed for s in samples), sum(s.problems for s in samples))


def _in_child(row: str, count: int, rate: float, ticks: int) -> Sample:
    command = [sys.executable, __file__, "--child", row, str(count), str(rate), "--ticks", str(ticks)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"a measuring process failed ({row}, {count} plugins, {rate:g} Hz, exit {done.returncode}):\n"
                 f"{done.stderr[-4000:]}")
    return Sample(**json.loads(done.stdout))


def child(row: str, count: int, rate: float, ticks: int) -> None:
    """One process's measurement, printed as JSON for `measured`."""
    logs.configure("console", "warning")
    logs.capture_native_stderr()  # as `pi-controller run` does: each plugin call is bracketed (issue 28)
    with tempfile.TemporaryDirectory() as tmp:
        sample = measure(Path(tmp), row, count, rate, ticks)
    print(json.dumps(dataclasses.asdict(sample)))


# --- the CPU share of the example config ---------------------------------------------------------


def cpu_share(source: Path, seconds: float, folder: Path) -> float:
    """The share of one core `pi-controller run --simulate` of the code at `source` takes, after READY=1."""
    address = str(folder / f"notify-{time.monotonic_ns()}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    state = folder / f"state-{time.monotonic_ns()}"
    command = [sys.executable, "-m", "pi_controller", "run", "--simulate", "--log-level", "warning",
               "--config", str(source / EXAMPLE.relative_to(REPO)), "--state-dir", str(state)]
    env = {**os.environ, "NOTIFY_SOCKET": address, "PYTHONPATH": str(source)}
    process = subprocess.Popen(command, env=env, cwd=source, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sock.settimeout(60)
        while not sock.recv(4096).startswith(b"READY=1"):
            pass
        time.sleep(1.0)  # past start-up's own work
        cpu, begun = _cpu_seconds(process.pid), time.monotonic()
        time.sleep(seconds)
        return (_cpu_seconds(process.pid) - cpu) / (time.monotonic() - begun)
    finally:
        process.terminate()
        process.wait()
        sock.close()


def _cpu_seconds(pid: int) -> float:
    """CPU time of a process, all its threads summed (/proc/PID/task/*/schedstat: nanoseconds, where
    /proc/PID/stat counts 10 ms clock ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):  # a thread that has just ended
            pass
    return total / 1e9


def checkout(ref: str, folder: Path) -> Path:
    """The tree of git `ref`, extracted (nothing installed: it runs from PYTHONPATH)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True).stdout
    target = folder / f"baseline-{ref.replace('/', '_')}"
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    if (target / "simulators").is_dir() and not (target / "pi_controller" / "simulators").exists():
        (target / "pi_controller" / "simulators").symlink_to(target / "simulators")  # the layout before issue 27
    return target


# --- the report ----------------------------------------------------------------------------------


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def line(r: Row) -> str:
    def us(seconds: float, width: int) -> str:
        return f"{seconds * 1e6:>{width - 3}.0f} us"

    def columns(floor: float, daemon: float) -> str:
        return f"{us(floor, 9)} {us(daemon, 9)} {daemon / floor:>5.2f}x"

    notes = (f"  missed {r.missed}" if r.missed else "") + (f"  problems {r.problems}" if r.problems else "")
    return (f"{r.plugins:>7} {r.rate:>3g}Hz {r.row:>7} | {columns(r.floor[0], r.daemon[0])} | "
            f"{columns(r.floor[1], r.daemon[1])} | {columns(r.floor[2], r.daemon[2])} | "
            f"{r.spread[0]:>5.2f}-{r.spread[1]:<5.2f}x {r.paired:>5} | "
            f"{min(r.processes):>5.2f}-{max(r.processes):<5.2f}x | {load()}{notes}")


def at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number, 1 or more: {text!r}")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugins", type=int, nargs="+", default=[3, 10], help="plugin counts")
    parser.add_argument("--rates", type=float, nargs="+", default=[10.0, 50.0], help="tick rates (Hz)")
    parser.add_argument("--rows", nargs="+", choices=tuple(PLUGINS), default=list(PLUGINS))
    parser.add_argument("--processes", type=at_least_one, default=4, help="processes a row, one after the other")
    # As many ticks at 10 Hz as at 50: a row of 40 ticks a process (4 s at 10 Hz) put the median of 160 pairs,
    # whose ratios scatter from 0.8x to 1.6x, a few hundredths either way from one run to the next.
    parser.add_argument("--ticks", type=at_least_one, default=160, help="measured ticks of each process")
    parser.add_argument("--share-seconds", type=float, default=8.0, help="0: no CPU share measured")
    parser.add_argument("--baseline", help="a git ref whose CPU share is measured beside this code's")
    parser.add_argument("--child", nargs=3, metavar=("ROW", "PLUGINS", "RATE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        row, count, rate = args.child
        return child(row, int(count), float(rate), args.ticks)
    print(f"load average at start: {load()}")
    print("wall and CPU: the tick's work (its thread's CPU time); awake: its thread's CPU time from waking for the "
          "tick to sleeping again (what runs after the tick too); medians over the paired ticks. paired: the middle "
          "half of the ratios of a daemon tick's CPU time to its floor tick's, and how many pairs, pooled over the "
          f"{args.processes} processes of a row; processes: the lowest and highest of their own wall ratios")
    print(f"{'plugins':>7} {'rate':>5} {'plugin':>7} | {'floor':>9} {'daemon':>9} {'ratio':>6} | {'CPU floor':>9} "
          f"{'daemon':>9} {'ratio':>6} | {'awake fl.':>9} {'daemon':>9} {'ratio':>6} | {'paired':>17} | "
          f"{'processes':>12} | load average")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for count in args.plugins:
            for rate in args.rates:
                for row in args.rows:
                    print(line(measured(row, count, rate, args)), flush=True)
        if args.share_seconds > 0:
            sources = {"this code": REPO}
            if args.baseline:
                sources = {f"baseline {args.baseline}": checkout(args.baseline, folder), **sources}
            shares: dict[str, list[float]] = {name: [] for name in sources}
            for _ in range(2 if args.baseline else 1):
                for name, source in sources.items():
                    shares[name].append(cpu_share(source, args.share_seconds, folder))
            for name, values in shares.items():
                print(f"CPU share of one core at 10 Hz, config/example.yaml on simulated pins, {name}: "
                      f"{statistics.median(values) * 100:.2f} % ({', '.join(f'{v * 100:.2f}' for v in values)}; "
                      f"load {load()})")


if __name__ == "__main__":
    main()
