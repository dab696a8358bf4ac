"""The child of a trial compile: `python -m pi_controller.plugins.trial WASI FUEL`, the manifest JSON on stdin.

`wasm_gate.trial` starts it before a module reaches the daemon's own libextism: it sets its limits, then
compiles and instantiates the module once with the host functions bound as the daemon binds them, so a
module that makes libextism panic or a compile that eats memory ends this short-lived process, not the
daemon. It imports little (no config, no gpiozero): it starts in ~0.1 s. The limits are set after libextism
is loaded (it is mapped from its file, which RLIMIT_DATA does not count) and before it runs.
"""

from __future__ import annotations

import resource
import sys
from typing import Sequence

from pi_controller.plugins.extism_adapter import HostFunction, compile_module
from pi_controller.plugins.host_functions import FUNCTIONS

TRIAL_MEMORY_BYTES = 512 * 1024 * 1024  # the child's data segment (RLIMIT_DATA): a 16 MiB module takes ~130
TRIAL_CPU_S = 20  # seconds of CPU for the child (RLIMIT_CPU)
OUT_OF_MEMORY = 3  # the child's exit status when Python ran out of its memory


def run(wasi: bool, fuel: int, functions: Sequence[HostFunction]) -> int:
    """Limits first, then one compile and one instance. 0 unless it ran out of memory; a panic in libextism
    ends the child with SIGABRT, which is what the parent looks for."""
    resource.setrlimit(resource.RLIMIT_DATA, (TRIAL_MEMORY_BYTES, TRIAL_MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_CPU, (TRIAL_CPU_S, TRIAL_CPU_S + 1))
    manifest = sys.stdin.buffer.read()
    try:
        module = compile_module(manifest, wasi, fuel, None, functions)
        module.instantiate().__exit__(None, None, None)
    except MemoryError:
        return OUT_OF_MEMORY
    except Exception:  # a clean error: the parent's own compile reports it
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(run(bool(int(sys.argv[1])), int(sys.argv[2]), FUNCTIONS))
