"""The log stays bounded whatever floods it: per plugin, for the whole process, in each field, by kind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog
from structlog.testing import capture_logs

from pi_controller import logs
from pi_controller.contract import Reading
from pi_controller.logs import LineBudget, ProcessBudget, bound_fields
from tests.conftest import example_data
from tests.wasm_modules import nul_error_module, nul_log_module


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_flood_costs_the_budget_notices_included_and_notices_come_at_most_every_ten_seconds() -> None:
    clock = Clock()
    budget = LineBudget(structlog.get_logger("test"), "suppressed", rate=5, burst=20, clock=clock, plugin="p")
    admitted = 0
    with capture_logs() as events:
        for step in range(600):  # 100 lines a second for 60 s
            clock.now = step / 10
            admitted += sum(budget.admit(tick=step) for _ in range(10))
    notices = [e for e in events if e["event"] == "suppressed"]
    assert admitted + len(notices) <= 20 + 5 * 60
    assert 1 <= len(notices) <= 60 // 10 + 1 and all(e["plugin"] == "p" for e in notices)
    assert sum(e["lines"] for e in notices) + admitted + budget.dropped == 6000


def test_the_whole_process_has_one_budget_and_says_what_it_dropped() -> None:
    clock = Clock()
    out: list[str] = []
    logger = structlog.wrap_logger(structlog.ReturnLogger(), processors=[
        ProcessBudget(rate=10, burst=50, clock=clock), bound_fields, structlog.processors.JSONRenderer()])
    with capture_logs() as notices:
        for step in range(100):  # ten seconds at 100 events a second, from everywhere at once
            clock.now = step / 10
            for source in range(10):
                line = logger.warning("flood" if source else "other", tick=step)  # None: dropped
                if line is not None:
                    out.append(line)
    assert len(out) + len(notices) <= 50 + 10 * 10
    (notice,) = [n for n in notices if n["event"] == "log_lines_dropped"]
    assert set(notice["dropped"]) == {"flood", "other"} and notice["dropped"]["flood"] > notice["dropped"]["other"]


def test_no_field_is_longer_than_a_few_hundred_characters_nor_breaks_the_line() -> None:
    event = bound_fields(None, "warning", {"event": "x", "value": "A" * 1_048_576, "line": "a\nb\x00c",
                                           "many": list(range(100_000)), "n": 3, "none": None})
    assert all(len(str(v)) <= logs.MAX_FIELD_CHARS + 30 for v in event.values())
    assert event["line"] == "a\\nb\\x00c" and event["n"] == 3 and event["none"] is None
    assert event["value"].endswith("...(1048276 more)")


def test_an_invalid_reading_whose_text_holds_a_number_is_one_problem(run_daemon) -> None:
    loop = run_daemon(example_data(), 0).loop  # built, not started: the ticks are ours
    with capture_logs() as events:
        for tick in range(30):  # a dead 1-wire bus: the same problem, a new number every tick
            loop.readings = [Reading("temperature_sensor", None, "celsius", tick / 10,
                                     f"no reading for {2.3 + tick / 10:.1f} s: the 1-wire bus does not answer")]
            loop._report_sensors(tick)
        loop.readings = [Reading("temperature_sensor", None, "celsius", 3.0, "CRC check failed")]
        loop._report_sensors(30)
    invalid = [e for e in events if e["event"] == "sensor_invalid"]
    assert [e["error"] for e in invalid] == ["no reading for 2.3 s: the 1-wire bus does not answer",
                                             "CRC check failed"]


def test_an_unknown_device_in_plugin_output_is_logged_without_a_null_device(run_daemon, plugin_dir) -> None:
    data = example_data()
    data["plugins"]["settings"] = {"echo_output": {"config": {"output": json.dumps(
        [{"device_id": "no_such_device", "action": "set_high"}])}}}
    with capture_logs() as events:
        run_daemon(data, 3, plugins=plugin_dir("echo_output"))
    (rejected,) = [e for e in events if e["event"] == "command_rejected"]
    assert rejected["rule"] == "unknown_device" and "device" not in rejected
    assert "no_such_device" in rejected["reason"]


CALLS = """
import sys
from datetime import datetime
from pathlib import Path
from pi_controller import config, logs
from pi_controller.plugins.tools import load_plugin

logs.configure("json")
logs.capture_native_stderr()
logs.write_off_thread()
plugin = load_plugin(Path(sys.argv[1]), config.load(Path(sys.argv[2])))
failed = 0
for tick in range(int(sys.argv[3])):
    try:
        plugin.call(b'{"sensor_readings": [], "device_states": {}, "timestamp": 0}', tick)
    except Exception:
        failed += 1
print(failed)
logs.flush()
"""


def native_lines_of(module: bytes, name: str, calls: int, tmp_path: Path) -> tuple[list[dict[str, Any]], float]:
    """The native_stderr events of `calls` calls of `module` (as plugin `name`) in a process that captures
    fd 2 as the daemon does, and the seconds its log spans; every stderr line must be a JSON event."""
    wasm = tmp_path / f"{name}.wasm"
    wasm.write_bytes(module)
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(example_data()))
    done = subprocess.run([sys.executable, "-c", CALLS, str(wasm), str(config), str(calls)], capture_output=True,
                          text=True, check=False, timeout=120, env={**os.environ, "RUST_BACKTRACE": "0"},
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0 and done.stdout.strip().isdigit(), done.stderr[-2000:]
    events = [json.loads(line) for line in done.stderr.splitlines()]  # every line is one JSON event
    seconds = (datetime.fromisoformat(events[-1]["timestamp"]) - datetime.fromisoformat(events[0]["timestamp"]))
    return [e for e in events if e["event"] == "native_stderr"], seconds.total_seconds()


def test_libextism_raw_lines_go_through_the_plugins_budget_named_after_it(tmp_path: Path) -> None:
    """A guest error holding a NUL makes libextism print raw [tracing-subscriber] lines on fd 2: 120 calls,
    240 raw lines, logged as the plugin's events within its share of the log (a burst of 20, 5 a second)."""
    native, seconds = native_lines_of(nul_error_module(), "nul_error", 120, tmp_path)
    assert native and all(e["plugin"] == "nul_error" and "tracing-subscriber" in e["text"] for e in native)
    assert len(native) <= 20 + 5 * seconds + 1 < 240


def test_a_call_writing_more_raw_lines_than_the_pipe_holds_neither_blocks_nor_floods(tmp_path: Path) -> None:
    """2,000 NUL log lines a call: some 240 KB of raw lines, past the 64 KiB a pipe holds while the call runs."""
    native, seconds = native_lines_of(nul_log_module(2000), "nul_log", 5, tmp_path)
    assert native and all(e["plugin"] == "nul_log" and "tracing-subscriber" in e["text"] for e in native)
    assert len(native) <= 20 + 5 * seconds + 1


def test_libextism_raw_lines_in_the_daemon_are_its_events(tmp_path: Path) -> None:
    """The tick's calls share one bracket on fd 2: what a failed call and a plugin logging there wrote is
    still each one's own."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "nul_error.wasm").write_bytes(nul_error_module())
    (folder / "nul_log.wasm").write_bytes(nul_log_module(3))
    data = example_data()
    data["plugins"] = {"directory": str(folder), "watch": False}
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(data))
    done = subprocess.run([str(Path(sys.executable).parent / "pi-controller"), "run", "--config", str(config),
                           "--simulate", "--ticks", "5", "--log-format", "json"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "RUST_BACKTRACE": "0"})
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(line) for line in done.stderr.splitlines()]  # every line is one JSON event
    assert any(e["event"] == "plugin_call_failed" and e["plugin"] == "nul_error" for e in events)
    native = [e for e in events if e["event"] == "native_stderr"]
    assert all("tracing-subscriber" in e["text"] for e in native)
    assert {e.get("plugin") for e in native} == {"nul_error", "nul_log"}  # none left to the process


BATCH = """
import os, sys
from pi_controller import logs

logs.configure("json")
logs.capture_native_stderr()
with logs.held_native_stderr():
    os.write(2, b"taken\\n")
    print(logs.native_stderr.take())
    os.write(2, b"left\\n")
print(logs.native_stderr.take())
"""


def test_a_batch_of_calls_holds_fd_2_for_the_call_that_takes_it_and_logs_the_rest_as_the_process_s() -> None:
    done = subprocess.run([sys.executable, "-c", BATCH], capture_output=True, text=True, check=True, timeout=60,
                          cwd=Path(__file__).parent.parent)
    assert done.stdout.splitlines() == ["['taken']", "[]"]
    events = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(e["event"], e["text"], "plugin" in e) for e in events] == [("native_stderr", "left", False)]
