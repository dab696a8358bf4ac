"""A plugin's sidecar manifest and what the operator grants it: the terms a plugin runs under.

`<stem>.yaml` beside `<stem>.wasm` says what the plugin is and what it asks for (limits, config,
hosts, the sensors it reads, the actuators it commands, a priority). The daemon's settings for the
plugin win over the manifest, the defaults fill what neither gives, and the operator's ceilings
bound the result: a plugin that asks for more is refused, never silently given less.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pi_controller import config
from pi_controller.config import PluginSettings, PluginsSettings
from pi_controller.contract import Rejected
from pi_controller.plugins.plugin_config import ConfigField, check_config, check_settings
from pi_controller.plugins.refusal import Refused as Refused
from pi_controller.plugins.refusal import links_within as links_within
from pi_controller.schema import FieldError, bounded


@dataclass(frozen=True)
class ManifestLimits:
    memory_pages: int | None = bounded(1, 65536, default=None)
    timeout_ms: int | None = bounded(1, 10_000, default=None)
    fuel: int | None = bounded(1_000, 10**12, default=None)
    max_output_bytes: int | None = bounded(16, 16 * 1024 * 1024, default=None)
    max_var_bytes: int | None = bounded(0, 16 * 1024 * 1024, default=None)
    max_http_response_bytes: int | None = bounded(0, 64 * 1024 * 1024, default=None)


@dataclass(frozen=True)
class Thermostat:
    """The plugin is a thermostat (Home Assistant shows it as a `climate` entity): config keys that name
    its thermometer (`current`: a sensor id) and its heater (`heater`: an actuator id), and the
    `config_schema` key of its target temperature (`target`: a number with min and max)."""

    current: str
    target: str
    heater: str

    def resolve(self, config: Mapping[str, Any], schema: Mapping[str, ConfigField] | None) -> Climate | None:
        """The ids and the target as the plugin runs now (`config`), or None if its config names none."""
        sensor, heater, target = config.get(self.current), config.get(self.heater), (schema or {}).get(self.target)
        if isinstance(sensor, str) and isinstance(heater, str) and target is not None:
            return Climate(sensor, heater, self.target, target)
        return None


@dataclass(frozen=True)
class Climate:
    """A thermostat plugin resolved: its thermometer, its heater, its target's key and field."""

    sensor: str
    heater: str
    target: str
    field: ConfigField


@dataclass(frozen=True)
class Manifest:
    name: str = ""
    version: str = ""
    description: str = ""
    author: str = ""
    priority: int | None = None
    limits: ManifestLimits = field(default_factory=ManifestLimits)
    config: Mapping[str, Any] = field(default_factory=dict)
    config_schema: Mapping[str, ConfigField] | None = None  # None: no schema (see plugin_config)
    allowed_hosts: tuple[str, ...] = ()
    wasi: bool = False
    allowed_paths: Mapping[str, str] = field(default_factory=dict)  # host directory -> guest path
    sensors: tuple[str, ...] | None = None
    actuators: tuple[str, ...] | None = None
    thermostat: Thermostat | None = None

    def __post_init__(self) -> None:
        check_settings(self.config, self.config_schema)
        if self.thermostat is not None:
            _check_thermostat(self.thermostat, self.config, self.config_schema or {})


@dataclass(frozen=True)
class Grant:
    """Everything a plugin runs under, resolved: what `SandboxedPlugin` enforces."""

    memory_pages: int
    timeout_ms: int
    fuel: int
    max_output_bytes: int
    max_var_bytes: int
    max_http_response_bytes: int
    priority: int
    allowed_hosts: tuple[str, ...] = ()
    wasi: bool = False
    allowed_paths: Mapping[str, str] = field(default_factory=dict)  # host directory -> guest path; WASI only
    sensors: frozenset[str] | None = None  # None: every reading
    actuators: frozenset[str] | None = None  # None: every actuator
    config: Mapping[str, Any] = field(default_factory=dict)
    config_schema: Mapping[str, ConfigField] | None = None
    sha256: str | None = None  # the only content accepted, when pinned
    manifest: Manifest = field(default_factory=Manifest)
    signer: str | None = None  # the fingerprint of the trusted key that signed it (see `signing`)


_LIMITS = ("memory_pages", "timeout_ms", "fuel", "max_output_bytes", "max_var_bytes", "max_http_response_bytes")
_CEILINGS = {"memory_pages": "max_memory_pages", "timeout_ms": "max_timeout_ms", "fuel": "max_fuel",
             "max_var_bytes": "max_var_bytes", "max_http_response_bytes": "max_http_response_bytes",
             "priority": "max_priority"}


def manifest_path(wasm: Path) -> Path:
    return wasm.with_suffix(".yaml")


MAX_MANIFEST_BYTES = 64 * 1024


def load_manifest(wasm: Path) -> Manifest:
    """The sidecar manifest of `wasm`, or an empty one; Refused with file, line and key if invalid."""
    return parse_manifest(wasm, read_manifest(wasm))


def read_manifest(wasm: Path) -> bytes | None:
    """The bytes of `wasm`'s manifest (at most one past the bound), None if it has none; Refused for a
    file that is not the plugin's to show or would block the read."""
    path = manifest_path(wasm)
    if not os.path.lexists(path):
        return None
    if not links_within(path, wasm.parent):
        raise Refused(f"{path.name} is a symbolic link to outside the plugins folder")
    if not path.is_file():  # a FIFO would block the read for good
        raise Refused(f"{path.name} is not a regular file")
    try:
        with path.open("rb") as file:
            return file.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise Refused(f"cannot read {path.name}: {exc.strerror or exc}") from None


def parse_manifest(wasm: Path, data: bytes | None) -> Manifest:
    """The manifest `read_manifest` read (its bytes are what a signature covers), checked."""
    if data is None:
        return Manifest()
    try:
        return config.load_document(manifest_path(wasm), Manifest, MAX_MANIFEST_BYTES, data)
    except config.ConfigError as exc:
        raise Refused(f"manifest {exc}") from exc


def grant(name: str, manifest: Manifest, settings: PluginsSettings) -> Grant:
    """What `name` runs under: the operator's settings over the manifest over the defaults, within
    the ceilings. Raises Refused when the result passes a ceiling."""
    own = settings.settings.get(name) or PluginSettings()

    def pick(key: str, asked: Any) -> Any:
        for value in (getattr(own, key), asked):
            if value is not None:
                return value
        return getattr(settings.defaults, key)

    limits = {key: pick(key, getattr(manifest.limits, key)) for key in _LIMITS}
    hosts = own.allowed_hosts if own.allowed_hosts is not None else manifest.allowed_hosts
    paths = own.allowed_paths if own.allowed_paths is not None else manifest.allowed_paths
    result = Grant(
        **limits, priority=pick("priority", manifest.priority), allowed_hosts=tuple(hosts),
        wasi=own.wasi if own.wasi is not None else manifest.wasi, allowed_paths=dict(paths),
        sensors=_set(own.sensors if own.sensors is not None else manifest.sensors),
        actuators=_set(own.actuators if own.actuators is not None else manifest.actuators),
        config={**manifest.config, **own.config}, config_schema=manifest.config_schema, sha256=own.sha256,
        manifest=manifest)
    _check_ceilings(result, settings, name)
    here: config.KeyPath = ("plugins", "settings", name)
    try:
        check_settings(own.config, manifest.config_schema)  # the operator's values, each at its own key
        check_config(result.config, manifest.config_schema)
    except FieldError as exc:
        raise Refused(f"{config.format_path(here + exc.path)}: {exc} (the manifest's config_schema)",
                      here + exc.path, str(exc)) from exc
    except Rejected as exc:
        raise Refused(f"{config.format_path(here)}.config: {exc} (the manifest's config_schema)",
                      here + ("config",), str(exc)) from exc
    return result


@dataclass(frozen=True)
class Devices:
    """The sensors and actuators of a config: what a grant may name."""

    sensors: frozenset[str]
    actuators: frozenset[str]

    @classmethod
    def of(cls, settings: config.Settings) -> Devices:
        return cls(frozenset(s.id for s in settings.sensors), frozenset(a.id for a in settings.actuators))


def terms(name: str, wasm: Path, module: bytes, settings: PluginsSettings, devices: Devices | None) -> Grant:
    """What plugin `name`, whose module is `wasm` (its bytes `module`, as read for loading), would run
    under: its signature over those bytes and its manifest's (`signing`: the manifest is read once, so what
    is checked is what loads), its manifest (whose name, if it gives one, is its file's) and its grant under
    `settings`, naming only `devices` (None: not known, as for a plugin tried without a config). What the
    daemon's load, check-config and `plugin install` all check before compiling. Refused, saying why."""
    from pi_controller.plugins import signing  # it builds on this module's Refused

    data = read_manifest(wasm)
    signer = signing.check(wasm, module, data, settings)
    described = parse_manifest(wasm, data)
    if described.name and described.name != name:
        raise Refused(f"its manifest's name '{described.name[:64]}' is not its file's name '{name}': name the file "
                      f"{described.name[:64]}.wasm (and its manifest {described.name[:64]}.yaml), or fix the name")
    result = dataclasses.replace(grant(name, described, settings), signer=signer)
    if devices is not None:
        own = settings.settings.get(name)
        _check_granted(name, "actuators", result.actuators, devices.actuators, own.actuators if own else None)
        _check_granted(name, "sensors", result.sensors, devices.sensors, own.sensors if own else None)
    return result


def _check_granted(name: str, kind: str, granted: frozenset[str] | None, existing: frozenset[str],
                   own: tuple[str, ...] | None) -> None:
    """Refused if the grant names a device that does not exist: a mismatch with this Pi that would only
    show as rejected commands (or readings never seen) once running."""
    for device in sorted((granted or frozenset()) - existing):
        known = ", ".join(sorted(existing)) or "none"
        if own is not None:  # the operator's settings name it
            problem = f"'{device[:64]}' is not among the {kind} of this config ({known})"
            raise Refused(f"plugins.settings.{name}.{kind}: {problem}", ("plugins", "settings", name, kind,
                                                                          own.index(device)), problem)
        raise Refused(f"its manifest grants it '{device[:64]}', which is not among the {kind} of this config "
                      f"({known}): grant what exists with plugins.settings.{name}.{kind}")


def _check_thermostat(role: Thermostat, defaults: Mapping[str, Any], schema: Mapping[str, ConfigField]) -> None:
    target = schema.get(role.target)
    if target is None or target.type != "number" or target.min is None or target.max is None:
        raise FieldError(("thermostat", "target"),
                         f"'{role.target}' must be a number of config_schema with min and max")
    for key in ("current", "heater"):
        name = getattr(role, key)
        if not isinstance(defaults.get(name), str):
            raise FieldError(("thermostat", key),
                             f"'{name}' must be a config key with a default id in the manifest's config")


def _set(ids: tuple[str, ...] | None) -> frozenset[str] | None:
    return None if ids is None else frozenset(ids)


def _check_ceilings(result: Grant, settings: PluginsSettings, name: str) -> None:
    ceilings = settings.ceilings
    own = settings.settings.get(name)
    for key, ceiling in _CEILINGS.items():
        if getattr(result, key) > getattr(ceilings, ceiling):
            problem = (f"{key} {getattr(result, key)} is above the operator's ceiling plugins.ceilings.{ceiling} "
                       f"{getattr(ceilings, ceiling)}")
            at = ("plugins", "settings", name, key) if own is not None and getattr(own, key) is not None else None
            raise Refused(problem, at)
    for host in result.allowed_hosts:
        if not any(fnmatch.fnmatchcase(host, pattern) for pattern in ceilings.allowed_hosts):
            raise Refused(f"allowed host '{host}' is not within plugins.ceilings.allowed_hosts "
                          f"{list(ceilings.allowed_hosts)}")
    _check_wasi(result, settings)


def _check_wasi(result: Grant, settings: PluginsSettings) -> None:
    ceilings = settings.ceilings
    if result.wasi and not ceilings.allow_wasi:
        raise Refused("it asks for WASI, which plugins.ceilings.allow_wasi (false) does not allow; "
                      "set it to true to let plugins have WASI")
    if result.allowed_paths and not result.wasi:
        raise Refused("allowed_paths needs wasi: true (without WASI a plugin cannot open a file)")
    roots = [os.path.realpath(root) for root in ceilings.allowed_paths]
    for path in result.allowed_paths:
        if not os.path.isabs(path):
            raise Refused(f"allowed path '{path}' must be absolute")
        real = os.path.realpath(path)  # no way out through '..' or a link
        if not any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots):
            raise Refused(f"allowed path '{path}' is not within plugins.ceilings.allowed_paths {list(roots)}")
