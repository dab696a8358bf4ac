"""files.write_atomically on a real folder: what lands, with which mode, what a failed write leaves (nothing),
and what it asks of the card when it is to flush."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pi_controller.files import write_atomically


def umask() -> int:
    """This process's umask, read without setting it (os.umask sets it, for every thread)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("Umask:"))
    return int(line.split()[1], 8)


def temporaries(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith("."))


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o640])
def test_the_data_lands_whole_with_its_mode_over_a_file_of_another(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "word.json"
    path.write_bytes(b"old, and longer than the new")
    path.chmod(0o666 & ~umask())
    write_atomically(path, b"new", mode)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == mode & ~umask()
    assert temporaries(tmp_path) == []


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    """Failing while the data is written (not bytes), and once it is written, at the rename (a folder in the
    way): the old file stays as it was, and no temporary file is left beside it."""
    path = tmp_path / "word.json"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_atomically(path, "not bytes")
    in_the_way = tmp_path / "folder"
    (in_the_way / "inside").mkdir(parents=True)
    with pytest.raises(OSError):
        write_atomically(in_the_way, b"new")
    assert path.read_bytes() == b"old"
    assert temporaries(tmp_path) == []


def fsyncs(monkeypatch: pytest.MonkeyPatch, folder_error: int | None = None) -> list[tuple[str, bytes]]:
    """Each fsync from now on: ("file", b"") for a file's, ("folder", what the folder's word.json then holds)
    for a folder's, which fails with `folder_error` if given."""
    done: list[tuple[str, bytes]] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            done.append(("file", b""))
            return real(fd)
        done.append(("folder", (Path(os.readlink(f"/proc/self/fd/{fd}")) / "word.json").read_bytes()))
        if folder_error is not None:
            raise OSError(folder_error, os.strerror(folder_error))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return done


def test_a_flushed_write_flushes_the_file_then_its_rename_in_the_folder(tmp_path: Path, monkeypatch) -> None:
    """The rename is written in the folder: a power cut after the file's own fsync could lose it, and leave
    the old file. So the folder is flushed too, after the rename (it then names the new file)."""
    path = tmp_path / "word.json"
    path.write_bytes(b"old")
    done = fsyncs(monkeypatch)
    write_atomically(path, b"new")
    assert done == [("file", b""), ("folder", b"new")]


def test_an_unflushed_write_asks_nothing_of_the_card(tmp_path: Path, monkeypatch) -> None:
    done = fsyncs(monkeypatch)
    write_atomically(tmp_path / "word.json", b"new", flush=False)
    assert done == []


@pytest.mark.parametrize("error", [errno.EINVAL, errno.EBADF])
def test_a_file_system_that_cannot_flush_a_folder_still_gets_the_file(tmp_path: Path, monkeypatch,
                                                                     error: int) -> None:
    fsyncs(monkeypatch, folder_error=error)
    write_atomically(tmp_path / "word.json", b"new")
    assert (tmp_path / "word.json").read_bytes() == b"new"


def test_a_card_that_fails_to_flush_the_folder_is_said(tmp_path: Path, monkeypatch) -> None:
    fsyncs(monkeypatch, folder_error=errno.EIO)
    with pytest.raises(OSError, match="Input/output error"):
        write_atomically(tmp_path / "word.json", b"new")


# A writer in a process of its own, stopped at the rename, its temporary written whole: it says the temporary's
# name, then dies there ("crash", as at a power cut or a SIGKILL) or waits for a line on stdin and renames.
WRITER = """
import os, sys
from pathlib import Path
from pi_controller.files import write_atomically
replace = os.replace
def stopped(temporary, path):
    print(os.path.basename(temporary), flush=True)
    if sys.argv[2] == "crash":
        os._exit(1)
    sys.stdin.readline()
    replace(temporary, path)
os.replace = stopped
write_atomically(Path(sys.argv[1]), b"child's")
"""


def writer(path: Path, then: str) -> tuple[subprocess.Popen[str], Path]:
    """A writer of `path` stopped at its rename, and its temporary file."""
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(path), then], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    temporary = path.with_name(child.stdout.readline().strip())
    assert temporary.name.startswith(f".{path.name}.{child.pid}.") and temporary.suffix == ".tmp"
    assert temporary.read_bytes() == b"child's"
    return child, temporary


def test_a_temporary_a_crash_left_is_removed_by_the_next_write_of_its_file(tmp_path: Path) -> None:
    """A writer that died between its temporary and the rename (nothing of it ran to remove the temporary)
    left it; the next write of the same file removes it, and another file's stays."""
    path, other = tmp_path / "word.json", tmp_path / "word.json.1"
    crashed, _ = writer(path, "crash")
    assert crashed.wait() == 1
    _, others = writer(other, "crash")
    write_atomically(path, b"new")
    assert path.read_bytes() == b"new"
    assert temporaries(tmp_path) == [others.name]


def test_a_temporary_left_under_this_process_s_pid_is_removed_too(tmp_path: Path) -> None:
    """After a reboot the daemon may be given the pid its crashed predecessor had: a temporary of that pid,
    which this process is not writing, is a leftover all the same."""
    path = tmp_path / "word.json"
    crashed, temporary = writer(path, "crash")
    crashed.wait()
    temporary.rename(temporary.with_name(temporary.name.replace(f".{crashed.pid}.", f".{os.getpid()}.")))
    write_atomically(path, b"new")
    assert temporaries(tmp_path) == []


def test_a_temporary_still_being_written_is_left_to_its_writer(tmp_path: Path) -> None:
    """Two processes writing one file: the second's write does not take the first's temporary away, and
    the first's rename, after it, lands."""
    path = tmp_path / "word.json"
    child, temporary = writer(path, "wait")
    try:
        write_atomically(path, b"new")
        assert path.read_bytes() == b"new" and temporary.exists()
    finally:
        assert child.stdin is not None
        child.stdin.write("\n")
        child.stdin.close()
    assert child.wait() == 0
    assert path.read_bytes() == b"child's"
    assert temporaries(tmp_path) == []
