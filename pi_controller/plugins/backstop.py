"""The wall-clock backstop of a plugin call: fuel is the budget, the backstop only catches a hung call.

Fuel counts instructions: a plugin's verdict rests on it, the same on a Pi Zero as on a desktop and
under any load. libextism's `timeout_ms` is wall-clock time, so a limit tuned on one machine misfires
on a slower or busier one and blames an innocent plugin, and a call it cuts off loses the plugin's
state (the instance is rebuilt: see `sandbox`). The backstop is therefore only a guard against a call
that hangs (a host function, an HTTP request a plugin was granted), sized so that the machine's own
slowness never reaches it: `MARGIN` times what the plugin's fuel costs on this machine (at start a tiny
module burns a known amount of fuel a few times; the fastest run gives the cost of one unit, since load
only slows a run down) plus `HOST_ALLOWANCE_MS`, and never less than the operator's `timeout_ms`. A
plugin that computes too much runs out of fuel long before that; a call that reaches the backstop was
held up by the host or the machine, and the loop counts it as a stall, not as the plugin's error.

`HOST_ALLOWANCE_MS` is what a saturated machine holds a call up by, with a margin: with both cores kept
busy by four spinning processes (and other work: load averages of 10 to 15), the bundled plugins' calls
took up to 260 and 300 ms in two runs of 10,000 ticks (`benchmarks/stalls.py`; 256 and 464 of 30,000 calls
passed the 13 ms the backstop used to be, each one a state reset; none stalled at 510 ms). 500 ms is half
the default watchdog timeout: a hung call still ends before the watchdog would drive everything safe.

On a virtual clock (`simulate`, tests) no wall-clock time may decide anything that reaches a result:
the backstop is `VIRTUAL_BACKSTOP_MS`, there against a host function that hangs, nothing else.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import time

import extism

from pi_controller.plugins.extism_adapter import compile_module

MARGIN = 4.0
HOST_ALLOWANCE_MS = 500.0
VIRTUAL_BACKSTOP_MS = 10_000

CALIBRATION_FUEL = 1_000_000
CALIBRATION_RUNS = 5
# (module (func (export "run") (result i32) (loop (br 0)) (i32.const 0))): it spins until its fuel is
# gone. A tight branch costs more per unit of fuel than real code (measured here: 0.9 ns against 0.1 to
# 0.2 ns for a Zig plugin's arithmetic), so the estimate errs on the generous side.
_SPINNER = bytes([0x00, 0x61, 0x73, 0x6D, 0x01, 0x00, 0x00, 0x00,
                  0x01, 0x05, 0x01, 0x60, 0x00, 0x01, 0x7F,  # type: [] -> [i32]
                  0x03, 0x02, 0x01, 0x00,  # one function of that type
                  0x07, 0x07, 0x01, 0x03, 0x72, 0x75, 0x6E, 0x00, 0x00,  # export "run"
                  0x0A, 0x0B, 0x01, 0x09, 0x00, 0x03, 0x40, 0x0C, 0x00, 0x0B, 0x41, 0x00, 0x0B])


@functools.cache
def ns_per_fuel() -> float:
    """What one unit of fuel costs on this machine, in nanoseconds (measured once per process, ~5 ms)."""
    manifest = json.dumps({"wasm": [{"data": base64.b64encode(_SPINNER).decode()}], "timeout_ms": 10_000}).encode()
    module = compile_module(manifest, False, CALIBRATION_FUEL, None)
    with module.instantiate() as spinner:
        fastest = math.inf
        for _ in range(CALIBRATION_RUNS):
            started = time.perf_counter()
            try:
                spinner.call("run", b"")
            except extism.Error:  # out of fuel: what it is for
                pass
            fastest = min(fastest, time.perf_counter() - started)
    return fastest * 1e9 / CALIBRATION_FUEL


class Backstop:
    """The wall-clock limit of each plugin call, real or virtual."""

    def __init__(self, real: bool = True):
        self.real = real

    def ms(self, fuel: int, timeout_ms: int) -> int:
        """Whole milliseconds, as libextism counts them."""
        if not self.real:
            return VIRTUAL_BACKSTOP_MS
        return max(timeout_ms, math.ceil(fuel * ns_per_fuel() * MARGIN / 1e6 + HOST_ALLOWANCE_MS))
