"""The author's kit: `plugin call` shows commands and verdicts, `plugin new` makes a source that builds
and works, in Zig and in C; the C example on the C helper controls its relay."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest
import structlog

from pi_controller import cli
from pi_controller.plugins import build
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
    code, report = call(capsys, tmp_path, BUNDLED_PLUGINS / "temperature_control.wasm", context(temperature_sensor=18.0))
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
    assert code == 1 and report["error"] == {"kind": "trap", "reason": "wasm trap: wasm `unreachable` instruction executed"}


@pytest.mark.parametrize("lang", ["zig", "c", "ts"])
def test_new_makes_a_plugin_that_builds_and_works(capsys, tmp_path, lang: str) -> None:
    if lang == "ts":
        try:
            build.check_assemblyscript(REPO)  # Node.js, npm and the pinned compiler
        except build.BuildError as exc:
            skip_unless_ci(str(exc))
    assert cli.main(["plugin", "new", "daylight_off", "--lang", lang, "--dir", str(tmp_path)]) == 0
    capsys.readouterr()
    wasm = tmp_path / "daylight_off.wasm"
    build.build(tmp_path / f"daylight_off.{lang}", wasm, REPO / build.PDK)
    code, report = call(capsys, tmp_path, wasm, context(light_sensor=900.0, motion_sensor=1.0))
    assert code == 0 and report["accepted"] == [{"device_id": "led_strip", "action": "set_low", "target": 0.0}]


@pytest.mark.parametrize("celsius,expected", [(2.0, "set_high"), (5.5, None), (8.0, "set_low")])
def test_the_c_example_guards_against_frost(capsys, tmp_path, celsius: float, expected: str | None) -> None:
    code, report = call(capsys, tmp_path, REPO / "plugins" / "examples" / "frost_guard.wasm",
                        context(temperature_sensor=celsius))
    assert code == 0 and [c["action"] for c in report["accepted"]] == ([expected] if expected else [])


@pytest.mark.parametrize("name", ["safety", "operator", "two-words", "x" * 65])
def test_new_refuses_a_name_the_daemon_would_refuse(capsys, tmp_path, name: str) -> None:
    """One name rule (`names`): what `plugin new` writes, the daemon loads."""
    assert cli.main(["plugin", "new", name, "--dir", str(tmp_path)]) == 2
    assert "not 'operator' or 'safety'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
