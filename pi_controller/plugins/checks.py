"""One check for one promise: what the daemon's load would refuse in a plugins folder, said before it loads.

The daemon's start (`run`), `check-config` (and so the unit's `ExecReload=` check), a reload (SIGHUP) and
`plugin install` all call `problems`: each plugin's terms as the daemon's load makes them (the file gate,
then `manifest.terms`: its signature, its manifest, whose name is its file's, its config against the
manifest's `config_schema`, the ceilings, grants of sensors and actuators that exist) and the tick's time
budget by rank (`admission`). Nothing is compiled: that stays with the load itself (and `plugin install`'s
trial).

A plugin named in the config (`plugins.settings`, `plugins.required`) that would not load as configured is
the config's mistake: a ConfigError at the key at fault, so that `run` exits 2 before any pin moves,
`check-config` fails and a reload is refused with the running version kept, as the docs promise. Any other
plugin of the folder that would not load is its own: `check` returns one line about it, and the daemon
runs without it (`/ready` says so), whatever refused it, a signature that `plugins.require_signature` or
`plugins.trusted_keys` refuses included: a file dropped into the folder never keeps the configured plugins
out, nor the daemon from starting or reloading.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from pi_controller import config
from pi_controller.names import valid_plugin_name
from pi_controller.plugins import admission, manifest
from pi_controller.plugins import folder as plugin_folder
from pi_controller.plugins.wasm_gate import read_module


@dataclass(frozen=True)
class Problem:
    """Why the daemon would not load a plugin, and the config's key at fault (None: the plugin's own)."""

    why: str
    key: config.KeyPath | None = None


def problems(settings: config.Settings, folder: Path, candidate: Path | None = None,
             devices_known: bool = True) -> dict[str, Problem]:
    """Each plugin of the folder (and `candidate`, a module to install, in its file's place) that the daemon
    would not load under `settings`, by name. `devices_known`: `settings` is a daemon's config, whose
    sensors and actuators a grant must name (not the stand-in of `plugin install --plugins-dir`)."""
    plugins = settings.plugins
    devices = manifest.Devices.of(settings) if devices_known else None
    found: dict[str, Problem] = {}
    claims = []
    for name, path in sorted(_modules(folder, candidate).items()):
        own = plugins.settings.get(name)
        if (own is not None and not own.enabled) or not os.path.lexists(path):
            continue
        try:
            claims.append(_claim(plugins, devices, name, path))
        except manifest.Refused as exc:
            found[name] = Problem(exc.problem, exc.key)
    for name, why in admission.refused_in_rank_order(claims, settings.loop.plugin_budget_ms).items():
        own = plugins.settings.get(name)
        found[name] = Problem(why, ("plugins", "settings", name, "timeout_ms") if own and own.timeout_ms else None)
    return found


def _claim(plugins: config.PluginsSettings, devices: manifest.Devices | None, name: str,
           path: Path) -> admission.Claim:
    module = read_module(path, path.parent, plugins.ceilings.max_file_bytes)
    terms = manifest.terms(name, path, module, plugins, devices)
    return admission.Claim(name, terms.timeout_ms, terms.priority, plugins.configured(name))


def check(settings: config.Settings, folder: Path, found: dict[str, Problem] | None = None) -> list[str]:
    """The folder's plugins as the daemon would load them under `settings`: ConfigError for the first one
    named in the config that it would refuse, at the key at fault (`plugins.require_signature` or
    `plugins.trusted_keys` for a signature); one line for each other one it would refuse, and for each one
    named in the config that is missing. `found`: `problems(settings, folder)`, if the caller has it."""
    plugins = settings.plugins
    found = problems(settings, folder) if found is None else found
    for name, problem in sorted(found.items()):
        if plugins.configured(name):
            raise settings.error(problem.key or _named_at(plugins, name), f"plugin '{name}' would not load: "
                                                                          f"{problem.why}")
    modules = _modules(folder)
    notes = [f"plugin '{name}' ({modules[name]}) would not load: {p.why}" for name, p in sorted(found.items())]
    missing = sorted(plugins.named() - set(modules))
    return notes + [f"plugin '{name}' is named in the config but has no module in {folder}" for name in missing]


def check_reload(read: config.Settings, running: config.LoopSettings, folder: Path,
                 found: dict[str, Problem] | None = None) -> list[str]:
    """`check` as a reload into a daemon running `running` judges the config `read`: the loop section changes at a
    restart only, so until then the plugins get the running loop's budget, and a ConfigError says so. The reload
    and `check-config` beside a running daemon (the unit's ExecReload=) both judge with it, and agree."""
    judged = dataclasses.replace(read, loop=running)
    try:
        config.check_plugin_budget(judged)  # the timeouts the config sets, whether or not their modules are there
        return check(judged, folder, found)
    except config.ConfigError as exc:
        if running == read.loop:
            raise
        raise config.ConfigError(exc.file, exc.path, f"{exc.message} (under the running daemon's loop, "
                                 f"{running.rate_hz:g} Hz: a reload keeps its rate and a {running.plugin_budget_ms:g} "
                                 "ms plugin budget; the file's loop applies at a restart)", exc.line) from None


def _modules(folder: Path, candidate: Path | None = None) -> dict[str, Path]:
    names = filter(valid_plugin_name, plugin_folder.modules(folder))
    found = {name: folder / f"{name}{plugin_folder.SUFFIX}" for name in names}
    if candidate is not None:
        found[candidate.stem] = candidate
    return found


def _named_at(plugins: config.PluginsSettings, name: str) -> config.KeyPath:
    if name in plugins.settings:
        return "plugins", "settings", name
    return "plugins", "required", plugins.required.index(name)
