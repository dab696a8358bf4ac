"""Why the daemon will not load a plugin (`Refused`), and which of its files are the plugin's to show
(`links_within`): what the manifest, the file gate and the signature all say their refusals with."""

from __future__ import annotations

import os
from pathlib import Path

from pi_controller.config import KeyPath


class Refused(Exception):
    """A plugin the daemon will not load: the message says why, in the operator's words. `key`: the
    config's key at fault, when a value of the daemon's config is (with `problem`, the message without it)."""

    def __init__(self, message: str, key: KeyPath | None = None, problem: str | None = None):
        super().__init__(message)
        self.key = key
        self.problem = problem or message


def links_within(path: Path, folder: Path) -> bool:
    """False for a symbolic link that resolves outside `folder`: what it points at is not the
    plugin's to show (a link to /etc/passwd would put its lines into errors)."""
    if not os.path.islink(path):
        return True
    return os.path.realpath(path).startswith(os.path.realpath(folder).rstrip(os.sep) + os.sep)
