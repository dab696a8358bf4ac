"""One check for one promise: check-config (the unit's reload check), the daemon's start and its reload refuse
a config under which a plugin it names would not load, with file, line and key; the running version stays."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from pi_controller import config
from pi_controller.clock import SystemClock, VirtualClock
from pi_controller.daemon import Daemon
from pi_controller.plugins import checks
from tests.conftest import BUNDLED_PLUGINS, example_data, more_ticks, plugin_wasm, run_with, unsimulated
from tests.test_service import receive, reload_messages, service_config, start

SETTINGS = ("plugins", "settings", "temperature_control", "config")
BAD_VALUES = [  # what the row of issue 25 tried: a typo of a key, and a value past the schema's maximum
    ({"setpoint": 21.0, "hysterisis": 0.5}, "hysterisis",
     "'hysterisis' is not in this plugin's config_schema (heater, hysteresis, sensor, setpoint); "
     "did you mean 'hysteresis'?"),
    ({"setpoint": 210, "hysteresis": 0.5}, "setpoint", "config 'setpoint': 210 is above the maximum 30"),
]


def line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pi_controller", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("values, key, problem", BAD_VALUES)
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_a_config_value_a_plugin_s_schema_refuses_is_a_config_error_before_any_pin_moves(
        write_config, values: dict[str, Any], key: str, problem: str, command: str) -> None:
    data = example_data()
    data["plugins"]["settings"]["temperature_control"]["config"] = values
    path = write_config(data)
    result = cli(*([command, str(path)] if command == "check-config" else [command, "--config", str(path),
                                                                            "--simulate"]))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"config error: {path}:{line_of(path, key)}: {config.format_path(SETTINGS + (key,))}: plugin "
        f"'temperature_control' would not load: {problem}"]
    assert result.stdout == ""  # run: not a pin claimed, no event logged


def test_check_config_names_what_of_the_folder_would_not_load_that_is_not_the_config_s_doing(write_config,
                                                                                             plugin_dir) -> None:
    folder = plugin_dir("temperature_control", "motion_light", "energy_saver", "echo_output")
    (folder / "echo_output.yaml").write_text("limits: {timeout_ms: 45}\n")  # 30 ms taken by the named ones
    data = example_data()
    data["plugins"]["directory"] = str(folder)
    data["plugins"]["required"] = ["frost_guard"]  # not in the folder
    result = cli("check-config", str(write_config(data)))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"warning: plugin 'echo_output' ({folder / 'echo_output.wasm'}) would not load: timeout_ms 45 does not fit "
        "the tick: 30 of the 60 ms plugin budget is held by energy_saver (10 ms, named in the config), motion_light "
        "(10 ms, named in the config), temperature_control (10 ms, named in the config)",
        f"warning: plugin 'frost_guard' is named in the config but has no module in {folder}"]


def test_plugins_named_in_the_config_must_fit_the_budget_with_their_manifests(write_config, plugin_dir) -> None:
    folder = plugin_dir("temperature_control", "motion_light", "energy_saver")
    (folder / "motion_light.yaml").write_text("limits: {timeout_ms: 45}\n")  # the config alone would fit
    data = example_data()
    data["plugins"]["directory"] = str(folder)
    with pytest.raises(config.ConfigError) as caught:
        checks.check(config.load(write_config(data)), folder)
    assert caught.value.path == ("plugins", "settings", "temperature_control")
    assert caught.value.message.startswith("plugin 'temperature_control' would not load: timeout_ms 10 does not fit")


def test_the_unit_s_reload_check_fails_and_a_sighup_keeps_the_running_thermostat(tmp_path, notify_socket) -> None:
    """The row as a Pi owner meets it: the unit's `ExecReload=` runs check-config, then SIGHUP."""
    path = service_config(tmp_path)
    good = path.read_text()
    process = start(path, notify_socket)
    try:
        receive(notify_socket, "READY=1")
        path.write_text(good.replace("setpoint: 21.0", "setpoint: 210"))
        check = cli("check-config", str(path))  # ExecReload's first line: `systemctl reload` fails here
        assert check.returncode == 2 and "is above the maximum 30" in check.stderr
        process.send_signal(signal.SIGHUP)  # as if sent by hand regardless
        _, ready = reload_messages(notify_socket)
        assert ready.startswith(f"READY=1\nSTATUS=reload refused, running config kept: {path}:")
        assert "plugins.settings.temperature_control.config.setpoint" in ready
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        _, stderr = process.communicate()
    events = [json.loads(line) for line in stderr.splitlines()]
    names = [e["event"] for e in events]
    assert names.count("reload_refused") == 1
    assert not {"plugin_load_failed", "config_reloaded", "actuator_failsafe", "plugin_unloaded"} & set(names)


def test_a_reload_that_would_lose_a_running_plugin_for_a_reason_only_its_load_finds_is_refused(run_daemon,
                                                                                              plugin_dir) -> None:
    # A pinned sha256 the file does not have: nothing but reading the module finds it.
    folder = plugin_dir("temperature_control")
    data = unsimulated(example_data())
    daemon = run_daemon(data, 0, plugins=folder, clock=SystemClock())
    results = []

    async def scenario() -> None:
        data["plugins"]["settings"]["temperature_control"]["sha256"] = "0" * 64
        daemon.settings.source.write_text(yaml.safe_dump(data))
        results.append(await daemon.reload())
        await more_ticks(daemon, 3)

    with capture_logs() as logs:
        run_with(daemon, scenario)
    (result,) = results
    assert result.outcome == "refused"
    assert result.message.startswith("reload refused, running config kept: plugin 'temperature_control' would not "
                                     "load under it: sha256 ")
    assert daemon.plugins.status["temperature_control"].state == "loaded"
    assert daemon.settings.plugins.settings["temperature_control"].sha256 is None  # the running config
    assert not [e for e in logs if e["event"] in ("config_reloaded", "plugin_unloaded", "actuator_failsafe")]
    assert daemon.loop.plugin_stats["temperature_control"].calls == daemon.loop.ticks.count


def test_a_reload_that_would_lose_a_version_kept_over_a_bad_replacement_is_refused(run_daemon, plugin_dir) -> None:
    # The running thermostat's file replaced by one that is no module: the running version stays (hot reload
    # refuses the replacement), and a reload must not drop it either. Found by the state machine.
    folder = plugin_dir("temperature_control")
    data = unsimulated(example_data())
    daemon = run_daemon(data, 0, plugins=folder, clock=SystemClock())
    results = []

    async def scenario() -> None:
        (folder / "temperature_control.wasm").write_bytes(b"not a module")
        await daemon.loop.in_gap(lambda: daemon.plugins.apply(daemon.plugins.prepare({"temperature_control"})),
                                 lambda: None)  # as the watcher applies it
        results.append(await daemon.reload())
        await more_ticks(daemon, 3)

    run_with(daemon, scenario)
    (result,) = results
    assert result.outcome == "refused"
    # Refused by the one check (it reads the module's header since signatures), as check-config refuses it too.
    assert result.message.startswith("reload refused, running config kept: ")
    assert "plugin 'temperature_control' would not load" in result.message
    assert "temperature_control.wasm is not a WebAssembly binary module" in result.message
    assert daemon.plugins.status["temperature_control"].state == "loaded"
    assert daemon.loop.plugin_stats["temperature_control"].calls == daemon.loop.ticks.count
    path = daemon.settings.source
    check = cli("check-config", str(path), "--plugins", str(folder))
    assert check.returncode == 2
    assert check.stderr.splitlines() == [
        f"config error: {path}:{line_of(path, 'temperature_control:')}: plugins.settings.temperature_control: plugin "
        "'temperature_control' would not load: temperature_control.wasm is not a WebAssembly binary module (no "
        "\\0asm magic; the text format is not accepted: build the .wasm)"]


def test_a_reload_may_still_disable_a_plugin(run_daemon, plugin_dir) -> None:
    folder = plugin_dir("temperature_control")
    data = unsimulated(example_data())
    daemon = run_daemon(data, 0, plugins=folder, clock=SystemClock())
    results = []

    async def scenario() -> None:
        data["plugins"]["settings"]["temperature_control"]["enabled"] = False
        daemon.settings.source.write_text(yaml.safe_dump(data))
        results.append((await daemon.reload()).outcome)

    run_with(daemon, scenario)
    assert results == ["applied"] and daemon.plugins.status["temperature_control"].state == "disabled"


def test_a_reload_check_config_accepts_goes_ahead_though_a_dropped_in_plugin_no_longer_fits(run_daemon, plugin_dir,
                                                                                            write_config) -> None:
    # Found by the state machine (tests/daemon_machine.py): check-config accepted the config, saying that the
    # dropped-in plugin would not load under it, and the reload was then refused for that plugin.
    folder = plugin_dir("temperature_control", "echo_output")
    (folder / "echo_output.yaml").write_text("limits: {timeout_ms: 50}\n")  # 10 + 50 of the 60 ms
    data = unsimulated(example_data())
    daemon = run_daemon(data, 0, plugins=folder, clock=SystemClock())
    data["plugins"]["settings"]["temperature_control"]["timeout_ms"] = 20
    check = cli("check-config", str(write_config(data)), "--plugins", str(folder))
    assert check.returncode == 0 and "plugin 'echo_output'" in check.stdout + check.stderr
    results = []

    async def scenario() -> None:
        results.append(await daemon.reload())

    run_with(daemon, scenario)
    assert [r.outcome for r in results] == ["applied"]
    assert daemon.plugins.status["temperature_control"].state == "loaded"
    echo = daemon.plugins.status["echo_output"]
    assert echo.state == "failed" and "held by temperature_control (20 ms, named in the config)" in (echo.reason or "")


def test_plugin_call_with_a_config_refuses_what_the_daemon_would(write_config, tmp_path) -> None:
    data = example_data()
    data["plugins"]["settings"]["temperature_control"]["config"] = {"setpoint": 210}
    wasm = tmp_path / "temperature_control.wasm"
    shutil.copy(plugin_wasm("temperature_control"), wasm)
    shutil.copy(plugin_wasm("temperature_control").with_suffix(".yaml"), wasm.with_suffix(".yaml"))
    context = tmp_path / "ctx.json"
    context.write_text("{}")
    result = cli("plugin", "call", str(wasm), "--config", str(write_config(data)), "--context", str(context))
    assert result.returncode == 2
    assert "plugins.settings.temperature_control.config.setpoint: config 'setpoint': 210 is above the maximum 30" in \
        result.stderr


FULL = ("60 of the 60 ms plugin budget is held by energy_saver (10 ms, named in the config), motion_light (10 ms, "
        "named in the config), temperature_control (10 ms, named in the config), a1 (10 ms), a2 (10 ms), a3 (10 ms)")


@pytest.mark.parametrize("name, manifest, others, reason", [
    ("porch", "name: porch_light\n", (), "its manifest's name 'porch_light' is not its file's name 'porch': name the "
     "file porch_light.wasm (and its manifest porch_light.yaml), or fix the name"),
    ("porch", "actuators: [fan]\n", (), "its manifest grants it 'fan', which is not among the actuators of this "
     "config (led_strip, relay_switch, servo_motor): grant what exists with plugins.settings.porch.actuators"),
    ("porch", "sensors: [temperature_sensor, humidity]\n", (), "its manifest grants it 'humidity', which is not among "
     "the sensors of this config (light_sensor, motion_sensor, temperature_sensor): grant what exists with "
     "plugins.settings.porch.sensors"),
    ("zz_seventh", "", ("a1", "a2", "a3"), f"timeout_ms 10 does not fit the tick: {FULL}"),
])
def test_plugin_install_refuses_with_the_daemon_s_own_reason_what_the_daemon_refuses(
        write_config, plugin_dir, tmp_path, name: str, manifest: str, others: tuple[str, ...], reason: str) -> None:
    folder = plugin_dir("temperature_control", "motion_light", "energy_saver")
    for other in others:  # dropped in before: with the bundled three, six plugins fill the tick's budget
        shutil.copy(plugin_wasm("echo_output"), folder / f"{other}.wasm")
    data = example_data()
    data["plugins"]["directory"] = str(folder)
    path = write_config(data)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(plugin_wasm("echo_output"), work / f"{name}.wasm")
    (work / f"{name}.yaml").write_text(manifest)
    result = cli("plugin", "install", str(work / f"{name}.wasm"), "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {work / f'{name}.wasm'}: not installed: {reason}"]
    assert not (folder / f"{name}.wasm").exists()
    # The daemon, finding the same files in its folder, refuses the plugin with the same words.
    shutil.copy(work / f"{name}.wasm", folder)
    shutil.copy(work / f"{name}.yaml", folder)
    daemon = Daemon(config.load(path), simulate=True, clock=VirtualClock())
    try:
        assert (daemon.plugins.status[name].state, daemon.plugins.status[name].reason) == ("failed", reason)
    finally:
        daemon.close()


def install_porch(write_config: Any, folder: Path, tmp_path: Path) -> tuple[Path, Path, Any]:
    """`plugin install porch.wasm` (a copy of echo_output) beside `folder`'s plugins, under the example config:
    the config's path, the folder porch.wasm is installed from, and the command's result."""
    data = example_data()
    data["plugins"]["directory"] = str(folder)
    path = write_config(data)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(plugin_wasm("echo_output"), work / "porch.wasm")
    return path, work, cli("plugin", "install", str(work / "porch.wasm"), "--config", str(path))


def test_plugin_install_refuses_while_a_plugin_the_config_names_would_not_load(write_config, plugin_dir,
                                                                              tmp_path) -> None:
    """Found by the state machine's long run: the thermostat's manifest replaced by one naming another plugin
    (refused: the daemon kept its running version, which holds its share of the budget), then a plugin
    installed that fitted only without that share: installed, and refused by the daemon. No file shows
    that share; the daemon would not start with this folder: install says so, and installs the fix."""
    folder = plugin_dir("temperature_control", "motion_light", "energy_saver")
    (folder / "temperature_control.yaml").write_text("name: thermostat\n")
    path, work, result = install_porch(write_config, folder, tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: {work / 'porch.wasm'}: not installed: plugin 'temperature_control', named in the config, would not "
        "load (its manifest's name 'thermostat' is not its file's name 'temperature_control': name the file "
        "thermostat.wasm (and its manifest thermostat.yaml), or fix the name); fix it first: the daemon would not "
        "start with this folder"]
    assert not (folder / "porch.wasm").exists()
    for suffix in (".wasm", ".yaml"):
        shutil.copy(BUNDLED_PLUGINS / f"temperature_control{suffix}", work)
    assert cli("plugin", "install", str(work / "temperature_control.wasm"), "--config", str(path)).returncode == 0
    assert cli("plugin", "install", str(work / "porch.wasm"), "--config", str(path)).returncode == 0


def test_plugin_install_refuses_while_a_plugin_dropped_in_would_not_load(write_config, plugin_dir, tmp_path) -> None:
    """The same for a plugin the config does not name: a running daemon may still run an earlier version of it
    (one that loaded before this file replaced it), whose share of the tick no file shows. Removed, it blocks
    nothing."""
    folder = plugin_dir("temperature_control", "motion_light", "energy_saver", "echo_output")
    (folder / "echo_output.yaml").write_text("name: echo\n")
    path, work, result = install_porch(write_config, folder, tmp_path)
    assert result.returncode == 2 and not (folder / "porch.wasm").exists()
    assert result.stderr.splitlines() == [
        f"error: {work / 'porch.wasm'}: not installed: plugin 'echo_output' of the folder would not load (its "
        "manifest's name 'echo' is not its file's name 'echo_output': name the file echo.wasm (and its manifest "
        "echo.yaml), or fix the name); fix or remove it first: a running daemon may still run an earlier version "
        "of it, whose share of the tick no file shows"]
    for suffix in (".wasm", ".yaml"):
        (folder / f"echo_output{suffix}").unlink()
    assert cli("plugin", "install", str(work / "porch.wasm"), "--config", str(path)).returncode == 0


def test_a_grant_in_the_config_of_a_device_that_does_not_exist_is_a_config_error(write_config) -> None:
    data = example_data()
    data["plugins"]["settings"]["temperature_control"]["actuators"] = ["relay_switch", "heater"]
    path = write_config(data)
    with pytest.raises(config.ConfigError) as caught:
        checks.check(config.load(path), BUNDLED_PLUGINS)
    error = caught.value
    assert (error.path, error.line) == (("plugins", "settings", "temperature_control", "actuators", 1),
                                        line_of(path, "- heater"))
    assert error.message == ("plugin 'temperature_control' would not load: 'heater' is not among the actuators of "
                             "this config (led_strip, relay_switch, servo_motor)")


def test_simulate_refuses_the_config_as_the_daemon_would(write_config) -> None:
    data = example_data()
    data["plugins"]["settings"]["temperature_control"]["config"] = {"setpoint": 210}
    result = cli("simulate", "--config", str(write_config(data)), "--duration", "1m")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1].endswith(
        "plugins.settings.temperature_control.config.setpoint: plugin 'temperature_control' would not load: "
        "config 'setpoint': 210 is above the maximum 30")
