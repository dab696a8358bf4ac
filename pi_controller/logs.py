"""Logging, configured in one place: structlog processors, one event per line on stderr.

`ChangeLog` is how the loop reports recurring problems: once when a problem starts or changes and once
when it clears, never once per tick, while stats still count every occurrence.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Hashable, Literal

import structlog

LogFormat = Literal["console", "json"]


def configure(fmt: LogFormat = "console", level: str = "info") -> None:
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
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


class ChangeLog:
    """Logs each problem on its first tick and when it clears, keyed by what it concerns."""

    def __init__(self, logger: Any):
        self._log = logger
        self._active: dict[Hashable, str] = {}
        self._seen: set[Hashable] = set()

    def problem(self, key: Hashable, event: str, level: str = "warning", **fields: Any) -> None:
        self._seen.add(key)
        if key not in self._active:
            self._active[key] = event
            getattr(self._log, level)(event, **fields)

    def settle(self, **fields: Any) -> None:
        """End of a tick: problems not seen in it have cleared."""
        for key in [k for k in self._active if k not in self._seen]:
            self._log.info(f"{self._active.pop(key)}_cleared", key=_describe(key), **fields)
        self._seen.clear()


def _describe(key: Hashable) -> Any:
    return list(key) if isinstance(key, tuple) else key
