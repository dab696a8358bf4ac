"""Logging, configured in one place: structlog processors, one event per line on stderr.

`ChangeLog` is how the loop reports recurring problems: once when a problem starts or changes and once
when it clears, never once per tick, while stats still count every occurrence.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Any, Callable, Hashable, Literal

import structlog

LogFormat = Literal["console", "json"]


_threshold = logging.DEBUG


def enabled(level: str) -> bool:
    """Whether events at `level` are kept: the tick asks before building events that would be dropped."""
    return logging.getLevelName(level.upper()) >= _threshold


def configure(fmt: LogFormat = "console", level: str = "info") -> None:
    global _threshold
    _threshold = logging.getLevelName(level.upper())
    renderer: Any = (structlog.processors.JSONRenderer() if fmt == "json"
                     else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=_stderr,
        cache_logger_on_first_use=False,
    )
    warnings.showwarning = _warning_as_event


def _stderr(*args: Any) -> structlog.PrintLogger:
    """Whatever sys.stderr is when the event is written, not when logging was set up (a test's capture
    that has since closed, say)."""
    return structlog.PrintLogger(sys.stderr)


def _warning_as_event(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
    """Library warnings (gpiozero's fallbacks, no echo...) as events, so every stderr line is one."""
    structlog.get_logger("py.warnings").warning("library_warning", category=category.__name__,
                                                message=str(message), source=f"{filename}:{lineno}")


class ChangeLog:
    """Logs each problem when it starts and when it has cleared, keyed by what it concerns.

    A problem clears after `quiet_ticks` ticks without it, so one that comes and goes every other
    tick is one problem, not a line per tick.
    """

    def __init__(self, logger: Any, quiet_ticks: int = 50):
        self._log = logger
        self._quiet = quiet_ticks
        self._active: dict[Hashable, tuple[str, int]] = {}  # key -> (event, tick last seen)

    def problem(self, key: Hashable, event: str, tick: int, level: str = "warning", **fields: Any) -> None:
        if key not in self._active:
            getattr(self._log, level)(event, tick=tick, **fields)
        self._active[key] = (event, tick)

    def settle(self, tick: int) -> None:
        """End of a tick: problems not seen for `quiet_ticks` ticks have cleared."""
        for key, (event, seen) in list(self._active.items()):
            if tick - seen >= self._quiet:
                del self._active[key]
                self._log.info(f"{event}_cleared", key=_describe(key), tick=tick, last_seen_tick=seen)


def _describe(key: Hashable) -> Any:
    return list(key) if isinstance(key, tuple) else key


class LineBudget:
    """One plugin's share of the log: `rate` lines a second in bursts of `burst` (a token bucket),
    whichever way its lines come (our `pi_log`, or Extism's own log functions). What it drops is
    counted and said in one line when it may log again."""

    def __init__(self, logger: Any, plugin: str, rate: float, burst: int,
                 clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._log, self._plugin = logger, plugin
        self._rate, self._burst = rate, burst
        self._tokens, self._last = float(burst), clock()
        self.dropped = 0

    def admit(self, tick: int | None = None) -> bool:
        now = self.clock()
        self._tokens = min(self._burst, self._tokens + max(0.0, now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1:
            self.dropped += 1
            return False
        self._tokens -= 1
        if self.dropped:
            self._log.warning("plugin_log_suppressed", plugin=self._plugin, tick=tick, lines=self.dropped,
                              limit=f"{self._rate:g}/s, burst {self._burst}")
            self.dropped = 0
        return True
