"""The picture of a run: panels chosen from what happened, events on a strip of their own, bounded at any length."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pi_controller import config
from pi_controller.sim import plot
from tests.conftest import example_data

PLUGINS = ["energy_saver", "motion_light", "temperature_control"]


def columns(settings: config.Settings) -> list[str]:
    """The columns `simulate` writes for the example."""
    return ["time_s", "tick", *(s.id for s in settings.sensors), *(a.id for a in settings.actuators),
            "room.temperature_c", "room.outside_c", "motion.present", "daylight.daylight_lux", "servo.angle_deg",
            *(f"{p}.{what}" for p in PLUGINS for what in ("errors", "rejected")),
            *(f"{a.id}.held" for a in settings.actuators)]


def synthetic(settings: config.Settings, ticks: int, **changes: Any) -> dict[str, Any]:
    """A trace at 10 Hz where nothing moves but what `changes` sets (column -> values)."""
    trace = {c: np.zeros(ticks) for c in columns(settings)}
    trace["time_s"], trace["tick"] = np.arange(ticks) / 10.0, np.arange(ticks, dtype=float)
    trace["temperature_sensor"] = np.full(ticks, 21.0)
    trace.update(changes)
    return trace


def binned(settings: config.Settings, trace: dict[str, Any], most: int = plot.BUCKETS) -> plot.Binned:
    buckets = plot.Buckets(most)
    buckets.start(list(trace))
    buckets.extend(trace)
    return buckets.view()


@pytest.fixture
def example(write_config) -> config.Settings:
    return config.load(write_config(example_data()))


def test_a_panel_per_quantity_that_changed_and_an_error_on_the_strip(example) -> None:
    ticks = 600
    ramp = 20 + np.arange(ticks) / ticks
    heater = (np.arange(ticks) // 100 % 2).astype(float)
    errors = np.zeros(ticks)
    errors[321] = 1
    held = np.ones(ticks)  # held every tick: it must not hide the one error
    trace = synthetic(example, ticks, temperature_sensor=ramp, relay_switch=heater,
                      **{"room.temperature_c": ramp, "motion_light.errors": errors, "relay_switch.held": held})
    view = binned(example, trace)
    layout = plot.layout(example, view, PLUGINS)
    # The temperature changed, and the heater that drives it follows it; light, motion, the strip and the
    # vent never moved: no panel each, but named with their value.
    assert [(p.unit, [s.column for s in p.series]) for p in layout.panels] == [
        ("celsius", ["temperature_sensor"]), ("relay", ["relay_switch"])]
    assert [s.column for s in layout.panels[0].context] == ["room.temperature_c", "room.outside_c"]
    assert {"motion_sensor 0", "light_sensor 0", "led_strip 0", "servo_motor 0"} <= set(layout.unchanged)
    # Errors on a row of their own, above the holds, with a mark at the tick they happened.
    assert [e[0] for e in layout.events] == ["motion_light.errors", "relay_switch.held"]
    assert list(view.t[view.total("motion_light.errors") > 0]) == [32.1 / 60]
    fig = plot.figure(layout, view, ["a test"])
    labels = [t.get_text() for t in fig.axes[-1].get_yticklabels()]
    assert labels == ["relay_switch held", "motion_light errors"]  # bottom to top
    legend = [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
    assert legend == ["plugin call failed", "held by a safety rule"]


def test_a_model_named_like_an_actuator_does_not_take_its_events(write_config) -> None:
    data = example_data()
    servo = next(a for a in data["actuators"] if a["id"] == "servo_motor")
    servo["id"] = "servo"  # the servo model's name is its kind: "servo"
    next(m for m in data["simulation"] if m["kind"] == "servo")["servo"] = "servo"
    settings = config.load(write_config(data))
    angle = np.linspace(0, 90, 300)
    held = np.zeros(300)
    held[10] = 1
    trace = synthetic(settings, 300, servo=angle, **{"servo.angle_deg": angle, "servo.held": held})
    layout = plot.layout(settings, binned(settings, trace), PLUGINS)
    panel = next(p for p in layout.panels if p.unit == "angle °")
    assert [(s.column, s.label) for s in panel.context] == [("servo.angle_deg", "angle (servo model)")]
    assert [e[0] for e in layout.events] == ["servo.held"]


def test_a_day_at_ten_hertz_is_drawn_from_a_bounded_number_of_points(example) -> None:
    ticks = 864_000
    t = np.arange(ticks) / 10.0
    day = 21 + np.sin(2 * np.pi * t / 300.0)  # the example's five-minute days: 288 of them
    flicker = (np.arange(ticks) % 7 == 0).astype(float)
    errors = np.zeros(ticks)
    errors[[5, 500_000]] = 1
    trace = synthetic(example, ticks, temperature_sensor=day, relay_switch=flicker, led_strip=80 * flicker,
                      **{"energy_saver.errors": errors})
    buckets = plot.Buckets()
    buckets.start(list(trace))
    buckets.extend(trace)
    assert buckets.sums.shape == (len(trace), 2 * plot.BUCKETS)  # the memory, whatever the length
    view = buckets.view()
    assert view.t.size <= 2 * plot.BUCKETS and view.width * view.t.size >= ticks
    # Nothing is lost in the reduction: the envelope holds the extremes, the sums every event.
    assert np.nanmin(view.low("temperature_sensor")) == pytest.approx(20.0, abs=1e-6)
    assert np.nanmax(view.high("temperature_sensor")) == pytest.approx(22.0, abs=1e-6)
    assert view.total("energy_saver.errors").sum() == 2
    assert np.nanmean(view.mean("relay_switch")) == pytest.approx(1 / 7, abs=0.01)
    layout = plot.layout(example, view, PLUGINS)
    fig = plot.figure(layout, view, ["a day"])
    points = sum(len(line.get_xdata()) for ax in fig.axes for line in ax.lines)
    points += sum(len(path.vertices) for ax in fig.axes for c in ax.collections for path in c.get_paths())
    assert 0 < points < 40 * plot.BUCKETS  # a few series of a couple of thousand points, not 864,000
    assert len(fig.axes) == len(layout.panels) + 1


def test_ticks_added_one_by_one_reduce_as_whole_columns_do(example) -> None:
    ticks = 5000
    trace = synthetic(example, ticks, temperature_sensor=20 + np.random.default_rng(1).random(ticks))
    trace["light_sensor"] = np.where(np.arange(ticks) % 3 == 0, np.nan, 1.0)  # invalid now and then
    whole = binned(example, trace, most=100)
    buckets = plot.Buckets(100)
    buckets.start(list(trace))
    for i in range(ticks):
        buckets.add({c: (None if np.isnan(v[i]) else float(v[i])) for c, v in trace.items()})
    one_by_one = buckets.view()
    assert one_by_one.width == whole.width and one_by_one.t.size == whole.t.size
    for column in ("temperature_sensor", "light_sensor"):
        assert np.allclose(one_by_one.mean(column), whole.mean(column), equal_nan=True)
        assert np.array_equal(one_by_one.low(column), whole.low(column), equal_nan=True)
    assert whole.step("light_sensor") == 0.0 and not whole.changed("light_sensor")


def test_a_periodic_signal_over_many_days_is_drawn_as_one_day_overlaid(example) -> None:
    ticks = 864_000
    t = np.arange(ticks) / 10.0
    lux = 450 + 450 * np.sin(2 * np.pi * t / 300.0)  # 288 five-minute days
    trace = synthetic(example, ticks, light_sensor=lux, **{"daylight.daylight_lux": lux})
    periods = plot.periods(example)
    assert periods["light_sensor"] == periods["daylight."] == periods["led_strip"] == 300.0
    buckets = plot.Buckets(periods=periods)
    buckets.start(list(trace))
    buckets.extend(trace)
    view = buckets.view()
    period, mean, _low, _high = view.overlaid("light_sensor")
    phase = (np.arange(plot.PHASES) + 0.5) / plot.PHASES * period
    assert period == 300.0 and np.allclose(mean, 450 + 450 * np.sin(2 * np.pi * phase / 300.0), atol=10)
    assert view.overlaid("temperature_sensor") is None  # the room's day is 24 h: one of them, nothing to overlay
    layout = plot.layout(example, view, PLUGINS)
    fig = plot.figure(layout, view, ["a day"])
    light = next(i for i, p in enumerate(layout.panels) if p.unit == "lux")
    beside = fig.axes[2 * light + 1]
    assert beside.get_title(loc="left") == "288 days of 5 min overlaid"
    # Over the time axis, a bucket of 72 s is a quarter of a day: no mean line, only the range.
    labels = [t.get_text() for t in beside.get_legend().get_texts()]
    assert labels == ["light_sensor, lowest to highest"]
