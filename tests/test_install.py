"""The Pi install, as far as a machine without a Pi allows: staged into a temporary root."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "pi-controller.service"
BOOKWORM = {"SYSTEMD_VERSION": "252"}  # Raspberry Pi OS Bookworm's systemd, whatever runs the tests

pytestmark = pytest.mark.slow  # a staged install: a venv and pip, then the unit checked


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Staged as root with an umask of 027, a hardened shell's (sudo keeps the stricter of its and the user's)."""
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["bash", "-c", 'umask 027 && exec bash "$0"', str(REPO / "systemd" / "install.sh")],
                   env={**os.environ, **BOOKWORM, "ROOT": str(root)}, check=True, capture_output=True, text=True,
                   timeout=600)
    return root


def test_install_stages_the_venv_unit_user_config_and_plugins(stage: Path) -> None:
    assert (stage / "etc/systemd/system/pi-controller.service").read_text() == UNIT.read_text()
    sysusers = (stage / "usr/lib/sysusers.d/pi-controller.conf").read_text()
    assert "u pi-controller" in sysusers and "m pi-controller gpio" in sysusers
    plugins = sorted(p.name for p in (stage / "var/lib/pi-controller/plugins").iterdir())
    assert plugins == sorted(p.name for p in (REPO / "plugins").iterdir() if p.suffix in (".wasm", ".yaml"))
    assert {p.rsplit(".", 1)[0] for p in plugins if p.endswith(".yaml")} == {
        p.rsplit(".", 1)[0] for p in plugins if p.endswith(".wasm")}  # each module with its manifest
    config = yaml.safe_load((stage / "etc/pi-controller/config.yaml").read_text())
    assert config["plugins"]["directory"] == "/var/lib/pi-controller/plugins"
    assert config["pins"]["factory"] == "lgpio"
    assert not (stage / "etc/systemd/system/pi-controller.service.d").exists()  # no notify-reload before systemd 253


def assert_readable_by_all(folder: Path) -> None:
    """Every file in `folder` readable by any user, its folders and programs runnable (links aside)."""
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            wanted = stat.S_IROTH | (stat.S_IXOTH if path.is_dir() or path.stat().st_mode & stat.S_IXUSR else 0)
            assert path.stat().st_mode & wanted == wanted, f"{path}: {stat.filemode(path.stat().st_mode)}"


def test_the_service_user_can_run_what_root_installed_whatever_roots_umask(stage: Path) -> None:
    """The unit runs as pi-controller: with the venv root's alone (0750 under umask 027) it failed to start at
    all (203/EXEC), and its plugins and config went unread."""
    assert_readable_by_all(stage / "opt/pi-controller")
    assert_readable_by_all(stage / "var/lib/pi-controller/plugins")


def test_an_upgrade_repairs_what_an_install_under_a_stricter_umask_left(stage: Path) -> None:
    """Installed before the installer set its own umask, under root's 027: the venv and plugins root's alone. Run
    again (an upgrade, with the same umask), the installer makes them the service's user's to run; the config stays
    0640 (its group, pi-controller's)."""
    installed = [stage / "opt/pi-controller", stage / "var/lib/pi-controller/plugins"]
    subprocess.run(["chmod", "-R", "o-rwx", *map(str, installed)], check=True)
    config = stage / "etc/pi-controller/config.yaml"
    subprocess.run(["bash", "-c", 'umask 027 && exec bash "$0"', str(REPO / "systemd" / "install.sh")],
                   env={**os.environ, **BOOKWORM, "ROOT": str(stage)}, check=True, capture_output=True, timeout=600)
    for folder in installed:
        assert_readable_by_all(folder)
    assert stat.S_IMODE(config.stat().st_mode) == 0o640


def test_the_installed_command_runs_safe_state_quickly(stage: Path) -> None:
    result = subprocess.run([str(stage / "opt/pi-controller/venv/bin/pi-controller"), "safe-state", "--config",
                             str(stage / "etc/pi-controller/config.yaml"), "--simulate"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("safe_state_set") == 3


def test_reinstall_keeps_an_edited_config(stage: Path) -> None:
    config = stage / "etc/pi-controller/config.yaml"
    config.write_text(config.read_text().replace("rate_hz: 10", "rate_hz: 5"))
    subprocess.run(["bash", str(REPO / "systemd" / "install.sh")], env={**os.environ, **BOOKWORM, "ROOT": str(stage)},
                   check=True, capture_output=True, timeout=600)
    assert "rate_hz: 5" in config.read_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_unit_passes_systemd_analyze_verify(stage: Path, tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at the staged one.
    unit = tmp_path / "pi-controller.service"
    unit.write_text(UNIT.read_text().replace("/opt/pi-controller", str(stage / "opt/pi-controller")))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_unit_has_what_the_daemon_relies_on() -> None:
    unit = UNIT.read_text()
    for line in ("Type=notify\n", "WatchdogSec=", "Restart=on-failure", "RestartPreventExitStatus=2\n",
                 "ExecReload=/opt/pi-controller/venv/bin/pi-controller check-config /etc/pi-controller/config.yaml\n"
                 "ExecReload=/bin/kill -HUP $MAINPID\n",  # in this order: a bad config fails `systemctl reload`
                 "ExecStopPost=/opt/pi-controller/venv/bin/pi-controller safe-state", "WorkingDirectory=%S/",
                 "CacheDirectory=pi-controller", "Environment=XDG_CACHE_HOME=%C/pi-controller",
                 "DeviceAllow=char-gpiochip rw", "SupplementaryGroups=gpio spi i2c"):
        assert line in unit
    assert "MemoryDenyWriteExecute=yes" not in unit  # wasmtime's JIT needs it off


def unit_command(stage: Path, key: str, *extra: str) -> list[str]:
    """The unit's `key=` command line (ExecStart, ExecStopPost), run on the staged files, plus `extra`."""
    line = next(line for line in UNIT.read_text().splitlines() if line.startswith(f"{key}="))
    words = line.split("=", 1)[1].split()
    return [f"{stage}{word}" if word.startswith(("/opt/", "/etc/", "/var/")) else word for word in words] + [*extra]


def test_after_a_crash_with_the_config_truncated_safe_state_drives_what_the_daemon_ran_with(stage: Path,
                                                                                             tmp_path: Path) -> None:
    config = stage / "etc/pi-controller/config.yaml"
    original = config.read_text()
    state = tmp_path / "state"  # what systemd makes of StateDirectory= and passes as $STATE_DIRECTORY
    state.mkdir()
    unit_env = {**os.environ, "STATE_DIRECTORY": str(state)}
    try:
        ran = subprocess.run(unit_command(stage, "ExecStart", "--simulate", "--ticks", "2", "--plugins",
                                          str(stage / "var/lib/pi-controller/plugins")),
                             env=unit_env, capture_output=True, text=True, timeout=120)
        assert ran.returncode == 0, ran.stderr
        config.write_text(original[:40])  # an editor crash: the file cut after a line and a half
        check = subprocess.run(unit_command(stage, "ExecStart")[:1] + ["check-config", str(config)],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 2 and "config error: " in check.stderr
        safe = subprocess.run(unit_command(stage, "ExecStopPost", "--simulate"),
                              env={**unit_env, "SERVICE_RESULT": "signal"}, capture_output=True, text=True,
                              timeout=60)
    finally:
        config.write_text(original)
    assert safe.returncode == 0, safe.stderr
    events = [json.loads(line) for line in safe.stderr.splitlines()]  # --log-format json, from the unit
    assert events[0]["event"] == "safe_state_source" and events[0]["file"] == str(state / "last-good-config.yaml")
    assert sorted(e["device"] for e in events if e["event"] == "safe_state_set") == [
        "led_strip", "relay_switch", "servo_motor"]


def test_where_systemd_allows_a_drop_in_makes_it_notify_reload(stage: Path) -> None:
    subprocess.run(["bash", str(REPO / "systemd" / "install.sh")],
                   env={**os.environ, "ROOT": str(stage), "SYSTEMD_VERSION": "254"}, check=True, capture_output=True,
                   timeout=600)
    dropin = (stage / "etc/systemd/system/pi-controller.service.d/notify-reload.conf").read_text()
    assert "[Service]\nType=notify-reload\n" in dropin and "\nExecReload=\n" in dropin  # systemd signals, waits


def test_a_staged_install_runs_its_plugins_with_their_manifests(stage: Path, tmp_path: Path) -> None:
    """What install.sh put in place, run as installed: Home Assistant gets the thermostat's setpoint entity from
    its manifest's config_schema, and a setpoint the schema refuses fails the check the unit's reload runs."""
    from tests.test_mqtt import AMQTT, MOSQUITTO, NODE, Broker, Subscriber

    if not (MOSQUITTO or AMQTT):
        pytest.skip("no broker: install Debian's mosquitto (.ci/run does) or amqtt from PyPI")
    command = str(stage / "opt/pi-controller/venv/bin/pi-controller")
    plugins = str(stage / "var/lib/pi-controller/plugins")
    data = yaml.safe_load((stage / "etc/pi-controller/config.yaml").read_text())
    data["mqtt"].update(enabled=True, host="127.0.0.1", node_id=NODE)
    broker = Broker(tmp_path)
    broker.start()
    subscriber = None
    process = None
    stderr = ""
    try:
        data["mqtt"]["port"] = broker.port
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(data))
        subscriber = Subscriber(broker.port)
        process = subprocess.Popen([command, "run", "--config", str(config), "--simulate", "--plugins", plugins,
                                    "--log-format", "json"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True)
        topic = f"homeassistant/number/{NODE}/plugin_temperature_control_config_setpoint/config"
        entity = json.loads(subscriber.wait_for(lambda: subscriber.on(topic), 120)[-1])
        assert (entity["min"], entity["max"], entity["unit_of_measurement"]) == (5, 30, "°C")
        data["plugins"]["settings"]["temperature_control"]["config"]["setpoint"] = 80
        config.write_text(yaml.safe_dump(data))
        check = subprocess.run([command, "check-config", str(config), "--plugins", plugins], capture_output=True,
                               text=True, timeout=120)
        assert check.returncode == 2 and "config 'setpoint': 80 is above the maximum 30" in check.stderr
    finally:
        if process is not None:
            process.terminate()
            _, stderr = process.communicate(timeout=60)
        if subscriber is not None:
            subscriber.close()
        broker.stop()
    events = [json.loads(line) for line in stderr.splitlines()]
    loaded = {e["plugin"]: e.get("version") for e in events if e["event"] == "plugin_loaded"}
    assert loaded == {p.stem: yaml.safe_load(p.read_text())["version"] for p in (REPO / "plugins").glob("*.yaml")}


def fake_commands(folder: Path, **answers: str) -> dict[str, str]:
    """An environment whose PATH puts `folder` first, holding a command per `answers` that prints its answer,
    and the installers (apt-get, python3, pip, systemctl) as commands that note they were called."""
    folder.mkdir()
    for name, answer in answers.items():
        (folder / name).write_text(f"#!/bin/sh\necho {answer}\n")
    for name in ("apt-get", "python3", "pip", "pip3", "systemctl", "systemd-sysusers", "raspi-config"):
        (folder / name).write_text(f"#!/bin/sh\necho {name} \"$@\" >> {folder}/called\n")
    for command in folder.iterdir():
        command.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"}


@pytest.mark.parametrize("arch", ["armhf", "armel", "i386"])
def test_a_32_bit_userland_is_refused_before_anything_is_installed(tmp_path: Path, arch: str) -> None:
    """A 32-bit Raspberry Pi OS (even on a 64-bit kernel: uname says aarch64) stops at once, in one line."""
    env = fake_commands(tmp_path / "bin", dpkg=arch, uname="aarch64")
    root = tmp_path / "root"
    root.mkdir()
    staged = subprocess.run(["bash", str(REPO / "systemd" / "install.sh")], env={**env, **BOOKWORM, "ROOT": str(root)},
                            capture_output=True, text=True, timeout=60)
    # As the owner runs it (not root here, so that nothing of this machine's could be touched if the check failed).
    (tmp_path / "bin" / "id").write_text("#!/bin/sh\necho 1000\n")
    (tmp_path / "bin" / "id").chmod(0o755)
    live = subprocess.run(["bash", str(REPO / "systemd" / "install.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    for result in (staged, live):
        assert result.returncode == 1
        assert result.stdout == ""
        line, = result.stderr.splitlines()
        assert "64-bit Raspberry Pi OS (arm64) is required" in line and f"this system is {arch}" in line
        assert "Raspberry Pi Imager" in line  # what to do instead
    assert not (tmp_path / "bin" / "called").exists()  # no apt-get, no venv, no pip
    assert list(root.iterdir()) == []


def test_no_step_for_32_bit_builds_is_left() -> None:
    script = (REPO / "systemd" / "install.sh").read_text()
    assert "swig" not in script and "liblgpio-dev" not in script
    assert script.index("dpkg --print-architecture") < script.index("apt-get install") < script.index("/pip\" install")


def checkout_files(folder: str, names: list[str]) -> set[str]:
    """What a copy of the checkout leaves out: what git does not hold (its own folder, the venv, builds, caches)
    and whatever is no file or folder (a FIFO a command left there: copytree cannot copy it)."""
    left_out = shutil.ignore_patterns(".git", ".venv", "build", "__pycache__", ".*_cache")(folder, names)
    return left_out | {name for name in names if not (os.path.isfile(os.path.join(folder, name))
                                                       or os.path.isdir(os.path.join(folder, name)))}


def test_reinstall_brings_the_checkouts_signatures_and_drops_a_stale_one(stage: Path, tmp_path: Path) -> None:
    """An upgrade from a checkout whose plugins were signed (`plugin sign`) installs each .sig with its module,
    and a .sig signed in the folder over an earlier version goes with it: a .sig that does not verify is refused,
    so before this the installer's own check-config failed (exit 2) on the stale one."""
    command = str(stage / "opt/pi-controller/venv/bin/pi-controller")
    clone = tmp_path / "clone"
    shutil.copytree(REPO, clone, ignore=checkout_files)
    key = tmp_path / "key.pem"
    subprocess.run([command, "plugin", "keygen", str(key)], check=True, capture_output=True, timeout=60)
    sign = [command, "plugin", "sign", "--key", str(key)]
    subprocess.run([*sign, str(clone / "plugins/temperature_control.wasm")], check=True, capture_output=True,
                   timeout=60)
    installed = stage / "var/lib/pi-controller/plugins"
    manifest = installed / "motion_light.yaml"
    manifest.write_text(re.sub(r"^version: .*$", "version: 0.0.1", manifest.read_text(), count=1, flags=re.M))
    subprocess.run([*sign, str(installed / "motion_light.wasm")], check=True, capture_output=True, timeout=60)
    config = stage / "etc/pi-controller/config.yaml"
    kept = config.read_text()
    config.write_text(kept.replace("\nplugins:\n", f"\nplugins:\n  trusted_keys: [{key}.pub]\n", 1))
    try:
        result = subprocess.run(["bash", str(clone / "systemd/install.sh")], capture_output=True, text=True,
                                env={**os.environ, **BOOKWORM, "ROOT": str(stage)}, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        signature = (installed / "temperature_control.sig").read_bytes()
        assert signature == (clone / "plugins/temperature_control.sig").read_bytes()
        assert not (installed / "motion_light.sig").exists()
        assert manifest.read_bytes() == (REPO / "plugins/motion_light.yaml").read_bytes()
    finally:  # the stage as the other tests know it
        config.write_text(kept)
        (installed / "temperature_control.sig").unlink(missing_ok=True)
