"""A plugin's config, typed: what each value may be, checked before the plugin ever sees it.

A plugin's manifest may declare `config_schema`, one `ConfigField` per key. Values from the daemon's
config are checked when the plugin is loaded (a bad one refuses the load, so a reload keeps the running
version with its old values); values an operator sets at run time (MQTT) are checked as they arrive and
refused with a reason, the old value kept. Without a schema an operator may only change keys that exist,
to a value of the same JSON type. Either way a value is at most `MAX_VALUE_BYTES` of JSON and a whole
config at most `MAX_CONFIG_BYTES`: it is handed to the plugin on every tick.

A bad value is refused rather than clamped: a thermostat told "hot" or 80 C must not heat on a guess.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from pi_controller.contract import Rejected
from pi_controller.schema import FieldError, bounded, matching

MAX_VALUE_BYTES = 4096
MAX_CONFIG_BYTES = 64 * 1024

ValueType = Literal["number", "integer", "string", "boolean"]


@dataclass(frozen=True)
class ConfigField:
    """One config key of a plugin: its type and what values it may take."""

    type: ValueType
    min: float | None = None  # numbers: inclusive bounds
    max: float | None = None
    allowed: tuple[Any, ...] | None = None  # the only values accepted, when given
    max_length: int = bounded(0, MAX_VALUE_BYTES, default=256)  # strings, in characters
    description: str = ""
    # How Home Assistant shows a number (its `number` entity): the unit, and the step of its input box.
    unit: str = matching(r"[^\x00-\x1f]{0,16}", "up to 16 printable characters", default="")
    step: float | None = bounded(0.001, 1e6, default=None)

    def __post_init__(self) -> None:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}")
        for value in self.allowed or ():
            try:
                self.check("allowed", value)
            except Rejected as exc:
                raise ValueError(str(exc)) from None

    def check(self, key: str, value: Any) -> None:
        """Raise Rejected saying why `value` is not valid for this field (named `key`)."""
        if not _is_type(value, self.type):
            raise Rejected("wrong_type", f"config '{key}': expected {_TYPE_NAMES[self.type]}, "
                                         f"got {_json_type(value)} {_show(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise Rejected("not_finite", f"config '{key}': expected a finite number, got {value!r}")
        if self.type in ("number", "integer"):
            if self.min is not None and value < self.min:
                raise Rejected("out_of_range", f"config '{key}': {value:g} is below the minimum {self.min:g}")
            if self.max is not None and value > self.max:
                raise Rejected("out_of_range", f"config '{key}': {value:g} is above the maximum {self.max:g}")
        if isinstance(value, str) and len(value) > self.max_length:
            raise Rejected("too_large", f"config '{key}': a string of {len(value)} characters is longer than "
                                        f"max_length {self.max_length}")
        if self.allowed is not None and value not in self.allowed:
            raise Rejected("not_allowed", f"config '{key}': {_show(value)} is not one of "
                                          f"{', '.join(map(_show, self.allowed))}")


Schema = Mapping[str, ConfigField]


def check_config(config: Mapping[str, Any], schema: Schema | None) -> None:
    """A whole config (a manifest's defaults, the daemon's settings): each key against the schema,
    when there is one, and the sizes. Raises Rejected naming the key."""
    for key, value in config.items():
        _check_value(key, value, schema)
    _check_total(config)


def check_settings(config: Mapping[str, Any], schema: Schema | None) -> None:
    """`check_config` for a settings class (a manifest, the daemon's plugin settings): raises FieldError
    at the key at fault, so that the loader names its line."""
    for key, value in config.items():
        try:
            _check_value(key, value, schema)
        except Rejected as exc:
            raise FieldError(("config", key), str(exc)) from None
    try:
        _check_total(config)
    except Rejected as exc:
        raise FieldError(("config",), str(exc)) from None


def check_change(key: str, value: Any, schema: Schema | None, current: Mapping[str, Any]) -> None:
    """A value set at run time, to be merged into `current` (the config the plugin runs with).
    Raises Rejected naming the key and why; nothing is changed by this."""
    if schema is not None:
        _check_against(key, value, schema)
    elif key not in current:
        raise Rejected("unknown_key", f"'{key[:64]}' is not a config key of this plugin "
                                      f"(without a config_schema only existing keys may be set: "
                                      f"{', '.join(sorted(current))[:200] or 'none'})")
    elif _json_type(value) != _json_type(current[key]):
        raise Rejected("wrong_type", f"config '{key}' is {_json_type(current[key])}; "
                                     f"got {_json_type(value)} {_show(value)}")
    _check_size(key, value)
    _check_total({**current, key: value})


def _check_value(key: str, value: Any, schema: Schema | None) -> None:
    if schema is not None:
        _check_against(key, value, schema)
    _check_size(key, value)


def _check_against(key: str, value: Any, schema: Schema) -> None:
    field = schema.get(key)
    if field is None:
        close = difflib.get_close_matches(key[:64], sorted(schema), n=1)
        raise Rejected("unknown_key", f"'{key[:64]}' is not in this plugin's config_schema "
                                      f"({', '.join(sorted(schema))[:200] or 'none'})"
                                      + (f"; did you mean '{close[0]}'?" if close else ""))
    field.check(key, value)


def _check_size(key: str, value: Any) -> None:
    try:
        size = len(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise Rejected("wrong_type", f"config '{key[:64]}' is not a plain JSON value: {exc}") from None
    if size > MAX_VALUE_BYTES:
        raise Rejected("too_large", f"config '{key[:64]}' is {size} bytes of JSON, over {MAX_VALUE_BYTES}")


def _check_total(config: Mapping[str, Any]) -> None:
    size = len(json.dumps(config))
    if size > MAX_CONFIG_BYTES:
        raise Rejected("too_large", f"the whole config would be {size} bytes of JSON, over {MAX_CONFIG_BYTES}")


_TYPE_NAMES = {"number": "a number", "integer": "an integer", "string": "a string", "boolean": "true or false"}


def _is_type(value: Any, kind: str) -> bool:
    if kind == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "integer":
        return isinstance(value, int)
    if kind == "number":
        return isinstance(value, (int, float))
    return isinstance(value, str)


def _json_type(value: Any) -> str:
    """The JSON type of a value: what a plugin's parser sees."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, (list, tuple)) else "an object"


def _show(value: Any) -> str:
    """A value for a message: short, whatever was sent."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
