"""The daemon as a user runs it: a subprocess, its exit code, its stdout snapshot and its stderr logs."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pi_controller.devices.hardware import EXIT_HARDWARE
from pi_controller.plugins.extism_adapter import runtime_version
from tests.conftest import EXAMPLE_CONFIG, REPO


def pi_controller(*args: str) -> list[str]:
    return [sys.executable, "-m", "pi_controller", *args]


def test_run_ticks_prints_one_json_snapshot_and_logs_to_stderr() -> None:
    result = subprocess.run(pi_controller("run", "--config", str(EXAMPLE_CONFIG), "--simulate", "--ticks", "5",
                                          "--log-format", "json"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    assert snapshot["ticks"]["count"] == 5
    assert set(snapshot) == {"sensors", "actuators", "plugins", "ticks", "safety"}
    # The room starts cold, but start-up counts as a switch: the heater waits out its min_off_s.
    assert snapshot["safety"] == {"held": {"relay_switch": {"min_off": 5}}, "failsafes": {}, "watchdog_trips": 0,
                                  "owners": {"relay_switch": "temperature_control", "led_strip": "safety",
                                             "servo_motor": "safety"}}
    assert set(snapshot["ticks"]) == {"count", "missed", "duration_median_us", "duration_p99_us",
                                      "start_jitter_p99_us"}
    assert set(snapshot["plugins"]) == {"energy_saver", "motion_light", "temperature_control"}
    for stats in snapshot["plugins"].values():
        assert set(stats) == {"state", "calls", "errors", "rejected", "held", "stalls", "resets", "median_us",
                              "max_us"}
    events = [json.loads(line) for line in result.stderr.splitlines()]  # every line is one JSON event
    names = [e["event"] for e in events]
    assert names[0] == "daemon_starting"  # before any pin moves: what runs, from where, on what
    assert events[0]["version"] == importlib.metadata.version("pi-controller")
    assert events[0]["config"] == str(EXAMPLE_CONFIG) and events[0]["plugins"] == str(REPO / "plugins")
    assert events[0]["pins"] == "mock" and events[0]["runtime"] == f"libextism {runtime_version()}"
    assert names.index("loop_started") < names.index("loop_stopped") < len(names) - 1
    assert names[-1] == "actuators_shutdown"
    held = [e for e in events if e["event"] == "command_held"]
    assert [(e["device"], e["rule"], e["plugin"], e["tick"]) for e in held] == [
        ("relay_switch", "min_off", "temperature_control", 0)]  # logged once, not every tick
    assert events[-1]["states"] == {"led_strip": 0.0, "servo_motor": 0.0, "relay_switch": 0.0}
    assert names.index("actuators_startup") < names.index("loop_started")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_end_the_run_cleanly_with_actuators_safe(sig) -> None:
    process = subprocess.Popen(pi_controller("run", "--config", str(EXAMPLE_CONFIG), "--simulate",
                                             "--log-format", "json"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stderr:  # wait until the loop runs
            if json.loads(line)["event"] == "loop_started":
                break
        process.send_signal(sig)
        rest = process.communicate(timeout=30)[1]
    finally:
        process.kill()
    assert process.returncode == 0
    names = [json.loads(line)["event"] for line in rest.splitlines()]
    assert names[-2:] == ["loop_stopped", "actuators_shutdown"]
    assert names.count("actuators_shutdown") == 1
    last = json.loads(rest.splitlines()[-1])
    assert last["states"] == {"led_strip": 0.0, "servo_motor": 0.0, "relay_switch": 0.0}


def test_log_format_console_is_readable_text() -> None:
    result = subprocess.run(pi_controller("run", "--config", str(EXAMPLE_CONFIG), "--simulate", "--ticks", "1"),
                            capture_output=True, text=True, timeout=120, env={**os.environ, "TERM": "dumb"})
    assert result.returncode == 0
    line = next(text for text in result.stderr.splitlines() if "plugin_loaded" in text)
    assert "plugin=energy_saver" in line or "plugin=motion_light" in line or "plugin=temperature_control" in line
    assert not line.startswith("{")


PLUGIN = "plugins/energy_saver.wasm"
CONFIG = str(EXAMPLE_CONFIG)


@pytest.mark.parametrize("args, stdin, line", [
    (["plugin", "call", PLUGIN], "not json", "error: the context is not JSON: Expecting value: line 1 column 1"),
    (["plugin", "call", PLUGIN], "[1, 2]", "error: the context must be a JSON object, not an array"),
    (["plugin", "call", PLUGIN], '{"sensor_reading": []}',
     "error: unknown key 'sensor_reading' in the context: did you mean 'sensor_readings'?"),
    (["plugin", "call", PLUGIN], '{"sensor_readings": [{"sensor_id": "x", "vlaue": 3}]}',
     "error: unknown key 'vlaue' in sensor_readings[0]: did you mean 'value'?"),
    (["plugin", "call", PLUGIN, "--context", "/nonexistent/context.json"], "",
     "error: cannot read the context /nonexistent/context.json: No such file or directory"),
    (["plugin", "call", "/nonexistent/x.wasm"], "{}", "error: /nonexistent/x.wasm: no such plugin file"),
    (["simulate", "--config", CONFIG, "--trace", "/nonexistent/trace.csv"], "",
     "error: --trace /nonexistent/trace.csv: the folder /nonexistent does not exist"),
    (["simulate", "--config", CONFIG, "--plot", "/nonexistent/day.png"], "",
     "error: --plot /nonexistent/day.png: the folder /nonexistent does not exist"),
    (["simulate", "--config", CONFIG, "--record", "/tmp"], "", "error: --record /tmp: is a folder; give a file name"),
    (["simulate", "--config", CONFIG, "--plugins", "/nonexistent"], "",
     f"config error: {CONFIG}: plugins.directory: /nonexistent (given by --plugins) does not exist"),
    (["check-config", "/nonexistent/config.yaml"], "",
     "config error: /nonexistent/config.yaml: (top level): cannot read the file: No such file or directory"),
    (["run", "--config", "/nonexistent/config.yaml"], "",
     "config error: /nonexistent/config.yaml: (top level): cannot read the file: No such file or directory"),
    (["check-config"], "", "error: check-config takes one config file: PATH or --config PATH"),
    (["replay", "/nonexistent/day.rec"], "", "replay error: /nonexistent/day.rec: No such file or directory"),
])
def test_a_mistake_in_what_the_user_passed_is_one_line_and_exit_2(args: list[str], stdin: str, line: str) -> None:
    """Said once, before any work: a simulate of the default 24 h would take minutes if it started."""
    result = subprocess.run(pi_controller(*args), input=stdin, capture_output=True, text=True, timeout=60,
                            cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (said,) = result.stderr.splitlines()
    assert said.startswith(line)
    assert result.stdout == ""


LONG_RELATIVE = "/".join(["d" * 200] * 20) + "/" + "x" * 70  # 4090 bytes as typed: over 4095 in any folder but /


@pytest.mark.parametrize("args, message", [
    (["run", "--config", CONFIG, "--ticks", "many"], "argument --ticks: 'many' is not a whole number"),
    (["run", "--config", CONFIG, "--ticks", "0"], "argument --ticks: must be 1 or more"),
    (["simulate", "--config", CONFIG, "--rate", "fast"], "argument --rate: 'fast' is not a number"),
    (["simulate", "--config", CONFIG, "--rate", "1e9"], "argument --rate: 1e+09 is out of range; valid: 0.1 to 1000"),
    (["simulate", "--config", CONFIG, "--duration", "0"],
     "argument --duration: '0' is not a duration such as 90s, 30m, 24h or 2d"),
    (["simulate", "--config", CONFIG, "--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["replay", "x.rec", "--from", "noon"],
     "argument --from: 'noon' is neither Unix seconds nor an ISO 8601 time such as 2026-12-01T18:00:00"),
    (["run", "--config", CONFIG, "--ticks", "9" * 23], "argument --ticks: must be at most 1000000000"),
    (["run", "--config", CONFIG, "--ticks", "9" * 5000],  # more digits than int() takes
     "argument --ticks: must be at most 1000000000"),
    (["simulate", "--config", CONFIG, "--duration", "9" * 23],  # a run of 10^16 years, started
     f"argument --duration: '{'9' * 23}' is longer than the 366d a run may simulate"),
    (["simulate", "--config", CONFIG, "--duration", "9" * 400 + "d"],  # infinite as a float: a traceback
     f"argument --duration: '{'9' * 40}' is longer than the 366d a run may simulate"),
    (["check-config", CONFIG, "--plugins", "A" * 5000],  # Path.is_dir() raises for it: a traceback
     "argument --plugins: a path of 5000 bytes, over the 4095 a path may have"),
    (["check-config", CONFIG, "--plugins", LONG_RELATIVE],  # is_dir() raised for it: a traceback
     f"argument --plugins: a path of {len(os.path.join(os.getcwd(), LONG_RELATIVE))} bytes in the current "
     "folder, over the 4095 a path may have"),
    (["run", "--config", CONFIG, "--state-dir", "/tmp/" + "B" * 300],
     f"argument --state-dir: '/tmp/{'B' * 35}'...: a name in the path is over the 255 bytes a name may have"),
])
def test_argument_errors_name_the_argument_not_our_functions(args: list[str], message: str) -> None:
    """Every type= function of the CLI: what argparse says names the option, never the function."""
    result = subprocess.run(pi_controller(*args), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].endswith(message)
    for internal in ("_positive", "_rate", "parse_duration", "parse_time", "path_argument", "Traceback"):
        assert internal not in result.stderr


@pytest.mark.parametrize("args, line", [
    (["check-config", "{tmp}/fifo.yaml"],
     "config error: {tmp}/fifo.yaml: (top level): the file is not a regular file and gave no config: nothing was "
     "written to it"),
    (["run", "--config", CONFIG, "--simulate", "--record", "{tmp}/fifo"],
     "error: --record {tmp}/fifo: is a FIFO that nothing reads: writing to it would wait for good"),
    (["simulate", "--config", CONFIG, "--trace", "{tmp}/fifo"],
     "error: --trace {tmp}/fifo: is a FIFO that nothing reads: writing to it would wait for good"),
    (["simulate", "--config", CONFIG, "--from-recording", "{tmp}/fifo.rec"],
     "error: --from-recording {tmp}/fifo.rec: {tmp}/fifo.rec: no tick recorded"),
    (["replay", "{tmp}/fifo.rec"], "replay error: {tmp}/fifo.rec: no tick recorded"),
    (["plugin", "call", str(REPO / "plugins" / "energy_saver.wasm"), "--context", "{tmp}/fifo.json"],
     "error: the context is not JSON"),
    (["simulate", "--config", CONFIG, "--plot", "{tmp}/day.yaml"],  # matplotlib refused it after the run
     "error: --plot {tmp}/day.yaml: '.yaml' is not a picture's suffix; name it .png (or "),
])
def test_a_fifo_nothing_writes_or_reads_or_an_output_of_no_kind_is_one_line_and_exit_2(tmp_path, args: list[str],
                                                                                      line: str) -> None:
    """A FIFO with no process at its other end: opening it would wait for one for good (the command hung)."""
    for name in ("fifo", "fifo.yaml", "fifo.rec", "fifo.json"):
        os.mkfifo(tmp_path / name)
    result = subprocess.run(pi_controller(*[arg.format(tmp=tmp_path) for arg in args]), capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(line.format(tmp=tmp_path)), result.stderr


@pytest.mark.parametrize("given, said", [
    ("<(true)", ": (top level): the file is not a regular file and gave no config: nothing was written to it"),
    (f"<(cat {CONFIG}) --plugins {REPO / 'plugins'}", ": OK (3 sensors, 3 actuators"),  # not relative to /dev/fd
])
def test_check_config_of_a_pipe_says_what_its_writer_gave(given: str, said: str) -> None:
    """The shell's `<(command)`: a pipe whose writer wrote the config is checked as the file; one whose writer
    wrote nothing and ended is no config, and said so as it is, not as a FIFO that nothing writes to."""
    command = " ".join(shlex.quote(arg) for arg in pi_controller("check-config"))
    result = subprocess.run(["bash", "-c", f"exec {command} {given}"], capture_output=True, text=True, timeout=60)
    assert result.returncode == (0 if "OK" in said else 2), result.stderr
    assert said in (result.stdout if "OK" in said else result.stderr.splitlines()[-1]), result
    assert "Traceback" not in result.stderr


def test_ticks_with_leading_zeros_is_the_number_they_pad() -> None:
    from pi_controller.cli import _positive

    assert _positive("00000000001") == 1  # eleven digits: refused as over 10^9
    assert _positive("+" + "0" * 5000 + "7") == 7  # more digits than int() takes


def reading(fifo: Path, into: Path) -> subprocess.Popen[bytes]:
    """`cat fifo > into`, started and waiting in its open of the FIFO for a writer: the reader a shell makes."""
    os.mkfifo(fifo)
    with into.open("wb") as out:
        reader = subprocess.Popen(["cat", str(fifo)], stdout=out)
    wchan = Path(f"/proc/{reader.pid}/wchan")
    for _ in range(6000):  # a minute at most; the kernel's wait in a FIFO's open is wait_for_partner
        if wchan.read_text() == "wait_for_partner":
            return reader
        with contextlib.suppress(subprocess.TimeoutExpired):
            pytest.fail(f"cat {fifo} exited {reader.wait(timeout=0.01)} before its open")
    pytest.fail(f"cat {fifo} never opened it")


def test_simulate_writes_through_fifos_whose_readers_end_at_their_first_writers_close(tmp_path) -> None:
    """The check that a FIFO is read opened it and closed it: the end of the file for `cat fifo > file`,
    which exited, and the trace's open then waited for a reader for good."""
    day = ["simulate", "--config", CONFIG, "--duration", "30s", "--seed", "1", "--log-level", "error"]
    readers = [reading(tmp_path / f"{name}.fifo", tmp_path / f"{name}.got") for name in ("trace", "rec")]
    subprocess.run(pi_controller(*day, "--trace", str(tmp_path / "trace.fifo"), "--record",
                                 str(tmp_path / "rec.fifo")), capture_output=True, timeout=60, check=True)
    subprocess.run(pi_controller(*day, "--trace", str(tmp_path / "trace.csv"), "--record",
                                 str(tmp_path / "rec.rec")), capture_output=True, timeout=60, check=True)
    assert [reader.wait(timeout=60) for reader in readers] == [0, 0]
    assert (tmp_path / "trace.got").read_bytes() == (tmp_path / "trace.csv").read_bytes()
    assert (tmp_path / "rec.got").read_bytes() == (tmp_path / "rec.rec").read_bytes()


def test_run_records_through_a_fifo_whose_reader_ends_at_its_first_writers_close(tmp_path) -> None:
    """As simulate: the recorder's open waited in Daemon.__init__, pins claimed, no tick and no watchdog."""
    reader = reading(tmp_path / "rec.fifo", tmp_path / "rec.got")
    result = subprocess.run(pi_controller("run", "--config", CONFIG, "--simulate", "--ticks", "3", "--record",
                                          str(tmp_path / "rec.fifo")), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and reader.wait(timeout=60) == 0, result.stderr
    header, *ticks = (tmp_path / "rec.got").read_bytes().splitlines()
    assert json.loads(header)["format"] and len(ticks) == 3


def test_a_plot_to_a_fifo_ends_its_readers_file_when_drawn_not_when_the_process_exits(tmp_path) -> None:
    """The check that --plot's FIFO is read kept a write end for a writer that never took it (the picture is
    drawn through an open of its own): `cat fifo > file` waited for more until the process exited. In this
    process, as a long-lived caller of the command would be."""
    from pi_controller import cli

    reader = reading(tmp_path / "day.png", tmp_path / "day.got")
    try:
        assert cli.main(["simulate", "--config", CONFIG, "--duration", "30s", "--log-level", "error",
                         "--plot", str(tmp_path / "day.png")]) == 0
        assert reader.wait(timeout=60) == 0
    finally:
        reader.kill()
    assert (tmp_path / "day.got").read_bytes().startswith(b"\x89PNG")


def test_a_record_path_nothing_reads_is_one_error_line_and_the_loop_runs_on(tmp_path) -> None:
    """record.path, a diagnostic: a FIFO nothing reads is unavailable as a full disk is (the recorder's open of it
    waited for good in Daemon.__init__); tried again every 30 s, so a reader that comes later gets it."""
    os.mkfifo(tmp_path / "day.rec")
    config = tmp_path / "config.yaml"
    config.write_text(EXAMPLE_CONFIG.read_text() + f"\nrecord:\n  path: {tmp_path / 'day.rec'}\n")
    result = subprocess.run(pi_controller("run", "--config", str(config), "--plugins", str(REPO / "plugins"),
                                          "--simulate", "--ticks", "3", "--log-format", "json"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    (unavailable,) = [e for e in events if e["event"] == "recording_unavailable"]
    assert unavailable["error"] == "is a FIFO that nothing reads"
    assert json.loads(result.stdout)["ticks"]["count"] == 3


def test_check_config_takes_the_path_as_the_other_commands_do() -> None:
    for args in ([CONFIG], ["--config", CONFIG]):
        result = subprocess.run(pi_controller("check-config", *args), capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"{CONFIG}: OK (3 sensors, 3 actuators")


ON_A_PI = "Raspberry Pi" in (Path("/proc/device-tree/model").read_text(errors="replace")
                             if Path("/proc/device-tree/model").is_file() else "")


@pytest.mark.skipif(ON_A_PI, reason="on a Pi the GPIO opens")
def test_without_a_pi_it_says_so_and_how_to_simulate_in_one_line() -> None:
    """Not on a Pi (or lgpio missing, or not in the gpio group), without --simulate: said once, plainly;
    exit 3, which systemd retries (a bus may come up late), unlike a config error's 2."""
    result = subprocess.run(pi_controller("run", "--config", CONFIG), capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_HARDWARE == 3
    starting, said = result.stderr.splitlines()
    assert "daemon_starting" in starting and "pins=lgpio" in starting
    assert said.startswith("hardware error: cannot open the Pi's GPIO through lgpio (")
    assert said.endswith("not on a Pi? run with --simulate or set pins.factory: mock. On a Pi: is the user in the "
                         "'gpio' group?")
    assert result.stdout == ""


@pytest.mark.parametrize("command", [["run", "--config"], ["run", "--simulate", "--config"], ["check-config"],
                                     ["check-config", "--config"], ["simulate", "--config"],
                                     ["plugin", "install", "plugins/energy_saver.wasm", "--config"]])
def test_a_config_error_is_said_once_by_every_command(tmp_path, command: list[str]) -> None:
    """One line naming file, line and key: no log line besides it, no second copy."""
    bad = tmp_path / "config.yaml"
    bad.write_text(EXAMPLE_CONFIG.read_text().replace("frequency: 200", "frequency: 0"))
    result = subprocess.run(pi_controller(*command, str(bad)), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    (said,) = result.stderr.splitlines()
    assert said.startswith(f"config error: {bad}:") and "actuators[0].frequency: 0 is out of range" in said
    assert result.stdout == ""


@pytest.mark.parametrize("args, event, exit_code", [
    (["run", "--config", "/nonexistent/config.yaml"], "config_error", 2),
    (["run", "--config", CONFIG, "--ticks", "many"], "usage_error", 2),
    (["run", "--config", CONFIG, "--log-level", "loud"], "usage_error", 2),
    pytest.param(["run", "--config", CONFIG], "hardware_error", EXIT_HARDWARE,
                 marks=pytest.mark.skipif(ON_A_PI, reason="on a Pi the GPIO opens")),
    (["simulate", "--config", CONFIG, "--trace", "/nonexistent/trace.csv"], "argument_error", 2),
    (["safe-state", "--config", "/nonexistent/config.yaml"], "safe_state_failed", 2),
    (["replay", "/nonexistent/day.rec"], "replay_error", 2),
])
def test_with_json_asked_for_every_line_is_json_errors_at_start_included(args: list[str], event: str,
                                                                        exit_code: int) -> None:
    """jq and journald's JSON readers stop at the first line that is not JSON: a start that fails is when
    the owner reads the log, so its error is an event too, with the plain line as its message."""
    result = subprocess.run(pi_controller(*args, "--log-format", "json"), capture_output=True, text=True, timeout=60)
    assert result.returncode == exit_code
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert events[-1]["event"] == event and events[-1]["level"] == "error"
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_version_names_the_runtime_and_the_machine() -> None:
    result = subprocess.run(pi_controller("--version"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout == (f"pi-controller {importlib.metadata.version('pi-controller')} (extism-sys "
                             f"{runtime_version()}, Python {platform.python_version()}, {platform.machine()})\n")


def test_run_makes_the_state_directory_it_is_given(tmp_path) -> None:
    """Where it keeps the config it runs with for safe-state: made, as systemd makes StateDirectory=."""
    state = tmp_path / "state" / "pi-controller"
    result = subprocess.run(pi_controller("run", "--config", CONFIG, "--simulate", "--ticks", "2", "--state-dir",
                                          str(state)), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "known_good_config_not_kept" not in result.stderr
    assert (state / "last-good-config.yaml").read_text() == EXAMPLE_CONFIG.read_text()


def test_a_state_dir_that_is_a_file_is_refused_in_one_line_before_any_pin_moves(tmp_path) -> None:
    """It only warned (known_good_config_not_kept) and the daemon ran on without its last-good config, the
    operator's values or the fleet's words kept."""
    (tmp_path / "state").write_text("")
    result = subprocess.run(pi_controller("run", "--simulate", "--ticks", "2", "--config", CONFIG, "--state-dir",
                                          str(tmp_path / "state")), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "actuators_startup" not in result.stderr
    assert result.stderr.splitlines() == [f"error: state directory {tmp_path / 'state'}: is not a folder: the "
                                          "daemon keeps its state there; remove it, or give another --state-dir"]


def test_a_state_dir_that_run_could_not_make_is_refused_by_run_and_a_warning_of_check_config(tmp_path) -> None:
    """A folder missing under a file further up cannot be made: `run` refuses to start (exit 2, one line);
    check-config, the unit's ExecReload= check, says so as a warning and passes the config, as the running daemon's
    reload applies it (it only warns that it cannot keep a copy): refusing would hold back every reload on systemd
    252 (Bookworm), which runs ExecReload= before the SIGHUP."""
    (tmp_path / "file").write_text("")
    state = tmp_path / "file" / "under" / "state"
    run = subprocess.run(pi_controller("run", "--simulate", "--ticks", "2", "--config", CONFIG, "--state-dir",
                                       str(state)), capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.startswith(f"error: state directory {state}: cannot be made: "), \
        run.stderr
    check = subprocess.run(pi_controller("check-config", "--config", CONFIG, "--state-dir", str(state)),
                           capture_output=True, text=True, timeout=60)
    warnings = [line for line in check.stderr.splitlines() if line.startswith("warning: state directory")]
    assert check.returncode == 0 and len(warnings) == 1, check.stderr
    assert warnings[0].startswith(f"warning: state directory {state}: cannot be made: ") and "`run` refuses" in \
        warnings[0], warnings


def test_safe_state_with_a_state_dir_that_is_a_file_says_so_and_makes_the_pins_safe(tmp_path) -> None:
    """As ExecStopPost= nothing may keep it from the pins: a warning, not a refusal (it said nothing)."""
    (tmp_path / "state").write_text("")
    result = subprocess.run(pi_controller("safe-state", "--config", CONFIG, "--simulate", "--state-dir",
                                          str(tmp_path / "state"), "--log-format", "json"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert events[0]["event"] == "state_dir_unusable" and events[0]["problem"].startswith("is not a folder")
    assert len([e for e in events if e["event"] == "safe_state_set"]) == 3


def test_run_replaces_a_fifo_where_it_keeps_the_config(tmp_path) -> None:
    """Read only as a regular file: the open of a FIFO there waited for a writer for good, before the first tick."""
    os.mkfifo(tmp_path / "last-good-config.yaml")
    result = subprocess.run(pi_controller("run", "--config", CONFIG, "--simulate", "--ticks", "2", "--state-dir",
                                          str(tmp_path)), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "last-good-config.yaml").read_text() == EXAMPLE_CONFIG.read_text()


@pytest.mark.skipif(ON_A_PI, reason="on a Pi the GPIO opens")
def test_safe_state_without_gpio_exits_3_as_every_command_does() -> None:
    result = subprocess.run(pi_controller("safe-state", "--config", CONFIG, "--log-format", "json"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_HARDWARE
    assert json.loads(result.stderr.splitlines()[-1])["event"] == "safe_state_failed"


def test_safe_state_names_the_pins_it_set() -> None:
    """What the owner checks with a meter after a crash: the pin, not only the device's name."""
    result = subprocess.run(pi_controller("safe-state", "--config", CONFIG, "--simulate", "--log-format", "json"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert {e["device"]: e["pins"] for e in events if e["event"] == "safe_state_set"} == {
        "led_strip": {"pin": 18}, "servo_motor": {"pin": 13}, "relay_switch": {"pin": 27}}
