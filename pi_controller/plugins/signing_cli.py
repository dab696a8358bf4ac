"""`pi-controller plugin keygen` and `plugin sign`: the owner's side of signed plugins (a node's side is
`signing.check`, inside the one check of a plugin's terms)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pi_controller.files import path_argument, write_atomically
from pi_controller.keys import MAX_KEY_BYTES, KeyProblem, ed25519, read_small
from pi_controller.plugins.refusal import Refused
from pi_controller.plugins.signing import SUFFIX, fingerprint, sign


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The signing key in `path` (PKCS#8 PEM, unencrypted, as `keygen` or `openssl genpkey -algorithm
    ed25519` writes it); KeyProblem otherwise."""
    try:
        data = read_small(path, MAX_KEY_BYTES, "a signing key")
    except OSError as exc:
        raise KeyProblem(f"the key {path} {exc.strerror}") from None
    try:
        key: Ed25519PrivateKey = ed25519(lambda: serialization.load_pem_private_key(data, password=None),
                                          Ed25519PrivateKey, str(path), "a PEM private key")
        return key
    except TypeError:
        raise KeyProblem(f"{path} is encrypted; decrypt a copy: openssl pkey -in {path} -out PLAIN.pem") from None


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def add_commands(plugin_commands: Any) -> None:
    """Register `plugin sign` and `plugin keygen` on the CLI's `plugin` subcommands."""
    command = plugin_commands.add_parser("sign", help="sign a plugin and its manifest: writes NAME.sig beside them")
    command.add_argument("wasm", type=path_argument,
                         help="the plugin (.wasm); its manifest (.yaml) beside it is signed too")
    command.add_argument("--key", type=path_argument, required=True,
                         help="the Ed25519 private key (PEM), from plugin keygen")
    command.set_defaults(handler=run_sign)
    keygen = plugin_commands.add_parser("keygen", help="make an Ed25519 signing key: KEY (private) and KEY.pub")
    keygen.add_argument("key", type=path_argument,
                        help="where to write the private key; the public one goes to KEY.pub")
    keygen.set_defaults(handler=run_keygen)


def run_sign(args: argparse.Namespace) -> int:
    from pi_controller.config import PluginCeilings
    from pi_controller.names import PLUGIN_NAME_RULE, valid_plugin_name
    from pi_controller.plugins.manifest import parse_manifest, read_manifest
    from pi_controller.plugins.wasm_gate import read_module

    wasm: Path = args.wasm  # named as the user gave it, as install and call name it
    if wasm.suffix != ".wasm" or not valid_plugin_name(wasm.stem):
        return _error(f"{wasm}: not a plugin file the daemon loads (NAME.wasm, NAME: {PLUGIN_NAME_RULE})")
    try:
        key = load_private_key(args.key)
    except KeyProblem as exc:  # names the key's file
        return _error(str(exc))
    try:
        module = read_module(wasm, wasm.parent, PluginCeilings().max_file_bytes, name="it")
        described = read_manifest(wasm)
        parse_manifest(wasm, described)  # a manifest no node would load is not worth a signature
        signed = sign(wasm.stem, module, described, key)
    except Refused as exc:
        return _error(f"{wasm}: {exc}")
    try:
        write_atomically(wasm.with_suffix(SUFFIX), signed.text().encode(), 0o644)
    except OSError as exc:
        return _error(f"cannot write {wasm.with_suffix(SUFFIX)}: {exc.strerror or exc}")
    print(f"signed {wasm}{' and ' + str(wasm.with_suffix('.yaml')) if described is not None else ''} with key "
          f"{signed.key}: {wasm.with_suffix(SUFFIX)}")
    return 0


def run_keygen(args: argparse.Namespace) -> int:
    path: Path = args.key
    public = path.with_name(path.name + ".pub")
    there = [str(p) for p in (path, public) if os.path.lexists(p)]
    if there:
        return _error(f"{', '.join(there)} already there; nothing written (a key is not overwritten)")
    key = Ed25519PrivateKey.generate()
    try:
        write_atomically(path, private_pem(key), 0o600)
        write_atomically(public, public_pem(key.public_key()), 0o644)
    except OSError as exc:
        return _error(f"cannot write the key: {exc.strerror or exc}")
    print(f"wrote the private key {path} (keep it off the nodes) and the public key {public}, key "
          f"{fingerprint(key.public_key())}; on each node: plugins.trusted_keys: [{public.name}]")
    return 0


def _error(message: str) -> int:
    """A mistake in what was passed, said in one line: exit status 2, as every command has it."""
    print(f"error: {message}", file=sys.stderr)
    return 2
