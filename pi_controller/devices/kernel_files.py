"""The kernel's files that some sensors read: a thermal zone, a 1-wire thermometer's w1_slave (sysfs).

On a Pi a sensor reads the file itself. On simulated pins, a file under /sys is simulated in memory: a
laptop has no such file, or one of its own that is not the Pi's (its CPU temperature), and a simulated
thermometer must not write into the machine's /sys. The text a model sets there, in the kernel's format,
is what the sensor reads and parses, as it would the kernel's. A file anywhere else (a tree a test or an
owner made) is read and written as it is, on any pins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

SYSFS = Path("/sys")


class KernelFile(Protocol):
    def read_text(self) -> str: ...

    def write_text(self, text: str) -> None:
        """Replace the whole text: a reader on another thread sees the old text or the new, never half."""

    def prepare_writes(self) -> None:
        """Make room for `write_text` now, so that a model that cannot write fails at start (OSError)."""


class RealFile:
    def __init__(self, path: Path):
        self.path = path

    def read_text(self) -> str:
        return self.path.read_text(encoding="ascii")

    def write_text(self, text: str) -> None:
        partial = self.path.with_suffix(".new")  # written aside and renamed
        partial.write_text(text, encoding="ascii")
        partial.replace(self.path)

    def prepare_writes(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)


class SimulatedFile:
    def __init__(self, text: str):
        self.text = text

    def read_text(self) -> str:
        return self.text

    def write_text(self, text: str) -> None:
        self.text = text  # one assignment: the old text or the new

    def prepare_writes(self) -> None:
        pass


def kernel_file(path: str | Path, factory: Any, simulated: str) -> KernelFile:
    """`path` as a sensor built on `factory` reads it: on simulated pins and under /sys, the text a model
    sets (`simulated` until one does), shared by every reader and writer of that path; else the file."""
    path = Path(path)
    # Simulated pins (devices.mock_pins.SimulatedFactory) keep them; asked by attribute, not class, as
    # mock_pins builds on this module.
    files: dict[str, SimulatedFile] | None = getattr(factory, "kernel_files", None)
    if files is None or not path.is_relative_to(SYSFS):
        return RealFile(path)
    return files.setdefault(str(path), SimulatedFile(simulated))


class KernelFilePort:
    """Where a simulation model sets a sensor that reads a kernel file: the value, in the kernel's format."""

    def __init__(self, file: KernelFile, text: Callable[[float], str]):
        file.prepare_writes()
        self.file, self.text = file, text

    def set(self, value: float) -> None:
        self.file.write_text(self.text(value))
