"""Sandboxed control plugins: one Extism instance per plugin, and the set of them in a folder.

This module knows nothing of pins or MQTT: it turns a context into raw output bytes, or an error that
says why, within the plugin's grant (memory, fuel, time, output, vars, hosts; see `manifest`). Each
instance is called from one thread only (the tick thread): the SDK returns another call's output when
an instance is shared. The set changes only in `PluginSet.apply`, between two ticks; what a change
needs (reading files, compiling, health checks) is done beforehand by `prepare`, off the event loop.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import extism
import structlog
from extism.extism import CompiledPlugin, _ffi

from pi_controller.backstop import Backstop
from pi_controller.clock import Clock, SystemClock
from pi_controller.config import PluginsSettings
from pi_controller.contract import READINGS_KEY, Command, Rejection, encode_config, encode_readings
from pi_controller.extism_log import router
from pi_controller.host_functions import History, PluginHost
from pi_controller.manifest import Grant, Refused, grant, load_manifest
from pi_controller.quarantine import Guard
from pi_controller.schema import ID_PATTERN
from pi_controller.sensors import Reading
from pi_controller.wasm_compile import compile_module
from pi_controller.wasm_gate import read_module, trial

log = structlog.get_logger("pi_controller.plugins")

ENTRY_POINT = "control_logic"
HEALTH_CHECK = "health_check"  # optional export: called once at load; an error refuses the plugin

# Failures after which the instance is rebuilt: Extism keeps an instance whose call trapped or was
# stopped, and a guest without our PDK's stack reset would keep the leaked stack (and an instance
# that hit its memory limit would keep all that memory) on every later call. The plugin's vars go
# with it: the error says so (`reset`), and the loop counts it.
_REBUILD_AFTER = frozenset({"trap", "stalled", "out_of_memory", "out_of_fuel", "host_call_limit"})


class PluginCallError(Exception):
    """A call that produced no usable output; `kind` is "out_of_fuel", "out_of_memory", "trap",
    "host_call_limit", "output_too_large", "error_return" (the plugin reported an error of its own),
    or "stalled" (it ran past its wall-clock backstop: the machine's doing, not the plugin's; see
    `backstop`). `reset`: its instance was rebuilt, so its vars start empty again."""

    def __init__(self, kind: str, message: str, reset: bool = False):
        super().__init__(message)
        self.kind = kind
        self.reset = reset

    @property
    def plugin_s_fault(self) -> bool:
        return self.kind != "stalled"

    @classmethod
    def from_extism(cls, exc: extism.Error, reason: str | None, terms: Grant, backstop_ms: int) -> PluginCallError:
        message = str(exc) or "error without a message"
        if message == "timeout":
            return cls("stalled", f"stalled: the call ran past its {backstop_ms} ms wall-clock backstop, far "
                                  f"beyond what fuel {terms.fuel} costs on this machine: the machine or a host "
                                  "function was slow")
        if message == "plugin ran out of fuel":
            return cls("out_of_fuel", f"ran out of fuel: more than {terms.fuel} instructions in one call")
        if message == "oom" or "failed to allocate" in message:
            return cls("out_of_memory", f"oom: memory would pass memory_pages {terms.memory_pages} "
                                        f"({terms.memory_pages * 64} KiB)")
        if message.startswith("error while executing"):
            return cls("trap", reason or message)
        return cls("error_return", message)


def compile_plugin(wasm: bytes, terms: Grant, host: Any, backstop_ms: int) -> CompiledPlugin:
    """A compiled module under `terms`, with a fuel limit (the SDK's constructor has none) and our
    host functions bound to `host` (a cffi handle of its PluginHost): WASI and files only as granted,
    no network beyond `allowed_hosts`. Tried first in a child process (`wasm_gate.trial`)."""
    manifest = {
        "memory": {"max_pages": terms.memory_pages, "max_var_bytes": terms.max_var_bytes,
                   "max_http_response_bytes": terms.max_http_response_bytes},
        "timeout_ms": backstop_ms,  # against a stall only: fuel is the budget (see `backstop`)
        "allowed_hosts": list(terms.allowed_hosts),
        # Extism config holds strings only: other values go as their JSON text.
        "config": {k: v if isinstance(v, str) else json.dumps(v) for k, v in terms.config.items()},
        **({"allowed_paths": dict(terms.allowed_paths)} if terms.allowed_paths else {}),
    }
    # The module spliced in as bytes: one copy of its base64 rather than three (str, JSON, bytes).
    data = b'{"wasm":[{"data":"' + base64.b64encode(wasm) + b'"}],' + json.dumps(manifest).encode()[1:]
    trial(data, terms.wasi, terms.fuel)
    return compile_module(data, terms.wasi, terms.fuel, host)


class SandboxedPlugin:
    """One loaded `.wasm` under its grant, with its quarantine guard."""

    def __init__(self, name: str, wasm: bytes, terms: Grant, guard: Guard, host: PluginHost,
                 backstop: Backstop | None = None):
        self.name = name
        self.grant = terms
        self.backstop_ms = (backstop or Backstop()).ms(terms.fuel, terms.timeout_ms)
        self.guard = guard
        self.host = host
        self._host_handle = _ffi.new_handle(host)  # what the host functions get: alive as long as we are
        self.sha256 = hashlib.sha256(wasm).hexdigest()
        if terms.sha256 is not None and terms.sha256 != self.sha256:
            raise Refused(f"sha256 {self.sha256} is not the pinned {terms.sha256}")
        self.config_suffix = encode_config(terms.config)
        self._compiled = compile_plugin(wasm, terms, self._host_handle, self.backstop_ms)
        try:
            self._instance, self._id = self._instantiate()
        except extism.Error as exc:
            self._compiled.__del__()
            if "wasi_snapshot_preview1" in str(exc) and not terms.wasi:
                raise Refused(f"{exc} (the module needs WASI, which is not granted: wasi: true in its "
                              "manifest or settings, within plugins.ceilings.allow_wasi)") from exc
            raise
        try:
            self._check_exports()
        except BaseException:
            self.close()
            raise

    @property
    def priority(self) -> int:
        return self.grant.priority

    def _instantiate(self) -> tuple[extism.Plugin, str]:
        instance = extism.Plugin(self._compiled)
        instance_id = str(instance.id)
        router().register(instance_id, self.name, self.host.budget)
        self.host.cancel = instance.cancel_handle().cancel
        return instance, instance_id

    def _check_exports(self) -> None:
        if not self._instance.function_exists(ENTRY_POINT):
            raise Refused(f"the module does not export '{ENTRY_POINT}'")
        if self._instance.function_exists(HEALTH_CHECK):
            try:
                self._invoke(HEALTH_CHECK, b"")
            except PluginCallError as exc:
                raise Refused(f"{HEALTH_CHECK} failed: {exc}") from exc

    def call(self, context: bytes, tick: int | None = None) -> bytes:
        """One tick: `context` is the context without its config (`contract.encode_context`)."""
        output = self._invoke(ENTRY_POINT, context + self.config_suffix, tick)
        router().drain()  # 0.75 us: other lines are logged now, and libextism's buffer never grows
        if len(output) > self.grant.max_output_bytes:
            raise PluginCallError("output_too_large", f"output of {len(output)} bytes exceeds max_output_bytes "
                                  f"{self.grant.max_output_bytes}")
        return output

    def _invoke(self, function: str, data: bytes, tick: int | None = None) -> bytes:
        self.host.start_call(tick)
        try:
            output: bytes = self._instance.call(function, data)
        except extism.Error as exc:
            error = self._call_error(exc)
            if error.kind in _REBUILD_AFTER:
                self._rebuild()
                error.reset = True
            raise error from exc
        if self.host.over_budget:  # it ended before the cancel took: the verdict must not depend on that
            self._rebuild()
            error = self._call_error(extism.Error("cancelled"))
            error.reset = True
            raise error
        return output

    def _call_error(self, exc: extism.Error) -> PluginCallError:
        reason = router().reason(self._id)
        if self.host.over_budget:  # we cancelled it: what shows is a timeout or a trap
            return PluginCallError("host_call_limit", f"cancelled: more than {self.host.settings.host_calls_per_call} "
                                   "host function calls in one call (plugins.host.host_calls_per_call)")
        return PluginCallError.from_extism(exc, reason, self.grant, self.backstop_ms)

    def _rebuild(self) -> None:
        """A fresh instance of the same compiled module (~0.4 ms); its vars start empty again."""
        self._free_instance()
        self._instance, self._id = self._instantiate()

    def view(self, context: bytes, readings: Sequence[Reading]) -> bytes:
        """The context as this plugin may see it: only the readings of its declared sensors."""
        if self.grant.sensors is None:
            return context
        everything = encode_readings(readings)
        mine = encode_readings(r for r in readings if r.sensor_id in self.grant.sensors)
        return READINGS_KEY + mine + context[len(READINGS_KEY) + len(everything):]

    def screen(self, commands: list[Command], rejections: list[Rejection]
               ) -> tuple[list[Command], list[Rejection]]:
        """Valid commands split by capability: one to an actuator not granted is rejected."""
        allowed = self.grant.actuators
        if allowed is None:
            return commands, rejections
        kept = [c for c in commands if c.device_id in allowed]
        refused = [Rejection(self.name, c.device_id, "forbidden_device",
                             f"'{c.device_id}' is not among the actuators granted to this plugin "
                             f"({', '.join(sorted(allowed)) or 'none'})")
                   for c in commands if c.device_id not in allowed]
        return kept, rejections + refused

    def status(self, kept_because: str | None = None) -> PluginStatus:
        if self.guard.quarantined:
            return PluginStatus("quarantined", self.guard.reason, self.sha256, self.grant.manifest.version or None)
        reason = f"kept this version: its replacement was refused: {kept_because}" if kept_because else None
        return PluginStatus("loaded", reason, self.sha256, self.grant.manifest.version or None)

    def _free_instance(self) -> None:
        router().forget(self._id)
        self._instance.__exit__(None, None, None)

    def close(self) -> None:
        self._free_instance()
        self._compiled.__del__()


@dataclass(frozen=True)
class PluginStatus:
    state: str  # "loaded", "quarantined", "disabled" or "failed"
    reason: str | None = None
    sha256: str | None = None
    version: str | None = None


@dataclass
class Update:
    """What `prepare` found for some plugin names, applied by `apply` between two ticks."""

    loaded: dict[str, SandboxedPlugin] = field(default_factory=dict)  # new, or replacing a live one
    removed: set[str] = field(default_factory=set)  # its file is gone
    refused: dict[str, PluginStatus] = field(default_factory=dict)  # failed to load, or disabled

    def close(self) -> None:
        """Drop an update that will not be applied."""
        for plugin in self.loaded.values():
            plugin.close()


RESERVED = ("operator", "safety")  # what logs and arbitration call commands that come from us
NAME_RULE = "1 to 64 letters, digits, '_' or '-', and not 'operator' or 'safety'"


def valid_name(name: str) -> bool:
    return re.fullmatch(ID_PATTERN, name) is not None and name not in RESERVED


def _order(plugin: SandboxedPlugin) -> tuple[int, str]:
    return -plugin.priority, plugin.name


class PluginSet:
    """The plugins of one folder, in call order: highest priority first, then by name."""

    def __init__(self, settings: PluginsSettings, directory: Path, budget_ms: float, history: History | None = None,
                 clock: Clock | None = None, backstop: Backstop | None = None):
        """`clock`: the loop's (real by default); the backstop follows it unless given."""
        self.settings = settings
        self.directory = directory
        self.budget_ms = budget_ms
        self.clock = clock or SystemClock()
        self.backstop = backstop or Backstop(real=self.clock.real)
        self.history = history or History(settings.host.history_length)
        self._plugins: tuple[SandboxedPlugin, ...] = ()  # replaced whole, so a tick sees one version
        self._refused: dict[str, PluginStatus] = {}
        self._kept: dict[str, str] = {}  # live plugins whose replacement was refused, and why

    def __iter__(self) -> Iterator[SandboxedPlugin]:
        return iter(self._plugins)

    def __len__(self) -> int:
        return len(self._plugins)

    @property
    def status(self) -> dict[str, PluginStatus]:
        """Every plugin of the folder by name: loaded, quarantined, disabled or failed, with why."""
        result = dict(self._refused)
        result.update((p.name, p.status(self._kept.get(p.name))) for p in self._plugins)
        return result

    def inherit(self, old: PluginSet) -> None:
        """What a config reload keeps of the set this one replaces (call between two ticks): the
        quarantine state of each plugin whose file did not change, now under the new quarantine
        settings. A reload is no way out of quarantine; a new file is (see `prepare`)."""
        before = {p.name: p for p in old}
        for plugin in self._plugins:
            previous = before.get(plugin.name)
            if previous is not None and previous.sha256 == plugin.sha256:
                previous.guard.settings = self.settings.quarantine
                plugin.guard = previous.guard

    def record(self, readings: Iterable[Reading]) -> None:
        """This tick's readings, for the plugins that read history (`host_functions`)."""
        self.history.record(readings)

    def load_all(self) -> None:
        """Load every `*.wasm` in the folder, highest priority first, so that when the time budget is
        full it is a low-priority plugin that is left out; a plugin that fails is reported and skipped."""
        if not self.directory.is_dir():
            log.error("plugins_directory_missing", directory=str(self.directory))
            return
        names = {path.stem for path in self.directory.glob("*.wasm")}
        for name in sorted(set(self.settings.settings) - names):
            log.warning("plugin_configured_but_missing", plugin=name, directory=str(self.directory))
        self.apply(self.prepare(names))
        log.info("plugins_loaded", count=len(self._plugins), directory=str(self.directory),
                 names=[p.name for p in self._plugins])

    def prepare(self, names: Iterable[str]) -> Update:
        """Read and compile what changed among `names`; safe on any thread, touches nothing live."""
        update = Update()
        live = {p.name: p for p in self._plugins}
        for name in names:
            path = self.directory / f"{name}.wasm"
            own = self.settings.settings.get(name)
            if not valid_name(name):
                # Not even in the status: the name goes into log keys and MQTT topics as it is.
                log.error("plugin_name_invalid", file=str(path)[:300], valid=NAME_RULE)
            elif not os.path.lexists(path):  # a FIFO or a dangling link is not gone: the gate refuses it
                update.removed.add(name)
            elif own is not None and not own.enabled:
                update.refused[name] = PluginStatus("disabled")
            else:
                self._prepare_one(name, path, live.get(name), update)
        return update

    def _prepare_one(self, name: str, path: Path, live: SandboxedPlugin | None, update: Update) -> None:
        try:
            wasm = read_module(path, self.directory, self.settings.ceilings.max_file_bytes)
            terms = grant(name, load_manifest(path), self.settings)
            if live is not None and live.grant == terms and live.sha256 == hashlib.sha256(wasm).hexdigest():
                return  # the same plugin under the same terms: nothing to swap
            host = PluginHost(name, terms.sensors, self.history, self.settings.host, self.clock.monotonic)
            update.loaded[name] = SandboxedPlugin(name, wasm, terms, Guard(name, self.settings.quarantine), host,
                                                  self.backstop)
        except (OSError, extism.Error, Refused) as exc:
            update.refused[name] = PluginStatus("failed", str(exc)[:500])
        except Exception as exc:  # whatever else a dropped file holds (a manifest in Latin-1...), it fails alone
            update.refused[name] = PluginStatus("failed", f"{type(exc).__name__}: {exc}"[:500])

    def apply(self, update: Update) -> None:
        """Swap in what `prepare` found. Call between two ticks: the tick thread is idle."""
        live = {p.name: p for p in self._plugins}
        retired: list[SandboxedPlugin] = []
        for name in update.removed:
            self._refused.pop(name, None)
            self._kept.pop(name, None)
            if name in live:
                retired.append(live.pop(name))
                log.info("plugin_unloaded", plugin=name, reason="its file is gone")
        for name, status in update.refused.items():
            self._refuse(name, status, live, retired)
        for plugin in sorted(update.loaded.values(), key=_order):
            self._admit(plugin, live, retired)
        self._plugins = tuple(sorted(live.values(), key=_order))
        for plugin in retired:
            plugin.close()

    def _refuse(self, name: str, status: PluginStatus, live: dict[str, SandboxedPlugin],
                retired: list[SandboxedPlugin]) -> None:
        if status.state == "failed" and name in live:  # a bad replacement: the running version stays
            self._kept[name] = status.reason or "unknown"
            log.error("plugin_replacement_refused", plugin=name, reason=status.reason,
                      kept_sha256=live[name].sha256[:12])
            return
        if name in live:
            retired.append(live.pop(name))
        self._kept.pop(name, None)
        self._refused[name] = status
        if status.state == "disabled":
            log.info("plugin_disabled", plugin=name)
        else:
            log.error("plugin_load_failed", plugin=name, reason=status.reason)

    def _admit(self, plugin: SandboxedPlugin, live: dict[str, SandboxedPlugin],
               retired: list[SandboxedPlugin]) -> None:
        """Give `plugin` its share of the tick's time budget. Healthy plugins hold their shares; a
        quarantined one gives its share up to a plugin that would not fit otherwise."""
        others = [p for p in live.values() if p.name != plugin.name]
        spent = sum(p.grant.timeout_ms for p in others if not p.guard.quarantined)
        if spent + plugin.grant.timeout_ms > self.budget_ms:
            retired.append(plugin)
            reason = (f"timeout_ms {plugin.grant.timeout_ms} does not fit the tick: the plugins already loaded "
                      f"take {spent} of the {self.budget_ms:g} ms plugin budget")
            return self._refuse(plugin.name, PluginStatus("failed", reason), live, retired)
        for resting in sorted((p for p in others if p.guard.quarantined), key=_order, reverse=True):
            if sum(p.grant.timeout_ms for p in live.values() if p.name != plugin.name) + plugin.grant.timeout_ms \
                    <= self.budget_ms:
                break
            retired.append(live.pop(resting.name))
            self._kept.pop(resting.name, None)
            reason = f"unloaded while quarantined ({resting.guard.reason}): its time budget went to {plugin.name}"
            self._refused[resting.name] = PluginStatus("failed", reason[:500])
            log.warning("plugin_unloaded", plugin=resting.name, reason=reason[:500])
        previous = live.get(plugin.name)
        if previous is not None:
            retired.append(previous)
        live[plugin.name] = plugin
        self._refused.pop(plugin.name, None)
        self._kept.pop(plugin.name, None)
        terms = plugin.grant
        log.info("plugin_replaced" if previous else "plugin_loaded", plugin=plugin.name,
                 sha256=plugin.sha256[:12], version=terms.manifest.version or None, priority=terms.priority,
                 memory_pages=terms.memory_pages, timeout_ms=terms.timeout_ms, fuel=terms.fuel,
                 **({"wasi": True, "paths": dict(terms.allowed_paths)} if terms.wasi else {}))

    def close(self) -> None:
        for plugin in self._plugins:
            plugin.close()
        self._plugins = ()
