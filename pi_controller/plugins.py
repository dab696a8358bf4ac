"""Sandboxed control plugins: one Extism instance per plugin, and the set of them in a folder.

This module knows nothing of pins or MQTT: it turns a context into raw output bytes, or an error that
says why, within the plugin's memory, time and output limits. Each instance is called from one thread
only (the tick thread): the SDK returns another call's output when an instance is shared.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import extism
import structlog

from pi_controller.config import PluginDefaults, PluginSettings, PluginsSettings
from pi_controller.contract import encode_config

log = structlog.get_logger("pi_controller.plugins")

ENTRY_POINT = "control_logic"


@dataclass(frozen=True)
class Limits:
    memory_pages: int
    timeout_ms: int
    max_output_bytes: int
    priority: int

    @classmethod
    def resolve(cls, own: PluginSettings | None, defaults: PluginDefaults) -> Limits:
        def pick(name: str) -> Any:
            value = getattr(own, name, None) if own is not None else None
            return getattr(defaults, name) if value is None else value

        return cls(pick("memory_pages"), pick("timeout_ms"), pick("max_output_bytes"), pick("priority"))


class PluginCallError(Exception):
    """A call that produced no usable output; `kind` is "timeout", "out_of_memory", "trap",
    "output_too_large" or "error_return" (the plugin reported an error of its own)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind

    @classmethod
    def from_extism(cls, exc: extism.Error) -> PluginCallError:
        message = str(exc) or "error without a message"
        if message == "timeout":
            return cls("timeout", message)
        if message == "oom" or "failed to allocate" in message:
            return cls("out_of_memory", message)
        if message.startswith("error while executing"):
            return cls("trap", message)
        return cls("error_return", message)


class SandboxedPlugin:
    """One loaded `.wasm`: no WASI, no network, no host functions, bounded memory and time."""

    def __init__(self, name: str, wasm: bytes, limits: Limits, config: Mapping[str, Any]):
        self.name = name
        self.limits = limits
        self.sha256 = hashlib.sha256(wasm).hexdigest()
        self.config_suffix = encode_config(config)
        manifest = {
            "wasm": [{"data": wasm}],
            "memory": {"max_pages": limits.memory_pages},
            "timeout_ms": limits.timeout_ms,
        }
        self._instance = extism.Plugin(manifest, wasi=False, functions=[])
        if not self._instance.function_exists(ENTRY_POINT):
            raise extism.Error(f"the module does not export '{ENTRY_POINT}'")

    @property
    def priority(self) -> int:
        return self.limits.priority

    def call(self, context_prefix: bytes) -> bytes:
        try:
            output: bytes = self._instance.call(ENTRY_POINT, context_prefix + self.config_suffix)
        except extism.Error as exc:
            raise PluginCallError.from_extism(exc) from exc
        if len(output) > self.limits.max_output_bytes:
            raise PluginCallError("output_too_large", f"output of {len(output)} bytes exceeds max_output_bytes "
                                  f"{self.limits.max_output_bytes}")
        return output

    def close(self) -> None:
        self._instance.__exit__(None, None, None)


@dataclass(frozen=True)
class PluginStatus:
    state: str  # "loaded", "disabled" or "failed"
    reason: str | None = None
    sha256: str | None = None


class PluginSet:
    """The plugins of one folder, in call order: highest priority first, then by name."""

    def __init__(self, settings: PluginsSettings, directory: Path, budget_ms: float):
        self.settings = settings
        self.directory = directory
        self.budget_ms = budget_ms
        self.status: dict[str, PluginStatus] = {}
        self._plugins: list[SandboxedPlugin] = []

    def __iter__(self) -> Iterator[SandboxedPlugin]:
        return iter(self._plugins)

    def __len__(self) -> int:
        return len(self._plugins)

    def load_all(self) -> None:
        """Load every `*.wasm` in the folder, highest priority first, so that when the time budget is
        full it is a low-priority plugin that is left out; a plugin that fails is reported and skipped."""
        if not self.directory.is_dir():
            log.error("plugins_directory_missing", directory=str(self.directory))
            return
        files = {path.stem: path for path in self.directory.glob("*.wasm")}
        for name in sorted(set(self.settings.settings) - set(files)):
            log.warning("plugin_configured_but_missing", plugin=name, directory=str(self.directory))
        candidates = [(Limits.resolve(self.settings.settings.get(name), self.settings.defaults), name)
                      for name in files]
        for limits, name in sorted(candidates, key=lambda c: (-c[0].priority, c[1])):
            self._load(files[name], limits)
        log.info("plugins_loaded", count=len(self._plugins), directory=str(self.directory),
                 names=[p.name for p in self._plugins])

    def _load(self, path: Path, limits: Limits) -> None:
        name = path.stem
        own = self.settings.settings.get(name)
        if own is not None and not own.enabled:
            self.status[name] = PluginStatus("disabled")
            log.info("plugin_disabled", plugin=name)
            return
        spent = sum(p.limits.timeout_ms for p in self._plugins)
        if spent + limits.timeout_ms > self.budget_ms:
            return self._failed(name, f"timeout_ms {limits.timeout_ms} does not fit the tick: plugins of higher "
                                      f"priority already take {spent} of the {self.budget_ms:g} ms plugin budget")
        try:
            plugin = SandboxedPlugin(name, path.read_bytes(), limits, own.config if own else {})
        except (OSError, extism.Error) as exc:
            return self._failed(name, str(exc))
        self._plugins.append(plugin)
        self.status[name] = PluginStatus("loaded", sha256=plugin.sha256)
        log.info("plugin_loaded", plugin=name, sha256=plugin.sha256[:12], priority=limits.priority,
                 memory_pages=limits.memory_pages, timeout_ms=limits.timeout_ms)

    def _failed(self, name: str, reason: str) -> None:
        self.status[name] = PluginStatus("failed", reason)
        log.error("plugin_load_failed", plugin=name, reason=reason)

    def close(self) -> None:
        for plugin in self._plugins:
            plugin.close()
        self._plugins.clear()
