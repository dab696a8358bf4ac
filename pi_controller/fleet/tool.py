"""`pi-controller fleet rollout|status|simulate`: the owner's side of a rollout, on the broker alone.

`fleet rollout FILE.wasm --config fleet.yaml` publishes the module's chunks and the announcement (both
retained), lets the stages in one after the other, each once every node of it says `live` (or is offline:
it catches up from the retained announcement when it returns), and stops the rollout (`state: stopped`,
which nodes not yet done obey) as soon as any node refuses it or rolls it back. No server of ours: the
tool can be run from any laptop that reaches the broker, and what it leaves retained is the rollout.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from pi_controller import config
from pi_controller.files import path_argument
from pi_controller.fleet import protocol
from pi_controller.fleet.protocol import Announcement, Malformed, Verdict
from pi_controller.plugins.manifest import parse_manifest, read_manifest
from pi_controller.plugins.refusal import Refused
from pi_controller.plugins.signing import SUFFIX, SignatureFile, read_signature
from pi_controller.plugins.wasm_gate import read_module

EXIT_FAILED, EXIT_CONFIG = 1, 2
MAX_PLAN_BYTES = 256 * 1024
MAX_MODULE_BYTES = 16 * 1024 * 1024  # the tool's own bound; each node holds the announcement to its ceiling
WAIT_S = 30.0  # for the broker to answer a connection or a round trip


@dataclass(frozen=True)
class Broker:
    host: str = "localhost"
    port: int = 1883
    base_topic: str = "pi-controller"


@dataclass(frozen=True)
class Plan:
    """fleet.yaml: the broker, the nodes, the canaries and the stages after them, and the windows."""

    nodes: tuple[str, ...]
    broker: Broker = field(default_factory=Broker)
    canaries: tuple[str, ...] = ()  # default: the first node
    stages: tuple[str, ...] = ("100%",)  # after the canaries: "3" nodes, or "50%" of the rest, in order
    shadow_ticks: int = 50
    live_ticks: int = 50
    min_agreement_percent: float = 0.0
    stage_timeout_s: float = 600.0  # for every node of a stage to say live or refuse

    def staged(self) -> tuple[tuple[str, ...], ...]:
        """The nodes by stage: the canaries, then each stage's share of the rest; any left, a last stage."""
        canaries = self.canaries or self.nodes[:1]
        rest = [n for n in self.nodes if n not in canaries]
        total, stages = len(rest), [tuple(canaries)]
        for step in self.stages:
            if not rest:
                break
            count = -(-total * int(step[:-1]) // 100) if step.endswith("%") else int(step)
            stages.append(tuple(rest[:max(1, count)]))
            rest = rest[max(1, count):]
        if rest:
            stages.append(tuple(rest))
        return tuple(stages)


def load_plan(path: Path) -> Plan:
    plan: Plan = config.load_document(path, Plan, MAX_PLAN_BYTES)
    where = (path, "fleet.yaml")
    if not plan.nodes or len(set(plan.nodes)) != len(plan.nodes) or not set(plan.canaries) <= set(plan.nodes):
        raise config.ConfigError(path, ("nodes",), f"{where[1]} names each node once, its canaries among them")
    for index, step in enumerate(plan.stages):
        number = step.removesuffix("%")
        if not number.isdigit() or not 0 < int(number) <= (100 if step.endswith("%") else protocol.MAX_NODES):
            raise config.ConfigError(path, ("stages", index), f"'{step[:20]}' is no stage: a count (3) or a "
                                                              "percentage of the nodes after the canaries (50%)")
    return plan


class Watcher:
    """The tool's view of the broker: the retained announcements, verdicts and node statuses."""

    def __init__(self, broker: Broker, plugin: str = "+"):
        self.base = broker.base_topic
        self.verdicts: dict[tuple[str, str], Verdict] = {}  # (node, plugin) -> its last word
        self.online: dict[str, bool] = {}
        self.announcements: dict[str, Announcement] = {}
        self.changed = threading.Condition()
        self._ping = f"{self.base}/fleet/tool/{uuid.uuid4().hex}"
        self._pinged = threading.Event()
        client_id = f"pi-controller-fleet-{uuid.uuid4().hex[:8]}"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_message = self._message
        self.client.on_connect = lambda client, *_: client.subscribe(
            [(protocol.verdict_topic(self.base, "+", plugin), 1), (f"{self.base}/+/status", 1),
             (protocol.rollout_topic(self.base, plugin), 1), (self._ping, 1)])
        self.client.connect(broker.host, broker.port, 30)
        self.client.loop_start()
        self.synced()

    def synced(self) -> None:
        """Wait until what the broker held for us (retained) has arrived: a round trip on a topic of our own
        comes back after it, the broker keeping each client's order."""
        self._pinged.clear()
        deadline = time.monotonic() + WAIT_S
        while not self._pinged.is_set():
            self.client.publish(self._ping, b"ping", qos=1)
            if self._pinged.wait(1.0) or time.monotonic() > deadline:
                break
        if not self._pinged.is_set():
            raise ConnectionError("the broker did not answer within 30 s")

    def _message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        levels = message.topic.split("/")[len(self.base.split("/")):]
        try:
            if message.topic == self._ping:
                self._pinged.set()
            elif levels[:2] == ["fleet", "rollout"] and message.payload:
                self.announcements[levels[2]] = Announcement.parse(bytes(message.payload), MAX_MODULE_BYTES)
            elif len(levels) == 2 and levels[1] == "status":
                self.online[levels[0]] = message.payload == b"online"
            elif len(levels) == 3 and levels[1] == "fleet" and message.payload:
                self.verdicts[(levels[0], levels[2])] = Verdict.parse(bytes(message.payload))
        except Malformed as exc:
            print(f"warning: {message.topic[:200]}: {exc}", file=sys.stderr)
        with self.changed:
            self.changed.notify_all()

    def wait(self, until: Callable[[], Any], seconds: float) -> Any:
        deadline = time.monotonic() + seconds
        with self.changed:
            while not (result := until()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return result
                self.changed.wait(min(left, 1.0))
            return result

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1, retain=True).wait_for_publish(WAIT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def announce(wasm: Path, plan: Plan) -> tuple[Announcement, bytes]:
    """The announcement of `wasm` (signed beside it, with its manifest if it has one) under `plan`, and the
    module's bytes it describes (read once: the chunks are these)."""
    if not wasm.is_file() or wasm.suffix != ".wasm":
        raise ValueError(f"{wasm}: no such plugin file (a .wasm)")
    # Sized before it is read; a link is followed (the owner's own files, not a node's plugins folder). The
    # file is named as it was given, as the tool's other errors name it.
    module = read_module(wasm, wasm.resolve().parent, MAX_MODULE_BYTES, "the fleet tool's limit", str(wasm))
    signature = read_signature(wasm)
    if signature is None:
        raise ValueError(f"{wasm}: not signed: a rollout carries a signature; "
                         f"pi-controller plugin sign {wasm} --key KEY")
    SignatureFile.parse(signature, wasm.with_suffix(SUFFIX).name)
    described = read_manifest(wasm)
    version = parse_manifest(wasm, described).version
    sha256 = hashlib.sha256(module).hexdigest()
    return Announcement(f"{int(time.time())}-{sha256[:8]}", wasm.stem, version or sha256[:12], sha256, len(module),
                        protocol.chunk_count(len(module)), signature.decode(),
                        described.decode() if described is not None else None, plan.staged(), 0,
                        shadow_ticks=plan.shadow_ticks, live_ticks=plan.live_ticks,
                        min_agreement_percent=plan.min_agreement_percent), module


def rollout(wasm: Path, plan: Plan, say: Callable[[str], None] = print) -> int:
    a, module = announce(wasm, plan)
    watcher = Watcher(plan.broker, a.name)
    try:
        base = plan.broker.base_topic
        before = watcher.announcements.get(a.name)
        for index in range(a.chunks):
            chunk = module[index * protocol.CHUNK_BYTES:(index + 1) * protocol.CHUNK_BYTES]
            watcher.publish(protocol.chunk_topic(base, a.sha256, index), chunk)
        if before is not None and before.sha256 != a.sha256:  # the previous module's chunks: no longer wanted
            for index in range(before.chunks):
                watcher.publish(protocol.chunk_topic(base, before.sha256, index), b"")
        say(f"rollout {a.rollout}: {a.name} {a.version} ({a.size} bytes, sha256 {a.sha256[:16]}..) to "
            f"{len(a.nodes())} nodes in {len(a.stages)} stages")
        return _stages(watcher, a, plan, say)
    finally:
        watcher.close()


def _stages(watcher: Watcher, a: Announcement, plan: Plan, say: Callable[[str], None]) -> int:
    topic = protocol.rollout_topic(plan.broker.base_topic, a.name)
    for stage in range(len(a.stages)):
        a = replace(a, stage=stage)
        watcher.publish(topic, a.payload())
        say(f"stage {stage} ({'canaries' if stage == 0 else 'stage'}): {', '.join(a.stages[stage])}")
        nodes = a.stages[stage]

        def settled(nodes: tuple[str, ...] = nodes, a: Announcement = a) -> tuple[list[str], list[str]] | None:
            failed = [n for n in a.nodes() if _phase(watcher, n, a) in protocol.FAILED]
            waiting = [n for n in nodes if _phase(watcher, n, a) != protocol.LIVE and watcher.online.get(n, False)]
            return (failed, waiting) if failed or not waiting else None

        outcome = watcher.wait(settled, plan.stage_timeout_s)
        failed = outcome[0] if outcome else []
        if failed or outcome is None:
            watcher.publish(topic, replace(a, state="stopped").payload())
            for node in failed:
                verdict = watcher.verdicts[(node, a.name)]
                say(f"node {node}: {verdict.phase}: {verdict.reason}")
            say(f"rollout {a.rollout} stopped at stage {stage}: " + (
                f"{len(failed)} node(s) failed" if failed else f"no verdict within {plan.stage_timeout_s:g} s"))
            return EXIT_FAILED
        offline = [n for n in nodes if _phase(watcher, n, a) != protocol.LIVE]
        if offline:
            say(f"offline, will catch up: {', '.join(offline)}")
    watcher.publish(topic, replace(a, state="done").payload())
    say(f"rollout {a.rollout} done: {a.name} {a.version} live on every node online")
    return 0


def _phase(watcher: Watcher, node: str, a: Announcement) -> str | None:
    verdict = watcher.verdicts.get((node, a.name))
    return verdict.phase if verdict is not None and verdict.rollout == a.rollout else None


def status(plan: Plan, say: Callable[[str], None] = print) -> int:
    watcher = Watcher(plan.broker)
    try:
        for name, a in sorted(watcher.announcements.items()):
            say(f"{name} {a.version} (rollout {a.rollout}, {a.state}, stage {a.stage + 1} of {len(a.stages)})")
            for node in sorted(set(a.nodes()) | set(plan.nodes)):
                verdict = watcher.verdicts.get((node, name))
                online = "online" if watcher.online.get(node) else "offline"
                shown = _phase(watcher, node, a) or "-"
                live = verdict.version if verdict is not None else None
                why = (verdict.reason or "") if verdict else ""
                say(f"  {node:<24} {online:<8} live {live or '?':<12} {shown:<12} {why}"[:300])
    finally:
        watcher.close()
    return 0


def add_command(commands: Any) -> None:
    fleet = commands.add_parser("fleet", help="roll a signed plugin out to a fleet of nodes over MQTT")
    actions = fleet.add_subparsers(required=True, metavar="ACTION")
    command = actions.add_parser("rollout", help="announce a signed plugin version; canaries, then stages")
    command.add_argument("wasm", type=path_argument,
                         help="the plugin (.wasm), signed (.sig) beside its manifest (.yaml)")
    command.add_argument("--config", type=path_argument, required=True,
                         help="fleet.yaml: broker, nodes, stages, windows")
    command.set_defaults(handler=_run(lambda args, plan: rollout(args.wasm, plan)))
    command = actions.add_parser("status", help="every node's version and verdict, per announced plugin")
    command.add_argument("--config", type=path_argument, required=True, help="fleet.yaml")
    command.set_defaults(handler=_run(lambda args, plan: status(plan)))
    from pi_controller.fleet import simulate

    simulate.add_command(actions, _run)


def _run(action: Callable[[argparse.Namespace, Plan], int]) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        try:
            plan = load_plan(args.config)
        except config.ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        try:
            return action(args, plan)
        except (ValueError, Refused, OSError, ConnectionError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED

    return handler
