"""WASI and the filesystem, denied by default and granted only within the operator's ceilings, with
the real Extism runtime and real plugins: wasi_import (prints through WASI) and wasi_read_file
(reads a file from the directory it was given)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pi_controller.config import PluginCeilings, PluginSettings
from pi_controller.plugins.plugin_set import PluginSet
from tests.conftest import CONTEXT, only


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """A directory the operator lets plugins have, holding note.txt, and a secret one beside it."""
    granted, secret = tmp_path / "granted", tmp_path / "secret"
    granted.mkdir()
    secret.mkdir()
    (granted / "note.txt").write_text("hello from the granted dir")
    (secret / "key.txt").write_text("top secret")
    return granted, secret


def status(plugins: PluginSet, name: str) -> tuple[str, str]:
    found = plugins.status[name]
    return found.state, found.reason or ""


def test_a_module_that_imports_wasi_is_refused_by_default_and_says_why(plugin_set) -> None:
    state, reason = status(plugin_set("wasi_import"), "wasi_import")
    assert state == "failed" and "wasi_snapshot_preview1" in reason and "WASI, which is not granted" in reason


def test_asking_for_wasi_is_refused_unless_the_ceiling_allows_it(plugin_set) -> None:
    plugins = plugin_set("wasi_import", manifests={"wasi_import": {"wasi": True}})
    state, reason = status(plugins, "wasi_import")
    assert state == "failed" and "plugins.ceilings.allow_wasi" in reason


def test_wasi_granted_within_the_ceiling_runs(plugin_set) -> None:
    plugins = plugin_set("wasi_import", manifests={"wasi_import": {"wasi": True}},
                         ceilings=PluginCeilings(allow_wasi=True))
    assert only(plugins).call(CONTEXT) == b""  # fd_write of nothing to stdout, and no output


def test_the_operator_s_settings_can_take_wasi_away_again(plugin_set) -> None:
    plugins = plugin_set("wasi_import", manifests={"wasi_import": {"wasi": True}},
                         ceilings=PluginCeilings(allow_wasi=True),
                         settings={"wasi_import": PluginSettings(wasi=False)})
    assert status(plugins, "wasi_import")[0] == "failed"


def reader(plugin_set: Any, granted: Path, path: str, **ceilings: Any) -> PluginSet:
    ceiling = PluginCeilings(**{"allow_wasi": True, "allowed_paths": (str(granted.parent / "granted"),), **ceilings})
    own = PluginSettings(wasi=True, allowed_paths={str(granted): "/data"}, config={"path": path})
    return plugin_set("wasi_read_file", ceilings=ceiling, settings={"wasi_read_file": own})


def test_a_granted_directory_is_readable(plugin_set, folders) -> None:
    granted, _ = folders
    assert only(reader(plugin_set, granted, "note.txt")).call(CONTEXT) == b"hello from the granted dir"


@pytest.mark.parametrize("path", ["../secret/key.txt", "/secret/key.txt", "missing.txt"])
def test_nothing_outside_the_granted_directory_is(plugin_set, folders, path: str) -> None:
    granted, secret = folders
    answer = only(reader(plugin_set, granted, path.replace("/secret", str(secret)) if path.startswith("/")
                         else path)).call(CONTEXT)
    assert answer.startswith(b"errno ") and b"secret" not in answer


@pytest.mark.parametrize("asked, why", [
    ("secret", "is not within plugins.ceilings.allowed_paths"),
    ("granted/../secret", "is not within plugins.ceilings.allowed_paths"),
    ("relative", "must be absolute"),
])
def test_a_path_outside_the_ceiling_is_refused(plugin_set, folders, asked: str, why: str) -> None:
    granted, _ = folders
    host = asked if asked == "relative" else str(granted.parent / asked)
    plugins = plugin_set("wasi_read_file", ceilings=PluginCeilings(allow_wasi=True, allowed_paths=(str(granted),)),
                         settings={"wasi_read_file": PluginSettings(wasi=True, allowed_paths={host: "/data"})})
    state, reason = status(plugins, "wasi_read_file")
    assert state == "failed" and why in reason


def test_paths_without_wasi_are_refused(plugin_set, folders) -> None:
    granted, _ = folders
    plugins = plugin_set("wasi_read_file", manifests={"wasi_read_file": {"allowed_paths": {str(granted): "/d"}}},
                         ceilings=PluginCeilings(allow_wasi=True, allowed_paths=(str(granted),)))
    state, reason = status(plugins, "wasi_read_file")
    assert state == "failed" and "allowed_paths needs wasi: true" in reason
