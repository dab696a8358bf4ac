"""libextism's own log, routed into ours: the real reason a call failed, by plugin.

A trap or a denied HTTP request comes back from the SDK as "error while executing at wasm
backtrace: ..."; what happened ("wasm trap: wasm `unreachable` instruction executed", "HTTP
request to ... is not allowed") is only written to libextism's log. `set_log_custom` is
process-wide and takes effect once, so there is one router per process (`router()`), set up
before the first plugin is built. Lines are buffered by libextism until drained: a failed call
drains them at once (on the thread that made the call) and takes its reason out; lines that
explain no call failure are logged as `extism_log` events. What libextism writes straight to stderr
during a call (`logs.NativeStderr`) is logged as the plugin's too, within the same share of the log.
"""

from __future__ import annotations

import re
import threading
from functools import cache

import extism
import structlog

from pi_controller.logs import LineBudget

log = structlog.get_logger("pi_controller.extism")

_LINE = re.compile(r"^\S+\s+(?P<level>[A-Z]+)\s+(?P<target>[\w:]+): "
                   r"(?P<text>.*?)(?: plugin=\"(?P<id>[0-9a-f-]{36})\")?\s*$", re.DOTALL)
_CALL_FAILED = re.compile(r"call to \S+ (encountered an error|returned with error message): ", re.DOTALL)
_MAX_REASON = 400


class ExtismLog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: dict[str, str] = {}  # instance id -> plugin name
        self._budgets: dict[str, LineBudget] = {}  # instance id -> its plugin's share of the log
        self._reasons: dict[str, str] = {}  # instance id -> why its last call failed
        self._logger = extism.set_log_custom(self._line, "warn")

    def register(self, instance_id: str, plugin: str, budget: LineBudget | None = None) -> None:
        with self._lock:
            self._names[instance_id] = plugin
            if budget is not None:
                self._budgets[instance_id] = budget

    def forget(self, instance_id: str) -> None:
        with self._lock:
            self._names.pop(instance_id, None)
            self._budgets.pop(instance_id, None)
            self._reasons.pop(instance_id, None)

    def reason(self, instance_id: str) -> str | None:
        """Why the last call of this instance failed, as libextism logged it (None if it did not)."""
        self._logger.drain()
        with self._lock:
            return self._reasons.pop(instance_id, None)

    def drain(self) -> None:
        self._logger.drain()

    def native_stderr(self, instance_id: str, lines: list[str]) -> None:
        """What libextism wrote to stderr during a call of this instance (`logs.NativeStderr.take`: raw lines
        of tracing-subscriber's, when a guest's error or log text holds a NUL), logged as its plugin's,
        within its share of the log. The caller brackets the call itself (`sandbox`), as it runs every tick."""
        with self._lock:
            plugin, budget = self._names.get(instance_id), self._budgets.get(instance_id)
        for text in lines:
            if budget is None or budget.admit(what="native_stderr"):
                log.warning("native_stderr", plugin=plugin, text=text[:_MAX_REASON])

    def _line(self, line: str) -> None:
        # Runs inside libextism's drain: an exception here would be printed by cffi and lost.
        try:
            self._take(line)
        except Exception:
            log.exception("extism_log_unreadable", line=line[:200])

    def _take(self, line: str) -> None:
        match = _LINE.match(line)
        if match is None:
            log.warning("extism_log", text=line.strip()[:_MAX_REASON])
            return
        instance, text = match["id"], match["text"]
        failed = _CALL_FAILED.search(text)
        with self._lock:
            plugin = self._names.get(instance or "")
            budget = self._budgets.get(instance or "")
            if failed and instance:
                self._reasons[instance] = _cause(text[failed.end():])
                return
        if budget is not None and not budget.admit():  # a guest's own log_warn/log_error lines, in a loop
            return
        level = "warning" if match["level"] == "WARN" else "error"
        getattr(log, level)("extism_log", plugin=plugin, target=match["target"], text=text.strip()[:_MAX_REASON])


def _cause(text: str) -> str:
    """The useful part of an error: what follows "Caused by:" (wasmtime's chain), else the text."""
    head, _, cause = text.partition("Caused by:")
    lines = [line.strip() for line in (cause or head).splitlines() if line.strip()]
    if cause:
        lines = [line.split(": ", 1)[-1] if line[:1].isdigit() else line for line in lines]
    return "; ".join(lines)[:_MAX_REASON]


@cache
def router() -> ExtismLog:
    """The process's router, created on first use (before any plugin runs, so that it takes)."""
    return ExtismLog()
