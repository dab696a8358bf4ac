"""Recordings: every tick of a run on mock pins, read back whole, gzip or plain, cut short or rotated."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from pi_controller.clock import VirtualClock
from pi_controller.sim import record
from pi_controller.sim.record import Reader, RecordingError
from tests.conftest import example_data, unsimulated


def recorded_run(run_daemon, path: Path, ticks: int = 20, **changes):
    data = example_data() | changes
    data["record"] = {"path": str(path)}
    daemon = run_daemon(data, ticks, clock=VirtualClock())
    daemon.close()  # ends the recording: every line written
    return daemon


@pytest.mark.parametrize("name", ["run.jsonl", "run.jsonl.gz"])
def test_every_tick_is_recorded_with_what_the_loop_saw_and_did(run_daemon, tmp_path, name) -> None:
    path = tmp_path / name
    daemon = recorded_run(run_daemon, path)
    reader = Reader(path)
    lines = [line for _, line in reader]
    assert [line["n"] for line in lines] == list(range(20))
    assert reader.skipped == 0
    header = reader.header
    assert header["version"] == record.VERSION and header["rate_hz"] == 10.0
    assert set(header["plugins"]) == {"energy_saver", "motion_light", "temperature_control"}
    assert "temperature_control" in header["config"]
    assert header["sensors"]["temperature_sensor"] == "celsius"
    # The last tick: the readings the snapshot shows, every plugin that answered, what was applied.
    last = lines[-1]
    snapshot = daemon.status.snapshot()
    assert last["r"]["temperature_sensor"] == snapshot["sensors"]["temperature_sensor"]["value"]
    assert set(last["p"]) == {"energy_saver", "motion_light", "temperature_control"}
    # Device states in full on the first line, then only the changes.
    assert set(lines[0]["s"]) == {"led_strip", "servo_motor", "relay_switch"}
    heater_on = next(line for line in lines if "relay_switch" in line.get("s", {}) and line is not lines[0])
    assert heater_on["s"]["relay_switch"]["on"] is True
    applied = next(line for line in lines if any(a[0] == "relay_switch" for a in line.get("a", [])))
    assert applied["n"] == heater_on["n"] - 1  # applied in one tick, seen by the plugins in the next
    assert ["relay_switch", "set_high", 1.0] in applied["p"]["temperature_control"]


def test_invalid_readings_rejections_conflicts_and_holds_are_recorded(run_daemon, tmp_path, plugin_dir) -> None:
    data = unsimulated(example_data())
    data["actuators"] = [a for a in data["actuators"] if a["id"] in ("relay_switch", "servo_motor")]
    path = tmp_path / "run.jsonl"
    data["record"] = {"path": str(path)}
    # The TMP36 on mock pins reads -50 C: out of range, an invalid reading, so the heater is held off.
    daemon = run_daemon(data, 3, clock=VirtualClock(), plugins=plugin_dir("temperature_control", "sweep"))
    daemon.close()
    lines = [line for _, line in Reader(path)]
    assert len(lines) == 3
    error, _ = lines[0]["bad"]["temperature_sensor"]
    assert "valid_min" in error
    # sweep asks the servo for -45 degrees (its range is 0..90) at tick 0: rejected, with the rule.
    assert [(device, rule) for device, rule, _ in lines[0]["x"]["sweep"]] == [("servo_motor", "out_of_range")]
    # Both plugins command the heater: temperature_control (priority 10) wins; sweep asks for on at tick 0.
    assert lines[0]["k"] == [["relay_switch", "temperature_control", "sweep"]]
    assert ["relay_switch", "requires", "temperature_control"] in lines[0]["h"]
    assert "relay_switch" not in {device for device, _, _ in lines[0].get("a", [])}


def test_a_recording_cut_mid_line_reads_up_to_the_cut(tmp_path, run_daemon) -> None:
    for name in ("cut.jsonl", "cut.jsonl.gz"):
        path = tmp_path / name
        recorded_run(run_daemon, path, ticks=30)
        whole = path.read_bytes()
        if name.endswith(".gz"):  # a crash: the gzip trailer never written, the last block cut short
            plain = gzip.decompress(whole)
            cut_at = plain.rindex(b'"n":29') + 10
            path.write_bytes(gzip.compress(plain[:cut_at])[:-8])
        else:
            path.write_bytes(whole[:whole.rindex(b'"n":29') + 10])
        reader = Reader(path)
        assert [line["n"] for _, line in reader] == list(range(29)), name
        assert reader.skipped == 1


def test_each_run_appends_a_header_and_its_ticks(run_daemon, tmp_path) -> None:
    path = tmp_path / "runs.jsonl.gz"
    recorded_run(run_daemon, path, ticks=5)
    recorded_run(run_daemon, path, ticks=7)
    reader = Reader(path)
    numbers = [line["n"] for _, line in reader]
    assert numbers == [*range(5), *range(7)]


def test_not_a_recording_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "other.jsonl"
    path.write_text('{"n": 1, "t": 2}\n')
    with pytest.raises(RecordingError, match="header"):
        list(Reader(path))
    path.write_text(json.dumps({"format": record.FORMAT, "version": 99}) + "\n")
    with pytest.raises(RecordingError, match="version 99"):
        list(Reader(path))


def test_the_file_is_rotated_past_its_size_keeping_the_newest(tmp_path) -> None:
    path = tmp_path / "r.jsonl"
    output = record._Output(path, max_bytes=1000, keep=2, first_line=b'{"format":"x"}\n')
    for n in range(100):
        output.write(b'{"n":%d,"t":0.0,"padding":"%s"}\n' % (n, b"x" * 50))
    output.close()
    rotated = sorted(p.name for p in tmp_path.iterdir())
    assert rotated == ["r.jsonl", "r.jsonl.1", "r.jsonl.2"]
    assert all(p.stat().st_size <= 1100 for p in tmp_path.iterdir())
    newest = path.with_name("r.jsonl.1").read_text().splitlines()
    assert newest[0] == '{"format":"x"}'  # each file starts with the header: it reads on its own
    assert json.loads(path.read_text().splitlines()[-1])["n"] == 99


def test_an_unwritable_recording_is_refused_before_the_loop_starts(write_config, tmp_path, cli_logs) -> None:
    from pi_controller import cli

    data = example_data()
    data["pins"] = {"factory": "mock"}
    path = write_config(data)
    code = cli.main(["run", "--config", str(path), "--simulate", "--ticks", "1",
                     "--record", str(tmp_path / "missing" / "r.jsonl")])
    assert code == 2


def test_a_plugin_dropped_in_while_recording_starts_a_new_header(run_daemon, tmp_path, plugin_dir) -> None:
    import os
    import shutil

    from pi_controller.clock import SystemClock
    from tests.conftest import TEST_PLUGINS, more_ticks, run_with, until

    folder = plugin_dir("temperature_control")
    data = example_data()
    data["record"] = {"path": str(tmp_path / "run.jsonl")}
    daemon = run_daemon(data, 0, plugins=folder, clock=SystemClock())

    async def scenario() -> None:
        await more_ticks(daemon, 5)
        shutil.copy(TEST_PLUGINS / "echo_output.wasm", folder / ".late")
        os.replace(folder / ".late", folder / "late.wasm")
        await until(lambda: "late" in daemon.plugins.status, "the plugin dropped in is loaded")
        await more_ticks(daemon, 5)

    run_with(daemon, scenario)
    daemon.close()
    lines = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    headers = [(i, line) for i, line in enumerate(lines) if "format" in line]
    assert [h["reason"] for _, h in headers] == ["start", "reload"]
    (at, second), first = headers[1], headers[0][1]
    assert set(second["plugins"]) - set(first["plugins"]) == {"late"}
    assert lines[at + 1]["n"] == second["tick"] and "late" in lines[at + 1].get("p", {})
    assert all("late" not in line.get("p", {}) for line in lines[1:at])
