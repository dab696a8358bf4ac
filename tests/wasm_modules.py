"""Hand-made WebAssembly modules for tests of what libextism is given: a few sections, byte by byte."""

from __future__ import annotations

HEADER = b"\0asm\x01\0\0\0"


def leb(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def name(text: bytes) -> bytes:
    return leb(len(text)) + text


def section(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + leb(len(body)) + body


def module(imports: tuple[tuple[bytes, bytes], ...] = (), custom_bytes: int = 0) -> bytes:
    """A module of one function type () -> (), importing `imports` (module, name) as functions of it,
    with a custom section of `custom_bytes` zeros when asked (a compile bomb that is a valid module)."""
    out = HEADER + (section(0, name(b"padding") + bytes(custom_bytes)) if custom_bytes else b"")
    out += section(1, leb(1) + b"\x60\x00\x00")
    if imports:
        out += section(2, leb(len(imports)) + b"".join(name(m) + name(f) + b"\x00\x00" for m, f in imports))
    return out


def nul_error_module() -> bytes:
    """A plugin whose `control_logic` sets the error "a\\0b" through Extism's kernel and returns 1."""
    return _nul_text_module(b"error_set", b"\x20\x00\x10\x02"  # error_set(p)
                                          b"\x41\x01\x0b")  # return 1


def nul_log_module(lines: int) -> bytes:
    """A plugin whose `control_logic` logs "a\\0b" at warn level `lines` times (below 8192) through Extism's
    kernel and returns 0."""
    return _nul_text_module(b"log_warn", b"\x03\x40"  # loop
                                         b"\x20\x00\x10\x02"  # log_warn(p)
                                         b"\x20\x01\x41\x01\x6a\x22\x01"  # i += 1
                                         b"\x41" + leb(lines) + b"\x48\x0d\x00\x0b"  # while i < lines
                                         b"\x41\x00\x0b")  # return 0


def _nul_text_module(kernel_function: bytes, tail: bytes) -> bytes:
    """A module whose `control_logic` stores "a\\0b" in Extism's memory at p, then runs `tail` (locals: the
    i64 p, an i32 counter), which may call `kernel_function` (i64) -> () of extism:host/env."""
    types = [b"\x60\x01\x7e\x01\x7e", b"\x60\x02\x7e\x7f\x00", b"\x60\x01\x7e\x00", b"\x60\x00\x01\x7f"]
    imports = [(b"alloc", 0), (b"store_u8", 1), (kernel_function, 2)]
    store = b"".join(b"\x20\x00\x42" + bytes([i]) + b"\x7c\x41" + byte + b"\x10\x01"
                     for i, byte in enumerate([b"\xe1\x00", b"\x00", b"\xe2\x00"]))  # p+i <- 'a', 0, 'b'
    body = (b"\x02\x01\x7e\x01\x7f"  # locals: i64 p, i32 i
            b"\x42\x03\x10\x00\x21\x00"  # p = alloc(3)
            + store + tail)
    out = HEADER + section(1, leb(len(types)) + b"".join(types))
    out += section(2, leb(len(imports)) + b"".join(name(b"extism:host/env") + name(f) + b"\x00" + leb(t)
                                                     for f, t in imports))
    out += section(3, b"\x01\x03")
    out += section(7, b"\x01" + name(b"control_logic") + b"\x00\x03")
    return out + section(10, b"\x01" + leb(len(body)) + body)
