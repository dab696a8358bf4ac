"""Signed plugins: a detached Ed25519 signature over a module and its manifest, and the keys a node trusts.

What is signed is a statement, not the files: four lines naming the plugin and the sha256 of its module and
of its manifest (`statement`). So a manifest swapped under a signed module (more fuel, other hosts, WASI) or
a module renamed to another plugin's name fails as surely as a flipped byte in the module does. The
signature lives beside the module as `<name>.sig` (`SignatureFile`), with the fingerprint of the key that
made it, so that a refusal can say "signed by a key this node does not trust" rather than only "does not
verify". The fingerprint only picks the message: a signature is accepted only if it verifies under a key of
`plugins.trusted_keys`.

A node checks every module it admits (`check`): a present signature must verify, always (a signature that
does not verify is an attack, not an absence); an absent one is refused only under
`plugins.require_signature`. Ed25519 comes from `cryptography` (OpenSSL underneath), not code of ours.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pi_controller.keys import read_small
from pi_controller.plugins.refusal import Refused, links_within

if TYPE_CHECKING:
    from pi_controller.config import PluginsSettings

SUFFIX = ".sig"
HEADER = "pi-controller plugin signature v1"
MAX_SIGNATURE_BYTES = 1024  # three short lines
TRUSTED = ("plugins", "trusted_keys")  # the config's key at fault when a signature is not a trusted one


def statement(name: str, module: bytes, manifest: bytes | None) -> bytes:
    """The bytes a signature covers: the plugin's name and the digests of its module and manifest
    (`none` when it has no manifest)."""
    described = hashlib.sha256(manifest).hexdigest() if manifest is not None else "none"
    return (f"{HEADER}\nname: {name}\nmodule-sha256: {hashlib.sha256(module).hexdigest()}\n"
            f"manifest-sha256: {described}\n").encode()


def fingerprint(key: Ed25519PublicKey) -> str:
    """A key's short name in signatures and logs: the first 16 hex digits of its raw bytes' sha256."""
    return hashlib.sha256(key.public_bytes_raw()).hexdigest()[:16]


@dataclass(frozen=True)
class SignatureFile:
    key: str  # fingerprint of the key that signed
    signature: bytes  # 64 bytes

    def text(self) -> str:
        return f"{HEADER}\nkey: {self.key}\ned25519: {base64.b64encode(self.signature).decode()}\n"

    @classmethod
    def parse(cls, data: bytes, name: str) -> SignatureFile:
        """Refused unless `data` is exactly what `text` writes."""
        lines = data.decode("ascii", "replace").split("\n")
        key = lines[1].removeprefix("key: ") if len(lines) == 4 else ""
        signature = lines[2].removeprefix("ed25519: ") if len(lines) == 4 else ""
        if lines[0] != HEADER or lines[3:] != [""] or not re.fullmatch(r"[0-9a-f]{16}", key) \
                or not re.fullmatch(r"[A-Za-z0-9+/]{86}==", signature):
            raise Refused(f"{name} is not a signature `pi-controller plugin sign` writes (damaged, or another "
                          "format); sign the module again")
        return cls(key, base64.b64decode(signature))


def sign(name: str, module: bytes, manifest: bytes | None, key: Ed25519PrivateKey) -> SignatureFile:
    return SignatureFile(fingerprint(key.public_key()), key.sign(statement(name, module, manifest)))


def check(wasm: Path, module: bytes, manifest: bytes | None, settings: PluginsSettings) -> str | None:
    """Whether the module at `wasm` (its bytes and its manifest's, as read for loading) may load under
    `settings`: the fingerprint of the trusted key that signed it, None when unsigned and that is allowed;
    Refused with a one-line reason otherwise."""
    name = wasm.stem
    data = read_signature(wasm)
    if data is None:
        if settings.require_signature:
            raise Refused(f"{wasm.name} has no signature ({name}{SUFFIX}) and plugins.require_signature is true; "
                          f"sign it: pi-controller plugin sign {wasm.name} --key KEY", ("plugins", "require_signature"))
        return None
    signed = SignatureFile.parse(data, wasm.with_suffix(SUFFIX).name)
    keys = {fingerprint(key): key for key in map(public_key, settings.trusted_keys)}
    key = keys.get(signed.key)
    if key is None:
        raise Refused(f"{name}{SUFFIX} was made by key {signed.key}, which is not in plugins.trusted_keys "
                      f"({len(keys)} trusted); add its public key there, or sign with a trusted key", TRUSTED)
    try:
        key.verify(signed.signature, statement(name, module, manifest))
    except InvalidSignature:
        raise Refused(f"{name}{SUFFIX} does not verify under key {signed.key}: the module or its manifest changed "
                      "since it was signed (or it was signed for another name)", TRUSTED) from None
    return signed.key


def read_signature(wasm: Path) -> bytes | None:
    """The bytes of `wasm`'s signature file, None if there is none; bounded, a regular file within the folder."""
    path = wasm.with_suffix(SUFFIX)
    if not os.path.lexists(path):
        return None
    if not links_within(path, wasm.parent):
        raise Refused(f"{path.name} is a symbolic link to outside the plugins folder")
    try:
        return read_small(path, MAX_SIGNATURE_BYTES, "a signature")
    except OSError as exc:
        raise Refused(f"{path.name} {exc.strerror}") from None


def public_key(raw_base64: str) -> Ed25519PublicKey:
    """A key as `trusted_key` resolved it."""
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(raw_base64))
