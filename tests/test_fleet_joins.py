"""Where a fleet rollout meets the rest of the daemon, seen from the other side of each join: the owner's hand
on the plugins folder (a version installed by hand, a plugin removed), a config reload, the tick's budget, the
files a rollback puts back. One real daemon (`daemon_rig.Rig`: mock pins, ticks granted one at a time, its
plugins folder followed) and a `FleetNode` ticked after each tick, as telemetry ticks it; the announcement and
the module's chunks handed to it as the inbox hands them. Nothing is timed: each test ticks until the node
says what it waits for, within a bound of ticks that only says how long a broken test runs."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from pi_controller import cli
from pi_controller.daemon import Daemon
from pi_controller.fleet import node as node_module
from pi_controller.fleet import protocol
from pi_controller.fleet.node import MIN_SWAP_TICKS, FleetNode
from pi_controller.fleet.protocol import Announcement, Verdict
from pi_controller.fleet.tool import Plan, announce
from pi_controller.mqtt.inbox import Inbound
from pi_controller.operator import EnablePlugin, PromotePlugin, SetPluginConfig
from pi_controller.plugins import install
from tests.conftest import TEST_PLUGINS, example_data, sha256_of, unsimulated
from tests.daemon_rig import Rig
from tests.test_fleet import version

NAME = "probe"
MAX_TICKS = 4 * MIN_SWAP_TICKS  # past the node's longest wait for a swap: only how long a broken test runs


class Site:
    """One node's daemon (`rig`) and its part in rollouts (`node`), with the keys and versions of `probe`."""

    def __init__(self, tmp: Path, write_config: Callable[[dict[str, Any]], Path]):
        self.tmp = tmp
        keys = tmp / "keys"
        keys.mkdir()
        assert cli.main(["plugin", "keygen", str(keys / "owner.pem")]) == 0
        self.key = keys / "owner.pem"
        self.live = version(tmp / "v1", TEST_PLUGINS / "counter.wasm", "1.0.0", self.key)
        self.new = version(tmp / "v2", TEST_PLUGINS / "switchboard.wasm", "2.0.0", self.key)
        self.folder = tmp / "plugins"
        self.folder.mkdir()
        for path in self.live.parent.iterdir():
            shutil.copy(path, self.folder / path.name)
        self.data = unsimulated(example_data())
        self.data["plugins"] |= {"directory": str(self.folder), "settings": {},
                                 "trusted_keys": [str(keys / "owner.pem.pub")]}
        self.write_config = write_config
        self.rig = Rig(write_config(self.data), {})
        self.node: FleetNode | None = None
        self.said: list[Verdict] = []

    def start(self, plugins: Path | None = None) -> None:
        """The daemon started (again) on the config as it stands (`plugins`: as `run --plugins` gives it), and its
        fleet node with its state folder."""
        daemon = self.rig.start(plugins)
        self.node = FleetNode(daemon.settings, daemon.status, self.tmp / "state")
        daemon.status.rollout_of = self.node.shown  # as the daemon wires its own (mqtt.fleet)

    def reload(self, change: Callable[[dict[str, Any]], None]) -> None:
        """The config changed by `change`, then SIGHUP, waited on until applied."""
        change(self.data)
        self.write_config(self.data)
        before = self.rig.daemon.status.last_reload if self.rig.daemon else None
        self.rig.sighup()
        for _ in range(MAX_TICKS):
            self.rig.finish()
            if self.rig.daemon is not None and self.rig.daemon.status.last_reload is not before:
                break
        assert self.rig.daemon is not None and self.rig.daemon.status.last_reload.outcome == "applied", \
            self.rig.daemon.status.last_reload

    def announce(self, wasm: Path, **windows: Any) -> Announcement:
        """A rollout of `wasm` with this node its canary, handed over (`hand_over`)."""
        assert self.node is not None
        a, module = announce(wasm, Plan((self.node.node,), **({"shadow_ticks": 10, "live_ticks": 10} | windows)))
        self.hand_over(a, module)
        return a

    def hand_over(self, a: Announcement, module: bytes) -> None:
        """`a` as the inbox hands it over (retained: again to a restarted node); `module`'s chunks as the broker
        sends them, once the node subscribes to them."""
        node = self.node
        assert node is not None
        routes = node.routes()

        def fetch(topic: str) -> None:
            for index in range(a.chunks):
                chunk = module[index * protocol.CHUNK_BYTES:(index + 1) * protocol.CHUNK_BYTES]
                inbound = Inbound(protocol.chunk_topic(node.site, a.sha256, index), chunk, True, (a.sha256, str(index)))
                routes[protocol.chunk_topic(node.site, "+", "+")].handle(inbound)

        node.wire(fetch, lambda topic: None)
        topic = protocol.rollout_topic(node.site, NAME)
        routes[protocol.rollout_topic(node.site, "+")].handle(Inbound(topic, a.payload(), True, (NAME,)))

    def tick(self) -> Verdict | None:
        """One tick, what it left for the gap and the watcher landed, then the node's turn; its last verdict."""
        node = self.node
        assert node is not None
        self.rig.tick()
        self.rig.settle()

        async def after_tick() -> None:  # on the daemon's event loop, as telemetry calls it
            node.tick(lambda topic, payload: self.said.append(Verdict.parse(payload)))

        self.rig.aio.run_until_complete(after_tick())
        self.rig.settle()
        return self.said[-1] if self.said else None

    def until(self, done: Callable[[Verdict], bool], what: str, within: int = MAX_TICKS) -> Verdict:
        for _ in range(within):
            verdict = self.tick()
            if verdict is not None and done(verdict):
                return verdict
        raise AssertionError(f"not within {within} ticks: {what}; the node said {self.said[-3:]}")

    def settle(self, done: Callable[[], bool], what: str) -> None:
        """Ticks until `done` (the node's file work lands on a worker thread)."""
        for _ in range(MAX_TICKS):
            if done():
                return
            self.tick()
        raise AssertionError(f"not within {MAX_TICKS} ticks: {what}")

    def ticks(self, count: int) -> Verdict | None:
        for _ in range(count):
            self.tick()
        return self.said[-1] if self.said else None

    def live_status(self) -> Any:
        assert self.rig.daemon is not None
        return self.rig.daemon.status.plugins.status.get(NAME)


@pytest.fixture
def site(tmp_path: Path, write_config, cli_logs: None) -> Iterator[Site]:
    made = Site(tmp_path, write_config)
    yield made
    made.rig.close()


def in_phase(*phases: str) -> Callable[[Verdict], bool]:
    return lambda verdict: verdict.phase in phases


def installed_by_hand(site: Site, number: str) -> Path:
    """Another version of `probe`, signed, put in with `plugin install` as its owner does."""
    wasm = version(site.tmp / f"hand-{number}", TEST_PLUGINS / "every_nth.wasm", number, site.key)
    assert cli.main(["plugin", "install", str(wasm), "--config", str(site.rig.config_path)]) == 0
    return wasm


def test_a_version_installed_by_hand_in_the_live_window_stays_and_ends_the_rollout(site) -> None:
    """The owner's `plugin install` while a promoted version is watched is the owner's word: the node must not
    take it for a failed promotion and put the version the rollout replaced back over it."""
    site.start()
    site.announce(site.new, live_ticks=1_000_000)
    site.until(lambda v: v.phase == protocol.LIVE_WINDOW and v.sha256 == sha256_of(site.new), "promoted")
    hand = installed_by_hand(site, "3.0.0")
    verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE, protocol.STOPPED), "the rollout ends")
    assert verdict.phase == protocol.REFUSED and "by hand" in (verdict.reason or ""), verdict
    assert verdict.sha256 == sha256_of(hand)
    site.ticks(MIN_SWAP_TICKS)  # nothing put back later either
    assert sha256_of(site.folder / f"{NAME}.wasm") == sha256_of(hand) == site.live_status().sha256
    assert (site.folder / f"{NAME}.yaml").read_bytes() == hand.with_suffix(".yaml").read_bytes()


def test_a_rollout_asks_the_plugins_folder_where_it_is_off_the_loops_thread(site, monkeypatch) -> None:
    """The folder a rollout works in is the followed one resolved (links and all: a path lookup on each level),
    and the plugins folder may be on a hung or slow mount: resolved where the plugin set is built, off the event
    loop, not at an announcement or a fetch in the node's turn after a tick."""
    site.start()
    askers: list[int] = []
    resolve = Path.resolve

    def resolved(path: Path, strict: bool = False) -> Path:
        if path == site.folder:
            askers.append(threading.get_ident())
        return resolve(path, strict)

    monkeypatch.setattr(Path, "resolve", resolved)
    site.announce(site.new, live_ticks=1_000_000)
    site.until(lambda v: v.phase == protocol.LIVE_WINDOW and v.sha256 == sha256_of(site.new), "promoted")
    assert threading.main_thread().ident not in askers, "resolved on the event loop's thread"


def removed_by_hand(site: Site) -> None:
    for suffix in (".wasm", ".yaml", ".sig"):
        (site.folder / f"{NAME}{suffix}").unlink()


@pytest.mark.parametrize("when", ["running", "stopped"])
def test_a_plugin_removed_by_hand_in_the_live_window_is_not_put_back_then_nor_after_a_restart(site, when) -> None:
    """The owner removes the plugin while its promoted version is watched, with the daemon running or stopped:
    the node ends its part (a rollout waits on no plugin that is gone), and never puts the version the rollout
    replaced back into the folder, at once or when the node starts again on its kept word."""
    site.start()
    a = site.announce(site.new, live_ticks=1_000_000)
    site.until(lambda v: v.phase == protocol.LIVE_WINDOW and v.sha256 == sha256_of(site.new), "promoted")
    if when == "running":
        removed_by_hand(site)
        verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE, protocol.STOPPED), "the rollout ends")
        assert verdict.phase == protocol.REFUSED and "removed" in (verdict.reason or ""), verdict
    site.rig.stop()
    if when == "stopped":
        removed_by_hand(site)
    site.start()
    site.said.clear()
    site.hand_over(a, site.new.read_bytes())  # the retained announcement, to the node started again
    verdict = site.until(lambda v: True, "a verdict")
    site.ticks(MIN_SWAP_TICKS)
    assert verdict.phase == site.said[-1].phase == protocol.REFUSED and "removed" in (verdict.reason or ""), verdict
    assert not (site.folder / f"{NAME}.wasm").exists() and site.live_status() is None


def test_a_plugin_disabled_by_a_reload_in_the_shadow_window_ends_the_rollout_and_its_shadow(site) -> None:
    """The owner disables the plugin (plugins.settings, SIGHUP) while its new version runs as a shadow: the
    shadow is compared with nothing from then on; the node says so at once and removes it."""
    site.start()
    site.announce(site.new, shadow_ticks=1_000_000)
    site.until(lambda v: v.phase == protocol.SHADOW and v.counts.get("shadow_ticks", 0) > 0, "compared")
    site.reload(lambda data: data["plugins"]["settings"].update({NAME: {"enabled": False}}))
    verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE, protocol.STOPPED), "the rollout ends")
    assert verdict.phase == protocol.REFUSED and "disabled" in (verdict.reason or ""), verdict
    site.ticks(2)
    assert list((site.folder / "shadow").glob(f"{NAME}.*")) == []  # module, manifest and signature
    assert sha256_of(site.folder / f"{NAME}.wasm") == sha256_of(site.live)
    assert site.live_status().state == "disabled"


def test_a_version_installed_by_hand_in_the_shadow_window_is_not_overwritten_by_the_promotion(site) -> None:
    """What the shadow was compared with, and checked beside, is the version that ran when the rollout began:
    the owner's `plugin install` of another one meanwhile is the owner's word, not the version to replace."""
    site.start()
    site.announce(site.new, shadow_ticks=30)
    site.until(lambda v: v.phase == protocol.SHADOW and v.counts.get("shadow_ticks", 0) > 0, "compared")
    hand = installed_by_hand(site, "3.0.0")
    verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE, protocol.STOPPED), "the rollout ends")
    assert verdict.phase == protocol.REFUSED and "by hand" in (verdict.reason or ""), verdict
    site.ticks(2)
    assert sha256_of(site.folder / f"{NAME}.wasm") == sha256_of(hand) == site.live_status().sha256
    assert not (site.folder / "shadow" / f"{NAME}.wasm").exists()


def trapping(site: Site) -> Path:
    """Version 3.0.0 of `probe`, signed: it traps on its 7th call (tests/plugins/src/trap_sometimes.zig)."""
    return version(site.tmp / "v3", TEST_PLUGINS / "trap_sometimes.wasm", "3.0.0", site.key)


@pytest.mark.parametrize("described", [True, False], ids=["manifest-and-signature", "bare-module"])
def test_a_rollback_puts_back_the_manifest_and_signature_of_the_version_it_restores(site, described) -> None:
    """The rolled-out version comes with its own manifest and signature; rolled back after its promotion, the
    folder holds the old module with the old manifest and signature again, byte for byte, or, for an old
    module that had neither, neither: never the new manifest beside the old module."""
    if not described:
        for suffix in (".yaml", ".sig"):
            (site.folder / f"{NAME}{suffix}").unlink()
    site.start()
    new = trapping(site)
    site.announce(new, shadow_ticks=3)
    verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE), "the rollout ends")
    assert verdict.phase == protocol.ROLLED_BACK and "after promotion" in (verdict.reason or ""), verdict
    assert verdict.sha256 == sha256_of(site.live) == site.live_status().sha256
    assert site.live_status().version == ("1.0.0" if described else None)
    for suffix in (".yaml", ".sig"):
        kept = site.live.with_suffix(suffix)
        assert (site.folder / kept.name).exists() == described
        if described:
            assert (site.folder / kept.name).read_bytes() == kept.read_bytes()


def install_filler(site: Site) -> None:
    """Another plugin, `filler`, ranked above `probe` (priority 50), holding 30 ms of the 60 ms plugin budget,
    put in with plugin install."""
    filler = site.tmp / "filler" / "filler.wasm"
    filler.parent.mkdir()
    shutil.copy(TEST_PLUGINS / "counter.wasm", filler)
    described(site, filler, "priority: 50\nlimits: {timeout_ms: 30}\n")
    assert cli.main(["plugin", "install", str(filler), "--config", str(site.rig.config_path)]) == 0


def test_a_shadow_whose_share_of_the_tick_a_plugin_dropped_in_takes_is_refused_at_once(site) -> None:
    """The new version asks 40 ms of the 60 ms plugin budget: room beside the live version's 10 ms when it was
    announced and checked, none once another plugin of higher rank takes 30 ms during its shadow window. The shadow
    is unloaded (the live plugins' shares come first), and the node says so at once, not after the longest wait
    for a shadow; the live version never changed."""
    described(site, site.new, 'version: "2.0.0"\nlimits: {timeout_ms: 40}\n')
    site.start()
    site.announce(site.new, shadow_ticks=1_000_000)
    site.until(lambda v: v.phase == protocol.SHADOW and v.counts.get("shadow_ticks", 0) > 0, "compared")
    install_filler(site)
    verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE), "the rollout ends", within=MIN_SWAP_TICKS)
    assert verdict.phase == protocol.REFUSED, verdict
    assert verdict.reason == ("as a shadow: unloaded: timeout_ms 40 does not fit the tick: 0 of the 20 ms plugin "
                              "budget is held by nothing (the live plugins leave 20 of the 60 ms plugin budget)")
    site.settle(lambda: shadow_files(site.folder) == [], "the shadow removed")
    assert verdict.sha256 == sha256_of(site.live) == site.live_status().sha256
    assert site.rig.daemon is not None and {p.name for p in site.rig.daemon.plugins} == {NAME, "filler"}


def test_a_promoted_version_whose_share_of_the_tick_a_plugin_dropped_in_with_it_takes_is_rolled_back_at_once(
        site, monkeypatch) -> None:
    """The owner drops `filler` (30 ms, ranked above `probe`) into the folder as the node promotes a version asking
    40 ms of the 60 ms plugin budget: in the ticks between the go-live check and the watcher loading the promoted
    files. The plugin set keeps the running version over the promoted one, and the node, told the module it
    refused, rolls back at once, not after the longest wait for a swap."""
    described(site, site.new, 'version: "2.0.0"\nlimits: {timeout_ms: 40}\n')
    filler = site.tmp / "filler" / "filler.wasm"
    filler.parent.mkdir()
    shutil.copy(TEST_PLUGINS / "counter.wasm", filler)
    described(site, filler, "priority: 50\nlimits: {timeout_ms: 30}\n")
    promote = node_module.promote

    def with_filler(directory: Path, name: str) -> str:
        for suffix in (".yaml", ".sig", ".wasm"):  # as plugin install puts them: the module last, by a rename
            shutil.copy(filler.with_suffix(suffix), directory / f".filler{suffix}")
            os.replace(directory / f".filler{suffix}", directory / f"filler{suffix}")
        return promote(directory, name)

    monkeypatch.setattr(node_module, "promote", with_filler)
    site.start()
    site.announce(site.new)
    verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE), "the rollout ends", within=MIN_SWAP_TICKS)
    assert verdict.phase == protocol.ROLLED_BACK, verdict
    assert verdict.reason is not None and verdict.reason.startswith("the promoted version did not load: ")
    site.settle(lambda: site.live_status().sha256 == sha256_of(site.live), "the version it replaced back")
    assert site.rig.daemon is not None and {p.name for p in site.rig.daemon.plugins} == {NAME, "filler"}


def test_a_rollout_stopped_while_the_node_was_away_in_its_shadow_window_leaves_no_shadow_behind(site) -> None:
    """The node stops with the new version running as a shadow; the rollout is stopped meanwhile (another node
    failed it). Started again on the retained announcement, the node says stopped and removes the shadow,
    which would otherwise run beside the live version for good, compared with it on every tick."""
    site.start()
    a = site.announce(site.new, shadow_ticks=1_000_000)
    site.until(lambda v: v.phase == protocol.SHADOW and v.counts.get("shadow_ticks", 0) > 0, "compared")
    site.rig.stop()
    site.start()
    site.said.clear()
    site.hand_over(replace(a, state="stopped"), site.new.read_bytes())
    verdict = site.until(lambda v: True, "a verdict")
    site.ticks(2)
    assert verdict.phase == protocol.STOPPED, verdict
    assert list((site.folder / "shadow").glob(f"{NAME}.*")) == []  # module, manifest and signature
    assert site.rig.daemon is not None and len(site.rig.daemon.shadows.current) == 0


def test_a_shadow_dropped_in_by_hand_after_a_rollout_failed_its_shadow_loads_on_its_own_terms(site) -> None:
    """A rollout whose shadow failed removes it whole: no manifest or signature of the fleet's version is left
    in shadow/ for the next module dropped there by hand, which would otherwise load under them (and fail)."""
    site.start()
    site.announce(trapping(site), shadow_ticks=20)
    verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE), "the rollout ends")
    assert verdict.phase == protocol.ROLLED_BACK and "never changed" in (verdict.reason or ""), verdict
    shutil.copy(TEST_PLUGINS / "every_nth.wasm", site.folder / "shadow" / f"{NAME}.wasm")
    assert site.rig.daemon is not None
    for _ in range(MAX_TICKS):
        site.tick()
        shadow = site.rig.daemon.shadows.current.plugins.status.get(NAME)
        if shadow is not None and shadow.sha256 == sha256_of(TEST_PLUGINS / "every_nth.wasm"):
            break
    assert shadow is not None and (shadow.state, shadow.reason) == ("loaded", None), shadow


NOTE = "config_schema: {note: {type: string, max_length: 32}}\n"  # a config key the operator may set


def described(site: Site, wasm: Path, manifest: str) -> None:
    """`wasm`'s manifest made `manifest`, signed again."""
    wasm.with_suffix(".yaml").write_text(manifest)
    assert cli.main(["plugin", "sign", str(wasm), "--key", str(site.key)]) == 0


def started_with_the_operators_note(site: Site) -> Daemon:
    """The running version (1.0.0) given a config key, `note` (in the folder too), the daemon started, and the
    operator's value of it, "operator", taken up."""
    described(site, site.live, f'version: "1.0.0"\nconfig: {{note: factory}}\n{NOTE}')
    for suffix in (".yaml", ".sig"):
        shutil.copy(site.live.with_suffix(suffix), site.folder / f"{NAME}{suffix}")
    site.start()
    daemon = site.rig.daemon
    assert daemon is not None
    daemon.operator.submit(SetPluginConfig(NAME, "note", "operator"))
    site.ticks(2)
    return daemon


def test_a_config_value_the_operator_set_is_in_force_again_once_a_rollout_is_rolled_back(site) -> None:
    """The operator set a config value of the running version (from Home Assistant); the rolled-out version
    has no such key, and is rolled back after its promotion: the version put back runs with the operator's
    value again, as before the rollout, not with the file's."""
    daemon = started_with_the_operators_note(site)
    assert {p.name: p for p in daemon.plugins}[NAME].config["note"] == "operator"
    site.announce(trapping(site), shadow_ticks=3)
    verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE), "the rollout ends")
    assert verdict.phase == protocol.ROLLED_BACK and "after promotion" in (verdict.reason or ""), verdict
    assert {p.name: p for p in daemon.plugins}[NAME].config["note"] == "operator"


def echoing(folder: Path, number: str, key: Path, section: bytes = b"") -> Path:
    """echo_output as `probe` at `number`: it commands what its config's `output` says, nothing of its own;
    `section`, a custom section appended (another module, the same behaviour). Signed with `key`."""
    folder.mkdir()
    wasm = folder / f"{NAME}.wasm"
    wasm.write_bytes((TEST_PLUGINS / "echo_output.wasm").read_bytes() + section)
    wasm.with_suffix(".yaml").write_text(yaml.safe_dump({
        "version": number, "config": {"output": pwm(30)}, "config_schema": {"output": {"type": "string"}}}))
    assert cli.main(["plugin", "sign", str(wasm), "--key", str(key)]) == 0
    return wasm


def pwm(duty: int) -> str:
    return json.dumps([{"device_id": "led_strip", "action": "pwm", "parameters": {"duty_cycle": duty}}])


def test_a_shadow_is_compared_with_the_live_version_on_the_operators_config_values(site) -> None:
    """The operator set a config value of the live version (a setpoint from Home Assistant): its shadow runs on
    it too, so the two are compared on the same config. Compared on the file's instead, a version doing the
    very same would disagree on every tick and fail the rollout's minimum agreement."""
    live = echoing(site.tmp / "echo-1", "1.0.0", site.key)
    for path in live.parent.iterdir():
        shutil.copy(path, site.folder / path.name)
    site.start()
    daemon = site.rig.daemon
    assert daemon is not None
    daemon.operator.submit(SetPluginConfig(NAME, "output", pwm(60)))
    site.ticks(2)
    new = echoing(site.tmp / "echo-2", "2.0.0", site.key, section=b"\x00\x03\x02v2")  # a custom section "v2"
    site.announce(new, shadow_ticks=20, min_agreement_percent=90)
    verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE), "the rollout ends")
    assert verdict.phase == protocol.LIVE and verdict.sha256 == sha256_of(new), verdict


def test_a_plugin_the_operator_switches_off_in_the_live_window_holds_the_window_until_switched_on(site) -> None:
    """Switched off from Home Assistant (not in the config: the operator's switch), the promoted version is not
    called: its live window waits, nothing is rolled back meanwhile, and it goes on once switched on again."""
    site.start()
    daemon = site.rig.daemon
    assert daemon is not None
    site.announce(site.new, live_ticks=20)
    site.until(lambda v: v.phase == protocol.LIVE_WINDOW and v.counts.get("calls", 0) > 0, "called once promoted")
    daemon.operator.submit(EnablePlugin(NAME, False))
    site.ticks(2)
    calls = site.said[-1].counts["calls"]
    verdict = site.ticks(MIN_SWAP_TICKS)
    assert verdict is not None and (verdict.phase, verdict.counts["calls"]) == (protocol.LIVE_WINDOW, calls), verdict
    assert sha256_of(site.folder / f"{NAME}.wasm") == sha256_of(site.new)
    daemon.operator.submit(EnablePlugin(NAME, True))
    verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE), "the rollout ends")
    assert verdict.phase == protocol.LIVE and verdict.sha256 == sha256_of(site.new), verdict


def test_a_reload_that_grants_the_promoted_version_more_keeps_its_live_window_going(site) -> None:
    """A SIGHUP reload in the live window that changes the plugin's terms (its share of the tick) reloads the
    same module under them: the window goes on counting its calls, and ends live."""
    site.start()
    site.announce(site.new, live_ticks=40)
    site.until(lambda v: v.phase == protocol.LIVE_WINDOW and v.counts.get("calls", 0) > 0, "called once promoted")
    site.reload(lambda data: data["plugins"]["settings"].update({NAME: {"timeout_ms": 20, "priority": 5}}))
    assert site.live_status().state == "loaded"
    assert {p.name: p for p in site.rig.daemon.plugins}[NAME].grant.timeout_ms == 20  # type: ignore[union-attr]
    verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE), "the rollout ends")
    assert verdict.phase == protocol.LIVE and verdict.sha256 == sha256_of(site.new), verdict
    assert verdict.counts["calls"] >= 40 and site.node is not None
    assert site.node.shown(NAME) == {"version": "2.0.0", "sha256": sha256_of(site.new), "phase": protocol.LIVE,
                                     "in_progress": False, "percent": 100, "summary": ""}


def test_a_reload_that_removes_an_actuator_which_failed_safe_before_the_rollout_fails_no_live_window(site) -> None:
    """The node counts failsafes on all its actuators from the promotion on. One that failed safe before the
    rollout (the operator switched its owner off a while) and that a reload in the live window removes takes
    its count with it: that is no failsafe of the version's, and the window ends live."""
    site.start()
    daemon = site.rig.daemon
    assert daemon is not None
    site.rig.ticks(2)
    daemon.operator.submit(EnablePlugin(NAME, False))  # the led strip's owner: it fails safe within a second
    for _ in range(MAX_TICKS):
        site.rig.tick()
        if daemon.loop.safety.failsafes["led_strip"]:
            break
    assert sum(daemon.loop.safety.failsafes.values()) == 1, daemon.loop.safety.failsafes
    daemon.operator.submit(EnablePlugin(NAME, True))
    site.announce(site.new, live_ticks=40)
    site.until(lambda v: v.phase == protocol.LIVE_WINDOW and v.counts.get("calls", 0) > 0, "called once promoted")
    site.reload(lambda data: data.update(actuators=[a for a in data["actuators"] if a["id"] != "led_strip"]))
    assert sum(daemon.loop.safety.failsafes.values()) == 0, daemon.loop.safety.failsafes  # its count went with it
    verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE), "the rollout ends")
    assert verdict.phase == protocol.LIVE and verdict.counts["failsafes"] == 0, verdict


def test_a_rollback_whose_kept_version_does_not_load_either_says_it_failed_and_which_version_runs(site) -> None:
    """A reload in the live window no longer trusts the key both versions are signed with: the promoted version
    is refused, the node puts the kept one back, and that one is refused too. The version it replaced does not run:
    the node must not say `rolled_back` but `rollback_failed`, as soon as the plugin set refuses that module (not
    after the longest wait for a swap, nor for ever), with why and what runs (the plugin set's word, in its verdict
    and reason), in its log line, the fleet tool's status and the update entity."""
    assert cli.main(["plugin", "keygen", str(site.tmp / "keys" / "other.pem")]) == 0
    site.start()
    node = site.node
    assert node is not None
    a = site.announce(site.new, live_ticks=1_000_000)
    site.until(lambda v: v.phase == protocol.LIVE_WINDOW and v.counts.get("calls", 0) > 0, "called once promoted")
    with capture_logs() as logs:
        site.reload(lambda data: data["plugins"].update(trusted_keys=[str(site.tmp / "keys" / "other.pem.pub")]))
        verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE), "the rollout ends", within=MIN_SWAP_TICKS)
    live = site.live_status()
    assert verdict.phase == protocol.ROLLBACK_FAILED and "did not load either" in (verdict.reason or ""), verdict
    assert "trusted_keys" in (verdict.reason or "")
    assert (verdict.version, verdict.sha256) == (live.version, live.sha256) != ("1.0.0", sha256_of(site.live))
    runs = f"version {live.version} ({live.sha256[:16]}..) runs still" if live.state == "loaded" else "no version runs"
    assert runs in (verdict.reason or ""), (verdict, live)
    assert [(e["event"], e["reason"]) for e in logs if e["event"].startswith("fleet_roll")][-1:] == [
        ("fleet_rollback_failed", verdict.reason)], logs
    assert node.shown(NAME) == {"version": a.version, "sha256": a.sha256, "phase": protocol.ROLLBACK_FAILED,
                                "in_progress": False, "percent": 0,
                                "summary": f"{protocol.ROLLBACK_FAILED}: {verdict.reason}"[:255]}
    assert sha256_of(site.folder / f"{NAME}.wasm") == sha256_of(site.live)  # what was kept, for a config that takes it


def test_a_version_without_a_manifest_promoted_over_one_with_a_manifest_runs_without_it(site) -> None:
    """The old version's manifest must not stay beside a new module that has none: it would describe another
    module (its version, its limits), and the new module's signature, over the module alone, would fail."""
    bare = site.tmp / "bare" / f"{NAME}.wasm"
    bare.parent.mkdir()
    shutil.copy(TEST_PLUGINS / "switchboard.wasm", bare)
    assert cli.main(["plugin", "sign", str(bare), "--key", str(site.key)]) == 0
    site.start()
    site.announce(bare)
    verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE), "the rollout ends")
    assert verdict.phase == protocol.LIVE and verdict.sha256 == sha256_of(bare), verdict
    assert not (site.folder / f"{NAME}.yaml").exists() and site.live_status().version is None


def test_the_update_entitys_install_during_a_rollouts_shadow_window_leaves_the_promotion_to_the_rollout(
        site) -> None:
    """Home Assistant's `update` entity shows the announced version in progress; its install (promote the
    shadow) pressed meanwhile is refused, saying why: the rollout promotes its shadow itself, once compared,
    keeping the running version's files for a rollback. Taken, it moved the shadow away under the rollout, which
    refused it as never loaded while it ran, with nothing kept to roll back to."""
    site.start()
    daemon = site.rig.daemon
    assert daemon is not None
    site.announce(site.new, shadow_ticks=30)
    site.until(lambda v: v.phase == protocol.SHADOW and v.counts.get("shadow_ticks", 0) > 0, "compared")
    with capture_logs() as logs:
        daemon.operator.submit(PromotePlugin(NAME))  # as the entity's install comes
        site.tick()
    assert [e["reason"] for e in logs if e["event"] == "operator_command_rejected"] == [
        "a fleet rollout of version 2.0.0 is under way: it promotes its shadow itself"]
    verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE), "the rollout ends")
    assert verdict.phase == protocol.LIVE and verdict.sha256 == sha256_of(site.new), verdict
    assert sha256_of(site.tmp / "state" / "fleet" / "previous" / NAME / f"{NAME}.wasm") == sha256_of(site.live)


@pytest.mark.parametrize("when", ["running", "stopped"])
def test_a_shadow_promoted_by_hand_in_its_window_ends_the_rollout_saying_so(site, when) -> None:
    """`plugin promote` by hand (what the daemon cannot refuse, unlike the update entity) moves the rollout's
    shadow over the live version before it was compared: the owner's word; the node says so at once, and leaves
    the version the owner made live, instead of refusing it later as a shadow that never loaded. Promoted while
    the node was stopped in that window, it says the same once started again (its note of the shadow it installed
    for this rollout tells it), not that the version is already live: a canary's verdict that lets the rollout's
    next stage in, for a version that never finished its shadow window. The note goes either way."""
    site.start()
    a = site.announce(site.new, shadow_ticks=1_000_000)
    site.until(lambda v: v.phase == protocol.SHADOW and v.counts.get("shadow_ticks", 0) > 0, "compared")
    if when == "stopped":
        site.rig.stop()
    assert cli.main(["plugin", "promote", NAME, "--plugins", str(site.folder)]) == 0
    if when == "stopped":
        site.start()
        site.said.clear()
        site.hand_over(a, site.new.read_bytes())  # the retained announcement, to the node started again
    verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE), "the rollout ends")
    assert verdict.phase == protocol.REFUSED and "promoted by hand" in (verdict.reason or ""), verdict
    site.ticks(MIN_SWAP_TICKS)
    assert sha256_of(site.folder / f"{NAME}.wasm") == sha256_of(site.new) == site.live_status().sha256
    assert not (site.tmp / "state" / "fleet" / "shadow" / f"{NAME}.json").exists()


def test_a_rollout_replaced_while_its_shadow_is_being_installed_leaves_no_shadow_behind(site) -> None:
    """A new rollout of the plugin that leaves this node out arrives while the node checks and installs the
    shadow of the one it replaces (on a worker thread): that shadow, landing after the new rollout, is removed
    too, not left to run beside the live version for good."""
    site.start()
    node = site.node
    assert node is not None
    a, module = announce(site.new, Plan((node.node,), shadow_ticks=1_000_000))
    elsewhere = replace(a, rollout="1796633878-00000000", stages=(("another-node",),))
    routes = node.routes()

    def fetch(topic: str) -> None:  # the module, then at once the rollout that replaces it
        for index in range(a.chunks):
            chunk = module[index * protocol.CHUNK_BYTES:(index + 1) * protocol.CHUNK_BYTES]
            inbound = Inbound(protocol.chunk_topic(node.site, a.sha256, index), chunk, True, (a.sha256, str(index)))
            routes[protocol.chunk_topic(node.site, "+", "+")].handle(inbound)
        topic = protocol.rollout_topic(node.site, NAME)
        routes[protocol.rollout_topic(node.site, "+")].handle(Inbound(topic, elsewhere.payload(), True, (NAME,)))

    site.hand_over(a, module)
    node.wire(fetch, lambda topic: None)
    site.until(lambda v: (v.rollout, v.phase) == (a.rollout, protocol.STOPPED), "the replaced rollout's end said")
    assert node.rollouts == {}  # the new rollout is not this node's
    assert list((site.folder / "shadow").glob(f"{NAME}.*")) == []


def shadow_files(folder: Path) -> list[Path]:
    return list((folder / "shadow").glob(f"{NAME}.*"))  # module, manifest and signature


def test_a_rollout_replaced_while_the_node_was_away_in_its_shadow_window_leaves_no_shadow_behind(site) -> None:
    """The node stops with the new version running as a shadow, and the rollout is replaced meanwhile by one that
    leaves this node out. Nothing of the node's word is kept before a promotion, but the shadow it installed is
    noted: started again on the new announcement, the node removes it, which would otherwise run beside the live
    version for good, compared with it on every tick."""
    site.start()
    a = site.announce(site.new, shadow_ticks=1_000_000)
    site.until(lambda v: v.phase == protocol.SHADOW and v.counts.get("shadow_ticks", 0) > 0, "compared")
    site.rig.stop()
    site.start()
    elsewhere = replace(a, rollout="1796633878-00000000", stages=(("another-node",),))
    site.hand_over(elsewhere, site.new.read_bytes())
    daemon = site.rig.daemon
    assert daemon is not None and len(daemon.shadows.current) == 1  # the shadow came back with the node
    site.settle(lambda: not shadow_files(site.folder) and len(daemon.shadows.current) == 0, "the shadow removed")
    assert site.node is not None and site.node.rollouts == {}  # the new rollout is not this node's
    assert sha256_of(site.folder / f"{NAME}.wasm") == sha256_of(site.live) == site.live_status().sha256


@pytest.mark.parametrize("window", ["shadow", "live_window"])
def test_a_rollout_replaced_while_the_node_was_away_ends_under_its_own_version_not_the_replacing_ones(
        site, window) -> None:
    """Started again on a rollout of another version that leaves it out, the node ends the one it was in (kept by
    its shadow's note, or its word in the live window) under that one's version and module: its update entity and
    its log line never name the replacing rollout's."""
    site.start()
    a = site.announce(site.new, shadow_ticks=1 if window == "live_window" else 1_000_000, live_ticks=1_000_000)
    site.until(lambda v: v.phase == window and (window != "shadow" or v.counts.get("shadow_ticks", 0) > 0), window)
    site.rig.stop()
    site.start()
    elsewhere = replace(a, rollout="1796633878-00000000", stages=(("another-node",),), version="9.9.9",
                        sha256="f" * 64)
    shown: list[dict[str, Any] | None] = []
    with capture_logs() as logs:
        site.hand_over(elsewhere, site.new.read_bytes())
        node = site.node
        assert node is not None
        site.settle(lambda: shown.append(node.shown(NAME)) or (shown[-1] is None and len(shown) > 1), "its end said")
    # Shown while its shadow is removed; one in the live window has no shadow, and ends at the node's first turn.
    assert {(s["version"], s["sha256"]) for s in shown if s is not None} == (
        {(a.version, a.sha256)} if window == "shadow" else set())
    assert [(e["rollout"], e["version"]) for e in logs if e["event"] == "fleet_rollout_stopped"] == [
        (a.rollout, a.version)]


def refused_when_checked(site: Site, reason: str) -> None:
    """`site.new` announced: refused within the longest wait for a shadow, saying `reason`, with no shadow file
    left and the live version running."""
    site.announce(site.new, shadow_ticks=20)
    verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE), "the rollout ends", within=MIN_SWAP_TICKS)
    assert (verdict.phase, verdict.reason) == (protocol.REFUSED, reason), verdict
    assert shadow_files(site.folder) == [] and site.live_status().sha256 == sha256_of(site.live)


def test_a_rollout_whose_shadow_would_not_fit_the_tick_is_refused_at_its_announcement(site) -> None:
    """The new version asks 45 ms of the 60 ms plugin budget: room in the live version's place, but a shadow runs
    beside the live plugins, in the 40 ms they leave. The shadow set refuses it, by its own rule (the one that
    weighs the other shadows too), and the node says so at once in one line, not after the longest wait for a
    shadow, with its files removed and nothing of it running."""
    described(site, site.live, 'version: "1.0.0"\nlimits: {timeout_ms: 20}\n')
    for suffix in (".yaml", ".sig"):
        shutil.copy(site.live.with_suffix(suffix), site.folder / f"{NAME}{suffix}")
    described(site, site.new, 'version: "2.0.0"\nlimits: {timeout_ms: 45}\n')
    site.start()
    refused_when_checked(site, "as a shadow: timeout_ms 45 does not fit the tick: 0 of the 40 ms plugin budget is "
                               "held by nothing (the live plugins leave 40 of the 60 ms plugin budget)")
    assert site.rig.daemon is not None and len(site.rig.daemon.shadows.current) == 0


def test_a_rollout_whose_shadow_would_not_fit_beside_a_shadow_of_the_same_name_is_refused_at_once(site) -> None:
    """As above, with the running version also running as a shadow, put there by hand: the shadow set keeps that one
    over the new version it has no room for (a replacement refused, told by its sha256 on a status still "loaded").
    The node says so at once, not after the longest wait for a shadow as one that never loaded."""
    described(site, site.live, 'version: "1.0.0"\nlimits: {timeout_ms: 20}\n')
    (site.folder / "shadow").mkdir(exist_ok=True)
    for suffix in (".yaml", ".sig"):
        shutil.copy(site.live.with_suffix(suffix), site.folder / f"{NAME}{suffix}")
    for suffix in (".wasm", ".yaml", ".sig"):
        shutil.copy(site.live.with_suffix(suffix), site.folder / "shadow" / f"{NAME}{suffix}")
    described(site, site.new, 'version: "2.0.0"\nlimits: {timeout_ms: 45}\n')
    site.start()
    daemon = site.rig.daemon
    assert daemon is not None and len(daemon.shadows.current) == 1  # the hand's shadow runs
    refused_when_checked(site, "as a shadow: kept this version: its replacement was refused: timeout_ms 45 does not "
                               "fit the tick: 0 of the 40 ms plugin budget is held by nothing (the live plugins leave "
                               "40 of the 60 ms plugin budget)")


def test_a_rollout_that_would_not_fit_the_tick_in_the_live_versions_place_is_refused_at_its_announcement(
        site) -> None:
    """The one check of the module, beside the folder's plugins, takes the tick's budget by rank: 35 ms in the
    place of the live version does not fit beside filler's 30 ms. Refused when it is checked, never installed."""
    described(site, site.new, 'version: "2.0.0"\nlimits: {timeout_ms: 35}\n')
    site.start()
    install_filler(site)
    site.settle(lambda: site.rig.daemon is not None and site.rig.daemon.plugins.named("filler") is not None,
                "filler runs")
    refused_when_checked(site, "timeout_ms 35 does not fit the tick: 30 of the 60 ms plugin budget is held by filler "
                               "(30 ms)")


@pytest.mark.parametrize("when", ["running", "stopped"])
def test_a_plugin_disabled_in_the_live_window_gets_back_the_version_it_replaced(site, when) -> None:
    """The owner disables the plugin (plugins.settings, SIGHUP; or edited while the daemon was stopped) while its
    promoted version is watched: that version never finished its window, and is called no more. The node puts the
    version it replaced back, as any rollout that did not finish leaves a node, and says so; the plugin stays
    disabled (its actuators in their safe state) and, enabled again, runs the version the owner had before."""
    site.start()
    a = site.announce(site.new, live_ticks=1_000_000)
    site.until(lambda v: v.phase == protocol.LIVE_WINDOW and v.counts.get("calls", 0) > 0, "called once promoted")
    if when == "running":
        site.reload(lambda data: data["plugins"]["settings"].update({NAME: {"enabled": False}}))
    else:
        site.rig.stop()
        site.data["plugins"]["settings"] = {NAME: {"enabled": False}}
        site.write_config(site.data)
        site.start()
        site.said.clear()
        site.hand_over(a, site.new.read_bytes())  # the retained announcement, to the node started again
    verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE), "the rollout ends")
    assert verdict.phase == protocol.ROLLED_BACK, verdict
    assert verdict.reason == (f"plugin '{NAME}' was disabled in the config: the version it replaced is put back, "
                              "to run once the plugin is enabled again"), verdict
    assert site.live_status().state == "disabled"
    for suffix in (".wasm", ".yaml", ".sig"):
        assert (site.folder / f"{NAME}{suffix}").read_bytes() == site.live.with_suffix(suffix).read_bytes()
    site.reload(lambda data: data["plugins"]["settings"].update({NAME: {"enabled": True}}))
    site.settle(lambda: site.live_status().state == "loaded", "enabled again")
    assert site.live_status().sha256 == sha256_of(site.live)
    assert site.said[-1].phase == protocol.ROLLED_BACK


@pytest.mark.parametrize("window", [protocol.SHADOW, protocol.LIVE_WINDOW])
def test_a_reload_that_moves_the_plugins_folder_mid_rollout_ends_it_and_leaves_the_old_folder_as_it_was(
        site, window) -> None:
    """The owner moves plugins.directory (SIGHUP) while the node compares the new version as a shadow, or watches
    it promoted: the rollout was checked and done in the old folder, which the daemon no longer follows. Its part
    here ends at once, saying so: the old folder gets back what it held before the rollout (no shadow, the
    replaced version), and the new one, the owner's, is left as it is."""
    site.start()
    if window == protocol.SHADOW:
        site.announce(site.new, shadow_ticks=1_000_000)
        site.until(lambda v: v.phase == protocol.SHADOW and v.counts.get("shadow_ticks", 0) > 0, "compared")
    else:
        site.announce(site.new, live_ticks=1_000_000)
        site.until(lambda v: v.phase == protocol.LIVE_WINDOW and v.counts.get("calls", 0) > 0, "called")
    moved = site.tmp / "moved"
    moved.mkdir()
    for suffix in (".wasm", ".yaml", ".sig"):  # the owner's copy of the version that ran before the rollout
        shutil.copy(site.live.with_suffix(suffix), moved / f"{NAME}{suffix}")
    site.reload(lambda data: data["plugins"].update(directory=str(moved)))
    verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE), "the rollout ends", within=MIN_SWAP_TICKS)
    assert verdict.phase == (protocol.REFUSED if window == protocol.SHADOW else protocol.ROLLED_BACK), verdict
    assert f"plugins.directory moved from {site.folder} to {moved} by a reload" in (verdict.reason or ""), verdict
    site.settle(lambda: shadow_files(site.folder) == [], "the shadow removed from the old folder")
    for suffix in (".wasm", ".yaml", ".sig"):
        assert (site.folder / f"{NAME}{suffix}").read_bytes() == site.live.with_suffix(suffix).read_bytes()
        assert (moved / f"{NAME}{suffix}").read_bytes() == site.live.with_suffix(suffix).read_bytes()
    assert shadow_files(moved) == [] and site.live_status().sha256 == sha256_of(site.live)


def test_an_operator_value_whose_default_a_new_version_drops_stays_in_force(site) -> None:
    """The operator set a config value of the running version; the owner installs a version whose manifest still
    takes the key but gives it no default. The files say nothing of the value: that is no edit of the owner's
    (which would replace the operator's value), and the operator's value stays in force."""
    daemon = started_with_the_operators_note(site)
    hand = version(site.tmp / "hand-2.0.0", TEST_PLUGINS / "counter.wasm", "2.0.0", site.key)
    described(site, hand, f'version: "2.0.0"\n{NOTE}')
    assert cli.main(["plugin", "install", str(hand), "--config", str(site.rig.config_path)]) == 0
    site.settle(lambda: site.live_status().version == "2.0.0", "the new version runs")
    assert daemon.plugins.named(NAME).config["note"] == "operator"  # type: ignore[union-attr]


def test_the_operator_values_of_a_plugin_removed_by_hand_are_forgotten(site) -> None:
    """The operator set a config value and switched the plugin off; the owner then removes the plugin. Its values,
    set aside for a version that may come back during a rollout, are forgotten once no module of it is left (and
    the config does not name it), and the folder has held still for the settle a redeploy's copy gets: nothing
    else would ever drop them. Left in a folder that holds another plugin: an empty one says nothing
    (tests/test_operator_values.py). Put back, the plugin runs, on the file's values: the operator's switch holds
    it off no more."""
    daemon = started_with_the_operators_note(site)
    daemon.operator.submit(EnablePlugin(NAME, False))
    site.ticks(2)
    assert NAME in daemon.values.config and NAME in daemon.values.enabled
    shutil.copy(TEST_PLUGINS / "counter.wasm", site.folder / "another.wasm")
    removed_by_hand(site)
    site.settle(lambda: site.live_status() is None, "the plugin unloaded")
    assert NAME in daemon.values.config and NAME in daemon.values.enabled  # a copy may follow
    site.settle(lambda: NAME not in daemon.values.config and NAME not in daemon.values.enabled,
                "the values forgotten, the folder held still")
    for suffix in (".yaml", ".sig", ".wasm"):
        shutil.copy(site.live.with_suffix(suffix), site.folder / f"{NAME}{suffix}")
    site.settle(lambda: site.live_status() is not None and site.live_status().state == "loaded", "put back")
    plugin = daemon.plugins.named(NAME)
    assert NAME not in daemon.operator.disabled and plugin is not None and plugin.config["note"] == "factory"


def test_the_plugins_folder_named_another_way_at_a_restart_is_no_folder_moved(site) -> None:
    """`run --plugins` takes the folder as given (here relative to where the daemon started); the node stops in the
    promoted version's live window and starts again on the config's own, absolute, path to the same folder. It
    watches the window again, and says live: the same folder is no folder moved by a reload, to roll back from."""
    site.start(plugins=Path(os.path.relpath(site.folder)))
    a = site.announce(site.new, live_ticks=30)
    site.until(lambda v: v.phase == protocol.LIVE_WINDOW and v.counts.get("calls", 0) > 0, "called once promoted")
    site.rig.stop()
    site.start()
    site.said.clear()
    site.hand_over(a, site.new.read_bytes())  # the retained announcement, to the node started again
    verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE), "the rollout ends")
    assert verdict.phase == protocol.LIVE and verdict.sha256 == sha256_of(site.new), verdict


def test_a_new_rollout_of_the_same_module_waits_for_the_earlier_shadows_removal(site) -> None:
    """Stopped in a rollout's shadow window, the node comes back to another rollout of the very same module, its own:
    the earlier shadow is removed (its note names the other rollout), and the new rollout installs the same module
    in the same place. Its file work waits for that removal, which, run last, would take the new shadow and its note
    for the earlier one's (the same sha256) and remove them: held here until the new shadow could be installed."""
    site.start()
    a = site.announce(site.new, shadow_ticks=1_000_000)
    site.until(lambda v: v.phase == protocol.SHADOW and v.counts.get("shadow_ticks", 0) > 0, "compared")
    site.rig.stop()
    site.start()
    node = site.node
    assert node is not None
    gate, remove = threading.Event(), node._remove_shadow

    def held(*args: Any) -> bool:  # on the worker thread
        gate.wait(120)  # only how long a broken test hangs
        return remove(*args)

    node._remove_shadow = held  # type: ignore[method-assign]
    again = replace(a, rollout="1796633878-00000000")
    site.hand_over(again, site.new.read_bytes())

    async def turns() -> None:  # the node's turns as they come, not waiting for its file work as the rig does
        for _ in range(3):
            node.tick(lambda topic, payload: None)
        job = node.rollouts[NAME].job
        if node.rollouts[NAME].phase == protocol.SHADOW and job is not None:  # its check ran beside the removal
            await asyncio.wait([job])
        gate.set()

    site.rig.aio.run_until_complete(turns())
    site.said.clear()
    site.until(lambda v: v.phase == protocol.SHADOW and v.counts.get("shadow_ticks", 0) > 0, "the new shadow compared")
    note = json.loads((site.tmp / "state" / "fleet" / "shadow" / f"{NAME}.json").read_text())
    assert note["rollout"] == again.rollout and sha256_of(site.folder / "shadow" / f"{NAME}.wasm") == again.sha256


class Said(list[Verdict]):
    """The node's verdicts, each with whether the shadow's module was still in the plugins folder when it was said."""

    def __init__(self, shadow: Path):
        super().__init__()
        self.shadow = shadow
        self.with_shadow: list[tuple[str, bool]] = []

    def append(self, verdict: Verdict) -> None:
        self.with_shadow.append((verdict.phase, self.shadow.exists()))
        super().append(verdict)


@pytest.mark.parametrize("ending", ["traps-in-its-shadow", "stopped-by-the-owner"])
def test_a_rollout_that_ends_in_its_shadow_window_says_so_only_once_its_shadow_is_removed(site, ending) -> None:
    """The owner's tool reads the verdict and looks at the node: a rollout said ended has left no shadow. The
    removal runs on a worker thread; here it is held until the node's turn that began it is over, so a verdict said
    in that turn, before the removal, would be seen with the shadow still there (what a loaded CI runner saw)."""
    site.start()
    node = site.node
    assert node is not None
    turn_over, remove, turn = threading.Event(), node._remove_shadow, node.tick

    def held(*args: Any) -> bool:  # on the worker thread
        turn_over.wait(120)  # only how long a broken test hangs
        return remove(*args)

    def one_turn(publish: Callable[[str, bytes], None]) -> None:
        turn_over.clear()
        turn(publish)
        turn_over.set()

    node._remove_shadow, node.tick = held, one_turn  # type: ignore[method-assign]
    site.said = said = Said(site.folder / "shadow" / f"{NAME}.wasm")
    a = site.announce(trapping(site) if ending == "traps-in-its-shadow" else site.new, shadow_ticks=20)
    site.until(lambda v: v.phase == protocol.SHADOW and v.counts.get("shadow_ticks", 0) > 0, "compared")
    if ending == "stopped-by-the-owner":
        site.hand_over(replace(a, state="stopped"), b"")
    verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE, protocol.STOPPED), "the rollout ends")
    assert verdict.phase == (protocol.ROLLED_BACK if ending == "traps-in-its-shadow" else protocol.STOPPED), verdict
    assert said.with_shadow[-1] == (verdict.phase, False), said.with_shadow
    assert node.shown(NAME) == {"version": a.version, "sha256": a.sha256, "phase": verdict.phase,
                                "in_progress": False, "percent": protocol.PROGRESS.get(verdict.phase, 0),
                                "summary": f"{verdict.phase}: {verdict.reason}"[:255]}


@pytest.mark.parametrize("killed", [False, True], ids=["removed", "killed-before-the-removal"])
def test_a_node_stopped_while_a_failed_shadow_is_removed_does_not_run_the_rollout_again(site, killed) -> None:
    """The shadow failed; its removal is under way and the verdict waits for it, when the node is stopped (before
    its next turn says the end). Started again on the retained announcement, it keeps its word: the rollout is
    rolled back, not fetched, shadowed and compared anew (where it might agree this time and be promoted). Killed
    before the removal ran, the shadow it left is removed at the start: it would run beside the live version for
    good (its rollout ended, nothing else compares or removes it)."""
    site.start()
    node = site.node
    assert node is not None
    if killed:
        node._remove_shadow = lambda *args: False  # type: ignore[method-assign]
    wasm = trapping(site)
    a = site.announce(wasm, shadow_ticks=20)

    def ending() -> bool:
        rollout = node.rollouts.get(NAME)
        return rollout is not None and rollout.ending is not None

    site.settle(ending, "the shadow failed, its removal begun")
    site.rig.stop()
    site.start()
    site.said.clear()
    site.hand_over(a, wasm.read_bytes())
    verdict = site.until(lambda v: True, "a verdict")
    assert verdict.phase == protocol.ROLLED_BACK and "failed" in (verdict.reason or ""), verdict
    daemon = site.rig.daemon
    assert daemon is not None
    site.settle(lambda: len(daemon.shadows.current) == 0, "the shadow unloaded")
    assert list((site.folder / "shadow").glob(f"{NAME}.*")) == []


@pytest.mark.parametrize("ending", ["traps-in-its-shadow", "compared-in-its-shadow", "in-its-live-window"])
def test_a_rollout_replaced_by_one_that_leaves_this_node_out_says_its_end_once_its_shadow_is_removed(
        site, ending) -> None:
    """The owner announces a new rollout of the plugin that leaves this node out while the node's rollout is in its
    shadow window, its end pending (the shadow failed, its removal under way) or not, or in its live window. The
    node's verdict, retained, is what the owner's tool reads of it: it says that rollout's end once its shadow is
    removed (the end it had come to, or stopped, replaced), never `shadow` or `live_window` for good."""
    site.start()
    node = site.node
    assert node is not None
    a = site.announce(trapping(site) if ending == "traps-in-its-shadow" else site.new,
                      shadow_ticks=10 if ending == "in-its-live-window" else 1_000_000, live_ticks=1_000_000)
    if ending == "traps-in-its-shadow":
        def pending() -> bool:
            rollout = node.rollouts.get(NAME)
            return rollout is not None and rollout.ending is not None

        site.settle(pending, "the shadow failed, its removal begun")
    else:
        phase, count = (protocol.LIVE_WINDOW, "calls") if ending == "in-its-live-window" else (
            protocol.SHADOW, "shadow_ticks")
        site.until(lambda v: v.phase == phase and v.counts.get(count, 0) > 0, f"{phase}, counted")
    elsewhere = replace(a, rollout="1796633878-00000000", stages=(("another-node",),))
    site.hand_over(elsewhere, b"")
    verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE, protocol.STOPPED), "the rollout's end said")
    assert verdict.rollout == a.rollout and shadow_files(site.folder) == [] and node.rollouts == {}, verdict
    replaced = f"replaced by rollout {elsewhere.rollout}, which leaves this node out"
    if ending == "traps-in-its-shadow":
        assert verdict.phase == protocol.ROLLED_BACK and "failed" in (verdict.reason or ""), verdict
    elif ending == "compared-in-its-shadow":
        assert (verdict.phase, verdict.reason) == (protocol.STOPPED, replaced), verdict
    else:
        assert (verdict.phase, verdict.reason) == (
            protocol.STOPPED, f"{replaced}: the promoted version stays, its live window unfinished"), verdict
    promoted = ending == "in-its-live-window"
    assert verdict.sha256 == sha256_of(site.new if promoted else site.live) == site.live_status().sha256


@pytest.mark.parametrize("cause", ["stopped", "replaced", "stopped-then-replaced"])
def test_a_rollout_stopped_in_its_shadow_window_says_why_in_its_verdict_its_log_and_its_entity(site, cause) -> None:
    """The owner's tool stops the rollout (its announcement says stopped), or replaces it with one that leaves this
    node out, or both, the second while the first's shadow is being removed, while the node compares the shadow.
    However it is stopped, the node says it one way: `stopped` with its reason on the verdict and the update
    entity, and one log line saying the same reason."""
    site.start()
    node = site.node
    assert node is not None
    a = site.announce(site.new, shadow_ticks=1_000_000)
    site.until(lambda v: v.phase == protocol.SHADOW and v.counts.get("shadow_ticks", 0) > 0, "compared")
    elsewhere = replace(a, rollout="1796633878-00000000", stages=(("another-node",),))
    with capture_logs() as logs:
        if cause != "replaced":
            site.hand_over(replace(a, state="stopped"), b"")
            site.tick()  # its end begun: the shadow's removal under way, the verdict said once it is done
        if cause != "stopped":
            site.hand_over(elsewhere, b"")
        verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE, protocol.STOPPED), "the rollout ends")
    assert (verdict.rollout, verdict.phase) == (a.rollout, protocol.STOPPED), verdict
    stopped = [e for e in logs if e["event"] == "fleet_rollout_stopped"]
    assert [(e["rollout"], e["reason"]) for e in stopped] == [(a.rollout, verdict.reason)], logs
    replaced = f"replaced by rollout {elsewhere.rollout}, which leaves this node out"
    assert verdict.reason == (replaced if cause == "replaced" else "the rollout was stopped before this node "
                              "promoted it (its announcement says stopped)"), verdict
    shown = node.shown(NAME) if cause == "stopped" else None  # a replaced one is dropped once its end is said
    assert shown in (None, {"version": a.version, "sha256": a.sha256, "phase": protocol.STOPPED,
                            "in_progress": False, "percent": 0, "summary": f"stopped: {verdict.reason}"[:255]})
    assert shadow_files(site.folder) == [] and site.live_status().sha256 == sha256_of(site.live)


def disk_full(site: Site, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Files put into the plugins folder itself (a rollback's) fail as on a full disk (`where`: as they are staged,
    or as the module is renamed in, after its manifest and signature: an I/O error); a shadow's and the state
    folder's still go in. Our own install's write and rename, not paho's or Extism's."""
    stage, rename = install._stage, os.replace

    def full(wasm: Path, *args: Any) -> list[Path]:
        if wasm.parent.parent.resolve() == site.folder.resolve():  # staged inside the folder, then renamed in
            raise install.InstallError(f"cannot write into {site.folder}: No space left on device")
        return stage(wasm, *args)

    def failing(source: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        if Path(target).resolve() == (site.folder / f"{NAME}.wasm").resolve():
            raise OSError(errno.EIO, "Input/output error (no space left on device)")
        rename(source, target, *args, **kwargs)

    if where == "staging":
        monkeypatch.setattr(install, "_stage", full)
    else:
        monkeypatch.setattr(install.os, "replace", failing)


@pytest.mark.parametrize("where", ["staging", "renaming"])
@pytest.mark.parametrize("replaced", [False, True], ids=["alone", "replaced-meanwhile"])
def test_a_rollback_whose_files_cannot_be_written_says_it_failed_and_which_version_runs_and_is_tried_again(
        site, monkeypatch, replaced, where) -> None:
    """The promoted version fails its live window; the node puts the version it replaced back, but the disk is full:
    its files cannot be written, or the module's rename fails after its manifest's and signature's. Alone, or with
    the rollout replaced meanwhile by one that leaves this node out, the node must not say `rolled_back`: it says
    `rollback_failed`, which version runs (the promoted one, whole in the folder: a known version, that a restart
    loads), in one line; and its next start, the disk freed, puts the kept version back."""
    site.start()
    node = site.node
    assert node is not None
    wasm = trapping(site)  # traps on its 7th call: after its promotion
    a = site.announce(wasm, shadow_ticks=3, live_ticks=1_000_000)
    site.until(lambda v: v.phase == protocol.LIVE_WINDOW and v.sha256 == sha256_of(wasm), "promoted")
    disk_full(site, monkeypatch, where)
    site.settle(lambda: (r := node.rollouts.get(NAME)) is not None and r.restoring is not None, "rolling back")
    elsewhere = replace(a, rollout="1796633878-00000000", stages=(("another-node",),))
    with capture_logs() as logs:
        if replaced:
            site.hand_over(elsewhere, b"")
        verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE, protocol.STOPPED), "the rollout ends")
        site.ticks(2)
    assert (verdict.rollout, verdict.phase) == (a.rollout, protocol.ROLLBACK_FAILED), verdict
    assert "no space left on device" in (verdict.reason or "").lower() and "3.0.0" in (verdict.reason or ""), verdict
    assert verdict.sha256 == sha256_of(wasm) == site.live_status().sha256
    for suffix in (".wasm", ".yaml", ".sig"):  # one whole version, the one said to run
        assert (site.folder / f"{NAME}{suffix}").read_bytes() == wasm.with_suffix(suffix).read_bytes()
    ends = [e for e in logs if e["event"] in ("fleet_rollout_failed", "fleet_rollback_failed", "fleet_rollout_stopped",
                                              "fleet_rollout_refused")]
    assert [(e["event"], e["reason"]) for e in ends] == [("fleet_rollback_failed", verdict.reason)], ends
    monkeypatch.undo()  # the disk freed; the node restarted, on the retained announcement
    site.rig.stop()
    site.start()
    site.said.clear()
    site.hand_over(elsewhere if replaced else a, wasm.read_bytes())
    verdict = site.until(in_phase(*protocol.FAILED, protocol.LIVE, protocol.STOPPED), "the rollback's end")
    assert (verdict.rollout, verdict.phase) == (a.rollout, protocol.ROLLED_BACK), verdict
    assert verdict.sha256 == sha256_of(site.live) == site.live_status().sha256
