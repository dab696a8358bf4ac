"""Who gets a plugin slot: the priority ceiling, and the time budget, by rank: the plugins named in the config
first, then by priority; a quarantined plugin holds no budget."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from pi_controller import config
from pi_controller.clock import SystemClock, VirtualClock
from pi_controller.config import PluginCeilings, PluginDefaults, PluginSettings, PluginsSettings, QuarantineSettings
from pi_controller.plugins.plugin_set import PluginSet
from pi_controller.plugins.sandbox import PluginCallError
from tests.conftest import example_data, more_ticks, plugin_wasm, run_with, unsimulated, until


@pytest.mark.parametrize("manifest, settings, ceilings, state, reason", [
    ({"priority": 1_000_000}, {}, PluginCeilings(), "failed",
     "priority 1000000 is above the operator's ceiling plugins.ceilings.max_priority 1000"),
    ({"priority": 1000}, {}, PluginCeilings(), "loaded", None),
    ({"priority": 1_000_000}, {"priority": 5}, PluginCeilings(), "loaded", None),  # the operator's word wins
    ({}, {"priority": 5000}, PluginCeilings(max_priority=10_000), "loaded", None),
    ({}, {"priority": 5000}, PluginCeilings(), "failed", "plugins.ceilings.max_priority 1000"),
])
def test_a_priority_above_the_ceiling_is_refused(plugin_set, manifest, settings, ceilings, state, reason) -> None:
    plugins = plugin_set("echo_output", manifests={"echo_output": manifest}, ceilings=ceilings,
                         settings={"echo_output": PluginSettings(**settings)})
    status = plugins.status["echo_output"]
    assert status.state == state and (reason is None or reason in status.reason)


def test_a_quarantined_plugin_gives_its_share_of_the_budget_to_a_healthy_one(plugin_set, tmp_path) -> None:
    # 30 ms each in a 60 ms budget: two fit. The trap is quarantined at its first failure.
    plugins = plugin_set("trap", "echo_input", defaults=PluginDefaults(timeout_ms=30),
                         quarantine=QuarantineSettings(failures=1))
    plugins.budget_ms = 60
    folder = tmp_path / "plugins"
    shutil.copy(plugin_wasm("echo_output"), folder / "echo_output.wasm")
    (folder / "echo_output.yaml").write_text("priority: -1\n")  # it ranks below both
    plugins.apply(plugins.prepare({"echo_output"}))  # both loaded plugins are healthy: no room
    assert plugins.status["echo_output"].state == "failed"
    assert "does not fit the tick" in plugins.status["echo_output"].reason

    trap = next(p for p in plugins if p.name == "trap")
    with pytest.raises(PluginCallError) as caught:
        trap.call(b'{"sensor_readings":[]', 1)
    trap.quarantine.record(now=0.0, tick=1, faults=1, reason=str(caught.value))
    assert plugins.status["trap"].state == "quarantined"
    plugins.apply(plugins.prepare({"echo_output"}))
    assert {name: s.state for name, s in plugins.status.items()} == {
        "echo_input": "loaded", "echo_output": "loaded", "trap": "failed"}
    assert "unloaded while quarantined" in plugins.status["trap"].reason


def hogs(folder: Path, count: int, timeout_ms: int = 50) -> list[str]:
    """`count` copies of a plugin that traps on every call, dropped into `folder` with a manifest that asks
    for priority 999 and `timeout_ms` (within the default ceilings)."""
    names = [f"hog{n}" for n in range(1, count + 1)]
    for name in names:
        shutil.copy(plugin_wasm("trap"), folder / f"{name}.wasm")
        (folder / f"{name}.yaml").write_text(f"priority: 999\nlimits: {{timeout_ms: {timeout_ms}}}\n")
    return names


def state(daemon: Any, name: str) -> str | None:
    status = daemon.plugins.status.get(name)
    return status.state if status else None


BUNDLED = ("energy_saver", "motion_light", "temperature_control")
HELD = ("30 of the 60 ms plugin budget is held by energy_saver (10 ms, named in the config), motion_light (10 ms, "
        "named in the config), temperature_control (10 ms, named in the config)")


def test_plugins_dropped_in_never_keep_the_configured_ones_out_at_start(run_daemon, plugin_dir) -> None:
    folder = plugin_dir(*BUNDLED)
    names = hogs(folder, 6)
    daemon = run_daemon(example_data(), 0, plugins=folder)
    heater = daemon.hardware.factory.pin(27)
    asyncio.run(daemon.serve(20))
    status = daemon.plugins.status
    assert {name: status[name].state for name in BUNDLED} == dict.fromkeys(BUNDLED, "loaded")
    for name in names:  # each refusal names who holds the budget
        assert status[name].state == "failed"
        assert status[name].reason == f"timeout_ms 50 does not fit the tick: {HELD}"
    assert [float(s.state) for s in heater.states] == [0.0, 1.0, 0.0]  # the room is at 19 C: it heats, until the end


def test_plugins_dropped_in_never_keep_the_configured_ones_out_on_a_reload(run_daemon, plugin_dir) -> None:
    folder = plugin_dir(*BUNDLED)
    names = hogs(folder, 6)
    daemon = run_daemon(unsimulated(example_data()), 0, plugins=folder, clock=SystemClock())
    outcomes = []

    async def scenario() -> None:
        outcomes.append((await daemon.reload()).outcome)
        await more_ticks(daemon, 3)

    run_with(daemon, scenario)
    assert outcomes == ["applied"]
    assert [p.name for p in daemon.plugins] == ["energy_saver", "motion_light", "temperature_control"]
    assert all(daemon.plugins.status[name].reason == f"timeout_ms 50 does not fit the tick: {HELD}" for name in names)


def test_a_configured_plugin_arriving_later_displaces_one_dropped_in(run_daemon, plugin_dir) -> None:
    data = unsimulated(example_data())
    data["loop"]["plugin_budget"] = 0.5  # 50 ms: a hog's share fills it
    folder = plugin_dir()
    hogs(folder, 1)
    daemon = run_daemon(data, 0, plugins=folder, clock=SystemClock())

    async def scenario() -> None:
        assert [p.name for p in daemon.plugins] == ["hog1"]
        shutil.copy(plugin_wasm("temperature_control"), folder / ".temperature_control.wasm")
        os.replace(folder / ".temperature_control.wasm", folder / "temperature_control.wasm")
        await until(lambda: state(daemon, "temperature_control") == "loaded", "it is loaded")

    with capture_logs() as logs:
        run_with(daemon, scenario)
    assert daemon.plugins.status["hog1"].state == "failed"
    (unloaded,) = [e for e in logs if e["event"] == "plugin_unloaded"]
    assert unloaded["plugin"] == "hog1" and unloaded["reason"].endswith(
        "its share of the tick went to temperature_control (10 ms, named in the config)")


def test_a_quarantined_plugin_holds_no_budget_a_waiting_one_gets_it(run_daemon, plugin_dir) -> None:
    data = unsimulated(example_data())
    data["plugins"]["settings"] = {}  # nothing named in the config: the folder's plugins rank by priority
    data["plugins"]["quarantine"] = {"failures": 3, "backoff_s": 600}
    folder = plugin_dir("echo_output")
    (folder / "echo_output.yaml").write_text("limits: {timeout_ms: 30}\n")
    hogs(folder, 1)  # ranks first (priority 999): the echo plugin does not fit beside it, and waits
    daemon = run_daemon(data, 0, plugins=folder, clock=SystemClock())
    assert daemon.plugins.status["echo_output"].state == "failed"

    async def scenario() -> None:
        await until(lambda: state(daemon, "echo_output") == "loaded", "the waiting plugin loads")

    run_with(daemon, scenario)
    hog = daemon.plugins.status["hog1"]
    assert hog.state == "failed" and hog.reason.startswith("unloaded while quarantined (trap: ")
    assert hog.reason.endswith("its share of the tick went to echo_output (30 ms)")


def test_a_plugin_in_plugins_required_ranks_as_one_named_in_the_config(tmp_path) -> None:
    folder = tmp_path / "plugins"
    folder.mkdir()
    for name in ("echo_output", "echo_input"):
        shutil.copy(plugin_wasm(name), folder / f"{name}.wasm")
    (folder / "echo_input.yaml").write_text("priority: 5\n")  # it outranks echo_output by priority alone
    settings = PluginsSettings(defaults=PluginDefaults(timeout_ms=40), required=("echo_output",))
    plugins = PluginSet(settings, folder, budget_ms=60, clock=VirtualClock())
    try:
        plugins.load_all()
        assert [p.name for p in plugins] == ["echo_output"]
        assert plugins.status["echo_input"].reason == ("timeout_ms 40 does not fit the tick: 40 of the 60 ms plugin "
                                                       "budget is held by echo_output (40 ms, named in the config)")
    finally:
        plugins.close()


@pytest.mark.parametrize("required, problem", [
    (["safety"], "plugins.required[0]: 'safety' is not a plugin name"),
    (["a", "b", "c", "d"], "the configured plugins' timeouts add up to 70.0 ms"),
])
def test_plugins_required_is_checked_with_the_config(write_config, required: list[str], problem: str) -> None:
    data = example_data()
    data["plugins"]["required"] = required
    with pytest.raises(config.ConfigError) as caught:
        config.load(write_config(data))
    assert problem in str(caught.value)


def test_a_plugin_given_a_smaller_share_makes_room_for_one_waiting(run_daemon, plugin_dir) -> None:
    """Found by the state machine's long run: a plugin waiting for room stayed out when the one holding the
    budget was replaced by a version asking less (only a plugin unloaded or quarantined made room)."""
    data = unsimulated(example_data())
    data["plugins"]["settings"] = {}  # nothing named in the config: the folder's plugins rank by priority
    data["loop"]["plugin_budget"] = 0.5  # 50 ms
    folder = plugin_dir()
    manifests = {"big": "priority: 999\nlimits: {timeout_ms: 50}\n", "small": "limits: {timeout_ms: 30}\n"}
    for name, manifest in manifests.items():
        shutil.copy(plugin_wasm("echo_output"), folder / f"{name}.wasm")
        (folder / f"{name}.yaml").write_text(manifest)
    daemon = run_daemon(data, 0, plugins=folder, clock=SystemClock())
    assert (state(daemon, "big"), state(daemon, "small")) == ("loaded", "failed")

    async def scenario() -> None:
        (folder / ".big.yaml").write_text("priority: 999\nlimits: {timeout_ms: 20}\n")
        os.replace(folder / ".big.yaml", folder / "big.yaml")
        await until(lambda: state(daemon, "small") == "loaded", "the waiting plugin loads")

    run_with(daemon, scenario)
    assert state(daemon, "big") == "loaded"
