#!/usr/bin/env python3
"""Every runtime dependency installs on a Pi from a binary wheel: nothing needs a compiler there.

A Pi is 64-bit Raspberry Pi OS Bookworm: CPython 3.11 on aarch64 with glibc 2.36, so pip there takes
manylinux wheels up to manylinux_2_36_aarch64 (and pure-Python ones). This asks PyPI, as that pip would,
for every dependency in pyproject.toml's [project] dependencies (and theirs), with `--only-binary=:all:`:
a dependency added later that has only an sdist, or no aarch64 build, fails here in seconds rather than on
an owner's Pi. CI runs it (.ci/run); `python3 scripts/check-pi-wheels.py`, from anywhere. Exit 0 when all
resolve to wheels, 1 otherwise, with pip's own error.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = "3.11"  # Bookworm's python3
GLIBC_MINOR = 36  # Bookworm's glibc 2.36: manylinux_2_17 (manylinux2014) up to manylinux_2_36
ARCH = "aarch64"


def platforms() -> list[str]:
    """The platform tags pip on the Pi accepts: pip expands none of them itself when given --platform."""
    tags = [f"manylinux_2_{minor}_{ARCH}" for minor in range(GLIBC_MINOR, 16, -1)]
    return [*tags, f"manylinux2014_{ARCH}", f"linux_{ARCH}"]


def main() -> int:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    abi = "cp" + PYTHON.replace(".", "")
    with tempfile.TemporaryDirectory(prefix="pi-wheels-") as folder:
        # --isolated: PyPI as the Pi's pip sees it, not this machine's mirrors or find-links.
        command = [sys.executable, "-m", "pip", "download", "--isolated", "--disable-pip-version-check", "--quiet",
                   "--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp", "--abi", abi,
                   *(arg for tag in platforms() for arg in ("--platform", tag)), "--dest", folder, *dependencies]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            print(result.stderr.strip(), file=sys.stderr)
            print(f"check-pi-wheels: a runtime dependency has no binary wheel for {abi} manylinux {ARCH} "
                  f"(64-bit Raspberry Pi OS): a Pi would need a compiler for it", file=sys.stderr)
            return 1
        wheels = sorted(path.name for path in Path(folder).iterdir())
    not_wheels = [name for name in wheels if not name.endswith(".whl")]
    if not_wheels:  # --only-binary makes pip refuse them; said again in case a pip ever does not
        print(f"check-pi-wheels: not wheels: {', '.join(not_wheels)}", file=sys.stderr)
        return 1
    native = [name for name in wheels if not name.endswith("-none-any.whl")]
    print(f"check-pi-wheels: {len(dependencies)} runtime dependencies resolve to {len(wheels)} wheels for {abi} "
          f"manylinux {ARCH}, {len(native)} of them native:")
    for name in native:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
