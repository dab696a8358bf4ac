"""Fleet rollouts, accepted against real processes: simulated nodes (`pi-controller run --simulate`, each its
own node id, config, plugins and state folder) on one real mosquitto, and the real `fleet rollout` tool.

Every node starts with `probe` 1.0.0 (tests/plugins/counter.wasm), signed by the owner's key. Nothing here
is timed: each test waits for what the nodes say on the broker (their retained verdicts and states)."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml

from benchmarks.flood import until as poll
from pi_controller import cli
from pi_controller.fleet import protocol
from pi_controller.fleet.protocol import Announcement, Verdict
from pi_controller.fleet.simulate import SimulatedFleet
from pi_controller.fleet.tool import Broker as Site
from pi_controller.fleet.tool import Plan, Watcher, announce, rollout, status
from tests.conftest import EXAMPLE_CONFIG, TEST_PLUGINS
from tests.test_mqtt import MOSQUITTO, Broker

pytestmark = pytest.mark.skipif(not MOSQUITTO, reason="install Debian's mosquitto (.ci/run does)")

WAIT_S = 600.0  # only how long a broken test hangs: 50 daemons starting on 2 saturated cores take a while
BASE = "fleet-test"


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    (tmp_path / "broker").mkdir()
    broker = Broker(tmp_path / "broker")
    broker.start()
    yield broker
    broker.stop()


def version(folder: Path, module: Path, number: str, key: Path) -> Path:
    """`module` as plugin `probe` at `number`, with its manifest, signed with `key`, in `folder`."""
    folder.mkdir(parents=True)
    shutil.copy(module, folder / "probe.wasm")
    (folder / "probe.yaml").write_text(f'version: "{number}"\n')
    assert cli.main(["plugin", "sign", str(folder / "probe.wasm"), "--key", str(key)]) == 0
    return folder / "probe.wasm"


@pytest.fixture
def site(tmp_path: Path, mosquitto: Broker, cli_logs: None) -> Iterator[dict[str, Any]]:
    """Keys, versions of `probe` and a fleet of nodes, not yet started."""
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("owner", "stranger"):
        assert cli.main(["plugin", "keygen", str(keys / f"{name}.pem")]) == 0
    owner = keys / "owner.pem"
    live = version(tmp_path / "v1", TEST_PLUGINS / "counter.wasm", "1.0.0", owner)
    made: list[SimulatedFleet] = []

    def fleet(count: int, plugin_settings: dict[str, Any] | None = None) -> SimulatedFleet:
        nodes = SimulatedFleet(count, tmp_path / "nodes", "127.0.0.1", mosquitto.port, BASE, live.parent,
                               keys / "owner.pem.pub", EXAMPLE_CONFIG, plugin_settings=plugin_settings)
        made.append(nodes)
        return nodes

    yield {"keys": keys, "live": live, "fleet": fleet, "tmp": tmp_path,
           "good": version(tmp_path / "v2", TEST_PLUGINS / "switchboard.wasm", "2.0.0", owner),
           "trapping": version(tmp_path / "v3", TEST_PLUGINS / "trap_sometimes.wasm", "3.0.0", owner),
           "port": mosquitto.port}
    for nodes in made:
        nodes.stop_all()


def plan(nodes: SimulatedFleet, port: int, **windows: Any) -> Plan:
    return Plan(tuple(nodes.nodes), Site("127.0.0.1", port, BASE), stages=("3", "100%"), stage_timeout_s=WAIT_S,
                **({"shadow_ticks": 10, "live_ticks": 10} | windows))


def watcher(port: int) -> Watcher:
    return Watcher(Site("127.0.0.1", port, BASE))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def all_online(nodes: SimulatedFleet, port: int) -> None:
    seen = watcher(port)
    try:
        assert seen.wait(lambda: all(seen.online.get(n) for n in nodes.processes), WAIT_S), "the nodes came online"
    finally:
        seen.close()


def events(nodes: SimulatedFleet, node: str, event: str) -> list[dict[str, Any]]:
    """What `node` has logged of `event` so far: for an event that must not be there (`logged` waits for one)."""
    lines = (json.loads(line) for line in nodes.log(node).splitlines() if line.startswith("{"))
    return [e for e in lines if e.get("event") == event]


def logged(nodes: SimulatedFleet, node: str, event: str) -> list[dict[str, Any]]:
    """`node`'s lines of `event`, once there is one. A node writes its log on a thread of its own (no tick waits
    on stderr), so a line logged before a verdict may reach the file after the verdict reached the broker."""
    return poll(lambda: events(nodes, node, event), f"{node} logs {event}", WAIT_S)


def plugin_state(port: int, node: str, wanted: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The state of `probe` on `node`, as Home Assistant reads it, once it is `wanted`."""
    got: list[bytes] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_message = lambda c, u, message: got.append(message.payload)
    client.connect("127.0.0.1", port)
    client.subscribe(f"{BASE}/{node}/plugin/probe/state", 1)
    client.loop_start()
    try:
        seen = watcher(port)
        seen.wait(lambda: got and wanted(json.loads(got[-1])), WAIT_S)
        seen.close()
    finally:
        client.disconnect()
        client.loop_stop()
    return json.loads(got[-1])


def test_a_good_version_reaches_10_nodes_through_the_canary_and_the_stages(site) -> None:
    nodes = site["fleet"](10)
    nodes.start_all()
    all_online(nodes, site["port"])
    said: list[str] = []
    assert rollout(site["good"], plan(nodes, site["port"]), said.append) == 0, said
    assert [line.split(":")[0] for line in said[1:4]] == ["stage 0 (canaries)", "stage 1 (stage)", "stage 2 (stage)"]
    assert said[1].endswith("node-00") and said[2].endswith("node-01, node-02, node-03")
    for node in nodes.nodes:
        folder = site["tmp"] / "nodes" / node
        assert sha256(folder / "plugins" / "probe.wasm") == sha256(site["good"])  # promoted
        assert sha256(folder / "state" / "fleet" / "previous" / "probe" / "probe.wasm") == sha256(site["live"])
    # Each stage went in only once the one before was live: the canary before stage 1, stage 1 before stage 2.
    live_at = {n: logged(nodes, n, "fleet_version_live")[0]["timestamp"] for n in nodes.nodes}
    fetched_at = {n: logged(nodes, n, "fleet_fetching")[0]["timestamp"] for n in nodes.nodes}
    assert live_at["node-00"] < min(fetched_at[n] for n in nodes.nodes[1:])
    assert max(live_at[n] for n in nodes.nodes[1:4]) < min(fetched_at[n] for n in nodes.nodes[4:])
    # Home Assistant's update entity: the announced version installed, no longer in progress.
    shown = plugin_state(site["port"], "node-05", lambda state: state["rollout"] is not None)
    assert shown["version"] == "2.0.0" and shown["rollout"] == {
        "version": "2.0.0", "sha256": sha256(site["good"]), "phase": "live", "in_progress": False, "percent": 100,
        "summary": ""}


@pytest.mark.parametrize("shadow_ticks", [3, 20], ids=["traps-once-live", "traps-in-its-shadow"])
def test_a_version_that_traps_on_some_inputs_is_rolled_back_on_the_canary_alone(site, shadow_ticks) -> None:
    """trap_sometimes traps on its 7th call: a shadow window of 20 catches it before promotion, one of 3
    after it, when the canary puts its kept version back by itself."""
    nodes = site["fleet"](4)
    nodes.start_all()
    all_online(nodes, site["port"])
    said: list[str] = []
    assert rollout(site["trapping"], plan(nodes, site["port"], shadow_ticks=shadow_ticks), said.append) == 1
    assert said[-2].startswith("node node-00: rolled_back: ") and "stopped at stage 0" in said[-1], said
    failed = logged(nodes, "node-00", "fleet_rollout_failed")
    assert len(failed) == 1 and ("after promotion" in failed[0]["reason"]) == (shadow_ticks == 3), failed
    canary = site["tmp"] / "nodes" / "node-00" / "plugins"
    assert sha256(canary / "probe.wasm") == sha256(site["live"])  # the version it had, back (or never left)
    assert not (canary / "shadow" / "probe.wasm").exists()
    assert plugin_state(site["port"], "node-00", lambda state: state["rollout"]["phase"] == "rolled_back")[
        "sha256"] == sha256(site["live"])  # and running: said rolled back once it runs again
    for node in nodes.nodes[1:]:  # never reached the others
        assert sha256(site["tmp"] / "nodes" / node / "plugins" / "probe.wasm") == sha256(site["live"])
        assert events(nodes, node, "fleet_fetching") == []


def publish(port: int, a: Announcement, module: bytes) -> None:
    """A rollout as a forger would send it: `module` in chunks, whatever the announcement says."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    for index in range(a.chunks):
        chunk = module[index * protocol.CHUNK_BYTES:(index + 1) * protocol.CHUNK_BYTES]
        client.publish(protocol.chunk_topic(BASE, a.sha256, index), chunk, 1, retain=True).wait_for_publish(30)
    client.publish(protocol.rollout_topic(BASE, a.name), a.payload(), 1, retain=True).wait_for_publish(30)
    client.disconnect()
    client.loop_stop()


@pytest.mark.parametrize("forgery", ["untrusted key", "flipped byte"])
def test_a_bad_signature_or_bytes_that_are_not_the_sha256_are_refused_by_every_node_without_running(
        site, forgery) -> None:
    nodes = site["fleet"](3)
    nodes.start_all()
    all_online(nodes, site["port"])
    wasm = site["good"]
    if forgery == "untrusted key":
        assert cli.main(["plugin", "sign", str(wasm), "--key", str(site["keys"] / "stranger.pem")]) == 0
    a, read = announce(wasm, plan(nodes, site["port"]))
    a = Announcement(**{**a.__dict__, "stages": (tuple(nodes.nodes),)})  # every node at once
    module = bytearray(read)
    if forgery == "flipped byte":
        module[len(module) // 2] ^= 1
    publish(site["port"], a, bytes(module))
    seen = watcher(site["port"])
    try:
        def refused() -> bool:
            said = [seen.verdicts.get((n, "probe")) for n in nodes.nodes]
            return all(v is not None and v.rollout == a.rollout and v.phase == "refused" for v in said)

        assert seen.wait(refused, WAIT_S), seen.verdicts
        reasons = {seen.verdicts[(n, "probe")].reason for n in nodes.nodes}
    finally:
        seen.close()
    expected = "which is not in plugins.trusted_keys" if forgery == "untrusted key" else "the module's sha256 is"
    assert len(reasons) == 1 and expected in reasons.pop()
    for node in nodes.nodes:
        assert events(nodes, node, "fleet_shadow_installed") == []  # never ran, not even as a shadow
        folder = site["tmp"] / "nodes" / node / "plugins"
        assert not (folder / "shadow" / "probe.wasm").exists()
        assert sha256(folder / "probe.wasm") == sha256(site["live"])


def test_a_node_that_was_offline_catches_up_from_the_retained_announcement(site) -> None:
    nodes = site["fleet"](3)
    nodes.start_all()
    all_online(nodes, site["port"])
    assert nodes.stop("node-02") == 0  # away (it said offline on its way out) for the whole rollout
    said: list[str] = []
    assert rollout(site["good"], plan(nodes, site["port"]), said.append) == 0, said
    assert "offline, will catch up: node-02" in said
    folder = site["tmp"] / "nodes" / "node-02" / "plugins"
    assert sha256(folder / "probe.wasm") == sha256(site["live"])
    nodes.start("node-02")
    seen = watcher(site["port"])
    try:
        assert seen.wait(lambda: (v := seen.verdicts.get(("node-02", "probe"))) is not None and v.phase == "live"
                         and v.sha256 == sha256(site["good"]), WAIT_S), seen.verdicts
    finally:
        seen.close()
    assert sha256(folder / "probe.wasm") == sha256(site["good"])
    shown: list[str] = []
    assert status(plan(nodes, site["port"]), shown.append) == 0
    # the canary, then the other two
    assert shown[0].startswith("probe 2.0.0 (rollout ") and ", done, stage 2 of 2)" in shown[0]
    assert [line.split()[:2] + line.split()[3:5] for line in shown[1:]] == [
        [node, "online", "2.0.0", "live"] for node in nodes.nodes]


def test_a_node_stopped_in_its_live_window_watches_it_again_and_rolls_back_by_itself(site) -> None:
    """A node stopped (a power cut, an upgrade) after promoting a version but before its live window ended
    must not say live on the strength of the files it finds: it watches the window again from its first call,
    and a version failing there is rolled back as if the node had never stopped. The version here is healthy
    until the restart (trap_sometimes with trap_every 10^9), and traps on every 3rd call after it."""
    nodes = site["fleet"](1, {"probe": {"config": {"trap_every": 1_000_000_000}}})
    nodes.start_all()
    all_online(nodes, site["port"])
    a, module = announce(site["trapping"], plan(nodes, site["port"], shadow_ticks=3, live_ticks=1_000_000))
    publish(site["port"], a, module)
    seen = watcher(site["port"])
    try:
        assert seen.wait(lambda: (v := seen.verdicts.get(("node-00", "probe"))) is not None
                         and v.phase == "live_window" and v.sha256 == sha256(site["trapping"]), WAIT_S), seen.verdicts
        assert nodes.stop("node-00") == 0
        config = nodes.folder / "node-00" / "config.yaml"
        data = yaml.safe_load(config.read_text())
        data["plugins"]["settings"]["probe"]["config"]["trap_every"] = 3
        config.write_text(yaml.safe_dump(data))
        nodes.start("node-00")
        assert seen.wait(lambda: (v := seen.verdicts.get(("node-00", "probe"))) is not None
                         and v.phase in ("live", "rolled_back"), WAIT_S), seen.verdicts
        verdict = seen.verdicts[("node-00", "probe")]
    finally:
        seen.close()
    assert (verdict.phase, verdict.sha256) == ("rolled_back", sha256(site["live"])), verdict
    assert len(logged(nodes, "node-00", "fleet_live_window_restarted")) == 1
    assert events(nodes, "node-00", "fleet_version_already_live") == []
    assert sha256(site["tmp"] / "nodes" / "node-00" / "plugins" / "probe.wasm") == sha256(site["live"])


def test_fleet_simulate_runs_its_nodes_until_interrupted(site, tmp_path) -> None:
    fleet_yaml = tmp_path / "fleet.yaml"
    fleet_yaml.write_text(f"nodes: [node-00, node-01]\nbroker: {{host: 127.0.0.1, port: {site['port']}, "
                          f"base_topic: {BASE}}}\n")
    process = subprocess.Popen([sys.executable, "-m", "pi_controller", "fleet", "simulate", "2", "--config",
                                str(fleet_yaml), "--dir", str(tmp_path / "sim"), "--plugins", str(site["live"].parent),
                                "--trusted-key", str(site["keys"] / "owner.pem.pub"), "--node-config",
                                str(EXAMPLE_CONFIG)], stdout=subprocess.PIPE, text=True)
    seen = watcher(site["port"])
    try:
        assert seen.wait(lambda: seen.online.get("node-00") and seen.online.get("node-01"), WAIT_S)
        process.send_signal(signal.SIGINT)
        assert process.wait(WAIT_S) == 0
        assert seen.wait(lambda: seen.online.get("node-00") is False and seen.online.get("node-01") is False, WAIT_S)
    finally:
        seen.close()
        if process.poll() is None:
            process.kill()
    assert process.stdout is not None and process.stdout.read().startswith("2 nodes running (node-00, node-01")


def leaving_it_out(a: Announcement) -> Announcement:
    """A rollout of the same module that replaces `a` and leaves node-00 out."""
    return Announcement(**{**a.__dict__, "rollout": "1796633878-00000000", "stages": (("another-node",),)})


def away_while(nodes: SimulatedFleet, seen: Watcher, a: Announcement, window: str,
               meanwhile: Callable[[], None]) -> Verdict:
    """node-00, stopped in `window` of `a`, started again after `meanwhile`: its verdict once it says another."""
    assert nodes.stop("node-00") == 0
    meanwhile()
    nodes.start("node-00")
    assert seen.wait(lambda: (v := seen.verdicts.get(("node-00", "probe"))) is not None
                     and (v.rollout, v.phase) != (a.rollout, window), WAIT_S), seen.verdicts
    return seen.verdicts[("node-00", "probe")]


@pytest.mark.parametrize("window", ["shadow", "live_window"])
def test_a_node_restarted_after_its_rollout_was_replaced_says_that_rollouts_end_not_its_last_phase(
        site, window) -> None:
    """The node stops in a rollout's shadow (or live) window; meanwhile the owner replaces that rollout with one
    that leaves the node out. Started again, the node has nothing of the new rollout to do, but its verdict on the
    broker, retained, still says the old rollout's window: the tool and Home Assistant would read it in progress
    for good. The node says what applies: that rollout's end, `stopped` (replaced), as a running node says it."""
    nodes = site["fleet"](1)
    nodes.start_all()
    all_online(nodes, site["port"])
    windows = {"shadow_ticks": 1_000_000} if window == "shadow" else {"shadow_ticks": 3, "live_ticks": 1_000_000}
    a, module = announce(site["good"], plan(nodes, site["port"], **windows))
    publish(site["port"], a, module)
    seen = watcher(site["port"])
    try:
        running = site["good"] if window == "live_window" else site["live"]  # once promoted
        assert seen.wait(lambda: (v := seen.verdicts.get(("node-00", "probe"))) is not None
                         and (v.rollout, v.phase, v.sha256) == (a.rollout, window, sha256(running)), WAIT_S)
        elsewhere = leaving_it_out(a)
        verdict = away_while(nodes, seen, a, window, lambda: publish(site["port"], elsewhere, module))
    finally:
        seen.close()
    replaced = f"replaced by rollout {elsewhere.rollout}, which leaves this node out"
    stays = ": the promoted version stays, its live window unfinished" if window == "live_window" else ""
    assert (verdict.rollout, verdict.phase, verdict.reason) == (a.rollout, "stopped", replaced + stays), verdict
    folder = site["tmp"] / "nodes" / "node-00" / "plugins"
    assert verdict.sha256 == sha256(running) == sha256(folder / "probe.wasm")
    assert not (folder / "shadow" / "probe.wasm").exists()
    assert [e["reason"] for e in logged(nodes, "node-00", "fleet_rollout_stopped")] == [replaced + stays]


def clear(port: int, topic: str) -> None:
    """A retained message deleted, as an owner clears one (an empty retained payload)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.publish(topic, b"", 1, retain=True).wait_for_publish(30)
    client.disconnect()
    client.loop_stop()


@pytest.mark.parametrize(("window", "cause"), [("waiting", "replaced"), ("fetching", "replaced"),
                                               ("fetching", "cleared")])
def test_a_node_restarted_after_its_rollout_left_it_before_a_shadow_says_that_rollouts_end(
        site, window, cause) -> None:
    """The node stops while it only waits for its stage or fetches the module (nothing of the rollout in its
    folders yet); meanwhile the owner replaces that rollout with one that leaves the node out, or clears its
    announcement. Started again, the node is in no rollout of the plugin, but its verdict on the broker, retained,
    still says it waits or fetches: in progress for good. The node reads its own retained verdicts at each
    connection and ends the one of a rollout it is not in: `stopped`, saying why, as a running node says it."""
    nodes = site["fleet"](1)
    nodes.start_all()
    all_online(nodes, site["port"])
    a, module = announce(site["good"], plan(nodes, site["port"]))
    if window == "waiting":  # its stage not let in yet
        a = Announcement(**{**a.__dict__, "stages": (("another-node",), ("node-00",))})
    publish(site["port"], a, b"")  # no chunks: a node let in fetches, for as long as they are missing
    seen = watcher(site["port"])
    try:
        assert seen.wait(lambda: (v := seen.verdicts.get(("node-00", "probe"))) is not None
                         and (v.rollout, v.phase) == (a.rollout, window), WAIT_S), seen.verdicts
        elsewhere = leaving_it_out(a)
        verdict = away_while(nodes, seen, a, window, lambda: publish(site["port"], elsewhere, module)
                             if cause == "replaced" else clear(site["port"], protocol.rollout_topic(BASE, "probe")))
    finally:
        seen.close()
    why = (f"replaced by rollout {elsewhere.rollout} while the node was away, which leaves this node out"
           if cause == "replaced" else "its announcement was cleared while the node was away")
    assert (verdict.rollout, verdict.phase, verdict.reason) == (a.rollout, "stopped", why), verdict
    folder = site["tmp"] / "nodes" / "node-00" / "plugins"
    assert verdict.sha256 == sha256(site["live"]) == sha256(folder / "probe.wasm")
    assert [e["reason"] for e in logged(nodes, "node-00", "fleet_rollout_stopped")] == [why]
