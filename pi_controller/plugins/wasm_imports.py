"""The functions a module imports, read from its binary's import section at load time.

What a module can ask of its host is fixed by its imports: one that imports none of libextism's own log
functions can put nothing in libextism's log but the lines of a failed call (which the call's own error
handling drains), so the tick need not drain that log after its calls (`extism_adapter.may_log`). Only
the import section is read, within the module's bytes, and anything this reader does not know makes the
answer "unknown" (None), which its callers take for the worst.
"""

from __future__ import annotations

HEADER = 8  # magic and version, checked by `wasm_gate.read_module`
IMPORT_SECTION = 2
MAX_IMPORTS = 100_000  # wasmparser's limit, which wasmtime validates against: more is no module it runs
FUNCTION, TABLE, MEMORY, GLOBAL, TAG = range(5)  # an import's kind


class _Malformed(Exception):
    pass


class _Reader:
    def __init__(self, data: bytes, position: int, end: int):
        self.data, self.position, self.end = data, position, end

    def byte(self) -> int:
        if self.position >= self.end:
            raise _Malformed
        self.position += 1
        return self.data[self.position - 1]

    def unsigned(self, bits: int = 32) -> int:
        """An unsigned LEB128 number of at most `bits` bits."""
        result = shift = 0
        while True:
            byte = self.byte()
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7
            if shift >= bits + 7:
                raise _Malformed

    def name(self) -> str:
        length = self.unsigned()
        if self.position + length > self.end:
            raise _Malformed
        self.position += length
        return self.data[self.position - length:self.position].decode("utf-8", errors="replace")

    def value_type(self) -> None:
        if self.byte() in (0x63, 0x64):  # a typed reference (the GC proposal): a heap type follows, unread here
            raise _Malformed

    def limits(self) -> None:
        flags = self.byte()
        if flags > 7:
            raise _Malformed
        bits = 64 if flags & 4 else 32  # memory64
        self.unsigned(bits)
        if flags & 1:
            self.unsigned(bits)


def imported_functions(wasm: bytes) -> frozenset[tuple[str, str]] | None:
    """(module, name) of every function `wasm` imports; None if its import section cannot be read."""
    try:
        section = _import_section(wasm)
        return frozenset() if section is None else _functions(section)
    except _Malformed:
        return None


def _import_section(wasm: bytes) -> _Reader | None:
    reader = _Reader(wasm, HEADER, len(wasm))
    while reader.position < reader.end:
        section, size = reader.byte(), reader.unsigned()
        if reader.position + size > reader.end:
            raise _Malformed
        if section == IMPORT_SECTION:
            return _Reader(wasm, reader.position, reader.position + size)
        if section > IMPORT_SECTION:  # sections come in order (custom ones, 0, anywhere): none will follow
            return None
        reader.position += size
    return None


def _functions(reader: _Reader) -> frozenset[tuple[str, str]]:
    functions = set()
    count = reader.unsigned()
    if count > MAX_IMPORTS:  # whoever asks, hostile bytes never cost seconds of Python
        raise _Malformed
    for _ in range(count):
        module, name, kind = reader.name(), reader.name(), reader.byte()
        if kind == FUNCTION:
            functions.add((module, name))
            reader.unsigned()  # its type
        elif kind == TABLE:
            reader.value_type()  # of its elements
            reader.limits()
        elif kind == MEMORY:
            reader.limits()
        elif kind == GLOBAL:
            reader.value_type()
            reader.byte()  # mutable or not
        elif kind == TAG:
            reader.byte()  # its attribute
            reader.unsigned()  # its type
        else:
            raise _Malformed
    return frozenset(functions)
