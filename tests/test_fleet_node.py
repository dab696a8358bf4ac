"""A node's part in a rollout, step by step: a real daemon's plugin set (built, not served) under a `FleetNode`
ticked as the daemon ticks it, an announcement handed to it as the inbox hands it. The rollouts themselves,
against real processes and a broker, are in test_fleet.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from pi_controller.fleet import protocol
from pi_controller.fleet.node import MAX_REASON, MAX_WORD_BYTES, FleetNode
from pi_controller.fleet.protocol import Announcement, Verdict
from pi_controller.mqtt.inbox import Inbound
from tests.conftest import example_data, unsimulated, until

NAME = "temperature_control"


@pytest.fixture
def node(run_daemon, plugin_dir, tmp_path: Path) -> FleetNode:
    daemon = run_daemon(unsimulated(example_data()), 0, plugins=plugin_dir(NAME))
    return FleetNode(daemon.settings, daemon.status, tmp_path / "state")


def live_sha256(node: FleetNode) -> str:
    return hashlib.sha256((node.status.plugins.directory / f"{NAME}.wasm").read_bytes()).hexdigest()


def announce(node: FleetNode, sha256: str, rollout: str = "1796633878-819e5030") -> None:
    """Rollout `rollout` of a version of NAME with digest `sha256`, this node its canary, as the inbox hands it."""
    a = Announcement(rollout, NAME, "2.0.0", sha256, 1000, protocol.chunk_count(1000), "sig", None,
                     ((node.node,),), 0)
    topic = protocol.rollout_topic(node.site, NAME)
    node.routes()[protocol.rollout_topic(node.site, "+")].handle(Inbound(topic, a.payload(), True, (NAME,)))


def tick_until(node: FleetNode, done: Callable[[Verdict], bool]) -> Verdict:
    """Tick the node as the daemon does after each tick, until its last verdict on NAME is `done`."""
    said: list[bytes] = []

    def ticked() -> bool:
        node.tick(lambda topic, payload: said.append(payload))
        return bool(said) and done(Verdict.parse(said[-1]))

    async def main() -> None:
        await until(ticked, "the node's verdict")

    asyncio.run(main())
    return Verdict.parse(said[-1])


def test_a_word_kept_over_its_bound_is_not_read_and_the_node_says_so_in_one_line(node) -> None:
    """A word on this very rollout, but padded past the MAX_WORD_BYTES a node's word takes: not what a node
    wrote, so it is not read (not even to its bound, and not obeyed): the rollout is new to the node."""
    path = node.folder / f"{NAME}.json"
    path.parent.mkdir(parents=True)
    word = {"rollout": "1796633878-819e5030", "phase": "refused", "reason": "kept", "previous": None,
            "restoring": None}
    path.write_text(json.dumps(word) + " " * (1 << 20))
    with capture_logs() as logs:
        announce(node, live_sha256(node))
        verdict = tick_until(node, lambda verdict: verdict.phase != protocol.WAITING)
    assert verdict.phase == protocol.LIVE  # what is announced already runs here
    assert [e["error"] for e in logs if e["event"] == "fleet_state_unreadable"] == [
        f"{path} is longer than {MAX_WORD_BYTES} bytes: not a node's word on a rollout"]


@pytest.mark.parametrize("kept, said", [
    ("\u00e9" * (MAX_REASON + 300), "\u00e9" * MAX_REASON),  # two bytes each in UTF-8: cut by character
    ({"not": "a reason"}, None),
], ids=["too-long", "not-a-string"])
def test_a_kept_reason_is_said_again_within_its_bound(node, kept: object, said: str | None) -> None:
    """A node restarted on a rollout it refused says the reason it kept, as any reason, cut to MAX_REASON;
    a kept value that is no reason is not said."""
    (node.folder).mkdir(parents=True)
    (node.folder / f"{NAME}.json").write_text(json.dumps({"rollout": "1796633878-819e5030", "phase": "refused",
                                                          "reason": kept, "previous": None, "restoring": None}))
    announce(node, "b" * 64)
    verdict = tick_until(node, lambda verdict: verdict.phase == protocol.REFUSED)
    assert verdict.reason == said and node.rollouts[NAME].reason == said


def tick_once(node: FleetNode) -> None:
    """One tick's work of the node, on an event loop; the file work it hands to worker threads is done when
    this returns (its verdicts are not read: a reason as long as these makes one over what a verdict may weigh)."""
    async def main() -> None:
        node.tick(lambda topic, payload: None)

    asyncio.run(main())


def test_the_longest_word_a_node_keeps_is_one_it_reads_back_whole(node) -> None:
    """Reasons of characters JSON writes twelve bytes for (a surrogate pair), as long as a node takes them: a
    node restarted while rolling back a version, with a kept reason of MAX_REASON such characters and a longer
    reason to roll back, starts the rollback again and keeps its word anew, the latter cut to MAX_REASON. That
    word, the longest a node writes, is within what a restart reads, and the next restart reads it back whole."""
    previous = live_sha256(node)
    kept = node.folder / "previous" / NAME
    kept.mkdir(parents=True)
    (kept / f"{NAME}.wasm").write_bytes((node.status.plugins.directory / f"{NAME}.wasm").read_bytes())
    reason, why = "\U0001F600" * MAX_REASON, "\U0001F601" * (MAX_REASON + 300)
    word = {"rollout": "1796633878-819e5030", "phase": protocol.LIVE_WINDOW, "reason": reason,
            "previous": previous, "restoring": why}
    (node.folder / f"{NAME}.json").write_text(json.dumps(word))
    announce(node, "b" * 64)
    tick_once(node)
    kept_word = (node.folder / f"{NAME}.json").stat()
    assert kept_word.st_size <= MAX_WORD_BYTES
    assert stat.S_IMODE(kept_word.st_mode) == 0o600  # the node's alone: no one else reads it
    restarted = FleetNode(node.status.settings, node.status, node.folder.parent)
    announce(restarted, "b" * 64)
    tick_once(restarted)
    rollout = restarted.rollouts[NAME]
    assert (rollout.announcement.rollout, rollout.phase, rollout.reason, rollout.previous, rollout.restoring) == (
        word["rollout"], protocol.LIVE_WINDOW, reason, previous, why[:MAX_REASON])


@pytest.mark.parametrize("restored", [True, False], ids=["restored", "kept-files-unreadable"])
def test_a_rollback_a_node_stopped_in_is_finished_from_the_word_it_kept(node, restored: bool) -> None:
    """The word as a node writes it (this very text) when it starts putting its kept version
    back: a node restarted on it puts that version back and says rolled back, with the reason it kept; if the
    kept files cannot be written back, it says that too, in the same line (the version it replaced runs here:
    the promoted one never did)."""
    previous = live_sha256(node)  # the version the rollout replaced: what was kept, and runs again once put back
    kept = node.folder / "previous" / NAME
    kept.mkdir(parents=True)
    (kept / f"{NAME}.wasm").write_bytes((node.status.plugins.directory / f"{NAME}.wasm").read_bytes())
    if not restored:
        (kept / f"{NAME}.yaml").mkdir()  # a manifest that cannot be read
    why = "3 errors and 0 failsafes in 9 calls (loaded) after promotion"
    (node.folder / f"{NAME}.json").write_text(
        '{"rollout": "1796633878-819e5030", "phase": "live_window", "reason": null, '
        f'"previous": "{previous}", "restoring": "{why}"}}')
    with capture_logs() as logs:
        announce(node, "b" * 64)  # the promoted version's digest
        verdict = tick_until(node, lambda verdict: verdict.phase in protocol.FAILED)
    assert verdict.phase == protocol.ROLLED_BACK and verdict.sha256 == previous
    if restored:
        assert verdict.reason == why
    else:
        assert (verdict.reason or "").startswith(f"{why}; the version it replaced could not be put back ([Errno 21] "
                                                 "Is a directory"), verdict
        assert (verdict.reason or "").endswith(f"), but version (none given) ({previous[:16]}..) runs still"), verdict
    events = [e["event"] for e in logs if e["event"].startswith("fleet_")]
    assert events == ["fleet_rolling_back", "fleet_rollout_failed"]
    assert json.loads((node.folder / f"{NAME}.json").read_text())["phase"] == protocol.ROLLED_BACK


def test_a_node_without_a_state_folder_keeps_its_files_in_a_private_one_of_its_own(run_daemon, plugin_dir) -> None:
    """Not a fixed path in the shared /tmp, which another user could make first and fill with the module a
    rollback would put back: a folder only this process knows, that only its user may enter."""
    daemon = run_daemon(unsimulated(example_data()), 0, plugins=plugin_dir(NAME))
    nodes = [FleetNode(daemon.settings, daemon.status, None) for _ in range(2)]
    folders = [node.folder.parent for node in nodes]
    assert folders[0] != folders[1] and all(stat.S_IMODE(f.stat().st_mode) == 0o700 for f in folders)
    assert all(f.name.startswith(f"pi-controller-{nodes[0].node}-") for f in folders)
    for folder in folders:
        shutil.rmtree(folder)
