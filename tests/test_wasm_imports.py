"""The import section read at load time: what each committed plugin imports, and every malformed section
answered with "unknown" (None), which the tick takes for a plugin that may log to libextism."""

from __future__ import annotations

from pathlib import Path

import pytest

from pi_controller.plugins.extism_adapter import calls_host, may_log
from pi_controller.plugins.wasm_imports import imported_functions
from tests import wasm_modules
from tests.wasm_modules import HEADER, leb, section

TEST_PLUGINS = Path(__file__).resolve().parent / "plugins"
ENV, USER = "extism:host/env", "extism:host/user"


def module(*sections: tuple[int, bytes]) -> bytes:
    return HEADER + b"".join(section(kind, body) for kind, body in sections)


def name(text: str) -> bytes:
    return wasm_modules.name(text.encode())


def imports(*entries: bytes) -> tuple[int, bytes]:
    return 2, leb(len(entries)) + b"".join(entries)


def test_the_committed_plugins_imports_as_their_sources_declare_them() -> None:
    def read(plugin: str) -> frozenset[tuple[str, str]] | None:
        return imported_functions((TEST_PLUGINS / f"{plugin}.wasm").read_bytes())

    assert read("log_flood") == {(ENV, "alloc"), (ENV, "log_error"), (ENV, "store_u64")}
    assert (USER, "pi_log") in (read("host_calls") or ()) and (ENV, "http_request") in (read("http_fetch") or ())
    assert read("wasi_import") == {("wasi_snapshot_preview1", "fd_write")}
    assert read("trap") == frozenset()  # imports nothing
    assert [may_log(read(p)) for p in ("log_flood", "extism_logger", "alternating", "host_calls")] == [
        True, True, False, False]
    assert [calls_host(read(p)) for p in ("host_calls", "alternating", "log_flood")] == [True, False, False]


def test_imports_of_every_kind_are_read_past_and_only_functions_named() -> None:
    wasm = module((0, name("custom") + b"any bytes"), (1, b"\x00"), imports(
        name("env") + name("table") + b"\x01\x70\x01\x00\x10",  # a table of funcrefs, limits 0..16
        name("env") + name("memory") + b"\x02\x04\x01",  # a 64-bit memory, at least 1 page
        name("env") + name("global") + b"\x03\x7f\x00",  # an immutable i32
        name("env") + name("tag") + b"\x04\x00\x00",
        name(ENV) + name("log_warn") + b"\x00\x02"))
    assert imported_functions(wasm) == {(ENV, "log_warn")}
    assert imported_functions(module((1, b"\x00"), (3, b"\x00"))) == frozenset()  # no import section
    assert imported_functions(HEADER) == frozenset()


@pytest.mark.parametrize("wasm", [
    HEADER + b"\x02\x7f",  # a section longer than the module
    module(imports(name(ENV) + name("log_warn") + b"\x09\x00")),  # an import kind that does not exist
    module(imports(name(ENV) + name("log_warn"))),  # an entry cut short
    module((2, b"\x05" + name(ENV))),  # more entries than the section holds
    module(imports(name("env") + name("global") + b"\x03\x64\x70\x00")),  # a typed reference (GC proposal)
    module(imports(b"\xff\xff\xff\xff\xff\xff" + name("x") + b"\x00\x00")),  # a length past 32 bits
    module(imports(name(ENV) + b"\x7f" + b"log_warn" + b"\x00\x00")),  # a name longer than its section
    module(imports(*[name("a") + name("b") + b"\x00\x00"] * 100_001)),  # more imports than wasmtime takes
])
def test_a_section_this_reader_cannot_read_is_unknown_and_taken_for_the_worst(wasm: bytes) -> None:
    assert imported_functions(wasm) is None and may_log(None) and calls_host(None)
