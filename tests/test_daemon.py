"""The real daemon end to end: real Extism, the repo's plugins, gpiozero mock pins."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
from typing import Any

import pytest
from structlog.testing import capture_logs

from pi_controller import contract
from pi_controller.clock import SystemClock, VirtualClock
from pi_controller.loop import ControlLoop, next_deadline
from pi_controller.observer import LoopObserver, TickReport
from tests.conftest import HOSTILE, TEST_PLUGINS, example_data, unsimulated


class Script:
    """A test environment: sets sensor pins as a function of (virtual) time, like a simulator would."""

    def __init__(self, daemon: Any, temperature: float = 21.0, lux: float = 100.0, motion_until: float = -1.0):
        from pi_controller.simulators.adc import SimulatedMCP3008

        self.adc = SimulatedMCP3008(daemon.hardware.factory, 0)
        self.motion_pin = daemon.hardware.factory.pin(17)
        self.temperature, self.lux = temperature, lux
        self.motion_until = motion_until
        self.start: float | None = None

    def advance(self, now: float) -> None:
        self.start = now if self.start is None else self.start
        self.adc.fractions[0] = (self.temperature + 50.0) / 330.0
        self.adc.fractions[1] = self.lux / 1000.0
        if now - self.start < self.motion_until:
            self.motion_pin.drive_high()
        else:
            self.motion_pin.drive_low()

    def close(self) -> None:
        self.adc.close()


def scripted(run_daemon, data: dict[str, Any], ticks: int, **script: Any) -> Any:
    """Run with a Script environment in place of the simulation models."""
    daemon = run_daemon(unsimulated(data), 0)  # builds and loads, runs nothing
    daemon.hardware.environment = Script(daemon, **script)
    asyncio.run(daemon.serve(ticks))
    return daemon


def test_bundled_plugins_load_and_every_tick_runs_every_plugin(run_daemon) -> None:
    daemon = run_daemon(example_data(), 30)
    snap = daemon.status.snapshot()
    assert {name: p["state"] for name, p in snap["plugins"].items()} == {
        "energy_saver": "loaded", "motion_light": "loaded", "temperature_control": "loaded"}
    for name, stats in snap["plugins"].items():
        assert (stats["calls"], stats["errors"], stats["rejected"]) == (30, 0, 0), name
        assert 0 < stats["median_us"] <= stats["max_us"]
    assert snap["ticks"]["count"] == 30 and snap["ticks"]["missed"] == 0
    assert set(snap["sensors"]) == {"temperature_sensor", "motion_sensor", "light_sensor"}
    assert all(r["valid"] for r in snap["sensors"].values())
    assert set(snap["actuators"]) == {"led_strip", "servo_motor", "relay_switch"}
    json.dumps(snap)  # the snapshot is plain JSON


def test_heater_warms_a_cold_simulated_room_and_holds_the_setpoint(run_daemon) -> None:
    data = example_data()
    room = data["simulation"][0]
    room.update(start_c=16.0, time_constant_s=60.0)
    daemon = run_daemon(data, 3000)  # five simulated minutes
    relay_states = [bool(s.state) for s in daemon.hardware.factory.pin(27).states]
    switches = sum(1 for a, b in itertools.pairwise(relay_states) if a != b)
    assert relay_states[1] is True  # the first switch: heater on in the cold room
    assert switches >= 3  # on, off at the top of the band, on again as it cools...
    temperature = daemon.status.snapshot()["sensors"]["temperature_sensor"]["value"]
    lsb = 330 / 1023
    assert 20.5 - 2 * lsb <= temperature <= 21.5 + 2 * lsb


def test_motion_turns_the_strip_on_holds_then_fades_out(run_daemon) -> None:
    data = example_data()
    data["plugins"]["settings"]["motion_light"]["config"] = {"hold_seconds": 2, "fade_seconds": 1, "on_duty": 80}
    daemon = scripted(run_daemon, data, 60, motion_until=1.0, lux=50.0)
    duties = [round(s.state * 100, 1) for s in daemon.hardware.factory.pin(18).states]
    assert duties[0] == 0.0 and duties[1] == 80.0  # off at claim, on with the first motion
    peak_end = max(i for i, d in enumerate(duties) if d == 80.0)
    fade = duties[peak_end + 1:]
    assert fade == sorted(fade, reverse=True) and 0.0 < fade[0] < 80.0  # fades, never jumps up
    assert fade[-1] == 0.0
    assert len([d for d in fade if 0 < d < 80]) >= 5  # a fade over ~10 ticks, not a cut


def test_bright_light_wins_over_motion_by_priority_and_the_conflict_is_logged_once(run_daemon) -> None:
    with capture_logs() as logs:
        daemon = scripted(run_daemon, example_data(), 20, motion_until=100.0, lux=900.0)
    assert daemon.status.snapshot()["actuators"]["led_strip"]["duty_cycle"] == 0.0
    assert all(s.state == 0.0 for s in daemon.hardware.factory.pin(18).states)
    conflicts = [e for e in logs if e["event"] == "command_conflict"]
    assert len(conflicts) == 1
    assert (conflicts[0]["device"], conflicts[0]["winner"], conflicts[0]["loser"]) == (
        "led_strip", "energy_saver", "motion_light")


def test_hostile_plugins_fail_alone_and_the_bundled_ones_keep_control(run_daemon, plugin_dir) -> None:
    data = example_data()
    data["simulation"][0].update(start_c=15.0)
    data["plugins"]["defaults"]["timeout_ms"] = 5
    data["plugins"]["settings"].update({
        "memory_hog": {"memory_pages": 16},
        "garbage": {"config": {"output": "this is not json {"}},
        "flooder": {"config": {"mode": "flood"}},
    })
    folder = plugin_dir("temperature_control", "motion_light", "energy_saver", *HOSTILE)
    shutil.copy(TEST_PLUGINS / "echo_output.wasm", folder / "garbage.wasm")
    shutil.copy(TEST_PLUGINS / "host_calls.wasm", folder / "flooder.wasm")  # calls pi_log forever
    with capture_logs() as logs:
        daemon = run_daemon(data, 20, plugins=folder)
    snap = daemon.status.snapshot()
    for name in (*HOSTILE, "garbage", "flooder"):
        assert snap["plugins"][name]["state"] == "loaded"
        assert (snap["plugins"][name]["calls"], snap["plugins"][name]["errors"]) == (20, 20), name
    for name in ("temperature_control", "motion_light", "energy_saver"):
        assert snap["plugins"][name]["errors"] == 0, name
    assert snap["ticks"]["count"] == 20
    assert daemon.hardware.factory.pin(27).states[1].state == 1.0  # the heater came on anyway
    failures = {e["plugin"]: e["reason"] for e in logs if e["event"] == "plugin_call_failed"}
    assert "ran out of fuel" in failures["endless_loop"]  # before the 5 ms timeout: how long it took is the load's
    assert "oom" in failures["memory_hog"]
    assert "sensor table corrupt" in failures["error_return"]
    assert "output is not JSON" in failures["garbage"]
    assert "more than 64 host function calls" in failures["flooder"]
    assert len([e for e in logs if e["event"] == "plugin_call_failed"]) == 6  # once each, not per tick


# Every hostile plugin of tests/plugins, by the name it runs under, with the settings that make it hostile.
EVERY_HOSTILE: dict[str, tuple[str, dict[str, Any]]] = {
    "trap": ("trap", {}), "endless_loop": ("endless_loop", {}), "memory_hog": ("memory_hog", {"memory_pages": 16}),
    "var_hog": ("var_hog", {}), "http_fetch": ("http_fetch", {}), "huge_output": ("huge_output", {}),
    "error_return": ("error_return", {}), "fuel_burner": ("fuel_burner", {"config": {"iterations": 3_000_000}}),
    "flooder": ("host_calls", {"config": {"mode": "flood"}}), "log_flood": ("log_flood", {}),
    "garbage": ("echo_output", {"config": {"output": "this is not json {"}}),
    "out_of_range": ("echo_output", {"config": {"output": '[{"device_id":"led_strip","action":"pwm",'
                                                          '"parameters":{"duty_cycle":150}}]'}}),
    "forbidden": ("echo_output", {"actuators": ["servo_motor"], "priority": 100,
                                  "config": {"output": '[{"device_id":"relay_switch","action":"set_low"}]'}}),
}


def test_every_hostile_plugin_at_once_beside_the_bundled_ones_in_real_time(run_daemon, plugin_dir) -> None:
    data = example_data()
    data["simulation"][0].update(start_c=15.0)
    data["plugins"]["defaults"]["timeout_ms"] = 3  # 17 plugins in the 60 ms plugin budget of a tick
    folder = plugin_dir("temperature_control", "motion_light", "energy_saver", "wasi_import")
    for name, (wasm, settings) in EVERY_HOSTILE.items():
        shutil.copy(TEST_PLUGINS / f"{wasm}.wasm", folder / f"{name}.wasm")
        data["plugins"]["settings"][name] = settings
    daemon = run_daemon(data, 30, plugins=folder, clock=SystemClock())  # three seconds at 10 Hz
    snap = daemon.status.snapshot()
    for name in EVERY_HOSTILE:
        stats = snap["plugins"][name]
        faults = stats["errors"] + stats["rejected"] + stats["stalls"]  # a busy machine stalls a call or two
        # var_hog fails once its vars are full, then starts over in a fresh instance; the others every call
        assert stats["calls"] > 0 and (faults > 0 if name == "var_hog" else faults >= stats["calls"]), name
    assert snap["plugins"]["wasi_import"]["state"] == "failed"  # refused at load: no WASI granted
    for name in ("temperature_control", "motion_light", "energy_saver"):
        assert (snap["plugins"][name]["calls"], snap["plugins"][name]["errors"]) == (30, 0), name
    # The cold room's heater: off when claimed, on from the first tick, and no hostile plugin turned it
    # off before the shut-down did.
    assert [s.state for s in daemon.hardware.factory.pin(27).states] == [0.0, 1.0, 0.0]
    assert snap["ticks"]["count"] == 30  # missed deadlines depend on the machine's load: not asserted


@pytest.mark.parametrize("output,rejected,applied", [
    ('[{"device_id":"led_strip","action":"pwm","parameters":{"duty_cycle":1e999}}]', 1, False),
    ('[{"device_id":"led_strip","action":"pwm","parameters":{"duty_cycle":1' + "0" * 400 + '}}]', 1, False),
    ('[{"device_id":"led_strip","action":"pwm","parameters":{"duty_cycle":101}}]', 1, False),
    ('[{"device_id":"toaster","action":"set_high"},'
     '{"device_id":"led_strip","action":"pwm","parameters":{"duty_cycle":30}}]', 1, True),
])
def test_rejected_commands_are_never_applied_and_logged_once(run_daemon, plugin_dir, output, rejected,
                                                             applied) -> None:
    data = unsimulated(example_data())
    data["plugins"]["settings"] = {"echo_output": {"config": {"output": output}}}
    with capture_logs() as logs:
        daemon = run_daemon(data, 10, plugins=plugin_dir("echo_output"))
    stats = daemon.status.snapshot()["plugins"]["echo_output"]
    assert (stats["errors"], stats["rejected"]) == (0, 10 * rejected)
    assert daemon.status.snapshot()["actuators"]["led_strip"]["duty_cycle"] == (30.0 if applied else 0.0)
    events = [e for e in logs if e["event"] == "command_rejected"]
    assert len(events) == rejected
    assert events[0]["plugin"] == "echo_output" and events[0]["tick"] == 0 and events[0]["reason"]


def test_a_plugin_that_fails_to_load_is_reported_and_skipped(run_daemon, plugin_dir) -> None:
    folder = plugin_dir("temperature_control")
    (folder / "broken.wasm").write_bytes(b"\x00asm\x01\x00\x00\x00garbage")
    (folder / "notes.txt").write_text("not a plugin")
    daemon = run_daemon(unsimulated(example_data()), 3, plugins=folder)
    plugins = daemon.status.snapshot()["plugins"]
    assert plugins["broken"]["state"] == "failed" and plugins["broken"]["reason"]
    assert plugins["temperature_control"]["calls"] == 3
    assert "notes" not in plugins


def test_plugins_beyond_the_time_budget_are_refused_at_load(run_daemon, plugin_dir) -> None:
    data = unsimulated(example_data())
    data["plugins"]["defaults"]["timeout_ms"] = 25  # budget 60 ms: two fit, the third does not
    data["plugins"]["settings"] = {}
    daemon = run_daemon(data, 1, plugins=plugin_dir("energy_saver", "motion_light", "temperature_control"))
    plugins = daemon.status.snapshot()["plugins"]
    assert [plugins[n]["state"] for n in ("energy_saver", "motion_light", "temperature_control")] == [
        "loaded", "loaded", "failed"]
    assert "does not fit the tick" in plugins["temperature_control"]["reason"]


def test_disabled_plugin_is_not_loaded(run_daemon, plugin_dir) -> None:
    data = unsimulated(example_data())
    data["plugins"]["settings"]["motion_light"]["enabled"] = False
    daemon = run_daemon(data, 2)
    assert daemon.status.snapshot()["plugins"]["motion_light"] == {"state": "disabled"}


def test_every_actuator_ends_in_its_shutdown_state_and_stays_there_after_close(run_daemon, plugin_dir) -> None:
    data = unsimulated(example_data())
    data["actuators"][1]["shutdown_state"] = 45
    del data["actuators"][2]["requires"]  # no simulated thermometer here
    commands = [{"device_id": "relay_switch", "action": "set_high"},
                {"device_id": "led_strip", "action": "pwm", "parameters": {"duty_cycle": 60}},
                {"device_id": "servo_motor", "action": "set_angle", "parameters": {"angle": 80}}]
    data["plugins"]["settings"] = {"echo_output": {"config": {"output": json.dumps(commands)}}}
    daemon = run_daemon(data, 5, plugins=plugin_dir("echo_output"))
    assert daemon.status.snapshot()["actuators"] == {  # what the plugin set during the run...
        "relay_switch": {"type": "relay", "on": True, "value": 1},
        "led_strip": {"type": "pwm", "on": True, "value": 60.0, "duty_cycle": 60.0},
        "servo_motor": {"type": "servo", "on": True, "value": 80.0, "angle": 80.0}}
    factory = daemon.hardware.factory

    def pins() -> tuple[float, float, float]:
        return (factory.pin(27).state, factory.pin(18).state,
                round(daemon.hardware.actuators["servo_motor"].device.angle, 1))

    assert pins() == (0.0, 0.0, 45.0)  # ...and their shut-down states after it
    daemon.close()
    assert pins() == (0.0, 0.0, 45.0)  # still driven: closing does not let the pins float


def test_plugin_gets_the_context_exactly_as_encoded_with_its_own_config(run_daemon, plugin_dir) -> None:
    """echo_input returns its input: what the plugin sees is the whole context, config spliced in."""
    data = unsimulated(example_data())
    data["plugins"]["settings"] = {"echo_input": {"config": {"setpoint": 19.5, "mode": "eco"}}}
    daemon = run_daemon(data, 0, plugins=plugin_dir("echo_input"))
    plugin = next(iter(daemon.plugins))
    readings = daemon.hardware.read(1234.5)
    prefix = contract.encode_context(readings, daemon.hardware.states_json(), 1234.5, 7, monotonic=88.25).encoded
    seen = json.loads(plugin.call(prefix))
    assert seen == {
        "sensor_readings": [r.as_json() for r in readings],
        "device_states": {"led_strip": {"type": "pwm", "on": False, "value": 0.0, "duty_cycle": 0.0},
                          "servo_motor": {"type": "servo", "on": True, "value": 0.0, "angle": 0.0},
                          "relay_switch": {"type": "relay", "on": False, "value": 0}},
        "timestamp": 1234.5, "monotonic": 88.25, "tick": 7, "config": {"setpoint": 19.5, "mode": "eco"}}
    assert [r["sensor_id"] for r in seen["sensor_readings"]] == ["temperature_sensor", "motion_sensor",
                                                                  "light_sensor"]


def test_a_flood_of_commands_fails_the_call_and_logs_once(run_daemon, plugin_dir) -> None:
    data = unsimulated(example_data())
    data["plugins"]["settings"] = {"echo_output": {"config": {"output": "[" + "1," * 1000 + "1]"}}}
    with capture_logs() as logs:
        daemon = run_daemon(data, 5, plugins=plugin_dir("echo_output"))
    stats = daemon.status.snapshot()["plugins"]["echo_output"]
    assert (stats["errors"], stats["rejected"]) == (5, 0)
    failures = [e for e in logs if e["event"] == "plugin_call_failed"]
    assert len(failures) == 1 and failures[0]["kind"] == "too_many_commands"


def test_a_tick_that_overruns_skips_past_deadlines_and_counts_them_missed(run_daemon) -> None:
    clock = VirtualClock()

    class Stall:
        """Tick 3's sensor reads take 250 ms: deadlines 4 and 5 pass during it."""

        reads = 0

        def advance(self, now: float) -> None:
            self.reads += 1
            if self.reads == 4:
                clock.advance(0.25)

        def close(self) -> None:
            pass

    daemon = run_daemon(unsimulated(example_data()), 0, clock=clock)
    daemon.hardware.environment = Stall()
    with capture_logs() as logs:
        asyncio.run(daemon.serve(10))
    ticks = daemon.status.snapshot()["ticks"]
    assert (ticks["count"], ticks["missed"]) == (10, 2)
    assert clock.monotonic() == pytest.approx(1.1)  # 10 ticks + 2 skipped deadlines, no drift
    overruns = [e for e in logs if e["event"] == "tick_overrun"]
    assert len(overruns) == 1 and overruns[0]["missed"] == 2 and overruns[0]["tick"] == 3  # the one that overran


@pytest.mark.parametrize("due,elapsed_periods,expected_next", [
    (0, 0.3, 1),   # on time: the next deadline
    (4, 4.99, 5),  # late but before the next deadline: no tick lost
    (4, 5.2, 6),   # overran one deadline: it is skipped (counted missed by the loop)
    (4, 7.5, 8),   # a long stall skips everything past, never piles ticks up
])
def test_overruns_skip_past_deadlines_and_never_pile_up(due, elapsed_periods, expected_next) -> None:
    assert next_deadline(due, elapsed_periods * 0.1, 0.1) == expected_next


def test_file_names_that_cannot_be_plugin_names_are_refused(run_daemon, plugin_dir) -> None:
    folder = plugin_dir("temperature_control")
    for bad in ("a+b", "operator", "safety", "x#y"):
        shutil.copy(folder / "temperature_control.wasm", folder / f"{bad}.wasm")
    with capture_logs() as logs:
        daemon = run_daemon(unsimulated(example_data()), 2, plugins=folder)
    assert set(daemon.status.snapshot()["plugins"]) == {"temperature_control"}
    assert len([e for e in logs if e["event"] == "plugin_name_invalid"]) == 4


def test_a_manifest_that_is_not_text_fails_its_plugin_only(run_daemon, plugin_dir) -> None:
    folder = plugin_dir("temperature_control", "motion_light")
    (folder / "motion_light.yaml").write_bytes(b"name: \xff\xfe motion\n")
    daemon = run_daemon(unsimulated(example_data()), 2, plugins=folder)
    plugins = daemon.status.snapshot()["plugins"]
    assert plugins["motion_light"]["state"] == "failed"
    assert "motion_light.yaml:1: (top level): not UTF-8 text" in plugins["motion_light"]["reason"]
    assert plugins["temperature_control"]["calls"] == 2


class Failing(LoopObserver):
    def plugin_called(self, plugin: str, seconds: float, failed: bool) -> None:
        raise ValueError("boom")

    def tick_done(self, report: TickReport) -> None:
        raise RuntimeError("bang")


def test_an_observer_that_raises_never_ends_the_loop(run_daemon, plugin_dir) -> None:
    """plugin_called observers are guarded as tick_done ones are: logged once, the loop goes on."""
    daemon = run_daemon(unsimulated(example_data()), 0, plugins=plugin_dir("temperature_control"))
    loop = ControlLoop(daemon.hardware, daemon.plugins, daemon.loop.safety, VirtualClock(), 0.1, [Failing()])
    with capture_logs() as logs:
        asyncio.run(loop.run(asyncio.Event(), max_ticks=5))
    assert loop.ticks.count == 5 and loop.plugin_stats["temperature_control"].calls == 5
    failed = [e for e in logs if e["event"] == "observer_failed"]
    assert sorted(e["error"] for e in failed) == ["bang", "boom"]  # once each, not once a tick


class SteppedClock(VirtualClock):
    """Virtual time whose wall clock is set forward by `step_s` at `at_s`, as NTP sets a Pi's clock (it has no
    real-time clock) some seconds after boot; its monotonic clock runs on untouched."""

    def __init__(self, at_s: float, step_s: float):
        super().__init__()
        self.at_s, self.step_s = at_s, step_s

    def time(self) -> float:
        return super().time() + (self.step_s if self.monotonic() >= self.at_s else 0.0)


class MotionThenStill:
    """Someone moves until `until_s` (monotonic), then nobody; notes, before each tick, what the last one left:
    the light's duty and the context's two times."""

    def __init__(self, daemon: Any, until_s: float):
        self.daemon, self.until_s = daemon, until_s
        self.duties: list[float] = []
        self.times: list[tuple[float, float]] = []

    def advance(self, now: float) -> None:
        if self.daemon.loop.trace is not None:
            self.duties.append(self.daemon.hardware.actuators["led_strip"].state["value"])
            self.times.append((self.daemon.loop.trace.time, self.daemon.loop.trace.monotonic))
        self.daemon.hardware.factory.pin(17).drive_high() if self.daemon.clock.monotonic() < self.until_s \
            else self.daemon.hardware.factory.pin(17).drive_low()

    def close(self) -> None:
        pass


@pytest.mark.parametrize("step_s", [3600.0, -3600.0])
def test_a_wall_clock_step_moves_the_timestamp_and_no_plugin_timer(run_daemon, plugin_dir, step_s) -> None:
    """motion_light holds the light 2 s after the last motion, then fades it over 1 s, on the context's
    `monotonic`: a step of the wall clock during the hold (either way) neither cuts it short nor stretches it."""
    data = unsimulated(example_data())
    data["plugins"]["settings"] = {"motion_light": {"config": {"hold_seconds": 2, "fade_seconds": 1, "on_duty": 80}}}

    def run(clock: VirtualClock) -> MotionThenStill:
        daemon = run_daemon(data, 0, plugins=plugin_dir("motion_light"), clock=clock)
        world = daemon.hardware.environment = MotionThenStill(daemon, until_s=1.0)
        asyncio.run(daemon.serve(50))
        return world

    steady, stepped = run(VirtualClock()), run(SteppedClock(at_s=2.0, step_s=step_s))
    assert stepped.duties == steady.duties
    # Motion in ticks 0-9 (to 0.9 s); on until 2 s after it, then a 1 s fade in 0.1 s steps, then off.
    assert steady.duties[:29] == [80.0] * 29 and steady.duties[29] < 80.0 and steady.duties[40:] == [0.0] * 9
    wall = [t for t, _ in stepped.times]
    monotonic = [m for _, m in stepped.times]
    assert monotonic == [m for _, m in steady.times]
    assert all(b - a == pytest.approx(0.1) for a, b in itertools.pairwise(monotonic))
    assert wall[21] - wall[19] == pytest.approx(0.2 + step_s)  # what the plugins saw as the time of day
