"""What an operator sets that outlives the process, as ESPHome's `restore_value`: plugin config values
(a setpoint from Home Assistant) and plugins switched off, kept in `<state directory>/operator-values.json`
and applied again at every start, reload and plugin swap.

One rule decides between a kept value and the config file, the owner's latest word: each value is kept
with what the file said when it was set (`file`: the plugin's config as its manifest and the config file
give it, or its `enabled`). While the file still says that, or nothing (a manifest that gives the key no
default), the kept value is in force; once the file says something else, the file was edited after the
value was set, and its value replaces the kept one, which is forgotten (said once in the log). A default that
a new manifest gives a key the file said nothing of is no such edit (the config file giving it a value is):
the kept value stays, and that default is what the file says from then on. A kept value
that the version loaded now has no key for, or refuses (a new version), is set aside: not applied, and in
force again for a version that takes it, such as the one a fleet rollout or the owner puts back; forgetting
it would lose the operator's word to a version tried for minutes. The values of a plugin gone from the
plugins folder, and not named in the config, are forgotten: removing it is the owner's word. Gone from a folder
that holds plugins, as listed when the plugin set changed (`apply`), once the folder has held still for
`SETTLE_S` on the loop's clock (the same modules listed then and when the time is up): a redeploy's `rm -rf`
and copy caught halfway, other plugins still there, forgets nothing, and a folder missing or empty (a card not
mounted yet, its empty mount point) says nothing at all. A forgotten switch no longer holds its plugin off.

Written after the tick that took a value up, on a thread of its own (an fsync took up to 120 ms here, more
than a tick, and longer on an SD card), and the plugin states that show it are published only once it is
written (`written`): what Home Assistant shows is on disk. Atomically (temporary file, fsync, rename), so
a crash or a power cut leaves the old file or the new one. A stop waits for the write under way and makes
the one still due. A file that cannot be read is logged and left aside: the daemon runs on the config
file alone, and the next value set replaces it.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import structlog

from pi_controller.contract import Rejected
from pi_controller.files import write_atomically
from pi_controller.keys import read_small
from pi_controller.observer import LoopObserver, TickReport
from pi_controller.plugins import folder as plugin_folder
from pi_controller.plugins.plugin_config import check_change

if TYPE_CHECKING:
    from pi_controller.config import PluginsSettings
    from pi_controller.plugins.sandbox import SandboxedPlugin

log = structlog.get_logger("pi_controller.operator")

FILE_NAME = "operator-values.json"
MAX_FILE_BYTES = 256 * 1024  # a few values per plugin; the operator bounds each value at 4 KiB
# How long the plugins folder must hold still (the same modules listed) before a plugin gone from it is forgotten:
# a redeploy's `rm -rf` and copy, caught halfway with other plugins still there, is no owner's word.
SETTLE_S = 60.0
Kept = dict[str, Any]  # {"value": what the operator set, "file": what the file said then (absent: nothing)}


class OperatorValues(LoopObserver):
    def __init__(self, directory: Path | None, monotonic: Callable[[], float] = time.monotonic):
        """`directory`: where the values are kept (None: nowhere); `monotonic`: the loop's clock, which times how
        long the plugins folder held still (`SETTLE_S`)."""
        self.path = directory / FILE_NAME if directory is not None else None
        self._monotonic = monotonic
        self.config: dict[str, dict[str, Kept]] = {}  # plugin -> key -> kept
        self.enabled: dict[str, Kept] = {}  # plugin -> kept
        self._changed = False
        self._writing: threading.Thread | None = None  # the write under way
        self._aside: dict[tuple[str, str], str] = {}  # (plugin, key) -> the module's sha256 it was said set aside for
        self._listed: frozenset[str] | None = None  # the plugins folder's modules, as last listed (`_relist`)
        self._still_since = 0.0  # when that listing was first seen
        self._gone: set[str] = set()  # plugins with values kept, gone from that listing, not named in the config
        self._folder: Path | None = None  # the plugins folder listed, and the plugins the config names (`_list`)
        self._named: set[str] = set()
        self._relisting: _Listing | None = None  # the folder listed again when a minute is up (`tick_done`)
        self._load()

    # -- from the operator, in the tick ----------------------------------------------------------

    def config_set(self, plugin: SandboxedPlugin, key: str, value: Any) -> None:
        self.config.setdefault(plugin.name, {})[key] = _kept(value, plugin.grant.config, key)
        self._changed = True

    def enabled_set(self, plugin: SandboxedPlugin, enabled: bool) -> None:
        self.enabled[plugin.name] = {"value": enabled, "file": True}  # a loaded plugin: enabled in the file
        self._changed = True

    # -- between two ticks: a start, a reload, a swap ---------------------------------------------

    def apply(self, plugins: Iterable[SandboxedPlugin], settings: PluginsSettings, disabled: set[str],
              folder: Path | None = None, listed: frozenset[str] | None = None) -> None:
        """The kept values onto the plugins as loaded now, and the operator's `disabled` set, by the rule: the
        plugins whose switch is kept off (one forgotten holds nothing off). `folder`: the plugins folder, whose
        modules, loaded or not, are `listed` (None: listed now; a folder not known, missing or empty: nothing is
        gone). The daemon lists it off the loop, with the plugins it loads: the folder may be on a hung mount."""
        self._list(folder, settings, listed)
        for name, kept in list(self.enabled.items()):
            in_file = settings.settings[name].enabled if name in settings.settings else True
            if kept["file"] != in_file:
                self._forget(name, "the config file changed it since", switch=True)
        off = {name for name, kept in self.enabled.items() if not kept["value"]}
        disabled.intersection_update(off)
        disabled.update(off)
        for plugin in plugins:
            own = settings.settings.get(plugin.name)
            values = {key: kept["value"] for key, kept in list(self.config.get(plugin.name, {}).items())
                      if self._still(plugin, key, kept, own is not None and key in own.config)}
            if values:
                plugin.set_config(values)
        self._save()

    def _list(self, folder: Path | None, settings: PluginsSettings, listed: frozenset[str] | None) -> None:
        """The folder listed again: the plugins gone from it, whose values go once it holds still (`_settled`)."""
        self._folder, self._named = folder, {*settings.settings, *settings.required}
        if self._relisting is not None:  # a listing under way from before is older than this one: not taken, but
            self._relisting.stale = True  # waited for (on a hung mount, one thread stuck, not one more a minute)
        self._relist(listed)
        self._settled()

    def _relist(self, modules: frozenset[str] | None = None) -> None:
        """The folder's `modules` (None: listed now) taken as the listing: None for a folder holding none, as a card
        not mounted yet, its empty mount point or a folder being copied back is no owner removing every plugin."""
        if modules is None and self._folder is not None:
            modules = plugin_folder.modules(self._folder)
        listed = (modules or None) if self._folder is not None else None
        if listed != self._listed:
            self._listed, self._still_since = listed, self._monotonic()
        self._gone = set() if listed is None else (set(self.config) | set(self.enabled)) - listed - self._named

    def _due(self) -> bool:
        """Whether plugins are gone from a folder that has held still for `SETTLE_S`, as last listed."""
        return bool(self._gone) and self._monotonic() - self._still_since >= SETTLE_S

    def _settled(self) -> None:
        """The values of the plugins gone from a folder that has held still for `SETTLE_S` are forgotten."""
        if self._due():
            for name in self._gone:
                self._forget(name, "the plugin left the plugins folder", list(self.config.get(name, {})),
                             switch=name in self.enabled)
            self._gone = set()

    def _still(self, plugin: SandboxedPlugin, key: str, kept: Kept, in_config_file: bool) -> bool:
        """Whether a kept value stands for `plugin` as loaded now: forgotten if the file changed it since, set
        aside (kept, not applied) while this version has no such key or refuses the value. `in_config_file`: the
        config file gives the key a value (not the manifest alone)."""
        grant = plugin.grant
        if key not in grant.config and key not in (grant.config_schema or {}):
            return self._set_aside(plugin, key, "this version has no such key")
        if key in grant.config and _kept(kept["value"], grant.config, key) != kept:  # the file says another value
            if "file" in kept or in_config_file:
                self._forget(plugin.name, "the config file changed it since", [key])
                return False
            # The file said nothing when the value was set, and a manifest's default came since: a default for
            # whoever set nothing, not the owner's word on this key. Kept as what the file says from now on.
            kept["file"] = grant.config[key]
            self._changed = True
        try:
            check_change(key, kept["value"], grant.config_schema, grant.config)
        except Rejected as exc:
            return self._set_aside(plugin, key, f"this version refuses it: {exc}")
        return True

    def _set_aside(self, plugin: SandboxedPlugin, key: str, why: str) -> bool:
        """Not applied to this version; said once for it, not at every swap of any plugin (`apply`)."""
        if self._aside.get((plugin.name, key)) != plugin.sha256:
            self._aside[plugin.name, key] = plugin.sha256
            log.info("operator_value_set_aside", plugin=plugin.name, key=key, reason=why)
        return False

    def _forget(self, plugin: str, why: str, keys: Iterable[str] = (), switch: bool = False) -> None:
        """`plugin`'s kept config values at `keys`, and its switch if `switch` (apart: a config key may be
        called `enabled` too), each said once; a plugin left with no value kept has no entry."""
        config = self.config.get(plugin, {})
        for key in keys:
            del config[key]
            self._aside.pop((plugin, key), None)
            log.info("operator_value_forgotten", plugin=plugin, key=key, reason=why)
        if switch:
            del self.enabled[plugin]
            log.info("operator_value_forgotten", plugin=plugin, key="enabled", reason=why)
        if not config:
            self.config.pop(plugin, None)
        self._changed = True

    # -- the file --------------------------------------------------------------------------------

    def tick_done(self, report: TickReport) -> None:
        if self._gone and self._due() and self._relisting is None and self._folder is not None:
            # Listed again first: no swap may have listed it since (plugins.watch off, a reload refused), and one
            # changed meanwhile starts the minute again. A listing a minute at most, while a plugin is gone, on a
            # thread of its own (the folder may be on a hung mount), taken at the first tick after it is done.
            self._relisting = _Listing(self._folder)
        listing = self._relisting
        if listing is not None and listing.done.is_set():
            self._relisting = None
            if listing.modules is not None and not listing.stale:
                # Only what the last swap found gone may go: a module removed since may be of a plugin still
                # running (plugins.watch off), whose values wait for the swap that unloads it.
                gone = self._gone
                self._relist(listing.modules)
                self._gone &= gone
                self._settled()
        self._save()

    def written(self) -> bool:
        """Whether every value taken up is on disk (or has no file to go to)."""
        writing = self._writing is not None and self._writing.is_alive()
        return self.path is None or not (self._changed or writing)

    def close(self) -> None:
        """At a stop: the write under way finished, and the one still due made."""
        if self._writing is not None:
            self._writing.join()
        self._writing = None
        self._save(wait=True)

    def _save(self, wait: bool = False) -> None:
        """The values as they are now, to the file, on a thread of its own unless `wait`; one write at
        a time: a change made meanwhile goes at the first call after it ends."""
        if self._writing is not None and not self._writing.is_alive():
            self._writing = None
        if not self._changed or self.path is None or self._writing is not None:
            return
        self._changed = False
        text = json.dumps({"config": self.config, "enabled": self.enabled}, indent=1, sort_keys=True)
        if wait:
            _write(self.path, text)
        else:
            self._writing = threading.Thread(target=_write, args=(self.path, text), name="operator-values")
            self._writing.start()

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            # a regular file's only: the open of a FIFO there would wait for a writer for good, before any tick
            data = json.loads(read_small(self.path, MAX_FILE_BYTES, "the operator's values"))
            config, enabled = data["config"], data["enabled"]
            if not _readable(config, enabled):
                raise ValueError("not what this daemon writes")
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a file anyone could edit: never a crash loop
            said = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)  # read_small's: no errno
            log.warning("operator_values_unreadable", file=str(self.path), error=said[:200],
                        note="running on the config file's values; the next value set replaces the file")
            return
        self.config, self.enabled = config, enabled
        log.info("operator_values_restored", file=str(self.path), plugins=sorted(set(config) | set(enabled)))


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, text.encode())
    except OSError as exc:  # a full or read-only card: the values stay in force until the process ends
        log.warning("operator_values_not_kept", file=str(path), error=str(exc))


class _Listing:
    """A plugins folder's modules, listed once on a thread of its own; `modules` None if the listing failed."""

    def __init__(self, folder: Path):
        self.modules: frozenset[str] | None = None
        self.stale = False  # a swap has listed the folder since it began: not to be taken
        self.done = threading.Event()
        # A daemon thread: one stuck on a hung mount must not hold the process at its exit.
        threading.Thread(target=self._list, args=(folder,), name="plugins-listing", daemon=True).start()

    def _list(self, folder: Path) -> None:
        try:
            self.modules = plugin_folder.modules(folder)
        finally:
            self.done.set()


def _kept(value: Any, file_config: Mapping[str, Any], key: str) -> Kept:
    return {"value": value, **({"file": file_config[key]} if key in file_config else {})}


def _readable(config: Any, enabled: Any) -> bool:
    """Whether the file's parts are what `_save` writes."""
    def kept(entry: Any) -> bool:
        return isinstance(entry, dict) and "value" in entry

    return (isinstance(config, dict) and isinstance(enabled, dict)
            and all(isinstance(keys, dict) and all(map(kept, keys.values())) for keys in config.values())
            and all(kept(entry) and "file" in entry for entry in enabled.values()))
