"""The host functions a control plugin may import from "extism:host/user", and what backs them.

- `pi_log(level: i64, message: i64)`: one line into our log pipeline as a `plugin_log` event with the
  plugin and tick. `level` is 0 debug, 1 info, 2 warning, 3 error; `message` is the offset of an
  Extism memory block holding UTF-8 text, or a JSON object `{"message": ..., other scalar fields}`.
  Rate limited per plugin (`logs.LineBudget`, which Extism's own log functions share); what is dropped
  is counted in one line when logging resumes.
- `pi_history(sensor_id: i64, count: i64) -> i64`: the offset of a JSON array `[[timestamp, value], ...]`
  holding up to `count` most recent valid readings of a sensor, oldest first; 0 when the sensor is
  unknown, not granted to the plugin, or the plugin has used its reads for this call.

Both run on the tick thread inside the plugin's call and trust nothing from the guest: offsets are
looked up in Extism's allocation table (an offset that is not a block reads as empty), lengths are
capped before anything is copied, and every failure is caught here (cffi would print an escaping
exception and carry on with a zero result). Each call of a plugin has a budget of host calls: past it,
the call is cancelled, so a guest spinning on host functions fails in a number of calls, not of
milliseconds (fuel does not count time spent in the host).
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from itertools import islice
from typing import TYPE_CHECKING, Any, Callable, Sequence

import structlog

from pi_controller import logs
from pi_controller.plugins.extism_adapter import I64, HostFunction, host_function, host_of, read_block, write_block

if TYPE_CHECKING:  # not at run time: the trial compile's child (`trial`) imports this module, and fast
    from pi_controller.config import HostFunctionSettings
    from pi_controller.contract import Reading

log = structlog.get_logger("pi_controller.plugin")

LEVELS = ("debug", "info", "warning", "error")
MAX_MESSAGE_BYTES = 2048  # read from the guest at most; the logged text is cut shorter still
MAX_TEXT = 512
MAX_FIELDS = 16
MAX_ID_BYTES = 64  # schema.ID_PATTERN's longest id


class History:
    """The recent valid readings of every sensor, in rings of fixed length. The tick only keeps its list
    of readings (`record`); they are filed into their sensors' rings when a plugin reads, or by the loop
    once the tick's pins are written (`file`), so the tick's path to its writes pays one append. A read
    encodes what arrived since the last read (the way the context writes numbers) and joins the encoded
    entries, so a plugin asking every tick for a long window pays for one new entry, not for the window.
    About 100 bytes an entry."""

    def __init__(self, length: int):
        self.length = length
        self._rings: dict[str, _Ring] = {}
        self._unfiled: list[Sequence[Reading]] = []  # whole ticks' readings, oldest first; never changed

    def record(self, readings: Sequence[Reading]) -> None:
        """One tick's readings (a list its caller no longer changes), newest last."""
        self._unfiled.append(readings)
        if len(self._unfiled) >= self.length:  # nobody files them: stay bounded all the same
            self.file()

    def file(self) -> None:
        """The readings recorded since the last time, into their rings (a ring for every sensor read)."""
        for readings in self._unfiled:
            for r in readings:
                ring = self._rings.get(r.sensor_id)
                if ring is None:
                    ring = self._rings[r.sensor_id] = _Ring(self.length)
                if r.error is None and r.value is not None:
                    ring.pending.append(r)
        self._unfiled.clear()

    def encode(self, sensor_id: str, count: int) -> bytes | None:
        """The last `count` entries, oldest first, as a JSON array; None for a sensor never read."""
        if self._unfiled:
            self.file()
        ring = self._rings.get(sensor_id)
        return None if ring is None else ring.encode(count)


class _Ring:
    __slots__ = ("encoded", "length", "pending")

    def __init__(self, length: int):
        self.length = length
        self.encoded: deque[str] = deque(maxlen=length)
        # Not yet encoded, as nobody read since they came; the last `length` alone, as no more would be read.
        # A bounded deque: filing a reading is one append (12 and more after every tick), with nothing to trim.
        self.pending: deque[Reading] = deque(maxlen=length)

    def encode(self, count: int) -> bytes:
        if self.pending:
            self.encoded.extend(f"[{float(r.timestamp)!r},{float(r.value or 0.0)!r}]" for r in self.pending)
            self.pending.clear()
        recent = list(islice(reversed(self.encoded), max(0, count)))
        recent.reverse()
        return ("[" + ",".join(recent) + "]").encode()


class PluginHost:
    """What the host functions do for one plugin: its name, the sensors granted to it, its log
    budget and its per-call budgets. Lives as long as the plugin's compiled module."""

    def __init__(self, plugin: str, sensors: frozenset[str] | None, history: History,
                 settings: HostFunctionSettings, clock: Callable[[], float] = time.monotonic):
        """`clock`: the loop's monotonic time, so a plugin's log budget is the same in a simulated day."""
        self.plugin = plugin
        self.sensors = sensors
        self.history = history
        self.settings = settings
        self.tick: int | None = None
        self.cancel: Callable[[], Any] = lambda: None  # set by the plugin to cancel its current call
        self.over_budget = False
        self.stalled = False  # the call ran past its backstop, seen at a host call (see `spend`)
        self._deadline = math.inf
        self._calls_left = self._reads_left = 0
        self.budget = logs.LineBudget(log, "plugin_log_suppressed", settings.log_lines_per_s, settings.log_burst,
                                      clock=clock, plugin=plugin)
        self._clock = clock
        self._warned: dict[str, float] = {}

    def start_call(self, tick: int | None, backstop_s: float = math.inf) -> None:
        """A call begins; `backstop_s`: how long it may run on the loop's clock, when that clock is virtual."""
        self.tick = tick
        self.over_budget = self.stalled = False
        # No clock read without a backstop (a real clock's calls, every tick): libextism's own timer stops those.
        self._deadline = math.inf if backstop_s == math.inf else self._clock() + backstop_s
        self._calls_left = self.settings.host_calls_per_call
        self._reads_left = self.settings.history_reads_per_call

    def spend(self) -> bool:
        """One host call, or nothing more done for this call: past its backstop on a virtual clock (a host
        call held up in virtual time, which libextism's wall-clock timer cannot see), the call has stalled;
        past its budget of host calls, it is cancelled (once). Either verdict is ours, whatever the call
        does next (see `sandbox`). A stall is not cancelled: libextism's cancel lands late on a loaded
        machine, on the next call of the same compiled module, and the call ends by its fuel."""
        if self.stalled or self._clock() > self._deadline:
            self.stalled = True
            return False
        self._calls_left -= 1
        if self._calls_left >= 0:
            return True
        if not self.over_budget:
            self.over_budget = True
            self.cancel()
        return False

    def log_line(self, level: int, data: bytes) -> None:
        name = LEVELS[level] if 0 <= level < len(LEVELS) else "info"
        if not logs.enabled(name, plugin_line=True):
            return  # before any parsing: a debug line costs nothing when debug is off
        if not data:
            self.warn("log_without_message")
            return
        if not self.budget.admit(self.tick):
            return
        message, fields = parse_message(data)
        getattr(log, name)(logs.PLUGIN_LINE, plugin=self.plugin, tick=self.tick, message=message,
                           **({"fields": fields} if fields else {}))

    def read_history(self, sensor_id: bytes, count: int) -> bytes | None:
        sensor = sensor_id.decode(errors="replace")
        if self.sensors is not None and sensor not in self.sensors:
            self.warn("history_not_granted", sensor=logs.printable(sensor))
            return None
        if self._reads_left <= 0:
            self.warn("history_reads_used", limit=self.settings.history_reads_per_call)
            return None
        self._reads_left -= 1
        found = self.history.encode(sensor, min(count, self.history.length))
        if found is None:
            self.warn("history_unknown_sensor", sensor=logs.printable(sensor))
        return found

    def warn(self, why: str, **fields: Any) -> None:
        """A guest's misuse of a host function, logged at most once a minute per kind."""
        now = self._clock()
        if now - self._warned.get(why, -math.inf) < 60:
            return
        self._warned[why] = now
        log.warning("plugin_host_call_refused", plugin=self.plugin, tick=self.tick, why=why, **fields)


def parse_message(data: bytes) -> tuple[str, dict[str, Any]]:
    """A guest's log message: plain text, or a JSON object with "message" and scalar fields."""
    text = data.decode(errors="replace")
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):
            obj = None
        if isinstance(obj, dict):
            fields = {logs.printable(str(k), 64): _scalar(v) for k, v in islice(obj.items(), MAX_FIELDS + 1)
                      if k != "message"}
            return logs.printable(str(obj.get("message", "")), MAX_TEXT), dict(islice(fields.items(), MAX_FIELDS))
    return logs.printable(text, MAX_TEXT), {}


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, bool) or (isinstance(value, int) and abs(value) < 2**53):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return logs.printable(value if isinstance(value, str) else json.dumps(value)[:MAX_TEXT], MAX_TEXT)


# --- the functions themselves, as libextism calls them ------------------------------------------


def _failed(function: str, user_data: Any, exc: BaseException) -> None:
    try:
        plugin = host_of(user_data).plugin
    except Exception:
        plugin = None
    log.error("host_function_failed", function=function, plugin=plugin, error=f"{type(exc).__name__}: {exc}"[:300])


@host_function
def _pi_log(current: Any, inputs: Any, n_inputs: int, outputs: Any, n_outputs: int, user_data: Any) -> None:
    try:
        host: PluginHost = host_of(user_data)
        if host.spend():
            host.log_line(inputs[0].v.i64, read_block(current, inputs[1].v.i64, MAX_MESSAGE_BYTES))
    except Exception as exc:
        _failed("pi_log", user_data, exc)


@host_function
def _pi_history(current: Any, inputs: Any, n_inputs: int, outputs: Any, n_outputs: int, user_data: Any) -> None:
    outputs[0].v.i64 = 0
    try:
        host: PluginHost = host_of(user_data)
        if host.spend():
            data = host.read_history(read_block(current, inputs[0].v.i64, MAX_ID_BYTES + 1), inputs[1].v.i64)
            if data is not None:
                outputs[0].v.i64 = write_block(current, data)
    except Exception as exc:
        _failed("pi_history", user_data, exc)


FUNCTIONS: tuple[HostFunction, ...] = (
    (b"pi_log", _pi_log, [I64, I64], []), (b"pi_history", _pi_history, [I64, I64], [I64]))
