"""A node's part in a rollout, step by step: a real daemon's plugin set (built, not served) under a `FleetNode`
ticked as the daemon ticks it, an announcement handed to it as the inbox hands it. The rollouts themselves,
against real processes and a broker, are in test_fleet.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from pi_controller.fleet import protocol
from pi_controller.fleet.node import FleetNode
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
    """A word on this very rollout, but padded past the 4096 bytes a node's word takes: not what a node
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
        f"{path} is longer than 4096 bytes: not a node's word on a rollout"]
