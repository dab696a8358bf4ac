"""The plugin author's kit on the command line: `pi-controller plugin call` and `plugin new`.

`call` runs one call of a `.wasm` the way the daemon would (its manifest, the config's settings and
ceilings, fuel, limits, host functions) on a context from a file or stdin, and prints what came back
with our contract's verdict on every command. The context file may hold a `history` key besides the
contract's (`{sensor_id: [[timestamp, value], ...]}`, oldest first): what `pi_history` answers.
`new` writes a plugin from templates (`templates`): its source, manifest, a sample context for `call`
and a scenario for `simulate`, into any folder; `pi-controller plugin build` builds it there.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import yaml

from pi_controller import config
from pi_controller.files import open_to_read, path_argument
from pi_controller.names import PLUGIN_NAME_RULE, valid_plugin_name
from pi_controller.plugins import templates

if TYPE_CHECKING:
    from pi_controller.plugins.manifest import Devices


def add_commands(plugin_commands: Any) -> None:
    call = plugin_commands.add_parser("call", help="run one call of a plugin on a context and show the verdicts")
    call.add_argument("wasm", type=path_argument, help="the plugin (.wasm); its manifest (.yaml) beside it is read")
    call.add_argument("--context", type=path_argument, help="JSON context file (default: stdin)")
    call.add_argument("--config", type=path_argument,
                      help="daemon config: the plugin's settings, ceilings and actuators "
                           "(default: actuators from the context's device_states)")
    call.set_defaults(handler=run_call)
    new = plugin_commands.add_parser("new", help="write a new plugin: source, manifest, sample context, scenario")
    new.add_argument("name", help="the plugin's name: letters, digits and '_', not 'operator' or 'safety'")
    new.add_argument("--lang", choices=sorted(templates.SOURCES), default="zig",
                     help="zig (default), c, or ts (AssemblyScript)")
    new.add_argument("--dir", type=path_argument, default=Path("."),
                     help="where to write (default: the current folder)")
    new.set_defaults(handler=run_new)


def run_new(args: argparse.Namespace) -> int:
    if not valid_plugin_name(args.name):
        print(f"error: '{args.name}' is not a valid plugin name ({PLUGIN_NAME_RULE})", file=sys.stderr)
        return 2
    if args.dir.exists() and not args.dir.is_dir():
        print(f"error: --dir {args.dir} is not a folder", file=sys.stderr)
        return 2
    files = {args.dir / f"{args.name}.{args.lang}": templates.SOURCES[args.lang],
             args.dir / f"{args.name}.yaml": templates.MANIFEST,
             args.dir / f"{args.name}.context.json": templates.CONTEXT,
             args.dir / f"{args.name}.scenario.yaml": templates.SCENARIO}
    there = [str(path) for path in files if os.path.lexists(path)]
    if there:
        print(f"error: {', '.join(there)} already there; nothing written (another name, or another --dir)",
              file=sys.stderr)
        return 2
    try:
        args.dir.mkdir(parents=True, exist_ok=True)
        for path, template in files.items():
            path.write_text(template.format(name=args.name))
    except OSError as exc:
        print(f"error: cannot write into {args.dir}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    source, _, context, scenario = files
    wasm = source.with_suffix(".wasm")
    print("\n".join([
        f"wrote {source}, its manifest {args.name}.yaml, a sample context {context.name} and a scenario "
        f"{scenario.name}; then:",
        f"  pi-controller plugin build {source}",
        f"  pi-controller plugin call {wasm} --context {context}",
        f"  pi-controller simulate --config {scenario} --plugins {args.dir} --duration 15m",
        f"  pi-controller plugin install {wasm} --config /etc/pi-controller/config.yaml"]))
    return 0


MAX_CONTEXT_BYTES = 1024 * 1024


class ContextError(ValueError):
    """A context that is not what the contract describes: said in one line, before any call."""


def run_call(args: argparse.Namespace) -> int:
    from pi_controller.plugins.manifest import Refused, load_manifest

    if not args.wasm.is_file():  # before reading stdin, which may wait for a terminal
        print(f"error: {args.wasm}: no such plugin file", file=sys.stderr)
        return 2
    try:
        load_manifest(args.wasm)  # likewise
    except Refused as exc:
        print(f"error: {args.wasm}: {exc}", file=sys.stderr)
        return 2
    try:
        text = _read_context(args.context)
        if len(text) > MAX_CONTEXT_BYTES:
            raise ContextError(f"the context is longer than {MAX_CONTEXT_BYTES} bytes")
        try:
            context = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ContextError(f"the context is not JSON: {str(exc)[:120]}") from None
        check_context(context)
        settings = config.load(args.config) if args.config else settings_for(context)
        report = call_once(args.wasm, context, settings, checked=args.config is not None)
    except (ContextError, config.ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except LoadFailed as exc:
        print(f"error: {args.wasm}: {exc}", file=sys.stderr)
        return 2
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if "error" not in report and not report["rejected"] else 1


def _read_context(path: Path | None) -> bytes:
    """At most one byte more than a context may hold, from `path` or stdin."""
    try:
        with (open_to_read(path) if path else sys.stdin.buffer) as source:
            return source.read(MAX_CONTEXT_BYTES + 1)
    except OSError as exc:
        raise ContextError(f"cannot read the context {path or 'from stdin'}: {exc.strerror or exc}") from None


def check_context(context: Any) -> None:
    """ContextError unless `context` has the contract's shape (every key optional), and `history`."""
    if not isinstance(context, dict):
        raise ContextError(f"the context must be a JSON object, not {_json_kind(context)}")
    _known_keys(context, CONTEXT_KEYS, "the context")
    _expect(context, "sensor_readings", list)
    for index, reading in enumerate(context.get("sensor_readings", [])):
        where = f"sensor_readings[{index}]"
        if not isinstance(reading, dict) or not isinstance(reading.get("sensor_id"), str):
            raise ContextError(f"{where} must be an object with a string sensor_id")
        _known_keys(reading, READING_KEYS, where)
        for key, kinds in (("value", (int, float, type(None))), ("unit", str), ("timestamp", (int, float)),
                           ("error", (str, type(None)))):
            _expect(reading, key, kinds, where)
    _expect(context, "device_states", dict)
    if not all(isinstance(state, dict) for state in context.get("device_states", {}).values()):
        raise ContextError("device_states must map each actuator id to an object")
    _expect(context, "timestamp", (int, float))
    _expect(context, "monotonic", (int, float))
    _expect(context, "tick", int)
    _expect(context, "config", dict)
    _expect(context, "history", dict)
    for sensor, pairs in context.get("history", {}).items():
        if not isinstance(pairs, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(_number(v) for v in p) for p in pairs):
            raise ContextError(f"history.{sensor[:64]} must be a list of [timestamp, value] pairs")


CONTEXT_KEYS = ("sensor_readings", "device_states", "timestamp", "monotonic", "tick", "config", "history")
READING_KEYS = ("sensor_id", "value", "unit", "timestamp", "valid", "error")


def _known_keys(data: dict[str, Any], known: Sequence[str], where: str) -> None:
    """A misspelled key is refused, not ignored: `sensor_reading` would run the plugin on no readings."""
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the keys are {', '.join(known)}"
            raise ContextError(f"unknown key {key[:64]!r} in {where}: {hint}")


def _json_kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "true or false", type(None): "null"}.get(type(value), "a number")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _expect(data: dict[str, Any], key: str, kinds: Any, where: str = "the context") -> None:
    value = data.get(key)
    if key in data and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in (
            kinds if isinstance(kinds, tuple) else (kinds,)))):
        raise ContextError(f"{key} in {where} has the wrong type ({type(value).__name__})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ContextError(f"{key} in {where} must be finite")


def settings_for(context: Mapping[str, Any]) -> config.Settings:
    """Settings with one default actuator per entry of the context's device_states, on mock pins."""
    devices = context.get("device_states", {})
    pins = iter(range(2, 28))
    actuators = [{"id": name, "kind": kind, **{key: next(pins, 27) for key in _pin_keys(kind)}}
                 for name, kind in ((name, state.get("type", "relay")) for name, state in devices.items())]
    return config.parse(yaml.safe_dump({"pins": {"factory": "mock"}, "actuators": actuators}), Path("<context>"))


def _pin_keys(kind: Any) -> list[str]:
    """The pins an actuator kind needs (a kind that does not exist gets "pin": the config names the kind)."""
    from pi_controller.devices.registry import ACTUATORS
    from pi_controller.schema import required_pins

    return required_pins(ACTUATORS[kind]) if isinstance(kind, str) and kind in ACTUATORS else ["pin"]


class LoadFailed(ValueError):
    """A plugin the daemon would not load (its file, manifest, grant or compile): said in one line that calls
    the file "it", for its caller to name once."""


def load_plugin(wasm: Path, settings: config.Settings, extra_config: Mapping[str, Any] | None = None,
                devices: Devices | None = None) -> Any:
    """`wasm` loaded as the daemon would load it from its folder under `settings` (the gate;
    `manifest.terms`: signature, manifest and grant; the trial compile and health check), its config topped
    up with `extra_config`: a SandboxedPlugin whose host's `history` answers pi_history. `devices`: what its
    grant may name (a `manifest.Devices`; None: not checked, as without a config). LoadFailed with the reason."""
    import extism

    from pi_controller.plugins.host_functions import History, PluginHost
    from pi_controller.plugins.manifest import Refused
    from pi_controller.plugins.manifest import terms as terms_of
    from pi_controller.plugins.quarantine import Quarantine
    from pi_controller.plugins.sandbox import SandboxedPlugin
    from pi_controller.plugins.wasm_gate import read_module

    name = wasm.stem
    try:
        module = read_module(wasm, wasm.parent, settings.plugins.ceilings.max_file_bytes, name="it")  # callers name it
        terms = terms_of(name, wasm, module, settings.plugins, devices)
        terms = dataclasses.replace(terms, config={**terms.config, **(extra_config or {})})
        host = PluginHost(name, terms.sensors, History(settings.plugins.host.history_length), settings.plugins.host)
        return SandboxedPlugin(name, module, terms, Quarantine(name, settings.plugins.quarantine), host)
    except (OSError, Refused, extism.Error) as exc:
        raise LoadFailed(str(exc)[:500]) from None


def call_once(wasm: Path, context: dict[str, Any], settings: config.Settings, checked: bool = False
              ) -> dict[str, Any]:
    """One call under the daemon's terms; what it returned and the contract's verdict, as JSON data.
    ContextError for a context `check_context` refuses, LoadFailed for a plugin the daemon would not load.
    `checked`: `settings` is a daemon's config, whose devices the plugin's grant must name."""
    from pi_controller import contract
    from pi_controller.contract import Reading
    from pi_controller.devices import actuators
    from pi_controller.devices.pins import make_factory
    from pi_controller.plugins.sandbox import PluginCallError

    check_context(context)
    from pi_controller.plugins.manifest import Devices

    plugin = load_plugin(wasm, settings, context.get("config", {}), Devices.of(settings) if checked else None)
    name, terms, history = plugin.name, plugin.grant, plugin.host.history
    factory = make_factory(settings.pins, settings.sensors, simulate=True)
    targets = {entry.id: actuators.build(entry, factory) for entry in settings.actuators}
    readings = [Reading(r["sensor_id"], r.get("value"), r.get("unit", ""), r.get("timestamp", 0.0), r.get("error"))
                for r in context.get("sensor_readings", [])]
    for sensor, pairs in context.get("history", {}).items():  # what pi_history answers, oldest first
        history.record([Reading(sensor, value, "", timestamp) for timestamp, value in pairs])
    history.record(readings)  # as in the loop: this tick's reading is the newest
    states = contract.encode_states(context.get("device_states", {}))
    prefix = contract.encode_context(readings, states, context.get("timestamp", 0.0), context.get("tick", 0),
                                     monotonic=context.get("monotonic", 0.0))
    report: dict[str, Any] = {"plugin": name, "sha256": plugin.sha256, "fuel": terms.fuel,
                              "timeout_ms": terms.timeout_ms, "memory_pages": terms.memory_pages}
    try:
        commands, rejections = plugin.decide(prefix, targets)
    except (PluginCallError, contract.OutputError) as exc:
        report["error"] = {"kind": exc.kind, "reason": str(exc)}
        commands, rejections = [], []
    finally:
        plugin.close()
        for target in targets.values():
            target.close()
    if plugin.last_output is not None:
        report["duration_ms"] = round(plugin.last_call_s * 1e3, 3)
        report["output"] = plugin.last_output.decode(errors="replace")
    report["accepted"] = [{"device_id": c.device_id, "action": c.action, "target": c.target} for c in commands]
    report["rejected"] = [{"device_id": r.device_id, "rule": r.rule, "reason": r.reason} for r in rejections]
    return report
