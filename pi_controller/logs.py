"""Logging, configured in one place: structlog processors, one event per line on stderr.

`ChangeLog` is how the loop reports recurring problems: once when a problem starts or changes and once
when it clears, never once per tick, while stats still count every occurrence.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import math
import os
import queue
import re
import select
import sys
import threading
import time
import warnings
from collections import Counter
from typing import Any, Callable, Hashable, Literal

import structlog
from structlog.typing import EventDict

from pi_controller.token_bucket import TokenBucket

LogFormat = Literal["console", "json"]


_threshold = _plugin_threshold = logging.DEBUG
_format: LogFormat = "console"
PLUGIN_LINE = "plugin_log"  # a plugin's own line (pi_log), which may have a threshold of its own
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "msg": logging.INFO, "warning": logging.WARNING,
           "warn": logging.WARNING, "error": logging.ERROR, "err": logging.ERROR, "exception": logging.ERROR,
           "critical": logging.CRITICAL, "fatal": logging.CRITICAL, "failure": logging.ERROR}


def enabled(level: str, plugin_line: bool = False) -> bool:
    """Whether events at `level` are kept (a plugin's own line's: `plugin_line`): the tick asks before
    building events that would be dropped."""
    return _LEVELS[level] >= (_plugin_threshold if plugin_line else _threshold)  # once per switch in a tick


def configure(fmt: LogFormat = "console", level: str = "info", plugin_level: str | None = None) -> None:
    """`plugin_level`: plugins' own lines from that level on, whatever `level` says of the daemon's events
    (`simulate` shows an author's pi_log lines at info while the daemon's own stay at warning)."""
    global _threshold, _plugin_threshold, _format
    _threshold, _format = logging.getLevelName(level.upper()), fmt
    _plugin_threshold = min(_threshold, logging.getLevelName((plugin_level or level).upper()))
    renderer: Any = (structlog.processors.JSONRenderer() if fmt == "json"
                     else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *([_daemon_threshold] if _plugin_threshold < _threshold else []),
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            ProcessBudget(PROCESS_LINES_PER_S, PROCESS_BURST),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            bound_fields,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_plugin_threshold),
        logger_factory=_stderr,
        cache_logger_on_first_use=False,
    )
    warnings.showwarning = _warning_as_event
    threading.excepthook = _thread_failed


def _daemon_threshold(logger: Any, method: str, event: EventDict) -> EventDict:
    """With plugins' lines let through from a lower level: the daemon's own events below its threshold go."""
    if event.get("event") != PLUGIN_LINE and _LEVELS.get(method, logging.INFO) < _threshold:
        raise structlog.DropEvent
    return event


def refusal(event: str, text: str, /, **fields: Any) -> None:
    """An error that stops a command before it runs (a config error, no GPIO, a bad argument), said once:
    the plain `text` a person reads on a console; with JSON asked for, an event carrying it as `message`,
    with `fields`, so that every line of the journal parses (jq stops at the first that does not)."""
    if is_json():
        structlog.get_logger("pi_controller.cli").error(event, message=text, **fields)
    else:
        flush()  # after the events logged before it (they go through the writer thread), not ahead of them
        print(text, file=sys.stderr)


def is_json() -> bool:
    return _format == "json"


def asked_format(argv: list[str]) -> LogFormat:
    """The log format a command line asks for, read before argparse: its own refusals must follow it."""
    for index, word in enumerate(argv):
        if word == "--log-format=json" or (word == "--log-format" and argv[index + 1:index + 2] == ["json"]):
            return "json"
    return "console"


def capture_native_stderr() -> None:
    """Native code writes to file descriptor 2 past any handler of ours (libextism's tracing-subscriber
    prints raw lines when a guest's error or log line holds a NUL): point fd 2 at a pipe whose lines
    become `native_stderr` events (`NativeStderr`), and Python's own writes (our events included) at the
    real stderr. Python's fatal-error traceback goes to the real stderr too, so a crash still says where
    it was."""
    global native_stderr
    real = os.dup(2)
    sys.stderr = open(real, "w", buffering=1, encoding="utf-8", errors="backslashreplace")
    faulthandler.enable(sys.stderr)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    native_stderr = NativeStderr(read_end)


class NativeStderr:
    """The lines native code writes to fd 2 (a pipe), as events: a line written during a plugin call is
    that plugin's, logged by its caller through the plugin's own share of the log; the others are
    logged by the reader thread as they come, in the process's budget.

    `with native_stderr:` brackets a batch of plugin calls on the calling thread (the tick's, or one call: see
    `held_native_stderr`). The reader thread keeps the pipe drained whatever happens (a call writing more than the
    pipe holds never blocks), holding what it reads during a batch (at most MAX_HELD lines, the rest counted) for
    `take`, which takes what is still in the pipe too: a call in the batch that can have written takes every byte it
    wrote as its own (`SandboxedPlugin._invoke`), and what is held at the end of the batch is logged as the
    process's. The end does not look at the pipe (a `poll`, ~6 us of a paced tick): what is still there was written
    beside the calls, not by them, and the reader thread logs it as the process's, as it logs whatever comes outside
    a batch (`take` outside one too). Two batches under way at once (a plugin's health check at load time beside the
    tick) share what was written: the first to take it has it. One bracket for the tick's calls rather than one
    each: a bracket cost ~4 us of a paced tick per plugin, two locks and a `poll`, for calls that nearly never
    write: libextism writes to fd 2 only for a guest's error or log line."""

    MAX_HELD = 256
    MAX_LINE = 4096

    def __init__(self, fd: int):
        os.set_blocking(fd, False)
        self._fd = fd
        self._lock = threading.Lock()
        self._calls = 0  # under way
        self._held: list[bytes] = []
        self._more = 0  # lines past MAX_HELD during the calls under way
        self._partial = b""
        self._log = structlog.get_logger("pi_controller.native")
        self._ready = select.poll()  # the caller's, for a look at the pipe that never waits
        self._ready.register(fd, select.POLLIN)
        threading.Thread(target=self._run, args=(select.poll(),), name="native-stderr", daemon=True).start()

    def __enter__(self) -> None:
        with self._lock:
            self._calls += 1

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self._calls -= 1
            if not (self._held or self._partial):
                return  # nothing held, as after nearly every batch: `_taken`'s answer, without its call
            left = self._taken()
        self._as_process_s(left)  # written by a call that could not have (or by code beside it)

    def take(self) -> list[str]:
        """What was written since the batch began (and by batches under way alongside), line by line;
        outside a batch, nobody's: logged as the process's, and []."""
        with self._lock:
            lines = self._taken()
            if self._calls:
                return lines
        self._as_process_s(lines)
        return []

    def _as_process_s(self, lines: list[str]) -> None:
        for line in lines:
            self._log.warning("native_stderr", text=line)

    def _taken(self) -> list[str]:
        """Under the lock: what is held, and what is still in the pipe."""
        if self._ready.poll(0):
            self._hold()
        if not (self._held or self._partial):
            return []  # as after nearly every call
        lines = [*self._held, self._partial] if self._partial else self._held
        if self._more:
            lines.append(f"... and {self._more} more lines".encode())
        self._held, self._more, self._partial = [], 0, b""
        return [_native_text(line) for line in lines if line.strip()]

    def _run(self, readable: select.poll) -> None:
        readable.register(self._fd, select.POLLIN)
        while True:
            readable.poll()
            with self._lock:
                lines = self._read() if self._calls == 0 else self._hold()
            if lines is None:
                return  # the pipe's write end is gone: the process is ending
            for line in lines:
                if line.strip():
                    self._log.warning("native_stderr", text=_native_text(line))

    def _hold(self) -> list[bytes] | None:
        lines = self._read()
        if lines is None:
            return None
        room = self.MAX_HELD - len(self._held)
        self._held += lines[:room]
        self._more += len(lines[room:])
        return []

    def _read(self) -> list[bytes] | None:
        """Whole lines from what the pipe holds now ([] if nothing; None at its end); a line longer than
        MAX_LINE is cut there. Under the lock."""
        try:
            data = os.read(self._fd, 1 << 16)
        except BlockingIOError:
            return []
        if not data:
            return None
        *lines, self._partial = (self._partial + data).split(b"\n")
        if len(self._partial) > self.MAX_LINE:
            lines.append(self._partial[:self.MAX_LINE])
            self._partial = b""
        return [line[:self.MAX_LINE] for line in lines]


def _native_text(line: bytes) -> str:
    return line.decode(errors="replace").rstrip()


native_stderr: NativeStderr | None = None  # once `capture_native_stderr` has run


UNHELD = contextlib.nullcontext()  # fd 2 where it was not captured: a bracket that does nothing, reusable


def held_native_stderr() -> contextlib.AbstractContextManager[None]:
    """A batch of plugin calls (`NativeStderr`): what native code writes to fd 2 meanwhile waits for the
    call that takes it. The tick writes `logs.native_stderr or logs.UNHELD` itself: a call less."""
    return native_stderr or UNHELD


def _stderr(*args: Any) -> Any:
    """The writer thread once `write_off_thread` started it; until then whatever sys.stderr is when the
    event is written, not when logging was set up (a test's capture that has since closed, say)."""
    return _writer if _writer is not None else structlog.PrintLogger(sys.stderr)


class LineWriter:
    """Writes rendered events to stderr from a thread of its own, so that no tick waits on it: on a Pi,
    stderr is a pipe to journald, which can stall on a slow SD card. Bounded: with `max_lines` waiting,
    further lines are dropped and counted, and one line says how many once there is room again."""

    def __init__(self, max_lines: int = 10_000):
        self._lines: queue.Queue[str] = queue.Queue(max_lines)
        self._lock = threading.Lock()  # one writer at a time: the thread, or `flush` at exit
        self.dropped = 0
        threading.Thread(target=self._run, name="log-writer", daemon=True).start()

    def msg(self, line: str) -> None:
        try:
            self._lines.put_nowait(line)
        except queue.Full:
            self.dropped += 1  # a rare miss of the count across threads is of no consequence

    log = debug = info = warning = warn = error = critical = exception = fatal = failure = err = msg

    def _run(self) -> None:
        while True:
            line = self._lines.get()
            with self._lock:
                self._write(line)
            self._lines.task_done()

    def _write(self, line: str) -> None:
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            print(json.dumps({"event": "log_lines_dropped", "lines": dropped, "why": "the log writer fell behind"}),
                  file=sys.stderr)
        print(line, file=sys.stderr, flush=self._lines.empty())

    def flush(self, wait_s: float = 2.0) -> None:
        """Write what is waiting, now, on this thread, and wait (a while) for the line the writer may
        have taken but not yet written: before the process exits, nothing logged may be lost."""
        with self._lock:
            while not self._lines.empty():
                self._write(self._lines.get_nowait())
                self._lines.task_done()
        deadline = time.monotonic() + wait_s
        while self._lines.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.001)
        with self._lock:
            sys.stderr.flush()


_writer: LineWriter | None = None


def write_off_thread() -> LineWriter:
    """From now on events are written by a thread of their own (the daemon's console entry sets this;
    `flush` before exiting)."""
    global _writer
    if _writer is None:
        _writer = LineWriter()
    return _writer


def flush() -> None:
    if _writer is not None:
        _writer.flush()


def _thread_failed(failure: threading.ExceptHookArgs) -> None:
    """An exception that ends a thread (a library's, say) as one event, not a raw traceback on stderr."""
    structlog.get_logger("pi_controller.threads").error(
        "thread_failed", thread=failure.thread.name if failure.thread else None,
        exc_info=(failure.exc_type, failure.exc_value, failure.exc_traceback))


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
        # key -> (event, tick last seen); read by the tick, which calls `end_tick` only while one is active
        self.active: dict[Hashable, tuple[str, int]] = {}

    def problem(self, key: Hashable, event: str, tick: int, level: str = "warning", **fields: Any) -> None:
        if key not in self.active:
            getattr(self._log, level)(event, tick=tick, **fields)
        self.active[key] = (event, tick)

    def end_tick(self, tick: int) -> None:
        """Problems not seen for `quiet_ticks` ticks have cleared."""
        for key, (event, seen) in list(self.active.items()):
            if tick - seen >= self._quiet:
                del self.active[key]
                self._log.info(f"{event}_cleared", key=_describe(key), tick=tick, last_seen_tick=seen)


def _describe(key: Hashable) -> Any:
    return list(key) if isinstance(key, tuple) else key


class LineBudget:
    """A share of the log: `rate` lines a second in bursts of `burst` (a token bucket). What it drops
    is counted, by what it was when the caller says, and told in one `notice` line (with `fields`)
    once it may log again; that line takes a token like any other and comes at most every
    `notice_s`, so a flood costs the log `rate` lines a second, notices included. Not thread-safe:
    one per plugin (our `pi_log` and Extism's own log functions, on the tick thread), or behind a lock."""

    def __init__(self, logger: Any, notice: str, rate: float, burst: int,
                 clock: Callable[[], float] = time.monotonic, notice_s: float = 10.0, **fields: Any):
        self.clock = clock
        self._log, self._notice, self._fields = logger, notice, fields
        self._bucket, self._notice_s = TokenBucket(rate, burst, clock()), notice_s
        self._noticed = -math.inf
        self.dropped = 0
        self._what: Counter[str] = Counter()

    def admit(self, tick: int | None = None, what: str | None = None) -> bool:
        bucket = self._bucket
        now = self.clock()
        tokens = bucket.refill(now)
        if self.dropped and tokens >= 1 and now - self._noticed >= self._notice_s:
            bucket.take()  # the notice goes first, on the token the line would have had
            self._noticed = now
            most = dict(self._what.most_common(_NOTICE_KINDS)) if self._what else None
            self._log.warning(self._notice, tick=tick, lines=self.dropped,
                              limit=f"{bucket.rate:g}/s, burst {bucket.burst:g}",
                              **({"dropped": most} if most else {}), **self._fields)
            self.dropped = 0
            self._what.clear()
        if bucket.tokens < 1:
            self.dropped += 1
            if what is not None and (what in self._what or len(self._what) < _NOTICE_KINDS):
                self._what[what] += 1
            return False
        bucket.take()
        return True


_NOTICE_KINDS = 8  # the kinds of line a notice names, most dropped first


PROCESS_LINES_PER_S = 50.0
PROCESS_BURST = 500  # a daemon's start (every plugin, device, topic) fits


class ProcessBudget:
    """The structlog processor that bounds the whole process's log, whatever logs: past the budget,
    events are dropped and one `log_lines_dropped` line says how many, of which events."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self._budget = LineBudget(structlog.get_logger("pi_controller.logs"), "log_lines_dropped", rate, burst, clock)
        self._lock = threading.Lock()
        self._inside = threading.local()  # the notice itself passes through this processor

    def __call__(self, logger: Any, method: str, event: EventDict) -> EventDict:
        if getattr(self._inside, "notice", False):
            return event
        with self._lock:
            self._inside.notice = True
            try:
                admitted = self._budget.admit(event.get("tick"), str(event.get("event"))[:64])
            finally:
                self._inside.notice = False
        if not admitted:
            raise structlog.DropEvent
        return event


MAX_FIELD_CHARS = 300


def bound_fields(logger: Any, method: str, event: EventDict) -> EventDict:
    """No field of any event over MAX_FIELD_CHARS characters, nor with a control character that would
    break the line, whatever a plugin, a sensor or a payload put into it. A traceback keeps its lines."""
    for key, value in event.items():
        if key == "exception":
            event[key] = value[:_MAX_TRACEBACK]
        elif isinstance(value, str):
            event[key] = printable(value)
        elif not (value is None or isinstance(value, (bool, int, float))):
            text = repr(value) if isinstance(value, (list, tuple, dict)) else str(value)
            if len(text) > MAX_FIELD_CHARS or not text.isprintable():
                event[key] = printable(text)
    return event


_MAX_TRACEBACK = 8000


def printable(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """`text` cut to `limit` characters with control characters escaped: one event stays one line."""
    cut = text[:limit] + (f"...({len(text) - limit} more)" if len(text) > limit else "")
    if cut.isprintable():
        return cut
    escaped = cut.encode("unicode_escape").decode("ascii")
    return escaped if len(escaped) <= limit + 20 else escaped[:limit] + "...(escaped)"


def kind_of(text: str) -> str:
    """What a problem is keyed by: its text with the numbers masked, so "no reading for 2.3 s" and
    "... 2.4 s" are one problem, not one a tick."""
    return _NUMBER.sub("#", text)[:200]


_NUMBER = re.compile(r"[-+]?\d[\d.,:e+-]*")
