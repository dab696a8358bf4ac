"""Files replaced whole or not at all: after a power cut mid-write the previous file is there, never part of
the new one, and a folder's watcher (the plugins' hot reload) sees one rename. For the daemon's state (the
known-good config, the operator's values) and the owner's keys and signatures."""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path


def write_atomically(path: Path, data: bytes, mode: int = 0o600, flush: bool = True) -> None:
    """`data` under `path` whole or not at all, created with `mode` (less the umask) from the start: a private
    key is never readable by others, not even for a moment. The temporary file beside it is a new one
    (O_EXCL), hidden (a leading dot), and gone when the write fails. `flush`: the file, then its rename, on
    the card before this returns (two fsyncs: tens of milliseconds on an SD card, so not on the event loop);
    without it the rename still gives the old file or the new one, never a part, but a power cut soon after
    may give the old one."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            if flush:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
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
