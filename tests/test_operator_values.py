"""Operator values kept across restarts: the file-edit rule, a schema that changed, a bad file."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from structlog.testing import capture_logs

from pi_controller import config, operator_values
from pi_controller.config import PluginSettings, PluginsSettings
from pi_controller.daemon import Daemon
from pi_controller.operator import EnablePlugin, Operator, SetPluginConfig
from pi_controller.operator_values import FILE_NAME, SETTLE_S, OperatorValues
from pi_controller.plugins import folder as plugin_folder
from pi_controller.plugins.plugin_config import ConfigField
from pi_controller.plugins.sandbox import SandboxedPlugin
from tests.conftest import BUNDLED_PLUGINS, WAIT_S, example_data, until
from tests.test_mqtt import poll


class FakePlugin(SimpleNamespace):
    """What the operator and the kept values touch of a plugin: its name, grant and config."""

    set_config = SandboxedPlugin.set_config


def thermostat(setpoint: float = 21.0, maximum: float = 30.0) -> FakePlugin:
    schema = {"setpoint": ConfigField("number", min=5, max=maximum)}
    made = FakePlugin(name="thermostat", grant=SimpleNamespace(config={"setpoint": setpoint}, config_schema=schema),
                      sha256=f"thermostat-{maximum}")
    made.set_config({})
    return made


def restart(state: Path, plugin: FakePlugin, settings: PluginsSettings | None = None) -> set[str]:
    """A new process: the kept values read and applied to `plugin` as loaded; the plugins switched off."""
    disabled: set[str] = set()
    values = OperatorValues(state)
    values.apply([plugin], settings or PluginsSettings(), disabled)
    values.close()  # and a stop
    return disabled


def holding(tmp: Path, *names: str) -> Path:
    """A plugins folder holding modules of `names` (missing without any), as the kept values list it."""
    folder = tmp / "-".join(("plugins", *names))
    for name in names:
        folder.mkdir(exist_ok=True)
        (folder / f"{name}.wasm").touch()
    return folder


class Clock:
    """The loop's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def after(self, values: OperatorValues, seconds: float) -> None:
        """`seconds` later, a tick done; and the next, once the listing it started (a minute up) is done."""
        self.now += seconds
        values.tick_done(None)  # type: ignore[arg-type]  # it reads no report
        listing = values._relisting
        if listing is not None:
            assert listing.done.wait(WAIT_S)
            values.tick_done(None)  # type: ignore[arg-type]


def set_values(state: Path, plugin: FakePlugin, *requests: Any) -> None:
    values = OperatorValues(state)
    operator = Operator(expiry_s=10, values=values)
    for request in requests:
        operator.submit(request)
    operator.commands({}, [plugin], now=0.0, tick=0)
    values.tick_done(None)  # type: ignore[arg-type]  # it reads no report
    poll(values.written, "the values written (on a thread of their own)")


def test_a_value_set_is_in_force_after_a_restart_until_the_file_changes_it(tmp_path: Path) -> None:
    set_values(tmp_path, thermostat(), SetPluginConfig("thermostat", "setpoint", 19.5),
               EnablePlugin("thermostat", False))
    restarted = thermostat()
    assert restart(tmp_path, restarted) == {"thermostat"} and restarted.config == {"setpoint": 19.5}
    edited = thermostat(setpoint=20.0)  # the owner edited the file since: the file's latest word wins
    with capture_logs() as logs:
        assert restart(tmp_path, edited) == {"thermostat"}  # what the file did not change stays
    assert edited.config == {"setpoint": 20.0}
    assert [(e["key"], e["reason"]) for e in logs if e["event"] == "operator_value_forgotten"] == [
        ("setpoint", "the config file changed it since")]
    again = thermostat(setpoint=21.0)  # and it is forgotten for good, even with the file back as it was
    restart(tmp_path, again)
    assert again.config == {"setpoint": 21.0}
    assert json.loads((tmp_path / FILE_NAME).read_text())["config"] == {}  # nothing left of it


def test_a_config_key_called_enabled_is_no_switch(tmp_path: Path) -> None:
    """A plugin may have a config key called `enabled`: its operator value, changed in the file since, is forgotten
    as any other key, and the operator's switch of the plugin, kept apart, stays (it was the switch that went, the
    value staying in force; with no switch kept, the start raised KeyError)."""
    def lamp(enabled: bool) -> FakePlugin:
        made = FakePlugin(name="lamp", grant=SimpleNamespace(config={"enabled": enabled},
                                                              config_schema={"enabled": ConfigField("boolean")}),
                          sha256="lamp")
        made.set_config({})
        return made

    set_values(tmp_path, lamp(False), SetPluginConfig("lamp", "enabled", True), EnablePlugin("lamp", False))
    edited = lamp(True)  # the file's default changed since
    with capture_logs() as logs:
        assert restart(tmp_path, edited) == {"lamp"}
    assert edited.config == {"enabled": True}
    assert [(e["key"], e["reason"]) for e in logs if e["event"] == "operator_value_forgotten"] == [
        ("enabled", "the config file changed it since")]
    assert json.loads((tmp_path / FILE_NAME).read_text()) == {"config": {}, "enabled": {
        "lamp": {"value": False, "file": True}}}


def test_disabling_in_the_file_replaces_the_operators_switch(tmp_path: Path) -> None:
    set_values(tmp_path, thermostat(), EnablePlugin("thermostat", False))
    off_in_file = PluginsSettings(settings={"thermostat": PluginSettings(enabled=False)})
    restart(tmp_path, thermostat(), off_in_file)
    assert restart(tmp_path, thermostat()) == set()  # on in the file again: the file's word


def test_a_value_a_new_version_refuses_is_set_aside_and_in_force_again_for_a_version_that_takes_it(
        tmp_path: Path) -> None:
    """A new version tried (a fleet rollout rolled back, a version installed by hand and then undone) does not
    cost the operator's value: set aside while it runs, in force again once the old version is back."""
    set_values(tmp_path, thermostat(), SetPluginConfig("thermostat", "setpoint", 28.0))
    narrower = thermostat(maximum=25.0)
    keyless = FakePlugin(name="thermostat", grant=SimpleNamespace(config={}, config_schema=None), sha256="keyless")
    keyless.set_config({})
    with capture_logs() as logs:
        restart(tmp_path, narrower)
        restart(tmp_path, keyless)
    assert narrower.config == {"setpoint": 21.0} and keyless.config == {}
    assert [e["reason"][:23] for e in logs if e["event"] == "operator_value_set_aside"] == [
        "this version refuses it", "this version has no suc"]
    assert [e for e in logs if e["event"] == "operator_value_forgotten"] == []
    back = thermostat()
    restart(tmp_path, back)
    assert back.config == {"setpoint": 28.0}


def test_a_value_set_aside_is_said_once_for_a_version_not_at_every_swap(tmp_path: Path) -> None:
    """`apply` runs after every reload and swap of any plugin: the value set aside for this version is news once."""
    set_values(tmp_path, thermostat(), SetPluginConfig("thermostat", "setpoint", 28.0))
    values, narrower = OperatorValues(tmp_path), thermostat(maximum=25.0)
    with capture_logs() as logs:
        for _ in range(3):
            values.apply([narrower], PluginsSettings(), set())
        values.apply([thermostat(maximum=26.0)], PluginsSettings(), set())  # another version: news again
    assert [e["event"] for e in logs].count("operator_value_set_aside") == 2
    values.close()


def test_an_unreadable_file_is_logged_and_the_config_file_rules(tmp_path: Path) -> None:
    for text in ("{not json", '{"config": {"thermostat": {"setpoint": 3}}, "enabled": {}}', "[]", "x" * 300_000):
        (tmp_path / FILE_NAME).write_text(text)
        plugin = thermostat()
        with capture_logs() as logs:
            assert restart(tmp_path, plugin) == set()
        assert plugin.config == {"setpoint": 21.0}
        assert [e["event"] for e in logs] == ["operator_values_unreadable"]


def test_a_fifo_where_the_values_are_kept_is_logged_not_waited_on(tmp_path: Path) -> None:
    """Read at start-up, in Daemon.__init__: the open of a FIFO nothing writes to waited for good (no tick)."""
    os.mkfifo(tmp_path / FILE_NAME)
    plugin, disabled = thermostat(), []
    thread = threading.Thread(target=lambda: disabled.append(restart(tmp_path, plugin)), daemon=True)
    with capture_logs() as logs:
        thread.start()
        thread.join(timeout=60)
    if thread.is_alive():  # a writer's open and close: the end of the file, and it returns
        os.close(os.open(tmp_path / FILE_NAME, os.O_WRONLY | os.O_NONBLOCK))
    assert not thread.is_alive(), "the values' load waited on the FIFO for a writer"
    assert disabled == [set()] and plugin.config == {"setpoint": 21.0}
    assert [(e["event"], e["error"]) for e in logs] == [("operator_values_unreadable", "is not a regular file")]


def test_without_a_state_directory_nothing_is_written(tmp_path: Path) -> None:
    plugin = thermostat()
    values = OperatorValues(None)
    Operator(expiry_s=10, values=values).submit(SetPluginConfig("thermostat", "setpoint", 19.5))
    values.tick_done(None)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == [] and plugin.config == {"setpoint": 21.0}


def test_the_file_is_written_off_the_loop_one_write_at_a_time_and_the_last_value_wins(tmp_path: Path,
                                                                                       monkeypatch) -> None:
    """An fsync took up to 120 ms here (longer on an SD card): the tick that took a value up does not
    wait for it, and `written` says when it is on disk (telemetry shows the value only then)."""
    release, real = threading.Event(), operator_values.write_atomically

    def slow(path: Path, data: bytes) -> None:
        release.wait()
        real(path, data)

    monkeypatch.setattr(operator_values, "write_atomically", slow)
    plugin = thermostat()
    values = OperatorValues(tmp_path)
    operator = Operator(expiry_s=10, values=values)
    for tick, setpoint in enumerate((19.5, 20.5)):
        operator.submit(SetPluginConfig("thermostat", "setpoint", setpoint))
        operator.commands({}, [plugin], now=0.0, tick=tick)
        values.tick_done(None)  # type: ignore[arg-type]  # returns with the write held up
        assert not values.written() and not (tmp_path / FILE_NAME).exists()
    release.set()

    def ticked_and_written() -> bool:
        values.tick_done(None)  # type: ignore[arg-type]
        return values.written()

    poll(ticked_and_written, "both written, one after the other")
    assert json.loads((tmp_path / FILE_NAME).read_text())["config"]["thermostat"]["setpoint"]["value"] == 20.5


def test_the_values_of_a_plugin_gone_from_the_folder_are_forgotten_unless_the_config_names_it(tmp_path: Path) -> None:
    """Gone from the folder (once it held still), the plugin's values go, the one set aside with them (nothing else
    would drop them, in the file or in memory); kept while the config still names it, or while the folder is not
    known, missing or empty."""
    set_values(tmp_path, thermostat(), SetPluginConfig("thermostat", "setpoint", 28.0),
               EnablePlugin("thermostat", False))
    clock = Clock()
    values = OperatorValues(tmp_path, clock)
    values.apply([thermostat(maximum=25.0)], PluginsSettings(), set(), holding(tmp_path, "thermostat"))  # set aside
    assert list(values._aside) == [("thermostat", "setpoint")]
    for settings, folder in ((PluginsSettings(required=("thermostat",)), holding(tmp_path, "another")),
                             (PluginsSettings(), holding(tmp_path)), (PluginsSettings(), None)):
        values.apply([], settings, set(), folder)
        clock.after(values, SETTLE_S)
        assert values.config == {"thermostat": {"setpoint": {"value": 28.0, "file": 21.0}}}
    with capture_logs() as logs:
        values.apply([], PluginsSettings(), set(), holding(tmp_path, "another"))
        clock.after(values, SETTLE_S)
    values.close()
    assert sorted((e["key"], e["reason"]) for e in logs if e["event"] == "operator_value_forgotten") == [
        ("enabled", "the plugin left the plugins folder"), ("setpoint", "the plugin left the plugins folder")]
    assert json.loads((tmp_path / FILE_NAME).read_text()) == {"config": {}, "enabled": {}}
    assert values._aside == {}


def test_a_default_a_new_manifest_adds_is_no_edit_of_the_operators_value(tmp_path: Path) -> None:
    """The operator set the setpoint while the file gave it no default; a new version's manifest then gives one.
    That default is for whoever set nothing, not the owner's word on the key: the operator's value stays in force,
    and the default is what the file says from then on (changed later, it is an edit). A value the config file
    gives the key is the owner's word, and replaces the operator's."""
    schema = {"setpoint": ConfigField("number", min=5, max=30)}
    bare = FakePlugin(name="thermostat", grant=SimpleNamespace(config={}, config_schema=schema), sha256="bare")
    bare.set_config({})
    set_values(tmp_path, bare, SetPluginConfig("thermostat", "setpoint", 19.5))
    with capture_logs() as logs:
        defaulted = thermostat(setpoint=21.0)
        restart(tmp_path, defaulted)
        assert defaulted.config == {"setpoint": 19.5}
        again = thermostat(setpoint=21.0)
        restart(tmp_path, again)
        assert again.config == {"setpoint": 19.5}
    assert [e for e in logs if e["event"] == "operator_value_forgotten"] == []
    edited = thermostat(setpoint=22.0)  # the default the operator's value stood beside, changed: the owner's edit
    restart(tmp_path, edited)
    assert edited.config == {"setpoint": 22.0}

    set_values(tmp_path, bare, SetPluginConfig("thermostat", "setpoint", 19.5))
    in_config_file = PluginsSettings(settings={"thermostat": PluginSettings(config={"setpoint": 21.0})})
    given = thermostat(setpoint=21.0)
    restart(tmp_path, given, in_config_file)
    assert given.config == {"setpoint": 21.0}


def test_a_forgotten_switch_no_longer_holds_its_plugin_off(tmp_path: Path) -> None:
    """Forgotten, with its plugin gone from the folder or by an edit of the file, the operator's switch leaves the
    `disabled` set the tick filters by: put back, or enabled in the file again, the plugin runs in this process as
    it would after a restart."""
    off_in_file = PluginsSettings(settings={"thermostat": PluginSettings(enabled=False)})
    for settings, present in ((PluginsSettings(), "another"), (off_in_file, "thermostat")):
        set_values(tmp_path, thermostat(), EnablePlugin("thermostat", False))
        clock = Clock()
        values, disabled = OperatorValues(tmp_path, clock), set[str]()
        values.apply([thermostat()], PluginsSettings(), disabled, holding(tmp_path, "thermostat"))
        assert disabled == {"thermostat"}
        values.apply([], settings, disabled, holding(tmp_path, present))  # removed, or enabled: false in the file
        clock.after(values, SETTLE_S)
        assert values.enabled == {}
        values.apply([thermostat()], PluginsSettings(), disabled, holding(tmp_path, "thermostat"))  # back, or on
        values.close()
        assert disabled == set()


def test_a_plugin_gone_is_forgotten_only_once_the_folder_has_held_still(tmp_path: Path) -> None:
    """A redeploy (`rm -rf plugins/*`, then a copy) listed halfway, at each plugin swap: the thermostat gone with
    another plugin still there, the folder empty, then copied back a plugin at a time. Nothing is forgotten while the
    folder changes, and the thermostat, back, has its value and stays switched off. Removed for good, from a folder
    that then holds still for SETTLE_S on the loop's clock, it is the owner's word: its values go, and put back
    later it runs on the file's."""
    set_values(tmp_path, thermostat(), SetPluginConfig("thermostat", "setpoint", 28.0),
               EnablePlugin("thermostat", False))
    clock, disabled = Clock(), set[str]()
    values = OperatorValues(tmp_path, clock)
    values.apply([thermostat()], PluginsSettings(), disabled, holding(tmp_path, "another", "thermostat"))
    for listed in (("another",), (), ("lamp",), ("another", "lamp")):
        clock.after(values, SETTLE_S - 1)
        values.apply([], PluginsSettings(), disabled, holding(tmp_path, *listed))
    clock.after(values, SETTLE_S - 1)
    back = thermostat()
    values.apply([back], PluginsSettings(), disabled, holding(tmp_path, "another", "lamp", "thermostat"))
    assert back.config == {"setpoint": 28.0} and disabled == {"thermostat"}
    values.apply([], PluginsSettings(), disabled, holding(tmp_path, "another", "lamp"))  # removed for good
    clock.after(values, SETTLE_S - 1)
    assert "thermostat" in values.config
    with capture_logs() as logs:
        clock.after(values, 1)
    assert sorted(e["key"] for e in logs if e["event"] == "operator_value_forgotten") == ["enabled", "setpoint"]
    again = thermostat()
    values.apply([again], PluginsSettings(), disabled, holding(tmp_path, "another", "lamp", "thermostat"))
    values.close()
    assert again.config == {"setpoint": 21.0} and disabled == set()
    assert json.loads((tmp_path / FILE_NAME).read_text()) == {"config": {}, "enabled": {}}


def test_a_plugin_back_in_the_folder_when_the_minute_is_up_is_not_forgotten_though_no_swap_listed_it(
        tmp_path: Path) -> None:
    """The folder is listed at each swap, but one may not come: plugins.watch off, or the reload that would bring the
    thermostat back refused for a typo. Its module put back within the minute, the folder as it is when the minute
    is up decides: its value stays."""
    set_values(tmp_path, thermostat(), SetPluginConfig("thermostat", "setpoint", 28.0))
    clock, folder = Clock(), holding(tmp_path, "another", "thermostat")
    values = OperatorValues(tmp_path, clock)
    values.apply([thermostat()], PluginsSettings(), set(), folder)
    (folder / "thermostat.wasm").rename(tmp_path / "thermostat.wasm")
    values.apply([], PluginsSettings(), set(), folder)  # a reload, the thermostat gone
    clock.after(values, 1)
    (tmp_path / "thermostat.wasm").rename(folder / "thermostat.wasm")  # back; nothing applied since
    clock.after(values, SETTLE_S)
    values.close()
    assert json.loads((tmp_path / FILE_NAME).read_text())["config"]["thermostat"]["setpoint"]["value"] == 28.0


def test_a_module_removed_since_the_last_swap_keeps_its_running_plugins_values_when_the_minute_is_up(
        tmp_path: Path) -> None:
    """With plugins.watch off, a plugin whose module is removed runs on until a reload. The listing taken when
    another plugin's minute is up (it was gone at the last swap) forgets that one, not the one still running: its
    values wait for the swap that finds it gone, as they would with no other plugin gone."""
    lamp = FakePlugin(name="lamp", grant=SimpleNamespace(config={"duty": 30},
                                                         config_schema={"duty": ConfigField("number", min=0, max=100)}),
                      sha256="lamp")
    lamp.set_config({})
    set_values(tmp_path, lamp, SetPluginConfig("lamp", "duty", 60))
    set_values(tmp_path, thermostat(), SetPluginConfig("thermostat", "setpoint", 28.0))
    clock, folder = Clock(), holding(tmp_path, "another", "thermostat")  # the lamp gone
    values = OperatorValues(tmp_path, clock)
    values.apply([thermostat()], PluginsSettings(), set(), folder)
    (folder / "thermostat.wasm").unlink()  # no swap follows: the thermostat runs on
    clock.after(values, SETTLE_S)
    clock.after(values, SETTLE_S)
    values.close()
    kept = json.loads((tmp_path / FILE_NAME).read_text())["config"]
    assert "lamp" not in kept  # the minute was up
    assert kept["thermostat"]["setpoint"]["value"] == 28.0


def test_the_folder_listed_again_when_the_minute_is_up_is_listed_off_the_tick(tmp_path: Path, monkeypatch) -> None:
    """The listing a minute up makes (`tick_done`) runs on a thread of its own: held there (a hung mount), ticks go on
    and nothing is forgotten; done, the next tick takes it."""
    set_values(tmp_path, thermostat(), SetPluginConfig("thermostat", "setpoint", 28.0))
    clock = Clock()
    values = OperatorValues(tmp_path, clock)
    values.apply([], PluginsSettings(), set(), holding(tmp_path, "another"))  # the thermostat gone
    modules, entered, release, waits = plugin_folder.modules, threading.Event(), threading.Event(), []

    def held(folder: Path) -> frozenset[str]:
        entered.set()
        waits.append(release.wait(WAIT_S))
        return modules(folder)

    monkeypatch.setattr(plugin_folder, "modules", held)
    clock.now += SETTLE_S
    for _ in range(3):
        values.tick_done(None)  # type: ignore[arg-type]  # it reads no report
    assert entered.wait(WAIT_S) and "thermostat" in values.config
    release.set()
    poll(lambda: values.tick_done(None) or "thermostat" not in values.config,  # type: ignore[func-returns-value]
         "the listing taken")
    values.close()
    assert waits == [True], "the tick waited for the listing"


def test_a_listing_stuck_on_a_hung_mount_is_waited_for_not_started_again(tmp_path: Path, monkeypatch) -> None:
    """The minute's listing held (a hung mount) across a swap that lists the folder itself and more minutes: no
    second listing thread starts while the first hangs, and the stuck one, older than the swap's, is not taken."""
    set_values(tmp_path, thermostat(), SetPluginConfig("thermostat", "setpoint", 28.0))
    clock = Clock()
    values = OperatorValues(tmp_path, clock)
    folder = holding(tmp_path, "another")
    values.apply([], PluginsSettings(), set(), folder)  # the thermostat gone
    release, calls = threading.Event(), []

    def held(listed: Path) -> frozenset[str]:
        calls.append(listed)
        release.wait(WAIT_S)
        return frozenset({"thermostat"})  # what the folder held when the listing began

    monkeypatch.setattr(plugin_folder, "modules", held)
    clock.now += SETTLE_S
    values.tick_done(None)  # type: ignore[arg-type]  # it reads no report
    poll(lambda: calls, "the minute's listing begun")
    swap = frozenset({"another", "third"})
    values.apply([], PluginsSettings(), set(), folder, swap)  # a swap, listed off the loop: the minute starts again
    for _ in range(3):
        clock.now += SETTLE_S
        values.tick_done(None)  # type: ignore[arg-type]
    assert len(calls) == 1, "a second listing started while the first hung"
    release.set()
    poll(lambda: values.tick_done(None) or values._relisting is None,  # type: ignore[func-returns-value]
         "the stuck listing ended")
    assert values._listed == swap, "the swap's listing stands, not the stuck one's"
    values.close()


def test_a_plugins_folder_briefly_missing_forgets_nothing_a_plugin_removed_from_it_is(write_config, tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """A redeploy (`rm -rf plugins && cp -r new plugins`) whose copy lands after the watcher's scan saw the folder
    gone and before the gap that unloads the plugin: the folder is judged as listed in the gap, and a folder missing
    says nothing. A plugin's file removed from a folder that holds others is the owner's word (here at once: the
    folder's settle is tested on the loop's clock, above)."""
    monkeypatch.setattr(operator_values, "SETTLE_S", 0.0)
    folder, saved = tmp_path / "plugins", tmp_path / "saved"
    saved.mkdir()
    for name in ("temperature_control", "motion_light"):
        for suffix in (".wasm", ".yaml"):
            shutil.copy(BUNDLED_PLUGINS / f"{name}{suffix}", saved)
    shutil.copytree(saved, folder)
    data = example_data()
    data["plugins"] = {"directory": str(folder), "watch": True}
    daemon = Daemon(config.load(write_config(data)), simulate=True, state_dir=tmp_path / "state")
    prepare, copied = daemon.plugins.prepare, []

    def racing(names: Any) -> Any:
        update = prepare(names)
        if "temperature_control" in update.removed and not folder.exists():
            shutil.copytree(saved, folder)
            copied.append(True)
        return update

    daemon.plugins.prepare = racing  # type: ignore[method-assign]

    def setpoint() -> object:
        plugin = daemon.plugins.named("temperature_control")
        return None if plugin is None else plugin.config.get("setpoint")

    async def main() -> None:
        serving = asyncio.create_task(daemon.serve())
        try:
            await until(lambda: daemon.loop.ticks.count > 2, "the loop runs")
            daemon.operator.submit(SetPluginConfig("temperature_control", "setpoint", 27.5))
            await until(lambda: setpoint() == 27.5, "the operator's value taken up")
            shutil.rmtree(folder)
            await until(lambda: bool(copied), "the removal seen, the folder copied back")
            await until(lambda: daemon.plugins.named("temperature_control") is None, "the removal applied")
            await until(lambda: setpoint() == 27.5 and daemon.values.written(), "loaded again, its value with it")
            for suffix in (".wasm", ".yaml"):
                (folder / f"temperature_control{suffix}").unlink()
            await until(lambda: "temperature_control" not in daemon.values.config, "the removed plugin's values")
        finally:
            signal.raise_signal(signal.SIGINT)
            await serving

    try:
        asyncio.run(main())
    finally:
        daemon.close()


def test_an_empty_plugins_folder_at_a_start_forgets_nothing(write_config, tmp_path: Path) -> None:
    """A card not mounted yet leaves its mount point, an empty folder, where the plugins folder is: no owner
    removing every plugin."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    for suffix in (".wasm", ".yaml"):
        shutil.copy(BUNDLED_PLUGINS / f"temperature_control{suffix}", folder)
    data = example_data()
    data["plugins"] = {"directory": str(folder), "watch": False}
    settings = config.load(write_config(data))
    daemon = Daemon(settings, simulate=True, state_dir=tmp_path / "state")
    daemon.operator.submit(SetPluginConfig("temperature_control", "setpoint", 27.5))
    asyncio.run(daemon.serve(3))
    daemon.close()
    assert daemon.values.config["temperature_control"]["setpoint"]["value"] == 27.5
    for path in folder.iterdir():  # the card unmounted
        path.unlink()
    daemon = Daemon(settings, simulate=True, state_dir=tmp_path / "state")
    daemon.close()
    assert daemon.values.config["temperature_control"]["setpoint"]["value"] == 27.5
