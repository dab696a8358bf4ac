"""Field helpers for settings dataclasses: validation rules that `config` enforces when loading.

They live apart from `config` so that the modules defining settings (sensors, actuators, simulators)
can use them without importing the loader.
"""

from __future__ import annotations

from dataclasses import MISSING, field, fields
from typing import Any

ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"


class FieldError(ValueError):
    """A settings class's own check failing on one of its keys: `path` (below the class) lets the loader
    point at that key's line rather than the class's."""

    def __init__(self, path: tuple[str | int, ...], message: str):
        super().__init__(message)
        self.path = path


def bounded(low: float, high: float, **kwargs: Any) -> Any:
    """A field whose number must lie in [low, high]."""
    return field(metadata={"low": low, "high": high}, **kwargs)


def matching(pattern: str, meaning: str, **kwargs: Any) -> Any:
    """A field whose string must match `pattern` entirely; `meaning` says what is valid."""
    return field(metadata={"pattern": pattern, "meaning": meaning}, **kwargs)


def bcm_pin(**kwargs: Any) -> Any:
    """A GPIO number in BCM numbering, as printed by `pinout`."""
    return field(metadata={"low": 0, "high": 27, "pin": True}, **kwargs)


def required_pins(cls: type) -> list[str]:
    """The keys of the pins a settings class cannot do without."""
    return [f.name for f in fields(cls) if f.metadata.get("pin") and f.default is MISSING]


def device_id(**kwargs: Any) -> Any:
    """An id that can appear in logs, JSON keys and MQTT topics as it is."""
    return matching(ID_PATTERN, "1 to 64 letters, digits, '_' or '-'", **kwargs)
