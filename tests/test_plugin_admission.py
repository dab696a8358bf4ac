"""Who gets a plugin slot: the priority ceiling, and the time budget held by healthy plugins first."""

from __future__ import annotations

import shutil

import pytest

from pi_controller.config import PluginCeilings, PluginDefaults, PluginSettings, QuarantineSettings
from pi_controller.plugins.sandbox import PluginCallError
from tests.conftest import plugin_wasm


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
