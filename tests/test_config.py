"""Every validation rule: the error names the file, the line, the key path and what would be valid."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pi_controller import config
from pi_controller.config import MqttSettings
from pi_controller.devices.digital import DigitalSettings
from pi_controller.devices.mcp3008 import MCP3008Settings
from pi_controller.devices.pwm import PwmSettings
from pi_controller.devices.relay import RelaySettings
from pi_controller.devices.servo import ServoSettings
from pi_controller.mqtt.inbox import BURST_S, Gate
from tests.conftest import EXAMPLE_CONFIG, example_data


def error_for(write_config, data: dict[str, Any] | str) -> config.ConfigError:
    path = write_config(data)
    with pytest.raises(config.ConfigError) as caught:
        config.load(path)
    assert caught.value.file == str(path)
    return caught.value


def test_example_config_loads_with_the_seed_device_ids() -> None:
    settings = config.load(EXAMPLE_CONFIG)
    assert {s.id: s.unit for s in settings.sensors} == {
        "temperature_sensor": "celsius", "motion_sensor": "boolean", "light_sensor": "lux"}
    assert {a.id: type(a) for a in settings.actuators} == {
        "led_strip": PwmSettings, "servo_motor": ServoSettings, "relay_switch": RelaySettings}
    assert settings.loop.rate_hz == 10.0
    assert settings.plugins_directory() == (EXAMPLE_CONFIG.parent.parent / "plugins").resolve()


def test_defaults_fill_what_the_file_leaves_out(write_config) -> None:
    settings = config.load(write_config("sensors:\n  - {id: door, kind: button, pin: 5}\n"))
    assert settings.loop.rate_hz == 10.0
    assert settings.pins.factory == "lgpio"
    assert settings.sensors == (DigitalSettings(id="door", kind="button", pin=5),)
    assert settings.plugins.defaults.timeout_ms == 10.0


def test_unknown_key_suggests_the_close_one(write_config) -> None:
    data = example_data()
    data["loop"]["rate_hx"] = 5
    error = error_for(write_config, data)
    assert error.path == ("loop", "rate_hx")
    assert "did you mean 'rate_hz'" in error.message
    lines = write_config(data).read_text().splitlines()
    assert lines[error.line - 1].strip() == "rate_hx: 5"


def test_wrong_type_names_the_expected_type(write_config) -> None:
    data = example_data()
    data["actuators"][0]["frequency"] = "fast"
    error = error_for(write_config, data)
    assert error.path == ("actuators", 0, "frequency")
    assert "expected a number, got a string ('fast')" in error.message


def test_boolean_is_not_a_number(write_config) -> None:
    data = example_data()
    data["sensors"][0]["channel"] = True
    error = error_for(write_config, data)
    assert error.path == ("sensors", 0, "channel")
    assert "expected an integer" in error.message


def test_missing_required_field(write_config) -> None:
    data = example_data()
    del data["sensors"][0]["channel"]
    error = error_for(write_config, data)
    assert error.path == ("sensors", 0, "channel")
    assert "missing required key 'channel'" in error.message


def test_unknown_kind_lists_the_valid_kinds(write_config) -> None:
    data = example_data()
    data["sensors"][1]["kind"] = "thermometer"
    error = error_for(write_config, data)
    assert error.path == ("sensors", 1, "kind")
    assert "ds18b20" in error.message and "mcp3008" in error.message


def test_duplicate_id(write_config) -> None:
    data = example_data()
    data["actuators"][1]["id"] = "led_strip"
    error = error_for(write_config, data)
    assert error.path == ("actuators", 1, "id")
    assert "duplicate id 'led_strip', already used at actuators[0]" in error.message


def test_two_devices_on_one_pin(write_config) -> None:
    data = example_data()
    data["actuators"][2]["pin"] = data["sensors"][1]["pin"]
    error = error_for(write_config, data)
    assert error.path == ("actuators", 2, "pin")
    assert "GPIO17 (pin) is already used by sensors[1]" in error.message


def test_spi_pins_are_shared_by_adc_channels_but_not_with_other_devices(write_config) -> None:
    data = example_data()
    config.load(write_config(data))  # two MCP3008 channels on one bus are fine
    data["actuators"][0]["pin"] = 11
    error = error_for(write_config, data)
    assert error.path == ("actuators", 0, "pin")
    assert "GPIO11" in error.message and "sensors[0]" in error.message


@pytest.mark.parametrize("section,index,key,value,expected", [
    ("actuators", 0, "max_duty", 120, "120 is out of range; valid: 0 to 100"),
    ("actuators", 0, "pin", 40, "40 is out of range; valid: 0 to 27"),
    ("sensors", 0, "channel", 9, "channel 9 is out of range; an MCP3008 has channels 0 to 7"),
    ("actuators", 1, "min_angle", 120, "min_angle 120 must be below max_angle 90"),
    ("actuators", 0, "min_duty", 50, None),  # fine alone, see the next case
])
def test_bad_range(write_config, section, index, key, value, expected) -> None:
    data = example_data()
    data[section][index][key] = value
    if expected is None:
        config.load(write_config(data))
        return
    error = error_for(write_config, data)
    assert expected in error.message
    assert error.path[:2] == (section, index)


def test_min_duty_above_max_duty(write_config) -> None:
    data = example_data()
    data["actuators"][0].update(min_duty=60, max_duty=40)
    error = error_for(write_config, data)
    assert error.path == ("actuators", 0)
    assert "min_duty 60 is above max_duty 40" in error.message


def test_bad_id_characters(write_config) -> None:
    data = example_data()
    data["sensors"][0]["id"] = "temp sensor/1"
    error = error_for(write_config, data)
    assert error.path == ("sensors", 0, "id")
    assert "letters, digits" in error.message


def test_literal_choices_are_listed(write_config) -> None:
    data = example_data()
    data["actuators"][2]["safe_state"] = "maybe"
    error = error_for(write_config, data)
    assert error.path == ("actuators", 2, "safe_state")
    assert "'off', 'on'" in error.message


def test_simulation_reference_must_exist(write_config) -> None:
    data = example_data()
    data["simulation"][0]["heater"] = "boiler"
    error = error_for(write_config, data)
    assert error.path == ("simulation", 0, "heater")
    assert "no actuator with id 'boiler'" in error.message


def test_plugin_timeouts_must_fit_the_tick(write_config) -> None:
    data = example_data()
    data["plugins"]["settings"]["temperature_control"]["timeout_ms"] = 55
    error = error_for(write_config, data)
    assert error.path == ("plugins", "settings")
    assert "add up to 75.0 ms, over the plugin budget of 60.0 ms" in error.message


def test_default_timeout_must_fit_the_tick(write_config) -> None:
    data = example_data()
    data["loop"]["rate_hz"] = 100
    error = error_for(write_config, data)
    assert error.path == ("plugins", "defaults", "timeout_ms")
    assert "does not fit the plugin budget of 6.0 ms" in error.message


def test_yaml_syntax_error_has_a_line(write_config) -> None:
    error = error_for(write_config, "loop:\n  rate_hz: [10\nsensors: []\n")
    assert "not valid YAML" in error.message
    assert error.line == 3


def test_duplicate_yaml_key(write_config) -> None:
    error = error_for(write_config, "loop:\n  rate_hz: 10\n  rate_hz: 20\n")
    assert error.path == ("loop", "rate_hz")
    assert error.message == "duplicate key"
    assert error.line == 3


def test_non_finite_number_is_refused(write_config) -> None:
    error = error_for(write_config, "loop:\n  rate_hz: .nan\n")
    assert "finite" in error.message


def test_missing_file(tmp_path) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.load(tmp_path / "nope.yaml")
    assert "cannot read the file" in caught.value.message


def test_error_text_reads_file_line_key_and_fix(write_config) -> None:
    data = example_data()
    data["actuators"][0]["max_duty"] = 120
    path = write_config(data)
    with pytest.raises(config.ConfigError) as caught:
        config.load(path)
    line = caught.value.line
    assert str(caught.value) == (f"{path}:{line}: actuators[0].max_duty: 120 is out of range; valid: 0 to 100")
    assert path.read_text().splitlines()[line - 1].strip().startswith("max_duty")


def test_settings_are_immutable() -> None:
    settings = config.load(EXAMPLE_CONFIG)
    with pytest.raises(AttributeError):
        settings.loop.rate_hz = 1  # type: ignore[misc]
    assert isinstance(settings.sensors[0], MCP3008Settings)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pi_controller", *args], capture_output=True, text=True,
                          timeout=60)


def test_cli_bad_config_exits_2_before_touching_a_pin(write_config) -> None:
    data = example_data()
    data["actuators"][0]["pin"] = 17
    path = write_config(data)
    # No --simulate: with a valid config this would try to open the Pi's GPIO chip and fail differently.
    result = run_cli("run", "--config", str(path))
    assert result.returncode == 2
    assert f"config error: {path}:" in result.stderr
    assert "actuators[0].pin: GPIO17 (pin) is already used by sensors[1]" in result.stderr
    assert "hardware_setup_failed" not in result.stderr
    assert result.stdout == ""


def test_check_config_accepts_the_example_and_rejects_a_bad_one(write_config) -> None:
    ok = run_cli("check-config", str(EXAMPLE_CONFIG))
    assert ok.returncode == 0, ok.stderr
    assert "OK (3 sensors, 3 actuators" in ok.stdout
    data = example_data()
    data["sensors"][0]["scale"] = 0
    bad = run_cli("check-config", str(write_config(data)))
    assert bad.returncode == 2
    assert "sensors[0]: scale must not be 0" in bad.stderr


def test_check_config_never_creates_a_pin_factory(write_config) -> None:
    code = ("from gpiozero import Device; from pi_controller import config; "
            f"config.load({str(EXAMPLE_CONFIG)!r}); print(Device.pin_factory)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "None", result.stderr


def test_check_config_does_not_load_gpiozero() -> None:
    """Device kinds build their gpiozero devices lazily: checking a config on a desktop needs none of it."""
    code = ("import sys; from pi_controller import cli; "
            f"code = cli.main(['check-config', {str(EXAMPLE_CONFIG)!r}]); "
            "print(code, sorted(m for m in sys.modules if m.split('.')[0] in ('gpiozero', 'lgpio')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "0 []", result.stdout + result.stderr


@pytest.mark.parametrize("value", ["2024-01-01", ".inf"])
def test_plugin_config_must_be_plain_json(write_config, value) -> None:
    error = error_for(write_config, f"plugins:\n  settings:\n    p:\n      config:\n        since: {value}\n")
    assert error.path == ("plugins", "settings", "p")
    assert "plain JSON values" in error.message


def test_allowed_paths_must_map_directories_to_guest_paths(write_config) -> None:
    error = error_for(write_config, "plugins:\n  settings:\n    p:\n      allowed_paths: [/srv/data]\n")
    assert error.path == ("plugins", "settings", "p", "allowed_paths")
    assert "expected a mapping, got a list" in error.message


@pytest.mark.parametrize("sensor,message", [
    ({"id": "m", "kind": "motion", "pin": 2}, "GPIO2 has a fixed pull-up on a Pi (I2C)"),
    ({"id": "l", "kind": "light", "pin": 3}, "GPIO3 has a fixed pull-up (I2C)"),
    ({"id": "d", "kind": "distance", "echo": 2, "trigger": 4}, "echo on GPIO2 would fight its fixed pull-up"),
    ({"id": "d", "kind": "distance", "echo": 5, "trigger": 5}, "echo and trigger must be different pins"),
    ({"id": "d", "kind": "distance", "echo": 5, "trigger": 6, "max_distance": 0}, "0 is out of range"),
    ({"id": "w", "kind": "ds18b20", "device": "28-0316a2790aff", "poll_interval_s": 0}, "takes ~750 ms"),
    ({"id": "a", "kind": "mcp3008", "channel": 0, "unit": "V", "chip_select": 1.0}, "1.0 is not one of 0, 1"),
    ({"id": "a", "kind": ["mcp3008"], "unit": "V"}, "unknown or missing kind ['mcp3008']"),
    ({"id": "t", "kind": "mcp3008", "channel": 0, "unit": "C", "valid_min": 5, "valid_max": 1},
     "valid_min 5 must be below valid_max 1"),
])
def test_what_gpiozero_would_refuse_later_is_refused_now(write_config, sensor, message) -> None:
    error = error_for(write_config, {"sensors": [sensor]})
    assert error.path[:2] == ("sensors", 0)
    assert message in error.message


def test_a_button_may_sit_on_the_i2c_pins(write_config) -> None:
    config.load(write_config({"sensors": [{"id": "b", "kind": "button", "pin": 2}]}))


def test_servo_pulses_must_fit_the_frame(write_config) -> None:
    data = example_data()
    data["actuators"][1].update(max_pulse_ms=5, frame_ms=5)
    assert "min_pulse_ms < max_pulse_ms < frame_ms" in error_for(write_config, data).message


def test_an_unquoted_off_gets_a_hint(write_config) -> None:
    error = error_for(write_config, "actuators:\n  - {id: r, kind: relay, pin: 5, safe_state: off}\n")
    assert error.path == ("actuators", 0, "safe_state")
    assert "quote it" in error.message


@pytest.mark.parametrize("text,line", [("loop:\n  rate_hz: !!int abc\n", 2), ("loop:\n  rate_hz: !foo 3\n", 2),
                                       ("? [a, b]\n: 1\n", 1)])
def test_yaml_values_that_cannot_be_constructed_are_config_errors(write_config, text, line) -> None:
    error = error_for(write_config, text)
    assert error.line == line


def test_safety_references_must_resolve(write_config) -> None:
    data = example_data()
    data["actuators"][2]["requires"] = ["temperature_sensor", "thermostat"]
    error = error_for(write_config, data)
    assert error.path == ("actuators", 2, "requires", 1)
    assert "no sensor with id 'thermostat'" in error.message
    data = example_data()
    data["interlocks"] = [{"actuators": ["relay_switch", "fan"]}]
    error = error_for(write_config, data)
    assert error.path == ("interlocks", 0, "actuators", 1)
    data["interlocks"] = [{"actuators": ["relay_switch", "relay_switch"]}]
    assert "two or more different actuators" in error_for(write_config, data).message


def test_watchdog_timeout_must_outlast_two_ticks(write_config) -> None:
    data = example_data()
    data["watchdog"] = {"timeout_s": 0.15}
    error = error_for(write_config, data)
    assert error.path == ("watchdog", "timeout_s")
    assert "shorter than two ticks (0.2 s" in error.message


@pytest.mark.skipif(Path("/dev/gpiochip0").exists(), reason="this machine has GPIO")
def test_cli_a_simulation_that_cannot_run_is_a_config_error(write_config, tmp_path) -> None:
    data = example_data()
    data["sensors"][0] = {"id": "temperature_sensor", "kind": "ds18b20", "device": "28-0316a2790aff",
                          "base_dir": "/proc/no-such-dir"}
    result = run_cli("run", "--config", str(write_config(data)), "--simulate", "--ticks", "1")
    assert result.returncode == 2
    assert "give it a writable place for simulated runs" in result.stderr


@pytest.mark.parametrize("text, key, line", [
    ("", "", 1),  # truncated to nothing
    ("# pi-controller\n\n# (the rest was lost)\n", "", 1),
    ("loop:\n  rate_hz: 10\n", "sensors", 1),  # cut off before the devices
    ("loop:\n  rate_hz: 10\nsensors: []\nactuators: []\n", "sensors", 3),
])
def test_a_config_with_nothing_to_control_is_refused_naming_the_key(write_config, text, key, line) -> None:
    error = error_for(write_config, text)
    assert (config.format_path(error.path), error.line) == (key, line)
    assert "config/example.yaml" in error.message  # the fix: where a complete config is


def test_a_config_with_sensors_only_is_fine(write_config) -> None:
    assert config.load(write_config("sensors:\n  - {id: door, kind: button, pin: 5}\n")).actuators == ()


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize("fault", ["empty", "missing folder", "file for a folder"])
def test_check_config_and_run_refuse_what_would_unload_everything_with_exit_2(write_config, tmp_path, command,
                                                                               fault) -> None:
    data = example_data()
    data["plugins"]["directory"] = "plugins"  # beside the config
    if fault == "file for a folder":
        (tmp_path / "plugins").write_text("")
    path = write_config("# nothing left\n" if fault == "empty" else data)
    result = run_cli(*([command, str(path)] if command == "check-config" else [command, "--config", str(path)]))
    assert result.returncode == 2
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("config error: ")]
    if fault == "empty":
        assert message.startswith(f"config error: {path}:1: (top level): the file is empty")
    else:
        line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "directory:" in text)
        what = "does not exist" if fault == "missing folder" else "is a file, not a folder"
        assert message.startswith(f"config error: {path}:{line}: plugins.directory: {tmp_path / 'plugins'} {what}; "
                                  "create the folder")
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_run_refuses_a_plugins_override_that_is_not_a_folder(tmp_path) -> None:
    result = run_cli("run", "--config", str(EXAMPLE_CONFIG), "--simulate", "--plugins", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert (f"config error: {EXAMPLE_CONFIG}: plugins.directory: {tmp_path / 'nope'} (given by --plugins) does "
            "not exist") in result.stderr


@pytest.mark.parametrize("hostname, node_id", [
    ("raspberrypi", "raspberrypi"), ("kitchen-pi.local", "kitchen-pi"), ("Pi 4 (garage)", "Pi-4-garage"),
    ("x" * 80, "x" * 64), ("...", "pi"), ("", "pi"),
])
def test_the_mqtt_node_id_defaults_to_the_hostname_as_an_id(hostname, node_id) -> None:
    assert config.host_node_id(hostname) == node_id


def test_the_example_leaves_the_node_id_to_the_hostname(monkeypatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "greenhouse.lan")
    assert config.load(EXAMPLE_CONFIG).mqtt.node_id == "greenhouse"


def mqtt_with(tmp_path: Path, **mqtt: Any) -> dict[str, Any]:
    data = example_data()
    data["mqtt"] = {"enabled": True, "username": "pi", **mqtt}
    return data


def test_the_mqtt_password_comes_from_its_own_file_without_the_trailing_newline(tmp_path, write_config) -> None:
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret with spaces \n")
    settings = config.load(write_config(mqtt_with(tmp_path, password_file=str(secret))))
    assert config.mqtt_secrets(settings).password == "s3cret with spaces "
    assert "s3cret" not in repr(settings)  # never held by the settings: not in a log line or a traceback


def test_a_config_with_credentials_loads_where_they_are_not_and_a_simulation_runs_on_it(tmp_path, write_config,
                                                                                        monkeypatch) -> None:
    """A Pi's config (or the one in its recording) on a laptop: only a connection needs the secrets."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    data = mqtt_with(tmp_path, password_file="${CREDENTIALS_DIRECTORY}/mqtt-password")
    settings = config.load(write_config(data))
    with pytest.raises(config.ConfigError, match="CREDENTIALS_DIRECTORY"):
        config.mqtt_secrets(settings)
    result = subprocess.run([sys.executable, "-m", "pi_controller", "simulate", "--config", str(settings.source),
                             "--duration", "10s"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_password_file_follows_systemds_credentials_directory(tmp_path, write_config, monkeypatch) -> None:
    (tmp_path / "mqtt-password").write_text("from-systemd\n")
    path = write_config(mqtt_with(tmp_path, password_file="${CREDENTIALS_DIRECTORY}/mqtt-password"))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert config.mqtt_secrets(config.load(path)).password == "from-systemd"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(config.ConfigError, match=r"mqtt\.password_file: \$\{CREDENTIALS_DIRECTORY\} is not set: "):
        config.mqtt_secrets(config.load(path))


@pytest.mark.parametrize("content, mqtt, message", [
    (None, {}, "{file} cannot be read: No such file or directory; fix the path"),  # as keys.read_small says it
    ("x" * 5000, {}, "{file} is longer than 4096 bytes: not a password file"),
    ("\n", {}, "{file} is empty"),
    ("pw", {"password": "inline"}, "give password or password_file, not both"),
])
def test_a_password_file_that_cannot_be_used_is_a_config_error_at_its_key(tmp_path, write_config, content, mqtt,
                                                                            message) -> None:
    secret = tmp_path / "mqtt-password"
    if content is not None:
        secret.write_text(content)
    data = mqtt_with(tmp_path, password_file=str(secret), **mqtt)
    error = secrets_error_for(write_config, data)
    assert error.path == ("mqtt", "password_file")
    assert error.line == data_line(error.file, "password_file:")
    assert error.message.startswith(message.format(file=secret))


def test_a_password_file_that_is_a_fifo_is_a_config_error_not_a_wait(tmp_path, write_config) -> None:
    """Read only as a regular file: the open of a FIFO nothing writes to waited for good, in `run` before the loop."""
    os.mkfifo(tmp_path / "mqtt-password")
    path = write_config(mqtt_with(tmp_path, password_file=str(tmp_path / "mqtt-password")))
    result = subprocess.run([sys.executable, "-m", "pi_controller", "check-config", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().endswith(f"mqtt.password_file: {tmp_path / 'mqtt-password'} is not a regular file")


def test_a_tls_key_passphrase_comes_from_a_file(tmp_path, write_config) -> None:
    for name in ("ca.crt", "client.crt", "client.key"):
        (tmp_path / name).write_text("-----BEGIN-----\n")  # read by paho when connecting, not here
    (tmp_path / "key-password").write_text("passphrase\n")
    tls = {"ca_file": str(tmp_path / "ca.crt"), "cert_file": str(tmp_path / "client.crt"),
           "key_file": str(tmp_path / "client.key"), "key_password_file": str(tmp_path / "key-password")}
    assert config.mqtt_secrets(config.load(write_config(mqtt_with(tmp_path, tls=tls)))).key_password == "passphrase"
    tls["key_password_file"] = str(tmp_path / "missing")
    error = secrets_error_for(write_config, mqtt_with(tmp_path, tls=tls))
    assert error.path == ("mqtt", "tls", "key_password_file") and error.line is not None


def secrets_error_for(write_config: Any, data: dict[str, Any]) -> config.ConfigError:
    """The error for `data`, whether loading it or reading its secrets (what `run` does first) finds it."""
    with pytest.raises(config.ConfigError) as caught:
        config.mqtt_secrets(config.load(write_config(data)))
    return caught.value


def data_line(file: str, key: str) -> int:
    return next(n for n, line in enumerate(Path(file).read_text().splitlines(), 1) if line.strip().startswith(key))


@pytest.mark.parametrize("mqtt, key, message", [
    ({"max_commands_per_s": 0}, "max_commands_per_s", "0 is out of range; valid: 1 to 10000"),
    ({"max_commands_per_s_per_topic": 20_000}, "max_commands_per_s_per_topic",
     "20000 is out of range; valid: 1 to 10000"),
    ({"max_commands_per_s": 10, "max_commands_per_s_per_topic": 20}, "max_commands_per_s_per_topic",
     "20 is above max_commands_per_s (10), which bounds every topic too: lower it or raise that"),
])
def test_the_command_rate_limits_are_bounded_settings(tmp_path, write_config, mqtt, key, message) -> None:
    error = error_for(write_config, mqtt_with(tmp_path, **mqtt))
    assert error.path == ("mqtt", key)
    assert error.line == data_line(error.file, f"{key}:")
    assert message in error.message


def test_the_command_gate_takes_its_rates_from_the_settings(tmp_path, write_config) -> None:
    mqtt = config.load(write_config(mqtt_with(tmp_path, max_commands_per_s=3, max_commands_per_s_per_topic=2))).mqtt
    gate = Gate.of(mqtt, timer=lambda: 0.0)
    assert sum(gate.admit("a")[0] for _ in range(10)) == 2 * BURST_S  # its burst: two seconds' worth
    assert sum(gate.admit("b")[0] for _ in range(10)) == 3 * BURST_S - 2 * BURST_S  # what is left of all
    assert (MqttSettings().max_commands_per_s, MqttSettings().max_commands_per_s_per_topic) == (50.0, 5.0)  # documented
