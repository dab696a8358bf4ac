"""The daemon's host functions (`pi_log`, `pi_history`) through the real Extism runtime, called by a
real plugin (tests/plugins/src/host_calls.zig) politely and not: history rings, grants, per-call
budgets, the rate-limited log, and offsets that are no memory block."""

from __future__ import annotations

import json
import shutil
import time
from typing import Any

import pytest
from structlog.testing import capture_logs

from pi_controller.config import HostFunctionSettings, PluginSettings, PluginsSettings
from pi_controller.contract import Reading
from pi_controller.logs import printable
from pi_controller.plugins import backstop
from pi_controller.plugins.host_functions import History, parse_message
from pi_controller.plugins.plugin_set import PluginSet
from pi_controller.plugins.sandbox import PluginCallError, SandboxedPlugin
from tests.conftest import CONTEXT, example_data, only, plugin_wasm, unsimulated


def readings(tick: int) -> list[Reading]:
    """Tick `tick`: a temperature that climbs a degree a tick, a light sensor that fails every third."""
    light = (Reading("light", None, "lux", 1000.0 + tick, "no echo") if tick % 3 == 0
             else Reading("light", 10.0 * tick, "lux", 1000.0 + tick))
    return [Reading("temperature", 20.0 + tick, "°C", 1000.0 + tick), light]


def host_calls(plugin_set: Any, ticks: int = 7, manifest: dict[str, Any] | None = None,
               host: HostFunctionSettings | None = None, **config: Any) -> tuple[PluginSet, SandboxedPlugin]:
    plugins = plugin_set("host_calls", manifests={"host_calls": manifest} if manifest else None,
                         settings={"host_calls": PluginSettings(config=config, timeout_ms=50)},
                         host=host or HostFunctionSettings())
    for tick in range(1, ticks + 1):
        plugins.history.record(readings(tick))
    return plugins, only(plugins)


def answer(plugin: SandboxedPlugin, tick: int = 8) -> Any:
    return json.loads(plugin.call(CONTEXT, tick))


# --- pi_history ---------------------------------------------------------------------------------

def test_history_gives_the_last_readings_oldest_first(plugin_set) -> None:
    _, plugin = host_calls(plugin_set, mode="history", sensor="temperature", count=3)
    assert answer(plugin) == [[1005.0, 25.0], [1006.0, 26.0], [1007.0, 27.0]]


def test_history_leaves_out_invalid_readings(plugin_set) -> None:
    _, plugin = host_calls(plugin_set, mode="history", sensor="light", count=100)
    assert answer(plugin) == [[1000.0 + t, 10.0 * t] for t in (1, 2, 4, 5, 7)]


def test_history_keeps_history_length_readings_and_no_more(plugin_set) -> None:
    _, plugin = host_calls(plugin_set, ticks=50, host=HostFunctionSettings(history_length=10),
                           mode="history", sensor="temperature", count=1_000_000)
    assert answer(plugin) == [[1000.0 + t, 20.0 + t] for t in range(41, 51)]


def test_a_plugin_computes_a_moving_average_through_the_zig_pdk(plugin_set) -> None:
    _, plugin = host_calls(plugin_set, mode="mean", sensor="temperature", count=4)
    assert answer(plugin) == [25.5]  # (24 + 25 + 26 + 27) / 4


def test_history_of_a_sensor_not_granted_is_refused_and_logged(plugin_set) -> None:
    with capture_logs() as logs:
        _, plugin = host_calls(plugin_set, manifest={"sensors": ["light"]}, mode="history", sensor="temperature")
        assert answer(plugin) is None
    refused = [e for e in logs if e["event"] == "plugin_host_call_refused"]
    assert refused == [{"event": "plugin_host_call_refused", "log_level": "warning", "plugin": "host_calls",
                        "tick": 8, "why": "history_not_granted", "sensor": "temperature"}]


def test_history_of_an_unknown_sensor_is_refused(plugin_set) -> None:
    _, plugin = host_calls(plugin_set, mode="history", sensor="no_such_sensor")
    assert answer(plugin) is None


def test_history_reads_are_limited_per_call_and_the_limit_resets_with_each_call(plugin_set) -> None:
    _, plugin = host_calls(plugin_set, host=HostFunctionSettings(history_reads_per_call=5), mode="reads", count=12)
    assert answer(plugin, 8) == [5]
    assert answer(plugin, 9) == [5]


# --- pi_log -------------------------------------------------------------------------------------

def test_log_lines_become_events_with_the_plugin_tick_and_level(plugin_set) -> None:
    _, plugin = host_calls(plugin_set, mode="log", count=2, level=2, message="valve stuck\nopen")
    with capture_logs() as logs:
        answer(plugin, 42)
    assert [e for e in logs if e["event"] == "plugin_log"] == 2 * [
        {"event": "plugin_log", "log_level": "warning", "plugin": "host_calls", "tick": 42,
         "message": "valve stuck\\nopen"}]


def test_a_json_message_brings_its_fields(plugin_set) -> None:
    message = json.dumps({"message": "heating", "error_c": 1.5, "on": True, "nested": {"a": [1]}})
    _, plugin = host_calls(plugin_set, mode="log", count=1, message=message)
    with capture_logs() as logs:
        answer(plugin)
    (event,) = [e for e in logs if e["event"] == "plugin_log"]
    assert event["message"] == "heating"
    assert event["fields"] == {"error_c": 1.5, "on": True, "nested": '{"a": [1]}'}


def test_log_lines_are_rate_limited_and_the_dropped_ones_counted(plugin_set) -> None:
    now = [0.0]
    _plugins, plugin = host_calls(plugin_set, host=HostFunctionSettings(log_burst=10, log_lines_per_s=2),
                                 mode="log", count=25)
    plugin.host.budget.clock = lambda: now[0]  # time is ours to move
    with capture_logs() as logs:
        answer(plugin)
        now[0] = 2.0  # room for 4 more lines, the notice of what was dropped among them
        answer(plugin)
    events = [e["event"] for e in logs if e["event"].startswith("plugin_log")]
    assert events == 10 * ["plugin_log"] + ["plugin_log_suppressed"] + 3 * ["plugin_log"]
    (suppressed,) = [e for e in logs if e["event"] == "plugin_log_suppressed"]
    assert suppressed["lines"] == 15


def test_a_c_plugin_dims_to_the_moving_average_and_logs_through_the_c_pdk(plugin_set) -> None:
    plugins = plugin_set("smoothed_light")
    with capture_logs() as logs:
        assert json.loads(only(plugins).call(CONTEXT, 1)) == []  # no history yet
        for tick in range(1, 8):
            plugins.history.record(readings(tick))
        assert json.loads(only(plugins).call(CONTEXT, 8)) == [
            {"device_id": "led_strip", "action": "pwm", "parameters": {"duty_cycle": 45.0}}]  # 20, 40, 50, 70
    lines = [(e["log_level"], e["message"], e.get("fields")) for e in logs if e["event"] == "plugin_log"]
    assert lines == [("warning", "no light history", None), ("info", "dimming to the mean", {"window": 4})]


# --- hostile use --------------------------------------------------------------------------------

def test_a_plugin_spinning_on_host_calls_is_cancelled_after_its_budget(plugin_set) -> None:
    _, plugin = host_calls(plugin_set, host=HostFunctionSettings(host_calls_per_call=32), mode="flood")
    for tick in (8, 9):  # the rebuilt instance is cancelled the same way: the verdict does not drift
        with pytest.raises(PluginCallError) as caught:
            plugin.call(CONTEXT, tick)
        assert caught.value.kind == "host_call_limit" and "more than 32 host function calls" in str(caught.value)


def test_a_plugin_flooding_extism_s_own_log_gets_only_its_share_of_ours(plugin_set) -> None:
    plugin = only(plugin_set("log_flood", host=HostFunctionSettings(log_burst=20, log_lines_per_s=0.01)))
    with capture_logs() as logs:
        for tick in range(3):  # hundreds of log_error calls each, until its fuel runs out
            with pytest.raises(PluginCallError):
                plugin.call(CONTEXT, tick)
    lines = [e for e in logs if e["event"] == "extism_log"]
    assert len(lines) == 20 and {(e["plugin"], e["text"]) for e in lines} == {("log_flood", "flooding the log")}
    assert plugin.host.budget.dropped > 500


def test_offsets_that_are_no_memory_block_read_as_nothing(plugin_set) -> None:
    _, plugin = host_calls(plugin_set, mode="garbage", sensor="temperature")
    with capture_logs() as logs:
        # refused, refused, a read of count 2**64-1 answered (as `[]`), an id inside a block refused
        assert answer(plugin) == [0, 0, 1, 0]
    assert not [e for e in logs if e["event"] in ("plugin_log", "host_function_failed")]
    assert {e["why"] for e in logs if e["event"] == "plugin_host_call_refused"} >= {"log_without_message"}


# --- the pieces ---------------------------------------------------------------------------------

def test_history_encodes_values_as_the_context_does() -> None:
    history = History(3)
    history.record([Reading("t", 21.1, "°C", 1732000000.125), Reading("t", None, "°C", 1.0, "bad")])
    assert history.encode("t", 5) == b"[[1732000000.125,21.1]]"
    assert history.encode("t", -1) == b"[]"
    assert history.encode("nope", 5) is None


def test_history_reads_between_records_see_every_entry_once_in_order() -> None:
    history = History(4)
    seen = []
    for tick in range(1, 30):
        history.record([Reading("t", float(tick), "", float(tick))])
        if tick % 7 == 0 or tick == 2:
            seen.append(json.loads(history.encode("t", 4)))
    assert seen == [[[1.0, 1.0], [2.0, 2.0]]] + [[[float(t), float(t)] for t in range(n - 3, n + 1)]
                                                 for n in (7, 14, 21, 28)]
    history.record([Reading("t", 30.0, "", 30.0)])  # two records since the last read: neither is lost
    assert json.loads(history.encode("t", 4)) == [[float(t), float(t)] for t in range(27, 31)]


@pytest.mark.parametrize("data, expected", [
    (b"plain text", ("plain text", {})),
    (b"\xff\xfe bad utf-8", ("\ufffd\ufffd bad utf-8", {})),
    (b'{"message": "m", "n": 1e400}', ("m", {"n": "inf"})),
    (b'{"no": "message"}', ("", {"no": "message"})),
    (b'{"broken": ', ('{"broken": ', {})),
    (b'[1, 2]', ("[1, 2]", {})),
])
def test_parse_message(data: bytes, expected: tuple[str, dict[str, Any]]) -> None:
    assert parse_message(data) == expected


def test_parse_message_keeps_at_most_16_fields() -> None:
    _, fields = parse_message(json.dumps({f"k{i}": i for i in range(100)}).encode())
    assert list(fields) == [f"k{i}" for i in range(16)]


def test_printable_cuts_and_escapes() -> None:
    assert printable("a\x1b[31mb", 100) == "a\\x1b[31mb"
    assert printable("x" * 10, 4) == "xxxx...(6 more)"


def test_a_call_held_up_past_the_old_backstop_finishes_with_its_output_and_its_instance(tmp_path) -> None:
    """The machine's slowness changes nothing: a call that a slow host function (or a busy machine) holds up
    for 100 ms, past the 13 to 35 ms the backstop used to be here (idle to loaded), is not cut off, so its
    instance and the plugin's state stand (issue 25: such stalls reset motion_light's hold timer, and replay
    diverged)."""

    class SlowHistory(History):
        def encode(self, sensor_id: str, count: int) -> bytes | None:
            time.sleep(0.1)
            return super().encode(sensor_id, count)

    folder = tmp_path / "plugins"
    folder.mkdir()
    shutil.copy(plugin_wasm("host_calls"), folder / "host_calls.wasm")
    own = PluginSettings(config={"mode": "history", "sensor": "temperature", "count": 1})
    settings = PluginsSettings(settings={"host_calls": own})
    plugins = PluginSet(settings, folder, budget_ms=1000, history=SlowHistory(600))  # the real clock's backstop
    try:
        plugins.load_all()
        plugins.history.record(readings(1))
        plugin = only(plugins)
        assert plugin.backstop_ms >= backstop.HOST_ALLOWANCE_MS
        instance = plugin._instance
        started = time.perf_counter()
        assert answer(plugin) == [[1001.0, 21.0]]
        assert time.perf_counter() - started >= 0.1 and plugin._instance is instance  # not rebuilt
    finally:
        plugins.close()


def test_the_history_stays_bounded_when_no_plugin_reads_it_and_keeps_the_newest() -> None:
    """Filed every tick and never read, a sensor's ring holds at most its length of readings not yet encoded;
    a read then gives the newest, oldest first. Invalid readings are not filed."""
    history = History(3)
    for tick in range(50):
        history.record([Reading("t", float(tick), "celsius", float(tick)),
                        Reading("t", None, "celsius", float(tick), error="no answer")])
        history.file()
        assert len(history._rings["t"].pending) <= 3
    assert json.loads(history.encode("t", 10) or b"") == [[47.0, 47.0], [48.0, 48.0], [49.0, 49.0]]


def test_what_a_plugin_writes_to_extism_s_own_log_in_calls_that_succeed_is_logged_every_tick(
        run_daemon, plugin_dir) -> None:
    """The tick drains libextism's log after its calls while a plugin that imports its log functions is
    loaded (the others can put only a failed call's lines there, taken with the failure): every call's line
    is in our log, as the plugin's, none left waiting for a failure or the periodic drain (every 64 ticks)."""
    data = unsimulated(example_data())
    data["plugins"]["settings"] = {}
    with capture_logs() as logs:
        daemon = run_daemon(data, 10, plugins=plugin_dir("extism_logger", "temperature_control"))
    assert daemon.plugins.logs_to_extism
    assert [p.logs_to_extism for p in daemon.plugins] == [True, False]
    lines = [e for e in logs if e["event"] == "extism_log"]
    assert [(e["plugin"], e["text"]) for e in lines] == [("extism_logger", "a line of this call")] * 10
    assert daemon.status.snapshot()["plugins"]["extism_logger"]["errors"] == 0
