"""The plugin author's kit on the command line: `pi-controller plugin call` and `plugin new`.

`call` runs one call of a `.wasm` the way the daemon would (its manifest, the config's settings and
ceilings, fuel, limits, host functions) on a context from a file or stdin, and prints what came back
with our contract's verdict on every command. The context file may hold a `history` key besides the
contract's (`{sensor_id: [[timestamp, value], ...]}`, oldest first): what `pi_history` answers.
`new` writes a plugin source from a template, ready for `pi-controller plugin build`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import yaml

from pi_controller import config
from pi_controller.names import PLUGIN_NAME_RULE, valid_plugin_name

TEMPLATES: dict[str, str] = {
    "zig": '''//! {name}: what it does, in one line. Built by `pi-controller plugin build`.

const pdk = @import("pdk");

export fn control_logic() i32 {{
    return pdk.run(step);
}}

fn step(ctx: *const pdk.Context, out: *pdk.Commands) !void {{
    const light = try ctx.configString("light", "led_strip");
    const lux = ctx.value("light_sensor") orelse return; // invalid or missing: no command
    if (lux > try ctx.configNumber("bright_lux", 500)) try out.setLow(light);
}}
''',
    "c": '''/* {name}: what it does, in one line. Built by `pi-controller plugin build`. */

#include "pdk.h"

PDK_EXPORT("control_logic") int control_logic(void) {{
    pdk_context ctx;
    if (!pdk_read_context(&ctx)) return 1;
    double lux;
    if (!pdk_sensor_value(&ctx, "light_sensor", &lux)) return pdk_commands_done(); /* invalid: no command */
    if (lux > pdk_config_number("bright_lux", 500)) pdk_set_low("led_strip");
    return pdk_commands_done();
}}
''',
    "ts": '''// {name}: what it does, in one line. Built by `pi-controller plugin build`.

import {{ Commands, Context, run }} from "{helper}";

export function control_logic(): i32 {{
  return run((ctx: Context, out: Commands): void => {{
    const lux = ctx.value("light_sensor"); // NaN when invalid or missing: no command
    if (lux > ctx.configNumber("bright_lux", 500)) out.setLow("led_strip");
  }});
}}
''',
}
MANIFEST_TEMPLATE = """# Beside {name}.wasm in the plugins folder. The daemon's config may override any of it.
name: {name}
version: 0.1.0
description: what it does
author: you
sensors: [light_sensor]      # its context holds only these readings
actuators: [led_strip]       # commands to any other actuator are rejected
config: {{bright_lux: 500}}
"""


def add_commands(plugin_commands: Any) -> None:
    call = plugin_commands.add_parser("call", help="run one call of a plugin on a context and show the verdicts")
    call.add_argument("wasm", type=Path, help="the plugin (.wasm); its manifest (.yaml) beside it is read")
    call.add_argument("--context", type=Path, help="JSON context file (default: stdin)")
    call.add_argument("--config", type=Path, help="daemon config: the plugin's settings, ceilings and actuators "
                                                  "(default: actuators from the context's device_states)")
    call.set_defaults(handler=run_call)
    new = plugin_commands.add_parser("new", help="write a new plugin source (and manifest) from a template")
    new.add_argument("name", help="the plugin's name: letters, digits and '_', not 'operator' or 'safety'")
    new.add_argument("--lang", choices=sorted(TEMPLATES), default="zig")
    new.add_argument("--dir", type=Path, default=Path("plugins/src"), help="where to write (default: plugins/src)")
    new.set_defaults(handler=run_new)


def run_new(args: argparse.Namespace) -> int:
    if not (valid_plugin_name(args.name) and args.name.isidentifier()):  # its sources use it as an identifier
        print(f"error: '{args.name}' is not a valid plugin name ({PLUGIN_NAME_RULE}; '_' rather than '-', as it is "
              "an identifier in the source)", file=sys.stderr)
        return 2
    source = args.dir / f"{args.name}.{args.lang}"
    manifest = args.dir / f"{args.name}.yaml"
    if source.exists():
        print(f"error: {source} exists", file=sys.stderr)
        return 1
    args.dir.mkdir(parents=True, exist_ok=True)
    source.write_text(TEMPLATES[args.lang].format(name=args.name, helper=_assemblyscript_helper(args.dir)))
    manifest.write_text(MANIFEST_TEMPLATE.format(name=args.name))
    print(f"wrote {source} and {manifest}; build with: pi-controller plugin build, then copy the .wasm "
          f"and the .yaml into the daemon's plugins folder")
    return 0


def _assemblyscript_helper(folder: Path) -> str:
    """How a source in `folder` imports plugins/assemblyscript/pi.ts: from the repository above it, or
    else from the one we are run in."""
    from pi_controller.plugins.build import AS_PROJECT

    for root in (*folder.resolve().parents, Path.cwd()):
        if (root / AS_PROJECT / "pi.ts").is_file():
            return os.path.relpath(root / AS_PROJECT / "pi", folder.resolve())
    return f"../{AS_PROJECT.name}/pi"  # as from plugins/src, where plugin build looks


MAX_CONTEXT_BYTES = 1024 * 1024


class ContextError(ValueError):
    """A context that is not what the contract describes: said in one line, before any call."""


def run_call(args: argparse.Namespace) -> int:
    if not args.wasm.is_file():  # before reading stdin, which may wait for a terminal
        print(f"error: {args.wasm}: no such plugin file", file=sys.stderr)
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
        settings = config.load(args.config) if args.config else _settings_for(context)
    except (ContextError, config.ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = call_once(args.wasm, context, settings)
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if "error" not in report and not report["rejected"] else 1


def _read_context(path: Path | None) -> bytes:
    """At most one byte more than a context may hold, from `path` or stdin."""
    try:
        with (path.open("rb") if path else sys.stdin.buffer) as source:
            return source.read(MAX_CONTEXT_BYTES + 1)
    except OSError as exc:
        raise ContextError(f"cannot read the context {path or 'from stdin'}: {exc.strerror or exc}") from None


def check_context(context: Any) -> None:
    """ContextError unless `context` has the contract's shape (every key optional), and `history`."""
    if not isinstance(context, dict):
        raise ContextError(f"the context must be a JSON object, not {_json_kind(context)}")
    _expect(context, "sensor_readings", list)
    for index, reading in enumerate(context.get("sensor_readings", [])):
        where = f"sensor_readings[{index}]"
        if not isinstance(reading, dict) or not isinstance(reading.get("sensor_id"), str):
            raise ContextError(f"{where} must be an object with a string sensor_id")
        for key, kinds in (("value", (int, float, type(None))), ("unit", str), ("timestamp", (int, float)),
                           ("error", (str, type(None)))):
            _expect(reading, key, kinds, where)
    _expect(context, "device_states", dict)
    if not all(isinstance(state, dict) for state in context.get("device_states", {}).values()):
        raise ContextError("device_states must map each actuator id to an object")
    _expect(context, "timestamp", (int, float))
    _expect(context, "tick", int)
    _expect(context, "config", dict)
    _expect(context, "history", dict)
    for sensor, pairs in context.get("history", {}).items():
        if not isinstance(pairs, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(_number(v) for v in p) for p in pairs):
            raise ContextError(f"history.{sensor[:64]} must be a list of [timestamp, value] pairs")


def _json_kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "true or false", type(None): "null"}.get(type(value), "a number")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _expect(data: dict[str, Any], key: str, kinds: Any, where: str = "the context") -> None:
    value = data.get(key)
    if key in data and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in (
            kinds if isinstance(kinds, tuple) else (kinds,))):
        raise ContextError(f"{key} in {where} has the wrong type ({type(value).__name__})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ContextError(f"{key} in {where} must be finite")


def _settings_for(context: Mapping[str, Any]) -> config.Settings:
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


def call_once(wasm: Path, context: dict[str, Any], settings: config.Settings) -> dict[str, Any]:
    """One call under the daemon's terms; what it returned and the contract's verdict, as JSON data.
    ContextError for a context `check_context` refuses."""
    import extism

    from pi_controller import contract
    from pi_controller.devices import actuators
    from pi_controller.devices.pins import make_factory
    from pi_controller.devices.sensors import Reading
    from pi_controller.plugins.host_functions import History, PluginHost
    from pi_controller.plugins.manifest import Refused, grant, load_manifest
    from pi_controller.plugins.quarantine import Quarantine
    from pi_controller.plugins.sandbox import PluginCallError, SandboxedPlugin
    from pi_controller.plugins.wasm_gate import read_module

    check_context(context)
    name = wasm.stem
    try:
        terms = grant(name, load_manifest(wasm), settings.plugins)
        terms = dataclasses.replace(terms, config={**terms.config, **context.get("config", {})})
        history = History(settings.plugins.host.history_length)
        host = PluginHost(name, terms.sensors, history, settings.plugins.host)
        module = read_module(wasm, wasm.parent, settings.plugins.ceilings.max_file_bytes)
        plugin = SandboxedPlugin(name, module, terms, Quarantine(name, settings.plugins.quarantine), host)
    except (OSError, Refused, extism.Error) as exc:
        return {"plugin": name, "error": {"kind": "load_failed", "reason": str(exc)}, "rejected": []}
    factory = make_factory(settings, simulate=True)
    targets = {entry.id: actuators.build(entry, factory) for entry in settings.actuators}
    readings = [Reading(r["sensor_id"], r.get("value"), r.get("unit", ""), r.get("timestamp", 0.0), r.get("error"))
                for r in context.get("sensor_readings", [])]
    for sensor, pairs in context.get("history", {}).items():  # what pi_history answers, oldest first
        history.record(Reading(sensor, value, "", timestamp) for timestamp, value in pairs)
    history.record(readings)  # as in the loop: this tick's reading is the newest
    states = contract.encode_states(context.get("device_states", {}))
    prefix = contract.encode_context(readings, states, context.get("timestamp", 0.0), context.get("tick", 0))
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
