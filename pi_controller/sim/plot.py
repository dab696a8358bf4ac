"""The picture of a simulated run: one panel per quantity, each sensor's panel followed by the actuators
that drive it (through the simulation models), the setpoint band where a plugin has one.

matplotlib is an optional extra (`pi-controller[plot]`), heavy on a Pi: it is imported only when a
picture is drawn, on the Agg backend (no display needed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from pi_controller.config import Settings
from pi_controller.sim.simulation import Band, BandTally, Verdict, hms, model_names

Style = Literal["line", "binary", "duty", "angle", "count"]
BAND_COLOUR, OUT_COLOUR, READING_COLOUR, ACTUATOR_COLOUR = "#2ca02c", "#d62728", "#1f77b4", "#ff7f0e"


@dataclass
class Panel:
    title: str
    unit: str
    style: Style
    columns: list[str]  # what the panel is about: readings, an actuator's state, counters
    context: list[tuple[str, str]] = field(default_factory=list)  # (column, label): model quantities
    bands: list[Band] = field(default_factory=list)
    note: str = ""
    limits: tuple[float, float] | None = None  # of the y axis


def layout(verdict: Verdict, trace: Mapping[str, Sequence[float]]) -> list[Panel]:
    """Sensors grouped by unit, in config order; after each group, the actuators of the models that drive
    it; then the other actuators; then plugin problems, if there were any."""
    settings = verdict.settings
    context, feeders = _model_wiring(settings, list(trace))
    panels: list[Panel] = []
    placed: set[str] = set()
    for unit in dict.fromkeys(s.unit for s in settings.sensors):
        group = [s.id for s in settings.sensors if s.unit == unit]
        tallies = [t for t in verdict.bands if t.band.sensor in group]
        if unit == "boolean":
            panels.append(Panel(", ".join(group), unit, "binary", group))
        else:
            panels.append(Panel(", ".join(group), unit, "line", group, [c for s in group for c in context[s]],
                                [t.band for t in tallies], "; ".join(_band_note(t) for t in tallies)))
        for actuator in (a for s in group for a in feeders[s] if a not in placed):
            placed.add(actuator)
            panels.append(_actuator_panel(verdict, actuator, context[actuator]))
    panels += [_actuator_panel(verdict, a.id, context[a.id]) for a in settings.actuators if a.id not in placed]
    problems = [c for c in trace if c.endswith((".errors", ".rejected", ".held")) and any(trace[c])]
    if problems:
        panels.append(Panel("plugin errors, rejected commands, safety holds (cumulative)", "ticks", "count",
                            problems))
    return panels


def _model_wiring(settings: Settings, columns: list[str]) -> tuple[dict[str, list[tuple[str, str]]],
                                                                    dict[str, list[str]]]:
    """Per device, the model quantities drawn with it (with the first sensor a model drives, else with
    the first actuator it reads); per sensor, the actuators that drive it through a model."""
    devices = [s.id for s in settings.sensors] + [a.id for a in settings.actuators]
    context: dict[str, list[tuple[str, str]]] = {key: [] for key in devices}
    feeders: dict[str, list[str]] = {s.id: [] for s in settings.sensors}
    for name, model in zip(model_names(settings), settings.simulation):
        sensors = [ref for role, ref in model.references().values() if role == "sensor"]
        actuators = [ref for role, ref in model.references().values() if role == "actuator"]
        context[(sensors or actuators)[0]] += [(c, f"{c.split('.', 1)[1].rsplit('_', 1)[0]} ({name} model)")
                                               for c in columns if c.startswith(f"{name}.")]
        for sensor in sensors:
            feeders[sensor] += actuators
    return context, feeders


def _actuator_panel(verdict: Verdict, key: str, context: list[tuple[str, str]]) -> Panel:
    tally = verdict.actuators[key]
    share = 100 * tally.duty_sum / verdict.ticks if verdict.ticks else 0.0
    kind = tally.settings.panel(tally.switches, share)  # how its kind is drawn
    return Panel(key, kind.unit, kind.style, [key], context if kind.with_models else [], note=kind.note,
                 limits=kind.limits)


def _band_note(tally: BandTally) -> str:
    if tally.reached_at is None:
        return f"{tally.band.plugin}: never in its band"
    return f"{tally.band.plugin}: {100 * tally.share:.1f} % in band after warm-up"


def draw(trace: Mapping[str, Sequence[float]], verdict: Verdict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = DrawnTrace(trace)
    panels = layout(verdict, trace)
    heights = [{"binary": 0.9, "count": 1.2, "angle": 1.4}.get(p.style, 2.2) for p in panels]
    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(14, 1.0 + 1.2 * sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False, layout="constrained")
    for ax, panel in zip(axes[:, 0], panels):
        _DRAW[panel.style](ax, panel, drawn, verdict)
        ax.set_ylabel(panel.unit)
        ax.set_title(panel.title + (f"  —  {panel.note}" if panel.note else ""), fontsize=9, loc="left")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7, framealpha=0.8)
    axes[-1, 0].set_xlabel(f"simulated time ({drawn.unit})")
    axes[-1, 0].set_xlim(drawn.t[0], drawn.end)
    fig.suptitle(_title(verdict, drawn), fontsize=10, x=0.01, ha="left")
    fig.savefig(path, dpi=110)
    plt.close(fig)


class DrawnTrace:
    """The trace as drawn. With more ticks than about two per BUCKETS, each point stands for a bucket of
    ticks: its mean, lowest and highest value, so that a day at 10 Hz stays readable (and quick to draw)."""

    BUCKETS = 1200  # about a pixel each: more points would only draw over each other

    def __init__(self, trace: Mapping[str, Sequence[float]]):
        import numpy as np

        self.np = np
        self.data = {key: np.asarray(values, dtype=float) for key, values in trace.items()}
        time_s = self.data["time_s"]
        self.bucketed = len(time_s) > 2 * self.BUCKETS
        self.starts = (np.unique(np.linspace(0, len(time_s), self.BUCKETS, endpoint=False).astype(int))
                       if self.bucketed else np.arange(len(time_s)))
        self.bucket_s = (len(time_s) / len(self.starts)) * (time_s[1] - time_s[0] if len(time_s) > 1 else 0.0)
        hours = len(time_s) > 0 and time_s[-1] >= 3 * 3600
        self.unit, scale = ("h", 3600.0) if hours else ("min", 60.0)
        self.t = time_s[self.starts] / scale
        self.end = (time_s[-1] + (time_s[1] - time_s[0] if len(time_s) > 1 else 0.0)) / scale

    def mean(self, column: str) -> Any:
        """Per bucket, the mean of the valid values: for an on/off state, the share of the time on."""
        np, values = self.np, self.data[column]
        valid = ~np.isnan(values)
        counts = np.add.reduceat(valid, self.starts)
        sums = np.add.reduceat(np.where(valid, values, 0.0), self.starts)
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)

    def low(self, column: str) -> Any:
        return self.np.fmin.reduceat(self.data[column], self.starts)

    def high(self, column: str) -> Any:
        return self.np.fmax.reduceat(self.data[column], self.starts)


def _title(verdict: Verdict, drawn: DrawnTrace) -> str:
    settings = verdict.settings
    problems = [f"{name}: {why}" for name, why in verdict.plugins.items() if why]
    lines = [f"{settings.source.name}: {hms(verdict.ticks * verdict.period)} simulated at {settings.loop.rate_hz:g} Hz",
             "; ".join(problems) or "no plugin errors, no rejected commands"]
    if drawn.bucketed:
        lines.append(f"each point is {drawn.bucket_s:.0f} s: readings as mean (line) and lowest to highest "
                     f"(shade); on/off and duty as the share of that time")
    return "\n".join(lines)


def _binary(ax: Any, panel: Panel, drawn: DrawnTrace, verdict: Verdict) -> None:
    colour = ACTUATOR_COLOUR if panel.unit == "relay" else "#9467bd"
    for column in panel.columns:
        ax.fill_between(drawn.t, 0, drawn.mean(column), step="post", color=colour, alpha=0.7, linewidth=0)
    ax.set_ylim(-0.1, 1.1)
    ax.set_yticks([0, 1], ["off", "on"])


def _duty(ax: Any, panel: Panel, drawn: DrawnTrace, verdict: Verdict) -> None:
    ax.fill_between(drawn.t, 0, drawn.mean(panel.columns[0]), step="post", color=ACTUATOR_COLOUR, alpha=0.6,
                    linewidth=0)
    ax.set_ylim(*panel.limits or (0, 105))


def _angle(ax: Any, panel: Panel, drawn: DrawnTrace, verdict: Verdict) -> None:
    key = panel.columns[0]
    ax.plot(drawn.t, drawn.mean(key), drawstyle="steps-post", color=ACTUATOR_COLOUR, linewidth=1.0,
            label=f"{key} (commanded)")
    for column, label in panel.context:
        ax.plot(drawn.t, drawn.mean(column), color="0.3", linewidth=0.8, label=label)
    if panel.limits:
        ax.set_ylim(*panel.limits)


def _counts(ax: Any, panel: Panel, drawn: DrawnTrace, verdict: Verdict) -> None:
    np = drawn.np
    for column in panel.columns:
        ax.step(drawn.t, np.fmax.reduceat(np.cumsum(drawn.data[column]), drawn.starts), where="post", label=column,
                linewidth=1.0)
    ax.set_ylim(bottom=0)


def _lines(ax: Any, panel: Panel, drawn: DrawnTrace, verdict: Verdict) -> None:
    """Readings over their band. The limits fit the readings and bands, so that a model's context (the
    outside temperature) cannot squash the band into a line: off the scale, its legend gives its range."""
    np = drawn.np
    values = np.concatenate([drawn.data[c] for c in panel.columns])
    values = values[~np.isnan(values)]
    lows = [b.setpoint - b.hysteresis for b in panel.bands] + ([values.min()] if values.size else [])
    highs = [b.setpoint + b.hysteresis for b in panel.bands] + ([values.max()] if values.size else [])
    if not lows:
        ax.text(0.5, 0.5, "no valid reading", transform=ax.transAxes, ha="center", color=OUT_COLOUR)
        return
    low, high = min(lows), max(highs)
    pad = 0.08 * (high - low or 1.0)
    ax.set_ylim(low - pad, high + pad)
    for column in panel.columns:
        if drawn.bucketed:
            ax.fill_between(drawn.t, drawn.low(column), drawn.high(column), step="post", color=READING_COLOUR,
                            alpha=0.3, linewidth=0, label=f"{column}, lowest to highest")
        ax.plot(drawn.t, drawn.mean(column), drawstyle="steps-post", color=READING_COLOUR, linewidth=1.0,
                label=f"{column}{', mean' if drawn.bucketed else ''}")
    for (column, label), style in zip(panel.context, _CONTEXT_STYLES * len(panel.context)):
        series = drawn.mean(column)
        if np.nanmin(series) > high + pad or np.nanmax(series) < low - pad:
            label += f": {np.nanmin(series):.1f} to {np.nanmax(series):.1f}, off the scale"
        ax.plot(drawn.t, series, label=label, **style)
    for band in panel.bands:
        _draw_band(ax, band, drawn)


_CONTEXT_STYLES: list[dict[str, Any]] = [{"color": "0.2", "linewidth": 0.8},
                                         {"color": "#17becf", "linewidth": 1.0, "linestyle": "--"},
                                         {"color": "#8c564b", "linewidth": 0.8}]
_DRAW = {"line": _lines, "binary": _binary, "duty": _duty, "angle": _angle, "count": _counts}


def _draw_band(ax: Any, band: Band, drawn: DrawnTrace) -> None:
    """The band, its edges over the data so that a dense trace cannot hide them, and in red the readings
    more than one sensor step (the smallest change seen) outside it: a hysteresis controller reads one
    step outside before it acts, a badly tuned one goes further."""
    np = drawn.np
    bottom, top = band.setpoint - band.hysteresis, band.setpoint + band.hysteresis
    ax.axhspan(bottom, top, color=BAND_COLOUR, alpha=0.15, zorder=0,
               label=f"{band.plugin}: {band.setpoint:g} ± {band.hysteresis:g}")
    for edge in (bottom, top):
        ax.axhline(edge, color=BAND_COLOUR, linewidth=1.2, zorder=4)
    ax.axhline(band.setpoint, color=BAND_COLOUR, linewidth=0.8, linestyle="--", zorder=4)
    changes = np.abs(np.diff(drawn.data[band.sensor]))
    step = np.nanmin(changes[changes > 0]) if np.any(changes > 0) else 0.0
    lows, highs = drawn.low(band.sensor), drawn.high(band.sensor)
    above, below = highs > top + step, lows < bottom - step
    if not (above.any() or below.any()):
        return
    red = np.where(above, highs, np.where(below, lows, np.nan))
    red = np.where(np.isnan(red) & np.roll(~np.isnan(red), 1), np.roll(red, 1), red)  # so one point shows
    ax.plot(drawn.t, red, color=OUT_COLOUR, linewidth=1.4, drawstyle="steps-post", zorder=5,
            label="more than a sensor step outside the band")
