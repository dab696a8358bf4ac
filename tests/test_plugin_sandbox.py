"""The sandbox with real hostile plugins: fuel, real error reasons, vars and Extism config, instance
rebuilds, manifests and the operator's ceilings, capabilities, sha256 pinning, quarantine."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from typing import Any

import extism
import pytest
from structlog.testing import capture_logs

from pi_controller import contract
from pi_controller.clock import VirtualClock
from pi_controller.config import PluginCeilings, PluginSettings, PluginsSettings, QuarantineSettings
from pi_controller.plugins import backstop
from pi_controller.plugins.backstop import Backstop
from pi_controller.plugins.host_functions import PluginHost
from pi_controller.plugins.plugin_set import PluginSet
from pi_controller.plugins.quarantine import Quarantine
from pi_controller.plugins.sandbox import PluginCallError, SandboxedPlugin
from tests.conftest import CONTEXT, HOSTILE, example_data, only, plugin_wasm, unsimulated


def failure(plugin: SandboxedPlugin, context: bytes = CONTEXT) -> PluginCallError:
    with pytest.raises(PluginCallError) as caught:
        plugin.call(context)
    return caught.value


# --- fuel -----------------------------------------------------------------------------------------

FUEL = 20_000_000  # fuel_burner costs 10 to 20 instructions per iteration
UNDER, OVER = 500_000, 3_000_000


def _verdicts(plugin_set: Any) -> dict[int, str]:
    result = {}
    for iterations in (UNDER, OVER):
        plugins = plugin_set("fuel_burner", settings={"fuel_burner": PluginSettings(
            fuel=FUEL, timeout_ms=50, config={"iterations": iterations})})
        try:
            only(plugins).call(CONTEXT)
            result[iterations] = "within budget"
        except PluginCallError as exc:
            result[iterations] = exc.kind
        plugins.close()
    return result


def test_the_fuel_verdict_is_the_same_on_an_idle_and_on_a_loaded_machine(plugin_set) -> None:
    idle = _verdicts(plugin_set)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * (os.cpu_count() or 1))]
    try:
        loaded = _verdicts(plugin_set)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    assert idle == loaded == {UNDER: "within budget", OVER: "out_of_fuel"}


def test_the_backstop_is_what_the_fuel_costs_here_times_the_margin_and_never_below_timeout_ms() -> None:
    cost = backstop.ns_per_fuel()
    assert 0 < cost < 1000  # nanoseconds per instruction: a real measurement, whatever the machine
    expected = math.ceil(2_000_000 * cost * backstop.MARGIN / 1e6 + backstop.HOST_ALLOWANCE_MS)
    assert Backstop().ms(2_000_000, 1) == expected
    assert Backstop().ms(2_000_000, 9_000) == 9_000
    assert Backstop(real=False).ms(2_000_000, 1) == backstop.VIRTUAL_BACKSTOP_MS


def held_up(monkeypatch: pytest.MonkeyPatch, clock: VirtualClock) -> None:
    """Every pi_log call takes longer than a call's virtual backstop: the machine's doing, not the plugin's."""
    log_line = PluginHost.log_line

    def slow(host: PluginHost, level: int, data: bytes) -> None:
        clock.advance(backstop.VIRTUAL_BACKSTOP_MS / 1000 + 1)
        log_line(host, level, data)

    monkeypatch.setattr(PluginHost, "log_line", slow)


def test_a_call_past_its_backstop_is_a_stall_that_says_it_reset_the_instance(tmp_path, monkeypatch) -> None:
    """Whatever the call does after its backstop (here it logs once more and returns), it has stalled. On
    the virtual clock, so no wall-clock timer races the fuel: libextism's own timer was seen, with the cores
    saturated, to let a spin run on for two minutes past a 2 ms timeout."""
    clock = VirtualClock()
    held_up(monkeypatch, clock)
    folder = tmp_path / "stall"
    folder.mkdir()
    (folder / "host_calls.wasm").write_bytes(plugin_wasm("host_calls").read_bytes())
    settings = PluginsSettings(settings={"host_calls": PluginSettings(config={"mode": "log", "count": 2})})
    plugins = PluginSet(settings, folder, budget_ms=1000, clock=clock)
    plugins.load_all()
    try:
        error = failure(only(plugins))
        assert (error.kind, error.reset, error.plugin_s_fault) == ("stalled", True, False)
        assert str(error).startswith(f"stalled: the call ran past its {backstop.VIRTUAL_BACKSTOP_MS} ms")
    finally:
        plugins.close()


def test_libextism_s_timeout_is_a_stall_not_the_plugin_s_error(plugin_set) -> None:
    """The real timer's verdict reads as the virtual one's (libextism says "timeout")."""
    grant = only(plugin_set("energy_saver")).grant
    error = PluginCallError.from_extism(extism.Error("timeout"), None, grant, 12)
    assert (error.kind, error.plugin_s_fault) == ("stalled", False)
    assert str(error).startswith("stalled: the call ran past its 12 ms wall-clock backstop")


def test_the_loop_counts_a_stall_apart_and_neither_blames_nor_quarantines_the_plugin(run_daemon, plugin_dir,
                                                                                   monkeypatch) -> None:
    """A host function held up past the call's backstop: the machine's doing, not the plugin's. On the
    virtual clock the hold-up is the clock moved on (no wall-clock timer races the plugin's fuel), so the
    verdict is the same on an idle and on a saturated machine."""
    clock = VirtualClock()
    held_up(monkeypatch, clock)
    data = unsimulated(example_data())
    data["plugins"]["settings"] = {"host_calls": {"config": {"mode": "log", "count": 2}}}
    data["plugins"]["quarantine"] = {"failures": 2}
    with capture_logs() as logs:
        daemon = run_daemon(data, 4, plugins=plugin_dir("host_calls"), clock=clock)
    stats = daemon.status.snapshot()["plugins"]["host_calls"]
    failed = [(e["kind"], e["reason"]) for e in logs if e["event"] == "plugin_call_failed"]
    assert (stats["state"], stats["calls"], stats["errors"], stats["stalls"], stats["resets"]) == (
        "loaded", 4, 0, 4, 4), failed
    stalls = [e for e in logs if e["event"] == "plugin_call_stalled"]
    assert len(stalls) == 1 and stalls[0]["state_reset"] is True
    assert stalls[0]["reason"].startswith(f"stalled: the call ran past its {backstop.VIRTUAL_BACKSTOP_MS} ms")
    assert not [e for e in logs if e["event"] in ("plugin_call_failed", "plugin_quarantined")]


def test_an_endless_loop_runs_out_of_fuel_long_before_its_timeout(plugin_set) -> None:
    plugin = only(plugin_set("endless_loop"))
    error = failure(plugin)
    assert error.kind == "out_of_fuel" and "2000000 instructions" in str(error)


# --- hostile plugins, each failing with its real reason --------------------------------------------

@pytest.mark.parametrize("name,kind,reason", [
    ("trap", "trap", "wasm `unreachable` instruction executed"),
    ("http_fetch", "trap", "HTTP request to https://example.com/ is not allowed"),
    ("memory_hog", "out_of_memory", "memory_pages 32"),
    ("error_return", "error_return", "sensor table corrupt"),
])
def test_a_failed_call_says_why_in_plain_words(plugin_set, name: str, kind: str, reason: str) -> None:
    error = failure(only(plugin_set(name)))
    assert error.kind == kind and reason in str(error) and "backtrace" not in str(error)


def test_vars_grow_until_max_var_bytes_stops_them(plugin_set) -> None:
    plugin = only(plugin_set("var_hog", settings={"var_hog": PluginSettings(max_var_bytes=4096)}))
    outcomes = []
    for _ in range(6):  # 1 KiB more each call
        try:
            outcomes.append(plugin.call(CONTEXT).decode())
        except PluginCallError as exc:
            outcomes.append(str(exc))
    assert outcomes[:2] == ["[]", "[]"] and outcomes[-1] == "Variable store is full"


def test_huge_output_is_refused(plugin_set) -> None:
    plugin = only(plugin_set("huge_output", settings={"huge_output": PluginSettings(fuel=100_000_000, timeout_ms=50)}))
    error = failure(plugin)
    assert error.kind == "output_too_large" and "1048576 bytes" in str(error)


def test_a_wasi_import_fails_to_load_when_wasi_is_off(plugin_set) -> None:
    plugins = plugin_set("wasi_import", "energy_saver")
    assert [p.name for p in plugins] == ["energy_saver"]
    status = plugins.status["wasi_import"]
    assert status.state == "failed" and "unknown import" in status.reason and "fd_write" in status.reason


def test_an_instance_that_trapped_is_rebuilt_so_a_leaked_stack_does_not_poison_later_calls(plugin_set) -> None:
    plugin = only(plugin_set("stack_leak"))
    for _ in range(3):  # each trap leaks a 20 KiB frame of a 32 KiB stack: two would overflow it
        assert failure(plugin, b"t").kind == "trap"
    assert plugin.call(CONTEXT) == b"[]"


def test_vars_persist_across_calls_and_config_is_readable_through_extism_config(plugin_set) -> None:
    plugin = only(plugin_set("counter", settings={"counter": PluginSettings(config={"light": "lamp"})}))
    duties = [json.loads(plugin.call(CONTEXT))[0] for _ in range(3)]
    assert [(c["device_id"], c["parameters"]["duty_cycle"]) for c in duties] == [("lamp", 1), ("lamp", 2), ("lamp", 3)]


def test_a_health_check_that_fails_refuses_the_plugin(plugin_set) -> None:
    status = plugin_set("unhealthy").status["unhealthy"]
    assert status.state == "failed" and status.reason == "health_check failed: calibration table missing"


# --- manifests, the operator's word, ceilings, pinning ----------------------------------------------

MANIFEST = {"name": "echo_output", "version": "1.2.0", "author": "someone", "priority": 5,
            "limits": {"memory_pages": 16, "fuel": 500_000}, "config": {"output": "[]", "mode": "eco"},
            "sensors": ["light_sensor"], "actuators": ["led_strip"]}


def test_the_manifest_is_read_and_the_operator_wins_over_it(plugin_set) -> None:
    plugins = plugin_set("echo_output", manifests={"echo_output": MANIFEST}, settings={
        "echo_output": PluginSettings(priority=9, config={"mode": "comfort"}, actuators=("relay_switch",))})
    terms = only(plugins).grant
    assert (terms.priority, terms.memory_pages, terms.fuel, terms.timeout_ms) == (9, 16, 500_000, 10)
    assert terms.config == {"output": "[]", "mode": "comfort"}
    assert terms.actuators == {"relay_switch"} and terms.sensors == {"light_sensor"}
    assert plugins.status["echo_output"].version == "1.2.0"


@pytest.mark.parametrize("manifest,settings,reason", [
    ({"limits": {"memory_pages": 512}}, {}, "memory_pages 512 is above the operator's ceiling "
                                            "plugins.ceilings.max_memory_pages 256"),
    ({"allowed_hosts": ["example.com"]}, {}, "allowed host 'example.com' is not within plugins.ceilings"),
    ({}, {"ceilings": PluginCeilings(max_fuel=1_000_000)}, "fuel 2000000 is above the operator's ceiling"),
    ({"limits": {"memory_pages": "many"}}, {}, "limits.memory_pages: expected an integer, got a string"),
    ({"sensors": "light_sensor"}, {}, "sensors: expected a list"),
])
def test_what_passes_a_ceiling_or_is_malformed_is_refused_with_why(plugin_set, manifest, settings, reason) -> None:
    plugins = plugin_set("echo_output", manifests={"echo_output": manifest}, **settings)
    status = plugins.status["echo_output"]
    assert status.state == "failed" and reason in status.reason and len(plugins) == 0


def test_a_host_within_the_ceiling_is_granted_and_others_stay_denied(plugin_set) -> None:
    plugins = plugin_set("http_fetch", manifests={"http_fetch": {"allowed_hosts": ["localhost"]}},
                         ceilings=PluginCeilings(allowed_hosts=("localhost", "*.example.org")))
    assert only(plugins).grant.allowed_hosts == ("localhost",)
    assert "https://example.com/ is not allowed" in str(failure(only(plugins)))


def test_sha256_pinning_refuses_other_content(plugin_set) -> None:
    import hashlib

    digest = hashlib.sha256(plugin_wasm("echo_output").read_bytes()).hexdigest()
    assert len(plugin_set("echo_output", settings={"echo_output": PluginSettings(sha256=digest)})) == 1
    status = plugin_set("echo_output", settings={"echo_output": PluginSettings(sha256="0" * 64)}).status["echo_output"]
    assert status.state == "failed" and f"sha256 {digest} is not the pinned {'0' * 64}" == status.reason


# --- capabilities in the running daemon ---------------------------------------------------------------

def test_commands_to_actuators_not_granted_are_rejected_and_logged(run_daemon, plugin_dir) -> None:
    data = unsimulated(example_data())
    commands = [{"device_id": "relay_switch", "action": "set_high"},
                {"device_id": "led_strip", "action": "pwm", "parameters": {"duty_cycle": 30}}]
    data["plugins"]["settings"] = {"echo_output": {"config": {"output": json.dumps(commands)},
                                                   "actuators": ["led_strip"]}}
    with capture_logs() as logs:
        daemon = run_daemon(data, 5, plugins=plugin_dir("echo_output"))
    snap = daemon.status.snapshot()
    assert snap["actuators"]["led_strip"]["duty_cycle"] == 30.0 and snap["actuators"]["relay_switch"]["on"] is False
    assert snap["plugins"]["echo_output"]["rejected"] == 5
    (event,) = [e for e in logs if e["event"] == "command_rejected"]
    assert (event["rule"], event["device"], event["plugin"]) == ("forbidden_device", "relay_switch", "echo_output")


def test_a_plugin_that_declares_sensors_sees_only_those(run_daemon, plugin_dir) -> None:
    data = unsimulated(example_data())
    data["plugins"]["settings"] = {}
    folder = plugin_dir("echo_input")
    (folder / "echo_input.yaml").write_text("sensors: [light_sensor, temperature_sensor]\n")
    daemon = run_daemon(data, 0, plugins=folder)
    plugin = only(daemon.plugins)
    readings = daemon.hardware.read(1234.5)
    full = contract.encode_context(readings, daemon.hardware.states_json(), 1234.5, 7, monotonic=3.0)
    mine = [r for r in readings if r.sensor_id != "motion_sensor"]
    states = daemon.hardware.states_json()
    assert plugin.view(full) == contract.encode_context(mine, states, 1234.5, 7, monotonic=3.0).encoded
    seen = json.loads(plugin.call(plugin.view(full)))
    assert [r["sensor_id"] for r in seen["sensor_readings"]] == ["temperature_sensor", "light_sensor"]


# --- quarantine -----------------------------------------------------------------------------------------

def test_a_failing_plugin_is_quarantined_with_a_growing_backoff_and_released(run_daemon, plugin_dir) -> None:
    data = unsimulated(example_data())
    data["plugins"]["settings"] = {}
    data["plugins"]["quarantine"] = {"failures": 3, "window_s": 10, "backoff_s": 1.0, "max_backoff_s": 60}
    clock = VirtualClock()
    daemon = run_daemon(data, 0, plugins=plugin_dir("trap", "temperature_control"), clock=clock)
    with capture_logs() as logs:
        asyncio.run(daemon.serve(40))  # 4 s at 10 Hz
    changes = [(e["event"], e["tick"]) for e in logs if e["event"] in ("plugin_quarantined", "plugin_released")]
    # 3 failures, 1 s off, released, 3 failures, 2 s off, released, 3 failures, 4 s off
    assert changes == [("plugin_quarantined", 2), ("plugin_released", 12), ("plugin_quarantined", 14),
                       ("plugin_released", 34), ("plugin_quarantined", 36)]
    quarantined = [e for e in logs if e["event"] == "plugin_quarantined"]
    assert [e["backoff_s"] for e in quarantined] == [1.0, 2.0, 4.0]
    assert "unreachable" in quarantined[0]["reason"]
    snap = daemon.status.snapshot()
    assert snap["plugins"]["trap"]["state"] == "quarantined" and "unreachable" in snap["plugins"]["trap"]["reason"]
    assert snap["plugins"]["trap"]["calls"] == 9
    assert snap["plugins"]["temperature_control"]["calls"] == 40


def test_rejected_commands_count_towards_quarantine(run_daemon, plugin_dir) -> None:
    data = unsimulated(example_data())
    output = '[{"device_id":"toaster","action":"set_high"}]'
    data["plugins"]["settings"] = {"echo_output": {"config": {"output": output}}}
    data["plugins"]["quarantine"] = {"failures": 5, "window_s": 10, "backoff_s": 100}
    daemon = run_daemon(data, 20, plugins=plugin_dir("echo_output"))
    stats = daemon.status.snapshot()["plugins"]["echo_output"]
    assert (stats["state"], stats["calls"], stats["rejected"]) == ("quarantined", 5, 5)


# --- everything hostile at once ------------------------------------------------------------------------

EVERY_HOSTILE = (*HOSTILE, "http_fetch", "var_hog", "huge_output", "stack_leak", "wasi_import", "unhealthy")


def test_all_hostile_plugins_beside_the_bundled_ones_in_real_time(run_daemon, plugin_dir) -> None:
    from pi_controller.clock import SystemClock

    data = example_data()
    data["simulation"][0].update(start_c=15.0)
    data["plugins"]["defaults"]["timeout_ms"] = 4
    data["plugins"]["settings"].update({"var_hog": {"max_var_bytes": 2048}, "memory_hog": {"memory_pages": 16}})
    folder = plugin_dir("temperature_control", "motion_light", "energy_saver", *EVERY_HOSTILE)
    daemon = run_daemon(data, 0, plugins=folder, clock=SystemClock())
    asyncio.run(daemon.serve(30))
    snap = daemon.status.snapshot()
    for name in ("temperature_control", "motion_light", "energy_saver"):
        assert (snap["plugins"][name]["calls"], snap["plugins"][name]["errors"]) == (30, 0), name
    for name in ("trap", "endless_loop", "memory_hog", "error_return", "http_fetch", "huge_output"):
        stats = snap["plugins"][name]  # every call fails, or stalls on a busy machine (not its fault)
        assert stats["errors"] + stats["stalls"] == stats["calls"] > 0 and stats["errors"] > 0, name
    assert snap["plugins"]["stack_leak"]["errors"] == 0  # its input never starts with 't'
    assert snap["plugins"]["wasi_import"]["state"] == snap["plugins"]["unhealthy"]["state"] == "failed"
    assert daemon.hardware.factory.pin(27).states[1].state == 1.0  # the heater came on anyway
    # Missed ticks are not asserted: sixteen plugins, several burning their whole fuel, on a machine whose
    # cores are saturated miss deadlines through no fault of the loop (benchmarks/ measure it).
    assert snap["ticks"]["count"] == 30


def test_a_released_plugin_shows_quarantined_until_a_clean_call() -> None:
    """One that fails every call never shows loaded between two rests (Home Assistant saw it flip)."""
    quarantine = Quarantine("trap", QuarantineSettings(failures=3, window_s=10, backoff_s=1.0, max_backoff_s=60))
    quarantine.record(0.0, 0, 3, "unreachable")
    assert quarantine.quarantined and quarantine.shown_quarantined
    assert quarantine.admit(1.5, 15)  # released: called again
    assert not quarantine.quarantined and quarantine.shown_quarantined  # on probation
    quarantine.record(1.5, 15, 1, "unreachable")
    assert quarantine.admit(1.6, 16) and quarantine.shown_quarantined  # one fault: not yet back in, still shown so
    quarantine.record(1.7, 17, 0, "")  # a clean call
    assert not quarantine.shown_quarantined
