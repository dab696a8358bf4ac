"""Files replaced whole or not at all: after a power cut mid-write the previous file is there, never part of
the new one, and a folder's watcher (the plugins' hot reload) sees one rename. For the daemon's state (the
known-good config, the operator's values, a fleet node's word) and the owner's keys and signatures."""

from __future__ import annotations

import argparse
import errno
import os
import re
import secrets
from pathlib import Path
from typing import BinaryIO

# The temporary file of `NAME`, beside it: `.NAME.PID.XXXXXXXX.tmp`. Hidden and of no plugin's suffix, so neither
# the plugins' watcher nor a glob of `*.wasm` takes it; named by its writer's process, so that one a crash left
# (a power cut, a SIGKILL) is told from one still being written, and the next write of NAME removes it.
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]{1,7})\.[0-9a-f]{8}\.tmp")
_writing: set[str] = set()  # names of this process's temporaries under way (a restart may get a crashed one's pid)


PATH_MAX, NAME_MAX = 4096, 255  # bytes, Linux's: past them every call on the path fails (ENAMETOOLONG)


def path_argument(text: str) -> Path:
    """A command line's path (argparse's `type`): one no file can have is refused there, in one line, before
    a check of it on the way (Path.is_dir and its kind raise for it) could end in a traceback."""
    encoded = os.fsencode(text)
    try:  # as the checks use it: a relative path under PATH_MAX may be over it in the current folder
        whole = len(os.fsencode(os.path.join(os.getcwd(), text)))
    except OSError:  # no current folder (removed): the path's first use says so
        whole = len(encoded)
    if len(encoded) >= PATH_MAX or whole >= PATH_MAX:
        size = f"{len(encoded)} bytes" if len(encoded) >= PATH_MAX else f"{whole} bytes in the current folder"
        raise argparse.ArgumentTypeError(f"a path of {size}, over the {PATH_MAX - 1} a path may have")
    if any(len(name) > NAME_MAX for name in encoded.split(b"/")):
        raise argparse.ArgumentTypeError(f"{text[:40]!r}...: a name in the path is over the {NAME_MAX} bytes a "
                                         "name may have")
    return Path(text)


def open_to_read(path: Path) -> BinaryIO:
    """`path` opened for reading as `open(path, "rb")` opens it, but never waiting: a FIFO that nothing writes to
    reads as empty (a blocking open of it would wait for a writer for good); a pipe with its writer, such as the
    shell's `<(command)`, reads as usual."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    os.set_blocking(fd, True)  # the open alone was not to wait; the reads may
    return os.fdopen(fd, "rb")


def write_end(fifo: Path) -> int | None:
    """A write end of `fifo` if a process has it open for reading (then a write to it goes through), else None.
    Its caller holds it until done with the FIFO: closed at once, the only writer's end would be the end of the
    file for a reader such as `cat fifo > file`, which would exit, and the writer's own open that followed would
    find nothing reading."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # ENXIO: no reader
        return None


def open_to_write(path: Path, append: bool = False) -> BinaryIO:
    """`path` opened for writing as `open(path, "wb")` (or "ab") opens it, but never waiting: a FIFO that nothing
    reads raises ENXIO (a blocking open of it would wait for a reader for good)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC
                     | (os.O_APPEND if append else os.O_TRUNC), 0o666)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise OSError(exc.errno, "is a FIFO that nothing reads", str(path)) from None
        raise
    os.set_blocking(fd, True)  # the open alone was not to wait; the writes may
    return os.fdopen(fd, "ab" if append else "wb")


def write_atomically(path: Path, data: bytes, mode: int = 0o600, flush: bool = True) -> None:
    """`data` under `path` whole or not at all, created with `mode` (less the umask) from the start: a private
    key is never readable by others, not even for a moment. The temporary file beside it is a new one
    (O_EXCL), hidden (a leading dot), and gone when the write fails; one a crash left is removed by the next
    write of `path` (`_TEMPORARY`). `flush`: the file, then its rename, on the card before this returns (two
    fsyncs: tens of milliseconds on an SD card, so not on the event loop); without it the rename still gives
    the old file or the new one, never a part, but a power cut soon after may give the old one."""
    _remove_leftovers(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    _writing.add(temporary.name)
    try:  # the name is this process's alone (its pid): whatever holds it when the write fails is ours to remove
        with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode), "wb") as file:
            file.write(data)
            if flush:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        _writing.discard(temporary.name)
    if flush:
        _flush_folder(path.parent)


def _flush_folder(folder: Path) -> None:
    """The rename on the card: it is written in the folder, which the file's own fsync does not flush (ext4,
    a Pi's SD card, may otherwise lose a rename to a power cut, though the file's data was on the card)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        # A file system that cannot fsync a folder (Linux answers EINVAL when it has no fsync for folders; some
        # systems answer EBADF for a descriptor opened read-only, as a folder's must be): nothing more can be
        # asked of it, and the file is written all the same. Any other error is the card's, and is said.
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _remove_leftovers(path: Path) -> None:
    """Remove the temporaries of `path` that writers which crashed left; never one still being written."""
    try:
        names = os.listdir(path.parent)
    except OSError:
        return  # the write itself says what is wrong with the folder
    for name in names:
        match = _TEMPORARY.fullmatch(name)
        if match is not None and match["name"] == path.name and _abandoned(path.with_name(name), int(match["pid"])):
            try:
                path.with_name(name).unlink(missing_ok=True)
            except OSError:  # another user's, in a shared folder: it stays, and harms nothing
                pass


def _abandoned(temporary: Path, pid: int) -> bool:
    """Whether the process that wrote `temporary` is gone (or is this one, which is not writing it)."""
    if pid == os.getpid():
        return temporary.name not in _writing
    try:
        os.kill(pid, 0)  # no signal: only whether the process is there
    except ProcessLookupError:
        return True
    except PermissionError:  # there, another user's
        pass
    return False
