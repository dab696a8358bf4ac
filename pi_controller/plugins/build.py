"""Build the control plugins (Zig, C, AssemblyScript) into the committed `.wasm` files.

`plugins/src/<name>.zig` becomes `plugins/<name>.wasm` (the bundled plugins) and
`tests/plugins/src/<name>.zig` becomes `tests/plugins/<name>.wasm` (the hostile test plugins); a plugin
anywhere else (`pi-controller plugin build DIR/NAME.zig`) becomes `DIR/NAME.wasm`, beside its source.
`plugins/src/pdk.zig` is the guest helper every plugin imports as `@import("pdk")`; it is a
module of its own on the compiler's command line, so sources outside `plugins/src` may use it.

The compiler is the `ziglang` wheel, pinned to `ZIG_VERSION`: the committed binaries are what
exactly that version builds (wasm32-freestanding, ReleaseSmall, stripped), byte for byte, and
`tests/test_plugin_build.py` checks it. Run `python -m pi_controller.plugins.build` after
changing a plugin source, and commit the sources with their binaries.

`.ts` sources are AssemblyScript on the upstream Extism PDK (`@extism/as-pdk`) and our helper
`plugins/assemblyscript/pi.ts`; the compiler and the PDK are pinned by that folder's
`package-lock.json` and installed there with `npm ci` (Node.js and npm needed, from the npm registry).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pi_controller.files import path_argument

ZIG_VERSION = "0.17.0"
AS_VERSION = "0.28.20"  # as in plugins/assemblyscript/package-lock.json
#: The npm project holding the AssemblyScript compiler, the upstream PDK and our helper.
AS_PROJECT = Path("plugins/assemblyscript")
#: The package name a plugin imports our helper by: `import { run } from "pi-controller/pi"`.
AS_PACKAGE = "pi-controller"

#: The plugin source folders, relative to the repository root, and where their builds go.
SOURCE_DIRS: tuple[tuple[str, str], ...] = (("plugins/src", "plugins"),
                                            ("plugins/examples", "plugins/examples"),
                                            ("tests/plugins/src", "tests/plugins"))
#: The guest helper, relative to the repository root; a module, not a plugin.
PDK = Path("plugins/src/pdk.zig")

#: Shadow stack of a plugin. Zig's default (1 MiB) would make every instance start with 17
#: pages of memory; the plugins need a few KiB. The stack sits below the data, so an
#: overflow traps (out of bounds) instead of corrupting memory.
STACK_BYTES = 32 * 1024

#: The symbol every plugin exports (besides its memory, which Zig exports by default), and those it
#: exports when its source defines them (`export fn health_check`): the linker refuses to export a
#: symbol that does not exist.
EXPORTS: tuple[str, ...] = ("control_logic",)
OPTIONAL_EXPORTS: tuple[str, ...] = ("health_check",)


class BuildError(RuntimeError):
    """The compiler is missing or the wrong version, or a plugin does not compile."""


def _zig(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ziglang", *args], cwd=cwd,
                          capture_output=True, text=True, check=False)


def check_compiler() -> None:
    """Raise BuildError unless `python -m ziglang` is Zig `ZIG_VERSION`."""
    hint = f"install it with: pip install ziglang=={ZIG_VERSION}  (or: pip install -e '.[build]')"
    try:
        result = _zig("version")
    except OSError as exc:
        raise BuildError(f"cannot run {sys.executable} -m ziglang ({exc}); {hint}") from exc
    found = result.stdout.strip()
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise BuildError(f"the Zig compiler is not installed for {sys.executable} ({reason}); {hint}")
    if found != ZIG_VERSION:
        raise BuildError(f"plugins are built with Zig {ZIG_VERSION}, found Zig {found}; {hint}")


def cache_dir() -> Path:
    """Zig's local cache, and the finished builds by what they were built from (`build_key`): under the
    system temp dir, never in the repository."""
    return Path(tempfile.gettempdir()) / "pi-controller-zig-cache"


def repository(near: Path) -> Path | None:
    """The repository whose guest helpers a plugin at `near` builds with: the one holding it (searched
    upwards), else the one this package runs from (an editable install), else None."""
    for folder in (*near.resolve().parents, Path(__file__).resolve().parents[2]):
        if (folder / PDK).is_file():
            return folder
    return None


def find_pdk(source: Path) -> Path:
    """The `plugins/src/pdk.zig` of `repository(source)`."""
    root = repository(source)
    if root is None:
        raise BuildError(f"no {PDK} above {source} nor where pi-controller runs from; install pi-controller from "
                         "its repository (pip install -e .)")
    return root / PDK


def compile_args(source: Path, output: Path, pdk: Path) -> list[str]:
    """The compiler arguments for one plugin: `zig build-exe` for Zig (module `root` is the plugin,
    `pdk` the helper), `zig cc` for C (which includes `pdk.h` from beside `pdk.zig`)."""
    if source.suffix == ".c":
        return c_compile_args(source, output, pdk)
    text = source.read_text()
    exports = [*EXPORTS, *(name for name in OPTIONAL_EXPORTS if f"export fn {name}(" in text)]
    return [
        "build-exe", "-target", "wasm32-freestanding", "-O", "ReleaseSmall", "-fstrip",
        "-fsingle-threaded", "-fno-entry", *(f"--export={name}" for name in exports),
        "--stack", str(STACK_BYTES), "--name", source.stem,
        "--cache-dir", str(cache_dir()), f"-femit-bin={output.resolve()}",
        "--dep", "pdk", f"-Mroot={source.resolve()}", f"-Mpdk={pdk.resolve()}",
    ]


def c_compile_args(source: Path, output: Path, pdk: Path) -> list[str]:
    """`zig cc` for a C plugin: the same target, size optimisation and stack; no libc, no entry.
    The C helper marks its exports with `export_name`, so none are named here."""
    return [
        "cc", "--target=wasm32-freestanding", "-Os", "-s", "-nostdlib", "-fno-builtin", "-std=c11",
        "-Wall", "-Werror", f"-I{pdk.parent.resolve()}", "-Wl,--no-entry", f"-Wl,-z,stack-size={STACK_BYTES}",
        "-o", str(output.resolve()), str(source.resolve()),
    ]


def build(source: Path, output: Path, pdk: Path | None = None) -> bool:
    """Compile one plugin source into `output` (a .wasm), unless the same inputs were built before;
    False if `output` already held those bytes (then it is left untouched). BuildError with the
    compiler's message."""
    output.parent.mkdir(parents=True, exist_ok=True)
    pdk = pdk or find_pdk(source)
    cached = cache_dir() / "builds" / f"{build_key(source, pdk)}.wasm"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.partial.wasm")
        try:
            _compile(source, partial, pdk)
            partial.replace(cached)  # atomic: a build cut short never poses as a finished one
        finally:
            partial.unlink(missing_ok=True)
    if output.is_file() and output.read_bytes() == cached.read_bytes():
        return False
    shutil.copyfile(cached, output)
    return True


def build_key(source: Path, pdk: Path) -> str:
    """What a build depends on, hashed: the compilers' versions, this module (the flags), the source and
    its path in the repository (AssemblyScript puts it in abort messages), and the guest helpers it may
    use. The same key gives the same bytes: the builds are reproducible, which the tests check."""
    root = pdk.resolve().parents[2]
    digest = hashlib.sha256(f"{ZIG_VERSION} {AS_VERSION}".encode())
    helpers = [pdk, pdk.with_name("pdk.h"), *sorted((root / AS_PROJECT).glob("*.ts")),
               root / AS_PROJECT / "package-lock.json"]
    for path in (Path(__file__), source, *helpers):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    place = source.resolve()
    digest.update(str(place.relative_to(root) if place.is_relative_to(root) else place.name).encode())
    return digest.hexdigest()


def _compile(source: Path, output: Path, pdk: Path) -> None:
    if source.suffix == ".ts":
        args, cwd = assemblyscript_args(pdk.resolve().parents[2], source, output)
        result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    else:
        result = _zig(*compile_args(source, output, pdk))
    if result.returncode != 0:
        raise BuildError(f"building {source} failed:\n{result.stderr.strip()}")


def assemblyscript_args(root: Path, source: Path, output: Path) -> tuple[list[str], Path]:
    """`asc` for one AssemblyScript plugin, and where to run it: from `root`, with paths relative to it,
    for a source of the repository (the file names that abort messages carry are then the same on
    every machine), else from the source's folder (asc names modules by their path from there).
    `-Oz` for size; the incremental runtime because an instance lives from tick to tick (the stub
    runtime never frees, and would run into the page limit); `abort` reports its message through
    Extism's error, then traps."""
    root, source = root.resolve(), source.resolve()
    base = root if source.is_relative_to(root) else source.parent
    project = Path(os.path.relpath(root / AS_PROJECT, base))
    return (["node", str(root / AS_PROJECT / "node_modules" / "assemblyscript" / "bin" / "asc.js"),
             str(source.relative_to(base)), "--outFile", str(output.resolve()),
             "-Oz", "--runtime", "incremental", "--noAssert", "--use", f"abort=~lib/{AS_PACKAGE}/pi/abort",
             "--path", str(project / "node_modules"), "--path", str(helper_package(root))], base)


def helper_package(root: Path) -> Path:
    """A folder holding our helper as the package `pi-controller` (a link to `root`'s AS_PROJECT), for asc's
    --path: a plugin imports it as "pi-controller/pi" wherever its source lies, and a folder moved does not
    break. One per repository, in the build cache; the link is made aside and renamed into place."""
    folder = cache_dir() / "assemblyscript" / hashlib.sha256(str(root).encode()).hexdigest()[:16]
    link = folder / AS_PACKAGE
    if not (link.is_symlink() and link.resolve() == (root / AS_PROJECT).resolve()):
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{AS_PACKAGE}.{os.getpid()}"
        partial.unlink(missing_ok=True)
        partial.symlink_to(root / AS_PROJECT, target_is_directory=True)
        partial.replace(link)
    return folder


def check_assemblyscript(root: Path) -> None:
    """Install the pinned AssemblyScript compiler and PDK (`npm ci`) unless they are there already;
    BuildError if Node.js or npm is missing, or the installed compiler is not `AS_VERSION`."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise BuildError("AssemblyScript plugins need Node.js and npm: apt-get install nodejs npm")
    project = root / AS_PROJECT
    installed = project / "node_modules" / ".package-lock.json"  # npm's record of what it installed
    if not installed.is_file() or installed.stat().st_mtime < (project / "package-lock.json").stat().st_mtime:
        result = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=project, capture_output=True,
                                text=True, check=False)
        if result.returncode != 0:
            raise BuildError(f"npm ci in {AS_PROJECT} failed:\n{result.stderr.strip()[-2000:]}")
    manifest = project / "node_modules" / "assemblyscript" / "package.json"
    found = json.loads(manifest.read_text())["version"]
    if found != AS_VERSION:
        raise BuildError(f"plugins are built with AssemblyScript {AS_VERSION}, found {found} in {AS_PROJECT}; "
                         f"run npm ci there")


def sources(root: Path) -> list[tuple[Path, Path]]:
    """Every (plugin source, .wasm it builds into) under `root`, the PDK excluded."""
    pairs = []
    for source_dir, output_dir in SOURCE_DIRS:
        found = [path for pattern in ("*.zig", "*.c", "*.ts") for path in (root / source_dir).glob(pattern)]
        for source in sorted(found):
            if source.resolve() != (root / PDK).resolve():
                pairs.append((source, root / output_dir / f"{source.stem}.wasm"))
    return pairs


def build_all(root: Path) -> tuple[list[Path], int]:
    """Build every plugin of the repository at `root`; return the .wasm files that changed, and how many
    plugins there are."""
    if not (root / PDK).is_file():
        raise BuildError(f"{root.resolve()} is not the repository root: it has no {PDK}")
    check_compiler()
    pairs = sources(root)
    if any(source.suffix == ".ts" for source, _ in pairs):
        check_assemblyscript(root)
    changed = [output for source, output in pairs if build(source, output, root / PDK)]
    return changed, len(pairs)


def build_one(source: Path) -> Path:
    """Build `source` (a plugin's .zig, .c or .ts, anywhere) into the .wasm beside it; return that path."""
    pdk = find_pdk(source)
    if source.resolve() == pdk.resolve():
        raise BuildError(f"{source} is the guest helper every plugin imports, not a plugin")
    if source.suffix == ".ts":
        check_assemblyscript(pdk.resolve().parents[2])
    else:
        check_compiler()
    output = source.with_suffix(".wasm")
    build(source, output, pdk)
    return output


def add_command(plugin_commands: Any) -> None:
    """Register `plugin build` on the CLI's `plugin` subcommands (argparse's subparsers action)."""
    command = plugin_commands.add_parser("build", help="build one plugin source into the .wasm beside it, or "
                                                       "(with no source) the repository's bundled and test plugins")
    command.add_argument("source", nargs="?", type=path_argument, help="a plugin's .zig, .c or .ts, anywhere")
    command.add_argument("--root", type=path_argument, help="without SOURCE: the repository root (default: the one "
                                                            "holding the current folder, else pi-controller's own)")
    command.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    if args.source is None:
        root = args.root or repository(Path.cwd() / "here")
        return main([str(root or Path.cwd())])
    if args.source.suffix not in (".zig", ".c", ".ts") or not args.source.is_file():
        what = "no such file" if args.source.suffix in (".zig", ".c", ".ts") else "not a plugin source (.zig, .c, .ts)"
        print(f"error: {args.source}: {what}", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        output = build_one(args.source)
    except BuildError as exc:  # the compiler's messages, which may take many lines
        print(f"error: {exc}", file=sys.stderr)
        return 1
    manifest = output.with_suffix(".yaml")
    beside = f"; its manifest {manifest.name} beside it" if manifest.is_file() else "; no manifest beside it"
    print(f"built {output} ({output.stat().st_size} bytes) in {time.monotonic() - started:.1f} s{beside}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: build every plugin of the repository (default: the current directory)."""
    parser = argparse.ArgumentParser(prog="python -m pi_controller.plugins.build",
                                     description="Build the plugins (Zig, C, AssemblyScript) into .wasm files.")
    parser.add_argument("root", nargs="?", type=path_argument, default=Path.cwd(),
                        help="repository root (default: the current directory)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        changed, count = build_all(args.root)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in changed:
        print(f"{path.relative_to(args.root)}  {path.stat().st_size} bytes")
    print(f"{count} plugins, {len(changed)} written; the others were already what their sources build "
          f"(Zig {ZIG_VERSION}, AssemblyScript {AS_VERSION}); {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
