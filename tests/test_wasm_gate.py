"""The gate in front of libextism: what may reach the compiler, and what a trial compile in a child stops."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from pi_controller.config import PluginCeilings, PluginsSettings
from pi_controller.plugins import tools, wasm_gate
from pi_controller.plugins.manifest import Refused
from pi_controller.plugins.plugin_set import PluginSet
from pi_controller.plugins.wasm_gate import read_module
from tests.conftest import plugin_wasm
from tests.wasm_modules import module

SECRET = b"root:x:0:0:secret-first-line\n"

# name -> (bytes, or how to make the file; a word of the reason it is refused with)
HOSTILE: dict[str, tuple[bytes, str]] = {
    "nul": (b"\0", "not a WebAssembly binary"),
    "nul_as": (b"\0as", "not a WebAssembly binary"),
    "x_nul": (b"x\0", "not a WebAssembly binary"),
    "prefix": (b"\0asm\x01\0", "version 1"),
    "wat": (b"(module (func (export \"control_logic\")))\n", "text format is not accepted"),
    "component": (b"\0asm\x0d\0\x01\0", "version 1"),
    "nul_import": (module(imports=((b"env", b"x\0y"),)), "makes libextism crash"),
    "oversize": (module(custom_bytes=200 * 1024), "over plugins.ceilings.max_file_bytes"),
}


def hostile_folder(folder: Path) -> Path:
    """The plugins folder with every hostile file of HOSTILE, a symlink out, a FIFO and a good plugin."""
    folder.mkdir(exist_ok=True)
    for name, (data, _) in HOSTILE.items():
        (folder / f"{name}.wasm").write_bytes(data)
    secret = folder.parent / "passwd"
    secret.write_bytes(SECRET)
    (folder / "link_out.wasm").symlink_to(secret)
    (folder / "link_in.wasm").symlink_to(folder / "kept.wasm")
    os.mkfifo(folder / "fifo.wasm")
    shutil.copy(plugin_wasm("motion_light"), folder / "kept.wasm")
    return folder


REASONS = {**{name: word for name, (_, word) in HOSTILE.items()},
           "link_out": "symbolic link to outside", "fifo": "not a regular file"}


def test_every_hostile_file_fails_alone_with_a_reason_that_quotes_nothing_of_it(tmp_path: Path) -> None:
    folder = hostile_folder(tmp_path / "plugins")
    plugins = PluginSet(PluginsSettings(ceilings=PluginCeilings(max_file_bytes=128 * 1024)), folder, budget_ms=1000)
    try:
        plugins.load_all()  # returns at all: the FIFO did not block it, the NUL import did not abort us
        status = plugins.status
    finally:
        plugins.close()
    assert {name for name, s in status.items() if s.state == "loaded"} == {"kept", "link_in"}
    for name, word in REASONS.items():
        assert status[name].state == "failed", name
        assert word in status[name].reason, (name, status[name].reason)
        assert "\n" not in status[name].reason and "secret" not in status[name].reason
        assert "module (func" not in status[name].reason


def test_the_size_cap_is_checked_before_the_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.wasm"
    with path.open("wb") as f:  # sparse: 1 TiB that takes no disk and would take all the memory
        f.truncate(1 << 40)
    with pytest.raises(Refused, match=re.escape("1099511627776 bytes, over plugins.ceilings.max_file_bytes 16777216")):
        read_module(path, tmp_path, PluginCeilings().max_file_bytes)


def test_plugin_call_on_hostile_files_refuses_each_in_one_line_and_goes_on(tmp_path: Path) -> None:
    folder = hostile_folder(tmp_path / "plugins")
    settings = tools.settings_for({"device_states": {"relay_switch": {"type": "relay"}}})
    for name, word in REASONS.items():
        if name == "oversize":
            continue  # 200 KiB is within the default cap: it loads, and fails for want of control_logic
        with pytest.raises(tools.LoadFailed) as caught:
            tools.call_once(folder / f"{name}.wasm", {}, settings)
        assert word in str(caught.value), (name, str(caught.value))
        assert "secret" not in str(caught.value) and "\n" not in str(caught.value)


def test_a_passed_trial_is_remembered_across_restarts_and_a_crashing_module_never_is(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("EXTISM_CACHE_CONFIG", raising=False)
    good = module()
    crash = module(imports=((b"env", b"x\0y"),))
    manifest = lambda wasm: json.dumps({"wasm": [{"data": base64.b64encode(wasm).decode()}]}).encode()
    wasm_gate.trial(manifest(good), False, 1000)
    with pytest.raises(Refused, match="makes libextism crash"):
        wasm_gate.trial(manifest(crash), False, 1000)
    assert len(list((tmp_path / "cache" / "pi-controller" / "trials").iterdir())) == 1
    monkeypatch.setattr(wasm_gate, "_passed", set())  # a new process: only the records remain

    def no_child(*args: object, **kwargs: object) -> None:
        raise AssertionError("a trial child was started")

    monkeypatch.setattr(wasm_gate.subprocess, "run", no_child)
    wasm_gate.trial(manifest(good), False, 1000)  # from the record, without a child
    with pytest.raises(AssertionError, match="trial child"):  # other terms: tried again
        wasm_gate.trial(manifest(good), False, 2000)
    with pytest.raises(AssertionError, match="trial child"):  # never recorded: tried again
        wasm_gate.trial(manifest(crash), False, 1000)
    monkeypatch.setattr(wasm_gate, "_passed", set())
    monkeypatch.setenv("EXTISM_CACHE_CONFIG", "")  # the compile cache off: the records too
    with pytest.raises(AssertionError, match="trial child"):
        wasm_gate.trial(manifest(good), False, 1000)


def test_a_refusal_names_the_file_as_the_caller_asks(tmp_path: Path) -> None:
    """A tool run on a path the owner typed names it so (the daemon names a plugin's file in its folder)."""
    with pytest.raises(Refused) as refused:
        read_module(tmp_path / "gone.wasm", tmp_path, PluginCeilings().max_file_bytes, name="typed/gone.wasm")
    assert str(refused.value) == "cannot open typed/gone.wasm: No such file or directory"
