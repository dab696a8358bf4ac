"""What counts as a plugin of a folder, as each part that lists one sees it: the load (start, reload), the shadow set,
the watcher's rescan, check-config and the operator's kept values. A file one part takes for a plugin and another does
not is a plugin the watcher reloads and the load never shows, or one /ready waits for that no swap ever loads."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

from pi_controller import config
from pi_controller.clock import VirtualClock
from pi_controller.config import PluginsSettings
from pi_controller.operator_values import SETTLE_S, OperatorValues
from pi_controller.plugins import checks
from pi_controller.plugins.plugin_set import PluginSet
from pi_controller.plugins.shadow import FOLDER, Shadows
from pi_controller.plugins.watch import PluginWatcher
from tests.conftest import TEST_PLUGINS, example_data


def hidden(folder: Path) -> None:  # what a copy from a Mac leaves beside each file (AppleDouble)
    shutil.copy(folder / "counter.wasm", folder / "._counter.wasm")


def directory(folder: Path) -> None:
    (folder / "lamp.wasm").mkdir()


def upper_case(folder: Path) -> None:
    shutil.copy(folder / "counter.wasm", folder / "lamp.WASM")


def link(folder: Path) -> None:
    (folder / "lamp.wasm").symlink_to("counter.wasm")


def dangling_link(folder: Path) -> None:
    (folder / "lamp.wasm").symlink_to("nowhere.wasm")


def too_large(folder: Path) -> None:
    with (folder / "lamp.wasm").open("wb") as file:
        file.truncate(PluginsSettings().ceilings.max_file_bytes + 1)  # sparse


# The odd entry beside counter.wasm, and the plugins it makes of the folder: a hidden file or a folder is none.
CASES: list[tuple[Callable[[Path], None], set[str]]] = [
    (hidden, {"counter"}), (directory, {"counter"}), (upper_case, {"counter"}), (link, {"counter", "lamp"}),
    (dangling_link, {"counter", "lamp"}), (too_large, {"counter", "lamp"})]


def folder_with(root: Path, odd: Callable[[Path], None]) -> Path:
    root.mkdir()
    shutil.copy(TEST_PLUGINS / "counter.wasm", root)
    odd(root)
    return root


@pytest.mark.parametrize(("odd", "plugins"), CASES, ids=[odd.__name__ for odd, _ in CASES])
def test_the_load_the_shadows_the_watcher_and_check_config_see_the_same_plugins(tmp_path: Path, write_config: Any,
                                                                                 odd: Callable[[Path], None],
                                                                                 plugins: set[str]) -> None:
    folder = folder_with(tmp_path / "plugins", odd)
    folder_with(folder / FOLDER, odd)
    live = PluginSet(PluginsSettings(), folder, budget_ms=1000, clock=VirtualClock())
    shadows = None
    try:
        live.load_all()
        shadows = Shadows(PluginsSettings(), live, live, VirtualClock())
        watcher = PluginWatcher(PluginSet(PluginsSettings(), folder, budget_ms=1000), None)  # type: ignore[arg-type]
        rescanned = asyncio.run(watcher._everything())
        assert set(live.status) == plugins, "the load"
        assert set(shadows.plugins.status) == plugins, "the shadows"
        assert rescanned == plugins, "the watcher's rescan"
        data = example_data()
        data["plugins"] = {"directory": str(folder)}
        failed = {name for name, status in live.status.items() if status.state == "failed"}
        assert set(checks.problems(config.load(write_config(data)), folder)) == failed, "check-config"
    finally:
        live.close()
        if shadows is not None:
            shadows.close()


@pytest.mark.parametrize("odd", [hidden, directory, upper_case], ids=["hidden", "directory", "upper_case"])
def test_a_folder_whose_only_wasm_entries_are_no_plugins_forgets_no_operator_values(
        tmp_path: Path, odd: Callable[[Path], None]) -> None:
    """The load finds no plugin there (a card copied back from a Mac, only its AppleDouble files landed so far): the
    kept values hold it for a folder holding none, as the rule for an empty one says, not for the owner's word."""
    now = [0.0]
    values = OperatorValues(tmp_path / "state", lambda: now[0])
    values.config = {"counter": {"step": {"value": 2}}}
    folder = folder_with(tmp_path / "plugins", odd)
    os.remove(folder / "counter.wasm")
    loaded = PluginSet(PluginsSettings(), folder, budget_ms=1000)
    loaded.load_all()
    assert not loaded.status
    values.apply([], PluginsSettings(), set(), folder)
    now[0] += SETTLE_S
    values.tick_done(None)  # type: ignore[arg-type]  # it reads no report
    values.close()
    assert "counter" in values.config
