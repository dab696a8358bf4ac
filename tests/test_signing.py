"""Signed plugins: keys made here with `plugin keygen`, modules of this repo signed with `plugin sign`, and
the refusals a node makes on its own (daemon load, hot reload), in `plugin install` and in `check-config`."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs

from pi_controller import cli, config
from pi_controller.clock import SystemClock
from pi_controller.keys import MAX_TRUSTED_KEYS, KeyProblem, trusted_key
from pi_controller.plugins import install, signing, signing_cli
from pi_controller.plugins.manifest import Grant, Manifest, Refused, parse_manifest, terms
from pi_controller.plugins.wasm_gate import read_module
from tests.conftest import (
    BUNDLED_PLUGINS,
    TEST_PLUGINS,
    PluginsLive,
    example_data,
    more_ticks,
    run_with,
    sha256_of,
    unsimulated,
    until,
)

PLUGIN = "temperature_control"


def keygen(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """A key pair made by the CLI; the fingerprint it printed."""
    assert cli.main(["plugin", "keygen", str(path)]) == 0
    printed = capsys.readouterr().out
    key = signing_cli.load_private_key(path)
    assert signing.fingerprint(key.public_key()) in printed
    assert path.stat().st_mode & 0o077 == 0  # the private key is its owner's alone
    return signing.fingerprint(key.public_key())


def sign(wasm: Path, key: Path) -> None:
    assert cli.main(["plugin", "sign", str(wasm), "--key", str(key)]) == 0


@pytest.fixture
def keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    folder = tmp_path / "keys"
    folder.mkdir()
    return {"owner": folder / "owner.pem", "stranger": folder / "stranger.pem",
            "owner_id": keygen(folder / "owner.pem", capsys), "stranger_id": keygen(folder / "stranger.pem", capsys)}


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A copy of a bundled plugin and its manifest, where its author would sign it."""
    folder = tmp_path / "work"
    folder.mkdir()
    for suffix in (".wasm", ".yaml"):
        shutil.copy(BUNDLED_PLUGINS / f"{PLUGIN}{suffix}", folder / f"{PLUGIN}{suffix}")
    return folder


def node_data(folder: Path, keys: dict[str, Any], require: bool) -> dict[str, Any]:
    data = unsimulated(example_data())
    data["plugins"].update(directory=str(folder), settings={}, require_signature=require,
                           trusted_keys=[str(keys["owner"].with_name("owner.pem.pub"))])
    return data


def plugins_settings(tmp_path: Path, keys: dict[str, Any], require: bool) -> config.PluginsSettings:
    path = tmp_path / "node.yaml"
    import yaml

    path.write_text(yaml.safe_dump(node_data(tmp_path, keys, require)))
    return config.load(path).plugins


def admit(wasm: Path, folder: Path, settings: config.PluginsSettings) -> tuple[bytes, Grant]:
    """The module and its terms as the daemon's load reads them (the file gate, then `manifest.terms`)."""
    module = read_module(wasm, folder, settings.ceilings.max_file_bytes)
    return module, terms(wasm.stem, wasm, module, settings, None)


def refusal(wasm: Path, settings: config.PluginsSettings) -> str:
    with pytest.raises(Refused) as refused:
        admit(wasm, wasm.parent, settings)
    return str(refused.value)


# --- what a signature covers -------------------------------------------------------------------------

def test_a_signed_plugin_is_admitted_with_the_key_that_signed_it(work, keys, tmp_path) -> None:
    wasm = work / f"{PLUGIN}.wasm"
    sign(wasm, keys["owner"])
    module, terms = admit(wasm, work, plugins_settings(tmp_path, keys, require=True))
    assert module == wasm.read_bytes() and terms.signer == keys["owner_id"]
    # The manifest parsed is the one signed: the signature covers these bytes, and they are what was parsed.
    manifest = wasm.with_suffix(".yaml").read_bytes()
    signed = signing.SignatureFile.parse(wasm.with_suffix(".sig").read_bytes(), f"{PLUGIN}.sig")
    signing_cli.load_private_key(keys["owner"]).public_key().verify(
        signed.signature, signing.statement(PLUGIN, module, manifest))  # raises if it does not cover them
    assert terms.manifest == parse_manifest(wasm, manifest) != Manifest()


@pytest.mark.parametrize("require", [True, False])
@pytest.mark.parametrize("suffix", [".wasm", ".yaml"])
def test_a_flipped_byte_in_the_module_or_its_manifest_is_refused(work, keys, tmp_path, suffix, require) -> None:
    """Required or not: a signature present that does not verify is an attack, not an absence."""
    wasm = work / f"{PLUGIN}.wasm"
    sign(wasm, keys["owner"])
    target = wasm.with_suffix(suffix)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # the manifest's middle is a comment or value: still a valid manifest
    target.write_bytes(bytes(data))
    reason = refusal(wasm, plugins_settings(tmp_path, keys, require))
    assert reason.startswith(f"{PLUGIN}.sig does not verify under key {keys['owner_id']}")


def test_a_manifest_added_or_removed_under_a_signed_module_is_refused(work, keys, tmp_path) -> None:
    wasm = work / f"{PLUGIN}.wasm"
    settings = plugins_settings(tmp_path, keys, require=True)
    sign(wasm, keys["owner"])
    manifest = wasm.with_suffix(".yaml").read_bytes()
    wasm.with_suffix(".yaml").unlink()  # the operator's limits fall back to the defaults: not what was signed
    assert "does not verify" in refusal(wasm, settings)
    sign(wasm, keys["owner"])
    wasm.with_suffix(".yaml").write_bytes(manifest)  # and a manifest slipped in beside a module signed without
    assert "does not verify" in refusal(wasm, settings)


def test_a_signed_module_under_another_name_is_refused(work, keys, tmp_path) -> None:
    wasm = work / f"{PLUGIN}.wasm"
    sign(wasm, keys["owner"])
    for suffix in (".wasm", ".yaml", ".sig"):
        os.replace(wasm.with_suffix(suffix), work / f"heater{suffix}")
    assert "does not verify" in refusal(work / "heater.wasm", plugins_settings(tmp_path, keys, require=True))


def test_a_signature_by_an_untrusted_key_is_refused(work, keys, tmp_path) -> None:
    wasm = work / f"{PLUGIN}.wasm"
    sign(wasm, keys["stranger"])
    for require in (True, False):
        reason = refusal(wasm, plugins_settings(tmp_path, keys, require))
        assert f"made by key {keys['stranger_id']}, which is not in plugins.trusted_keys" in reason


def test_an_unsigned_module_is_refused_only_when_signatures_are_required(work, keys, tmp_path) -> None:
    wasm = work / f"{PLUGIN}.wasm"
    assert refusal(wasm, plugins_settings(tmp_path, keys, require=True)) == (
        f"{PLUGIN}.wasm has no signature ({PLUGIN}.sig) and plugins.require_signature is true; "
        f"sign it: pi-controller plugin sign {PLUGIN}.wasm --key KEY")
    assert admit(wasm, work, plugins_settings(tmp_path, keys, require=False))[1].signer is None


@pytest.mark.parametrize("damage", [b"", b"x" * 2000, b"pi-controller plugin signature v1\nkey: 00\ned25519: AA==\n"])
def test_a_signature_file_that_is_no_signature_is_refused(work, keys, tmp_path, damage) -> None:
    wasm = work / f"{PLUGIN}.wasm"
    wasm.with_suffix(".sig").write_bytes(damage)
    reason = refusal(wasm, plugins_settings(tmp_path, keys, require=False))
    assert reason.startswith(f"{PLUGIN}.sig is ") and len(reason) < 200


def test_a_signature_fifo_is_refused_without_blocking(work, keys, tmp_path) -> None:
    wasm = work / f"{PLUGIN}.wasm"
    os.mkfifo(wasm.with_suffix(".sig"))
    assert refusal(wasm, plugins_settings(tmp_path, keys, require=False)) == f"{PLUGIN}.sig is not a regular file"


def test_sign_refuses_a_private_key_of_another_kind_or_a_missing_one(work, tmp_path, capsys) -> None:
    wasm = work / f"{PLUGIN}.wasm"
    assert cli.main(["plugin", "sign", str(wasm), "--key", str(tmp_path / "none.pem")]) == 2
    assert "none.pem cannot be read" in capsys.readouterr().err
    (tmp_path / "pub.pem").write_bytes(signing_cli.public_pem(Ed25519PrivateKey.generate().public_key()))
    assert cli.main(["plugin", "sign", str(wasm), "--key", str(tmp_path / "pub.pem")]) == 2
    assert "not a PEM private key" in capsys.readouterr().err
    assert not wasm.with_suffix(".sig").exists()


@pytest.mark.parametrize("file, said", [
    ("notes.txt", "not a plugin file the daemon loads"),
    ("missing.wasm", "cannot open it"),
    (f"{PLUGIN}.wasm", "is not a WebAssembly binary module"),
    (f"{PLUGIN}.yaml", "not a plugin file the daemon loads"),
])
def test_sign_names_the_plugin_s_file_as_given_and_once(work, keys, capsys, file: str, said: str) -> None:
    (work / f"{PLUGIN}.wasm").write_text("(module)")
    (work / "notes.txt").write_text("not a plugin")
    given = work / file
    assert cli.main(["plugin", "sign", str(given), "--key", str(keys["owner"])]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {given}: ") and said in line and line.count(given.name) == 1
    assert not (work / f"{PLUGIN}.sig").exists()


def test_sign_says_what_it_signed_by_the_paths_given(work, keys, capsys) -> None:
    wasm = work / f"{PLUGIN}.wasm"
    sign(wasm, keys["owner"])
    assert capsys.readouterr().out.startswith(f"signed {wasm} and {wasm.with_suffix('.yaml')} with key ")


def test_keygen_makes_the_private_key_its_owner_s_alone_whatever_a_cut_short_run_left_beside_it(
        tmp_path, capsys) -> None:
    """Each write goes through a temporary file of its own: one left by a keygen cut short (readable by all)
    is neither reused for the new key nor touched."""
    left = tmp_path / ".owner.pem.tmp"
    left.write_text("left over")
    left.chmod(0o644)
    keygen(tmp_path / "owner.pem", capsys)  # which asserts the key's mode
    assert left.read_text() == "left over"
    assert sorted(path.name for path in tmp_path.iterdir()) == [".owner.pem.tmp", "owner.pem", "owner.pem.pub"]


# --- the keys a node trusts, in its config -----------------------------------------------------------

def test_trusted_keys_take_a_path_pem_text_or_a_raw_key(keys, tmp_path, write_config) -> None:
    public = keys["owner"].with_name("owner.pem.pub")
    pem = public.read_text()
    raw = trusted_key(str(public), tmp_path)
    (tmp_path / "owner.raw").write_text(f"{raw}\n")  # a file may hold the raw key too
    data = node_data(tmp_path, keys, True)
    data["plugins"]["trusted_keys"] = [os.path.relpath(public, tmp_path), pem, raw, "owner.raw"]
    loaded = config.load(write_config(data)).plugins.trusted_keys
    assert loaded == (raw, raw, raw, raw)


@pytest.mark.parametrize(("entry", "message"), [
    ("missing.pub", "missing.pub cannot be read: No such file"),
    ("PRIVATE", "holds a private key: a node needs only the public one"),
    ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "the PEM text is not a PEM public key"),
    ("not a key\nat all", "neither a key file's path, PEM text"),
    ("fifo", "is not a regular file"),
])
def test_a_bad_trusted_key_names_file_line_and_key(keys, tmp_path, write_config, entry, message) -> None:
    if entry == "PRIVATE":
        entry = str(keys["owner"])
    if entry == "fifo":  # a FIFO would block the read (and the daemon's start) for good
        os.mkfifo(tmp_path / "fifo")
    text = ("pins: {factory: mock}\nactuators: [{id: relay, kind: relay, pin: 17}]\nplugins:\n  trusted_keys:\n"
            f"    - {keys['owner'].with_name('owner.pem.pub')}\n    - {json.dumps(entry)}\n")
    path = write_config(text)
    with pytest.raises(config.ConfigError) as error:
        config.load(path)
    assert str(error.value).startswith(f"{path}:6: plugins.trusted_keys[1]: ")
    assert message in str(error.value) and "AAAA" not in str(error.value)  # the content is not quoted


def test_a_key_of_another_algorithm_is_refused_naming_its_file_whole(tmp_path) -> None:
    """An EC key pair in PEM (a key, but not Ed25519), in a folder whose name holds the words of the message."""
    folder = tmp_path / "this is not it"
    folder.mkdir()
    private = ec.generate_private_key(ec.SECP256R1())
    (folder / "ec.pem").write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (folder / "ec.pub").write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    how = "is not an Ed25519 key (openssl genpkey -algorithm ed25519 makes one)"
    with pytest.raises(KeyProblem) as refused:
        signing_cli.load_private_key(folder / "ec.pem")
    assert str(refused.value) == f"{folder / 'ec.pem'} {how}"
    with pytest.raises(KeyProblem) as refused:
        trusted_key("this is not it/ec.pub", tmp_path)
    assert str(refused.value) == f"the key file {folder / 'ec.pub'} {how}"
    with pytest.raises(KeyProblem) as refused:
        signing_cli.load_private_key(folder / "ec.pub")
    assert str(refused.value) == f"{folder / 'ec.pub'} is not a PEM private key"


def test_too_many_trusted_keys_is_a_config_error(keys, tmp_path, write_config) -> None:
    data = node_data(tmp_path, keys, True)
    data["plugins"]["trusted_keys"] *= MAX_TRUSTED_KEYS + 1
    with pytest.raises(config.ConfigError, match=r"plugins.trusted_keys: 65 keys; at most 64"):
        config.load(write_config(data))


# --- the node: daemon load and hot reload ---------------------------------------------------------------

def node_folder(tmp_path: Path, work: Path) -> Path:
    folder = tmp_path / "plugins"
    folder.mkdir()
    for path in work.iterdir():
        shutil.copy(path, folder / path.name)
    return folder


def test_the_daemon_loads_a_signed_plugin_and_refuses_an_unsigned_one(work, keys, tmp_path, run_daemon) -> None:
    sign(work / f"{PLUGIN}.wasm", keys["owner"])
    folder = node_folder(tmp_path, work)
    shutil.copy(TEST_PLUGINS / "echo_output.wasm", folder / "echo_output.wasm")  # dropped in by hand, unsigned
    data = node_data(folder, keys, require=True)
    data["plugins"]["settings"] = {"echo_output": {"config": {
        "output": '[{"device_id":"led_strip","action":"pwm","parameters":{"duty_cycle":100}}]'}}}
    with capture_logs() as logs:
        daemon = run_daemon(data, 3)
    status = daemon.plugins.status
    assert status[PLUGIN].state == "loaded"
    assert status["echo_output"].state == "failed" and "has no signature" in (status["echo_output"].reason or "")
    loaded = next(e for e in logs if e["event"] == "plugin_loaded")
    assert loaded["plugin"] == PLUGIN and loaded["signed_by"] == keys["owner_id"]
    failed = [e for e in logs if e["event"] == "plugin_load_failed"]
    assert [(e["plugin"], e["reason"].split(";")[0]) for e in failed] == [
        ("echo_output", "echo_output.wasm has no signature (echo_output.sig) and plugins.require_signature is true")]
    # The refused plugin's command never reached its actuator, which stays in its safe state.
    assert daemon.status.snapshot()["actuators"]["led_strip"]["duty_cycle"] == 0.0


def test_a_hand_dropped_unsigned_module_is_refused_on_hot_reload_and_a_signed_one_loads(
        work, keys, tmp_path, run_daemon, monkeypatch) -> None:
    sign(work / f"{PLUGIN}.wasm", keys["owner"])
    folder = node_folder(tmp_path, work)
    daemon = run_daemon(node_data(folder, keys, require=True), 0, clock=SystemClock())
    swaps = PluginsLive(daemon, monkeypatch)
    drop = tmp_path / "drop"
    drop.mkdir()
    shutil.copy(TEST_PLUGINS / "counter.wasm", drop / "counter.wasm")
    sign(drop / "counter.wasm", keys["owner"])  # here: the CLI configures logging, which capture_logs must keep

    async def scenario() -> None:
        shutil.copy(drop / "counter.wasm", folder / "counter.wasm")  # by hand: cp into the folder
        await until(lambda: "counter" in daemon.plugins.status, "the dropped module is looked at")
        os.replace(drop / "counter.sig", folder / "counter.sig")  # its signature follows
        await until(lambda: daemon.plugins.status["counter"].state == "loaded", "the signed module loads")
        await more_ticks(daemon, 3)  # and runs

    with capture_logs() as logs:
        run_with(daemon, scenario)
    events = [(e["event"], e.get("reason", "")[:42]) for e in logs if e.get("plugin") == "counter"
              and e["event"].startswith("plugin_")]
    assert events[0] == ("plugin_load_failed", "counter.wasm has no signature (counter.sig")
    assert events[-1][0] == "plugin_loaded", events
    assert "counter" in [p.name for p in daemon.plugins]
    # The unsigned module never went live for a tick; the signed one ran on every tick from its swap on,
    # and the running plugin on every tick throughout.
    assert swaps.versions("counter") == [None, sha256_of(TEST_PLUGINS / "counter.wasm")]
    stats = daemon.loop.plugin_stats
    assert stats["counter"].calls == swaps.ticks_live("counter") > 0
    assert stats[PLUGIN].calls == daemon.loop.ticks.count


def test_a_live_plugin_whose_module_is_tampered_keeps_running_its_verified_version(
        work, keys, tmp_path, run_daemon) -> None:
    sign(work / f"{PLUGIN}.wasm", keys["owner"])
    folder = node_folder(tmp_path, work)
    daemon = run_daemon(node_data(folder, keys, require=True), 0, clock=SystemClock())
    verified = daemon.plugins.status[PLUGIN].sha256

    async def scenario() -> None:
        shutil.copy(TEST_PLUGINS / "counter.wasm", tmp_path / "swap.wasm")
        os.replace(tmp_path / "swap.wasm", folder / f"{PLUGIN}.wasm")
        await until(lambda: "does not verify" in (daemon.plugins.status[PLUGIN].reason or ""), "the swap is refused")

    run_with(daemon, scenario)
    assert daemon.plugins.status[PLUGIN].sha256 == verified  # the running version stays, as for any bad replacement


# --- the same check in `plugin install` and `check-config` --------------------------------------------

def test_plugin_install_exits_2_with_the_daemon_s_reason_and_installs_a_signed_plugin(
        work, keys, tmp_path, write_config, capsys) -> None:
    folder = tmp_path / "plugins"
    folder.mkdir()
    node = write_config(node_data(folder, keys, require=True))
    wasm = work / f"{PLUGIN}.wasm"
    assert cli.main(["plugin", "install", str(wasm), "--config", str(node)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {wasm}: not installed: {PLUGIN}.wasm has no signature ({PLUGIN}.sig) and "
                   f"plugins.require_signature is true; sign it: pi-controller plugin sign {PLUGIN}.wasm --key KEY\n")
    sign(wasm, keys["stranger"])
    assert cli.main(["plugin", "install", str(wasm), "--config", str(node)]) == 2
    assert "which is not in plugins.trusted_keys" in capsys.readouterr().err
    assert list(folder.iterdir()) == []  # nothing of a refused plugin reached the folder
    sign(wasm, keys["owner"])
    assert cli.main(["plugin", "install", str(wasm), "--config", str(node)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == [f"{PLUGIN}.sig", f"{PLUGIN}.wasm", f"{PLUGIN}.yaml"]
    settings = config.load(node).plugins
    assert admit(folder / f"{PLUGIN}.wasm", folder, settings)[1].signer == keys["owner_id"]


def test_installing_an_unsigned_version_removes_the_old_signature(work, keys, tmp_path, write_config, capsys) -> None:
    folder = tmp_path / "plugins"
    folder.mkdir()
    node = write_config(node_data(folder, keys, require=False))
    wasm = work / f"{PLUGIN}.wasm"
    sign(wasm, keys["owner"])
    assert cli.main(["plugin", "install", str(wasm), "--config", str(node)]) == 0
    wasm.with_suffix(".sig").unlink()
    assert cli.main(["plugin", "install", str(wasm), "--config", str(node)]) == 0
    assert not (folder / f"{PLUGIN}.sig").exists()  # it would describe the old module


@pytest.mark.parametrize("upgrade", [False, True], ids=["first-install", "upgrade-that-drops-its-manifest"])
def test_plugin_install_whose_rename_fails_halfway_leaves_the_folder_exactly_as_it_was(
        work, keys, tmp_path, write_config, capsys, monkeypatch, upgrade) -> None:
    """`plugin install` renames the manifest and the signature, then the module, into the folder (a manifest the
    new version lacks removed first). The second rename failing (an I/O error: our own call site's os.replace,
    for the folder's files only) puts back what was changed before it: the folder holds the same files, byte for
    byte, as before the install (none for a first install; the old module, manifest and signature for an upgrade
    whose new version has no manifest), and nothing of the staging folder."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    node = write_config(node_data(folder, keys, require=False))
    wasm = work / f"{PLUGIN}.wasm"
    sign(wasm, keys["owner"])
    if upgrade:
        assert cli.main(["plugin", "install", str(wasm), "--config", str(node)]) == 0
        wasm.with_suffix(".yaml").unlink()  # version 2: another module (a custom section added), no manifest
        wasm.write_bytes(wasm.read_bytes() + b"\x00\x03\x02v2")
        sign(wasm, keys["owner"])
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    renamed, rename = [], os.replace

    def failing(source: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        if Path(target).parent.resolve() == folder.resolve():
            renamed.append(Path(target).name)
            if len(renamed) == 2:
                raise OSError(errno.EIO, "Input/output error")
        rename(source, target, *args, **kwargs)

    monkeypatch.setattr(install.os, "replace", failing)
    capsys.readouterr()
    assert cli.main(["plugin", "install", str(wasm), "--config", str(node)]) == 2
    assert f"cannot move the plugin into {folder}: Input/output error" in capsys.readouterr().err
    assert renamed[:2] == ([f"{PLUGIN}.sig", f"{PLUGIN}.wasm"] if upgrade else [f"{PLUGIN}.yaml", f"{PLUGIN}.sig"])
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert sorted(before) == ([f"{PLUGIN}.sig", f"{PLUGIN}.wasm", f"{PLUGIN}.yaml"] if upgrade else [])


def test_check_config_reports_each_plugin_the_daemon_would_refuse(work, keys, tmp_path, write_config, capsys) -> None:
    sign(work / f"{PLUGIN}.wasm", keys["owner"])
    folder = node_folder(tmp_path, work)
    node = write_config(node_data(folder, keys, require=True))
    assert cli.main(["check-config", str(node)]) == 0
    capsys.readouterr()
    shutil.copy(TEST_PLUGINS / "counter.wasm", folder / "counter.wasm")
    assert cli.main(["check-config", str(node)]) == 0  # dropped in, not named: refused alone, as the daemon does
    err = capsys.readouterr().err
    assert err == (f"warning: plugin 'counter' ({folder / 'counter.wasm'}) would not load: counter.wasm has no "
                   "signature (counter.sig) and plugins.require_signature is true; sign it: pi-controller plugin "
                   "sign counter.wasm --key KEY\n")
    data = node_data(folder, keys, require=True)
    data["plugins"]["required"] = ["counter"]  # named: the config's own key refuses it
    node = write_config(data)
    assert cli.main(["check-config", str(node)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: {node}:") and err.endswith(
        "plugins.require_signature: plugin 'counter' would not load: counter.wasm has no signature (counter.sig) and "
        "plugins.require_signature is true; sign it: pi-controller plugin sign counter.wasm --key KEY\n")


def test_the_example_config_loads_with_its_trusted_keys_uncommented(tmp_path, capsys) -> None:
    """The commented lines in config/example.yaml are a config that works, once a key is there."""
    assert cli.main(["plugin", "keygen", str(tmp_path / "owner.pem")]) == 0
    text = (Path(__file__).resolve().parent.parent / "config" / "example.yaml").read_text()
    lines = [line for line in text.splitlines() if "trusted_keys" in line or "require_signature" in line]
    assert lines and all(line.lstrip().startswith("#") for line in lines)
    enabled = text.replace("# trusted_keys:", "trusted_keys:").replace("#   - ", "  - ").replace(
        "# require_signature:", "require_signature:").replace("/etc/pi-controller/keys/owner.pem.pub",
                                                              str(tmp_path / "owner.pem.pub"))
    enabled = enabled.replace("directory: ../plugins", f"directory: {BUNDLED_PLUGINS}")
    (tmp_path / "example.yaml").write_text(enabled)
    settings = config.load(tmp_path / "example.yaml")
    assert len(settings.plugins.trusted_keys) == 1 and settings.plugins.require_signature is False


def test_promoting_a_signed_shadow_carries_its_signature_and_an_unsigned_one_drops_the_old(
        work, keys, tmp_path) -> None:
    from pi_controller.plugins.shadow import FOLDER, promote

    settings = plugins_settings(tmp_path, keys, require=False)
    folder = node_folder(tmp_path, work)
    sign(folder / f"{PLUGIN}.wasm", keys["stranger"])  # the live version's signature: not the shadow's
    (folder / FOLDER).mkdir()
    for suffix in (".wasm", ".yaml"):
        shutil.copy(work / f"{PLUGIN}{suffix}", folder / FOLDER / f"{PLUGIN}{suffix}")
    sign(folder / FOLDER / f"{PLUGIN}.wasm", keys["owner"])
    assert admit(folder / FOLDER / f"{PLUGIN}.wasm", folder / FOLDER, settings)[1].signer == keys["owner_id"]
    promote(folder, PLUGIN)
    assert admit(folder / f"{PLUGIN}.wasm", folder, settings)[1].signer == keys["owner_id"]
    shutil.copy(TEST_PLUGINS / "counter.wasm", folder / FOLDER / f"{PLUGIN}.wasm")  # an unsigned shadow
    promote(folder, PLUGIN)
    assert not (folder / f"{PLUGIN}.sig").exists()
    assert admit(folder / f"{PLUGIN}.wasm", folder, settings)[1].signer is None


# --- a bad signature beside a module the config does not name (issue 25's principle) ------------------
# A file dropped into the folder never keeps the configured plugins out, nor stops the daemon: a signature
# that does not verify on an unconfigured module refuses that module alone (logged once, its state "failed",
# a warning of check-config); on a configured one it is the config's error at the key at fault (exit 2).

BAD_SIGNATURES = ("stranger", "damaged", "other_module")


def drop_badly_signed(folder: Path, keys: dict[str, Any], bad: str, name: str = "counter") -> str:
    """Drop module `name` with a signature that must be refused; the start of the reason the node gives."""
    wasm = folder / f"{name}.wasm"
    shutil.copy(TEST_PLUGINS / f"{name}.wasm", wasm)
    if bad == "damaged":
        wasm.with_suffix(".sig").write_text("pi-controller plugin signature v1\nkey: nonsense\n")
        return f"{name}.sig is not a signature"
    sign(wasm, keys["stranger" if bad == "stranger" else "owner"])
    if bad == "stranger":
        return f"{name}.sig was made by key {keys['stranger_id']}, which is not in plugins.trusted_keys"
    shutil.copy(TEST_PLUGINS / "echo_output.wasm", wasm)  # the module changed after it was signed
    return f"{name}.sig does not verify under key {keys['owner_id']}"


def run_cli(node: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any], str]:
    """`pi-controller run --ticks 3` in-process: its exit status, its snapshot, what it said on stderr."""
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    code = cli.main(["run", "--config", str(node), "--ticks", "3", "--state-dir", str(state), "--log-format", "json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else {}), err


def events(err: str, event: str, plugin: str) -> list[dict[str, Any]]:
    lines = (json.loads(line) for line in err.splitlines() if line.startswith("{"))
    return [e for e in lines if e.get("event") == event and e.get("plugin") == plugin]


def signed_node(work: Path, keys: dict[str, Any], tmp_path: Path, require: bool) -> tuple[Path, dict[str, Any]]:
    """A node's folder with the signed bundled plugin, and config data naming it."""
    sign(work / f"{PLUGIN}.wasm", keys["owner"])
    folder = node_folder(tmp_path, work)
    data = node_data(folder, keys, require=require)
    data["plugins"]["settings"] = {PLUGIN: {}}
    return folder, data


@pytest.mark.parametrize("require", [False, True], ids=["optional", "required"])
@pytest.mark.parametrize("bad", BAD_SIGNATURES)
def test_run_and_check_config_refuse_only_an_unconfigured_module_with_a_bad_signature(
        work, keys, tmp_path, write_config, capsys, cli_logs, bad, require) -> None:
    folder, data = signed_node(work, keys, tmp_path, require)
    node = write_config(data)
    reason = drop_badly_signed(folder, keys, bad)
    assert cli.main(["check-config", str(node)]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"warning: plugin 'counter' ({folder / 'counter.wasm'}) would not load: {reason}"), err
    code, snapshot, err = run_cli(node, tmp_path, capsys)
    assert code == 0, err
    assert snapshot["plugins"][PLUGIN]["state"] == "loaded" and snapshot["plugins"][PLUGIN]["calls"] == 3
    assert snapshot["plugins"]["counter"]["state"] == "failed"
    assert snapshot["plugins"]["counter"]["reason"].startswith(reason)
    assert len(events(err, "plugin_load_failed", "counter")) == 1  # logged once, not each tick


@pytest.mark.parametrize("bad", BAD_SIGNATURES)
def test_a_configured_module_with_a_bad_signature_is_a_config_error_at_the_key_at_fault(
        work, keys, tmp_path, write_config, capsys, cli_logs, bad) -> None:
    folder = node_folder(tmp_path, work)
    data = node_data(folder, keys, require=False)
    data["plugins"]["settings"] = {"counter": {}}
    node = write_config(data)
    reason = drop_badly_signed(folder, keys, bad)
    key = "plugins.settings.counter" if bad == "damaged" else "plugins.trusted_keys"  # the file's fault, or a key's
    for command in (["check-config", str(node)], ["run", "--config", str(node), "--ticks", "3"]):
        assert cli.main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"config error: {node}:") and f": {key}: plugin 'counter' would not " \
            f"load: {reason}" in err and err.count("\n") == 1, err


def test_a_configured_unsigned_module_is_a_config_error_at_require_signature_only_when_required(
        work, keys, tmp_path, write_config, capsys, cli_logs) -> None:
    folder = node_folder(tmp_path, work)  # temperature_control, unsigned
    data = node_data(folder, keys, require=True)
    data["plugins"]["settings"] = {PLUGIN: {}}
    assert cli.main(["run", "--config", str(write_config(data)), "--ticks", "3"]) == 2
    assert ": plugins.require_signature: plugin 'temperature_control' would not load:" in capsys.readouterr().err
    data["plugins"]["require_signature"] = False
    code, snapshot, err = run_cli(write_config(data), tmp_path, capsys)
    assert code == 0 and snapshot["plugins"][PLUGIN]["state"] == "loaded", err


def test_a_reload_applies_beside_a_badly_signed_dropped_module_and_is_refused_for_a_configured_one(
        work, keys, tmp_path, write_config, run_daemon) -> None:
    import yaml

    folder, data = signed_node(work, keys, tmp_path, require=True)
    daemon = run_daemon(data, 0, clock=SystemClock())
    node = daemon.settings.source
    reason = drop_badly_signed(folder, keys, "stranger")
    results = []

    async def scenario() -> None:
        results.append(await daemon.reload())  # the dropped module's own refusal: the reload applies
        data["plugins"]["settings"]["counter"] = {}  # now the config names it: the config's mistake
        node.write_text(yaml.safe_dump(data))
        results.append(await daemon.reload())

    run_with(daemon, scenario)
    assert [r.outcome for r in results] == ["applied", "refused"], results
    assert f"plugins.trusted_keys: plugin 'counter' would not load: {reason}" in results[1].message
    assert daemon.plugins.status[PLUGIN].state == "loaded"
    refused = daemon.plugins.status["counter"]
    assert refused.state == "failed" and reason in (refused.reason or "")
    assert [p.name for p in daemon.plugins] == [PLUGIN]


@pytest.mark.parametrize("bad", BAD_SIGNATURES)
def test_a_badly_signed_module_dropped_in_while_running_is_refused_alone_and_logged_once(
        work, keys, tmp_path, run_daemon, bad, monkeypatch) -> None:
    folder, data = signed_node(work, keys, tmp_path, require=False)
    daemon = run_daemon(data, 0, clock=SystemClock())
    swaps = PluginsLive(daemon, monkeypatch)
    drop = tmp_path / "drop"
    drop.mkdir()
    reason = drop_badly_signed(drop, keys, bad)

    async def scenario() -> None:
        os.replace(drop / "counter.sig", folder / "counter.sig")  # the signature first, then the module
        os.replace(drop / "counter.wasm", folder / "counter.wasm")
        await until(lambda: "counter" in daemon.plugins.status, "the dropped module is looked at")
        calls = daemon.loop.summary()["plugins"][PLUGIN]["calls"]
        await more_ticks(daemon, 5)
        assert daemon.loop.summary()["plugins"][PLUGIN]["calls"] >= calls + 5  # the configured plugin runs on

    with capture_logs() as logs:
        run_with(daemon, scenario)
    failed = [e for e in logs if e["event"] == "plugin_load_failed" and e.get("plugin") == "counter"]
    assert len(failed) == 1 and failed[0]["reason"].startswith(reason), failed
    assert daemon.plugins.status["counter"].state == "failed"
    assert [p.name for p in daemon.plugins] == [PLUGIN]
    # Refused alone: it never went live for a tick, and the configured plugin ran on every tick.
    assert swaps.versions("counter") == [None] and len(swaps.changes) > 1
    assert daemon.loop.plugin_stats[PLUGIN].calls == daemon.loop.ticks.count
