"""`pi-controller simulate`: the real loop, plugins and safety against the models on a virtual clock.

Days are simulated at a slow loop rate (a tick every 10 s) with a room whose time constant is half an hour,
so that a day costs seconds (about 1 ms a tick); the path is the same as at 10 Hz.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pi_controller import config
from pi_controller.clock import SystemClock
from pi_controller.sim import commands, simulation
from pi_controller.sim.record import Playback
from pi_controller.sim.verdict import Verdict, hms
from tests.conftest import EXAMPLE_CONFIG, example_data

LSB_C = 330 / 1023  # one step of the TMP36 on the MCP3008


@pytest.fixture(autouse=True)
def _logs_to_this_test(cli_logs) -> None:
    """Every test here may run the CLI in-process."""


def day_room(data: dict[str, Any], **room: Any) -> dict[str, Any]:
    """The example with a room that takes a while to heat, and an outside following a 24 h curve."""
    data["simulation"][0].update({"start_c": 19.0, "time_constant_s": 1800.0, "outside_c": 12.0,
                                  "outside_swing_c": 4.0, "day_length_s": 86400.0, "noise_c": 0.05, **room})
    return data


def simulate(write_config, data: dict[str, Any], duration_s: float, rate_hz: float,
             plugins: Path | None = None) -> tuple[Verdict, dict[str, Any]]:
    settings = simulation.prepare(config.load(write_config(data)), rate_hz)
    columns = simulation.Columns()
    verdict = simulation.run(settings, duration_s, [columns], plugins)
    return verdict, columns.values


def test_the_bundled_thermostat_holds_its_band_for_a_simulated_day(write_config, plugin_dir) -> None:
    verdict, trace = simulate(write_config, day_room(example_data()), 24 * 3600, 0.1,
                              plugin_dir("temperature_control"))
    assert verdict.ticks == len(trace["time_s"]) == 8640
    assert verdict.plugins == {"temperature_control": ""} and not verdict.held
    assert not verdict.failsafes  # the heater's lease (command_ttl_s) is renewed every tick, in the band too
    warm = [i for i, t in enumerate(trace["time_s"]) if t >= 3600]  # warm-up: the first hour
    room = [trace["room.temperature_c"][i] for i in warm]
    reading = [trace["temperature_sensor"][i] for i in warm]
    # The plugin acts once the reading is a step outside the band; the room moves little in a tick.
    assert 20.5 - LSB_C <= min(room) and max(room) <= 21.5 + LSB_C
    assert 20.5 - LSB_C <= min(reading) and max(reading) <= 21.5 + LSB_C
    band = verdict.bands[0]
    assert (band.band.plugin, band.band.sensor) == ("temperature_control", "temperature_sensor")
    assert band.reached_at is not None and band.reached_at < 3600 and band.share > 0.9
    heater = verdict.actuators["relay_switch"]
    assert heater.switches > 50  # really controlling: on and off all day
    # It works harder in the cold of the night (the start) than in the warmth of the afternoon.
    relay, hours = trace["relay_switch"], trace["time_s"]
    night = [r for r, t in zip(relay, hours) if 1 * 3600 <= t < 3 * 3600]
    afternoon = [r for r, t in zip(relay, hours) if 11 * 3600 <= t < 13 * 3600]
    assert sum(night) / len(night) > sum(afternoon) / len(afternoon) + 0.2


def test_a_plugin_that_never_switches_the_heater_lets_the_room_drift_to_outside(write_config, plugin_dir) -> None:
    data = day_room(example_data())
    data["plugins"]["settings"] = {"echo_output": {"config": {"output": "[]"}}}
    verdict, trace = simulate(write_config, data, 24 * 3600, 0.1, plugin_dir("echo_output"))
    assert set(trace["relay_switch"]) == {0.0} and verdict.actuators["relay_switch"].switches == 0
    settled = [i for i, t in enumerate(trace["time_s"]) if t >= 4 * 3600]  # eight time constants
    gaps = [abs(trace["room.temperature_c"][i] - trace["room.outside_c"][i]) for i in settled]
    # A room lags the outside's day curve by about its time constant: 4 C * 2 pi * 1800 s / 1 day.
    assert max(gaps) < 0.6
    readings = [trace["temperature_sensor"][i] - trace["room.outside_c"][i] for i in settled]
    assert max(abs(r) for r in readings) < 0.6 + LSB_C + 4 * 0.05
    assert min(trace["room.outside_c"]) == pytest.approx(8.0, abs=0.01)
    assert max(trace["room.outside_c"]) == pytest.approx(16.0, abs=0.01)
    assert verdict.plugins == {"echo_output": ""}


def test_a_servo_takes_its_time_to_reach_the_commanded_angle(write_config, plugin_dir) -> None:
    data = example_data()
    command = {"device_id": "servo_motor", "action": "set_angle", "parameters": {"angle": 90}}
    data["plugins"]["settings"] = {"echo_output": {"config": {"output": json.dumps([command])}}}
    _verdict, trace = simulate(write_config, data, 5, 1.0, plugin_dir("echo_output"))
    assert list(trace["servo_motor"]) == [90.0] * 5  # commanded at once, from the first tick
    assert list(trace["servo.angle_deg"]) == [0.0, 30.0, 60.0, 90.0, 90.0]  # 30 degrees a second


def test_the_room_is_read_through_a_simulated_1_wire_thermometer_too(write_config, tmp_path) -> None:
    data = example_data()
    data["sensors"][0] = {"id": "temperature_sensor", "kind": "ds18b20", "device": "28-0316a2790aff",
                          "base_dir": str(tmp_path / "w1")}
    data["simulation"][0]["noise_c"] = 0.0
    verdict, trace = simulate(write_config, data, 60, 1.0)
    assert list(trace["temperature_sensor"]) == pytest.approx(list(trace["room.temperature_c"]), abs=0.0006)
    assert verdict.actuators["relay_switch"].switches >= 1  # the example room starts cold


def test_real_time_simulate_runs_read_the_same_models(run_daemon) -> None:
    data = example_data()
    data["simulation"][0]["noise_c"] = 0.0
    daemon = run_daemon(data, 3, clock=SystemClock())
    world = daemon.hardware.environment
    assert [type(m).__name__ for m in world.models] == ["Room", "Motion", "Daylight", "ServoModel"]
    reading = daemon.status.snapshot()["sensors"]["temperature_sensor"]["value"]
    assert reading == pytest.approx(world.models[0].temperature, abs=LSB_C)


def pi_controller(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pi_controller", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow  # two simulated hours, twice, and matplotlib draws them
def test_the_same_seed_gives_byte_identical_traces_and_a_plot(write_config, tmp_path) -> None:
    data = example_data()
    data["simulation"][0]["noise_c"] = 0.1
    path = write_config(data)

    def run(name: str, seed: str, *extra: str) -> bytes:
        result = pi_controller("simulate", "--config", str(path), "--duration", "5m", "--rate", "2",
                               "--seed", seed, "--trace", str(tmp_path / name), *extra)
        assert result.returncode == 0, result.stderr
        assert "temperature_control: temperature_sensor at 21 ± 0.5 celsius" in result.stdout
        assert "relay_switch (relay):" in result.stdout and "switches" in result.stdout
        return (tmp_path / name).read_bytes()

    first = run("a.csv", "11", "--plot", str(tmp_path / "a.png"))
    assert run("b.csv", "11") == first
    assert run("c.csv", "12") != first  # the seed reaches the room's noise and the motion
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header, *rows = first.decode().splitlines()
    assert header.split(",")[:3] == ["time_s", "tick", "temperature_sensor"] and len(rows) == 600
    assert "ms" not in header and "duration" not in header  # real time never reaches a trace


def test_a_bad_config_is_a_config_error(write_config) -> None:
    data = example_data()
    data["simulation"][0]["noise_c"] = -1
    result = pi_controller("simulate", "--config", str(write_config(data)), "--duration", "1m")
    assert result.returncode == 2
    assert "config error:" in result.stderr and "simulation[0].noise_c" in result.stderr


def test_durations() -> None:
    assert [commands.parse_duration(d) for d in ("90", "90s", "30m", "24h", "2d", "1.5h")] == [
        90, 90, 1800, 86400, 172800, 5400]
    for wrong in ("soon", "0s", "-1h", "24 hours"):
        with pytest.raises(argparse.ArgumentTypeError):
            commands.parse_duration(wrong)


def test_a_plugin_failing_after_switching_the_heater_on_leaves_it_off_in_simulate(write_config, plugin_dir) -> None:
    data = example_data()
    data["plugins"]["settings"] = {"command_once": {"config": {"then": "fail"}}}
    verdict, trace = simulate(write_config, data, 60, 10, plugin_dir("command_once"))
    heater = list(trace["relay_switch"])
    assert heater == [1.0] * 11 + [0.0] * 589  # on at tick 0, failing from tick 1, safe 1 s later
    assert verdict.failsafes == {"relay_switch": 1}
    assert "failsafe: relay_switch put in its safe state 1 times, its owner failing or silent" in verdict.lines()


def test_the_example_does_not_flap_for_a_quarter_of_an_hour() -> None:
    """The light sensor sees the strip's own light: without energy_saver's hysteresis and lamp_lux, the
    strip went on and off every tick around 500 lx (251 switches in these 15 minutes, 62 in one)."""
    settings = simulation.prepare(config.load(EXAMPLE_CONFIG))
    verdict = simulation.run(settings, 15 * 60)
    assert verdict.ticks == 9000
    assert {key: tally.flapping for key, tally in verdict.actuators.items()} == {
        "led_strip": [], "servo_motor": [], "relay_switch": []}
    assert 2 <= verdict.actuators["led_strip"].switches <= 40  # motion still lights it, daylight still stops it
    assert "no actuator flapped (more than 6 switches in a minute)" in verdict.lines()


def test_an_actuator_switching_every_tick_is_flagged_with_when(write_config, plugin_dir) -> None:
    data = example_data()  # without the servo: sweep's angles below 0 would get it quarantined
    data["actuators"] = [a for a in data["actuators"] if a["kind"] != "servo"]
    data["simulation"] = [m for m in data["simulation"] if m["kind"] != "servo"]
    verdict, trace = simulate(write_config, data, 120, 10, plugin_dir("sweep"))
    assert set(trace["relay_switch"][:4]) == {0.0, 1.0}  # sweep toggles the heater every tick
    (flapping,) = verdict.actuators["relay_switch"].flapping
    assert (flapping.start_s, flapping.end_s) == pytest.approx((0.0, 119.9))  # first switch to run end
    assert flapping.most == 600 and flapping.most_at_s == pytest.approx(59.9)  # every tick of the first minute
    (line,) = [line for line in verdict.lines() if line.startswith("FLAPPING: relay_switch")]
    assert line == ("FLAPPING: relay_switch switched more than 6 times a minute from 0:00:00 to 0:02:00; "
                    f"at worst 600 switches in the minute to {hms(flapping.most_at_s)}")
    assert not any(line.startswith("no actuator flapped") for line in verdict.lines())


def test_simulate_writes_a_trace_only_when_asked_and_shows_progress(tmp_path) -> None:
    """Not a terminal: a plain line at the start and every tenth of the run on stderr; no file written."""
    result = subprocess.run([sys.executable, "-m", "pi_controller", "simulate", "--config", str(EXAMPLE_CONFIG),
                             "--duration", "1m", "--rate", "2"], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.iterdir()) == []
    assert "trace:" not in result.stdout and result.stdout.startswith("simulated 0:01:00 at 2 Hz: 120 ticks")
    progress = [line for line in result.stderr.splitlines() if line.startswith("simulated ")]
    assert progress == ["simulated 0:00:00 of 0:01:00 (0 %)",  # the first tick: it has started
                        *(f"simulated 0:{s // 60:02d}:{s % 60:02d} of 0:01:00 ({s * 100 // 60} %)"
                          for s in range(6, 61, 6))]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_is_one_line_kept_up_to_date() -> None:
    terminal = Terminal()
    progress = simulation.Progress(3, 0.5, terminal)
    for _ in range(3):
        progress.add({})
    text = terminal.getvalue()
    assert text.startswith("\rsimulated 0:00:00 of 0:00:02 (33 %)")  # the first tick, then at most 5 a second
    assert text.endswith("\rsimulated 0:00:02 of 0:00:02 (100 %)\n") and text.count("\n") == 1


def test_sensors_without_a_model_are_driven_from_a_recording(write_config, tmp_path) -> None:
    recording = tmp_path / "day.jsonl.gz"
    settings = simulation.prepare(config.load(write_config(example_data(), "recorded.yaml")))
    recorded = simulation.Columns()
    simulation.run(settings, 30, [recorded], record=recording)
    # Now without the daylight model, and with a room that starts warmer: the light sensor plays the
    # recording, the thermometer keeps its model.
    data = example_data()
    data["simulation"] = [m for m in data["simulation"] if m["kind"] != "daylight"]
    data["simulation"][0]["start_c"] = 25.0
    settings = simulation.prepare(config.load(write_config(data)))
    played = simulation.Columns()
    verdict = simulation.run(settings, 40, [played], playback=Playback(recording))
    assert verdict.played == ["light_sensor"]
    assert "from the recording (no model drives them): light_sensor" in verdict.lines()
    assert list(played.values["light_sensor"][:300]) == list(recorded.values["light_sensor"])
    assert len(set(recorded.values["light_sensor"])) > 10  # it moved: the dawn of the example's day
    assert min(played.values["temperature_sensor"]) > max(recorded.values["temperature_sensor"])
    # Past the recording's end the sensor is invalid: the safety rules see a failed sensor, not a stale value.
    assert all(math.isnan(v) for v in played.values["light_sensor"][301:])


def test_from_recording_refuses_what_is_no_recording_before_the_run(write_config, tmp_path, capsys) -> None:
    from pi_controller import cli
    from pi_controller.sim.record import FORMAT, VERSION

    (tmp_path / "not.jsonl").write_text("hello\n")
    crafted = {"format": FORMAT, "version": VERSION, "rate_hz": "fast", "sensors": {"light_sensor": "lux"}}
    (tmp_path / "crafted.jsonl").write_text(json.dumps(crafted) + '\n{"n": 0, "t": 0.0}\n')
    for path in (tmp_path / "not.jsonl", tmp_path / "missing.jsonl", tmp_path / "crafted.jsonl"):
        assert cli.main(["simulate", "--config", str(write_config(example_data())), "--duration", "1m",
                         "--from-recording", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: --from-recording {path}:")


EVERY_KIND = EXAMPLE_CONFIG.parent / "every-kind.yaml"


def test_a_config_with_every_device_kind_runs_on_simulated_pins() -> None:
    """On a laptop: no Pi, no /sys/class/thermal of the Pi's, no 1-wire bus, no writable base_dir given."""
    from pi_controller.devices import cpu_temperature, registry

    data = yaml.safe_load(EVERY_KIND.read_text())
    kinds = {entry["kind"] for entry in data["sensors"] + data["actuators"]}
    assert kinds == set(registry.SENSORS) | set(registry.ACTUATORS)
    result = pi_controller("run", "--config", str(EVERY_KIND), "--simulate", "--ticks", "20", "--log-level", "warning")
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    assert {name: r["valid"] for name, r in snapshot["sensors"].items()} == {s["id"]: True for s in data["sensors"]}
    assert snapshot["sensors"]["cpu"]["value"] == cpu_temperature.SIMULATED_C  # the simulated zone, not this CPU's
    assert snapshot["sensors"]["air_temperature"]["value"] == pytest.approx(15.0, abs=0.1)  # the room's start_c
    assert all(p["calls"] == 20 and p["errors"] == 0 for p in snapshot["plugins"].values())


def test_every_kind_on_the_virtual_clock_reads_the_models_through_the_kernel_s_formats(write_config) -> None:
    """The DS18B20 on its default base_dir gets the room through a simulated w1_slave (read in the tick); the
    room has a heater and a fan."""
    data = yaml.safe_load(EVERY_KIND.read_text())
    data["plugins"]["directory"] = str(EXAMPLE_CONFIG.parent.parent / "plugins")
    verdict, trace = simulate(write_config, data, 600, 1.0)
    assert verdict.plugins == {"energy_saver": "", "motion_light": "", "temperature_control": ""}
    assert list(trace["air_temperature"]) == pytest.approx(list(trace["room.temperature_c"]), abs=0.0006)
    assert set(trace["cpu"]) == {45.0}
    assert verdict.actuators["heater"].switches >= 1  # 15 C in a greenhouse held at 18


class Level:
    def __init__(self, level: float = 0.0):
        self.value = level

    def level(self) -> float:
        return self.value


class Thermometer:
    def set(self, value: float) -> None:
        self.value = value


def room_after(seconds: float, heater: float | None, fan: float | None, **settings: Any) -> float:
    """The room's temperature after `seconds` from 25 C, 10 C outside, with the actuators held as given
    (None: the room has no such actuator)."""
    from pi_controller.simulators.models import Room, RoomSettings

    probes = {name: Level(level) for name, level in (("heater", heater), ("fan", fan)) if level is not None}
    room_settings = RoomSettings(kind="room", sensor="t", start_c=25.0, outside_c=10.0, time_constant_s=600,
                                 **{name: name for name in probes}, **settings)
    room = Room(room_settings, {"sensor": Thermometer()}, probes)
    room.advance(0.0)
    room.advance(seconds)
    return room.temperature


def test_the_room_needs_neither_heater_nor_fan_and_a_fan_cools_it_towards_the_outside() -> None:
    alone = room_after(600, None, None)
    assert alone == pytest.approx(10 + 15 * math.exp(-1))
    assert room_after(600, 0.0, 0.0) == alone  # off is as good as absent
    fan = room_after(600, None, 1.0, fan_time_constant_s=300)  # walls 1/600 + fan 1/300 = 1/200
    assert fan == pytest.approx(10 + 15 * math.exp(-3))
    assert room_after(600, None, -1.0, fan_time_constant_s=300) == fan  # a motor blowing the other way
    assert room_after(600, None, 0.5, fan_time_constant_s=300) == pytest.approx(10 + 15 * math.exp(-2))


def test_a_heater_and_a_fan_together_settle_between() -> None:
    """At equilibrium the heater's power leaves through the walls and the fan's air: 16 C rise through the walls
    alone, a third of it with a fan that exchanges twice as much."""
    assert room_after(1e6, 1.0, None) == pytest.approx(26.0)
    assert room_after(1e6, 1.0, 1.0, fan_time_constant_s=300) == pytest.approx(10 + 16 / 3)


def test_simulate_shows_the_plugins_own_log_lines_and_not_the_daemon_s_info(write_config, plugin_dir) -> None:
    """An author simulates to see the plugin: its pi_log lines from info on, the daemon's own from warning."""
    data = example_data()
    data["sensors"][2]["id"] = data["simulation"][2]["sensor"] = "light"  # smoothed_light's sensor
    data["mqtt"].pop("deadband")
    data["plugins"]["settings"] = {}
    result = pi_controller("simulate", "--config", str(write_config(data)), "--duration", "5s", "--rate", "2",
                           "--plugins", str(plugin_dir("smoothed_light")))
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if "plugin_log" in line]
    assert len(said) == 10 and all("dimming to the mean" in line and "plugin=smoothed_light" in line for line in said)
    assert "plugin_loaded" not in result.stderr and "loop_started" not in result.stderr
