"""What the plugins of a folder are, in one place: the load, the shadow set, the watcher, check-config and the
operator's kept values all list a folder with `modules`, so none takes for a plugin what another does not."""

from __future__ import annotations

import os
from pathlib import Path

SUFFIX = ".wasm"


def modules(folder: Path) -> frozenset[str]:
    """The plugins of `folder`, by their modules' names: each entry named `*.wasm` (the case as written) but a
    hidden one (a Mac's `._x.wasm`, an editor's or a copy's temporary file) and a folder, which the watcher takes
    for a subfolder; a link is a plugin whose target the file gate judges. A folder missing or unreadable holds
    none."""
    try:
        with os.scandir(folder) as entries:
            return frozenset(entry.name.removesuffix(SUFFIX) for entry in entries
                             if is_module_name(entry.name) and not entry.is_dir(follow_symlinks=False))
    except OSError:  # missing, not a folder, not ours to read: as the glob it replaces, no plugins
        return frozenset()


def is_module_name(name: str) -> bool:
    """Whether a file named `name` in a plugins folder is a plugin's module (if it is no folder)."""
    return name.endswith(SUFFIX) and not name.startswith(".")
