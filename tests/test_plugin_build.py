"""The committed plugin binaries are exactly what their sources (Zig, C, AssemblyScript) build into.

Every plugin is rebuilt into a temporary folder with the pinned compilers and compared byte for
byte with the committed `.wasm`; and no `.wasm` is committed without its source. AssemblyScript
needs Node.js and npm: without them its plugins are skipped here, and fail under CI (CI is set).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pi_controller.plugins import build
from tests.conftest import skip_unless_ci

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = build.sources(ROOT)
REBUILD = "rebuild with: python -m pi_controller.plugins.build (and commit the .wasm with its source)"


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every plugin built afresh, at the same relative paths as in the repository."""
    build.check_compiler()
    out = tmp_path_factory.mktemp("plugin_build")
    try:
        build.check_assemblyscript(ROOT)
    except build.BuildError as exc:
        (out / "no-assemblyscript").write_text(str(exc))
    for source, committed in PLUGINS:
        if source.suffix != ".ts" or not (out / "no-assemblyscript").exists():
            build.build(source, out / committed.relative_to(ROOT), ROOT / build.PDK)
    return out


def test_there_are_plugins() -> None:
    names = {committed.name for _, committed in PLUGINS}
    assert {"temperature_control.wasm", "motion_light.wasm", "energy_saver.wasm", "frost_guard.wasm",
            "daylight_dimmer.wasm"} <= names


@pytest.mark.slow  # every plugin built again with its pinned compiler
@pytest.mark.parametrize("source, committed", PLUGINS,
                         ids=[str(committed.relative_to(ROOT)) for _, committed in PLUGINS])
def test_committed_wasm_is_what_the_source_builds(build_dir: Path, source: Path, committed: Path) -> None:
    relative = committed.relative_to(ROOT)
    missing = build_dir / "no-assemblyscript"
    if source.suffix == ".ts" and missing.exists():
        skip_unless_ci(missing.read_text())
    assert committed.is_file(), f"{relative} is missing; {REBUILD}"
    fresh = (build_dir / relative).read_bytes()
    compiler = (f"AssemblyScript {build.AS_VERSION}" if source.suffix == ".ts"
                else f"Zig {build.ZIG_VERSION}")
    assert committed.read_bytes() == fresh, (
        f"{relative} is not what {source.relative_to(ROOT)} builds into with {compiler} "
        f"({committed.stat().st_size} vs {len(fresh)} bytes); {REBUILD}")


def test_every_wasm_has_a_source() -> None:
    built = {committed for _, committed in PLUGINS}
    wasm = sorted(path for _, folder in build.SOURCE_DIRS for path in (ROOT / folder).glob("*.wasm"))
    orphans = [str(path.relative_to(ROOT)) for path in wasm if path not in built]
    assert not orphans, f"no source builds these: {orphans}; delete them or commit their sources"


@pytest.mark.slow
def test_a_rebuild_writes_only_what_changed(tmp_path: Path) -> None:
    """`plugin build` with no source: a plugin whose .wasm is what its source builds is left untouched."""
    source = ROOT / "plugins" / "src" / "energy_saver.zig"
    output = tmp_path / "energy_saver.wasm"
    assert build.build(source, output, ROOT / build.PDK) is True
    before = output.stat().st_mtime_ns
    assert build.build(source, output, ROOT / build.PDK) is False
    assert output.stat().st_mtime_ns == before
    output.write_bytes(b"stale")
    assert build.build(source, output, ROOT / build.PDK) is True
    assert output.read_bytes() == (ROOT / "plugins" / "energy_saver.wasm").read_bytes()
