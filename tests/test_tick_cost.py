"""The tick's own work, counted rather than timed: how many Python functions of ours one steady tick calls.

A loop that sleeps between ticks runs every tick on cold caches, where each Python call of ours costs a
microsecond or so beyond the floor's work (benchmarks/tick.py, issue 30): the count is what the tick pays
for being ours, and unlike a time it is the same on any machine under any load. The config is the
benchmark's (12 GPIO inputs, 8 actuators, N copies of a plugin that reads its whole context and changes
its answer every tick, so no cache answers for it). A change that puts load-time work back into the tick,
or a new layer on its path, shows here first."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

import pi_controller
from pi_controller.daemon import Daemon
from tests.conftest import logging_at

OURS = str(Path(pi_controller.__file__).resolve().parent)
BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "tick.py"
# What one steady tick may call of ours: a budget for the tick's own steps, and one for each plugin.
PER_TICK, PER_PLUGIN = 31, 11  # 64 at 3 plugins, 135 at 10 when set (issue 30; 77 and 158 before, 115 and 228 earlier)


def benchmark() -> Any:
    spec = importlib.util.spec_from_file_location("tick_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclasses look it up
    spec.loader.exec_module(module)
    return module


def calls_of_ours(tick: Any, number: int) -> int:
    """The Python functions of the pi_controller package that `tick(number)` calls, nested ones included."""
    count = 0

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal count
        if event == "call" and frame.f_code.co_filename.startswith(OURS):
            count += 1

    sys.setprofile(profile)
    try:
        tick(number)
    finally:
        sys.setprofile(None)
    return count


@pytest.fixture(scope="module")
def steady_ticks(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[int]]:
    """Calls of ours in 20 steady ticks (after 5 to warm up), at 3 and at 10 plugins."""
    bench = benchmark()
    with logging_at("warning"):  # as the benchmark runs: at info, a relay's switch is an event every tick
        return {plugins: steady(bench.settings_for(tmp_path_factory.mktemp(f"p{plugins}"), "reading", plugins, 50.0),
                                plugins) for plugins in (3, 10)}


def steady(settings: Any, plugins: int) -> list[int]:
    daemon = Daemon(settings, simulate=False)
    try:
        for number in range(5):
            daemon.loop.tick(number)
        counts = [calls_of_ours(daemon.loop.tick, number) for number in range(5, 25)]
        # Counted ticks that did the work: every plugin answered, and every actuator it names moved.
        trace = daemon.loop.trace
        assert trace is not None and len(trace.verdicts.answered) == plugins
        assert len(trace.decision.writes) == min(2 * plugins, 8)
        return counts
    finally:
        daemon.close()


def test_a_steady_tick_calls_no_more_of_ours_than_its_budget(steady_ticks: dict[int, list[int]]) -> None:
    for plugins, counts in steady_ticks.items():
        assert max(counts) <= PER_TICK + PER_PLUGIN * plugins, (plugins, counts)


def test_each_plugin_adds_no_more_than_its_share(steady_ticks: dict[int, list[int]]) -> None:
    """A plugin more costs its call, its answer's parse and checks, and its commands' way to the pins."""
    assert (max(steady_ticks[10]) - min(steady_ticks[3])) / 7 <= PER_PLUGIN, steady_ticks
