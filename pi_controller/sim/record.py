"""Recordings: what the loop saw and did, one compact JSON line per tick, for `replay` and post-mortems.

A recording is a header line (`{"format": "pi-controller-recording", "version": 1, ...}`: the rate,
each sensor's unit, the actuators, the plugins loaded and the config's text, so it replays anywhere)
followed by one line per tick; a reload (SIGHUP, a plugin swapped in or out) writes a new header line
(`"reason": "reload"`, `"tick"`: the first tick under it) before the next tick's. A tick line holds,
leaving out what is empty:

    n  tick number          t  the context's timestamp     m  the context's monotonic time
    r  valid readings: {sensor: value}, or {sensor: [value, timestamp]} when read at another time
    bad  invalid readings: {sensor: [error, timestamp]}
    s  device states the plugins saw, those that changed since the line before: {actuator: state}
    p  each plugin that answered: {plugin: [[actuator, action, target], ...]} (its valid commands)
    x  rejected commands: {plugin: [[actuator or null, rule, reason], ...]}
    e  failed calls: {plugin: kind}      o  operator overrides in force: [[actuator, action, target]]
    k  conflicts: [[actuator, winner, loser]]     h  safety holds: [[actuator, rule, plugin]]
    f  failsafes: [[actuator, owner, why]]        a  applied: [[actuator, target, plugin]]
    d  plugins the operator disabled

Plain lines compress tenfold: a name ending in `.gz` is gzip, flushed in sync blocks so that all but
the last second decodes after a crash. Each run appends (a new header, a new gzip member); a reader
skips a last line cut short. Lines are encoded after the tick (in `tick_done`, between two ticks) and
written by a thread of their own, ten at a time, through a bounded queue: a slow SD card drops lines
(counted, logged once), it never holds up a tick. Past `max_mb` the file is rotated (`.1`, `.2`, ... `keep` of them).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import queue
import threading
import time
import zlib
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import structlog

from pi_controller.config import MAX_CONFIG_BYTES, ConfigError, RecordSettings, Settings, read
from pi_controller.contract import COMPACT, Reading
from pi_controller.devices.sensors import Sensor
from pi_controller.files import open_to_read, open_to_write
from pi_controller.logs import ChangeLog
from pi_controller.observer import LoopObserver, TickReport, TickTrace

log = structlog.get_logger("pi_controller.record")

FORMAT = "pi-controller-recording"
VERSION = 1
MAX_LINE_BYTES = 1024 * 1024  # a tick of a few dozen devices is a few KiB: past this it is no line of ours
MAX_GZIP_RATIO = 200  # our JSON lines deflate 10 to 20 times; gzip can do 1,000 (a bomb)
MAX_GZIP_FLOOR = 1024 * 1024  # inflated bytes taken whatever the ratio (a header alone can be 40 times)
_BATCH = 10  # lines handed to the writer at once: one wake-up of its thread a second at 10 Hz
_QUEUE_BATCHES = 60  # a minute at 10 Hz: what a stalled card may hold before lines are dropped
_FLUSH_S = 1.0
RETRY_S = 30.0  # a recording that cannot be opened or written is tried again this often
_STOP: list[bytes] = []


def header(settings: Settings, plugins: dict[str, str], started: float, tick: int = 0,
           reason: str = "start") -> dict[str, Any]:
    """The first line of each run, and again after each reload (`reason`: "reload", from `tick` on):
    what a replay needs besides the ticks. `plugins`: name -> sha256 of the live ones."""
    try:
        text: str | None = read(settings.source, MAX_CONFIG_BYTES)
    except ConfigError:  # the file moved since it was loaded, or was a pipe, read then: replay needs --config
        text = None
    return {"format": FORMAT, "version": VERSION, "started": started, "reason": reason, "tick": tick,
            "rate_hz": settings.loop.rate_hz,
            "sensors": {s.id: s.unit for s in settings.sensors},
            "actuators": {a.id: a.kind for a in settings.actuators},
            "plugins": plugins, "config_file": str(settings.source), "config": text}


def encode(trace: TickTrace, previous: dict[str, dict[str, Any]] | None) -> bytes:
    """One tick as a line; `previous`: the states of the line before (None: write them all)."""
    line: dict[str, Any] = {"n": trace.number, "t": trace.time, "m": trace.monotonic}
    valid: dict[str, Any] = {}
    bad: dict[str, Any] = {}
    for r in trace.readings:
        if r.error is not None:
            bad[r.sensor_id] = [r.error, r.timestamp]
        else:
            valid[r.sensor_id] = r.value if r.timestamp == trace.time else [r.value, r.timestamp]
    states = {key: state for key, state in trace.states.items()
              if previous is None or previous.get(key) is not state}
    plugins: dict[str, list[Any]] = {name: [] for name in trace.verdicts.answered}
    overrides: list[list[Any]] = []
    for c in trace.proposals:
        (plugins.setdefault(c.plugin, []) if c.plugin in plugins else overrides).append(
            [c.device_id, c.action, c.target])
    rejected: dict[str, list[Any]] = {}
    for j in trace.verdicts.rejections:
        rejected.setdefault(j.plugin, []).append([j.device_id, j.rule, j.reason])
    decision = trace.decision
    parts = {"r": valid, "bad": bad, "s": states, "p": plugins, "x": rejected, "e": trace.verdicts.failures,
             "o": overrides, "k": [[w.device_id, w.plugin, lost.plugin] for w, lost in trace.conflicts],
             "h": [[h.device_id, h.rule, h.plugin] for h in decision.holds],
             "f": [[f.device_id, f.owner, f.why] for f in decision.failsafes],
             "a": [[w.device_id, w.target, w.plugin] for w in decision.writes],
             "d": sorted(trace.disabled)}
    line.update((key, value) for key, value in parts.items() if value)
    return COMPACT.encode(line).encode() + b"\n"


class _HeaderLine(bytes):
    """A header line among the tick lines: the writer starts each rotated file with the latest."""


class _Resync(_HeaderLine):
    """The first element of a batch after lines were lost: the header its lines are under, written only
    if the file is opened for them; the line after it carries every state, so it reads without the lost."""


def _ticks(lines: list[bytes]) -> int:
    return sum(not isinstance(line, _HeaderLine) for line in lines)


class Recorder(LoopObserver):
    """Appends each finished tick to a recording: encoded on the event loop after the tick, written
    on a thread of its own. A recording is a diagnostic: a file that cannot be opened or written (a full
    disk, a read-only folder) is logged once (`recording_unavailable`), its lines are dropped and counted,
    it is tried again every `RETRY_S`, and the loop never waits for it nor stops for it."""

    def __init__(self, settings: RecordSettings, path: Path, trace: Callable[[], TickTrace | None],
                 first_line: dict[str, Any]):
        self.settings = settings
        self.path = path
        self.lines = 0
        self.error: str | None = None  # why lines are not being written, while they are not
        self._dropped_full = 0  # lines the queue had no room for (counted on the event loop)
        self._dropped_lost = 0  # lines the writer could not write (counted on its thread)
        self._closed = False
        self._trace = trace
        self._header = _HeaderLine(COMPACT.encode(first_line).encode() + b"\n")
        self._states: dict[str, dict[str, Any]] | None = None
        self._batch: list[bytes] = []
        self._queue: queue.Queue[list[bytes]] = queue.Queue(_QUEUE_BATCHES)
        self._problems = ChangeLog(log)
        self._lost = threading.Event()  # the writer dropped lines: the next batch must read on its own
        self._file: _Output | None = None
        self._synced = False  # what reaches the file follows what is in it
        self._retry_at = 0.0
        if self._reopen(_Resync(self._header)):  # at once: a failure is said before the first tick
            self._synced = True
            log.info("recording", file=str(path), max_mb=settings.max_mb, keep=settings.keep)
        else:
            self._lost.set()
        self._thread = threading.Thread(target=self._write, name="recorder", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        return self._dropped_full + self._dropped_lost

    def reheader(self, line: dict[str, Any]) -> None:
        """A new header (after a reload), before the next tick's line; that line carries every state."""
        self._header = _HeaderLine(COMPACT.encode(line).encode() + b"\n")
        self._batch.append(self._header)
        self._states = None

    def tick_done(self, report: TickReport) -> None:
        trace = self._trace()
        if trace is None or trace.number != report.number:
            return  # no tick completed since (a tick that raised leaves the last trace in place)
        if self._lost.is_set():  # what was encoded before is dropped by the writer: start afresh
            self._lost.clear()
            self._send(trace.number)
            self._batch, self._states = [_Resync(self._header)], None
        self._batch.append(encode(trace, self._states))
        self._states = trace.states
        if len(self._batch) >= _BATCH:
            self._send(trace.number)

    def _send(self, tick: int) -> None:
        batch, self._batch = self._batch, []
        if not batch:
            return
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            self._dropped_full += _ticks(batch)
            self._states = None  # the next line that gets through carries every state again
            self._batch = [_Resync(self._header)]
            if any(isinstance(line, _HeaderLine) and not isinstance(line, _Resync) for line in batch):
                self._batch.append(self._header)  # the ticks to come are under it
            self._problems.problem("full", "recording_lines_dropped", tick=tick, file=str(self.path),
                                   dropped=self.dropped, note="the disk is slower than the ticks")
            return
        self._problems.end_tick(tick=tick)

    def _write(self) -> None:
        last_flush = time.monotonic()
        while True:
            try:
                batch = self._queue.get(timeout=_FLUSH_S)
            except queue.Empty:
                batch = None
            if batch is _STOP:
                break
            if batch:
                self._take(batch)
            if self._file is not None and (batch is None or time.monotonic() - last_flush >= _FLUSH_S):
                self._flush()
                last_flush = time.monotonic()
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                self._unavailable(exc)

    def _take(self, batch: list[bytes]) -> None:
        """Write a batch, or drop it: after a loss, until one that reads on its own; without a file, until
        it opens again."""
        resync = isinstance(batch[0], _Resync)
        if not (self._synced or resync) or (self._file is None and not self._reopen(batch[0])):
            self._dropped_lost += _ticks(batch)
            self._lost.set()
            return
        assert self._file is not None
        lines = batch[1:] if resync else batch
        headers = [line for line in lines if isinstance(line, _HeaderLine)]
        if headers:
            self._file.first_line = headers[-1]
        try:
            self._file.write(b"".join(lines))
        except OSError as exc:
            self._dropped_lost += _ticks(lines)
            self._lose(exc)
            return
        self.lines += len(lines)
        self._synced = True

    def _flush(self) -> None:
        """What was written, onto the disk: only then is a recording that could not be written back."""
        assert self._file is not None
        try:
            self._file.flush()
        except OSError as exc:
            self._lose(exc)
            return
        if self.error is not None:
            log.warning("recording_resumed", file=str(self.path), dropped=self.dropped)
            self.error = None

    def _reopen(self, first_line: bytes) -> bool:
        """Open the file (its first line `first_line`), at most every RETRY_S while it cannot be."""
        if time.monotonic() < self._retry_at:
            return False
        try:
            self._file = _Output(self.path, self.settings.max_mb * 1024 * 1024, self.settings.keep, first_line)
        except OSError as exc:
            self._unavailable(exc)
            return False
        return True

    def _lose(self, exc: OSError) -> None:
        """A write failed (a full or failing disk): the file is given up, and opened again later."""
        if self._file is not None:
            self._file.abandon()
        self._file, self._synced = None, False
        self._lost.set()
        self._unavailable(exc)

    def _unavailable(self, exc: OSError) -> None:
        """Logged once until the recording is written again; tried again in RETRY_S."""
        self._retry_at = time.monotonic() + RETRY_S
        if self.error is None:
            self.error = f"{exc.strerror or exc}"[:300]
            log.error("recording_unavailable", file=str(self.path), error=self.error,
                      note=f"the loop runs on without it; tried again every {RETRY_S:g} s")

    def close(self) -> None:
        """Write what is queued, end the file, stop the thread."""
        if self._closed:
            return
        self._closed = True
        if self._batch:
            self._queue.put(self._batch)
        self._queue.put(_STOP)
        self._thread.join()
        log.info("recording_closed", file=str(self.path), lines=self.lines, dropped=self.dropped)


class _Output:
    """The recording file (gzip by its name), rotated past `max_bytes`; used by the writer thread only."""

    def __init__(self, path: Path, max_bytes: int, keep: int, first_line: bytes):
        self.path, self.max_bytes, self.keep, self.first_line = path, max_bytes, keep, first_line
        self._raw: IO[bytes] | None = None
        self._out: IO[bytes] | gzip.GzipFile | None = None
        self._open()

    def _open(self) -> None:
        raw: IO[bytes] = open_to_write(self.path, append=True)
        self._raw = raw
        try:
            out: IO[bytes] | gzip.GzipFile = raw
            if self.path.suffix == ".gz":
                out = gzip.GzipFile(fileobj=raw, mode="ab", mtime=0)
            self._out = out
            out.write(self.first_line)
        except OSError:  # a full disk: nothing left open
            self.abandon()
            raise

    def write(self, lines: bytes) -> None:
        assert self._out is not None and self._raw is not None
        self._out.write(lines)
        if self._raw.seekable() and self._raw.tell() >= self.max_bytes:  # a pipe has no size, and no rotation
            self._rotate()

    def flush(self) -> None:
        if self._out is not None:
            self._out.flush()  # gzip: a sync flush, so what is written so far decodes without the end

    def _rotate(self) -> None:
        self.close()
        for n in range(self.keep, 0, -1):  # the oldest is overwritten
            newer = self.path if n == 1 else self.path.with_name(f"{self.path.name}.{n - 1}")
            if newer.exists():
                os.replace(newer, self.path.with_name(f"{self.path.name}.{n}"))
        if self.keep == 0:
            self.path.unlink(missing_ok=True)
        self._open()

    def close(self) -> None:
        if self._out is not None and self._out is not self._raw:
            self._out.close()
        if self._raw is not None:
            self._raw.close()
        self._raw = self._out = None

    def abandon(self) -> None:
        try:
            self.close()
        except OSError:
            self._raw = self._out = None


# ---------------------------------------------------------------------------------------------
# Reading


class RecordingError(Exception):
    """Not a recording of ours (or of a version this one cannot read)."""


class Reader:
    """The lines of a recording, plain or gzip, as (header, tick) pairs, read a chunk at a time (memory
    bounded whatever the file holds); a line cut short (a crash mid-write) or not JSON is skipped and
    counted in `skipped`. What is not a recording of ours raises RecordingError naming the file and its
    line (`line`, from 1): a line over MAX_LINE_BYTES, JSON nested past all reason, a tick whose time or
    readings are not of their type, gzip data that inflates past MAX_GZIP_RATIO (a bomb)."""

    def __init__(self, path: Path):
        self.path = path
        self.skipped = 0
        self.line = 0  # the number of the line last read
        self.header: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        for raw in self._lines():
            try:
                line = json.loads(raw)
            except ValueError:
                line = None
            except RecursionError:
                raise self.refusal("JSON nested thousands deep: not a line of ours") from None
            if isinstance(line, dict) and line.get("format") == FORMAT:
                self.header = _checked(line, self.path)
            elif self.header is None:
                raise RecordingError(f"{self.path}: does not start with a {FORMAT} header line")
            elif not isinstance(line, dict):
                self.skipped += 1
            elif isinstance(line.get("n"), int) and "t" in line:
                problem = _tick_problem(line)
                if problem:
                    raise self.refusal(f"tick {str(line['n'])[:20]}: {problem}")
                yield self.header, line
            else:
                self.skipped += 1

    def refusal(self, what: str) -> RecordingError:
        """`what` is wrong with the line last read, as the one line that says so."""
        return RecordingError(f"{self.path}:{self.line}: {what}"[:300])

    def _lines(self) -> Iterator[bytes]:
        pending = b""
        for chunk in _chunks(self.path):
            pending += chunk
            *whole, pending = pending.split(b"\n")
            for line in whole:
                self.line += 1
                if line:
                    yield line
            if len(pending) > MAX_LINE_BYTES:
                self.line += 1
                raise self.refusal(f"a line longer than {MAX_LINE_BYTES} bytes: not a recording")
        if pending:
            self.line += 1
            self.skipped += 1  # the last line, cut short


def _tick_problem(line: dict[str, Any]) -> str | None:
    """What is wrong with what every reader takes from a tick line (its times and readings, `readings`);
    None if nothing. What only replay takes, it checks as it takes it."""
    if not _finite(line["t"]) or not _finite(line.get("m", 0.0)):
        return "its time (t, m) is not a finite number"
    valid, bad = line.get("r", {}), line.get("bad", {})
    if not isinstance(valid, dict) or not all(
            _finite(v) or (isinstance(v, list) and len(v) == 2 and all(map(_finite, v))) for v in valid.values()):
        return "its readings (r) are not sensor ids to finite values or [value, time]"
    if not isinstance(bad, dict) or not all(isinstance(v, list) and len(v) == 2 and _finite(v[1])
                                            for v in bad.values()):
        return "its invalid readings (bad) are not sensor ids to [error, time]"
    return None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _checked(header: dict[str, Any], path: Path) -> dict[str, Any]:
    """The header, if what readers take from it has its type: a file is anyone's to write."""
    if header.get("version") != VERSION:
        raise RecordingError(f"{path}: recording version {header.get('version')!r:.20}; this pi-controller "
                             f"reads version {VERSION}")
    rate, sensors = header.get("rate_hz", 1.0), header.get("sensors", {})
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < math.inf:
        raise RecordingError(f"{path}: a header's rate_hz is {str(rate)[:40]!r}, not a rate")
    if not isinstance(sensors, dict) or not all(isinstance(unit, str) for unit in sensors.values()):
        raise RecordingError(f"{path}: a header's sensors are not a mapping of sensor ids to units")
    plugins, source = header.get("plugins", {}), header.get("config_file", "")
    if not isinstance(plugins, dict) or not all(isinstance(sha, str) for sha in plugins.values()):
        raise RecordingError(f"{path}: a header's plugins are not a mapping of plugin names to sha256 digests")
    if not isinstance(source, str) or not isinstance(header.get("config", ""), str):
        raise RecordingError(f"{path}: a header's config or config_file is not text")
    return header


def _chunks(path: Path, size: int = 1 << 16) -> Iterator[bytes]:
    """The file's bytes, gunzipped if it is gzip (members one after another; a cut-off end yields
    what it decodes to), at most `size` bytes at a time, and never more than MAX_GZIP_RATIO times what
    it was inflated from (past a first MAX_GZIP_FLOOR)."""
    with open_to_read(path) as stream:
        first = stream.read(size)
        if not first.startswith(b"\x1f\x8b"):
            while first:
                yield first
                first = stream.read(size)
            return
        inflate, data, read, inflated = zlib.decompressobj(wbits=31), first, len(first), 0
        try:
            while data:
                while True:
                    out = inflate.decompress(data, size)
                    inflated += len(out)
                    taken = read - len(inflate.unconsumed_tail)
                    if inflated > max(MAX_GZIP_FLOOR, MAX_GZIP_RATIO * taken):
                        raise RecordingError(f"{path}: gzip data inflating past {MAX_GZIP_RATIO} times its size "
                                             f"({inflated >> 10} KiB from {taken} bytes): a gzip bomb, "
                                             "not a recording")
                    yield out
                    if inflate.eof and inflate.unused_data:  # the next run's member
                        data, inflate = inflate.unused_data, zlib.decompressobj(wbits=31)
                    elif inflate.unconsumed_tail or len(out) == size:  # more to come of what was read
                        data = inflate.unconsumed_tail
                    else:
                        break
                data = stream.read(size)
                read += len(data)
        except zlib.error as exc:
            raise RecordingError(f"{path}: corrupt gzip data ({exc})") from exc


def readings(line: dict[str, Any], units: dict[str, str], now: float) -> list[Reading]:
    """The tick's readings in the order the loop read them (the header's): the context's bytes depend on it."""
    valid, bad = line.get("r", {}), line.get("bad", {})
    readings = []
    for sensor in [*units, *(s for s in (*valid, *bad) if s not in units)]:
        if sensor in valid:
            value, timestamp = valid[sensor] if isinstance(valid[sensor], list) else (valid[sensor], now)
            readings.append(Reading(sensor, value, units.get(sensor, ""), timestamp))
        elif sensor in bad:
            error, timestamp = bad[sensor]
            readings.append(Reading(sensor, None, units.get(sensor, ""), timestamp, str(error)))
    return readings


class Unrecorded(Exception):
    """No recorded value for a sensor at a tick: recorded invalid, left out, or past the end."""


class Playback:
    """A recording's readings on its own time from its first tick (sample and hold): what
    `simulate --from-recording` feeds the sensors no model drives. Read as the run goes (bounded memory)."""

    def __init__(self, path: Path):
        self._lines = iter(Reader(path))
        self._next = next(self._lines, None)
        if self._next is None:
            raise RecordingError(f"{path}: no tick recorded")
        header, line = self._next
        self.sensors: dict[str, str] = header.get("sensors", {})  # id -> unit
        self._first, self._period = line["t"], 1.0 / float(header.get("rate_hz") or 1.0)
        self._last_t = line["t"]
        self._current: dict[str, Reading] = {}
        self._refused: str | None = None  # why the recording ends early: a line not of ours

    def _following(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        try:
            return next(self._lines, None)
        except RecordingError as exc:
            self._refused = str(exc)
            return None

    def value(self, sensor: str, elapsed: float) -> float:
        """The value recorded for `sensor` `elapsed` seconds after the first tick; raises Unrecorded."""
        while self._next is not None and self._next[1]["t"] - self._first <= elapsed:
            header, line = self._next
            self._current = {r.sensor_id: r for r in readings(line, header.get("sensors", {}), line["t"])}
            self._last_t = line["t"]
            self._next = self._following()
        if self._next is None and elapsed > self._last_t - self._first + self._period:
            raise Unrecorded(self._refused or f"the recording ended at {self._last_t - self._first:.1f} s")
        reading = self._current.get(sensor)
        if reading is None or reading.value is None:
            raise Unrecorded("recorded invalid" + (f": {reading.error}" if reading is not None else ""))
        return reading.value


class RecordedSensor(Sensor):
    """A sensor played from a recording, in place of the one built (closed with it)."""

    def __init__(self, sensor: Sensor, playback: Playback, start: float):
        super().__init__(sensor.settings)
        self._sensor, self._playback, self._start = sensor, playback, start
        self._elapsed = 0.0

    def read(self, now: float) -> Reading:
        self._elapsed = now - self._start
        return super().read(now)

    def _sample(self) -> float:
        return self._playback.value(self.settings.id, self._elapsed)

    def close(self) -> None:
        self._sensor.close()
