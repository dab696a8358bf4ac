"""Ed25519 keys as this project reads them: the public keys a node trusts (`plugins.trusted_keys`, read when
the config loads) and the small files they come in, bounded and never blocking. Below everything that
uses them: the config and the plugins' signatures (`plugins/signing.py`). Ed25519 comes from
`cryptography` (OpenSSL underneath), not code of ours."""

from __future__ import annotations

import base64
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pi_controller.files import open_to_read

MAX_KEY_BYTES = 4096  # a PEM key is ~120 bytes; an encrypted private one a few hundred
MAX_TRUSTED_KEYS = 64
_BASE64_KEY = re.compile(r"[A-Za-z0-9+/]{43}=")  # 32 raw bytes


class KeyProblem(ValueError):
    """A key that cannot be used: said in one line, without its content."""


def read_small(path: Path, limit: int, what: str) -> bytes:
    """A small file's bytes; OSError whose strerror completes "{path} ..." if it cannot be, is no regular
    file (a FIFO would block the read for good) or holds more than `limit` bytes."""
    try:
        file = open_to_read(path)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot be read: {exc.strerror or type(exc).__name__}") from None
    with file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise OSError(0, "is not a regular file")
        data = file.read(limit + 1)
    if len(data) > limit:
        raise OSError(0, f"is longer than {limit} bytes: not {what}")
    return data


def trusted_key(entry: str, base: Path) -> str:
    """One entry of plugins.trusted_keys (a raw key in base64, PEM text, or a PEM file's path relative to
    `base`), as the raw key in base64. KeyProblem says what is wrong with it."""
    text = entry.strip()
    if _BASE64_KEY.fullmatch(text):
        return _raw_key(text)
    if text.startswith("-----BEGIN"):
        return _raw(_pem_public(text.encode(), "the PEM text"))
    if len(text) > 4096 or "\n" in text:
        raise KeyProblem("neither a key file's path, PEM text (-----BEGIN PUBLIC KEY-----) nor a raw key in base64")
    path = base / text
    try:
        data = read_small(path, MAX_KEY_BYTES, "a public key")
    except OSError as exc:
        raise KeyProblem(f"the key file {path} {exc.strerror}") from None
    held = data.decode("ascii", "replace").strip()
    if _BASE64_KEY.fullmatch(held):
        return _raw_key(held)
    return _raw(_pem_public(data, f"the key file {path}"))


def _raw_key(text: str) -> str:
    """A raw key in base64 (44 characters, `_BASE64_KEY`), as an Ed25519 public key's."""
    try:
        return _raw(Ed25519PublicKey.from_public_bytes(base64.b64decode(text)))
    except ValueError:
        raise KeyProblem("not an Ed25519 public key (44 base64 characters of its 32 raw bytes)") from None


def _pem_public(data: bytes, what: str) -> Ed25519PublicKey:
    if b"PRIVATE KEY" in data:
        raise KeyProblem(f"{what} holds a private key: a node needs only the public one (the .pub file "
                         "`pi-controller plugin keygen` writes); keep the private key off the nodes")
    key: Ed25519PublicKey = ed25519(lambda: serialization.load_pem_public_key(data), Ed25519PublicKey, what,
                                     "a PEM public key")
    return key


def _raw(key: Ed25519PublicKey) -> str:
    return base64.b64encode(key.public_bytes_raw()).decode()


def ed25519(load: Callable[[], object], kind: type[Any], what: str, form: str) -> Any:
    """What `load` reads from PEM, if it is an Ed25519 key of `kind`; KeyProblem otherwise, saying that `what`
    was read is not in the `form` asked ("a PEM public key"), or not an Ed25519 key."""
    try:
        key = load()
    except (ValueError, UnsupportedAlgorithm):
        raise KeyProblem(f"{what} is not {form}") from None
    if not isinstance(key, kind):
        raise KeyProblem(f"{what} is not an Ed25519 key (openssl genpkey -algorithm ed25519 makes one)")
    return key
