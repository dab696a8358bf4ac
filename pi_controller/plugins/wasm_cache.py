"""wasmtime's compile cache, and compiling on without it when it cannot be written.

libextism compiles through wasmtime with its disk cache on: under `$XDG_CACHE_HOME/wasmtime`, or where
the file named by `$EXTISM_CACHE_CONFIG` says. A cache directory that cannot be created (an SD card the
kernel remounted read-only after errors, common on Pis; a file in its place) fails every compile with
an OS error, not just the caching. libextism reads `EXTISM_CACHE_CONFIG` at each compile and an empty
value turns the cache off, so a compile that failed with an OS error is tried once more without the
cache. If that succeeds the cache was the cause: it stays off for the life of the process (every load
pays a cold compile, 67-100 ms here) and that is logged once.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Callable, TypeVar

import extism
import structlog

log = structlog.get_logger("pi_controller.wasm_cache")

CONFIG_VARIABLE = "EXTISM_CACHE_CONFIG"
_OS_ERROR = re.compile(r"\(os error \d+\)")  # how a Rust std::io::Error ends; a bad module never says it

T = TypeVar("T")
_lock = threading.Lock()  # one fallback at a time: it changes the process's environment
_fallen_back = False  # the cache was turned off here, after a compile failed because of it


def compile_with_fallback(compile_module: Callable[[], T]) -> T:
    """`compile_module()`; when it fails with an OS error and the cache is on, once more without it."""
    global _fallen_back
    try:
        return compile_module()
    except extism.Error as exc:
        if not _OS_ERROR.search(str(exc)):
            raise
        failure = exc
    with _lock:
        previous = os.environ.get(CONFIG_VARIABLE)
        if previous == "" and not _fallen_back:  # off from the start: the cache is not the cause
            raise failure
        if _fallen_back:  # turned off by another thread's compile meanwhile
            return compile_module()
        os.environ[CONFIG_VARIABLE] = ""
        try:
            result = compile_module()
        except extism.Error:  # not the cache's fault after all: leave it as it was
            _restore(previous)
            raise failure from None
        _fallen_back = True
    log.error("wasm_cache_unusable", cache=str(location(previous)), error=str(failure),
              note="compiling without the cache from now on: each plugin load pays a cold compile; check the "
                   "SD card (remounted read-only?) and the unit's CacheDirectory=")
    return result


def location(config_file: str | None) -> Path:
    """What the cache's trouble is about: the config file that names it, or wasmtime's default folder."""
    if config_file:
        return Path(config_file)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wasmtime"


def _restore(previous: str | None) -> None:
    if previous is None:
        os.environ.pop(CONFIG_VARIABLE, None)
    else:
        os.environ[CONFIG_VARIABLE] = previous
