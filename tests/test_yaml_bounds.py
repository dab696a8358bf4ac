"""One bounded YAML loader for configs and manifests: no anchors or aliases, bounded size and nesting."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pi_controller import config
from pi_controller.config import ConfigError
from pi_controller.plugins import tools
from pi_controller.plugins.manifest import MAX_MANIFEST_BYTES, Refused, load_manifest
from tests.conftest import ALIAS_BOMB, plugin_wasm


@pytest.mark.parametrize("text, line, words", [
    (ALIAS_BOMB, 1, "anchors and aliases"),
    ("loop:\n  rate_hz: 10\nwatchdog: &w {enabled: true}\n", 3, "anchors and aliases"),
    ("loop: " + "[" * 200 + "]" * 200 + "\n", 1, "nested more than 64 deep"),
])
def test_a_config_with_aliases_or_deep_nesting_is_refused_at_its_line(tmp_path: Path, text: str, line: int,
                                                                       words: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert caught.value.line == line and words in caught.value.message
    assert str(caught.value).startswith(f"{path}:{line}: ")


def test_a_config_past_the_size_bound_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("# padding\n" * (config.MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match=f"longer than {config.MAX_CONFIG_BYTES} bytes"):
        config.load(path)


def plugin_with_manifest(folder: Path, text: str | bytes) -> Path:
    folder.mkdir(exist_ok=True)
    wasm = folder / "echo_output.wasm"
    shutil.copy(plugin_wasm("echo_output"), wasm)
    manifest = folder / "echo_output.yaml"
    manifest.write_bytes(text if isinstance(text, bytes) else text.encode())
    return wasm


@pytest.mark.parametrize("text, reason", [
    (ALIAS_BOMB, "echo_output.yaml:1: (top level): not valid YAML: anchors and aliases"),
    ("# x\n" * (MAX_MANIFEST_BYTES // 4 + 1), f"longer than {MAX_MANIFEST_BYTES} bytes"),
    (b"version: \xff\xfe\n", "not UTF-8 text"),
    ("name: x\nversoin: 1.0\n", "echo_output.yaml:2: versoin: unknown key 'versoin'; did you mean 'version'?"),
])
def test_a_bad_manifest_is_refused_with_file_and_line(tmp_path: Path, text: str, reason: str) -> None:
    wasm = plugin_with_manifest(tmp_path / "plugins", text)
    with pytest.raises(Refused) as caught:
        load_manifest(wasm)
    assert reason in str(caught.value)


def test_a_manifest_linked_to_outside_the_folder_is_refused_without_quoting_it(tmp_path: Path) -> None:
    wasm = plugin_with_manifest(tmp_path / "plugins", "")
    (tmp_path / "secret").write_text("root:x:0:0:secret\n")
    manifest = wasm.with_suffix(".yaml")
    manifest.unlink()
    manifest.symlink_to(tmp_path / "secret")
    with pytest.raises(Refused, match="symbolic link to outside the plugins folder") as caught:
        load_manifest(wasm)
    assert "secret" not in str(caught.value)


def test_plugin_call_refuses_an_alias_bomb_manifest(tmp_path: Path) -> None:
    wasm = plugin_with_manifest(tmp_path / "plugins", ALIAS_BOMB)
    with pytest.raises(tools.LoadFailed, match="anchors and aliases"):
        tools.call_once(wasm, {}, tools.settings_for({}))
