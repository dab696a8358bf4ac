"""Counters and bounded timing windows for ticks and plugins, summarised on demand.

Samples go into fixed-size windows so a daemon that runs for months uses constant memory; the
percentiles are computed only when a snapshot is asked for, never in the tick.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

WINDOW = 3000  # five minutes of ticks at 10 Hz


class Window:
    """The last WINDOW samples, plus the all-time maximum."""

    def __init__(self) -> None:
        self._samples: deque[float] = deque(maxlen=WINDOW)
        self.max = 0.0

    def add(self, value: float) -> None:
        self._samples.append(value)
        if value > self.max:
            self.max = value

    def percentiles(self, *fractions: float) -> list[float]:
        """Several percentiles from one sort of the window."""
        if not self._samples:
            return [0.0] * len(fractions)
        ordered = sorted(self._samples)
        return [ordered[min(len(ordered) - 1, int(f * len(ordered)))] for f in fractions]


def _us(seconds: float) -> int:
    return round(seconds * 1e6)


@dataclass
class PluginStats:
    calls: int = 0
    errors: int = 0
    rejected: int = 0
    held: int = 0  # valid commands the safety rules held back, counted per tick
    stalls: int = 0  # calls past their wall-clock backstop: the machine's doing, not the plugin's
    resets: int = 0  # calls after which its instance was rebuilt (its vars lost)
    durations: Window = field(default_factory=Window)

    def summary(self) -> dict[str, Any]:
        return {"calls": self.calls, "errors": self.errors, "rejected": self.rejected, "held": self.held,
                "stalls": self.stalls, "resets": self.resets,
                "median_us": _us(self.durations.percentiles(0.5)[0]), "max_us": _us(self.durations.max)}


@dataclass
class TickStats:
    count: int = 0
    missed: int = 0
    first_at: float | None = None  # when the first tick was due (monotonic): the tick rate counts from there
    durations: Window = field(default_factory=Window)
    jitter: Window = field(default_factory=Window)

    def summary(self) -> dict[str, Any]:
        median, p99 = self.durations.percentiles(0.5, 0.99)
        (jitter_p99,) = self.jitter.percentiles(0.99)
        return {"count": self.count, "missed": self.missed, "duration_median_us": _us(median),
                "duration_p99_us": _us(p99), "start_jitter_p99_us": _us(jitter_p99)}
