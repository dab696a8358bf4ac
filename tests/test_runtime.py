"""The Wasm runtime a Pi gets is one this project has tested: pinned in pyproject.toml, and what is loaded."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from pi_controller.plugins.extism_adapter import runtime_version

REPO = Path(__file__).resolve().parent.parent


def runtime_pin() -> Requirement:
    """pyproject.toml's requirement on extism-sys: the releases this project has run on."""
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    found = [Requirement(d) for d in dependencies if Requirement(d).name == "extism-sys"]
    assert len(found) == 1, "pyproject.toml must name extism-sys once, pinned to the tested releases"
    return found[0]


def test_the_runtime_is_pinned_to_releases_with_an_upper_bound() -> None:
    specifier = runtime_pin().specifier
    assert any(s.operator in ("==", "<", "<=", "~=") for s in specifier), \
        f"extism-sys {specifier} lets releases nobody tested in"
    assert not specifier.contains("999.0")


def test_the_loaded_libextism_is_a_tested_release() -> None:
    loaded = runtime_version()  # what the native library says of itself, not pip's metadata
    assert runtime_pin().specifier.contains(Version(loaded)), \
        f"libextism {loaded} is not among the tested {runtime_pin().specifier}: see docs/design.md, 'The Wasm runtime'"
    assert importlib.metadata.version("extism-sys") == loaded
