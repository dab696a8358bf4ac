"""The picture of a run (`simulate --plot`, `replay --plot`), decided by what happened in it: one panel per
quantity (a sensor unit, an actuator kind's unit) whose values changed, the actuators after the quantity
they drive through the models, the setpoint bands; below, a thin strip of events, one row per kind (plugin
errors, rejected commands, safety holds), so that a rare error is never drowned by frequent holds.

The run is reduced while it runs (`Buckets`): at most 2 x BUCKETS buckets of ticks, each kept as its mean,
lowest and highest value and its sum, so that a day at 10 Hz (864,000 ticks) costs the memory and the
drawing time of a few thousand points.

matplotlib is an optional extra (`pi-controller[plot]`), heavy on a Pi: it is imported only when a
picture is drawn, on the Agg backend (no display needed).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pi_controller.config import Settings
from pi_controller.devices.actuators import PanelStyle
from pi_controller.files import open_to_write
from pi_controller.sim.simulation import model_names
from pi_controller.sim.verdict import Band, BandTally, Row, Verdict, hms

BAND_COLOUR, OUT_COLOUR, READING_COLOUR = "#2ca02c", "#d62728", "#1f77b4"
SERIES_COLOURS = ["#ff7f0e", "#1f77b4", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
#: The event strip's rows, top to bottom: (column suffix, what a mark means, colour, mark height).
EVENTS = ((".errors", "plugin call failed", "#d62728", 0.9), (".rejected", "command rejected", "#ff7f0e", 0.7),
          (".held", "held by a safety rule", "0.55", 0.5))
BUCKETS = 1000  # about a pixel each in a 14-inch figure: finer would only draw over itself
CHUNK = 4096  # ticks reduced at once
PHASES = 200  # bins of a day overlaid
OVERLAY_DAYS = 10  # from this many days of a periodic model on, its days are also drawn overlaid


@dataclass
class Series:
    column: str
    label: str
    lane: str = ""  # the device it is of


@dataclass
class Panel:
    title: str
    unit: str
    style: PanelStyle
    series: list[Series]  # what the panel is about: readings or actuator states
    context: list[Series] = field(default_factory=list)  # model quantities, drawn in grey
    bands: list[Band] = field(default_factory=list)
    note: str = ""
    limits: tuple[float, float] | None = None  # of the y axis


# ---------------------------------------------------------------------------------------------
# The run, reduced


class Buckets:
    """A sink (see `simulation.Sink`) that reduces the run to buckets of consecutive ticks, as it runs:
    per column, each bucket's sum and count of valid values, lowest and highest; and the smallest
    change between two ticks (a sensor's step). When there would be more than 2 x `most` buckets, two
    neighbours become one: the memory stays bounded however long the run."""

    def __init__(self, most: int = BUCKETS, periods: Mapping[str, float] | None = None):
        """`periods`: the length of a day of the columns that follow one (see `periods`): those are also
        folded onto one day, PHASES bins of it, for an overlay of the days."""
        import numpy as np

        self.np = np
        self.periods = dict(periods or {})
        self.capacity = 2 * most
        self.columns: list[str] = []
        self.width = 1  # ticks per bucket
        self.ticks = 0
        self.used = 0  # buckets holding ticks
        self.period = 0.0
        self._pending: dict[str, array[float]] = {}
        self._last: Any = None  # the last row reduced: the step across two chunks

    def start(self, columns: list[str]) -> None:
        np = self.np
        self.columns = columns
        self._pending = {c: array("d") for c in columns}
        self.sums, self.counts, self.lows, self.highs = (np.zeros((len(columns), self.capacity)) for _ in range(4))
        self.lows[:], self.highs[:] = np.nan, np.nan
        self.steps = np.full(len(columns), np.inf)
        self.folds: dict[float, Fold] = {}
        for i, column in enumerate(columns):
            period = self.periods.get(column) or self.periods.get(column.split(".", 1)[0] + ".")
            if period:
                self.folds.setdefault(period, Fold(np, period)).rows.append(i)

    def add(self, row: Row) -> None:
        for column, values in self._pending.items():
            value = row[column]
            values.append(float("nan") if value is None else value)
        if len(self._pending["time_s"]) >= CHUNK:
            self.flush()

    def extend(self, trace: Mapping[str, Sequence[float]]) -> None:
        """Whole columns at once (a trace read back, a test's)."""
        np = self.np
        data = np.array([np.asarray(trace[c], dtype=float) for c in self.columns])
        for first in range(0, data.shape[1], CHUNK):
            self._reduce(data[:, first:first + CHUNK])

    def flush(self) -> None:
        if self._pending and len(self._pending["time_s"]):
            self._reduce(self.np.array([self.np.frombuffer(v) for v in self._pending.values()]))
            for values in self._pending.values():
                del values[:]

    def _reduce(self, chunk: Any) -> None:
        """Fold a block of ticks (columns x ticks) into the buckets."""
        np = self.np
        n = chunk.shape[1]
        while (self.ticks + n - 1) // self.width >= self.capacity:
            self._halve()
        if self.period == 0.0 and n + self.ticks > 1:
            times = np.concatenate([[self._last[0]], chunk[0]]) if self._last is not None else chunk[0]
            self.period = float(times[1] - times[0])
        joined = chunk if self._last is None else np.concatenate([self._last[:, None], chunk], axis=1)
        changes = np.abs(np.diff(joined, axis=1))
        changes[~(changes > 0)] = np.inf
        self.steps = np.fmin(self.steps, changes.min(axis=1, initial=np.inf))
        index = (self.ticks + np.arange(n)) // self.width
        starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])
        buckets = index[starts]
        valid = ~np.isnan(chunk)
        self.sums[:, buckets] += np.add.reduceat(np.where(valid, chunk, 0.0), starts, axis=1)
        self.counts[:, buckets] += np.add.reduceat(valid, starts, axis=1)
        self.lows[:, buckets] = np.fmin(self.lows[:, buckets], np.fmin.reduceat(chunk, starts, axis=1))
        self.highs[:, buckets] = np.fmax(self.highs[:, buckets], np.fmax.reduceat(chunk, starts, axis=1))
        for fold in self.folds.values():
            fold.add(chunk)
        self.ticks += n
        self.used = int(buckets[-1]) + 1
        self._last = chunk[:, -1].copy()

    def _halve(self) -> None:
        """Each pair of neighbouring buckets becomes one: twice the ticks per bucket."""
        np = self.np
        half = self.capacity // 2
        for table, combine in ((self.sums, np.add), (self.counts, np.add), (self.lows, np.fmin),
                               (self.highs, np.fmax)):
            merged = combine(table[:, 0::2], table[:, 1::2])
            table[:, :half] = merged
            table[:, half:] = np.nan if combine is not np.add else 0.0
        self.width *= 2
        self.used = (self.used + 1) // 2

    def view(self) -> Binned:
        self.flush()
        return Binned(self)


class Fold:
    """Some columns folded onto one day of `period` seconds: per phase bin, the sum and count of valid
    values, lowest and highest, over all the days."""

    def __init__(self, np: Any, period: float):
        self.np, self.period = np, period
        self.rows: list[int] = []
        self.sums: dict[int, Any] = {}  # row of the chunk -> per phase bin (numpy arrays)
        self.counts: dict[int, Any] = {}
        self.lows: dict[int, Any] = {}
        self.highs: dict[int, Any] = {}

    def add(self, chunk: Any) -> None:
        np = self.np
        phase = np.minimum((chunk[0] % self.period / self.period * PHASES).astype(int), PHASES - 1)
        for row in self.rows:
            if row not in self.sums:
                self.sums[row], self.counts[row] = np.zeros(PHASES), np.zeros(PHASES)
                self.lows[row], self.highs[row] = np.full(PHASES, np.nan), np.full(PHASES, np.nan)
            values = chunk[row]
            valid = ~np.isnan(values)
            self.sums[row] += np.bincount(phase, np.where(valid, values, 0.0), PHASES)
            self.counts[row] += np.bincount(phase, valid, PHASES)
            np.fmin.at(self.lows[row], phase, values)
            np.fmax.at(self.highs[row], phase, values)


class Binned:
    """The buckets as drawn: per column, mean, lowest, highest and sum per bucket, against time."""

    def __init__(self, buckets: Buckets):
        np = self.np = buckets.np
        used = buckets.used
        self.index = {c: i for i, c in enumerate(buckets.columns)}
        self.sums, self.counts = buckets.sums[:, :used], buckets.counts[:, :used]
        self.lows, self.highs = buckets.lows[:, :used], buckets.highs[:, :used]
        self.steps = buckets.steps
        self.width, self.ticks, self.period = buckets.width, buckets.ticks, buckets.period
        self.bucket_s = self.width * self.period
        hours = buckets.ticks * self.period >= 3 * 3600
        self.unit, scale = ("h", 3600.0) if hours else ("min", 60.0)
        start = self.lows[self.index["time_s"]] if used else np.zeros(0)
        self.t = start / scale
        self.end = (buckets.ticks * self.period) / scale
        self.means = _means(np, self.sums, self.counts)
        self.run_s = buckets.ticks * self.period
        self.folds = {buckets.columns[row]: fold for fold in buckets.folds.values() for row in fold.rows}

    def overlaid(self, column: str) -> tuple[float, Any, Any, Any] | None:
        """The column's days overlaid, if it follows a day and the run has OVERLAY_DAYS of them: the day's
        length, and per phase bin the mean, lowest and highest."""
        fold = self.folds.get(column)
        if fold is None or self.run_s < OVERLAY_DAYS * fold.period:
            return None
        row = self.index[column]
        return fold.period, _means(self.np, fold.sums[row], fold.counts[row]), fold.lows[row], fold.highs[row]

    @property
    def bucketed(self) -> bool:
        return self.width > 1

    def has(self, column: str) -> bool:
        return column in self.index

    def mean(self, column: str) -> Any:
        """The mean of the valid values: for an on/off state, the share of the time on."""
        return self.means[self.index[column]]

    def low(self, column: str) -> Any:
        return self.lows[self.index[column]]

    def high(self, column: str) -> Any:
        return self.highs[self.index[column]]

    def total(self, column: str) -> Any:
        return self.sums[self.index[column]]

    def step(self, column: str) -> float:
        step = float(self.steps[self.index[column]])
        return 0.0 if step == float("inf") else step

    def changed(self, column: str) -> bool:
        np = self.np
        low, high = self.low(column), self.high(column)
        return bool(np.any(~np.isnan(low))) and float(np.nanmin(low)) != float(np.nanmax(high))

    def constant(self, column: str) -> str:
        """What an unchanged column held, in words."""
        np = self.np
        low = self.low(column)
        return "never valid" if not np.any(~np.isnan(low)) else f"{float(np.nanmin(low)):g}"


def _means(np: Any, sums: Any, counts: Any) -> Any:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def periods(settings: Settings) -> dict[str, float]:
    """The length of a day of each device a model with a day (`day_length_s`) is wired to, and of the
    model's own columns (by their prefix, `daylight.`), for `Buckets`."""
    found: dict[str, float] = {}
    for name, model in zip(model_names(settings), settings.simulation):
        day = getattr(model, "day_length_s", None)
        if day:
            for key in [f"{name}.", *(ref for _, ref in model.references().values())]:
                found.setdefault(key, float(day))
    return found


# ---------------------------------------------------------------------------------------------
# Panels


Variants = Sequence[tuple[str, str]]  # (column suffix, label suffix) of each line drawn per actuator
LIVE: Variants = (("", ""),)


@dataclass
class Layout:
    panels: list[Panel]
    events: list[tuple[str, str, str, float, str]]  # (column, row label, colour, height, what a mark means)
    unchanged: list[str]  # "device value" of each that never changed


def layout(settings: Settings, binned: Binned, plugins: Sequence[str], bands: Sequence[BandTally] = (),
           notes: Mapping[str, str] | None = None, variants: Variants = LIVE) -> Layout:
    """Sensors grouped by unit, in config order, each group followed by the actuators (grouped by the unit
    their kind is drawn in) of the models that drive it; then the other actuators; a group whose values
    never changed is left out and named. `notes`: per actuator, its summary for the legend. `variants`:
    the columns drawn per actuator (the live state, or a recorded and a replayed one)."""
    notes = notes or {}
    context, feeders = _model_wiring(settings, binned, plugins)
    panels: list[Panel] = []
    unchanged: list[str] = []
    kinds = {a.id: a.panel(0, 0.0) for a in settings.actuators}
    placed: set[str] = set()

    def actuator_panels(ids: list[str]) -> None:
        for unit in dict.fromkeys(kinds[a].unit for a in ids if a not in placed):
            group = [a for a in ids if kinds[a].unit == unit and a not in placed]
            placed.update(group)
            moving = [a for a in group if any(binned.changed(a + s) for s, _ in variants if binned.has(a + s))]
            unchanged.extend(f"{a} {binned.constant(a + variants[0][0])}" for a in group if a not in moving)
            if moving:
                kind = kinds[moving[0]]
                panels.append(Panel(", ".join(moving), unit, kind.style,
                                    [Series(a + s, f"{a}{label}{': ' + notes[a] if a in notes else ''}", a)
                                     for a in moving for s, label in variants],
                                    [c for a in moving for c in context[a]] if kind.with_models else [],
                                    limits=kind.limits))

    for unit in dict.fromkeys(s.unit for s in settings.sensors):
        group = [s.id for s in settings.sensors if s.unit == unit]
        moving = [s for s in group if binned.changed(s)]
        unchanged.extend(f"{s} {binned.constant(s)}" for s in group if s not in moving)
        if moving:
            tallies = [t for t in bands if t.band.sensor in moving]
            panels.append(Panel(", ".join(moving), unit, "binary" if unit == "boolean" else "line",
                                [Series(s, s, s) for s in moving], [c for s in moving for c in context[s]],
                                [t.band for t in tallies], "; ".join(_band_note(t) for t in tallies)))
        actuator_panels([a for s in group for a in feeders[s]])
    actuator_panels([a.id for a in settings.actuators])
    events = [(f"{name}{suffix}", f"{name} {suffix[1:]}", colour, height, meaning)
              for suffix, meaning, colour, height in EVENTS
              for name in (plugins if suffix != ".held" else [a.id for a in settings.actuators])
              if binned.has(f"{name}{suffix}") and binned.np.any(binned.total(f"{name}{suffix}") > 0)]
    return Layout(panels, events, unchanged)


def _model_wiring(settings: Settings, binned: Binned, plugins: Sequence[str]) -> tuple[
        dict[str, list[Series]], dict[str, list[str]]]:
    """Per device, the model quantities drawn with it (with the first sensor a model drives, else with
    the first actuator it reads); per sensor, the actuators that drive it through a model. A model's
    columns are its name and a quantity; an event column (`servo.held` of an actuator named like the
    servo model) is never one."""
    devices = [s.id for s in settings.sensors] + [a.id for a in settings.actuators]
    events = {f"{name}{suffix}" for suffix, *_ in EVENTS for name in [*plugins, *devices]}
    context: dict[str, list[Series]] = {key: [] for key in devices}
    feeders: dict[str, list[str]] = {s.id: [] for s in settings.sensors}
    for name, model in zip(model_names(settings), settings.simulation):
        sensors = [ref for role, ref in model.references().values() if role == "sensor"]
        actuators = [ref for role, ref in model.references().values() if role == "actuator"]
        context[(sensors or actuators)[0]] += [
            Series(c, f"{c.split('.', 1)[1].rsplit('_', 1)[0]} ({name} model)") for c in binned.index
            if c.startswith(f"{name}.") and c not in events and c not in devices]
        for sensor in sensors:
            feeders[sensor] += actuators
    return context, feeders


def _band_note(tally: BandTally) -> str:
    if tally.reached_at is None:
        return f"{tally.band.plugin}: never in its band"
    return f"{tally.band.plugin}: {100 * tally.share:.1f} % in band after warm-up"


# ---------------------------------------------------------------------------------------------
# Drawing


def draw(buckets: Buckets, verdict: Verdict, path: Path) -> None:
    """The picture of a simulated run."""
    binned = buckets.view()
    plot = layout(verdict.settings, binned, list(verdict.plugins), verdict.bands,
                  {key: t.settings.panel(t.switches, 100 * t.duty_sum / verdict.ticks if verdict.ticks else 0.0).note
                   for key, t in verdict.actuators.items()})
    problems = [f"{name}: {why}" for name, why in verdict.plugins.items() if why]
    settings = verdict.settings
    title = [f"{settings.source.name}: {hms(verdict.ticks * verdict.period)} simulated at {settings.loop.rate_hz:g} Hz",
             "; ".join(problems) or "no plugin errors, no rejected commands"]
    render(plot, binned, title, path)


def unsupported(path: Path) -> str | None:
    """Why matplotlib would draw nothing to `path` (it draws in the format its suffix names, a PNG without
    one), or None: said before a run, not after it."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix and path.suffix[1:].lower() not in formats:
        return f"{path.suffix[:20]!r} is not a picture's suffix; name it .png (or {', '.join(sorted(formats))})"
    return None


def render(plot: Layout, binned: Binned, title: list[str], path: Path) -> None:
    """Draw `plot` to a PNG at `path` (or the format its suffix names), through an open that never waits (a FIFO
    whose reader went since the check is an error, not a hang) and is closed once written."""
    import matplotlib.pyplot as plt

    fig = figure(plot, binned, title)
    try:
        with open_to_write(path) as out:
            fig.savefig(out, dpi=80, format=path.suffix[1:].lower() or "png")
    finally:
        plt.close(fig)


def figure(plot: Layout, binned: Binned, title: list[str]) -> Any:
    """`plot` as a matplotlib figure: its panels, the event strip, a title of `title`'s lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if binned.bucketed:
        title = [*title, f"each point is {_span(binned.bucket_s)}: readings as mean (line) and lowest to "
                         f"highest (shade); on/off and duty as the share of that time"]
    if plot.unchanged:
        title = [*title, "unchanged: " + ", ".join(plot.unchanged)]
    heights = [{"binary": 0.5 + 0.4 * len(p.series)}.get(p.style, 2.2 if p.style == "line" else 1.4)
               for p in plot.panels] + [0.35 + 0.22 * max(1, len(plot.events))]
    overlays = [[c for c in (*p.series, *p.context) if binned.overlaid(c.column)] for p in plot.panels]
    wide = any(overlays)  # a column on the right for the days overlaid, beside each panel's legend
    fig, axes = plt.subplots(len(heights), 2 if wide else 1, squeeze=False, layout="constrained",
                             figsize=(16 if wide else 14, 1.2 + 0.5 * len(title) + 1.1 * sum(heights)),
                             gridspec_kw={"height_ratios": heights, **({"width_ratios": [4, 1]} if wide else {})})
    for row, panel in enumerate(plot.panels):
        ax = axes[row, 0]
        _DRAW[panel.style](ax, panel, binned)
        ax.set_ylabel(panel.unit)
        ax.set_title(panel.title + (f"  —  {panel.note}" if panel.note else ""), fontsize=9, loc="left")
        ax.grid(True, alpha=0.3)
        beside = axes[row, 1] if wide else ax
        if wide and overlays[row]:
            _overlay(beside, panel, overlays[row], binned, ax.get_ylim())
        elif wide:
            beside.axis("off")
        if ax.get_legend_handles_labels()[0]:
            beside.legend(*ax.get_legend_handles_labels(), loc="upper left", fontsize=7, framealpha=0.8,
                          bbox_to_anchor=(1.005, 1.0) if beside is ax or overlays[row] else (0.0, 1.0))
    for ax in axes[:-1, 0]:  # one time axis, labelled at the bottom; the overlays keep their own
        ax.sharex(axes[-1, 0])
        ax.tick_params(labelbottom=False)
    _events(axes[-1, 0], plot.events, binned)
    if wide:
        axes[-1, 1].axis("off")
    axes[-1, 0].set_xlabel(f"time ({binned.unit})")
    start = binned.t[0] if binned.t.size else 0.0
    axes[-1, 0].set_xlim(start - 0.005 * (binned.end - start), binned.end)  # a mark at the start stays visible
    fig.suptitle("\n".join(title), fontsize=9, x=0.01, ha="left")
    return fig


def _overlay(ax: Any, panel: Panel, series: list[Series], binned: Binned, limits: tuple[float, float]) -> None:
    """The days of a periodic run laid over each other: per phase of the day, mean and lowest to highest."""
    np = binned.np
    period = 0.0
    for s in series:
        period, mean, low, high = binned.overlaid(s.column) or (0.0, None, None, None)
        x = (np.arange(PHASES) + 0.5) / PHASES * period / 60
        colour = _colour(panel, panel.series.index(s)) if s in panel.series else "0.2"
        ax.fill_between(x, low, high, color=colour, alpha=0.25, linewidth=0)
        ax.plot(x, mean, color=colour, linewidth=1.0)
    ax.set_title(f"{binned.run_s / period:.0f} days of {_span(period)} overlaid", fontsize=8, loc="left")
    ax.set_xlabel("time of day (min)", fontsize=8)
    ax.set_ylim(*limits)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=7)


def _colour(panel: Panel, index: int) -> str:
    """The colour of a panel's series: a reading's blue first, as the bands' legend expects."""
    colours = [READING_COLOUR, *SERIES_COLOURS] if panel.style == "line" else SERIES_COLOURS
    return colours[index % len(colours)]


def _fast(binned: Binned, column: str) -> bool:
    """Whether a bucket is too long for the column's mean to be worth a line: over a run this long it
    turns back in more than a quarter of the buckets (a five-minute day, a thermostat's cycle), and a
    line through it would be a moiré; the shade of lowest to highest (and an overlay of the days) shows it."""
    np = binned.np
    if not binned.bucketed:
        return False
    steps = np.diff(binned.mean(column))
    signs = np.sign(steps[np.nan_to_num(steps) != 0])
    return bool(np.count_nonzero(signs[1:] != signs[:-1]) > 0.25 * len(steps))


def _span(seconds: float) -> str:
    return f"{seconds:.3g} s" if seconds < 120 else f"{seconds / 60:.3g} min"


def _events(ax: Any, events: list[tuple[str, str, str, float, str]], binned: Binned) -> None:
    """A row per kind of event and where it came from; a mark in each bucket that had one, errors on top."""
    ax.set_title("events: a mark per " + (_span(binned.bucket_s) if binned.bucketed else "tick") +
                 " with at least one", fontsize=8, loc="left")
    if not events:
        ax.text(0.5, 0.5, "no plugin errors, rejected commands or safety holds", transform=ax.transAxes,
                ha="center", va="center", fontsize=8, color="0.3")
        ax.set_yticks([])
        return
    shown: set[str] = set()
    rows = len(events)
    for row, (column, _, colour, height, meaning) in enumerate(events):
        y = rows - 1 - row
        x = binned.t[binned.total(column) > 0]
        ax.vlines(x, y - height / 2, y + height / 2, colors=colour, linewidth=2.0,
                  label=None if meaning in shown else meaning)
        shown.add(meaning)
    ax.set_yticks(range(rows), [label for _, label, *_ in reversed(events)], fontsize=7)
    ax.set_ylim(-0.6, rows - 0.4)
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7, framealpha=0.8)


def _binary(ax: Any, panel: Panel, binned: Binned) -> None:
    """A lane per device: the share of each bucket's time on, filled; a second series of the same device
    (replayed over recorded) as a line over it."""
    lanes = list(dict.fromkeys(s.lane for s in panel.series))
    filled: set[str] = set()
    for series in panel.series:
        base = len(lanes) - 1 - lanes.index(series.lane)
        share = binned.mean(series.column) * 0.8 + base
        if series.lane in filled:
            ax.plot(binned.t, share, drawstyle="steps-post", color="k", linewidth=0.9, label=series.label)
            continue
        filled.add(series.lane)
        ax.fill_between(binned.t, base, share, step="post", linewidth=0, alpha=0.6, label=series.label,
                        color=SERIES_COLOURS[lanes.index(series.lane) % len(SERIES_COLOURS)])
    ax.set_ylim(-0.1, len(lanes) - 0.1)
    ax.set_yticks([len(lanes) - 1 - i + 0.4 for i in range(len(lanes))], lanes, fontsize=7)


def _levels(ax: Any, panel: Panel, binned: Binned) -> None:
    """Duty, speed, angle: each series' mean per bucket, its range shaded; model quantities in grey."""
    for i, series in enumerate(panel.series):
        colour = _colour(panel, i)
        if binned.bucketed:
            ax.fill_between(binned.t, binned.low(series.column), binned.high(series.column), step="post",
                            color=colour, alpha=0.2, linewidth=0,
                            label=f"{series.label}, lowest to highest" if _fast(binned, series.column) else None)
        if not _fast(binned, series.column):
            ax.plot(binned.t, binned.mean(series.column), drawstyle="steps-post", color=colour, linewidth=1.0,
                    label=series.label)
    for series, style in zip(panel.context, _CONTEXT_STYLES * len(panel.context)):
        if not _fast(binned, series.column):
            ax.plot(binned.t, binned.mean(series.column), label=series.label, **style)
    if panel.limits:
        ax.set_ylim(*panel.limits)


def _lines(ax: Any, panel: Panel, binned: Binned) -> None:
    """Readings over their band. The limits fit the readings and bands, so that a model's context (the
    outside temperature) cannot squash the band into a line: off the scale, its legend gives its range."""
    np = binned.np
    lows = [b.setpoint - b.hysteresis for b in panel.bands] + [np.nanmin(binned.low(s.column)) for s in panel.series]
    highs = [b.setpoint + b.hysteresis for b in panel.bands] + [np.nanmax(binned.high(s.column))
                                                                  for s in panel.series]
    low, high = min(lows), max(highs)
    pad = 0.08 * (high - low or 1.0)
    ax.set_ylim(low - pad, high + pad)
    for i, series in enumerate(panel.series):
        colour = _colour(panel, i)
        if binned.bucketed:
            ax.fill_between(binned.t, binned.low(series.column), binned.high(series.column), step="post",
                            color=colour, alpha=0.3, linewidth=0, label=f"{series.label}, lowest to highest")
        if not _fast(binned, series.column):
            ax.plot(binned.t, binned.mean(series.column), drawstyle="steps-post", color=colour, linewidth=1.0,
                    label=f"{series.label}{', mean' if binned.bucketed else ''}")
    for series, style in zip(panel.context, _CONTEXT_STYLES * len(panel.context)):
        if _fast(binned, series.column):
            continue
        values = binned.mean(series.column)
        label = series.label
        if np.nanmin(values) > high + pad or np.nanmax(values) < low - pad:
            label += f": {np.nanmin(values):.1f} to {np.nanmax(values):.1f}, off the scale"
        ax.plot(binned.t, values, label=label, **style)
    for band in panel.bands:
        _draw_band(ax, band, binned)


_CONTEXT_STYLES: list[dict[str, Any]] = [{"color": "0.2", "linewidth": 0.8},
                                         {"color": "#17becf", "linewidth": 1.0, "linestyle": "--"},
                                         {"color": "#8c564b", "linewidth": 0.8}]
_DRAW: dict[PanelStyle, Callable[[Any, Panel, Binned], None]] = {
    "line": _lines, "binary": _binary, "duty": _levels, "angle": _levels}


def _draw_band(ax: Any, band: Band, binned: Binned) -> None:
    """The band, its edges over the data so that a dense trace cannot hide them, and in red the readings
    more than one sensor step (the smallest change seen) outside it: a hysteresis controller reads one
    step outside before it acts, a badly tuned one goes further."""
    np = binned.np
    bottom, top = band.setpoint - band.hysteresis, band.setpoint + band.hysteresis
    ax.axhspan(bottom, top, color=BAND_COLOUR, alpha=0.15, zorder=0,
               label=f"{band.plugin}: {band.setpoint:g} ± {band.hysteresis:g}")
    for edge in (bottom, top):
        ax.axhline(edge, color=BAND_COLOUR, linewidth=1.2, zorder=4)
    ax.axhline(band.setpoint, color=BAND_COLOUR, linewidth=0.8, linestyle="--", zorder=4)
    step = binned.step(band.sensor)
    lows, highs = binned.low(band.sensor), binned.high(band.sensor)
    above, below = highs > top + step, lows < bottom - step
    if not (above.any() or below.any()):
        return
    red = np.where(above, highs, np.where(below, lows, np.nan))
    red = np.where(np.isnan(red) & np.roll(~np.isnan(red), 1), np.roll(red, 1), red)  # so one point shows
    ax.plot(binned.t, red, color=OUT_COLOUR, linewidth=1.4, drawstyle="steps-post", zorder=5,
            label="more than a sensor step outside the band")
