"""What a plugin may be called, in one place: the daemon's folder, `plugin new` and the names of our own
commands (operator overrides, the safety layer's) all follow it."""

from __future__ import annotations

import re

from pi_controller.schema import ID_PATTERN

OPERATOR = "operator"  # the "plugin" of operator commands in logs, stats and ownership
SAFETY = "safety"  # the "plugin" of the commands the safety layer makes itself
RESERVED = (OPERATOR, SAFETY)
PLUGIN_NAME_RULE = f"1 to 64 letters, digits, '_' or '-', and not '{OPERATOR}' or '{SAFETY}'"


def valid_plugin_name(name: str) -> bool:
    """Whether `name` can go into log keys and MQTT topics as it is, and is no name of ours."""
    return re.fullmatch(ID_PATTERN, name) is not None and name not in RESERVED
