"""Shadow plugins: run beside the live plugin of their name every tick, compared, never applied."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

import pytest
from structlog.testing import capture_logs

from pi_controller import cli
from pi_controller.clock import SystemClock, VirtualClock
from pi_controller.config import PluginsSettings
from pi_controller.metrics import Metrics
from pi_controller.plugins import shadow, shadow_supervisor
from pi_controller.plugins.plugin_set import PluginSet
from pi_controller.plugins.shadow import Shadows
from pi_controller.plugins.shadow_supervisor import ShadowSupervisor
from tests.conftest import TEST_PLUGINS, WAIT_S, example_data, run_with, until

T = TypeVar("T")

TICKS = 60


def heater_only() -> dict[str, Any]:
    """The example's heater and thermometer alone, with the room model: cold, so the thermostat asks for
    heat on every tick."""
    data = example_data()
    data["sensors"] = [s for s in data["sensors"] if s["id"] == "temperature_sensor"]
    data["actuators"] = [a for a in data["actuators"] if a["id"] == "relay_switch"]
    data["simulation"] = [m for m in data["simulation"] if m["kind"] == "room"]
    data["mqtt"]["deadband"] = {}
    data["metrics"] = {"enabled": False}
    return data


def with_shadow(plugin_dir, live: str, shadow_of: str, shadow_file: str) -> Path:
    folder = plugin_dir(live)
    (folder / shadow.FOLDER).mkdir()
    shutil.copy(TEST_PLUGINS / f"{shadow_file}.wasm", folder / shadow.FOLDER / f"{shadow_of}.wasm")
    return folder


def test_a_shadow_flipping_the_relay_every_tick_never_reaches_the_pin(run_daemon, plugin_dir) -> None:
    folder = with_shadow(plugin_dir, "temperature_control", "temperature_control", "sweep")
    daemon = run_daemon(heater_only(), TICKS, plugins=folder, clock=VirtualClock())
    # The pin did what the live thermostat asked: on at the first tick, off only at shutdown.
    assert [bool(s.state) for s in daemon.hardware.factory.pin(27).states] == [False, True, False]
    assert [p.name for p in daemon.plugins] == ["temperature_control"]
    snapshot = daemon.status.snapshot()["shadows"]["temperature_control"]
    # sweep asks for on at even ticks (as the thermostat does) and for off at odd ones.
    assert snapshot["calls"] == TICKS and snapshot["errors"] == 0
    assert snapshot["ticks"] == TICKS and snapshot["agree"] == TICKS // 2
    relay = snapshot["actuators"]["relay_switch"]
    assert relay["agree"] == TICKS // 2
    assert relay["first_difference"]["tick"] == 1
    assert relay["last_difference"] == {"tick": TICKS - 1, "time": relay["last_difference"]["time"],
                                        "live": ["set_high", 1.0], "shadow": ["set_low", 0.0]}
    assert daemon.loop.plugin_stats["temperature_control"].calls == TICKS  # the live plugin, called as ever
    metrics = Metrics(0.1, daemon.status)
    text = metrics.exposition().decode()
    assert 'pi_controller_shadow_compared_ticks_total{device="relay_switch",plugin="temperature_control"} 60.0' in text
    assert 'pi_controller_shadow_agreed_ticks_total{device="relay_switch",plugin="temperature_control"} 30.0' in text


def test_a_shadow_that_fails_changes_nothing_live(run_daemon, plugin_dir) -> None:
    folder = with_shadow(plugin_dir, "temperature_control", "temperature_control", "trap")
    daemon = run_daemon(heater_only(), 10, plugins=folder, clock=VirtualClock())
    assert [bool(s.state) for s in daemon.hardware.factory.pin(27).states] == [False, True, False]
    snapshot = daemon.status.snapshot()
    entry = snapshot["shadows"]["temperature_control"]
    assert entry["errors"] >= 1 and entry["agree"] == 0
    assert entry["first_difference"]["shadow"] == {"failed": "trap"}
    assert snapshot["plugins"]["temperature_control"]["errors"] == 0
    assert snapshot["safety"]["failsafes"] == {}


def test_a_shadow_without_a_live_plugin_is_not_called(run_daemon, plugin_dir) -> None:
    folder = with_shadow(plugin_dir, "temperature_control", "energy_saver", "sweep")
    daemon = run_daemon(heater_only(), 5, plugins=folder, clock=VirtualClock())
    entry = daemon.status.snapshot()["shadows"]["energy_saver"]
    assert entry == {"state": "loaded"}
    assert [bool(s.state) for s in daemon.hardware.factory.pin(27).states] == [False, True, False]


def test_promote_moves_the_shadow_over_the_live_plugin(plugin_dir, cli_logs, capsys) -> None:
    folder = with_shadow(plugin_dir, "temperature_control", "temperature_control", "sweep")
    (folder / shadow.FOLDER / "temperature_control.yaml").write_text("name: temperature_control\n")
    assert cli.main(["plugin", "promote", "temperature_control", "--plugins", str(folder)]) == 0
    assert (folder / "temperature_control.wasm").read_bytes() == (TEST_PLUGINS / "sweep.wasm").read_bytes()
    assert (folder / "temperature_control.yaml").read_text() == "name: temperature_control\n"
    assert list((folder / shadow.FOLDER).iterdir()) == []
    assert cli.main(["plugin", "promote", "temperature_control", "--plugins", str(folder)]) == 2  # as docs say
    assert "no shadow plugin" in capsys.readouterr().err
    assert cli.main(["plugin", "promote", "../etc", "--plugins", str(folder)]) == 2


def test_a_shadow_is_dry_run_through_the_wear_rules_without_touching_the_live_ones(run_daemon, plugin_dir) -> None:
    data = heater_only()
    relay = data["actuators"][0]
    relay["min_on_s"] = 10  # 60 ticks are 6 s: once on, any request for off is held
    folder = with_shadow(plugin_dir, "temperature_control", "temperature_control", "sweep")
    clock = VirtualClock()
    started = clock.monotonic()
    daemon = run_daemon(data, TICKS, plugins=folder, clock=clock)
    # sweep asks for off at every odd tick: each is one min_on would hold, the relay being on since tick 0.
    entry = daemon.status.snapshot()["shadows"]["temperature_control"]
    assert entry["would_be_held"] == {"relay_switch:min_on": TICKS // 2}
    # The live relay's rules saw only the thermostat: on at tick 0, never held, its timer from then on.
    assert [bool(s.state) for s in daemon.hardware.factory.pin(27).states] == [False, True, False]
    guard = daemon.loop.safety.guards["relay_switch"]
    assert (guard.plugin, guard.wanted, guard.held, guard.latched) == ("temperature_control", True, False, False)
    assert guard.switched_at == pytest.approx(started)
    assert daemon.loop.safety.held["relay_switch"] == {}
    assert daemon.status.snapshot()["safety"]["held"] == {}


def shadow_calls(daemon: Any) -> int:
    return daemon.status.snapshot().get("shadows", {}).get("temperature_control", {}).get("calls", 0)


def test_a_config_reload_rebuilds_the_shadows_from_the_folder(run_daemon, plugin_dir) -> None:
    data = heater_only()
    data["plugins"]["watch"] = False  # only the reload looks at the folder
    folder = plugin_dir("temperature_control")
    daemon = run_daemon(data, 0, plugins=folder, clock=SystemClock())

    async def scenario() -> None:
        assert "shadows" not in daemon.status.snapshot()
        (folder / shadow.FOLDER).mkdir()
        shutil.copy(TEST_PLUGINS / "sweep.wasm", folder / shadow.FOLDER / "temperature_control.wasm")
        assert (await daemon.reload()).outcome == "applied"
        await until(lambda: shadow_calls(daemon) > 3, "the shadow dropped in runs")
        (folder / shadow.FOLDER / "temperature_control.wasm").unlink()
        assert (await daemon.reload()).outcome == "applied"
        assert "shadows" not in daemon.status.snapshot()

    run_with(daemon, scenario)
    assert [bool(s.state) for s in daemon.hardware.factory.pin(27).states] == [False, True, False]


def test_a_shadow_folder_and_shadows_dropped_in_and_removed_are_picked_up_while_running(run_daemon,
                                                                                        plugin_dir) -> None:
    folder = plugin_dir("temperature_control")
    daemon = run_daemon(heater_only(), 0, plugins=folder, clock=SystemClock())
    shadows = folder / shadow.FOLDER

    async def scenario() -> None:
        shadows.mkdir()  # and at once a shadow in it: whether the rebuild sees it or the watch does
        shutil.copy(TEST_PLUGINS / "sweep.wasm", shadows / ".copying")
        os.replace(shadows / ".copying", shadows / "temperature_control.wasm")
        await until(lambda: shadow_calls(daemon) > 3, "the shadow dropped in runs")
        (shadows / "temperature_control.wasm").unlink()
        await until(lambda: "temperature_control" not in daemon.status.snapshot().get("shadows", {}),
                    "the removed one is gone")

    run_with(daemon, scenario)
    assert [bool(s.state) for s in daemon.hardware.factory.pin(27).states] == [False, True, False]


def test_a_shadow_folder_dropped_in_is_followed_without_asking_the_folder_on_the_loops_thread(
        run_daemon, plugin_dir, monkeypatch) -> None:
    """The shadow folder is in the plugins folder, which may be on a hung or slow mount: whether it is there is asked
    by the rebuild on a worker thread, and the watch that follows it goes by that answer, not by a look in the gap."""
    folder = plugin_dir("temperature_control")
    daemon = run_daemon(heater_only(), 0, plugins=folder, clock=SystemClock())
    shadows, askers, loop = folder / shadow.FOLDER, [], []
    is_dir = Path.is_dir

    def asked(path: Path) -> bool:
        if path == shadows:
            askers.append(threading.get_ident())
        return is_dir(path)

    async def scenario() -> None:
        loop.append(threading.get_ident())
        monkeypatch.setattr(Path, "is_dir", asked)
        shadows.mkdir()  # and at once a shadow in it: whether the rebuild sees it or the watch does
        shutil.copy(TEST_PLUGINS / "sweep.wasm", shadows / ".copying")
        os.replace(shadows / ".copying", shadows / "temperature_control.wasm")
        await until(lambda: shadow_calls(daemon) > 3, "the shadow dropped in runs")

    run_with(daemon, scenario)
    assert askers and loop[0] not in askers, "the shadow folder was looked at on the loop's thread"


class Gap:
    """The loop's gap between two ticks on a test's terms: at once, or never (a loop that does not tick)."""

    def __init__(self, opens: bool):
        self.opens = opens
        self.waiting = asyncio.Event()

    async def in_gap(self, work: Callable[[], T], drop: Callable[[], None]) -> T:
        if self.opens:
            return work()
        self.waiting.set()
        try:
            return await asyncio.get_running_loop().create_future()  # never done
        except asyncio.CancelledError:
            drop()  # as the loop does: what would have been taken over is released
            raise


def shadowed(plugin_set: Any) -> PluginSet:
    live = plugin_set("temperature_control", watch=False)
    (live.directory / shadow.FOLDER).mkdir()
    shutil.copy(TEST_PLUGINS / "sweep.wasm", live.directory / shadow.FOLDER / "temperature_control.wasm")
    return live


def test_a_reload_adopts_its_shadows_carrying_on_the_comparisons_of_unchanged_files(plugin_set) -> None:
    live, settings, told = shadowed(plugin_set), PluginsSettings(watch=False), list[Shadows]()
    supervisor = ShadowSupervisor(settings, live, VirtualClock(), told.append)
    first = supervisor.current
    compared = first.plugins.status["temperature_control"].sha256 or ""
    stats = first.stats["temperature_control"] = shadow.ShadowStats(compared)

    async def reload() -> Shadows | None:
        supervisor.start(Gap(opens=True))
        prepared = await supervisor.prepare(settings, live)
        supervisor.reload(settings, prepared)
        return prepared

    adopted = asyncio.run(reload())
    try:
        assert adopted is not None and told == [adopted] and supervisor.current is adopted
        assert adopted.stats["temperature_control"] is stats  # the same file: its comparisons go on
        assert len(first) == 0  # the set it replaced is closed
        supervisor.reload(settings, None)  # a reload whose shadows failed to build: the running ones stay
        assert supervisor.current is adopted and told == [adopted] and len(adopted) == 1
    finally:
        supervisor.stop()
        supervisor.close()


def test_a_shadow_rebuild_stopped_before_its_gap_closes_what_it_compiled(plugin_set, monkeypatch) -> None:
    built: list[Shadows] = []

    class Recorded(Shadows):
        def __init__(self, *args: Any):
            super().__init__(*args)
            built.append(self)

    monkeypatch.setattr(shadow_supervisor, "Shadows", Recorded)
    live, told = plugin_set("temperature_control", watch=False), list[Shadows]()
    supervisor = ShadowSupervisor(PluginsSettings(watch=False), live, VirtualClock(), told.append)
    gap = Gap(opens=False)

    async def scenario() -> None:
        supervisor.start(gap)
        (live.directory / shadow.FOLDER).mkdir()
        shutil.copy(TEST_PLUGINS / "sweep.wasm", live.directory / shadow.FOLDER / "temperature_control.wasm")
        supervisor.folder_changed(shadow.FOLDER)  # what the live folder's watcher says
        await asyncio.wait_for(gap.waiting.wait(), WAIT_S)  # rebuilt, and waiting for a gap
        assert len(built) == 2 and len(built[1]) == 1
        supervisor.stop()
        await until(lambda: len(built[1]) == 0, "what the rebuild compiled is closed")

    try:
        asyncio.run(scenario())
        assert told == [] and supervisor.current is built[0]  # never adopted
    finally:
        supervisor.close()


def test_promoting_says_the_shadow_left_and_the_live_plugin_was_replaced(run_daemon, plugin_dir) -> None:
    """The shadow set's events are its own: a promotion is no `plugin_unloaded`, as if the live plugin had gone."""
    folder = with_shadow(plugin_dir, "temperature_control", "temperature_control", "sweep")
    daemon = run_daemon(heater_only(), 0, plugins=folder, clock=SystemClock())
    sweep = hashlib.sha256((TEST_PLUGINS / "sweep.wasm").read_bytes()).hexdigest()

    async def scenario() -> None:
        shadow.promote(folder, "temperature_control")
        await until(lambda: [p.sha256 for p in daemon.plugins] == [sweep] and not daemon.shadows.current.plugins.status,
                    "the shadow is live, and no shadow is left")

    with capture_logs() as logs:
        run_with(daemon, scenario)
    events = sorted(e["event"] for e in logs if (e.get("plugin") == "temperature_control" and "unloaded" in e["event"])
                    or e["event"].endswith("_replaced"))
    assert events == ["plugin_replaced", "shadow_unloaded"]


def test_the_shadows_share_of_the_tick_follows_the_live_plugins_dropped_in_and_removed(run_daemon, plugin_dir) -> None:
    """The shadows get what the live plugins leave of the 60 ms plugin budget, as the live set is now: a shadow
    asking 45 ms is refused beside 20 ms of live plugins, loaded once a live plugin leaves, and unloaded, saying
    so, when a live plugin dropped into the folder takes its share back: no shadow keeps what the live ones need."""
    folder = with_shadow(plugin_dir, "temperature_control", "temperature_control", "sweep")
    (folder / shadow.FOLDER / "temperature_control.yaml").write_text("limits: {timeout_ms: 45}\n")
    shutil.copy(TEST_PLUGINS / "counter.wasm", folder / "counter.wasm")  # 10 ms, as temperature_control
    daemon = run_daemon(heater_only(), 0, plugins=folder, clock=SystemClock())

    def shadow_state() -> tuple[str, str]:
        status = daemon.shadows.current.plugins.status["temperature_control"]
        return status.state, status.reason or ""

    def fits() -> bool:
        live = sum(p.grant.timeout_ms for p in daemon.plugins)
        return live + sum(p.grant.timeout_ms for p in daemon.shadows.current.plugins) <= 60

    async def scenario() -> None:
        assert shadow_state() == ("failed", "timeout_ms 45 does not fit the tick: 0 of the 40 ms plugin budget is "
                                            "held by nothing (the live plugins leave 40 of the 60 ms plugin budget)")
        os.replace(folder / "counter.wasm", folder.parent / "counter.wasm")
        await until(lambda: shadow_calls(daemon) > 3, "the shadow, room made for it, loaded and called")
        assert fits()
        os.replace(folder.parent / "counter.wasm", folder / "counter.wasm")
        await until(lambda: daemon.plugins.named("counter") is not None and shadow_state()[0] == "failed",
                    "the live plugin dropped in loaded, the shadow unloaded")
        assert fits() and shadow_state()[1] == ("unloaded: timeout_ms 45 does not fit the tick: 0 of the 40 ms plugin "
                                                "budget is held by nothing (the live plugins leave 40 of the 60 ms "
                                                "plugin budget)")

    run_with(daemon, scenario)
    assert [p.name for p in daemon.plugins] == ["temperature_control", "counter"]
