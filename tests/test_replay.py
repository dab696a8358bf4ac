"""Replay: a simulated run recorded, then its readings fed again to the same plugins (they agree on every
tick) and to a changed one (it differs at exactly the ticks its change decides otherwise)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pi_controller import config
from pi_controller.clock import VirtualClock
from pi_controller.sim import replay
from pi_controller.sim.record import Reader, RecordingError
from tests.conftest import BUNDLED_PLUGINS, example_data

TICKS = 600  # ten simulated minutes at 1 Hz: the room warms past the band and the heater cycles


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """A recording of the example (bundled plugins, the room model), and the config data it ran."""
    import asyncio

    from pi_controller.daemon import Daemon

    folder = tmp_path_factory.mktemp("recorded")
    data = example_data()
    data["loop"]["rate_hz"] = 1.0
    data["watchdog"] = {"timeout_s": 5.0}
    data["pins"] = {"factory": "mock"}
    data["record"] = {"path": "run.jsonl.gz"}
    path = folder / "config.yaml"
    path.write_text(json.dumps(data))
    daemon = Daemon(config.load(path), simulate=True, clock=VirtualClock())
    try:
        asyncio.run(daemon.serve(TICKS))
    finally:
        daemon.close()
    return folder / "run.jsonl.gz", data


def thermostat(temperature: float | None, on: bool, setpoint: float, hysteresis: float = 0.5) -> list[Any]:
    """The bundled temperature_control, in Python: what it commands for one reading, the heater `on` or not
    (in its band it says the heater's state again)."""
    if temperature is None or temperature < setpoint - hysteresis:
        return ["set_low", 0.0] if temperature is None else ["set_high", 1.0]
    if temperature > setpoint + hysteresis or not on:
        return ["set_low", 0.0]
    return ["set_high", 1.0]


def heater_states(lines: list[dict[str, Any]]) -> list[bool]:
    """Whether the heater was on as each line's plugins saw it (lines carry states that changed)."""
    on, out = False, []
    for line in lines:
        on = line.get("s", {}).get("relay_switch", {}).get("on", on)
        out.append(on)
    return out


def test_the_same_plugins_replayed_agree_on_every_tick(recorded) -> None:
    path, _ = recorded
    report = replay.replay(path, None, None)  # the config and plugins folder as recorded
    assert report["ticks"] == TICKS and report["skipped_lines"] == 0
    assert set(report["plugins"]) == {"energy_saver", "motion_light", "temperature_control"}
    for name, plugin in report["plugins"].items():
        assert plugin["agree"] == plugin["ticks"] == TICKS, name
        assert plugin["agreement_percent"] == 100.0
        assert plugin["sha256"] == plugin["recorded_sha256"]
        assert all(a["agree"] == TICKS for a in plugin["actuators"].values()), name
    heater = report["plugins"]["temperature_control"]["actuators"]["relay_switch"]
    assert heater["ticks"] == TICKS and "first_difference" not in heater
    # The safety rules on the replayed commands applied what the loop applied, tick for tick.
    assert report["safety"]["applied"]["agree"] == TICKS


def test_a_changed_setpoint_differs_at_exactly_the_ticks_it_decides_otherwise(recorded, tmp_path) -> None:
    path, data = recorded
    data = json.loads(json.dumps(data))
    data["plugins"]["settings"]["temperature_control"]["config"]["setpoint"] = 20.0
    data["plugins"]["directory"] = str(BUNDLED_PLUGINS)
    changed = tmp_path / "changed.yaml"
    changed.write_text(json.dumps(data))
    report = replay.replay(path, config.load(changed), None)

    lines = [line for _, line in Reader(path)]
    temperatures = [line.get("r", {}).get("temperature_sensor") for line in lines]
    states = heater_states(lines)
    expected = [n for n, (t, on) in enumerate(zip(temperatures, states))
                if thermostat(t, on, 21.0) != thermostat(t, on, 20.0)]
    assert expected, "the recorded room never left the band between the two setpoints"
    heater = report["plugins"]["temperature_control"]["actuators"]["relay_switch"]
    assert heater["ticks"] - heater["agree"] == len(expected)
    first = heater["first_difference"]
    assert first["tick"] == expected[0]
    t, on = temperatures[expected[0]], states[expected[0]]
    assert first["recorded"] == thermostat(t, on, 21.0) and first["replayed"] == thermostat(t, on, 20.0)
    # The other plugins are the same: they still agree on every tick.
    assert report["plugins"]["energy_saver"]["agree"] == TICKS
    assert report["plugins"]["motion_light"]["agree"] == TICKS


def test_a_window_of_the_recording_replays_alone(recorded) -> None:
    path, _ = recorded
    lines = [line for _, line in Reader(path)]
    start, end = lines[100]["t"], lines[199]["t"]
    report = replay.replay(path, None, None, start, end)
    assert report["ticks"] == 100
    assert report["plugins"]["temperature_control"]["agree"] == 100


def test_a_truncated_recording_replays_up_to_the_cut(recorded, tmp_path) -> None:
    import gzip

    path, _ = recorded
    plain = gzip.decompress(path.read_bytes())
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(plain[:plain.index(b'{"n":300,') + 40])
    report = replay.replay(cut, None, None)
    assert report["ticks"] == 300 and report["skipped_lines"] == 1
    assert report["plugins"]["temperature_control"]["agree"] == 300


def test_the_command_prints_the_report_and_refuses_what_is_no_recording(recorded, tmp_path, capsys,
                                                                      cli_logs) -> None:
    from pi_controller import cli

    path, _ = recorded
    lines = [line for _, line in Reader(path)]
    assert cli.main(["replay", str(path), "--from", str(lines[10]["t"]), "--to", str(lines[19]["t"])]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ticks"] == 10
    other = tmp_path / "other.txt"
    other.write_text("hello\n")
    assert cli.main(["replay", str(other)]) == 2
    assert "header" in capsys.readouterr().err
    with pytest.raises(RecordingError):
        replay.replay(path, None, None, start=lines[-1]["t"] + 1)


def test_a_simulate_recording_replays_like_a_pi_recording(write_config, tmp_path, cli_logs, capsys) -> None:
    from pi_controller import cli

    path = tmp_path / "sim.jsonl"
    assert cli.main(["simulate", "--config", str(write_config(example_data())), "--duration", "60s",
                     "--trace", str(tmp_path / "trace.csv"), "--record", str(path)]) == 0
    capsys.readouterr()
    report = replay.replay(path, None, None)
    assert report["ticks"] == 600
    assert all(p["agreement_percent"] == 100.0 for p in report["plugins"].values())


def test_a_reload_starts_a_new_header_and_replay_follows_it(run_daemon, tmp_path) -> None:
    from pi_controller.clock import SystemClock
    from tests.conftest import more_ticks, run_with

    data = example_data()
    data["record"] = {"path": str(tmp_path / "run.jsonl")}
    daemon = run_daemon(data, 0, clock=SystemClock())

    async def scenario() -> None:
        await more_ticks(daemon, 20)
        # The room is at 19 C: off from now on, where the thermostat had heated.
        data["plugins"]["settings"]["temperature_control"]["config"]["setpoint"] = 10.0
        data["plugins"]["settings"]["motion_light"]["enabled"] = False
        (daemon.settings.source).write_text(json.dumps(data))
        assert (await daemon.reload()).outcome == "applied"
        await more_ticks(daemon, 20)

    run_with(daemon, scenario)
    daemon.close()  # the recording ends
    path = tmp_path / "run.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    headers = [i for i, line in enumerate(lines) if "format" in line]
    assert len(headers) == 2 and headers[0] == 0
    second = lines[headers[1]]
    assert second["reason"] == "reload" and second["tick"] == lines[headers[1] + 1]["n"]
    assert set(lines[0]["plugins"]) - set(second["plugins"]) == {"motion_light"}
    assert lines[headers[1] - 1]["n"] == second["tick"] - 1  # between two ticks
    assert yaml_of(second["config"])["plugins"]["settings"]["temperature_control"]["config"]["setpoint"] == 10.0
    report = replay.replay(path, None, None)
    # Each part replayed under its own config: the plugins agree with what was recorded on every tick.
    assert [(s["tick"], s["reason"]) for s in report["segments"]] == [(0, "start"), (second["tick"], "reload")]
    for name, plugin in report["plugins"].items():
        assert plugin["agreement_percent"] == 100.0, (name, plugin)
    assert report["plugins"]["temperature_control"]["ticks"] == report["ticks"] == len(lines) - 2
    assert report["plugins"]["motion_light"]["ticks"] == second["tick"]  # unloaded by the reload


def yaml_of(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


@pytest.mark.slow  # matplotlib draws it
def test_the_plot_draws_recorded_and_replayed_actuators_over_the_readings(recorded, tmp_path, monkeypatch,
                                                                          cli_logs, capsys) -> None:
    from pi_controller import cli
    from pi_controller.sim import plot

    path, data = recorded
    drawn: list[tuple[Any, Any]] = []
    render = plot.render
    monkeypatch.setattr(plot, "render", lambda layout, binned, *rest: (drawn.append((layout, binned)),
                                                                      render(layout, binned, *rest)))
    data = json.loads(json.dumps(data))
    data["plugins"]["settings"]["temperature_control"]["config"]["setpoint"] = 20.0  # differs now and then
    data["plugins"]["directory"] = str(BUNDLED_PLUGINS)
    changed = tmp_path / "changed.yaml"
    changed.write_text(json.dumps(data))
    assert cli.main(["replay", str(path), "--config", str(changed), "--plot", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    layout, binned = drawn[0]
    panels = {p.unit: [s.column for s in p.series] for p in layout.panels}
    assert panels["celsius"] == ["temperature_sensor"]
    assert panels["relay"] == ["relay_switch.recorded", "relay_switch.replayed"]
    recorded_on, replayed_on = binned.mean("relay_switch.recorded"), binned.mean("relay_switch.replayed")
    assert binned.ticks == TICKS and (recorded_on != replayed_on).any()  # the lower setpoint heats less
    assert replayed_on.sum() < recorded_on.sum()
    # A folder that does not exist is refused before any replay, in one line.
    capsys.readouterr()
    assert cli.main(["replay", str(path), "--plot", str(tmp_path / "nowhere" / "r.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--plot" in err and "does not exist" in err


def head_of(recorded: Path, ticks: int) -> list[bytes]:
    """The header line and the first `ticks` tick lines of a recording, as written."""
    import gzip

    with gzip.open(recorded, "rb") as lines:
        return [next(lines) for _ in range(1 + ticks)]


def test_a_gzip_bomb_is_refused_in_one_line_with_memory_bounded(recorded, tmp_path, capsys, cli_logs,
                                                                write_config) -> None:
    import gzip
    import tracemalloc

    from pi_controller import cli

    bomb = tmp_path / "bomb.jsonl.gz"  # a real header, then 64 MiB of newlines in 64 KiB
    with gzip.open(bomb, "wb", compresslevel=9) as out:
        out.write(head_of(recorded[0], 0)[0])
        for _ in range(64):
            out.write(b"\n" * (1 << 20))
    assert bomb.stat().st_size < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(RecordingError, match="gzip bomb"):
            list(Reader(bomb))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # the whole of it would be 64 MiB, and its empty lines a list of 512 MiB
    assert cli.main(["replay", str(bomb)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"replay error: {bomb}: gzip data inflating past 200 times")
    assert cli.main(["simulate", "--config", str(write_config(example_data())), "--duration", "1m",
                     "--from-recording", str(bomb)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a gzip bomb, not a recording" in err


def test_a_line_past_the_cap_is_refused_naming_it(recorded, tmp_path) -> None:
    long = tmp_path / "long.jsonl"
    long.write_bytes(b"".join(head_of(recorded[0], 2)) + b'{"n": 3, "t": 1, "pad": "' + b"x" * (2 << 20))
    with pytest.raises(RecordingError, match=rf"^{long}:4: a line longer than 1048576 bytes"):
        list(Reader(long))


@pytest.mark.parametrize(("crafted", "every_reader"), [  # every_reader: refused by Reader, not only by replay
    ("[" * 100_000 + "]" * 100_000, True),  # json.loads: RecursionError
    ('{"n": 3, "t": 1e3, "r": [1]}', True),
    ('{"n": 3, "t": 1e3, "r": {"light_sensor": 1e999}}', True),
    ('{"n": 3, "t": 1e3, "r": {"light_sensor": [1]}}', True),
    ('{"n": 3, "t": 1e3, "bad": {"light_sensor": 1}}', True),
    ('{"n": 3, "t": NaN}', True),
    ('{"n": 3, "t": 1e3, "m": "x"}', True),
    ('{"n": 3, "t": 1e3, "e": []}', False),
    ('{"n": 3, "t": 1e3, "o": [[1, 2, 3, 4]]}', False),
    ('{"n": 3, "t": 1e3, "p": {"temperature_control": [[1]]}}', False),
    ('{"n": 3, "t": 1e3, "d": 5}', False),
])
def test_a_crafted_line_is_one_refusal_naming_it(recorded, tmp_path, capsys, cli_logs, crafted: str,
                                                  every_reader: bool) -> None:
    from pi_controller import cli
    from pi_controller.sim.record import Playback, Unrecorded

    path = tmp_path / "crafted.jsonl"
    lines = head_of(recorded[0], 6)
    t0 = json.loads(lines[1])["t"]
    crafted_line = crafted.replace("1e3", str(t0 + 3)).encode()
    path.write_bytes(b"".join(lines[:4]) + crafted_line + b"\n" + b"".join(lines[4:]))
    assert cli.main(["replay", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"replay error: {path}:5: ") and "Traceback" not in err
    playback = Playback(path)  # simulate --from-recording: the sensors it plays are invalid from there, saying why
    assert playback.value("light_sensor", 0.0) == json.loads(lines[1])["r"]["light_sensor"]
    if every_reader:
        with pytest.raises(Unrecorded, match=f"^{path}:5: "):
            playback.value("light_sensor", 10.0)
