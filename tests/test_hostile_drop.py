"""The issue's acceptance: hostile files dropped into the plugins folder of a daemon running in real
time at 10 Hz (a subprocess, as systemd runs it). Each is refused with its reason, the daemon keeps
ticking without missing one, and its peak RSS stays under 200 MiB."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ALIAS_BOMB, assert_no_missed_ticks, example_data, plugin_wasm
from tests.wasm_modules import module

WAIT_S = 60.0  # generous, for a loaded machine: the test waits on events, never on a duration

# name -> (what the file holds, a word of the reason it is refused with)
FILES: dict[str, tuple[bytes | str, str]] = {
    "nul": (b"\0", "not a WebAssembly binary"),
    "nul_as": (b"\0as", "not a WebAssembly binary"),
    "x_nul": (b"x\0", "not a WebAssembly binary"),
    "wat": (b'(module (func (export "control_logic") (result i32) (i32.const 0)))', "text format"),
    "nul_import": (module(imports=((b"env", b"x\0y"),)), "makes libextism crash"),
}
PEAK_RSS_KIB = 200 * 1024


class Daemon:
    """`pi-controller run` on simulated pins, its JSON events collected as they come."""

    def __init__(self, config: Path):
        self.process = subprocess.Popen([sys.executable, "-m", "pi_controller", "run", "--config", str(config),
                                         "--simulate", "--log-format", "json"], stderr=subprocess.PIPE, text=True)
        self.events: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.events.append(json.loads(line))  # every line one JSON event, libextism's included

    def wait_for(self, what: str, test: Any) -> None:
        deadline = time.monotonic() + WAIT_S
        while not test():
            assert self.process.poll() is None, f"the daemon ended ({self.process.returncode}) before: {what}"
            events = [e["event"] for e in self.events][-30:]
            assert time.monotonic() < deadline, f"not within {WAIT_S} s: {what}; {events}; {self.failed()}"
            time.sleep(0.05)

    def failed(self) -> dict[str, str]:
        return {e["plugin"]: e["reason"] for e in list(self.events) if e["event"] == "plugin_load_failed"}

    def peak_rss_kib(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))

    def stop(self) -> dict[str, Any]:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=WAIT_S)
        self._reader.join(timeout=WAIT_S)
        return next(e for e in self.events if e["event"] == "loop_stopped")


def drop(folder: Path, staging: Path, name: str, content: bytes | str) -> None:
    """Install a file the atomic way: written beside the folder, then renamed into it."""
    path = staging / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    os.rename(path, folder / name)


def test_hostile_files_dropped_into_a_running_daemon_are_refused_and_it_keeps_ticking(tmp_path: Path) -> None:
    folder, staging = tmp_path / "plugins", tmp_path / "staging"
    folder.mkdir()
    staging.mkdir()
    shutil.copy(plugin_wasm("temperature_control"), folder)
    data = example_data()
    data["plugins"]["directory"] = str(folder)
    data["plugins"]["settings"] = {"temperature_control": data["plugins"]["settings"]["temperature_control"]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    daemon = Daemon(tmp_path / "config.yaml")
    try:
        daemon.wait_for("watching the folder", lambda: any(e["event"] == "plugins_watching" for e in daemon.events))
        for name, (content, _) in FILES.items():
            drop(folder, staging, f"{name}.wasm", content)
        (folder / "passwd.wasm").symlink_to("/etc/passwd")
        with (staging / "oversize.wasm").open("wb") as f:
            f.truncate(100 * 1024 * 1024)  # sparse: what counts is the size the gate sees
        os.rename(staging / "oversize.wasm", folder / "oversize.wasm")
        for name, manifest in (("bomb", ALIAS_BOMB), ("greedy", "priority: 1000000\n")):
            drop(folder, staging, f"{name}.yaml", manifest)
            drop(folder, staging, f"{name}.wasm", plugin_wasm("echo_output").read_bytes())
        expected = {**{n: word for n, (_, word) in FILES.items()}, "passwd": "symbolic link to outside",
                    "oversize": "over plugins.ceilings.max_file_bytes", "bomb": "anchors and aliases",
                    "greedy": "plugins.ceilings.max_priority 1000"}
        daemon.wait_for("every file refused", lambda: set(expected) <= set(daemon.failed()))
        peak = daemon.peak_rss_kib()
    finally:
        if daemon.process.poll() is None:
            stopped = daemon.stop()
    reasons = daemon.failed()
    for name, word in expected.items():
        assert word in reasons[name], (name, reasons[name])
        assert "root:" not in reasons[name] and "\n" not in reasons[name]
    assert stopped["ticks"] > 0
    assert_no_missed_ticks(stopped["missed"])
    assert daemon.process.returncode == 0
    assert peak < PEAK_RSS_KIB, f"peak RSS {peak} KiB"
    assert not any(e["event"] == "native_stderr" and "panicked" in e["text"] for e in daemon.events)
