"""The plugins of one folder: loaded, replaced and removed as a whole between two ticks.

The set changes only in `PluginSet.apply`, between two ticks; what a change needs (reading files,
compiling, health checks) is done beforehand by `prepare`, off the event loop.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import extism
import structlog

from pi_controller.clock import Clock, SystemClock
from pi_controller.config import PluginsSettings
from pi_controller.names import PLUGIN_NAME_RULE, valid_plugin_name
from pi_controller.plugins import admission, manifest
from pi_controller.plugins import folder as plugin_folder
from pi_controller.plugins.backstop import Backstop
from pi_controller.plugins.host_functions import History, PluginHost
from pi_controller.plugins.manifest import Devices, Refused
from pi_controller.plugins.quarantine import Quarantine
from pi_controller.plugins.sandbox import PluginStatus, SandboxedPlugin
from pi_controller.plugins.wasm_gate import read_module
from pi_controller.readiness import Readiness

log = structlog.get_logger("pi_controller.plugins")


@dataclass
class Update:
    """What `prepare` found for some plugin names, applied by `apply` between two ticks."""

    loaded: dict[str, SandboxedPlugin] = field(default_factory=dict)  # new, or replacing a live one
    removed: set[str] = field(default_factory=set)  # its file is gone
    refused: dict[str, PluginStatus] = field(default_factory=dict)  # failed to load, or disabled
    current: set[str] = field(default_factory=set)  # its file is the live version, under the same terms
    listed: frozenset[str] | None = None  # the folder's modules, listed with them (None: not listed)

    def close(self) -> None:
        """Drop an update that will not be applied."""
        for plugin in self.loaded.values():
            plugin.close()


def _order(plugin: SandboxedPlugin) -> tuple[int, str]:
    return -plugin.priority, plugin.name


class PluginSet:
    """The plugins of one folder, in call order: highest priority first, then by name."""

    def __init__(self, settings: PluginsSettings, directory: Path, budget_ms: float, history: History | None = None,
                 clock: Clock | None = None, backstop: Backstop | None = None, devices: Devices | None = None,
                 role: str = "plugin", whence: str = ""):
        """`clock`: the loop's (real by default); the backstop follows it unless given. `devices`: what a
        grant may name (None: not checked). `role` names the events of its plugins ("shadow": shadow_loaded,
        shadow_unloaded..., never taken for the live ones). `whence`: where `budget_ms` comes from, said with
        each refusal for want of room ("": the config's `loop.plugin_budget`)."""
        self.role = role
        self.whence = whence
        self.settings = settings
        self.devices = devices
        self.directory = directory
        # Resolved where the set is built (a reload's off the event loop): the folder may be on a hung or slow mount,
        # and the fleet node tells the folder followed by it in its turn after a tick.
        self.resolved = directory.resolve()
        self.budget_ms = budget_ms
        self.clock = clock or SystemClock()
        self.backstop = backstop or Backstop(real=self.clock.real)
        self.history = history or History(settings.host.history_length)
        # Replaced whole, so a tick sees one version; a tuple the tick iterates with no call of ours (`__iter__`).
        self.members: tuple[SandboxedPlugin, ...] = ()
        self._by_name: dict[str, SandboxedPlugin] = {}  # the same, by name
        self.logs_to_extism = False  # whether any of them can write to libextism's log in a call that succeeds
        self._refused: dict[str, PluginStatus] = {}
        self._kept: dict[str, PluginStatus] = {}  # live plugins whose replacement was refused: its refusal
        self._waiting: dict[str, admission.Claim] = {}  # refused or unloaded for want of room in the tick
        self.on_room: Callable[[set[str]], None] | None = None  # told the names of those that would fit now
        self.generation = 0  # counts `adopt`s: an update prepared before one is stale
        # The folder's modules as listed off the loop for the last change (the kept values judge what is gone by
        # it): the folder may be on a hung or slow mount, and a listing in the gap would stop the ticks.
        self.listed: frozenset[str] = frozenset()

    def __iter__(self) -> Iterator[SandboxedPlugin]:
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)

    def _become(self, plugins: tuple[SandboxedPlugin, ...]) -> None:
        self.members, self._by_name = plugins, {p.name: p for p in plugins}
        self.logs_to_extism = any(p.logs_to_extism for p in plugins)

    def named(self, plugin: str) -> SandboxedPlugin | None:
        """The plugin of that name as loaded now; None if it is not."""
        return self._by_name.get(plugin)

    def granted(self, plugin: str, device: str) -> bool:
        """Whether `plugin`, as loaded now, may command `device`; True for one not loaded (its absence is
        its own reason to lose what it owns: see `safety.ownership`)."""
        loaded = self.named(plugin)
        return loaded is None or loaded.grant.actuators is None or device in loaded.grant.actuators

    def readiness(self) -> Readiness:
        """How many of the plugins that should run do: the folder's, and those the config names."""
        return Readiness.of(self.status, self.settings.named())

    @property
    def status(self) -> dict[str, PluginStatus]:
        """Every plugin of the folder by name: loaded, quarantined, disabled or failed, with why."""
        result = dict(self._refused)
        result.update((p.name, p.status(self._kept.get(p.name))) for p in self.members)
        return result

    def lost_to(self, other: PluginSet) -> dict[str, str]:
        """The plugins running here that `other`, the folder loaded under another config, refuses: name -> why.
        A version kept over a refused replacement counts: it runs, and the file in its place would not load."""
        lost = {}
        for plugin in self.members:
            status = other.status.get(plugin.name)
            if status is not None and status.state == "failed":
                lost[plugin.name] = status.reason or "unknown"
        return lost

    def adopt(self, loaded: PluginSet) -> None:
        """Become the set a config reload `loaded` (call between two ticks), keeping this set's identity
        for all that holds it. The quarantine state of each plugin whose file did not change carries
        on, under the new quarantine settings: a reload is no way out of quarantine; a new file is (see
        `prepare`). The plugins it replaces are closed."""
        before = {p.name: p for p in self.members}
        for plugin in loaded:
            previous = before.get(plugin.name)
            if previous is not None and previous.sha256 == plugin.sha256:
                previous.quarantine.settings = loaded.settings.quarantine
                plugin.quarantine = previous.quarantine
        self.settings, self.directory, self.resolved = loaded.settings, loaded.directory, loaded.resolved
        self.budget_ms, self.whence = loaded.budget_ms, loaded.whence
        self.devices = loaded.devices
        self.history, self.backstop = loaded.history, loaded.backstop
        self.listed = loaded.listed
        self._become(loaded.members)
        self._refused, self._kept, self._waiting = loaded._refused, loaded._kept, loaded._waiting
        loaded._become(())
        self.generation += 1
        for plugin in before.values():
            plugin.close()

    def load_all(self) -> None:
        """Load every `*.wasm` in the folder, by rank (`admission`), so that when the time budget is full
        it is a low-ranked plugin that is left out; a plugin that fails is reported and skipped."""
        if not self.directory.is_dir():
            log.error("plugins_directory_missing", directory=str(self.directory))
            return
        names = self.listed = plugin_folder.modules(self.directory)
        for name in sorted(set(self.settings.settings) - names):
            log.warning("plugin_configured_but_missing", plugin=name, directory=str(self.directory))
        self.apply(self.prepare(names))
        log.info("plugins_loaded", count=len(self.members), directory=str(self.directory),
                 names=[p.name for p in self.members])

    def prepare(self, names: Iterable[str]) -> Update:
        """Read and compile what changed among `names`; safe on any thread, touches nothing live."""
        update = Update()
        live = {p.name: p for p in self.members}
        for name in names:
            path = self.directory / f"{name}.wasm"
            own = self.settings.settings.get(name)
            if not valid_plugin_name(name):
                # Not even in the status: the name goes into log keys and MQTT topics as it is.
                log.error("plugin_name_invalid", file=str(path)[:300], valid=PLUGIN_NAME_RULE)
            elif not os.path.lexists(path):  # a FIFO or a dangling link is not gone: the gate refuses it
                update.removed.add(name)
            elif own is not None and not own.enabled:
                update.refused[name] = PluginStatus("disabled")
            else:
                self._prepare_one(name, path, live.get(name), update)
        return update

    def _prepare_one(self, name: str, path: Path, live: SandboxedPlugin | None, update: Update) -> None:
        digest = None  # of the module, once read: a refused replacement is told by it (`PluginStatus.refused_sha256`)
        try:
            wasm = read_module(path, self.directory, self.settings.ceilings.max_file_bytes)
            digest = hashlib.sha256(wasm).hexdigest()
            terms = manifest.terms(name, path, wasm, self.settings, self.devices)
            if live is not None and live.grant == terms and live.sha256 == digest:
                update.current.add(name)  # the same plugin under the same terms: nothing to swap
                return
            host = PluginHost(name, terms.sensors, self.history, self.settings.host, self.clock.monotonic)
            update.loaded[name] = SandboxedPlugin(name, wasm, terms, Quarantine(name, self.settings.quarantine), host,
                                                  self.backstop)
        except (OSError, extism.Error, Refused) as exc:
            update.refused[name] = PluginStatus("failed", str(exc)[:500], refused_sha256=digest)
        except Exception as exc:  # whatever else a dropped file holds (a manifest in Latin-1...), it fails alone
            update.refused[name] = PluginStatus("failed", f"{type(exc).__name__}: {exc}"[:500], refused_sha256=digest)

    def apply(self, update: Update) -> None:
        """Swap in what `prepare` found. Call between two ticks: the tick thread is idle."""
        if update.listed is not None:
            self.listed = update.listed
        live = {p.name: p for p in self.members}
        retired: list[SandboxedPlugin] = []
        for name in update.current:
            self._withdrawn(name)
        for name in update.removed:
            self._refused.pop(name, None)
            self._kept.pop(name, None)
            self._waiting.pop(name, None)
            if name in live:
                retired.append(live.pop(name))
                log.info(f"{self.role}_unloaded", plugin=name, reason=f"its file left {self.directory}")
        for name, status in update.refused.items():
            self._waiting.pop(name, None)
            self._refuse(name, status, live, retired)
        for plugin in sorted(update.loaded.values(), key=lambda p: self.claim(p).rank):
            self._admit(plugin, live, retired)
        self._become(tuple(sorted(live.values(), key=_order)))
        for plugin in retired:
            plugin.close()
        if self._waiting:  # a plugin removed, refused or replaced by one with a smaller share leaves room
            self.made_room()

    def _withdrawn(self, name: str) -> None:
        """The file is the running version again: a replacement refused before, and its wait for room, are over
        (left waiting, it would be found to fit whenever room was made, and reloaded as the same, for good)."""
        self._waiting.pop(name, None)
        if self._kept.pop(name, None) is not None:
            log.info(f"{self.role}_replacement_withdrawn", plugin=name, note="its file is the running version")

    def claim(self, plugin: SandboxedPlugin) -> admission.Claim:
        """`plugin`'s claim on the tick's time budget."""
        return admission.Claim(plugin.name, plugin.grant.timeout_ms, plugin.priority,
                               self.settings.configured(plugin.name), plugin.quarantine.quarantined)

    def rebudget(self, budget_ms: float, whence: str) -> None:
        """The time budget becomes `budget_ms` (call between two ticks; `whence` says where it comes from): the
        plugins that no longer fit, the lowest ranked first, are unloaded to wait for room; those waiting that fit
        now are handed to `on_room`."""
        self.whence = whence
        if budget_ms == self.budget_ms:
            return
        self.budget_ms = budget_ms
        out = admission.refused_in_rank_order((self.claim(p) for p in self.members), budget_ms)
        for name, why in out.items():
            plugin = self._by_name[name]
            self._waiting[name] = self.claim(plugin)
            self._kept.pop(name, None)
            reason = f"unloaded: {self._no_room(why)}"[:500]
            self._refused[name] = PluginStatus("failed", reason, refused_sha256=plugin.sha256)
            log.warning(f"{self.role}_unloaded", plugin=name, reason=reason)
        if out:
            retired = [p for p in self.members if p.name in out]
            self._become(tuple(p for p in self.members if p.name not in out))
            for plugin in retired:
                plugin.close()
        if self._waiting:
            self.made_room()

    def _no_room(self, why: str) -> str:
        """Why a plugin has no room in the budget, and where the budget comes from unless it is the config's."""
        return f"{why} ({self.whence})" if self.whence else why

    def made_room(self) -> None:
        """A plugin was quarantined, unloaded, refused or given a smaller share: the plugins refused for want
        of room that would fit now are handed to `on_room` (the watcher loads them again)."""
        live = [self.claim(p) for p in self.members]
        fitting = set()
        for name, claim in self._waiting.items():
            try:
                admission.displaced(claim, live, self.budget_ms)
            except admission.NoRoom:
                continue
            fitting.add(name)
        if fitting and self.on_room is not None:
            self.on_room(fitting)

    def _refuse(self, name: str, status: PluginStatus, live: dict[str, SandboxedPlugin],
                retired: list[SandboxedPlugin]) -> None:
        if status.state == "failed" and name in live:  # a bad replacement: the running version stays
            self._kept[name] = status
            log.error(f"{self.role}_replacement_refused", plugin=name, reason=status.reason,
                      kept_sha256=live[name].sha256[:12])
            return
        if name in live:
            retired.append(live.pop(name))
        self._kept.pop(name, None)
        self._refused[name] = status
        if status.state == "disabled":
            log.info(f"{self.role}_disabled", plugin=name)
        else:
            log.error(f"{self.role}_load_failed", plugin=name, reason=status.reason)

    def _admit(self, plugin: SandboxedPlugin, live: dict[str, SandboxedPlugin],
               retired: list[SandboxedPlugin]) -> None:
        """Give `plugin` its share of the tick's time budget, by rank (`admission`): those it outranks, and
        quarantined ones, make room for it; refused, it waits for room (`made_room`)."""
        claim = self.claim(plugin)
        try:
            displaced = admission.displaced(claim, (self.claim(p) for p in live.values()), self.budget_ms)
        except admission.NoRoom as exc:
            retired.append(plugin)
            self._waiting[plugin.name] = claim
            return self._refuse(plugin.name, PluginStatus("failed", self._no_room(str(exc))[:500],
                                                          refused_sha256=plugin.sha256), live, retired)
        for other in displaced:
            gone = live.pop(other.name)
            retired.append(gone)
            self._kept.pop(other.name, None)
            self._waiting[other.name] = other
            reason = (f"unloaded{f' while quarantined ({gone.quarantine.reason})' if other.resting else ''}: its "
                      f"share of the tick went to {claim.describe()}")
            self._refused[other.name] = PluginStatus("failed", reason[:500], refused_sha256=gone.sha256)
            log.warning(f"{self.role}_unloaded", plugin=other.name, reason=reason[:500])
        self._waiting.pop(plugin.name, None)
        previous = live.get(plugin.name)
        if previous is not None:
            retired.append(previous)
        live[plugin.name] = plugin
        self._refused.pop(plugin.name, None)
        self._kept.pop(plugin.name, None)
        terms = plugin.grant
        log.info(f"{self.role}_replaced" if previous else f"{self.role}_loaded", plugin=plugin.name,
                 sha256=plugin.sha256[:12], version=terms.manifest.version or None, priority=terms.priority,
                 memory_pages=terms.memory_pages, timeout_ms=terms.timeout_ms, fuel=terms.fuel,
                 **({"signed_by": terms.signer} if terms.signer else {}),
                 **({"wasi": True, "paths": dict(terms.allowed_paths)} if terms.wasi else {}))

    def close(self) -> None:
        for plugin in self.members:
            plugin.close()
        self._become(())
