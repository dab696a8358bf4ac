"""A state machine over the real daemon: any sequence of ordinary events, every invariant after each.

`DaemonMachine` (hypothesis' `RuleBasedStateMachine`) drives one daemon on a `daemon_rig.Rig` (mock pins,
a stepped virtual clock) through what a Pi owner and the things around the daemon do: plugin files
dropped in, replaced and removed (the `switchboard` test plugin, whose every behaviour is a config value,
under several names; a plugin that traps; a file that is no module), manifests rewritten (grants,
priorities, limits, names, broken ones), shadows dropped in and removed, plugins quarantined, configs reloaded
(good ones, and ones with a bad plugin setting, a budget overrun or broken YAML, each after `check-config`; one
plugin's settings changed while another's files change under the reload), restarts, `plugin install`,
the plugins folder deleted and recreated, operator requests and plugin settings over the operator's API,
sensor faults, and time: ticks, and stalls of the loop.

Every tick is judged by `invariants.PinLaws` as it lands, and every event by `invariants.Judge`, against
what the machine knows independently: which files it put where and whether they are valid, which config
it wrote and what check-config said of it, which sensor faults it caused. Which invariants are judged is
`DaemonMachine.judged` (`checking` makes a machine that judges only some, to find one row of issue 25 at
a time). `tests/test_daemon_machine.py` runs it on a bounded budget; `benchmarks/fuzz.py --stateful`
runs it long. A sequence it finds is printed as calls of these rules, and kept as a plain test there.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import structlog
import yaml
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pi_controller import cli, logs
from pi_controller.config import ConfigError
from pi_controller.devices.hardware import HardwareError
from pi_controller.operator import EnablePlugin, Release, SetActuator, SetPluginConfig
from pi_controller.sim.record import RecordingError
from tests import invariants
from tests.daemon_rig import Rig, RigError, StartRefused
from tests.invariants import Actuator, Judge, Judged, PinLaws, Plant, PluginView

TEST_PLUGINS = Path(__file__).resolve().parent / "plugins"
MODULES = {"switchboard": (TEST_PLUGINS / "switchboard.wasm").read_bytes(),
           "trap": (TEST_PLUGINS / "trap.wasm").read_bytes(),  # loads, and traps on every call
           "broken": b"this is no WebAssembly module\n"}  # refused by the file gate
LOADABLE = {"switchboard", "trap"}

CONFIGURED = ("thermostat", "lamp_ctl")  # named in the first config
DROPPED = ("hog", "stray")  # only ever dropped into the folder, unless a reload names them
NAMES = CONFIGURED + DROPPED
PINS = {"heater": 27, "cooler": 22, "lamp": 18}
NO_SUCH_DEVICE = "boiler"
SENSOR = "thermometer"
W1_ID = "28-000000000001"
PLUGIN_BUDGET = 0.6  # loop.plugin_budget: 60 ms of a tick at 10 Hz
DEFAULT_TIMEOUT_MS = 10
FAILSAFE_AFTER_S = 1.0

# The switchboard's config, as its manifests declare it; values off the schema are refused wherever
# a schema applies (a plugin without a manifest has none).
SCHEMA = {"mode": {"type": "string", "allowed": ["on", "off", "silent", "trap", "error", "garbage"]},
          "device": {"type": "string", "max_length": 64},
          "every": {"type": "integer", "min": 1, "max": 100},
          "duty": {"type": "number", "min": 0, "max": 100}}
GOOD_VALUES: dict[str, tuple[Any, ...]] = {"mode": ("on", "off", "silent", "trap", "error", "garbage"),
                                           "device": ("heater", "cooler", "lamp", NO_SUCH_DEVICE),
                                           "every": (1, 4), "duty": (30, 100)}
BAD_VALUES: tuple[tuple[str, Any], ...] = (("mode", "hot"), ("every", 0), ("hysterisis", 0.5))


def plant() -> Plant:
    """The actuators of `config_text`, as invariants judge them (pin values: relays 0/1, PWM duty/100)."""
    return Plant({
        "heater": Actuator("heater", 0.0, 0.0, min_on_s=1, min_off_s=1, max_on_s=30, command_ttl_s=5,
                           requires=(SENSOR,), interlocked=(("cooler", 1.0),)),
        "cooler": Actuator("cooler", 0.0, 0.0, interlocked=(("heater", 1.0),)),
        "lamp": Actuator("lamp", 0.0, 0.0),
    }, FAILSAFE_AFTER_S)


# -- what the machine puts on disk, and whether it is valid ------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """A plugin's manifest as the machine writes it (`runnable` says whether the daemon can run it)."""

    actuators: tuple[str, ...] | None = None
    priority: int | None = None
    timeout_ms: int | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    name: str | None = None  # the manifest's `name`: None for none, "" for the file's own name
    broken: bool = False  # not YAML at all

    def text(self, file_name: str) -> str:
        if self.broken:
            return "name: [unclosed\n"
        data: dict[str, Any] = {"version": "1.0.0", "config_schema": SCHEMA}
        if self.name is not None:
            data["name"] = self.name or file_name
        if self.actuators is not None:
            data["actuators"] = list(self.actuators)
        if self.priority is not None:
            data["priority"] = self.priority
        if self.timeout_ms is not None:
            data["limits"] = {"timeout_ms": self.timeout_ms}
        if self.config:
            data["config"] = dict(self.config)
        return yaml.safe_dump(data, sort_keys=False)


@dataclass(frozen=True)
class Files:
    module: str  # a key of MODULES
    manifest: Manifest | None

    def timeout_ms(self) -> int | None:
        return self.manifest.timeout_ms if self.manifest is not None else None


@dataclass(frozen=True)
class Entry:
    """`plugins.settings.<name>` in a config the machine writes."""

    config: Mapping[str, Any] = field(default_factory=dict)
    enabled: bool = True
    priority: int | None = None
    timeout_ms: int | None = None
    actuators: tuple[str, ...] | None = None

    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"config": dict(self.config)}
        if not self.enabled:
            data["enabled"] = False
        if self.priority is not None:
            data["priority"] = self.priority
        if self.timeout_ms is not None:
            data["timeout_ms"] = self.timeout_ms
        if self.actuators is not None:
            data["actuators"] = list(self.actuators)
        return data


@dataclass(frozen=True)
class Config:
    entries: Mapping[str, Entry]
    broken: str | None = None  # "yaml": not YAML; "typo": an unknown top-level key
    unwritable_recording: bool = False  # record.path where no file can be made (a diagnostic, not control)
    rate_hz: float = 10.0  # loop.rate_hz: a faster loop leaves the plugins less of each tick (from the next start)

    def enabled(self) -> list[str]:
        return [name for name, entry in self.entries.items() if entry.enabled]

    @property
    def budget_ms(self) -> float:
        """The plugin budget of a tick, as the config defines it (a tick's period x loop.plugin_budget)."""
        return PLUGIN_BUDGET * 1000.0 / self.rate_hz  # exact for the rates below: 600 / 12 is 50


def runnable(name: str, files: Files, entry: Entry | None) -> bool:
    """Whether the daemon can run plugin `name` of `files` under `entry`, its settings in the config (None:
    the manifest's terms alone), by construction of what the machine writes: the settings win over the
    manifest, within the ceilings (priority 1000, timeout_ms 50), granting only what exists; the config is
    checked against the manifest's schema, merged over the manifest's own config (itself checked)."""
    own = entry or Entry()
    if files.module not in LOADABLE or NO_SUCH_DEVICE in (own.actuators or ()):
        return False
    described = files.manifest
    if described is None:  # no schema, nor other terms than the settings
        return True
    priority = own.priority if own.priority is not None else described.priority
    timeout_ms = own.timeout_ms if own.timeout_ms is not None else described.timeout_ms
    actuators = own.actuators if own.actuators is not None else described.actuators
    return not described.broken and described.name in (None, "", name) and (priority or 0) <= 1000 \
        and (timeout_ms or 0) <= 50 and NO_SUCH_DEVICE not in (actuators or ()) \
        and _valid_config(described.config) and _valid_config({**described.config, **own.config})


def _valid_config(values: Mapping[str, Any]) -> bool:
    return all(key in GOOD_VALUES and value in GOOD_VALUES[key] for key, value in values.items())


FIRST_CONFIG = Config({"thermostat": Entry({"mode": "on", "device": "heater"}, priority=10),
                       "lamp_ctl": Entry({"mode": "on", "device": "lamp", "duty": 30})})
FIRST_FILES = {"thermostat": Files("switchboard", Manifest(actuators=("heater",))),
               "lamp_ctl": Files("switchboard", Manifest(actuators=("lamp",)))}


def config_text(root: Path, choice: Config) -> str:
    if choice.broken == "yaml":
        return "loop: {rate_hz: 10\nsensors: [\n"
    data: dict[str, Any] = {
        "loop": {"rate_hz": choice.rate_hz, "plugin_budget": PLUGIN_BUDGET},
        "pins": {"factory": "mock"},
        "sensors": [{"id": SENSOR, "kind": "ds18b20", "device": W1_ID, "base_dir": str(root / "w1"),
                     "poll_interval_s": 0, "valid_min": -20, "valid_max": 60}],
        "actuators": [
            {"id": "heater", "kind": "relay", "pin": PINS["heater"], "safe_state": "off", "requires": [SENSOR],
             "min_on_s": 1, "min_off_s": 1, "max_on_s": 30, "command_ttl_s": 5},
            {"id": "cooler", "kind": "relay", "pin": PINS["cooler"], "safe_state": "off"},
            {"id": "lamp", "kind": "pwm", "pin": PINS["lamp"], "max_duty": 80}],
        "interlocks": [{"actuators": ["heater", "cooler"], "wait_s": 1}],
        "safety": {"failsafe_after_s": FAILSAFE_AFTER_S},
        "watchdog": {"enabled": False},  # it keeps real time: the rig's ticks are virtual
        "mqtt": {"enabled": False, "override_expiry_s": 30},
        "plugins": {"directory": "plugins", "defaults": {"timeout_ms": DEFAULT_TIMEOUT_MS},
                    "quarantine": {"failures": 10, "window_s": 10, "backoff_s": 3, "max_backoff_s": 30},
                    "settings": {name: entry.data() for name, entry in choice.entries.items()}},
    }
    if choice.broken == "typo":
        data["pluginz"] = {}
    if choice.unwritable_recording:
        data["record"] = {"path": str(root / "config.yaml" / "ticks.jsonl")}  # under a file: no folder to write in
    return yaml.safe_dump(data, sort_keys=False)


# -- strategies ---------------------------------------------------------------------------------------

plugin_names = st.sampled_from(NAMES)
devices = st.sampled_from(tuple(PINS))
good_config = st.fixed_dictionaries({}, optional={key: st.sampled_from(values) for key, values in GOOD_VALUES.items()})
bad_config = st.tuples(good_config, st.sampled_from(BAD_VALUES)).map(lambda pair: {**pair[0], pair[1][0]: pair[1][1]})
plugin_config = st.one_of(good_config, good_config, good_config, bad_config)  # mostly good: a bad one ends the run
valid_manifests = st.builds(
    Manifest, actuators=st.sampled_from([None, ("heater",), ("lamp",), ("cooler",), (), ("heater", "lamp")]),
    priority=st.sampled_from([None, 1, 20, 999]), timeout_ms=st.sampled_from([None, 20, 50]), config=good_config,
    name=st.sampled_from([None, ""]))
DEFECTS: dict[str, dict[str, Any]] = {"no such actuator": {"actuators": (NO_SUCH_DEVICE,)},
                                      "priority over the ceiling": {"priority": 5000},
                                      "timeout over the ceiling": {"timeout_ms": 80},
                                      "name of another plugin": {"name": "someone_else"},
                                      "not YAML": {"broken": True}}
defective_manifests = st.builds(lambda manifest, defect: replace(manifest, **DEFECTS[defect]), valid_manifests,
                                st.sampled_from(sorted(DEFECTS)))
manifests = st.one_of(st.none(), valid_manifests, valid_manifests, valid_manifests,
                      defective_manifests, valid_manifests.map(lambda m: replace(m, config={"mode": "hot"})))
files = st.builds(Files, module=st.sampled_from(["switchboard", "switchboard", "switchboard", "trap", "broken"]),
                  manifest=manifests)
entries = st.builds(Entry, config=plugin_config, enabled=st.sampled_from([True, True, True, False]),
                    priority=st.sampled_from([None, 5, 50]), timeout_ms=st.sampled_from([None, None, 10, 20, 40]),
                    actuators=st.sampled_from([None, None, None, ("heater",), ("lamp",), (NO_SUCH_DEVICE,)]))
rates = st.sampled_from([10.0, 15.0, 20.0])  # plugin budgets of 60, 40 and 30 ms
edge_rates = st.sampled_from([10.0, 12.0, 15.0, 20.0, 25.0])  # and 50 and 24 ms
configs = st.builds(Config, entries=st.fixed_dictionaries({}, optional=dict.fromkeys(NAMES, entries)),
                    broken=st.sampled_from([None, None, None, None, None, "yaml", "typo"]),
                    unwritable_recording=st.sampled_from([False, False, False, True]),
                    rate_hz=st.sampled_from([10.0, 10.0, 10.0, 15.0, 20.0]))
override_payloads = st.sampled_from([b"ON", b"OFF", b'{"state": "ON", "brightness": 30}',
                                     b'{"action": "set_high", "parameters": {}, "expires_s": 2}'])
sensor_states = st.sampled_from(["20.0", "35.5", "crc", "missing", "power_on", "99.0"])


@contextlib.contextmanager
def quiet_logs() -> Any:
    """The daemon's log lines dropped while the machine runs (thousands of them; the violation says
    what matters), and structlog left as it was found."""
    saved, threshold = structlog.get_config(), logs._threshold
    structlog.configure(processors=[_drop], wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
                        cache_logger_on_first_use=False)
    logs._threshold = logging.CRITICAL + 1
    try:
        yield
    finally:
        structlog.configure(**saved)
        logs._threshold = threshold


def _drop(logger: Any, method: str, event: Any) -> Any:
    raise structlog.DropEvent


_verdicts: dict[tuple[str, tuple[tuple[str, str], ...] | None], tuple[bool, str]] = {}


def check_config(path: Path, folder: Path, choice: Config) -> tuple[bool, str]:
    """`pi-controller check-config PATH`, in-process: (accepted, what it said). Its verdict is a function
    of the config (`choice`, written to `path`) and the folder's files: the same pair is checked once in
    a process."""
    files = tuple(sorted((p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in folder.glob("*")
                         if p.is_file())) if folder.is_dir() else None
    key = (repr(choice), files)
    if key not in _verdicts:
        _verdicts[key] = run_cli("check-config", str(path))
    return _verdicts[key]


def run_cli(*argv: str) -> tuple[bool, str]:
    """`pi-controller ARGV...` in-process: (exit status 0, what it said)."""
    out, err = io.StringIO(), io.StringIO()
    with quiet_logs(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code == 0, (out.getvalue() + err.getvalue()).strip()[:400]


# The in-suite budget: the same sequences on every run (derandomized, no example database), so that CI
# is never red for a sequence a developer's machine did not try; no deadline, since a step's time is the
# machine's load. benchmarks/fuzz.py --stateful runs random ones, many more.
IN_SUITE = settings(max_examples=40, stateful_step_count=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=False,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink])


# -- the machine --------------------------------------------------------------------------------------

REFUSALS = (StartRefused, ConfigError, HardwareError, RecordingError)  # what `run` refuses with exit status 2 or 3


class DaemonMachine(RuleBasedStateMachine):
    judged: ClassVar[Judged] = Judged()
    examples: ClassVar[int] = 0  # machines built so far in this process: one per example
    found_after: ClassVar[int | None] = None  # the example in which the first violation was found
    steps: ClassVar[int] = 0

    def __init__(self) -> None:
        super().__init__()
        type(self).examples += 1
        self.root = Path(tempfile.mkdtemp(prefix="pi-controller-machine-"))
        self.folder = self.root / "plugins"
        self.config_path = self.root / "config.yaml"
        self.judge = Judge(self.judged)
        self.plant = plant()
        self.modules: dict[str, str] = {}  # the folder's modules by plugin name: keys of MODULES
        self.manifests: dict[str, Manifest] = {}  # and its manifests, with or without their module
        self.backup: tuple[dict[str, str], dict[str, Manifest]] | None = None  # while the folder is deleted
        self.on_disk = self.in_force = FIRST_CONFIG
        self.invalid_sensors: set[str] = set()
        self._logs = quiet_logs()
        self._logs.__enter__()
        self.rig = Rig(self.config_path, PINS, self._tick)
        self.laws: PinLaws | None = None
        self.last_tick: Any = None

    # -- judging -------------------------------------------------------------------------------

    def _tick(self, tick: Any) -> None:
        assert self.laws is not None
        self.last_tick = tick
        self._judged(lambda: self.laws.tick(tick))

    def _judged(self, judge: Any) -> None:
        try:
            judge()
        except invariants.Violation:
            if type(self).found_after is None:
                type(self).found_after = type(self).examples
            raise

    def _views(self) -> dict[str, PluginView]:
        assert self.rig.daemon is not None
        return {name: PluginView(s.state, s.sha256, s.reason) for name, s in self.rig.daemon.plugins.status.items()}

    def _files(self, name: str) -> Files | None:
        """What the folder holds for `name`, if its module is there."""
        return Files(self.modules[name], self.manifests.get(name)) if name in self.modules else None

    def _due(self, settings_checked: bool = True) -> list[str]:
        """The plugins of the config in force that must be loaded: named and enabled, runnable under their
        settings (or, unless `settings_checked`, under their manifest's terms alone: what check-config accepted
        must load), and fitting the plugin budget together."""
        due, kept = {}, 0
        running = {p.name: p.grant.timeout_ms for p in self.rig.daemon.plugins} if self.rig.daemon else {}
        for name in self.in_force.enabled():
            files, entry = self._files(name), self.in_force.entries[name]
            if files is not None and runnable(name, files, entry if settings_checked else None):
                due[name] = entry.timeout_ms or files.timeout_ms() or DEFAULT_TIMEOUT_MS
            else:  # a version running still, its replacement refused, holds its share
                kept += running.get(name, 0)
        return sorted(due) if sum(due.values()) + kept <= self.in_force.budget_ms else []

    @invariant()
    def configured_plugins_run(self) -> None:
        type(self).steps += 1  # hypothesis checks invariants after every step
        if self.rig.daemon is None or self.rig.gap_pending():
            return
        views = self._views()
        self._judged(lambda: self.judge.configured_loaded(views, self._due(), "after the last step"))
        ready, _ = self.rig.readiness.ready()
        self._judged(lambda: self.judge.ready(ready, views, self.in_force.enabled(), "after the last step"))
        daemon = self.rig.daemon
        live, shadows = ({p.name: p.grant.timeout_ms for p in plugins}
                         for plugins in (daemon.plugins, daemon.shadows.current.plugins))
        self._judged(lambda: self.judge.shares(live, shadows, self.in_force.budget_ms, "after the last step"))

    # -- setting up and down -------------------------------------------------------------------

    @initialize()
    def start(self) -> None:
        self.folder.mkdir()
        self._write_sensor("20.0")
        for name, files in FIRST_FILES.items():
            self._put(name, files)
        self._write_config(FIRST_CONFIG)
        self._start()

    def _start(self) -> None:
        self.rig.start()
        assert self.rig.life is not None
        self.laws = PinLaws(self.plant, self.rig.life.started_at, self.rig.life.first_pins, self.judged)
        self.laws.invalid_sensors = set(self.invalid_sensors)
        self.rig.finish()

    def teardown(self) -> None:
        try:
            if self.rig.daemon is not None and self.laws is not None:
                life = self.rig.stop()
                assert life.last_pins is not None
                self._judged(lambda: self.laws.stopped(life.last_pins))
        finally:
            self.rig.close()
            self._logs.__exit__(None, None, None)
            shutil.rmtree(self.root, ignore_errors=True)

    # -- files ---------------------------------------------------------------------------------

    def _put(self, name: str, files: Files) -> None:
        """Into the folder as `plugin install` puts a plugin: each file written aside and renamed into
        place, the manifest first, a manifest it lacks removed."""
        self._put_manifest(name, files.manifest)
        self._rename_in(f"{name}.wasm", MODULES[files.module])
        self.modules[name] = files.module

    def _put_manifest(self, name: str, manifest: Manifest | None) -> None:
        if manifest is None:
            (self.folder / f"{name}.yaml").unlink(missing_ok=True)
            self.manifests.pop(name, None)
        else:
            self._rename_in(f"{name}.yaml", manifest.text(name).encode())
            self.manifests[name] = manifest

    def _rename_in(self, file_name: str, data: bytes) -> None:
        staging = self.root / "staging" / file_name
        staging.parent.mkdir(parents=True, exist_ok=True)
        staging.write_bytes(data)
        os.replace(staging, self.folder / file_name)

    def _write_config(self, choice: Config) -> None:
        partial = self.config_path.with_suffix(".partial")
        partial.write_text(config_text(self.root, choice))
        os.replace(partial, self.config_path)
        self.on_disk = choice

    def _write_sensor(self, state: str) -> None:
        path = self.root / "w1" / W1_ID / "w1_slave"
        path.parent.mkdir(parents=True, exist_ok=True)
        if state == "missing":
            path.unlink(missing_ok=True)
        else:
            verdict, milli = ("NO", 20000) if state == "crc" else ("YES", 85000 if state == "power_on" else
                                                                   round(float(state) * 1000))
            partial = path.with_suffix(".new")
            partial.write_text(f"00 00 00 00 00 00 00 00 00 : crc=00 {verdict}\n00 00 00 00 00 00 00 00 00 t={milli}\n")
            os.replace(partial, path)
        valid = state not in ("crc", "missing", "power_on") and -20 <= float(state) <= 60
        self.invalid_sensors = set() if valid else {SENSOR}
        if self.laws is not None:
            self.laws.invalid_sensors = set(self.invalid_sensors)

    # -- rules: the plugins folder -------------------------------------------------------------

    @precondition(lambda self: self.folder.is_dir())
    @rule(name=plugin_names, files=files)
    def drop(self, name: str, files: Files) -> None:
        """A plugin dropped in, or its files replaced."""
        self._put(name, files)
        self.rig.finish()

    @precondition(lambda self: self.folder.is_dir())
    @rule(name=plugin_names, mode=st.sampled_from(["trap", "silent", "on"]))
    def drop_greedy(self, name: str, mode: str) -> None:
        """A plugin dropped in that claims the highest priority and the longest call its ceilings allow."""
        self._put(name, Files("switchboard", Manifest(priority=999, timeout_ms=50, config={"mode": mode})))
        self.rig.finish()

    @precondition(lambda self: self.folder.is_dir())
    @rule(name=plugin_names, manifest=manifests)
    def rewrite_manifest(self, name: str, manifest: Manifest | None) -> None:
        """A manifest written, replaced or removed, its module there or not (yet)."""
        self._put_manifest(name, manifest)
        self.rig.finish()

    @precondition(lambda self: self.folder.is_dir())
    @rule(name=plugin_names, actuators=st.sampled_from([None, ("heater",), ("lamp",), ("cooler",), ()]))
    def regrant(self, name: str, actuators: tuple[str, ...] | None) -> None:
        """Its manifest rewritten with other actuators granted, and nothing else changed."""
        self._put_manifest(name, replace(self.manifests.get(name, Manifest()), actuators=actuators))
        self.rig.finish()

    @precondition(lambda self: self.folder.is_dir())
    @rule(name=plugin_names, priority=st.sampled_from([None, 1, 20, 999]), timeout_ms=st.sampled_from([None, 20, 50]))
    def reprioritize(self, name: str, priority: int | None, timeout_ms: int | None) -> None:
        """Its manifest rewritten with another priority and time limit, and nothing else changed."""
        manifest = replace(self.manifests.get(name, Manifest()), priority=priority, timeout_ms=timeout_ms)
        self._put_manifest(name, manifest)
        self.rig.finish()

    @precondition(lambda self: self.folder.is_dir())
    @rule(name=plugin_names)
    def remove(self, name: str) -> None:
        self._remove(name)
        self.rig.finish()

    def _remove(self, name: str) -> None:
        (self.folder / f"{name}.yaml").unlink(missing_ok=True)
        (self.folder / f"{name}.wasm").unlink(missing_ok=True)
        self.modules.pop(name, None)
        self.manifests.pop(name, None)

    @precondition(lambda self: self.folder.is_dir())
    @rule(name=plugin_names, timeout_ms=st.sampled_from([None, 20, 50]))
    def drop_shadow(self, name: str, timeout_ms: int | None) -> None:
        """A shadow of `name` dropped into `shadow/`, asking `timeout_ms` of the tick."""
        (self.folder / "shadow").mkdir(exist_ok=True)
        self._rename_in(f"shadow/{name}.yaml", Manifest(timeout_ms=timeout_ms).text(name).encode())
        self._rename_in(f"shadow/{name}.wasm", MODULES["switchboard"])
        self.rig.finish()

    @precondition(lambda self: (self.folder / "shadow").is_dir())
    @rule(name=plugin_names)
    def remove_shadow(self, name: str) -> None:
        for suffix in (".yaml", ".wasm"):
            (self.folder / "shadow" / f"{name}{suffix}").unlink(missing_ok=True)
        self.rig.finish()

    @precondition(lambda self: self.folder.is_dir())
    @rule()
    def delete_folder(self) -> None:
        """`rm -rf plugins` under the running daemon."""
        for name in sorted(set(self.modules) | set(self.manifests)):
            (self.folder / f"{name}.yaml").unlink(missing_ok=True)
            (self.folder / f"{name}.wasm").unlink(missing_ok=True)
        shutil.rmtree(self.folder)
        self.backup, self.modules, self.manifests = (self.modules, self.manifests), {}, {}
        self.rig.finish()

    @precondition(lambda self: not self.folder.is_dir())
    @rule()
    def recreate_folder(self) -> None:
        """`cp -r backup plugins`: the folder back, with the files it had."""
        self.folder.mkdir()
        self.modules, self.manifests = self.backup or ({}, {})
        self.backup = None
        for name, manifest in sorted(self.manifests.items()):
            (self.folder / f"{name}.yaml").write_text(manifest.text(name))
        for name, module in sorted(self.modules.items()):
            (self.folder / f"{name}.wasm").write_bytes(MODULES[module])
        self.rig.finish()

    @precondition(lambda self: self.folder.is_dir() and self.on_disk == self.in_force)
    @rule(name=plugin_names, files=files)
    def install(self, name: str, files: Files) -> None:
        """`pi-controller plugin install NAME.wasm --config CONFIG`, in-process, with the config the daemon
        runs."""
        source = self.root / "source"
        shutil.rmtree(source, ignore_errors=True)
        source.mkdir()
        if files.manifest is not None:
            (source / f"{name}.yaml").write_text(files.manifest.text(name))
        (source / f"{name}.wasm").write_bytes(MODULES[files.module])
        before = self._folder_files()
        installed, why = run_cli("plugin", "install", str(source / f"{name}.wasm"), "--config", str(self.config_path))
        kept = before == self._folder_files()
        if installed:
            self.modules[name] = files.module
            self.manifests.pop(name, None)
            if files.manifest is not None:
                self.manifests[name] = files.manifest
        self.rig.finish()
        view = self._views().get(name) if installed else None
        valid = runnable(name, files, self.in_force.entries.get(name))
        self._judged(lambda: self.judge.install(name, installed, why, valid, kept, view))

    def _folder_files(self) -> list[tuple[str, bytes]]:
        """The plugins folder's files (not its shadow folder), and what they hold."""
        return sorted((p.name, p.read_bytes()) for p in self.folder.iterdir() if p.is_file())

    # -- rules: the config ---------------------------------------------------------------------

    @precondition(lambda self: self.rig.daemon is not None)
    @rule(choice=configs)
    def reload(self, choice: Config) -> None:
        """A config written, `check-config`, then SIGHUP (the unit's ExecReload and its check)."""
        self._reload(choice)

    def _reload(self, choice: Config, meanwhile: Callable[[], None] | None = None, aside: str | None = None) -> None:
        """As `reload`; `meanwhile`: what else happens while the reload, prepared, waits for the gap, to the files
        of plugin `aside`, left out of the reload's judgement (what the watcher does next is the invariants')."""
        self._write_config(choice)
        accepted, _ = check_config(self.config_path, self.folder, choice)
        if accepted and choice.rate_hz != self.in_force.rate_hz:
            accepted = self._accepted_as_running(choice)
        daemon = self.rig.daemon
        assert daemon is not None
        before, settings, last = self._views(), daemon.settings, daemon.status.last_reload
        self.rig.sighup()
        self.rig.settle()
        kept = None
        if not self.rig.gap_pending():  # decided without the gap: refused
            kept = (self._views(), daemon.settings == settings)
        elif meanwhile is not None:
            meanwhile()
            self.rig.settle()  # what the watcher makes of it waits for the gap too, behind the reload
        self.rig.finish()
        result = daemon.status.last_reload
        if result is None or result is last:
            raise RigError("the SIGHUP did not reload")
        if result.outcome == "applied":  # with the loop's rate as it runs: `loop` waits for a restart
            self.in_force = replace(choice, rate_hz=self.in_force.rate_hz)
        after, settings_kept = kept or (self._views(), daemon.settings == settings)
        unloadable = [name for name, view in before.items() if view.live and self.modules.get(name) == "broken"]
        # Left out with `aside`: the plugins whose share of the tick went to it, by rank (admission), as the daemon
        # says: its files landed meanwhile, and the watcher loads them behind the reload.
        out = {aside} | {name for name, view in after.items() if f"went to {aside} (" in (view.reason or "")} \
            if aside else set()
        before, after = ({k: v for k, v in views.items() if k not in out} for views in (before, after))
        configured, due = ([n for n in names if n not in out] for names in (self.in_force.enabled(), self._due(False)))
        self._judged(lambda: self.judge.reload(accepted, result.outcome, result.message, before, after,
                                               settings_kept, configured, due, unloadable))

    def _accepted_as_running(self, choice: Config) -> bool:
        """Whether check-config accepts `choice` at the loop's running rate: a reload keeps that rate until a
        restart, so the plugins `choice` names must fit the running loop now, as well as its own at the next start."""
        running = replace(choice, rate_hz=self.in_force.rate_hz)
        path = self.root / "as-running.yaml"
        path.write_text(config_text(self.root, running))
        return check_config(path, self.folder, running)[0]

    @precondition(lambda self: self.rig.daemon is not None)
    @rule(name=plugin_names, entry=st.one_of(st.none(), entries))
    def reconfigure(self, name: str, entry: Entry | None) -> None:
        """The config in force with one plugin's settings changed (or removed), then as `reload`."""
        self.reload(self._with(name, entry))

    def _with(self, name: str, entry: Entry | None) -> Config:
        """The config in force with `name`'s settings changed to `entry` (None: removed), unbroken."""
        changed = {**self.in_force.entries, name: entry} if entry is not None else \
            {key: value for key, value in self.in_force.entries.items() if key != name}
        return replace(self.in_force, entries=changed, broken=None)

    @precondition(lambda self: self.rig.daemon is not None and self.folder.is_dir())
    @rule(name=plugin_names, entry=st.one_of(st.none(), entries), other=plugin_names, files=st.one_of(st.none(), files))
    def reconfigure_while_files_change(self, name: str, entry: Entry | None, other: str, files: Files | None) -> None:
        """As `reconfigure`, and `other`'s files dropped in (or removed: None) while the reload, prepared from the
        folder as it was, waits for the gap."""
        self._reload(self._with(name, entry),
                     lambda: self._put(other, files) if files is not None else self._remove(other), other)

    @precondition(lambda self: self.rig.daemon is not None and self.folder.is_dir())
    @rule(rate_hz=rates, restart=st.booleans())
    def change_rate(self, rate_hz: float, restart: bool) -> None:
        """The config in force with another loop rate, then as `reload` (the loop keeps its rate: `loop` needs a
        restart), then, if `restart`, as `restart`: the plugin budget grows or shrinks under the live plugins and
        the shadows in the shadow folder."""
        self.reload(replace(self.in_force, broken=None, rate_hz=rate_hz))
        if restart:
            self.restart()

    @precondition(lambda self: self.rig.daemon is not None and self.folder.is_dir())
    @rule(rate_hz=edge_rates, over=st.booleans(), restart=st.booleans())
    def budget_edge(self, rate_hz: float, over: bool, restart: bool) -> None:
        """The config in force with the loop rate `rate_hz`, and the two first plugins alone named in it, enabled,
        with timeouts that add up to the plugin budget exactly (or 1 ms `over` it), at that rate or the running one,
        whichever leaves less; then as `reload`, and `restart` if asked. check-config's verdict is the reload's
        (`reload` judges it), and the daemon runs as the config in force says (`runs_as_checked`)."""
        budget = min(replace(self.in_force, rate_hz=rate).budget_ms for rate in (rate_hz, self.in_force.rate_hz))
        total = round(budget) + over
        choice, under = (self._edge(rate_hz, ms) for ms in (total, total - 2))
        self.reload(choice)
        if not over:  # what check-config accepts 2 ms under the budget, it accepts at the budget
            self._judged(lambda: self.judge.at_budget(self._accepted(under), self._accepted(choice), total))
        self.runs_as_checked("after a reload at the edge of the plugin budget")
        if restart:
            self.restart()
            self.runs_as_checked("after a restart at the edge of the plugin budget")

    def _edge(self, rate_hz: float, total_ms: int) -> Config:
        """The config in force at `rate_hz`, with the two first plugins alone named in it, enabled, their timeouts
        adding up to `total_ms`."""
        entries = {name: replace(self.in_force.entries.get(name, Entry()), enabled=True, timeout_ms=ms)
                   for name, ms in zip(CONFIGURED, (total_ms // 2, total_ms - total_ms // 2), strict=True)}
        return replace(self.in_force, entries=entries, broken=None, rate_hz=rate_hz)

    def _accepted(self, choice: Config) -> bool:
        """Whether check-config accepts `choice` as a reload of it is judged: at its rate, and at the running one."""
        path = self.root / "checked.yaml"
        path.write_text(config_text(self.root, choice))
        accepted = check_config(path, self.folder, choice)[0]
        return accepted and (choice.rate_hz == self.in_force.rate_hz or self._accepted_as_running(choice))

    def runs_as_checked(self, when: str) -> None:
        """The daemon's loop rate and its plugins' timeouts as the config in force and their manifests give them."""
        daemon = self.rig.daemon
        assert daemon is not None and self.last_tick is not None
        running = {p.name: p.grant.timeout_ms for p in daemon.plugins}
        expected = {}
        for name in self._due():
            files, entry = self._files(name), self.in_force.entries[name]
            assert files is not None
            expected[name] = entry.timeout_ms or files.timeout_ms() or DEFAULT_TIMEOUT_MS
        self._judged(lambda: self.judge.runs_as_checked(self.last_tick.period, self.in_force.rate_hz,
                                                        {name: running.get(name) for name in expected}, expected,
                                                        when))

    @precondition(lambda self: self.rig.daemon is not None)
    @rule()
    def configured_plugins_called(self) -> None:
        """A tick, in which every plugin of the config that is due is called."""
        due = self._due()
        tick = self.rig.tick()
        verdicts = tick.trace.verdicts
        self._judged(lambda: self.judge.called(due, verdicts.answered, verdicts.failures, tick.trace.disabled,
                                               "in the tick after the last step"))
        self.rig.finish(0)

    @precondition(lambda self: self.folder.is_dir())
    @rule(timeout_ms=st.sampled_from([20, 30, 50]), priority=st.sampled_from([1, 999]),
          mode=st.sampled_from(["trap", "silent", "on"]))
    def crowd(self, timeout_ms: int, priority: int, mode: str) -> None:
        """Every plugin the config does not name dropped in at once, each asking `timeout_ms` of the tick at
        `priority`: together more than the plugin budget, whose shares the configured plugins keep."""
        for name in DROPPED:
            self._put(name, Files("switchboard", Manifest(priority=priority, timeout_ms=timeout_ms,
                                                          config={"mode": mode})))
        self.rig.finish()
        if self.rig.daemon is not None:
            self.configured_plugins_called()

    def _owned(self) -> list[tuple[str, str]]:
        """(actuator, plugin): the actuators off their safe state on a plugin's last word."""
        if self.laws is None or self.rig.daemon is None:
            return []
        return [(device, owner.plugin) for device, owner in sorted(self.laws.owners.items())
                if owner.plugin in NAMES and self.laws.pins[device] != self.plant.actuators[device].safe]

    @precondition(lambda self: self.folder.is_dir() and self.rig.daemon is not None)
    @rule(pick=st.integers(0, 2), keep=st.sampled_from([(), ("heater",), ("lamp",), ("cooler",), ("heater", "lamp")]))
    def narrow_grant_while_owning(self, pick: int, keep: tuple[str, ...]) -> None:
        """The manifest of a plugin that holds an actuator off its safe state rewritten to grant it only `keep`,
        without that actuator: it loses it at once (docs/plugins.md), to its safe state or another owner. Nothing,
        if no plugin holds one (not a precondition: who holds what may hang on a compile's timing, and hypothesis
        needs the rules it may draw to be the same on every run of a sequence)."""
        owned = self._owned()
        if not owned:
            return
        device, name = owned[pick % len(owned)]
        assert self.rig.daemon is not None
        live = name in {p.name for p in self.rig.daemon.plugins}  # unloaded, it fails as FAILSAFE says: no grant to end
        manifest = replace(self.manifests.get(name, Manifest()), actuators=tuple(a for a in keep if a != device))
        self._put_manifest(name, manifest)
        self.rig.finish()
        self.rig.ticks(1)
        entry, files = self.in_force.entries.get(name), self._files(name)
        if not live or self.rig.daemon is None or files is None or not runnable(name, files, entry) or \
                (entry is not None and entry.actuators is not None):  # the config's grant, not the manifest's
            return
        view = self._views().get(name)
        if view is not None and "replacement was refused" in (view.reason or ""):  # the running version stays
            return
        assert self.laws is not None
        value, owner = self.laws.pins[device], self.laws.owners[device].plugin
        self._judged(lambda: self.judge.grant_ends(device, name, value, self.plant.actuators[device].safe, owner,
                                                   "a tick after the narrowed manifest landed"))

    @precondition(lambda self: self.rig.daemon is not None and self.folder.is_dir())
    @rule(name=plugin_names, enabled=st.booleans(), files=files, files_first=st.booleans())
    def operator_switches_while_replaced(self, name: str, enabled: bool, files: Files, files_first: bool) -> None:
        """The operator switching `name` off (or on) over the operator's API, and its files replaced, in either
        order before the next tick: the switch holds whichever version runs."""
        daemon = self.rig.daemon
        assert daemon is not None
        running = name in {p.name for p in daemon.plugins}
        if files_first:
            self._put(name, files)
        daemon.operator.submit(EnablePlugin(name, enabled, "reply"))
        if not files_first:
            self._put(name, files)
        self.rig.finish()
        tick = self.rig.tick()
        self.rig.finish(0)
        if running and name in tick.plugins:
            verdicts = tick.trace.verdicts
            called = name in verdicts.answered or name in verdicts.failures
            self._judged(lambda: self.judge.switch_replaced(name, enabled, called, "a tick after both"))

    @precondition(lambda self: self.rig.daemon is not None)
    @rule(name=plugin_names, entry=st.one_of(st.none(), entries), other=plugin_names, enabled=st.booleans())
    def operator_switches_during_reload(self, name: str, entry: Entry | None, other: str, enabled: bool) -> None:
        """As `reconfigure`, and the operator switching `other` off (or on) over the operator's API while the
        reload, prepared, waits for the gap: the next tick takes the request up, the gap then adopts the reload."""
        daemon = self.rig.daemon
        assert daemon is not None
        running = self._views().get(other, PluginView("", None)).live  # the tick takes the request up before the gap
        submitted: list[EnablePlugin] = []  # not if the reload is refused before its gap

        def switch() -> None:
            submitted.append(EnablePlugin(other, enabled, "reply"))
            daemon.operator.submit(submitted[-1])

        self._reload(self._with(name, entry), switch)
        entry_now = self.in_force.entries.get(other)
        if submitted and running and (entry_now is None or entry_now.enabled) and other in daemon.plugins.status:
            held_off = other in daemon.operator.disabled
            self._judged(lambda: self.judge.switch(other, enabled, held_off, "switched during a reload"))

    @precondition(lambda self: self.rig.daemon is not None)
    @rule(unwritable=st.booleans())
    def record(self, unwritable: bool) -> None:
        """The config in force, asking for a recording where none can be written (or for none), then as
        `reload` (a recording is taken up at the next start)."""
        self.reload(replace(self.in_force, broken=None, unwritable_recording=unwritable))

    @precondition(lambda self: self.rig.daemon is not None and self.folder.is_dir())
    @rule()
    def restart(self) -> None:
        """The daemon stopped (SIGTERM) and started again from the config on disk."""
        accepted, _ = check_config(self.config_path, self.folder, self.on_disk)
        life = self.rig.stop()
        assert self.laws is not None and life.last_pins is not None
        self._judged(lambda: self.laws.stopped(life.last_pins))
        try:
            self._start()
            started, why = True, "started"
        except REFUSALS as exc:  # what `run` turns into an exit status of 2 or 3
            started, why = False, f"{type(exc).__name__}: {exc}"
        if started:
            self.in_force = self.on_disk
        views = self._views() if started else {}
        self._judged(lambda: self.judge.start(accepted, started, why, views, self._due(False)))
        if not started:  # the service down: the owner puts back the first config and its plugins, and starts
            self.in_force = FIRST_CONFIG
            self._write_config(FIRST_CONFIG)
            for name, files in FIRST_FILES.items():
                self._put(name, files)
            self._start()

    # -- rules: the operator -------------------------------------------------------------------

    @precondition(lambda self: self.rig.daemon is not None)
    @rule(name=plugin_names, setting=st.one_of(
        st.sampled_from([(k, v) for k, values in GOOD_VALUES.items() for v in values]), st.sampled_from(BAD_VALUES)))
    def operator_sets(self, name: str, setting: tuple[str, Any]) -> None:
        assert self.rig.daemon is not None
        self.rig.daemon.operator.submit(SetPluginConfig(name, setting[0], setting[1], "reply"))
        self.rig.finish()

    @precondition(lambda self: self.rig.daemon is not None)
    @rule(name=plugin_names, enabled=st.booleans())
    def operator_enables(self, name: str, enabled: bool) -> None:
        assert self.rig.daemon is not None
        self.rig.daemon.operator.submit(EnablePlugin(name, enabled, "reply"))
        self.rig.finish()

    @precondition(lambda self: self.rig.daemon is not None)
    @rule(device=devices, payload=override_payloads)
    def override(self, device: str, payload: bytes) -> None:
        assert self.rig.daemon is not None
        self.rig.daemon.operator.submit(SetActuator(device, payload, "reply"))
        self.rig.finish()

    @precondition(lambda self: self.rig.daemon is not None)
    @rule(device=devices)
    def release(self, device: str) -> None:
        assert self.rig.daemon is not None
        self.rig.daemon.operator.submit(Release(device, "reply"))
        self.rig.finish()

    @precondition(lambda self: self.rig.daemon is not None)
    @rule(name=plugin_names)
    def quarantine(self, name: str) -> None:
        """Its mode set to trap over the operator's API, then ticks until the daemon quarantines it."""
        daemon = self.rig.daemon
        assert daemon is not None
        daemon.operator.submit(SetPluginConfig(name, "mode", "trap", "reply"))
        for _ in range(15):
            self.rig.tick()
            if daemon.plugins.status.get(name, PluginView("", None)).state == "quarantined":
                break
        self.rig.finish()

    # -- rules: the world and time -------------------------------------------------------------

    @precondition(lambda self: self.rig.daemon is not None)
    @rule(state=sensor_states)
    def sensor(self, state: str) -> None:
        self._write_sensor(state)
        self.rig.finish()

    @precondition(lambda self: self.rig.daemon is not None)
    @rule(ticks=st.integers(1, 40))
    def advance(self, ticks: int) -> None:
        self.rig.ticks(ticks)
        self.rig.finish(0)

    @precondition(lambda self: self.rig.daemon is not None)
    @rule(seconds=st.sampled_from([0.5, 2.0, 6.0]))
    def stall(self, seconds: float) -> None:
        self.rig.stall(seconds)
        self.rig.finish()


def checking(*names: str, matching: str | None = None, leaving_out: Collection[str] = ()) -> type[DaemonMachine]:
    """A `DaemonMachine` that judges only the invariants `names` (all if none), only violations whose
    message matches `matching` when given, and never runs the rules `leaving_out`: to look for one kind
    of finding (one row of issue 25) while others are known."""
    unknown = set(names) - set(invariants.NAMES)
    if unknown:
        raise ValueError(f"no invariant {sorted(unknown)}; there are {', '.join(invariants.NAMES)}")
    attributes: dict[str, Any] = {"judged": Judged(names or invariants.NAMES, matching), "examples": 0,
                                  "found_after": None, "steps": 0}
    for rule_name in leaving_out:
        method = getattr(DaemonMachine, rule_name)
        attributes[rule_name] = precondition(lambda self: False)(method)
    return type(f"DaemonMachine_{'_'.join(names)}", (DaemonMachine,), attributes)

