"""Every use of Extism beyond its public API, in one place: compiling with fuel, compiled modules and
their instances, handles and memory for host functions.

The SDK's constructor has no fuel limit, so modules are compiled with
`extism_compiled_plugin_new_with_fuel_limit` from the cffi library the SDK loads, with our host
functions. A compiled module holds megabytes: it is freed when its plugin goes (`Module.free`), not when
the garbage collector gets to it. Host functions get their plugin's host object through a cffi handle
and read and write the guest's memory through `read_block` and `write_block`.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any, Callable, Collection, Sequence

import extism
from extism.extism import CompiledPlugin, _ffi, _lib  # fuel and host memory are only in libextism's C API

from pi_controller.plugins.wasm_cache import compile_with_fallback

NAMESPACE = b"extism:host/user"  # where plugins import our host functions from
_USER = NAMESPACE.decode()  # as `wasm_imports` names an import's module
KERNEL = "extism:host/env"  # libextism's own functions: memory, input and output, vars, config, HTTP, its log
I64 = 1  # ExtismValType
_SIGNATURE = "void(ExtismCurrentPlugin*, const ExtismVal*, ExtismSize, ExtismVal*, ExtismSize, void*)"
HostCallback = Callable[[Any, Any, int, Any, int, Any], None]
HostFunction = tuple[bytes, Any, list[int], list[int]]  # name, callback (`host_function`), params, results


class Module:
    """A compiled module: instances are made from it until it is freed."""

    def __init__(self, compiled: CompiledPlugin):
        self._compiled = compiled

    def instantiate(self) -> extism.Plugin:
        return extism.Plugin(self._compiled)

    def free(self) -> None:
        """Now rather than at garbage collection (the SDK's own free, which runs once)."""
        self._compiled.__del__()


def call(instance: extism.Plugin, function: bytes, data: bytes) -> bytes:
    """`instance.call(function, data)` without what the SDK adds to every call and we never use (a cffi
    handle for a host context, the name's encode, a parse callback): 2.5 us of its 23 here, on the tick's
    path once per plugin. Errors are the SDK's: its own check raises them."""
    rc = _lib.extism_plugin_call(instance.plugin, function, data, len(data))
    if rc != 0 or _lib.extism_plugin_error(instance.plugin) != _ffi.NULL:
        instance._check_error(rc)
    return bytes(_ffi.buffer(_lib.extism_plugin_output_data(instance.plugin),
                             _lib.extism_plugin_output_length(instance.plugin)))


def compile_module(manifest: bytes, wasi: bool, fuel: int, host: Any,
                   functions: Sequence[HostFunction] = ()) -> Module:
    """The compiled module of `manifest` (libextism's JSON, module inline), with a fuel limit and
    `functions` bound to `host` (a `handle` of its PluginHost, or None where no plugin calls them: the
    trial child, the fuel calibration); without wasmtime's cache when that cannot be written (see
    `wasm_cache`)."""
    _quiet_rust_backtraces()
    return Module(compile_with_fallback(lambda: _compile(manifest, wasi, fuel, host, functions)))


@cache
def _quiet_rust_backtraces() -> None:
    """wasmtime captures (and symbolizes) a Rust backtrace for every error when RUST_BACKTRACE is set, as
    it is in many developer shells: ~75 ms per failed call here, enough for one hostile plugin to overrun
    ticks. RUST_LIB_BACKTRACE=0 turns that off for library errors only (panics still show theirs); Rust
    reads it at the first error, so setting it before the first compile is in time."""
    os.environ["RUST_LIB_BACKTRACE"] = "0"


def _compile(manifest: bytes, wasi: bool, fuel: int, host: Any, functions: Sequence[HostFunction]) -> CompiledPlugin:
    """One try: host functions are bound to one compile, even a failed one, so each try makes its own."""
    error = _ffi.new("char**")
    pointers = [_function(definition, _ffi.NULL if host is None else host) for definition in functions]
    try:
        pointer = _lib.extism_compiled_plugin_new_with_fuel_limit(manifest, len(manifest), pointers,
                                                                  len(pointers), wasi, fuel, error)
    finally:
        for function in pointers:  # the compiled plugin has taken what it needs
            _lib.extism_function_free(function)
    if pointer == _ffi.NULL:
        message = _ffi.string(error[0]).decode(errors="replace")
        _lib.extism_plugin_new_error_free(error[0])
        raise extism.Error(message)
    compiled = CompiledPlugin.__new__(CompiledPlugin)  # owns `pointer` now: its __del__ frees it
    compiled.pointer, compiled.functions = pointer, []
    return compiled


def _function(definition: HostFunction, handle: Any) -> Any:
    """A fresh ExtismFunction (libextism takes each into one compiled plugin only)."""
    name, callback, params, results = definition
    pointer = _lib.extism_function_new(name, params, len(params), results or _ffi.NULL, len(results), callback,
                                       handle, _ffi.NULL)
    _lib.extism_function_set_namespace(pointer, NAMESPACE)
    return pointer


def may_log(imported: Collection[tuple[str, str]] | None) -> bool:
    """Whether a module importing these functions (None: not known) can write to libextism's log during a
    call that succeeds: only through libextism's log functions (its other lines are of failed calls)."""
    return imported is None or any(module == KERNEL and name.startswith("log_") for module, name in imported)


def calls_host(imported: Collection[tuple[str, str]] | None) -> bool:
    """Whether a module importing these functions (None: not known) can call our host functions (`NAMESPACE`)."""
    return imported is None or any(module == _USER for module, _ in imported)


@cache
def runtime_version() -> str:
    """libextism's version: what compiles a module, part of what a trial's verdict rests on."""
    return extism.extism_version()


# --- what host functions need ------------------------------------------------------------------


def host_function(callback: HostCallback) -> Any:
    """`callback` as libextism calls a host function (keep the result alive: it is the C entry point)."""
    return _ffi.callback(_SIGNATURE)(callback)


def handle(host: object) -> Any:
    """What a host function gets as its user data; `host` lives as long as the handle is referenced."""
    return _ffi.new_handle(host)


def host_of(user_data: Any) -> Any:
    """The object behind a `handle`."""
    return _ffi.from_handle(user_data)


def read_block(current: Any, offset: int, limit: int) -> bytes:
    """At most `limit` bytes of the guest's block at `offset`; empty for anything that is not one."""
    if offset <= 0:
        return b""
    length = _lib.extism_current_plugin_memory_length(current, offset)
    if length <= 0:
        return b""
    return bytes(_ffi.buffer(_lib.extism_current_plugin_memory(current) + offset, min(length, limit)))


def write_block(current: Any, data: bytes) -> int:
    """`data` in a new block of the guest's memory (counted against its page limit); 0 if none."""
    offset = _lib.extism_current_plugin_memory_alloc(current, len(data))
    if offset == 0:
        return 0
    # The allocation may have grown (and moved) the memory: the base is read after it.
    _ffi.memmove(_lib.extism_current_plugin_memory(current) + offset, data, len(data))
    return int(offset)
