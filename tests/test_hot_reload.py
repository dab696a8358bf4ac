"""Hot reload: files written, replaced, renamed and deleted in the plugins folder while the loop runs
in real time; plugins compile off the loop's thread, go live between two ticks, and every tick calls
every live plugin once. (Missed deadlines around a reload, which a loaded machine causes too, are
measured by benchmarks/plugin_reload.py.)"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from asyncinotify import Inotify
from structlog.testing import capture_logs

from pi_controller import config
from pi_controller.clock import SystemClock
from pi_controller.daemon import Daemon
from pi_controller.plugins import checks, install
from pi_controller.plugins import folder as plugin_folder
from pi_controller.plugins import watch as plugin_watch
from pi_controller.plugins.plugin_set import PluginSet
from pi_controller.safety import known_good
from tests.conftest import (
    BUNDLED_PLUGINS,
    TEST_PLUGINS,
    Held,
    PluginsLive,
    example_data,
    free_port,
    more_ticks,
    plugin_wasm,
    run_with,
    sha256_of,
    swaps_of,
    unsimulated,
    until,
)


def sha(daemon: Any, name: str) -> str | None:
    status = daemon.plugins.status.get(name)
    return status.sha256 if status else None


@pytest.fixture
def live(run_daemon, plugin_dir) -> tuple[Any, Path]:
    data = unsimulated(example_data())
    data["plugins"]["settings"] = {}
    folder = plugin_dir("temperature_control")
    return run_daemon(data, 0, plugins=folder, clock=SystemClock()), folder


def test_write_replace_rename_and_delete_while_the_loop_runs(live, monkeypatch) -> None:
    daemon, folder = live
    echo, counter = (TEST_PLUGINS / "echo_output.wasm").read_bytes(), (TEST_PLUGINS / "counter.wasm").read_bytes()
    swaps = PluginsLive(daemon, monkeypatch)
    compiles = Held(daemon.plugins, "prepare", monkeypatch)  # the first, the copied plugin's, held

    async def scenario() -> None:
        with open(folder / "late.wasm", "wb") as slow:  # a slow copy: half, three ticks, the rest
            slow.write(echo[:len(echo) // 2])
            slow.flush()
            await more_ticks(daemon, 3)
            assert "late" not in daemon.plugins.status  # still open for writing: not looked at
            slow.write(echo[len(echo) // 2:])
        await compiles.past_ticks(daemon)  # the loop's thread is not the one compiling it
        await until(lambda: sha(daemon, "late") is not None, "the copied plugin is loaded")
        first = sha(daemon, "late")
        (folder / ".late.tmp").write_bytes(counter)  # the atomic way: write aside, rename over
        os.replace(folder / ".late.tmp", folder / "late.wasm")
        await until(lambda: sha(daemon, "late") not in (None, first), "the renamed-over plugin is swapped in")
        calls_before = daemon.loop.plugin_stats["late"].calls
        await until(lambda: daemon.loop.plugin_stats["late"].calls > calls_before + 2, "the new version runs")
        (folder / "late.wasm").unlink()
        await until(lambda: "late" not in daemon.plugins.status, "the deleted plugin is unloaded")

    with capture_logs() as logs:
        run_with(daemon, scenario)
    events = [e["event"] for e in logs if e.get("plugin") == "late" and e["event"].startswith("plugin_")]
    assert events == ["plugin_loaded", "plugin_replaced", "plugin_unloaded"]
    assert not [e for e in logs if e["event"] in ("plugin_load_failed", "plugin_call_failed")]
    assert compiles.waits[0], "the loop did not tick while the copied plugin compiled"
    # Each version swapped in between two ticks, and called once on every tick it was live.
    assert swaps.versions("late") == [None, hashlib.sha256(echo).hexdigest(), hashlib.sha256(counter).hexdigest(), None]
    assert daemon.loop.plugin_stats["late"].calls == swaps.ticks_live("late") > 2
    assert daemon.loop.plugin_stats["temperature_control"].calls == daemon.loop.ticks.count  # every tick, every plugin
    assert daemon.status.snapshot()["actuators"]["led_strip"]["duty_cycle"] > 0  # counter ran, commanding the strip


def test_a_replacement_that_fails_leaves_the_previous_version_running(live, monkeypatch) -> None:
    daemon, folder = live
    original = sha(daemon, "temperature_control")
    swaps = PluginsLive(daemon, monkeypatch)

    async def replace(content: bytes) -> None:
        (folder / ".next").write_bytes(content)
        os.replace(folder / ".next", folder / "temperature_control.wasm")

    async def scenario() -> None:
        await replace(b"\x00asm\x01\x00\x00\x00garbage")
        await until(lambda: daemon.plugins.status["temperature_control"].reason is not None, "refused")
        await replace((TEST_PLUGINS / "unhealthy.wasm").read_bytes())
        await until(lambda: "calibration" in (daemon.plugins.status["temperature_control"].reason or ""),
                    "refused by its health check")
        assert sha(daemon, "temperature_control") == original
        await replace((TEST_PLUGINS / "echo_output.wasm").read_bytes())
        await until(lambda: sha(daemon, "temperature_control") != original, "a good one is swapped in")

    with capture_logs() as logs:
        run_with(daemon, scenario)
    refusals = [e["reason"] for e in logs if e["event"] == "plugin_replacement_refused"]
    assert len(refusals) == 2 and "calibration table missing" in refusals[1]
    assert daemon.plugins.status["temperature_control"].reason is None
    # Neither refused version went live for a tick: the previous one ran on every tick until the good one.
    assert swaps.versions("temperature_control") == [original, sha256_of(TEST_PLUGINS / "echo_output.wasm")]
    stats = daemon.loop.plugin_stats["temperature_control"]
    assert stats.calls == daemon.loop.ticks.count and stats.errors == 0


def test_a_replaced_file_leaves_quarantine_at_once_and_a_manifest_change_reloads(run_daemon, plugin_dir,
                                                                                 monkeypatch) -> None:
    data = unsimulated(example_data())
    data["plugins"]["settings"] = {}
    data["plugins"]["quarantine"] = {"failures": 2, "backoff_s": 600}
    folder = plugin_dir("trap")
    daemon = run_daemon(data, 0, plugins=folder, clock=SystemClock())
    swaps = PluginsLive(daemon, monkeypatch)
    echo = sha256_of(TEST_PLUGINS / "echo_output.wasm")

    async def scenario() -> None:
        await until(lambda: daemon.plugins.status["trap"].state == "quarantined", "quarantined")
        shutil.copy(TEST_PLUGINS / "echo_output.wasm", folder / "trap.wasm")
        await until(lambda: daemon.plugins.status["trap"].state == "loaded", "out of quarantine")
        (folder / "trap.yaml").write_text("version: 2.0.0\npriority: 7\n")
        await until(lambda: daemon.plugins.status["trap"].version == "2.0.0", "the manifest is applied")

    run_with(daemon, scenario)
    assert next(iter(daemon.plugins)).priority == 7
    # At once: the replacement was called on every tick from the swap that brought it in, backoff or not.
    replaced = next(tick for tick, live in swaps.changes if live.get("trap") == echo)
    stats = daemon.loop.plugin_stats["trap"]
    assert stats.errors == 2 and stats.calls - stats.errors == daemon.loop.ticks.count - replaced > 0


# --- SIGHUP: the config names another folder, or changes nothing about a plugin -----------------------

@pytest.fixture
def configured(run_daemon, write_config, tmp_path) -> Callable[..., Any]:
    """A daemon whose plugins folder comes from its config file (no --plugins), and a way to rewrite
    that file and reload it as SIGHUP does."""
    data = unsimulated(example_data())
    data["plugins"]["settings"] = {}

    def make(folder: Path, **plugins: Any) -> tuple[Any, Callable[..., Awaitable[None]]]:
        data["plugins"].update(directory=str(folder), **plugins)
        daemon = run_daemon(data, 0, clock=SystemClock())

        async def reload(**changes: Any) -> None:
            data["plugins"].update(changes)
            write_config(data)
            await daemon.reload()

        return daemon, reload

    return make


def folder_with(tmp_path: Path, name: str, *plugins: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for plugin in plugins:
        shutil.copy(plugin_wasm(plugin), folder / f"{plugin}.wasm")
    return folder


def test_sighup_moves_to_a_new_plugins_folder_and_watches_it_instead(configured, tmp_path, monkeypatch) -> None:
    first, second = folder_with(tmp_path, "a", "temperature_control"), folder_with(tmp_path, "b", "energy_saver")
    daemon, reload = configured(first)
    plugins = daemon.plugins
    swaps = swaps_of(daemon, monkeypatch)
    compiles = Held(daemon, "_load_plugins", monkeypatch)  # held until the loop has ticked on meanwhile

    async def scenario() -> None:
        with capture_logs() as logs:
            reloading = asyncio.create_task(reload(directory=str(second)))
            await compiles.past_ticks(daemon)  # the loop's thread is not the one compiling
            await reloading
            await until(lambda: set(daemon.plugins.status) == {"energy_saver"}, "the new folder's plugins run")
            await until(lambda: any(e["event"] == "plugins_watching" for e in logs), "the new folder is watched")
        shutil.copy(plugin_wasm("echo_output"), first / "stale.wasm")  # the old folder: no longer followed
        shutil.copy(plugin_wasm("motion_light"), second / "motion_light.wasm")
        await until(lambda: "motion_light" in daemon.plugins.status, "a file dropped in the new folder loads")
        await more_ticks(daemon, 3)  # time enough for the old folder's file, were it watched

    run_with(daemon, scenario)
    assert daemon.plugins is plugins and daemon.loop.plugins is plugins  # one set, reloaded in place
    assert set(daemon.plugins.status) == {"energy_saver", "motion_light"}
    # Swapped in between two ticks: every tick before called the old folder's plugin, every tick after the new.
    assert compiles.waits == [True], "the loop did not tick while the new folder's plugins compiled"
    (swapped,) = swaps
    stats = daemon.loop.plugin_stats
    assert stats["temperature_control"].calls == swapped > 2
    assert stats["energy_saver"].calls == daemon.loop.ticks.count - swapped > 3


def test_sighup_to_a_folder_that_does_not_exist_is_refused_and_keeps_everything(configured, tmp_path) -> None:
    daemon, reload = configured(folder_with(tmp_path, "a", "temperature_control"))

    async def scenario() -> None:
        with capture_logs() as logs:
            await reload(directory=str(tmp_path / "typo"), watch=True)
        (refused,) = [e for e in logs if e["event"] == "reload_refused"]
        assert refused["key"] == "plugins.directory" and "typo does not exist" in refused["problem"]

    run_with(daemon, scenario)
    assert set(daemon.plugins.status) == {"temperature_control"}
    assert daemon.plugins.directory == tmp_path / "a"


def test_sighup_keeps_a_quarantined_plugin_in_quarantine(configured, tmp_path, monkeypatch) -> None:
    daemon, reload = configured(folder_with(tmp_path, "a", "trap"), quarantine={"failures": 2, "backoff_s": 600})
    swaps = swaps_of(daemon, monkeypatch)

    async def scenario() -> None:
        await until(lambda: daemon.plugins.status["trap"].state == "quarantined", "quarantined")
        calls = daemon.loop.plugin_stats["trap"].calls
        with capture_logs() as logs:
            await reload(quarantine={"failures": 5, "backoff_s": 600})
            await until(lambda: any(e["event"] == "config_reloaded" for e in logs), "reloaded")
        await more_ticks(daemon, 3)  # in which a fresh guard would have called it
        assert daemon.plugins.status["trap"].state == "quarantined"
        assert daemon.loop.plugin_stats["trap"].calls == calls
        assert next(iter(daemon.plugins)).quarantine.settings.failures == 5  # the new settings from now on

    run_with(daemon, scenario)
    # Its two failures, before the reload; none on the ticks since, the new set's included.
    (swapped,) = swaps
    assert daemon.loop.plugin_stats["trap"].calls == 2 and daemon.loop.ticks.count >= swapped + 3


def test_sighup_can_turn_watching_off(configured, tmp_path) -> None:
    folder = folder_with(tmp_path, "a", "temperature_control")
    daemon, reload = configured(folder)

    async def scenario() -> None:
        await reload(watch=False)
        shutil.copy(plugin_wasm("energy_saver"), folder / "energy_saver.wasm")
        await more_ticks(daemon, 3)  # time enough to load it, were the folder watched

    run_with(daemon, scenario)
    assert set(daemon.plugins.status) == {"temperature_control"}


def test_sighup_reads_and_checks_the_config_off_the_loops_thread(configured, tmp_path, monkeypatch) -> None:
    """Reading the file and checking every module of the folder as check-config does (about 20 ms here, far more on
    a Pi; twice the checks when the file's loop differs from the running one) is done on a worker thread: the loop
    ticks on meanwhile, as it does while the plugins compile."""
    daemon, reload = configured(folder_with(tmp_path, "a", "temperature_control"))
    reading, checking = Held(config, "load", monkeypatch), Held(checks, "problems", monkeypatch)

    async def scenario() -> None:
        reloading = asyncio.create_task(reload())
        await reading.past_ticks(daemon)
        await checking.past_ticks(daemon)
        await reloading

    with capture_logs() as logs:
        run_with(daemon, scenario)
    assert reading.waits == [True] and checking.waits == [True], "the loop did not tick while the config was checked"
    assert any(e["event"] == "config_reloaded" for e in logs)


def test_a_reload_cut_short_by_a_stop_closes_the_plugins_it_prepared(configured, tmp_path, monkeypatch) -> None:
    first, second = folder_with(tmp_path, "a", "temperature_control"), folder_with(tmp_path, "b", "energy_saver")
    daemon, reload = configured(first)
    prepared: list[PluginSet] = []
    load, in_gap = daemon._load_plugins, daemon.loop.in_gap
    monkeypatch.setattr(daemon, "_load_plugins", lambda *args: prepared.append(load(*args)) or prepared[-1])
    waiting: list[object] = []

    async def waits_for_a_gap(work: Any, drop: Any) -> Any:
        waiting.append(work)
        return await in_gap(work, drop)

    monkeypatch.setattr(daemon.loop, "in_gap", waits_for_a_gap)

    async def scenario() -> None:  # nothing ticks: the swap waits for a gap that never comes
        task = asyncio.create_task(reload(directory=str(second)))
        await until(lambda: bool(prepared) and bool(waiting), "the new set is prepared and waits for a gap")
        assert len(prepared[0]) == 1
        task.cancel()  # what the stop at shut-down does to a reload in flight
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert len(prepared[0]) == 0, "the prepared plugins were left compiled and unclosed"
    assert set(daemon.plugins.status) == {"temperature_control"}  # the running set is untouched


def test_plugin_install_into_a_running_daemon_is_loaded_whole(live, tmp_path, monkeypatch) -> None:
    """`plugin install`: the hot reloader sees the new plugin, and later its new version, only whole."""
    daemon, folder = live
    swaps = PluginsLive(daemon, monkeypatch)
    work = tmp_path / "work"
    work.mkdir()
    for suffix in (".wasm", ".yaml"):
        shutil.copy(BUNDLED_PLUGINS / f"energy_saver{suffix}", work / f"energy_saver{suffix}")
    first = hashlib.sha256((work / "energy_saver.wasm").read_bytes()).hexdigest()
    counter = (TEST_PLUGINS / "counter.wasm").read_bytes()

    async def scenario() -> None:
        await asyncio.to_thread(install.install, work / "energy_saver.wasm", folder, daemon.settings)
        await until(lambda: sha(daemon, "energy_saver") == first, "the installed plugin is loaded")
        (work / "energy_saver.wasm").write_bytes(counter)  # a new version, without a manifest
        (work / "energy_saver.yaml").unlink()
        await asyncio.to_thread(install.install, work / "energy_saver.wasm", folder, daemon.settings)
        await until(lambda: sha(daemon, "energy_saver") == hashlib.sha256(counter).hexdigest(),
                    "the new version is swapped in")

    with capture_logs() as logs:
        run_with(daemon, scenario)
    events = [e["event"] for e in logs if e.get("plugin") == "energy_saver" and e["event"].startswith("plugin_")]
    assert events == ["plugin_loaded", "plugin_replaced"]  # each version swapped in once, as a whole pair
    assert not [e for e in logs if e["event"] in ("plugin_load_failed", "plugin_call_failed")]
    assert sorted(p.name for p in folder.iterdir()) == ["energy_saver.wasm", "temperature_control.wasm"]
    # Each version went live in one swap, between two ticks, and ran on every tick from then on.
    assert swaps.versions("energy_saver") == [None, first, hashlib.sha256(counter).hexdigest()]
    assert daemon.loop.plugin_stats["energy_saver"].calls == swaps.ticks_live("energy_saver") > 0
    assert daemon.loop.plugin_stats["temperature_control"].calls == daemon.loop.ticks.count


def test_a_swap_lists_the_plugins_folder_off_the_loops_thread(live, tmp_path, monkeypatch) -> None:
    """A plugin dropped in is swapped in, and the operator's kept values see the folder as listed for it; the
    folder may be on a hung or slow mount (NFS, a failing SD card), so the listing is done on the worker thread
    with the compile: held there, the loop ticks on."""
    daemon, folder = live
    listing = Held(plugin_folder, "modules", monkeypatch)
    counter = hashlib.sha256((TEST_PLUGINS / "counter.wasm").read_bytes()).hexdigest()

    async def scenario() -> None:
        shutil.copy(TEST_PLUGINS / "counter.wasm", tmp_path / "counter.wasm")
        os.rename(tmp_path / "counter.wasm", folder / "counter.wasm")
        await listing.past_ticks(daemon)
        await until(lambda: sha(daemon, "counter") == counter, "the dropped plugin swapped in")

    run_with(daemon, scenario)
    assert listing.waits and all(listing.waits), "the loop did not tick while the folder was listed"


def test_the_plugins_folder_back_is_listed_off_the_loops_thread(live, tmp_path, monkeypatch) -> None:
    """The folder moved away and back (a remount): the watcher lists it again to load what it holds, on the worker
    thread: held there, the loop ticks on."""
    daemon, folder = live
    listing: list[Held] = []

    async def scenario() -> None:
        folder.rename(tmp_path / "away")
        await until(lambda: not daemon.plugins.status, "the plugins of the folder gone unloaded")
        listing.append(Held(plugin_folder, "modules", monkeypatch))
        (tmp_path / "away").rename(folder)
        await listing[0].past_ticks(daemon)
        await until(lambda: "temperature_control" in {p.name for p in daemon.plugins}, "loaded again")

    run_with(daemon, scenario)
    assert listing[0].waits and all(listing[0].waits), "the loop did not tick while the folder was listed"


# What the watcher asks of the filesystem while the folder is gone and when it is back: the ancestor looked for, the
# folder's watch (inotify's add_watch looks the path up; held once the folder is gone, the watch it had taken
# first), the subfolders listed.
LOOKS = [(plugin_watch, "_nearest_existing", False), (Inotify, "add_watch", True), (plugin_watch, "_subfolders", False)]


@pytest.mark.parametrize(("owner", "method", "once_gone"), LOOKS, ids=[method for _, method, _ in LOOKS])
def test_the_plugins_folder_gone_and_back_is_looked_for_off_the_loops_thread(live, tmp_path, monkeypatch, owner,
                                                                            method, once_gone) -> None:
    """The folder moved away and back (a remount) while the watcher looks for it, the look held: it is on a worker
    thread, so the loop ticks on; once released, the folder is found and its plugins loaded again."""
    daemon, folder = live
    looks = [] if once_gone else [Held(owner, method, monkeypatch)]

    async def scenario() -> None:
        folder.rename(tmp_path / "away")
        await until(lambda: not daemon.plugins.status, "the plugins of the folder gone unloaded")
        if not looks:
            looks.append(Held(owner, method, monkeypatch))
        (tmp_path / "away").rename(folder)  # back while the look at its going may be held: the search looks again
        await looks[0].past_ticks(daemon)
        await until(lambda: "temperature_control" in {p.name for p in daemon.plugins}, "loaded again")

    run_with(daemon, scenario)
    assert looks[0].waits and all(looks[0].waits), "the loop did not tick while the folder was looked for"


def test_a_link_dropped_in_is_looked_at_off_the_loops_thread(live, tmp_path, monkeypatch) -> None:
    """A file created in the folder is a link (whole at once, loaded) or a file being written (waited for): which,
    the watcher asks the folder (lstat) on a worker thread, held there while the loop ticks on."""
    daemon, folder = live
    shutil.copy(TEST_PLUGINS / "counter.wasm", folder / "counter.module")  # no plugin's name: a link's target
    look = Held(Path, "is_symlink", monkeypatch)

    async def scenario() -> None:
        (folder / "counter.wasm").symlink_to("counter.module")
        await look.past_ticks(daemon)
        await until(lambda: "counter" in {p.name for p in daemon.plugins}, "the linked plugin loaded")

    run_with(daemon, scenario)
    assert look.waits and all(look.waits), "the loop did not tick while the link was looked at"


def test_a_reload_lists_the_plugins_folder_off_the_loops_thread(configured, tmp_path, monkeypatch) -> None:
    """The other way in: a SIGHUP reload's swap hands the kept values the folder as its worker listed it."""
    daemon, reload = configured(folder_with(tmp_path, "a", "temperature_control"))
    threads: list[int] = []
    modules = plugin_folder.modules

    def listed(folder: Path) -> frozenset[str]:
        threads.append(threading.get_ident())
        return modules(folder)

    monkeypatch.setattr(plugin_folder, "modules", listed)

    async def scenario() -> None:
        await reload()
        assert threads and threading.get_ident() not in threads, "the folder was listed on the loop's thread"

    with capture_logs() as logs:
        run_with(daemon, scenario)
    assert any(e["event"] == "config_reloaded" for e in logs)


def checked_beside_then_reloaded(write_config, tmp_path: Path, folder: Path, settings: dict[str, Any],
                                 motion_ms: list[int]) -> list[tuple[subprocess.CompletedProcess[str], Any]]:
    """A daemon at 10 Hz (`settings`: the plugins' own), then for each of motion_light's `motion_ms` the same file at
    5 Hz, checked as the unit's ExecReload= checks it beside the running daemon, then reloaded: both verdicts."""
    data = unsimulated(example_data())
    data["plugins"] = {"directory": str(folder), "settings": settings}
    state = tmp_path / "state"
    daemon = Daemon(config.load(write_config(data)), simulate=True, state_dir=state, clock=SystemClock())
    results = []

    async def scenario() -> None:
        for timeout_ms in motion_ms:
            data["loop"] = {"rate_hz": 5, "plugin_budget": 0.6}
            data["plugins"]["settings"]["motion_light"]["timeout_ms"] = timeout_ms
            path = write_config(data)
            checked = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "pi_controller", "check-config", str(path)], capture_output=True,
                text=True, timeout=120, env={**os.environ, "STATE_DIRECTORY": str(state)})
            results.append((checked, await daemon.reload()))

    try:
        run_with(daemon, scenario)
    finally:
        daemon.close()
    return results


def test_check_config_beside_a_running_daemon_says_what_its_reload_does_with_a_slower_loop(tmp_path, write_config
                                                                                          ) -> None:
    """The loop's rate changes at a restart, not a reload: the plugins a reload loads get the running rate's budget.
    The same file, at half the running rate, checked as the unit's ExecReload= does beside the running daemon, then
    reloaded: plugins that fit only the file's own budget are refused by both, for the same reason; plugins that fit
    the running budget too are accepted by both."""
    folder = folder_with(tmp_path, "a", "temperature_control", "motion_light")
    # 100 ms of plugins, then 55: over the running 60 ms budget (10 Hz), within 5 Hz's 120; then within both
    (refused_check, refused), (accepted_check, applied) = checked_beside_then_reloaded(
        write_config, tmp_path, folder, {"temperature_control": {"timeout_ms": 50}, "motion_light": {"timeout_ms": 5}},
        [50, 5])
    assert refused.outcome == "refused", refused.message
    assert refused_check.returncode == 2, refused_check.stderr
    assert refused.message.removeprefix("reload refused, running config kept: ") in refused_check.stderr
    assert "10 Hz" in refused.message  # the budget it was judged against, and where it comes from
    assert applied.outcome == "applied", applied.message
    assert accepted_check.returncode == 0, accepted_check.stderr
    assert "restart" in accepted_check.stderr  # the rate itself waits for one


def test_check_config_beside_a_running_daemon_judges_the_timeouts_of_plugins_without_a_module_as_its_reload(
        tmp_path, write_config) -> None:
    """The config's own timeouts fit the running loop's budget, whether or not each plugin's module is there yet
    (found by the daemon machine: a plugin named with no file, at half the running rate). check-config beside the
    running daemon and its reload refuse the file alike, for the same reason."""
    folder = folder_with(tmp_path, "a", "motion_light")  # temperature_control named, its module not there
    [(checked, reloaded)] = checked_beside_then_reloaded(  # 50 + 50 ms set: over the running 60 ms budget
        write_config, tmp_path, folder, {"temperature_control": {"timeout_ms": 50}, "motion_light": {"timeout_ms": 5}},
        [50])
    assert reloaded.outcome == "refused", reloaded.message
    assert checked.returncode == 2, checked.stderr
    assert reloaded.message.removeprefix("reload refused, running config kept: ") in checked.stderr
    assert "add up to 100.0 ms" in checked.stderr and "10 Hz" in checked.stderr


def test_the_running_loop_a_stopped_daemon_left_says_no_daemon_runs(tmp_path) -> None:
    """check-config after a stop or a crash judges the file alone: the next start runs its loop."""
    known_good.keep_running_loop(config.LoopSettings(rate_hz=5), tmp_path)  # this process: running
    assert known_good.running_loop(tmp_path) == config.LoopSettings(rate_hz=5)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True, timeout=60)
    said = json.loads((tmp_path / known_good.RUNNING_LOOP).read_text())
    (tmp_path / known_good.RUNNING_LOOP).write_text(json.dumps({**said, "pid": int(ended.stdout)}))
    assert known_good.running_loop(tmp_path) is None


def test_the_running_loop_of_a_daemon_whose_pid_another_program_took_since_says_no_daemon_runs(tmp_path) -> None:
    """The daemon died (a crash, SIGKILL: nothing removed its file) and its pid went to another program, alive: that
    process is no daemon of this state directory, and check-config judges the file alone."""
    known_good.keep_running_loop(config.LoopSettings(rate_hz=5), tmp_path)  # this process, as the daemon
    said = json.loads((tmp_path / known_good.RUNNING_LOOP).read_text())
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:  # an older process's file, the pid now this one's (its start time, a later one)
        (tmp_path / known_good.RUNNING_LOOP).write_text(json.dumps({**said, "pid": other.pid}))
        assert known_good.running_loop(tmp_path) is None
    finally:
        other.communicate(b"", timeout=60)


@pytest.mark.parametrize("rate_hz", [0, -1, 1e9, float("nan")])
def test_a_running_loop_out_of_the_configs_bounds_is_no_loop_and_no_traceback(tmp_path, rate_hz) -> None:
    """The file is read, not trusted: a rate no config may give (0 divides by zero in its period) is no daemon's."""
    known_good.keep_running_loop(config.LoopSettings(rate_hz=5), tmp_path)
    said = json.loads((tmp_path / known_good.RUNNING_LOOP).read_text())
    (tmp_path / known_good.RUNNING_LOOP).write_text(json.dumps({**said, "rate_hz": rate_hz}))
    assert known_good.running_loop(tmp_path) is None


def test_a_reload_stopped_while_it_compiles_closes_what_it_compiled(configured, tmp_path, monkeypatch) -> None:
    first, second = folder_with(tmp_path, "a", "temperature_control"), folder_with(tmp_path, "b", "energy_saver")
    daemon, reload = configured(first)
    prepared: list[PluginSet] = []
    compiling, stopped = threading.Event(), threading.Event()
    load = daemon._load_plugins

    def slow_load(*args: Any) -> PluginSet:  # the stop comes while the new set compiles
        compiling.set()
        stopped.wait(timeout=60)
        prepared.append(load(*args))
        return prepared[-1]

    monkeypatch.setattr(daemon, "_load_plugins", slow_load)

    async def scenario() -> None:
        task = asyncio.create_task(reload(directory=str(second)))
        await until(compiling.is_set, "the reload compiles")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stopped.set()
        await until(lambda: bool(prepared) and len(prepared[0]) == 0, "what it compiled is closed once compiled")

    asyncio.run(scenario())
    assert set(daemon.plugins.status) == {"temperature_control"}  # the running set is untouched


def ready(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def remove_and_copy_back(folder: Path, backup: Path) -> None:  # rm -rf plugins && cp -r backup plugins
    shutil.rmtree(folder)
    shutil.copytree(backup, folder)


def move_away_and_back(folder: Path, backup: Path) -> None:  # mv plugins plugins.old, then back
    folder.rename(folder.with_name("plugins.old"))
    folder.with_name("plugins.old").rename(folder)


def parent_too(folder: Path, backup: Path) -> None:  # the folder above it deleted, then both made again
    shutil.rmtree(folder.parent)
    folder.parent.mkdir()
    shutil.copytree(backup, folder)


@pytest.mark.parametrize("how", [remove_and_copy_back, move_away_and_back, parent_too])
def test_the_plugins_folder_deleted_or_moved_and_back_is_followed(run_daemon, tmp_path, how, monkeypatch) -> None:
    folder, backup = tmp_path / "site" / "plugins", tmp_path / "backup"
    backup.mkdir()
    for name in ("temperature_control", "energy_saver", "motion_light"):
        shutil.copy(plugin_wasm(name), backup / f"{name}.wasm")
        shutil.copy(plugin_wasm(name).with_suffix(".yaml"), backup / f"{name}.yaml")
    shutil.copytree(backup, folder)
    data = unsimulated(example_data())
    data["metrics"] = {"enabled": True, "port": free_port()}
    daemon = run_daemon(data, 0, plugins=folder, clock=SystemClock())
    port = data["metrics"]["port"]
    swaps = PluginsLive(daemon, monkeypatch)
    answers = []

    async def scenario() -> None:
        await until(lambda: ready(port)[0] == 200, "ready")
        if how is move_away_and_back:  # as slow as a person: the folder stays away while we look
            folder.rename(folder.with_name("plugins.old"))
        else:
            shutil.rmtree(folder.parent if how is parent_too else folder)
        await until(lambda: len(daemon.plugins) == 0, "every plugin unloaded")
        answers.append(await asyncio.to_thread(ready, port))
        if how is move_away_and_back:
            folder.with_name("plugins.old").rename(folder)
        else:
            if how is parent_too:
                folder.parent.mkdir()
            shutil.copytree(backup, folder)
        await until(lambda: len(daemon.plugins) == 3, "every plugin loaded again")
        await until(lambda: ready(port)[0] == 200, "ready again")

    with capture_logs() as logs:
        run_with(daemon, scenario)
    assert answers == [(503, "not ready: 0 of 3 plugins loaded; missing: energy_saver, motion_light, "
                             "temperature_control\n")]
    events = [e["event"] for e in logs if e["event"].startswith("plugins_folder_")]
    assert events == ["plugins_folder_gone", "plugins_folder_back"]
    assert not [e for e in logs if e["event"] == "plugin_load_failed"]
    # Unloaded while the folder was away, loaded again once back: each called on every tick it was live.
    for name, stats in daemon.loop.plugin_stats.items():
        (shown, gone, back) = swaps.versions(name)
        assert shown == back is not None and gone is None, (name, swaps.changes)
        assert stats.calls == swaps.ticks_live(name) < daemon.loop.ticks.count, name
