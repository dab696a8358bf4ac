"""One check for one promise: what the daemon's load would refuse in a plugins folder, said before it loads.

The daemon's start (`run`), `check-config` (and so the unit's `ExecReload=` check), a reload (SIGHUP) and
`plugin install` all call `check`: each plugin's terms as the daemon's load makes them (`manifest.terms`:
its manifest, its config against the manifest's `config_schema`, the ceilings) and the tick's time budget
by rank (`admission`). Nothing is compiled: that stays with the load itself (and `plugin install`'s trial).

A plugin named in the config (`plugins.settings`, `plugins.required`) that would not load as configured is
the config's mistake: a ConfigError at the key at fault, so that `run` exits 2 before any pin moves,
`check-config` fails and a reload is refused with the running version kept, as the docs promise. Any other
plugin of the folder that would not load is its own: `check` returns one line about it, and the daemon
runs without it (`/ready` says so).
"""

from __future__ import annotations

import os
from pathlib import Path

from pi_controller import config
from pi_controller.names import valid_plugin_name
from pi_controller.plugins import admission, manifest


def check(settings: config.Settings, folder: Path, candidate: Path | None = None) -> list[str]:
    """The folder's plugins (and `candidate`, a module to install, in its file's place) as the daemon
    would load them under `settings`: ConfigError for the first one named in the config that it would
    refuse; one line for each other one it would refuse, and each one named in the config that is missing."""
    plugins = settings.plugins
    modules = {path.stem: path for path in folder.glob("*.wasm") if valid_plugin_name(path.stem)}
    if candidate is not None:
        modules[candidate.stem] = candidate
    refused: dict[str, tuple[str, config.KeyPath | None]] = {}
    claims = []
    for name, path in sorted(modules.items()):
        own = plugins.settings.get(name)
        if (own is not None and not own.enabled) or not os.path.lexists(path):
            continue
        try:
            terms = manifest.terms(name, path, plugins)
        except manifest.Refused as exc:
            refused[name] = (exc.problem, exc.key)
            continue
        claims.append(admission.Claim(name, terms.timeout_ms, terms.priority, plugins.configured(name)))
    for name, why in admission.refused_in_rank_order(claims, settings.loop.plugin_budget_ms).items():
        own = plugins.settings.get(name)
        refused[name] = (why, ("plugins", "settings", name, "timeout_ms") if own and own.timeout_ms else None)
    for name, (why, key) in sorted(refused.items()):
        if plugins.configured(name):
            raise settings.error(key or _named_at(plugins, name), f"plugin '{name}' would not load: {why}")
    notes = [f"plugin '{name}' ({modules[name]}) would not load: {why}" for name, (why, _) in sorted(refused.items())]
    missing = sorted(n for n in {*plugins.settings, *plugins.required} if plugins.configured(n) and n not in modules)
    return notes + [f"plugin '{name}' is named in the config but has no module in {folder}" for name in missing]


def _named_at(plugins: config.PluginsSettings, name: str) -> config.KeyPath:
    if name in plugins.settings:
        return "plugins", "settings", name
    return "plugins", "required", plugins.required.index(name)
