"""Compiling a module through libextism's C API, and the child process that tries it first.

The SDK's constructor has no fuel limit, so modules are compiled with
`extism_compiled_plugin_new_with_fuel_limit` from the cffi library the SDK loads, with our host
functions. `python -m pi_controller.plugins.extism_adapter WASI FUEL` (manifest JSON on stdin) is the child of
`wasm_gate.trial`: it sets its own limits before libextism is loaded, then compiles and instantiates
once. It imports little (no config, no gpiozero): it starts in ~0.1 s. The limits are set after
libextism is loaded (it is mapped from its file, which RLIMIT_DATA does not count) and before it runs.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import extism
from extism.extism import CompiledPlugin, _ffi, _lib  # fuel is only in libextism's C API

from pi_controller.plugins.host_functions import free_functions, new_functions
from pi_controller.plugins.wasm_cache import compile_with_fallback

TRIAL_MEMORY_BYTES = 512 * 1024 * 1024  # the child's data segment (RLIMIT_DATA): a 16 MiB module takes ~130
TRIAL_CPU_S = 20  # seconds of CPU for the child (RLIMIT_CPU)
OUT_OF_MEMORY = 3  # the child's exit status when Python ran out of its memory


def compile_module(manifest: bytes, wasi: bool, fuel: int, host: Any) -> CompiledPlugin:
    """The compiled module of `manifest` (libextism's JSON, module inline), with a fuel limit and our
    host functions bound to `host` (a cffi handle of its PluginHost, or None where no plugin calls them:
    the trial child, the fuel calibration); without wasmtime's cache when that cannot be written (see
    `wasm_cache`)."""
    return compile_with_fallback(lambda: _compile(manifest, wasi, fuel, host))


def _compile(manifest: bytes, wasi: bool, fuel: int, host: Any) -> CompiledPlugin:
    """One try: host functions are bound to one compile, even a failed one, so each try makes its own."""
    error = _ffi.new("char**")
    functions = new_functions(_ffi.NULL if host is None else host)
    try:
        pointer = _lib.extism_compiled_plugin_new_with_fuel_limit(manifest, len(manifest), functions,
                                                                  len(functions), wasi, fuel, error)
    finally:
        free_functions(functions)  # the compiled plugin has taken what it needs
    if pointer == _ffi.NULL:
        message = _ffi.string(error[0]).decode(errors="replace")
        _lib.extism_plugin_new_error_free(error[0])
        raise extism.Error(message)
    compiled = CompiledPlugin.__new__(CompiledPlugin)  # owns `pointer` now: its __del__ frees it
    compiled.pointer, compiled.functions = pointer, []
    return compiled


def _trial(wasi: bool, fuel: int) -> int:
    """In the child: limits first, then one compile and one instance. 0 unless it ran out of memory;
    a panic in libextism ends the child with SIGABRT, which is what the parent looks for."""
    resource.setrlimit(resource.RLIMIT_DATA, (TRIAL_MEMORY_BYTES, TRIAL_MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_CPU, (TRIAL_CPU_S, TRIAL_CPU_S + 1))
    manifest = sys.stdin.buffer.read()
    try:
        compiled = compile_module(manifest, wasi, fuel, None)
        extism.Plugin(compiled).__exit__(None, None, None)
    except MemoryError:
        return OUT_OF_MEMORY
    except Exception:  # noqa: BLE001 - a clean error: the daemon's own compile reports it
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(_trial(bool(int(sys.argv[1])), int(sys.argv[2])))
