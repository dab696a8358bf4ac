"""The plugin ABI in one place: the context a plugin gets and the commands it may return.

Input (one JSON object): `sensor_readings` (a list of `{sensor_id, value, unit, timestamp, valid}`,
plus `error` when a reading is invalid and `value` is null), `device_states` (by actuator id),
`timestamp` (Unix seconds: the wall clock, which NTP may step), `monotonic` (seconds on a clock that never
jumps: for timers), `tick` and `config` (the plugin's own config map).
Output: a JSON array of `{device_id, action, parameters}`.

The context is encoded once per tick (`Context`); each plugin's config is encoded once at load time and
spliced in, and a plugin granted some sensors gets the parts of their readings spliced, so a tick costs
one `json.dumps` whatever the number of plugins.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Container, Mapping, Protocol, Sequence

import msgspec

COMPACT = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # what plugins and recordings get
_DECODER = msgspec.json.Decoder()  # untyped: plain dicts, lists, str, int, float, bool, None, as json gives


# The tick's records are msgspec Structs: made in C, with no Python frame for an __init__ (a dataclass's
# costs 5 to 7 times as much, and a tick makes dozens). gc=False where every field is a string or a number:
# nothing can make a cycle through them, so the collector need not track them.
class Reading(msgspec.Struct, gc=False):
    """One sensor's value at one time, as the context carries it to plugins: a number in the sensor's
    unit, or None with the error that made the read invalid."""

    sensor_id: str
    value: float | None
    unit: str
    timestamp: float
    error: str | None = None

    @property
    def valid(self) -> bool:
        return self.error is None

    def as_json(self, decimals: int | None = None) -> dict[str, Any]:
        """As JSON; `decimals`: the value rounded to that many (for the wire, not for plugins)."""
        value = self.value if decimals is None or self.value is None else round(self.value, decimals)
        data: dict[str, Any] = {"sensor_id": self.sensor_id, "value": value, "unit": self.unit,
                                "timestamp": self.timestamp, "valid": self.error is None}
        if self.error is not None:
            data["error"] = self.error
        return data


class Rejected(Exception):
    """A command that is not applied: `rule` names the kind of fault (what problems are keyed by, so a
    plugin cannot flood the log with ever-new values), the message gives the detail."""

    def __init__(self, rule: str, message: str):
        super().__init__(message)
        self.rule = rule


class OutputError(Exception):
    """A plugin's whole output is unusable; `kind` is "not_json", "not_a_list" or "too_many_commands"."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class CommandTarget(Protocol):
    def command(self, action: str, parameters: Mapping[str, Any]) -> float | None: ...


class Command(msgspec.Struct, gc=False):
    device_id: str
    action: str
    target: float | None
    plugin: str
    priority: int


class Rejection(msgspec.Struct, frozen=True, gc=False):
    plugin: str
    device_id: str | None  # None unless it names a device that exists
    rule: str
    reason: str


def encode_config(config: Mapping[str, Any]) -> bytes:
    """A plugin's config as the tail of its context; done once, when the plugin is loaded."""
    return b',"config":' + COMPACT.encode(config).encode() + b"}"


READINGS_KEY = b'{"sensor_readings":'  # how every context starts


class Context(msgspec.Struct):  # never changed once made
    """One tick's context, encoded once for all plugins: `encoded` is everything but the config, without
    the closing brace; `parts` are the readings' own JSON, for plugins granted only some sensors."""

    readings: Sequence[Reading]
    parts: tuple[str, ...]
    tail: bytes  # ',"device_states":...,"timestamp":T,"monotonic":M,"tick":N'
    tick: int
    encoded: bytes

    def only(self, sensors: Container[str]) -> bytes:
        """The context with the readings of `sensors` alone, spliced from their parts."""
        mine = ",".join(part for r, part in zip(self.readings, self.parts) if r.sensor_id in sensors)
        return READINGS_KEY + b"[" + mine.encode() + b"]" + self.tail


def encode_context(readings: Sequence[Reading], states: str, timestamp: float, tick: int, *,
                   monotonic: float) -> Context:
    """One tick's context; `states` is the device states' JSON (`encode_states`), which most ticks
    leave unchanged, so that its owner can keep it from tick to tick. `timestamp` is the wall clock (the
    time of day; it steps when NTP sets it), `monotonic` the clock a plugin's timers can trust."""
    # Each reading's JSON. A valid one is written by hand from parts encoded once per sensor: the tick's
    # hottest encode, a third of what json.dumps of a dict costs, and the same bytes. One comprehension,
    # not a function per reading: a Python call for each of them, every tick. A reading the tick took is dated
    # by the tick's own `timestamp` (the same object): its repr, the costliest part (~0.4 us), is written once.
    stamp = repr(float(timestamp))
    parts = tuple([f'{{"sensor_id":{string(r.sensor_id)},"value":{float(r.value)!r},"unit":{string(r.unit)},'
                   f'"timestamp":{stamp if r.timestamp is timestamp else repr(float(r.timestamp))},"valid":true}}'
                   if r.error is None and r.value is not None else COMPACT.encode(r.as_json()) for r in readings])
    tail = (f',"device_states":{states},"timestamp":{_scalar(timestamp)},"monotonic":{_scalar(monotonic)},'
            f'"tick":{tick:d}').encode()
    return Context(readings, parts, tail, tick, READINGS_KEY + ("[" + ",".join(parts) + "]").encode() + tail)


def _scalar(value: Any) -> str:
    """As COMPACT writes it: a float's repr for a finite float, an int's str (the usual cases, 1 us cheaper)."""
    if type(value) is int or (type(value) is float and math.isfinite(value)):
        return repr(value)
    return COMPACT.encode(value)


def encode_states(device_states: Mapping[str, Any]) -> str:
    return COMPACT.encode(device_states)


@functools.lru_cache(maxsize=1024)
def string(text: str) -> str:
    """A string as COMPACT writes it (ids and units, encoded once)."""
    return COMPACT.encode(text)


def number(parameters: Mapping[str, Any], name: str, low: float, high: float) -> float:
    """A finite numeric parameter within [low, high], or Rejected saying which rule it broke."""
    if name not in parameters:
        raise Rejected("missing_parameter", f"missing parameter '{name}'")
    value = parameters[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Rejected("not_a_number", f"parameter '{name}' must be a number, got {type(value).__name__} "
                                       f"{repr(value)[:40]}")
    try:
        value = float(value)  # JSON integers have no size limit; one too large for a float is no number
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise Rejected("not_finite", f"parameter '{name}' must be finite, got {value}")
    if not low <= value <= high:
        raise Rejected("out_of_range", f"parameter '{name}' = {value:g} is out of range {low:g}..{high:g}")
    return value


class _Entry(msgspec.Struct):
    """A command with the contract's types: what nearly every output holds, typed by msgspec's decoder in C."""

    device_id: str
    action: str
    parameters: dict[str, Any] = {}  # a fresh one for each entry (msgspec copies an empty default)


_ENTRIES = msgspec.json.Decoder(list[_Entry])


def parse_output(raw: bytes, plugin: str, priority: int, targets: Mapping[str, CommandTarget]
                 ) -> tuple[list[Command], list[Rejection]]:
    """Validate a plugin's output against the contract and the actuators it names. An output whose commands
    all have the contract's types (nearly all) is typed by msgspec as it decodes; any other is decoded as
    json.loads would and checked by hand, command by command (`_entry`), for the same verdicts. This runs
    for every command of every plugin, every tick."""
    try:
        entries: list[Any] = _ENTRIES.decode(raw)
        typed = True
    except (msgspec.DecodeError, RecursionError):
        entries, typed = _array(raw), False
    # The limit asked for only past the commands any output may hold, which nearly no output is.
    if len(entries) > ANY_OUTPUT_MAY_HOLD and len(entries) > (limit := max_commands(len(targets))):
        raise OutputError("too_many_commands", f"output has {len(entries)} commands; at most {limit} for "
                                               f"{len(targets)} actuators")
    commands: list[Command] = []
    rejections: list[Rejection] = []
    for index, entry in enumerate(entries):
        try:
            checked = entry if typed else _entry(index, entry, targets)
            if checked.device_id not in targets:  # for a typed entry: `_entry` has checked the others already
                raise _unknown(checked.device_id)
            command = targets[checked.device_id].command(checked.action, checked.parameters)
            commands.append(Command(checked.device_id, checked.action, command, plugin, priority))
        except Rejected as exc:
            rejections.append(Rejection(plugin, _named(entry, targets), exc.rule, str(exc)))
    return commands, rejections


def _array(raw: bytes) -> list[Any]:
    """An output msgspec could not type, decoded: a JSON array, or OutputError saying why not."""
    try:
        entries = decode(raw)
    except (ValueError, RecursionError) as exc:
        raise OutputError("not_json", f"output is not JSON: {str(exc)[:120]}") from exc
    if not isinstance(entries, list):
        raise OutputError("not_a_list", f"output must be a JSON array of commands, got a {type(entries).__name__}")
    return entries


def _entry(index: int, entry: Any, targets: Mapping[str, CommandTarget]) -> _Entry:
    """An entry of an output msgspec could not type, checked in the contract's order; Rejected if malformed."""
    if not isinstance(entry, dict):
        raise Rejected("malformed", f"command #{index} must be an object, got {type(entry).__name__}")
    device, action = entry.get("device_id"), entry.get("action")
    parameters = entry.get("parameters", {})
    if not isinstance(device, str):
        raise Rejected("malformed", f"command #{index} has no string 'device_id'")
    if device not in targets:
        raise _unknown(device)
    if not isinstance(action, str):
        raise Rejected("malformed", f"command #{index} has no string 'action'")
    if not isinstance(parameters, dict):
        raise Rejected("malformed", f"'parameters' must be an object, got {type(parameters).__name__}")
    return _Entry(device, action, parameters)


def _named(entry: Any, targets: Mapping[str, CommandTarget]) -> str | None:
    """The device a rejected entry names, if it exists."""
    if isinstance(entry, _Entry):
        return entry.device_id if entry.device_id in targets else None
    device = entry.get("device_id") if isinstance(entry, dict) else None
    return device if isinstance(device, str) and device in targets else None


def _unknown(device: str) -> Rejected:
    return Rejected("unknown_device", f"unknown device '{device[:64]}'")


def decode(raw: bytes) -> Any:
    """`json.loads(raw)`, the same values, through msgspec's decoder where it takes the text: 2 us against
    json's 12 for a plugin's two commands here. What msgspec refuses and json takes (NaN, a number past a
    float's range, a lone surrogate, a byte-order mark, UTF-16) or refuses too (nesting too deep for either)
    goes to json.loads, so every output decodes, or fails with the message, as it did before."""
    try:
        return _DECODER.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return json.loads(raw)


ANY_OUTPUT_MAY_HOLD = 16  # commands, however few the actuators


def max_commands(actuators: int) -> int:
    """A few commands per actuator are plenty; more is a runaway plugin, refused before any work."""
    return 4 * actuators + ANY_OUTPUT_MAY_HOLD
