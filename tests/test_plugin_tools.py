"""The author's kit: `plugin call` shows commands and verdicts, `plugin new` makes a source that builds
and works, in Zig and in C; the C example on the C helper controls its relay."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest
import structlog

from pi_controller import cli
from pi_controller.plugins import build, templates
from tests.conftest import BUNDLED_PLUGINS, EXAMPLE_CONFIG, REPO, TEST_PLUGINS, skip_unless_ci


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """cli.main configures structlog onto this test's captured stderr, closed after it: put it back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def context(**values: float) -> dict[str, Any]:
    return {"sensor_readings": [{"sensor_id": s, "value": v, "unit": "", "timestamp": 1.0, "valid": True}
                                for s, v in values.items()],
            "device_states": {"led_strip": {"type": "pwm", "on": False, "value": 0.0, "duty_cycle": 0.0},
                              "relay_switch": {"type": "relay", "on": False, "value": 0}},
            "timestamp": 1.0, "tick": 1}


def call(capsys, tmp_path: Path, wasm: Path, ctx: dict[str, Any], *extra: str) -> tuple[int, dict[str, Any]]:
    (tmp_path / "ctx.json").write_text(json.dumps(ctx))
    code = cli.main(["plugin", "call", str(wasm), "--context", str(tmp_path / "ctx.json"), *extra])
    return code, json.loads(capsys.readouterr().out)


def test_call_prints_the_commands_and_their_verdicts(capsys, tmp_path) -> None:
    code, report = call(capsys, tmp_path, BUNDLED_PLUGINS / "temperature_control.wasm",
                        context(temperature_sensor=18.0))
    assert code == 0 and report["accepted"] == [{"device_id": "relay_switch", "action": "set_high", "target": 1.0}]
    assert report["rejected"] == [] and report["fuel"] == 2_000_000


def test_call_shows_rejections_under_the_config_s_actuators(capsys, tmp_path) -> None:
    ctx = context() | {"config": {"output": '[{"device_id":"led_strip","action":"pwm","parameters":{"duty_cycle":140}},'
                                            '{"device_id":"toaster","action":"set_high"}]'}}
    code, report = call(capsys, tmp_path, TEST_PLUGINS / "echo_output.wasm", ctx, "--config", str(EXAMPLE_CONFIG))
    assert code == 1 and report["accepted"] == []
    assert [r["rule"] for r in report["rejected"]] == ["out_of_range", "unknown_device"]


def test_call_feeds_the_context_s_history_to_pi_history(capsys, tmp_path) -> None:
    ctx = dict(context(light=90.0), history={"light": [[0.8, 10.0], [0.9, 20.0], [0.95, 40.0]]})
    code, report = call(capsys, tmp_path, TEST_PLUGINS / "smoothed_light.wasm", ctx)
    assert code == 0 and report["accepted"] == [{"device_id": "led_strip", "action": "pwm", "target": 40.0}]


def test_call_reports_a_failed_call_with_its_reason(capsys, tmp_path) -> None:
    code, report = call(capsys, tmp_path, TEST_PLUGINS / "trap.wasm", context())
    assert code == 1
    assert report["error"] == {"kind": "trap", "reason": "wasm trap: wasm `unreachable` instruction executed"}


@pytest.mark.parametrize("lang", ["zig", "c", "ts"])
def test_new_makes_a_plugin_that_builds_and_works(capsys, tmp_path, lang: str) -> None:
    if lang == "ts":
        try:
            build.check_assemblyscript(REPO)  # Node.js, npm and the pinned compiler
        except build.BuildError as exc:
            skip_unless_ci(str(exc))
    assert cli.main(["plugin", "new", "attic-fan", "--lang", lang, "--dir", str(tmp_path / "new")]) == 0
    (tmp_path / "new").rename(tmp_path / "moved")  # a plugin's folder is the author's: it may go anywhere
    assert cli.main(["plugin", "build", str(tmp_path / "moved" / f"attic-fan.{lang}")]) == 0  # outside the repository
    capsys.readouterr()
    wasm = tmp_path / "moved" / "attic-fan.wasm"
    code, report = call(capsys, tmp_path, wasm, context(light_sensor=900.0, motion_sensor=1.0))
    assert code == 0 and report["accepted"] == [{"device_id": "led_strip", "action": "set_low", "target": 0.0}]
    code, report = call(capsys, tmp_path, wasm, context(light_sensor=100.0))  # dark: on
    assert code == 0 and report["accepted"] == [{"device_id": "led_strip", "action": "set_high", "target": 100.0}]


@pytest.mark.parametrize("celsius,expected", [(2.0, "set_high"), (5.5, None), (8.0, "set_low")])
def test_the_c_example_guards_against_frost(capsys, tmp_path, celsius: float, expected: str | None) -> None:
    code, report = call(capsys, tmp_path, REPO / "plugins" / "examples" / "frost_guard.wasm",
                        context(temperature_sensor=celsius))
    assert code == 0 and [c["action"] for c in report["accepted"]] == ([expected] if expected else [])


@pytest.mark.parametrize("name", ["safety", "operator", "two words", "x" * 65, "attic.fan"])
def test_new_refuses_a_name_the_daemon_would_refuse(capsys, tmp_path, name: str) -> None:
    """One name rule (`names`): what `plugin new` writes, the daemon loads."""
    assert cli.main(["plugin", "new", name, "--dir", str(tmp_path)]) == 2
    assert "not 'operator' or 'safety'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_the_author_s_loop_works_in_a_folder_outside_the_repository(capsys, tmp_path, monkeypatch) -> None:
    """new -> build -> call -> simulate -> install, as docs/plugins.md walks it, from a folder of one's own."""
    work, daemon = tmp_path / "my_plugin", tmp_path / "daemon_plugins"
    work.mkdir(), daemon.mkdir()
    monkeypatch.chdir(work)
    assert not work.resolve().is_relative_to(REPO)
    assert cli.main(["plugin", "new", "porch_light"]) == 0  # into the current folder
    said = capsys.readouterr().out
    assert sorted(p.name for p in work.iterdir()) == ["porch_light.context.json", "porch_light.scenario.yaml",
                                                      "porch_light.yaml", "porch_light.zig"]
    assert "pi-controller plugin build porch_light.zig" in said

    assert cli.main(["plugin", "build", "porch_light.zig"]) == 0
    assert capsys.readouterr().out.startswith("built porch_light.wasm (")
    assert (work / "porch_light.wasm").read_bytes()[:4] == b"\0asm"

    assert cli.main(["plugin", "call", "porch_light.wasm", "--context", "porch_light.context.json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accepted"] == [{"device_id": "led_strip", "action": "set_low", "target": 0.0}]

    assert cli.main(["simulate", "--config", "porch_light.scenario.yaml", "--plugins", str(work),
                     "--duration", "15m"]) == 0
    verdict = capsys.readouterr().out.splitlines()
    switches = next(line for line in verdict if line.startswith("led_strip (pwm): "))
    assert int(switches.split()[2]) >= 4  # on at each dusk, off at each dawn of three five-minute days
    assert "no actuator flapped (more than 6 switches in a minute)" in verdict
    assert "plugins without errors or rejected commands: porch_light" in verdict

    assert cli.main(["plugin", "install", "porch_light.wasm", "--plugins-dir", str(daemon)]) == 0
    assert sorted(p.name for p in daemon.iterdir()) == ["porch_light.wasm", "porch_light.yaml"]  # no staging left
    for name in ("porch_light.wasm", "porch_light.yaml"):
        assert (daemon / name).read_bytes() == (work / name).read_bytes()


def one_line_error(capsys, args: list[str], code: int = 2) -> str:
    assert cli.main(args) == code
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert captured.out == "" and line.startswith("error: ")
    return line


@pytest.fixture
def plugin_copy(tmp_path) -> Path:
    """The bundled energy_saver with its manifest, in a folder of its own."""
    folder = tmp_path / "work"
    folder.mkdir()
    for suffix in (".wasm", ".yaml"):
        (folder / f"energy_saver{suffix}").write_bytes((BUNDLED_PLUGINS / f"energy_saver{suffix}").read_bytes())
    return folder / "energy_saver.wasm"


@pytest.mark.parametrize("damage, said", [
    (lambda wasm: wasm.with_suffix(".yaml").write_text("fuel: [\n"), "manifest "),
    (lambda wasm: wasm.with_suffix(".yaml").write_text("limits: {fuel: 10}\n"), "limits.fuel"),
    (lambda wasm: wasm.write_text("(module)"), "not a WebAssembly binary module"),
])
def test_call_and_install_refuse_a_plugin_the_daemon_would_not_load_in_one_line(capsys, tmp_path, plugin_copy,
                                                                                 damage, said: str) -> None:
    damage(plugin_copy)
    (tmp_path / "ctx.json").write_text(json.dumps(context(light_sensor=900.0)))
    line = one_line_error(capsys, ["plugin", "call", str(plugin_copy), "--context", str(tmp_path / "ctx.json")])
    assert said in line and line.count(plugin_copy.name) == 1  # the file named once, as it was given
    daemon = tmp_path / "daemon"
    daemon.mkdir()
    (daemon / "energy_saver.wasm").write_bytes(b"the running version")
    line = one_line_error(capsys, ["plugin", "install", str(plugin_copy), "--plugins-dir", str(daemon)])
    assert said in line and ".install-" not in line
    assert line.startswith(f"error: {plugin_copy}: ") and line.count(plugin_copy.name) == 1
    assert [p.name for p in daemon.iterdir()] == ["energy_saver.wasm"]  # untouched
    assert (daemon / "energy_saver.wasm").read_bytes() == b"the running version"


def test_install_checks_the_plugin_under_the_config_s_ceilings_and_folder(capsys, tmp_path, plugin_copy) -> None:
    daemon = tmp_path / "daemon"
    daemon.mkdir()
    config_file = tmp_path / "config.yaml"
    scenario = templates.SCENARIO.format(name="energy_saver")
    config_file.write_text(scenario.replace("directory: .", "directory: daemon\n  ceilings: {max_fuel: 1000}"))
    assert "max_fuel" in one_line_error(capsys, ["plugin", "install", str(plugin_copy), "--config", str(config_file)])
    assert not list(daemon.iterdir())
    config_file.write_text(scenario.replace("directory: .", "directory: daemon"))
    assert cli.main(["plugin", "install", str(plugin_copy), "--config", str(config_file)]) == 0
    assert sorted(p.name for p in daemon.iterdir()) == ["energy_saver.wasm", "energy_saver.yaml"]


def test_install_of_a_version_without_a_manifest_removes_the_old_one(capsys, tmp_path, plugin_copy) -> None:
    daemon = tmp_path / "daemon"
    daemon.mkdir()
    assert cli.main(["plugin", "install", str(plugin_copy), "--plugins-dir", str(daemon)]) == 0
    plugin_copy.with_suffix(".yaml").unlink()
    assert cli.main(["plugin", "install", str(plugin_copy), "--plugins-dir", str(daemon)]) == 0
    assert [p.name for p in daemon.iterdir()] == ["energy_saver.wasm"]  # no manifest describing another module


@pytest.mark.parametrize("args, said", [
    (["plugin", "build", "{tmp}/nothing.zig"], "nothing.zig: no such file"),
    (["plugin", "build", "{tmp}/notes.txt"], "notes.txt: not a plugin source"),
    (["plugin", "install", "{tmp}/nothing.wasm", "--plugins-dir", "{tmp}"], "nothing.wasm: no such plugin file"),
    (["plugin", "install", "{tmp}/safety.wasm", "--plugins-dir", "{tmp}"], "is not a plugin name"),
    (["plugin", "install", f"{BUNDLED_PLUGINS}/energy_saver.wasm", "--plugins-dir", "{tmp}/none"],
     "the plugins folder {tmp}/none does not exist"),
    (["plugin", "install", f"{BUNDLED_PLUGINS}/energy_saver.wasm", "--plugins-dir", str(BUNDLED_PLUGINS)],
     "is in the plugins folder already"),
    (["plugin", "new", "porch", "--dir", "{tmp}/notes.txt"], "--dir {tmp}/notes.txt is not a folder"),
])
def test_kit_mistakes_are_one_line_and_exit_2(capsys, tmp_path, args: list[str], said: str) -> None:
    (tmp_path / "notes.txt").write_text("not a plugin")
    line = one_line_error(capsys, [arg.format(tmp=tmp_path) for arg in args])
    assert said.format(tmp=tmp_path) in line


def test_new_writes_nothing_over_an_author_s_files(capsys, tmp_path) -> None:
    (tmp_path / "porch.scenario.yaml").write_text("mine")
    assert "porch.scenario.yaml already there" in one_line_error(capsys, ["plugin", "new", "porch", "--dir",
                                                                          str(tmp_path)])
    assert [p.name for p in tmp_path.iterdir()] == ["porch.scenario.yaml"]


def test_build_of_a_source_that_does_not_compile_shows_the_compiler_s_message(capsys, tmp_path) -> None:
    source = tmp_path / "broken.zig"
    source.write_text("export fn control_logic() i32 { return undefined_name; }\n")
    assert cli.main(["plugin", "build", str(source)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: building {source} failed:") and "undefined_name" in err
    assert not source.with_suffix(".wasm").exists()
