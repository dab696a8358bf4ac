"""Hand-made WebAssembly modules for tests of what libextism is given: a few sections, byte by byte."""

from __future__ import annotations

HEADER = b"\0asm\x01\0\0\0"


def _leb(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _name(text: bytes) -> bytes:
    return _leb(len(text)) + text


def _section(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + _leb(len(body)) + body


def module(imports: tuple[tuple[bytes, bytes], ...] = (), custom_bytes: int = 0) -> bytes:
    """A module of one function type () -> (), importing `imports` (module, name) as functions of it,
    with a custom section of `custom_bytes` zeros when asked (a compile bomb that is a valid module)."""
    out = HEADER + (_section(0, _name(b"padding") + bytes(custom_bytes)) if custom_bytes else b"")
    out += _section(1, _leb(1) + b"\x60\x00\x00")
    if imports:
        out += _section(2, _leb(len(imports)) + b"".join(_name(m) + _name(f) + b"\x00\x00" for m, f in imports))
    return out
