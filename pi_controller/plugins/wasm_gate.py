"""What stands between a file and libextism: the file checks, and a trial compile in a child process.

libextism 1.41 aborts the whole process (a Rust panic across the C boundary: SIGABRT, no `finally`, no
shut-down states) on bytes that start with a NUL but are not a module, and on a valid module whose
error message would hold a NUL (an import named "x\\0y" does it at instantiation). It parses text
as WAT and quotes the file's first line in its error, and it compiles in the calling process: a module
with a 100 MiB custom section took the daemon to 720 MB. So every path that compiles a module (daemon
load, hot reload, `plugin call`) first takes it through `read_module`: a regular file in the plugins
folder (a symlink only if it resolves inside it), at most `plugins.ceilings.max_file_bytes`, starting
with the binary magic and version 1. Then `trial` compiles and instantiates it once in a short-lived
child with memory and CPU limits (`python -m pi_controller.plugins.trial`): a panic or a compile bomb kills
the child, not the daemon, and the daemon's own compile of the same module is a warm hit in wasmtime's
cache. A module that passed once is not tried again, in this process or (recorded beside the compile cache)
after a restart. Reasons never quote the content.
"""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

from pi_controller.plugins.extism_adapter import runtime_version
from pi_controller.plugins.manifest import Refused, links_within
from pi_controller.plugins.trial import OUT_OF_MEMORY, TRIAL_CPU_S, TRIAL_MEMORY_BYTES
from pi_controller.plugins.wasm_cache import CONFIG_VARIABLE, location

MAGIC = b"\0asm"
VERSION_1 = b"\x01\0\0\0"
TRIAL_WALL_S = 60.0  # both cores saturated, and a cold start of Python in the child


def read_module(path: Path, folder: Path, max_bytes: int, limit: str = "plugins.ceilings.max_file_bytes",
                name: str | None = None) -> bytes:
    """The bytes of the module at `path`, or Refused with a one-line reason that quotes nothing of it
    (`limit`: what a refusal calls `max_bytes`; `name`: what it calls the file, its name in the folder unless
    given)."""
    name = name or path.name
    if not links_within(path, folder):
        raise Refused(f"{name} is a symbolic link to outside the plugins folder; copy the module in instead")
    try:
        # O_NONBLOCK: a FIFO named *.wasm would otherwise block the open until someone writes to it.
        fd = os.open(os.path.realpath(path), os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise Refused(f"cannot open {name}: {exc.strerror or type(exc).__name__}") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Refused(f"{name} is not a regular file")
        if info.st_size > max_bytes:
            raise Refused(f"{name} has {info.st_size} bytes, over {limit} {max_bytes}")
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise Refused(f"{name} grew past {limit} {max_bytes} while it was read")
    if data[:4] != MAGIC:
        raise Refused(f"{name} is not a WebAssembly binary module (no \\0asm magic; the text format is not "
                      "accepted: build the .wasm)")
    if data[4:8] != VERSION_1:
        raise Refused(f"{name} is not a WebAssembly module of version 1 (a component, or a damaged file)")
    return data


_passed: set[str] = set()  # digests of what compiled in a child: the same module under the same terms
_passed_lock = threading.Lock()


def trial(manifest: bytes, wasi: bool, fuel: int) -> None:
    """Compile and instantiate the module of `manifest` (libextism's JSON, module inline) in a child
    with limits; Refused if that kills the child. A clean error in the child is left for the caller's
    own compile to report. Blocks for ~0.2 s (a new Python) on a module not tried before, here or in an
    earlier run (`TrialRecords`)."""
    digest = hashlib.sha256(manifest + bytes([wasi]) + f"{fuel} {runtime_version()}".encode()).hexdigest()
    with _passed_lock:
        if digest in _passed or RECORDS.passed(digest):
            _passed.add(digest)
            return
    command = [sys.executable, "-m", "pi_controller.plugins.trial", str(int(wasi)), str(fuel)]
    try:
        done = subprocess.run(command, input=manifest, capture_output=True, timeout=TRIAL_WALL_S,
                              env={**os.environ, "RUST_BACKTRACE": "0"})
    except subprocess.TimeoutExpired:
        raise Refused(f"compiling it took more than {TRIAL_WALL_S:g} s") from None
    except OSError as exc:
        raise Refused(f"cannot start the trial compile: {exc.strerror or exc}") from None
    if done.returncode != 0:
        raise Refused(_verdict(done.returncode, done.stderr))
    with _passed_lock:
        _passed.add(digest)
        RECORDS.add(digest)


class TrialRecords:
    """The digests that passed a trial, kept across restarts beside wasmtime's compile cache: a restart
    with the same modules, terms and libextism starts without a child per plugin (0.2 s each here,
    seconds on a Pi Zero). Only passes are kept; a record that cannot be read or written is a trial
    run again. Off when wasmtime's cache is (`EXTISM_CACHE_CONFIG` empty)."""

    KEEP = 256  # records; the oldest go beyond this

    def folder(self) -> Path | None:
        if os.environ.get(CONFIG_VARIABLE) == "":
            return None
        return location(None).parent / "pi-controller" / "trials"  # beside wasmtime's own folder

    def passed(self, digest: str) -> bool:
        folder = self.folder()
        return folder is not None and (folder / digest).is_file()

    def add(self, digest: str) -> None:
        folder = self.folder()
        if folder is None:
            return
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / digest).touch()
            records = sorted(folder.iterdir(), key=lambda path: path.stat().st_mtime)
            for old in records[:-self.KEEP]:
                old.unlink()
        except OSError:  # a read-only or full cache: the next start tries again, nothing worse
            pass


RECORDS = TrialRecords()


def _verdict(code: int, stderr: bytes) -> str:
    """Why the child died, from its exit status and the kind of message (never the message)."""
    if b"memory allocation of" in stderr or code == OUT_OF_MEMORY:
        return f"compiling it needs more than {TRIAL_MEMORY_BYTES >> 20} MiB"
    if code in (-signal.SIGXCPU, -signal.SIGKILL):
        return f"compiling it took more than {TRIAL_CPU_S} s of CPU"
    if code < 0:
        return f"it makes libextism crash ({signal.Signals(-code).name} in a trial compile)"
    return f"the trial compile failed (exit status {code})"
