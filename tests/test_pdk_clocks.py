"""The C and AssemblyScript helpers read the context's `monotonic` and `timestamp` (the Zig helper's are
motion_light's, in test_daemon.py), where other keys of the same names could mislead a search: a reading's
timestamp, an actuator named "monotonic", the plugin's own config; and from a daemon without `monotonic`."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pi_controller import contract
from pi_controller.config import PluginSettings
from pi_controller.contract import Reading
from tests.conftest import only

STATES = contract.encode_states({"monotonic": {"type": "relay", "on": False, "value": 0},
                                 "timestamp": {"type": "pwm", "on": False, "value": 0.0, "duty_cycle": 0.0}})
READINGS = [Reading("monotonic", 5.0, "celsius", 99.5), Reading("timestamp", None, "lux", 99.5, "no echo")]
CONFIG = {"timestamp": 7, "monotonic": 8, "tick": 9}


def times(plugin_set: Any, name: str, context: bytes) -> dict[str, float]:
    plugin = only(plugin_set(name, settings={name: PluginSettings(config=CONFIG)}))
    return {c["device_id"]: c["parameters"]["duty_cycle"] for c in json.loads(plugin.call(context))}


@pytest.mark.parametrize("name", ["clocks", "clocks_as"])
def test_the_helpers_read_the_context_s_own_times(plugin_set, name) -> None:
    context = contract.encode_context(READINGS, STATES, 1800000123.25, 42, monotonic=4210.5).encoded
    assert times(plugin_set, name, context) == {"monotonic": 4210.5, "timestamp": 1800000123.25}


@pytest.mark.parametrize("name", ["clocks", "clocks_as"])
def test_a_context_without_monotonic_has_no_timer_clock(plugin_set, name) -> None:
    """What a daemon from before the field sends: the helpers find no monotonic, not the config's."""
    old = contract.encode_context(READINGS, STATES, 1800000123.25, 42, monotonic=1.0).encoded.replace(
        b',"monotonic":1.0', b"")
    assert times(plugin_set, name, old) == {"timestamp": 1800000123.25}
