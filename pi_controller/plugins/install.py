"""`pi-controller plugin install NAME.wasm`: a plugin, its manifest and signature into the plugins folder.

The hot reloader acts on a file as soon as it is renamed into the folder, so nothing is written there
under its final name: the module, its manifest and its signature are first written to a staging folder
inside the plugins folder (hidden, and the watcher follows the folder's own entries only), loaded from
there as the daemon would load them (`checks`: the file gate, the signature, the manifest, the grant
under the config's ceilings; then a trial compile and the health check), and only then renamed into
place, the module last: the daemon sees either the old plugin or the new one, whole, never half a file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pi_controller import config
from pi_controller.files import path_argument
from pi_controller.names import PLUGIN_NAME_RULE, valid_plugin_name
from pi_controller.plugins import tools
from pi_controller.plugins.signing import SUFFIX

if TYPE_CHECKING:  # checks is imported when an install runs, not by every command's parser
    from pi_controller.plugins.checks import Problem

EXIT_REFUSED = 2


class InstallError(ValueError):
    """Why a plugin was not installed, in one line; nothing in the plugins folder changed."""


def add_command(plugin_commands: Any) -> None:
    """Register `plugin install` on the CLI's `plugin` subcommands (argparse's subparsers action)."""
    command = plugin_commands.add_parser("install", help="check a plugin as the daemon would load it, then copy it "
                                                         "and its manifest into the daemon's plugins folder")
    command.add_argument("wasm", type=path_argument,
                         help="the plugin (.wasm); its manifest (.yaml) beside it goes with it")
    where = command.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=path_argument,
                       help="the daemon's config: its plugins.directory, and the plugin "
                            "checked under its settings and ceilings")
    where.add_argument("--plugins-dir", type=path_argument,
                       help="the plugins folder (checked under the default ceilings)")
    command.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    try:
        if args.config is not None:
            settings = config.load(args.config)
            folder = config.check_plugins_directory(settings)
        else:
            settings, folder = tools.settings_for({}), args.plugins_dir
        installed = install(args.wasm, folder, settings, checked=args.config is not None)
    except (config.ConfigError, InstallError) as exc:  # a config error is said as every command says it
        print(f"{'config error' if isinstance(exc, config.ConfigError) else 'error'}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    print(f"installed {', '.join(path.name for path in installed)} into {folder}; a running daemon loads it "
          "now (plugin_loaded or plugin_load_failed in its log)")
    return 0


def install(wasm: Path, folder: Path, settings: config.Settings, checked: bool = True) -> list[Path]:
    """Check `wasm` (and its manifest and signature) as the daemon would load it under `settings` beside the
    plugins of `folder` (`checks`: its signature and terms, the devices it is granted, the tick's budget), then
    move it into `folder` atomically; return the files installed. `checked`: `settings` is the daemon's config,
    whose devices its grant must name. InstallError, with `folder` unchanged."""
    from pi_controller.plugins import checks
    from pi_controller.plugins.manifest import Devices, Refused, parse_manifest, read_manifest
    from pi_controller.plugins.signing import read_signature
    from pi_controller.plugins.wasm_gate import read_module

    if not valid_plugin_name(wasm.stem):
        raise InstallError(f"{wasm}: '{wasm.stem}' is not a plugin name the daemon loads ({PLUGIN_NAME_RULE})")
    if wasm.suffix != ".wasm" or not wasm.is_file():
        raise InstallError(f"{wasm}: no such plugin file (a .wasm)")
    if not folder.is_dir():
        raise InstallError(f"the plugins folder {folder} does not exist or is not a folder")
    if wasm.resolve().parent == folder.resolve():
        raise InstallError(f"{wasm} is in the plugins folder already")
    try:
        described = read_manifest(wasm)
        parse_manifest(wasm, described)  # its errors name the author's file, not the staged copy
        module = read_module(wasm, wasm.parent, settings.plugins.ceilings.max_file_bytes, name="it")  # named once
        signature = read_signature(wasm)
    except (Refused, OSError) as exc:
        raise InstallError(f"{wasm}: {exc}") from None
    found = checks.problems(settings, folder, wasm, checked)
    if wasm.stem in found:
        raise InstallError(f"{wasm}: not installed: {found[wasm.stem].why}")
    if found:  # another plugin of the folder that would not load: see `_blocked_by`
        raise InstallError(f"{wasm}: not installed: {_blocked_by(settings, *min(found.items()))}")
    try:
        staging = Path(tempfile.mkdtemp(prefix=".install-", dir=folder))
    except OSError as exc:
        raise InstallError(f"cannot write into {folder}: {exc.strerror or exc}") from None
    try:
        staged = _stage(staging / wasm.name, module, described, signature)
        try:
            devices = Devices.of(settings) if checked else None
            tools.load_plugin(staged[-1], settings, devices=devices).close()  # what is installed is what was checked
        except tools.LoadFailed as exc:
            raise InstallError(f"{wasm}: not installed: {exc}") from None
        return _move_in(staged, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _blocked_by(settings: config.Settings, name: str, problem: Problem) -> str:
    """Why a plugin of the folder that would not load blocks an install: a running daemon keeps the last
    version of it that loaded, whose share of the tick's budget no file shows (the check, by the files, would
    give it to the new one), and one named in the config would stop the next start."""
    if settings.plugins.configured(name):
        return (f"plugin '{name}', named in the config, would not load ({problem.why}); fix it first: the daemon "
                "would not start with this folder")
    return (f"plugin '{name}' of the folder would not load ({problem.why}); fix or remove it first: a running "
            "daemon may still run an earlier version of it, whose share of the tick no file shows")


def put(folder: Path, name: str, module: bytes, described: bytes | None, signature: bytes | None) -> list[Path]:
    """A module checked already (a fleet rollout's: its shadow, or the version it rolls back to), with its
    manifest's and signature's bytes, moved into `folder` as `install` moves one: staged, the module last."""
    try:
        staging = Path(tempfile.mkdtemp(prefix=".install-", dir=folder))
    except OSError as exc:
        raise InstallError(f"cannot write into {folder}: {exc.strerror or exc}") from None
    try:
        return _move_in(_stage(staging / f"{name}.wasm", module, described, signature), folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _stage(wasm: Path, module: bytes, described: bytes | None, signature: bytes | None) -> list[Path]:
    """The module (and its manifest's and signature's bytes) written into the staging folder, module last."""
    beside = [(wasm.with_suffix(suffix), data) for suffix, data in ((".yaml", described), (SUFFIX, signature))]
    files = [(path, data) for path, data in beside if data is not None] + [(wasm, module)]
    try:
        for path, data in files:
            with path.open("wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())  # whole on disk before its name is: a power cut leaves the old one
            path.chmod(0o644)  # the daemon's user reads what root installs
    except OSError as exc:
        raise InstallError(f"cannot write into {wasm.parent.parent}: {exc.strerror or exc}") from None
    return [path for path, _ in files]


def _move_in(staged: list[Path], folder: Path) -> list[Path]:
    """Rename the staged files into `folder` (atomic, within one filesystem). A manifest or signature left
    from an earlier version that the new one lacks is removed first: it would describe another module. Whole
    or not at all: a rename that fails (an I/O error) puts back what the renames before it replaced (`_undo`),
    never leaving one version's manifest or signature beside another's module."""
    names, staging = {path.name for path in staged}, staged[-1].parent
    before: list[tuple[Path, Path | None]] = []  # each file of `folder` changed, and its former self (`_aside`)
    try:
        for suffix in (".yaml", SUFFIX):
            stale = folder / staged[-1].with_suffix(suffix).name
            if stale.name not in names and os.path.lexists(stale):
                before.append((stale, _aside(stale, staging)))
                stale.unlink()
        for path in staged:
            target = folder / path.name
            before.append((target, _aside(target, staging)))
            os.replace(path, target)
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)  # the renames themselves on disk
        finally:
            os.close(directory)
    except OSError as exc:
        _undo(before)
        raise InstallError(f"cannot move the plugin into {folder}: {exc.strerror or exc}") from None
    return [folder / path.name for path in staged]


def _aside(path: Path, staging: Path) -> Path | None:
    """`path` linked into the staging folder (a second name: no byte written), for `_undo`; `path` itself if
    there is none (a new file); None if it cannot be linked (a file system without hard links: not put back)."""
    if not os.path.lexists(path):
        return path
    kept = staging / f"replaced-{path.name}"
    try:
        os.link(path, kept, follow_symlinks=False)
    except OSError:
        return None
    return kept


def _undo(before: list[tuple[Path, Path | None]]) -> None:
    """Each file `_move_in` changed put back as it was, the last first: its former self renamed back from the
    staging folder, or removed if it was new. Best effort: what cannot be put back stays as it is."""
    for path, kept in reversed(before):
        try:
            if kept == path:
                path.unlink(missing_ok=True)
            elif kept is not None:
                os.replace(kept, path)
        except OSError:
            pass
