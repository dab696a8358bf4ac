"""The config the daemon last ran with, kept in its state directory for `safe-state`.

After a crash, `safe-state` (the unit's ExecStopPost=) must drive what the dead process drove. The config
on disk may since have been edited (not yet reloaded), broken or removed; this copy is what the daemon
started or last reloaded with. It lives in systemd's StateDirectory= ($STATE_DIRECTORY), and is replaced
atomically (a power cut mid-write leaves the previous copy). Without a state directory nothing is kept
and `safe-state` reads the config file alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path
from typing import Mapping

import structlog

from pi_controller import config
from pi_controller.config import LoopSettings, Settings
from pi_controller.files import write_atomically
from pi_controller.keys import read_small

log = structlog.get_logger("pi_controller.known_good")

FILE_NAME = "last-good-config.yaml"
# The loop the daemon runs, which a reload keeps (its rate changes at a restart): what `check-config` beside it
# (the unit's ExecReload=) judges the plugins' budget by, as the reload will.
RUNNING_LOOP = "running-loop.json"


def state_directory(environ: Mapping[str, str] = os.environ) -> Path | None:
    """systemd's StateDirectory= (the first, when it names several), or None outside systemd."""
    value = environ.get("STATE_DIRECTORY", "")
    return Path(value.split(":")[0]) if value else None


def unusable(directory: Path, make: bool) -> str | None:
    """Why the daemon could not keep its state in `directory` (this copy, the operator's values, a fleet node's
    words), with the fix, or None; `make`: create it if missing, as `run` does (systemd makes its own)."""
    try:
        if not stat.S_ISDIR(os.stat(directory).st_mode):
            return "is not a folder: the daemon keeps its state there; remove it, or give another --state-dir"
    except (FileNotFoundError, NotADirectoryError):
        if not make:  # `run` makes it, with what is missing above it: below the nearest folder that exists
            above = next((p for p in directory.parents if os.path.lexists(p)), Path("."))
            if not above.is_dir():
                return f"cannot be made: {above} is not a folder; fix the path, or give another --state-dir"
            return None if os.access(above, os.W_OK | os.X_OK) else (
                f"cannot be made: {above} is not writable by this user (uid {os.getuid()}); fix the path, or give "
                "another --state-dir")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"cannot be made: {exc.strerror or exc}; fix the path, or give another --state-dir"
    except OSError as exc:
        return f"cannot be looked at: {exc.strerror or exc}; fix the path, or give another --state-dir"
    if not os.access(directory, os.W_OK | os.X_OK):
        return (f"is not writable by this user (uid {os.getuid()}): the daemon keeps its state there; fix its "
                "owner or mode, or give another --state-dir")
    return None


def copy_path(directory: Path) -> Path:
    return directory / FILE_NAME


def keep(settings: Settings, directory: Path | None) -> None:
    """Copy the config file the daemon runs with into `directory`, unless it changed since it was read
    (then the copy would not be what runs; the next reload keeps the new one) or the copy holds it already
    (a restart: no write, and none of its two fsyncs, tens of milliseconds on an SD card). Never raises: a
    full or read-only SD card must not stop the loop, it only leaves safe-state the config file. Blocks on
    the card: call it off the event loop."""
    if directory is None:
        return
    try:
        text = settings.source.read_text(encoding="utf-8")
        if config.parse(text, settings.source).actuators != settings.actuators:
            log.warning("known_good_config_not_kept", file=str(settings.source),
                        reason="the file changed since it was read")
            return
        directory.mkdir(parents=True, exist_ok=True)  # `run --state-dir DIR` makes DIR, as systemd makes its own
        if not _holds(copy_path(directory), text.encode()):
            write_atomically(copy_path(directory), text.encode())
    except (OSError, config.ConfigError) as exc:
        log.warning("known_good_config_not_kept", directory=str(directory), error=str(exc))


def keep_running_loop(loop: LoopSettings, directory: Path | None) -> None:
    """Say in `directory` which loop this process runs (at its start: a reload never changes it). Never raises, as
    `keep`; blocks on the card: call it off the event loop."""
    if directory is None:
        return
    pid = os.getpid()
    text = json.dumps({"pid": pid, "started": _started(pid), "rate_hz": loop.rate_hz,
                       "plugin_budget": loop.plugin_budget})
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Not flushed (no fsync): a fact of this process, which a power cut ends with it. Readable by all: a
        # check-config by hand, as another user, judges as the unit's does.
        write_atomically(directory / RUNNING_LOOP, text.encode(), mode=0o644, flush=False)
    except OSError as exc:
        log.warning("running_loop_not_kept", directory=str(directory), error=str(exc))


def running_loop(directory: Path) -> LoopSettings | None:
    """The loop of the daemon running with `directory` as its state directory; None if none runs (or it cannot
    be told)."""
    try:
        said = json.loads(read_small(directory / RUNNING_LOOP, 4096, "the running loop"))
        pid, started, loop = int(said["pid"]), said["started"], LoopSettings(
            rate_hz=float(said["rate_hz"]), plugin_budget=float(said["plugin_budget"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # A file left by a crash or a stop: no daemon runs, though its pid may since be another process's.
    return loop if _allowed(loop) and started is not None and _started(pid) == started else None


def _allowed(loop: LoopSettings) -> bool:
    """Each value in the range the config's schema gives it (NaN is in none): a file edited by hand or of another
    version is no loop (a rate of 0 would divide by zero in its period)."""
    return all(f.metadata["low"] <= getattr(loop, f.name) <= f.metadata["high"] for f in dataclasses.fields(loop))


def _started(pid: int) -> str | None:
    """When process `pid` started, as no other process of this machine did: this boot's id and its start time
    (clock ticks since the boot, /proc/<pid>/stat's 22nd field); None if it is not there (or not for us to see)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after the name, which may hold spaces and brackets: field 3 on
    return f"{boot} {fields[19]}" if len(fields) > 19 else None


def _holds(path: Path, data: bytes) -> bool:
    """Whether the file at `path` is `data`, byte for byte (read no further than one byte past it)."""
    try:  # a regular file's only: the open of a FIFO there would wait for a writer for good
        return read_small(path, len(data), "the config") == data
    except OSError:  # none yet, not readable, longer, or no regular file: written anew (renamed over it)
        return False
