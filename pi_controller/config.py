"""YAML in, validated immutable settings out: the only module that knows the file format.

Settings are frozen dataclasses. Their type hints *are* the schema: `convert` walks a parsed YAML tree
against them, so an error can name the file, the line, the key path and what would be valid, before any
pin is touched. Sensor and actuator kinds define their settings classes in their own modules, listed in
`devices.registry` (no gpiozero is imported for that), simulation models in `simulators.models`; this
module only dispatches on `kind`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import json
import math
import os
import re
import socket
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from pi_controller import keys, logs
from pi_controller.devices import actuators, registry, sensors
from pi_controller.devices.pins import PinSettings
from pi_controller.files import open_to_read
from pi_controller.names import PLUGIN_NAME_RULE, valid_plugin_name
from pi_controller.plugins.plugin_config import check_settings
from pi_controller.schema import FieldError, bounded, device_id, matching
from pi_controller.simulators import models as simulation_models

KeyPath = tuple[str | int, ...]


class ConfigError(Exception):
    """A configuration problem, located precisely enough to fix it without reading code."""

    def __init__(self, file: Path | str, path: KeyPath, message: str, line: int | None = None):
        self.file = str(file)
        self.path = path
        self.line = line
        self.message = message
        where = f"{self.file}:{line}" if line else self.file
        super().__init__(f"{where}: {format_path(path) or '(top level)'}: {message}")

    def refuse(self) -> None:
        """Say it once, as a command that will not run: one line, or one JSON event with its parts."""
        logs.refusal("config_error", f"config error: {self}", file=self.file, line=self.line,
                     key=format_path(self.path), problem=self.message)


def format_path(path: KeyPath) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


@dataclass(frozen=True)
class LoopSettings:
    rate_hz: float = bounded(0.1, 1000.0, default=10.0)
    # Share of the tick period that plugin time budgets (timeouts) may add up to; the rest is left
    # for sensor reads, actuator writes and scheduling slack.
    plugin_budget: float = bounded(0.05, 0.9, default=0.6)

    @property
    def period(self) -> float:
        return 1.0 / self.rate_hz

    @property
    def plugin_budget_ms(self) -> float:
        """What the plugins' timeouts may add up to in one tick. Rounded to a nanosecond: at 12 Hz the product is
        49.99999999999999, and timeouts that add up to 50 ms would not fit a 50 ms budget."""
        return round(self.period * self.plugin_budget * 1000.0, 6)


@dataclass(frozen=True)
class WatchdogSettings:
    """Safe state for every actuator when no tick completes for `timeout_s` (see `safety.watchdog.Watchdog`)."""

    enabled: bool = True
    timeout_s: float = bounded(0.05, 3600, default=1.0)


@dataclass(frozen=True)
class MetricsSettings:
    """Prometheus /metrics with /health and /ready; off by default, and on localhost unless told."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = bounded(1, 65535, default=9108)


@dataclass(frozen=True)
class RecordSettings:
    """A recording of every tick for `pi-controller replay` (see `record`); off unless a path is given."""

    path: str | None = None  # relative to the config file's folder; ending in .gz: gzip
    max_mb: int = bounded(1, 100_000, default=32)  # then rotated: about a day at 10 Hz, gzip
    keep: int = bounded(0, 100, default=3)  # rotated files kept beside it (.1 is the newest)


MAX_SECRET_BYTES = 4096  # a password or a key's passphrase; a longer file is the wrong file
CREDENTIALS = "${CREDENTIALS_DIRECTORY}"  # systemd's LoadCredential= folder, the one variable expanded


@dataclass(frozen=True)
class MqttSecrets:
    password: str | None
    key_password: str | None


def mqtt_secrets(settings: Settings) -> MqttSecrets:
    """The MQTT password and the TLS key's passphrase, from their files where the config names files:
    read when a connection needs them (`run` and `check-config` read them first, for an error at the
    key's line), never by what only reads a config (simulate, replay, the plugin tools), so that a Pi's
    config or recording works on a machine without its credentials. ConfigError if a file is unusable."""
    mqtt = settings.mqtt
    tls_file = mqtt.tls.key_password_file if mqtt.tls is not None else None
    password = _secret(settings, ("mqtt", "password_file"), mqtt.password_file)
    return MqttSecrets(mqtt.password if password is None else password,
                       _secret(settings, ("mqtt", "tls", "key_password_file"), tls_file))


def _secret(settings: Settings, key: KeyPath, path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return read_secret(path)
    except ValueError as exc:
        raise settings.error(key, str(exc)) from None


def read_secret(path: str) -> str:
    """A secret from a file of its own (a systemd credential): bounded, one trailing newline stripped.
    ValueError if it cannot be used."""
    if CREDENTIALS in path:
        folder = os.environ.get("CREDENTIALS_DIRECTORY")
        if not folder:
            raise ValueError(f"{CREDENTIALS} is not set: systemd sets it for the service (LoadCredential=); by "
                             "hand, set it to the folder holding the file (sudo env CREDENTIALS_DIRECTORY=/etc/"
                             "pi-controller pi-controller check-config ...) or give the file's own path")
        path = path.replace(CREDENTIALS, folder)
    try:  # a regular file's only: the open of a FIFO would wait for a writer for good, before any tick
        data = keys.read_small(Path(path), MAX_SECRET_BYTES, "a password file")
    except OSError as exc:  # in read_small's words, as every small file's; the open's failure with its fix
        fix = "; fix the path or the file's permissions (the daemon's user must read it)" if exc.errno else ""
        raise ValueError(f"{path} {exc.strerror}{fix}") from None
    try:
        secret = data.decode("utf-8").removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if not secret:
        raise ValueError(f"{path} is empty")
    return secret


@dataclass(frozen=True)
class TlsSettings:
    ca_file: str | None = None  # None: the system's CA store
    cert_file: str | None = None  # a client certificate, with key_file
    key_file: str | None = None
    key_password_file: str | None = None  # the passphrase of an encrypted key_file (see `mqtt_secrets`)

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise FieldError((name,), f"no file at {path}")
        if self.key_password_file is not None and self.key_file is None:
            raise FieldError(("key_password_file",), "a key passphrase needs key_file (and cert_file)")


@dataclass(frozen=True)
class MqttSettings:
    """Telemetry to an MQTT broker, Home Assistant discovery, and commands back (see `telemetry`)."""

    enabled: bool = False
    host: str = "localhost"
    port: int = bounded(1, 65535, default=1883)
    client_id: str | None = None  # None: pi-controller-<node_id>
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    password_file: str | None = None  # instead of password: a file holding it (see `mqtt_secrets`)
    tls: TlsSettings | None = None
    keepalive_s: int = bounded(5, 3600, default=30)
    base_topic: str = matching(r"[^#+/\s][^#+\s]*[^#+/\s]|[^#+/\s]", "a topic without '#', '+', spaces or "
                                                                     "leading/trailing '/'", default="pi-controller")
    node_id: str = device_id(default_factory=lambda: host_node_id(socket.gethostname()))  # one per Pi
    discovery: bool = True
    discovery_prefix: str = "homeassistant"
    heartbeat_s: float = bounded(1, 86400, default=60.0)  # republish unchanged states this often
    loop_interval_s: float = bounded(1, 3600, default=10.0)
    max_messages_per_s: float = bounded(1, 100_000, default=50.0)
    # Commands let in a second, in all and on each command topic (bursts of twice that): an operator, a
    # slider or an automation sends a few a second; more is a script gone wrong or an attack.
    max_commands_per_s: float = bounded(1, 10_000, default=50.0)
    max_commands_per_s_per_topic: float = bounded(1, 10_000, default=5.0)
    deadband: Mapping[str, float] = field(default_factory=dict)  # sensor id -> change worth publishing
    buffer_messages: int = bounded(10, 10_000_000, default=10_000)  # kept while the broker is away
    buffer_file: str | None = None  # keeps the unsent messages across a restart of the daemon
    commands: bool = True  # false: read-only, no command topic is subscribed
    override_expiry_s: float = bounded(1, 7 * 86400, default=3600.0)
    fleet: bool = False  # take signed plugin rollouts announced on <base_topic>/fleet/ (docs/fleet.md)

    def __post_init__(self) -> None:
        if self.fleet and self.node_id == "fleet":
            raise FieldError(("node_id",), "'fleet' is the rollouts' topic level under base_topic; pick another id")
        if self.password_file is not None and self.password is not None:
            raise FieldError(("password_file",), "give password or password_file, not both")
        if (self.password is not None or self.password_file is not None) and self.username is None:
            raise ValueError("a password needs a username")
        if self.max_commands_per_s_per_topic > self.max_commands_per_s:
            raise FieldError(("max_commands_per_s_per_topic",),
                             f"{self.max_commands_per_s_per_topic:g} is above max_commands_per_s "
                             f"({self.max_commands_per_s:g}), which bounds every topic too: lower it or raise that")
        if any(value < 0 for value in self.deadband.values()):
            raise ValueError("deadbands are changes: 0 or more")


def host_node_id(hostname: str) -> str:
    """The default node id: the host name's first label, in what an id may hold (two Pis left at one id
    take over each other's MQTT client id and flip each other offline)."""
    label = re.sub(r"[^A-Za-z0-9_-]+", "-", hostname.split(".")[0]).strip("-")[:64]
    return label or "pi"


@dataclass(frozen=True)
class SafetySettings:
    """What every actuator falls back on (see `safety`): its safe state once the plugin whose command it
    follows has been failing, quarantined, disabled or unloaded for `failsafe_after_s`. An actuator's own
    `failsafe_after_s` wins over this."""

    failsafe_after_s: float = bounded(0, 3600, default=1.0)


@dataclass(frozen=True)
class InterlockSettings:
    """Actuators that must never be on together, with `wait_s` between one going off and another on."""

    actuators: tuple[str, ...]
    wait_s: float = bounded(0, 86400, default=0.0)

    def __post_init__(self) -> None:
        if len(set(self.actuators)) < 2 or len(set(self.actuators)) != len(self.actuators):
            raise ValueError("an interlock group names two or more different actuators")


@dataclass(frozen=True)
class PluginSettings:
    """Limits and wiring for one plugin; every field may be left to `plugins.defaults`."""

    memory_pages: int | None = bounded(1, 65536, default=None)
    timeout_ms: int | None = bounded(1, 10_000, default=None)  # libextism counts whole milliseconds
    max_output_bytes: int | None = bounded(16, 16 * 1024 * 1024, default=None)
    priority: int | None = None
    enabled: bool = True
    config: Mapping[str, Any] = field(default_factory=dict)
    # What the operator sets here wins over the plugin's manifest (see pi_controller/plugins/manifest.py).
    fuel: int | None = bounded(1_000, 10**12, default=None)  # Wasm instructions per call
    max_var_bytes: int | None = bounded(0, 16 * 1024 * 1024, default=None)
    max_http_response_bytes: int | None = bounded(0, 64 * 1024 * 1024, default=None)
    allowed_hosts: tuple[str, ...] | None = None
    wasi: bool | None = None  # None: what the manifest asks for
    allowed_paths: Mapping[str, str] | None = None  # host directory -> the path the plugin sees (WASI only)
    sensors: tuple[str, ...] | None = None  # the readings its context holds; None: the manifest's, or all
    actuators: tuple[str, ...] | None = None  # what it may command; None: the manifest's, or all
    sha256: str | None = matching(r"[0-9a-f]{64}", "64 lowercase hex digits (sha256sum's output)", default=None)

    def __post_init__(self) -> None:
        try:
            json.dumps(self.config, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config must hold plain JSON values (numbers, strings, lists, maps): {exc}") from exc
        check_settings(self.config, None)  # sizes; the plugin's config_schema is checked when it loads


@dataclass(frozen=True)
class PluginDefaults:
    memory_pages: int = bounded(1, 65536, default=32)
    timeout_ms: int = bounded(1, 10_000, default=10)
    max_output_bytes: int = bounded(16, 16 * 1024 * 1024, default=64 * 1024)
    priority: int = 0
    fuel: int = bounded(1_000, 10**12, default=2_000_000)
    max_var_bytes: int = bounded(0, 16 * 1024 * 1024, default=4096)
    max_http_response_bytes: int = bounded(0, 64 * 1024 * 1024, default=64 * 1024)


@dataclass(frozen=True)
class PluginCeilings:
    """The operator's bounds on every plugin, whatever its manifest or its settings ask for."""

    max_memory_pages: int = bounded(1, 65536, default=256)
    max_timeout_ms: int = bounded(1, 10_000, default=50)
    max_fuel: int = bounded(1_000, 10**12, default=100_000_000)
    max_var_bytes: int = bounded(0, 16 * 1024 * 1024, default=64 * 1024)
    max_http_response_bytes: int = bounded(0, 64 * 1024 * 1024, default=1024 * 1024)
    allowed_hosts: tuple[str, ...] = ()  # patterns as Extism takes them; none: no plugin reaches the network
    allow_wasi: bool = False  # no plugin gets WASI (clocks, random, stdio, files) unless this is true
    allowed_paths: tuple[str, ...] = ()  # absolute host directories inside which a plugin may be given files
    max_file_bytes: int = bounded(1024, 1024 * 1024 * 1024, default=16 * 1024 * 1024)  # a .wasm, before it is read
    max_priority: int = bounded(-10**9, 10**9, default=1000)  # what a plugin's manifest or settings may claim


@dataclass(frozen=True)
class HostFunctionSettings:
    """The bounds of the host functions plugins may import (see `host_functions`)."""

    history_length: int = bounded(1, 36_000, default=600)  # valid readings kept per sensor: 60 s at 10 Hz
    history_reads_per_call: int = bounded(0, 1000, default=8)
    log_lines_per_s: float = bounded(0.01, 1000, default=5.0)
    log_burst: int = bounded(1, 10_000, default=20)
    host_calls_per_call: int = bounded(1, 100_000, default=64)  # past it, the plugin's call is cancelled


@dataclass(frozen=True)
class QuarantineSettings:
    """A plugin with `failures` failed calls and rejected commands within `window_s` is not called for
    `backoff_s`, doubling at each relapse up to `max_backoff_s`."""

    failures: int = bounded(1, 1_000_000, default=30)
    window_s: float = bounded(0.1, 86400, default=10.0)
    backoff_s: float = bounded(0.1, 86400, default=5.0)
    max_backoff_s: float = bounded(0.1, 86400, default=300.0)


@dataclass(frozen=True)
class PluginsSettings:
    directory: str = "plugins"
    watch: bool = True  # hot reload: load, swap and unload plugins as files land in the folder
    defaults: PluginDefaults = field(default_factory=PluginDefaults)
    ceilings: PluginCeilings = field(default_factory=PluginCeilings)
    quarantine: QuarantineSettings = field(default_factory=QuarantineSettings)
    host: HostFunctionSettings = field(default_factory=HostFunctionSettings)
    settings: Mapping[str, PluginSettings] = field(default_factory=dict)
    # Plugins that must run here, whether or not they have settings: with those in `settings`, they take
    # their share of the tick before any plugin dropped into the folder (see plugins/admission.py).
    required: tuple[str, ...] = ()
    # Ed25519 public keys whose signatures this node accepts: a PEM file's path (relative paths start at the
    # config file's folder), PEM text, or the raw key in base64. Resolved to base64 when the config loads.
    trusted_keys: tuple[str, ...] = ()
    require_signature: bool = False  # refuse every module without a valid signature (see plugins/signing.py)

    def __post_init__(self) -> None:
        for index, name in enumerate(self.required):
            if not valid_plugin_name(name):
                raise FieldError(("required", index), f"'{name[:64]}' is not a plugin name ({PLUGIN_NAME_RULE})")

    def configured(self, name: str) -> bool:
        """Whether the config names plugin `name` to run: settings not disabling it, or `required`."""
        own = self.settings.get(name)
        return (own is not None and own.enabled) or name in self.required

    def named(self) -> set[str]:
        """The plugins the config names to run."""
        return {name for name in (*self.settings, *self.required) if self.configured(name)}


@dataclass(frozen=True)
class Settings:
    source: Path
    loop: LoopSettings
    pins: PinSettings
    sensors: tuple[sensors.SensorSettings, ...]
    actuators: tuple[actuators.ActuatorSettings, ...]
    plugins: PluginsSettings
    simulation: tuple[simulation_models.ModelSettings, ...]
    watchdog: WatchdogSettings
    safety: SafetySettings
    interlocks: tuple[InterlockSettings, ...]
    metrics: MetricsSettings
    mqtt: MqttSettings
    record: RecordSettings = RecordSettings()
    lines: Mapping[KeyPath, int] = field(default_factory=dict, compare=False, repr=False)  # key path -> line

    def plugins_directory(self) -> Path:
        """The plugins folder; a relative one is relative to the config file's folder."""
        return (self.source.parent / self.plugins.directory).resolve()

    def error(self, path: KeyPath, message: str) -> ConfigError:
        """A ConfigError at `path`, on the line the key (or the nearest section above it) was read from."""
        return ConfigError(self.source, path, message, _line_of(self.lines, path))


def check_plugins_directory(settings: Settings, override: Path | None = None) -> Path:
    """What running (not checking a file alone) needs: the plugins folder is a folder. Loading a folder
    that is not there would unload every plugin; an operator's typo is no reason. Returns the folder."""
    directory = override.resolve() if override is not None else settings.plugins_directory()
    if directory.is_dir():
        return directory
    what = "is a file, not a folder" if directory.exists() else "does not exist"
    if override is not None:
        raise ConfigError(settings.source, ("plugins", "directory"), f"{directory} (given by --plugins) {what}; "
                                                                      "give a folder of .wasm plugins")
    raise settings.error(("plugins", "directory"), f"{directory} {what}; create the folder (it may be empty) or "
                                                   f"fix the path (relative paths start at the config file's folder)")


def check_service_paths(settings: Settings, state_dir: Path | None) -> list[str]:
    """Where the files the daemon writes for diagnostics may go when it runs as the unit, whose
    StateDirectory= is `state_dir` (/var/lib/pi-controller; None: not under the unit, nothing to say): under
    ProtectSystem=strict only it, the CacheDirectory= and /tmp are writable. ConfigError for a relative
    `record.path` (it starts at the config's folder, /etc/pi-controller, which the unit cannot write); one
    line for a path outside `state_dir`. The daemon itself runs on without a recording it cannot write."""
    if state_dir is None:
        return []
    notes = []
    paths: tuple[tuple[KeyPath, str | None], ...] = ((("record", "path"), settings.record.path),
                                                     (("mqtt", "buffer_file"), settings.mqtt.buffer_file))
    for key, value in paths:
        if value is None:
            continue
        path = Path(value)
        if not path.is_absolute() and key[0] == "record":
            raise settings.error(key, f"'{value}' is relative: it would be written beside the config, in "
                                      f"{settings.source.parent}, which the service cannot write (ProtectSystem="
                                      f"strict); give a path under {state_dir}, such as {state_dir / path.name}")
        if not (state_dir / path).resolve().is_relative_to(state_dir.resolve()):  # relative: the unit's workdir
            notes.append(f"{format_path(key)} {value} is outside {state_dir}: the service writes there, its "
                         "CacheDirectory= and /tmp only, unless a drop-in gives it ReadWritePaths=")
    return notes


# ---------------------------------------------------------------------------------------------
# Loading


MAX_CONFIG_BYTES = 1024 * 1024  # a config is a few KiB; past this it is no config
MAX_NESTING = 64  # mappings and lists within each other


def load(path: Path | str) -> Settings:
    """Read, parse and validate a config file. Raises ConfigError; never touches hardware."""
    path = Path(path)
    settings = parse(read(path, MAX_CONFIG_BYTES), path)
    _check_devices(settings)
    return settings


def parse(text: str, source: Path) -> Settings:
    tree, data = _compose(text, source, MAX_CONFIG_BYTES)
    if not tree.lines:  # not one YAML node
        raise ConfigError(source, (), "the file is empty or holds only comments (truncated?); a config needs "
                                      "sensors: or actuators:, see config/example.yaml", 1)
    return _Converter(tree).settings(data)


def read(path: Path, max_bytes: int, errors: str = "strict") -> str:
    """A YAML file's text, at most `max_bytes` of it; ConfigError if it is longer or unreadable (or, with
    `errors` "strict", not UTF-8)."""
    try:
        with open_to_read(path) as file:
            data = file.read(max_bytes + 1)
            regular = stat.S_ISREG(os.fstat(file.fileno()).st_mode)
    except OSError as exc:
        raise ConfigError(path, (), f"cannot read the file: {exc.strerror or exc}") from exc
    # A FIFO nothing writes to reads as empty (`open_to_read`), as one whose writer wrote nothing: not an empty config
    if not data and not regular:
        raise ConfigError(path, (), "the file is not a regular file and gave no config: nothing was written to it")
    return decode(data, path, max_bytes, errors)


def decode(data: bytes, path: Path, max_bytes: int, errors: str = "strict") -> str:
    """`read`'s checks on bytes already read from `path`."""
    if len(data) > max_bytes:
        raise ConfigError(path, (), f"the file is longer than {max_bytes} bytes")
    try:
        return data.decode("utf-8", errors)
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(path, (), f"not UTF-8 text (byte {exc.start})", line) from None


def load_document(path: Path, cls: type[Any], max_bytes: int, data: bytes | None = None) -> Any:
    """Another YAML document of ours (a plugin manifest) read into `cls` the way a config is, so its
    errors name file, line and key as a config's do; `data`: its bytes, already read. Raises ConfigError."""
    text = read(path, max_bytes) if data is None else decode(data, path, max_bytes)
    tree, document = _compose(text, path, max_bytes)
    return _Converter(tree).convert(document, cls, ())


def _compose(text: str, source: Path, max_bytes: int) -> tuple[_Tree, Any]:
    """YAML text into plain values, bounded: its size, its nesting, and no anchors or aliases (a
    few hundred bytes of nested aliases expand to millions of nodes)."""
    if len(text) > max_bytes:
        raise ConfigError(source, (), f"the document is longer than {max_bytes} bytes")
    try:
        loader = _BoundedLoader(text)  # its reader already refuses control characters
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(source, (), f"not valid YAML: control character {exc.character:#x}", line) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(source, (), f"not valid YAML: {getattr(exc, 'problem', exc)}",
                          mark.line + 1 if mark else None) from None
    tree = _Tree(source)
    return tree, (tree.value(root, ()) if root is not None else {})


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe composer, refusing anchors, aliases and deep nesting as it meets them."""

    def __init__(self, text: str):
        super().__init__(text)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(None, None, "anchors and aliases (&name, *name) are not accepted; "
                                                          "write the value out", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_NESTING:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_NESTING} deep",
                                                  event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def salvage(path: Path | str) -> tuple[Settings, list[ConfigError]]:
    """What `safe-state` can still use of a config that does not load: `pins`, and every actuator entry
    that converts on its own (no cross-checks), with the errors met on the way. A file cut off in the
    middle of an entry is read up to the line before the YAML error. Raises ConfigError only when the file
    cannot be read at all."""
    path = Path(path)
    text = read(path, MAX_CONFIG_BYTES, errors="replace")  # cut mid-character: the rest still counts
    errors: list[ConfigError] = []
    tree, data = _Tree(path), dict[str, Any]()
    try:
        tree, data = _salvage_tree(text, path)
    except ConfigError as exc:
        errors.append(exc)
    convert = _Converter(tree)
    pins, actuator_entries = PinSettings(), []
    if isinstance(data, dict):
        try:
            pins = convert.convert(data.get("pins", {}), PinSettings, ("pins",))
        except ConfigError as exc:
            errors.append(exc)
        entries = data.get("actuators", [])
        for index, entry in enumerate(entries if isinstance(entries, list) else []):
            try:
                actuator_entries.append(convert.kind(entry, registry.ACTUATORS, ("actuators", index)))
            except ConfigError as exc:
                errors.append(exc)
    settings = Settings(source=path.resolve(), loop=LoopSettings(), pins=pins, sensors=(),
                        actuators=tuple(actuator_entries), plugins=PluginsSettings(), simulation=(),
                        watchdog=WatchdogSettings(), safety=SafetySettings(), interlocks=(), metrics=MetricsSettings(),
                        mqtt=MqttSettings())
    return settings, errors


def _salvage_tree(text: str, source: Path) -> tuple[_Tree, Any]:
    """The YAML tree of `text`, or of as many of its first lines as parse (a file cut off mid-entry)."""
    lines = text.splitlines()
    for _attempt in range(20):
        try:
            return _compose("\n".join(lines), source, MAX_CONFIG_BYTES)
        except ConfigError as exc:
            if not exc.line or exc.line == 1:
                raise
            lines = lines[:min(exc.line - 1, len(lines) - 1)]  # cut before the line that does not parse
    raise ConfigError(source, (), "not valid YAML, even cut short")


class _Tree:
    """Turns composed YAML nodes into plain values while remembering each key path's line."""

    def __init__(self, source: Path):
        self.source = source
        self.lines: dict[KeyPath, int] = {}
        self._constructor = yaml.SafeLoader("")

    def value(self, node: yaml.Node, path: KeyPath) -> Any:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self._scalar(key_node, path)
                if key in result:
                    raise ConfigError(self.source, path + (key,), "duplicate key",
                                      key_node.start_mark.line + 1)
                result[key] = self.value(value_node, path + (key,))
                self.lines[path + (key,)] = key_node.start_mark.line + 1
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.value(item, path + (i,)) for i, item in enumerate(node.value)]
        return self._scalar(node, path)

    def _scalar(self, node: yaml.Node, path: KeyPath) -> Any:
        try:
            value = self._constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError) as exc:
            raise ConfigError(self.source, path, f"cannot read {node.tag} value {node.value!r}: "
                                                 f"{getattr(exc, 'problem', exc)}", node.start_mark.line + 1) from None
        try:
            hash(value)
        except TypeError:
            raise ConfigError(self.source, path, "a mapping key must be a plain value",
                              node.start_mark.line + 1) from None
        return value

    def error(self, path: KeyPath, message: str) -> ConfigError:
        return ConfigError(self.source, path, message, _line_of(self.lines, path))


def _line_of(lines: Mapping[KeyPath, int], path: KeyPath) -> int | None:
    while path and path not in lines:
        path = path[:-1]
    return lines.get(path)


_TOP_LEVEL = {
    "loop": LoopSettings,
    "pins": PinSettings,
    "plugins": PluginsSettings,
    "watchdog": WatchdogSettings,
    "safety": SafetySettings,
    "metrics": MetricsSettings,
    "mqtt": MqttSettings,
    "record": RecordSettings,
}


class _Converter:
    """Checks a plain value tree against dataclass type hints."""

    def __init__(self, tree: _Tree):
        self.tree = tree

    def settings(self, data: Any) -> Settings:
        if not isinstance(data, dict):
            raise self.tree.error((), f"expected a mapping of sections, got {_kind(data)}")
        known = set(_TOP_LEVEL) | {"sensors", "actuators", "simulation", "interlocks"}
        self._reject_unknown(data, known, ())
        parts = {name: self.convert(data.get(name, {}), cls, (name,)) for name, cls in _TOP_LEVEL.items()}
        result = Settings(
            interlocks=self.convert(data.get("interlocks", []), tuple[InterlockSettings, ...], ("interlocks",)),
            source=self.tree.source.resolve(),
            sensors=self._kinds(data.get("sensors", []), registry.SENSORS, ("sensors",)),
            actuators=self._kinds(data.get("actuators", []), registry.ACTUATORS, ("actuators",)),
            simulation=self._kinds(data.get("simulation", []), simulation_models.KINDS, ("simulation",)),
            lines=self.tree.lines,
            **parts,
        )
        _check_cross_references(result, self.tree)
        return _with_trusted_keys(result, self.tree)

    def _kinds(self, items: Any, kinds: Mapping[str, type], path: KeyPath) -> tuple[Any, ...]:
        if not isinstance(items, list):
            raise self.tree.error(path, f"expected a list, got {_kind(items)}")
        return tuple(self.kind(item, kinds, path + (index,)) for index, item in enumerate(items))

    def kind(self, item: Any, kinds: Mapping[str, type], path: KeyPath) -> Any:
        """One entry of a list of kinds (sensors, actuators, simulation models)."""
        if not isinstance(item, dict):
            raise self.tree.error(path, f"expected a mapping, got {_kind(item)}")
        kind = item.get("kind")
        if not isinstance(kind, str) or kind not in kinds:
            raise self.tree.error(path + ("kind",),
                                  f"unknown or missing kind {kind!r}; valid kinds: {', '.join(sorted(kinds))}")
        return self.convert(item, kinds[kind], path)

    def convert(self, value: Any, hint: Any, path: KeyPath) -> Any:
        if dataclasses.is_dataclass(hint):
            return self._dataclass(value, hint, path)
        origin = typing.get_origin(hint)
        if origin is Literal:
            choices = typing.get_args(hint)
            if not any(value == c and type(value) is type(c) for c in choices):
                hint_text = " (YAML reads a bare off/on/yes/no as true or false: quote it)" if isinstance(
                    value, bool) else ""
                raise self.tree.error(path, f"{value!r} is not one of {', '.join(map(repr, choices))}{hint_text}")
            return value
        if origin in (typing.Union, types.UnionType):
            return self._union(value, typing.get_args(hint), path)
        if origin is tuple:
            (item_hint, _ellipsis) = typing.get_args(hint)
            return tuple(self.convert(v, item_hint, path + (i,)) for i, v in enumerate(self._list(value, path)))
        if origin in (dict, collections.abc.Mapping):
            return self._mapping(value, typing.get_args(hint)[1], path)
        return self._scalar(value, hint, path)

    def _dataclass(self, value: Any, cls: Any, path: KeyPath) -> Any:
        if not isinstance(value, dict):
            raise self.tree.error(path, f"expected a mapping, got {_kind(value)}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        self._reject_unknown(value, set(fields), path)
        kwargs = {}
        for name, spec in fields.items():
            if name in value:
                converted = self.convert(value[name], hints[name], path + (name,))
                _check_bounds(self.tree, converted, spec, path + (name,))
                kwargs[name] = converted
            elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise self.tree.error(path + (name,), f"missing required key '{name}'")
        try:
            return cls(**kwargs)
        except FieldError as exc:
            raise self.tree.error(path + exc.path, str(exc)) from exc
        except ValueError as exc:
            raise self.tree.error(path, str(exc)) from exc

    def _union(self, value: Any, options: tuple[Any, ...], path: KeyPath) -> Any:
        if value is None and type(None) in options:
            return None
        choices = [o for o in options if o is not type(None)]
        if len(choices) == 1:  # X | None: X's own error, at the key it names
            return self.convert(value, choices[0], path)
        errors = []
        for option in choices:
            try:
                return self.convert(value, option, path)
            except ConfigError as exc:
                errors.append(exc.message)
        raise self.tree.error(path, " or ".join(errors))

    def _mapping(self, value: Any, item_hint: Any, path: KeyPath) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.tree.error(path, f"expected a mapping, got {_kind(value)}")
        for key in value:
            if not isinstance(key, str):
                raise self.tree.error(path + (key,), "keys must be strings")
        return {k: self.convert(v, item_hint, path + (k,)) for k, v in value.items()}

    def _list(self, value: Any, path: KeyPath) -> list[Any]:
        if not isinstance(value, list):
            raise self.tree.error(path, f"expected a list, got {_kind(value)}")
        return value

    def _scalar(self, value: Any, hint: Any, path: KeyPath) -> Any:
        if hint is Any:
            return value
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
            raise self.tree.error(path, f"expected {_TYPE_NAMES.get(hint, hint.__name__)}, got {_kind(value)}")
        if hint is float and not math.isfinite(value):
            raise self.tree.error(path, f"expected a finite number, got {value!r}")
        return value

    def _reject_unknown(self, value: dict[Any, Any], known: set[str], path: KeyPath) -> None:
        for key in value:
            if key not in known:
                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise self.tree.error(path + (key,),
                                      f"unknown key '{key}'; {hint}valid keys: {', '.join(sorted(known))}")


_TYPE_NAMES = {float: "a number", int: "an integer", str: "a string", bool: "true or false"}


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "a mapping"}
    return f"{names.get(type(value), type(value).__name__)} ({value!r})" if not isinstance(
        value, (list, dict)) else names[type(value)]


def _check_bounds(tree: _Tree, value: Any, spec: dataclasses.Field[Any], path: KeyPath) -> None:
    pattern = spec.metadata.get("pattern")
    if pattern and isinstance(value, str) and not re.fullmatch(pattern, value):
        raise tree.error(path, f"{value!r} is not valid; expected {spec.metadata['meaning']}")
    if "low" not in spec.metadata or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, high = spec.metadata["low"], spec.metadata["high"]
    if not low <= value <= high:
        raise tree.error(path, f"{value:g} is out of range; valid: {low:g} to {high:g}")


def _check_cross_references(settings: Settings, tree: _Tree) -> None:
    """Rules that span entries: unique ids, one device per pin, references that resolve, budgets."""
    _check_ids_and_pins(settings, tree)
    _check_safety_references(settings, tree)
    _check_simulation_references(settings, tree)
    check_plugin_budget(settings)


def _with_trusted_keys(settings: Settings, tree: _Tree) -> Settings:
    """`settings` with each of plugins.trusted_keys read (a file) and checked, as the raw key in base64."""
    entries = settings.plugins.trusted_keys
    if len(entries) > keys.MAX_TRUSTED_KEYS:
        raise tree.error(("plugins", "trusted_keys"), f"{len(entries)} keys; at most {keys.MAX_TRUSTED_KEYS}")
    resolved = []
    for index, entry in enumerate(entries):
        try:
            resolved.append(keys.trusted_key(entry, settings.source.parent))
        except keys.KeyProblem as exc:
            raise tree.error(("plugins", "trusted_keys", index), str(exc)) from None
    return dataclasses.replace(settings, plugins=dataclasses.replace(settings.plugins, trusted_keys=tuple(resolved)))


def _check_devices(settings: Settings) -> None:
    """A config file with neither sensors nor actuators is a truncated or emptied file, not a plan: loading
    it (on a reload above all) would release every device and leave the daemon reporting itself healthy.
    (Settings made up in code, as `plugin call` does, may hold none.)"""
    if settings.sensors or settings.actuators:
        return
    key = next((k for k in ("sensors", "actuators") if (k,) in settings.lines), "sensors")
    raise settings.error((key,), "no sensors and no actuators: nothing to read or control (a truncated file?); "
                             "list the devices under sensors: and actuators:, see config/example.yaml")


def _check_ids_and_pins(settings: Settings, tree: _Tree) -> None:
    seen_ids: dict[str, KeyPath] = {}
    pin_owners: dict[int, tuple[KeyPath, str, bool]] = {}  # pin -> (first user, its key, on a shared bus)
    groups: tuple[tuple[str, tuple[sensors.SensorSettings | actuators.ActuatorSettings, ...]], ...] = (
        ("sensors", settings.sensors), ("actuators", settings.actuators))
    for section, entries in groups:
        for index, entry in enumerate(entries):
            here: KeyPath = (section, index)
            if entry.id in seen_ids:
                raise tree.error(here + ("id",), f"duplicate id '{entry.id}', already used at "
                                                 f"{format_path(seen_ids[entry.id])}; ids must be unique")
            seen_ids[entry.id] = here
            claims = [(k, p, False) for k, p in entry.pins().items()]
            claims += [(k, p, True) for k, p in entry.bus_pins().items()]
            for key, pin, shared in claims:
                owner, owner_key, owner_shared = pin_owners.setdefault(pin, (here, key, shared))
                if (owner, owner_key) != (here, key) and not (shared and owner_shared):
                    raise tree.error(here + (key,), f"GPIO{pin} ({key}) is already used by "
                                                    f"{format_path(owner + (owner_key,))}; one device per pin")


def _check_simulation_references(settings: Settings, tree: _Tree) -> None:
    for index, model in enumerate(settings.simulation):
        for key, (wanted, ref) in model.references().items():
            pool = {s.id for s in settings.sensors} if wanted == "sensor" else {a.id for a in settings.actuators}
            if ref not in pool:
                raise tree.error(("simulation", index, key), f"no {wanted} with id '{ref}'; "
                                                             f"known: {', '.join(sorted(pool)) or 'none'}")


def _check_safety_references(settings: Settings, tree: _Tree) -> None:
    sensor_ids = {s.id for s in settings.sensors}
    actuator_ids = {a.id for a in settings.actuators}
    for index, actuator in enumerate(settings.actuators):
        for position, sensor in enumerate(actuator.requires):
            if sensor not in sensor_ids:
                raise tree.error(("actuators", index, "requires", position),
                                 f"no sensor with id '{sensor}'; known: {', '.join(sorted(sensor_ids)) or 'none'}")
    for index, group in enumerate(settings.interlocks):
        for position, member in enumerate(group.actuators):
            if member not in actuator_ids:
                raise tree.error(("interlocks", index, "actuators", position),
                                 f"no actuator with id '{member}'; known: {', '.join(sorted(actuator_ids))}")
    for sensor in settings.mqtt.deadband:
        if sensor not in sensor_ids:
            raise tree.error(("mqtt", "deadband", sensor), f"no sensor with id '{sensor}'; "
                                                           f"known: {', '.join(sorted(sensor_ids))}")
    if settings.watchdog.enabled and settings.watchdog.timeout_s < 2 * settings.loop.period:
        raise tree.error(("watchdog", "timeout_s"),
                         f"{settings.watchdog.timeout_s:g} s is shorter than two ticks "
                         f"({2 * settings.loop.period:g} s at loop.rate_hz {settings.loop.rate_hz:g}); raise it")


def check_plugin_budget(settings: Settings) -> None:
    """The plugins' timeouts that the config sets fit its plugin budget (a reload checks them against the running
    loop's too: `loop` waits for a restart)."""
    budget_ms = settings.loop.plugin_budget_ms
    defaults = settings.plugins.defaults
    if defaults.timeout_ms > budget_ms:
        raise settings.error(("plugins", "defaults", "timeout_ms"),
                             f"{defaults.timeout_ms} ms does not fit the plugin budget of {budget_ms:.1f} ms per "
                             f"tick (loop.rate_hz x loop.plugin_budget); lower it or the loop rate")
    own = settings.plugins.settings
    configured = {name: (own[name].timeout_ms if name in own else None) or defaults.timeout_ms
                  for name in [*own, *settings.plugins.required] if settings.plugins.configured(name)}
    if sum(configured.values()) > budget_ms:
        raise settings.error(("plugins", "settings"),
                             f"the configured plugins' timeouts add up to {sum(configured.values()):.1f} ms, over the "
                             f"plugin budget of {budget_ms:.1f} ms per tick; lower their timeout_ms, the loop rate, "
                             f"or raise loop.plugin_budget")
