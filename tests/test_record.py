"""Recordings: every tick of a run on mock pins, read back whole, gzip or plain, cut short or rotated."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from structlog.testing import capture_logs

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


@pytest.mark.parametrize("source", ["gone", "pipe"])
def test_a_config_that_cannot_be_read_again_is_recorded_as_none_not_a_failed_start(tmp_path, source) -> None:
    """The header reads the config's text again: a file removed since it was loaded, or a pipe (run --config
    <(...)) read then, raised ConfigError, which the header's except (OSError) let through to the recorder's
    start."""
    from pi_controller import config

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(example_data()))
    settings = config.load(path)
    path.unlink()
    if source == "pipe":
        os.mkfifo(path)  # nothing writes to it: as a pipe already read
    assert record.header(settings, {}, 0.0)["config"] is None


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


@pytest.mark.parametrize("where, error", [
    ("/dev/full", "No space left on device"),  # a full disk: it opens, and every write fails with ENOSPC
    ("config.yaml/run.jsonl", "Not a directory"),  # relative, beside the config: a place it cannot open
])
def test_a_recording_that_cannot_be_written_never_stops_control(write_config, tmp_path, where: str,
                                                                error: str) -> None:
    """The row of issue 25, as the service meets it: `run` runs its ticks, says so once, and shows it."""
    data = example_data()
    data["pins"] = {"factory": "mock"}
    data["record"] = {"path": where}
    result = subprocess.run([sys.executable, "-m", "pi_controller", "run", "--config", str(write_config(data)),
                             "--simulate", "--ticks", "25", "--log-format", "json"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    (unavailable,) = [e for e in events if e["event"] == "recording_unavailable"]
    path = where if where.startswith("/") else str(tmp_path / where)
    assert (unavailable["error"], unavailable["file"]) == (error, path)
    snapshot = json.loads(result.stdout)
    assert snapshot["ticks"]["count"] == 25 and snapshot["actuators"]["relay_switch"]["on"] is True  # it heats
    assert snapshot["recording"] | {"dropped": 0, "lines": 0} == {
        "file": path, "writing": False, "lines": 0, "dropped": 0, "error": error}


def test_a_recording_that_cannot_be_opened_is_retried_and_reads_on_its_own_from_where_it_resumes(
        run_daemon, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(record, "RETRY_S", 0.0)  # at every batch, rather than every 30 s
    folder = tmp_path / "later"  # not there yet: as a disk mounted late, or a path fixed by hand
    data = example_data()
    data["record"] = {"path": str(folder / "run.jsonl")}
    logs = capture_logs()
    with logs as events:
        daemon = run_daemon(data, 0, clock=VirtualClock())

    class Script:
        reads = 0

        def advance(self, now: float) -> None:
            self.reads += 1
            if self.reads == 30:
                # The writer has tried a batch without the folder first (and dropped it), however busy the machine:
                # starved until now, it would open the file at its first try, with nothing lost to resume from. (Its
                # event is cleared on this thread, at a batch: one set since the count was read stays set.)
                recorder = daemon.recorder
                assert recorder.dropped > 0 or recorder._lost.wait(60), "the writer dropped no batch without its folder"
                folder.mkdir()
            if self.reads > 30 and daemon.recorder.error is not None:
                time.sleep(0.01)  # the writer's turn: virtual ticks are faster than its thread

        def close(self) -> None:
            pass

    daemon.hardware.environment = Script()
    with capture_logs() as later:
        asyncio.run(daemon.serve(200))
        daemon.close()
    said = [e["event"] for e in events + later if e["event"].startswith("recording_")]
    assert said == ["recording_unavailable", "recording_resumed", "recording_closed"]
    reader = Reader(folder / "run.jsonl")
    lines = [line for _, line in reader]
    first = lines[0]["n"]
    assert 0 < first < 200 and [line["n"] for line in lines] == list(range(first, 200))  # none lost after
    assert set(lines[0]["s"]) == {"led_strip", "servo_motor", "relay_switch"}  # it reads without what was lost
    assert reader.skipped == 0 and reader.header["reason"] == "start"


@pytest.mark.parametrize("where, code, said", [
    ("run.jsonl.gz", 2, "config error: {config}:{line}: record.path: 'run.jsonl.gz' is relative: it would be written "
                        "beside the config, in {folder}, which the service cannot write (ProtectSystem=strict); give a "
                        "path under {state}, such as {state}/run.jsonl.gz"),
    ("/srv/run.jsonl.gz", 0, "warning: record.path /srv/run.jsonl.gz is outside {state}: the service writes there, its "
                             "CacheDirectory= and /tmp only, unless a drop-in gives it ReadWritePaths="),
    ("{state}/run.jsonl.gz", 0, None),
])
def test_check_config_under_the_unit_says_where_a_recording_may_live(write_config, tmp_path, where: str, code: int,
                                                                     said: str | None) -> None:
    state = tmp_path / "state"  # what systemd passes the unit's ExecReload= check as $STATE_DIRECTORY
    state.mkdir()
    data = example_data()
    data["record"] = {"path": where.format(state=state)}
    config = write_config(data)
    result = subprocess.run([sys.executable, "-m", "pi_controller", "check-config", str(config)], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "STATE_DIRECTORY": str(state)})
    assert result.returncode == code
    line = next(n for n, text in enumerate(config.read_text().splitlines(), 1) if text.startswith("  path:"))
    expected = [said.format(config=config, line=line, folder=tmp_path, state=state)] if said else []
    assert result.stderr.splitlines() == expected


def test_an_outage_buffer_that_cannot_be_saved_is_said_once_and_the_stop_goes_on(write_config, tmp_path) -> None:
    from tests.conftest import free_port

    data = example_data()
    data["pins"] = {"factory": "mock"}
    data["mqtt"] = {"enabled": True, "host": "127.0.0.1", "port": free_port(), "node_id": "testpi",  # no broker
                    "buffer_file": str(tmp_path / "missing" / "outbox.jsonl")}
    result = subprocess.run([sys.executable, "-m", "pi_controller", "run", "--config", str(write_config(data)),
                             "--simulate", "--ticks", "5", "--log-format", "json"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    (failed,) = [e for e in events if e["event"] == "telemetry_save_failed"]
    assert failed["messages"] > 0 and "No such file or directory" in failed["error"]
    assert not [e for e in events if e["event"] == "shutdown_step_failed"] and "Traceback" not in result.stderr
