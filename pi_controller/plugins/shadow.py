"""Shadow plugins: a plugin in the plugins folder's `shadow/` subfolder, under a live plugin's name,
runs beside it every tick on the same context, within its own grant, and is never applied.

Its output is parsed and validated as the live plugin's is, then compared with the live plugin's,
per actuator (see `agreement`): the snapshot and metrics show how often they agreed and the last
time they did not. Through the safety rules, in a dry run
(`Safety.dry_run`): what the rules would hold back of its commands had they come this tick, to the
actuators as the live plugins left them (min_on and min_off, interlocks, max_on, required sensors,
rates), counted per actuator and rule; the live actuators' timers, owners, latches and counts are
never touched.

Shadows run after the actuators are written, so they never delay the live plugins' commands, and
they get the plugin time budget the live plugins leave, as it is after each change of the live set
(`follow_live`): a shadow that does not fit is refused at load, or unloaded, until the live plugins
leave it room, and on a real clock one is skipped (counted) in a tick already too late for its timeout. A
shadow's failures are its own: counted, quarantined as any plugin, never the live plugin's health.
`pi-controller plugin promote NAME` moves the shadow's file over the live one (see `promote`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import structlog

from pi_controller.clock import Clock
from pi_controller.config import PluginsSettings
from pi_controller.contract import Command, Context, Rejected, Rejection
from pi_controller.devices.actuators import Actuator
from pi_controller.files import path_argument
from pi_controller.logs import ChangeLog
from pi_controller.observer import TickTrace
from pi_controller.plugins import folder as plugin_folder
from pi_controller.plugins.agreement import Agreement, verdict_of
from pi_controller.plugins.plugin_config import check_change
from pi_controller.plugins.plugin_set import PluginSet
from pi_controller.plugins.sandbox import PluginCallError, SandboxedPlugin
from pi_controller.plugins.signing import SUFFIX
from pi_controller.safety.rules import Safety

log = structlog.get_logger("pi_controller.shadow")

FOLDER = "shadow"


class ShadowStats:
    def __init__(self, sha256: str) -> None:
        self.sha256 = sha256  # of the shadow compared: another file under its name starts over
        self.calls = 0
        self.errors = 0
        self.skipped = 0  # ticks left out: the tick's budget was spent
        self.held: Counter[tuple[str, str]] = Counter()  # (actuator, rule): what the rules would hold back
        self.agreement = Agreement("live", "shadow")


def share(live: PluginSet) -> tuple[float, str]:
    """The plugin time budget the live plugins leave, the shadows' budget, and where it comes from, as a refusal
    for want of room says it."""
    spare = max(0.0, live.budget_ms - sum(p.grant.timeout_ms for p in live))
    return spare, f"the live plugins leave {spare:g} of the {live.budget_ms:g} ms plugin budget"


class Shadows:
    """The shadow plugins of one plugins folder, and how each compares with its live plugin."""

    def __init__(self, settings: PluginsSettings, beside: PluginSet, follows: PluginSet, clock: Clock):
        """The shadows in `beside`'s folder, in what its plugins leave of the tick's budget, reading its history;
        `follows`: the live set whose operator values they follow (`_follow`), the daemon's own, which keeps its
        identity (a reload's `beside` is emptied into it once adopted)."""
        budget_ms, whence = share(beside)
        self.plugins = PluginSet(settings, beside.directory / FOLDER, budget_ms, beside.history, clock,
                                 devices=beside.devices, role="shadow", whence=whence)
        self.clock = clock
        self.live = follows
        self._followed: dict[str, tuple[SandboxedPlugin, dict[str, Any]]] = {}  # name -> shadow, live config
        self.stats: dict[str, ShadowStats] = {}
        self._problems = ChangeLog(log)
        # Whether the folder was there when the set was built (off the event loop, but for the daemon's first): what
        # the supervisor follows, without asking the folder again in the gap (it may be on a hung or slow mount).
        self.found = self.plugins.directory.is_dir()
        if self.found:  # not load_all: a live plugin without a shadow is no news
            self.plugins.apply(self.plugins.prepare(plugin_folder.modules(self.plugins.directory)))
            log.info("shadows_loaded", directory=str(self.plugins.directory), names=[p.name for p in self.plugins],
                     failed={name: s.reason for name, s in self.plugins.status.items() if s.state == "failed"})

    def __len__(self) -> int:
        return len(self.plugins)

    def follow_live(self) -> None:
        """Between two ticks, after the live set changed (a plugin swapped in or out, a reload): the shadows get
        what the live plugins leave now; one that no longer fits is unloaded, saying so, and one waiting for room
        that fits now is loaded again (by the shadow folder's watcher)."""
        self.plugins.rebudget(*share(self.live))

    def carry_on(self, previous: Shadows) -> None:
        """After a rebuild: the comparisons of each shadow whose file did not change go on."""
        for name, stats in previous.stats.items():
            now, before = self.plugins.status.get(name), previous.plugins.status.get(name)
            if now is not None and before is not None and now.sha256 == before.sha256:
                self.stats[name] = stats

    def consult(self, tick: TickTrace, context: Context, targets: Mapping[str, Actuator], safety: Safety,
                started: float) -> None:
        """Call each shadow whose live plugin was called in `tick`, on its context, compare, and dry-run
        its commands through `safety`; `started`: the tick's start on the clock's perf_counter."""
        called = tick.verdicts.answered + list(tick.verdicts.failures)  # the loop calls it only when there are shadows
        for shadow in self.plugins.members:
            if shadow.name not in called or tick.verdicts.failures.get(shadow.name) == "quarantined":
                continue
            stats = self.stats.get(shadow.name)
            if stats is None or stats.sha256 != shadow.sha256:  # a new shadow, or another file swapped in under it
                stats = self.stats[shadow.name] = ShadowStats(shadow.sha256)
            spent_ms = (self.clock.perf_counter() - started) * 1000
            if self.clock.real and spent_ms + shadow.grant.timeout_ms > self.live.budget_ms:
                stats.skipped += 1
                continue
            if not shadow.quarantine.admit(self.clock.monotonic(), tick.number):
                continue
            try:
                self._follow(shadow)
                self._compare(shadow, stats, tick, context, targets, safety)
            except Exception as exc:  # a bug of ours in a side show: logged once, never the loop's end
                self._problems.problem(("shadow", shadow.name), "shadow_failed", level="error", plugin=shadow.name,
                                       tick=tick.number, error=f"{type(exc).__name__}: {exc}"[:300])

    def _follow(self, shadow: SandboxedPlugin) -> None:
        """The config values the operator set on the live version (from Home Assistant, kept across restarts) onto
        its shadow, those it takes: the two are compared on one config, not the file's against the operator's."""
        live = self.live.named(shadow.name)
        followed = self._followed.get(shadow.name)
        if live is None or (followed is not None and followed[0] is shadow and followed[1] is live.config):
            return  # neither changed since (set_config makes a new config)
        self._followed[shadow.name] = (shadow, live.config)
        values = {}
        for key, value in live.config.items():
            if key in live.grant.config and live.grant.config[key] == value:
                continue  # the file's, not the operator's
            try:
                check_change(key, value, shadow.grant.config_schema, shadow.grant.config)
            except Rejected:
                continue  # a value this version does not take: it runs on its own
            values[key] = value
        shadow.set_config(values)

    def _compare(self, shadow: SandboxedPlugin, stats: ShadowStats, tick: TickTrace, context: Context,
                 targets: Mapping[str, Actuator], safety: Safety) -> None:
        stats.calls += 1
        number, verdicts = tick.number, tick.verdicts
        failed = None
        commands: list[Command] = []
        rejections: list[Rejection] = []
        try:
            commands, rejections = shadow.decide(context, targets)
        except Exception as exc:  # a shadow's failure is its own, and changes nothing live
            failed = PluginCallError.kind_of(exc)
            stats.errors += 1
        shadow.quarantine.record(self.clock.monotonic(), number, len(rejections) + (failed is not None),
                            failed or (rejections[0].reason if rejections else ""))
        for hold in safety.dry_run(commands, tick.readings, tick.time, tick.monotonic):
            stats.held[(hold.device_id, hold.rule)] += 1
        name = shadow.name
        live = verdict_of((c for c in tick.proposals if c.plugin == name),
                          (r for r in verdicts.rejections if r.plugin == name))
        agreed = stats.agreement.add(number, tick.time, live, verdict_of(commands, rejections),
                                     (verdicts.failures.get(name), failed))
        if not agreed and stats.agreement.differing[""] == 1:
            log.info("shadow_disagrees", plugin=name, tick=number, difference=stats.agreement.first[""])

    def agreement(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(plugin, actuator or "*" for whole calls) -> (ticks agreed, ticks compared), for metrics: of the
        shadows there now (one taken out keeps its comparisons, unshown, in case it comes back)."""
        result = {}
        running = self.plugins.status
        for name, stats in list(self.stats.items()):
            if name not in running:
                continue
            a = stats.agreement
            result[(name, "*")] = (a.ticks - a.differing[""], a.ticks)
            result.update(((name, device), (a.ticks - a.differing[device], a.ticks)) for device in list(a.seen))
        return result

    def agreement_of(self, name: str) -> dict[str, Any] | None:
        """How far the shadow of `name` agrees with it, whole and per actuator (for MQTT); None before
        it was first compared."""
        stats = self.stats.get(name)
        if stats is None:
            return None
        a = stats.agreement
        return {"agreement_percent": a.percent(""), "ticks": a.ticks,
                "actuators": {device: a.percent(device) for device in sorted(a.seen)},
                "last_difference": a.last.get("")}

    def snapshot(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for name, status in self.plugins.status.items():
            entry: dict[str, Any] = {"state": status.state}
            if status.reason:
                entry["reason"] = status.reason
            stats = self.stats.get(name)
            if stats is not None:
                entry |= {"calls": stats.calls, "errors": stats.errors, "skipped": stats.skipped,
                          "would_be_held": {f"{device}:{rule}": n for (device, rule), n in stats.held.items()}}
                entry |= stats.agreement.summary(last=True)
            result[name] = entry
        return result

    def close(self) -> None:
        self.plugins.close()


def promote(plugins_dir: Path, name: str) -> str:
    """Move shadow/NAME.wasm (and its manifest and signature) over the live plugin's files; returns what
    was done. A rename: the watcher sees the live file replaced at once and hot-swaps it."""
    shadow = plugins_dir / FOLDER / f"{name}.wasm"
    if not shadow.is_file():
        raise FileNotFoundError(f"no shadow plugin {shadow}")
    manifest, signature = shadow.with_suffix(".yaml"), shadow.with_suffix(SUFFIX)
    if manifest.is_file():  # first: the new module must not be loaded under the old terms
        os.replace(manifest, plugins_dir / manifest.name)
    elif os.path.lexists(plugins_dir / manifest.name):  # it described the old module, not this one
        os.unlink(plugins_dir / manifest.name)
    if signature.is_file():
        os.replace(signature, plugins_dir / signature.name)
    elif os.path.lexists(plugins_dir / signature.name):  # it signed the old module: the new one would fail it
        os.unlink(plugins_dir / signature.name)
    os.replace(shadow, plugins_dir / shadow.name)
    return f"promoted {shadow} to {plugins_dir / shadow.name}"


def add_command(plugin_commands: Any) -> None:
    """Register `plugin promote` on the plugin subcommands."""
    cmd = plugin_commands.add_parser("promote",
                                     help="make a shadow plugin live (moves shadow/NAME.wasm over NAME.wasm)")
    cmd.add_argument("name", help="the plugin's name")
    cmd.add_argument("--plugins", type=path_argument, required=True, help="the plugins folder")
    cmd.set_defaults(handler=_promote)


def _promote(args: argparse.Namespace) -> int:
    from pi_controller.names import PLUGIN_NAME_RULE, valid_plugin_name

    if not valid_plugin_name(args.name):
        print(f"error: {args.name[:80]!r} is no plugin name: {PLUGIN_NAME_RULE}", file=sys.stderr)
        return 2
    try:
        print(promote(args.plugins, args.name))
    except FileNotFoundError as exc:  # no such shadow or folder: a mistake in what was passed, as every command has it
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
