"""What a rollout says on the broker, for the fleet tool and the nodes alike: its topics and payloads,
each bounded and checked before use.

Under `<base_topic>` (a site's, as in `mqtt.base_topic`):
- `fleet/rollout/<plugin>`: the announcement (retained): a version of a plugin, its module's size, sha256,
  signature and manifest, the nodes in their stages, the stage reached and the windows. A node that was
  away reads it when it returns.
- `fleet/module/<sha256>/<index>`: the module's bytes in chunks of at most `CHUNK_BYTES` (retained): a node
  subscribes to them only when it fetches that module.
- `<node_id>/fleet/<plugin>`: each node's verdict (retained): where it is with the announced version, and
  what its windows saw.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, TypeGuard

from pi_controller.names import valid_plugin_name
from pi_controller.plugins.manifest import MAX_MANIFEST_BYTES
from pi_controller.plugins.signing import MAX_SIGNATURE_BYTES

CHUNK_BYTES = 64 * 1024  # mosquitto's and paho's defaults take far more; a Pi Zero's memory, less at once
MAX_ANNOUNCEMENT_BYTES = 64 * 1024 + MAX_MANIFEST_BYTES  # the manifest rides in it, and up to 1000 node ids
MAX_VERDICT_BYTES = 4096
MAX_NODES = 1000
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a node id (mqtt.node_id) or a rollout id

# A node's phases, in order; live and the last four end its part in a rollout. rollback_failed: the version a
# rollback puts back could not be written, and the promoted one runs still (the verdict's version and sha256).
WAITING, FETCHING, SHADOW, LIVE_WINDOW, LIVE, REFUSED, ROLLED_BACK, ROLLBACK_FAILED, STOPPED = (
    "waiting", "fetching", "shadow", "live_window", "live", "refused", "rolled_back", "rollback_failed", "stopped")
FAILED = (REFUSED, ROLLED_BACK, ROLLBACK_FAILED)
PROGRESS = {WAITING: 0, FETCHING: 10, SHADOW: 30, LIVE_WINDOW: 70, LIVE: 100}  # the update entity's percentage


class Malformed(ValueError):
    """A payload that is not what a fleet tool or node publishes: said in one line."""


def valid_id(text: object) -> TypeGuard[str]:
    """Whether `text` is a rollout id (or a node id) as an announcement may give it."""
    return isinstance(text, str) and _ID.fullmatch(text) is not None


def rollout_topic(base: str, plugin: str) -> str:
    return f"{base}/fleet/rollout/{plugin}"


def chunk_topic(base: str, sha256: str, index: int | str) -> str:
    return f"{base}/fleet/module/{sha256}/{index}"


def verdict_topic(base: str, node: str, plugin: str) -> str:
    return f"{base}/{node}/fleet/{plugin}"


def chunk_count(size: int) -> int:
    """How many chunks a module of `size` bytes is published in: `CHUNK_BYTES` each, the last one shorter."""
    return -(-size // CHUNK_BYTES)


@dataclass(frozen=True)
class Announcement:
    rollout: str  # this rollout's id: a node decides once per id
    name: str
    version: str
    sha256: str
    size: int
    chunks: int
    signature: str  # the .sig file's text (see plugins/signing.py)
    manifest: str | None  # the .yaml's text, or None
    stages: tuple[tuple[str, ...], ...]  # node ids; the first stage is the canaries
    stage: int  # the last stage let in
    state: str = "running"  # "running", "done" (every stage let in) or "stopped" (a node failed)
    shadow_ticks: int = 50  # ticks a node compares the shadow with the live version before promoting
    live_ticks: int = 50  # calls of the promoted version that must be healthy before the node says live
    min_agreement_percent: float = 0.0  # of the shadow with the live version, to promote

    def stage_of(self, node: str) -> int | None:
        return next((i for i, nodes in enumerate(self.stages) if node in nodes), None)

    def nodes(self) -> list[str]:
        return [node for nodes in self.stages for node in nodes]

    def payload(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def parse(cls, payload: bytes, max_module_bytes: int) -> Announcement:
        data = _object(payload, MAX_ANNOUNCEMENT_BYTES, "announcement")
        try:
            announcement = cls(**{**data, "stages": tuple(tuple(s) for s in data["stages"])})
        except (TypeError, KeyError, ValueError) as exc:
            raise Malformed(f"not an announcement of `pi-controller fleet rollout`: {str(exc)[:200]}") from None
        announcement._check(max_module_bytes)
        return announcement

    def _check(self, max_module_bytes: int) -> None:
        texts = (self.rollout, self.name, self.version, self.sha256, self.signature, self.state)
        if not all(isinstance(t, str) for t in texts) or not valid_id(self.rollout):
            raise Malformed("an announcement's rollout, name, version, sha256, signature and state are text")
        if not valid_plugin_name(self.name) or not _SHA256.fullmatch(self.sha256) or len(self.version) > 64:
            raise Malformed("an announcement names a plugin, its version (64 characters at most) and a sha256")
        if not all(type(n) is int for n in (self.size, self.chunks, self.stage, self.shadow_ticks, self.live_ticks)):
            raise Malformed("an announcement's size, chunks, stage and windows are whole numbers")
        if not 0 < self.size <= max_module_bytes:
            raise Malformed(f"a module of {self.size} bytes: this node takes 1 to {max_module_bytes} "
                            "(plugins.ceilings.max_file_bytes)")
        if self.chunks != chunk_count(self.size):
            raise Malformed(f"{self.chunks} chunks for {self.size} bytes in chunks of {CHUNK_BYTES}")
        if len(self.signature) > MAX_SIGNATURE_BYTES or (self.manifest is not None and (
                not isinstance(self.manifest, str) or len(self.manifest.encode()) > MAX_MANIFEST_BYTES)):
            raise Malformed("an announcement's signature or manifest is longer than a node takes")
        nodes = self.nodes()
        if not self.stages or len(nodes) > MAX_NODES or len(set(nodes)) != len(nodes) or not all(
                isinstance(n, str) and _ID.fullmatch(n) for n in nodes):
            raise Malformed(f"stages name each node (an mqtt.node_id) once, {MAX_NODES} at most")
        if not 0 <= self.stage < len(self.stages) or self.state not in ("running", "done", "stopped"):
            raise Malformed("an announcement's stage is one of its stages; its state running, done or stopped")
        if not (0 <= self.shadow_ticks <= 1_000_000 and 1 <= self.live_ticks <= 1_000_000
                and isinstance(self.min_agreement_percent, (int, float))
                and 0 <= self.min_agreement_percent <= 100):
            raise Malformed("an announcement's windows are 0 to 10^6 ticks, its agreement 0 to 100 percent")


@dataclass(frozen=True)
class Verdict:
    """A node's word on a rollout: its phase, and what its windows counted."""

    rollout: str
    phase: str
    version: str | None = None  # the version live on the node
    sha256: str | None = None  # of the module live on the node
    reason: str | None = None  # why refused or rolled back
    counts: dict[str, Any] = field(default_factory=dict)  # shadow: agreement, ticks, errors; live: calls, errors..

    def payload(self) -> bytes:
        """As UTF-8 JSON within MAX_VERDICT_BYTES, which a reason in any script fits (\\u escapes would make
        500 emoji 6 KB). A lone surrogate (a manifest's version may hold one) is written as its \\u escape;
        a reason, then a version, that would not fit (control characters escape to six bytes each; a version
        is bounded only by its manifest's size) is cut."""
        fields = {k: v for k, v in asdict(self).items() if v is not None and v != {}}
        while True:
            data = json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "backslashreplace")
            cut = next((key for key in ("reason", "version") if fields.get(key)), None)
            if len(data) <= MAX_VERDICT_BYTES or cut is None:
                return data
            fields[cut] = fields[cut][:len(fields[cut]) // 2]

    @classmethod
    def parse(cls, payload: bytes) -> Verdict:
        data = _object(payload, MAX_VERDICT_BYTES, "verdict")
        try:
            verdict = cls(**data)
        except TypeError as exc:
            raise Malformed(f"not a node's verdict: {str(exc)[:200]}") from None
        if not isinstance(verdict.rollout, str) or verdict.phase not in PROGRESS.keys() | {*FAILED, STOPPED}:
            raise Malformed(f"not a node's verdict: phase {str(verdict.phase)[:40]!r}")
        return verdict


def _object(payload: bytes, limit: int, what: str) -> dict[str, Any]:
    if len(payload) > limit:
        raise Malformed(f"a {what} of {len(payload)} bytes, over the {limit} bytes it may weigh")
    try:
        data = json.loads(payload)
    except ValueError as exc:
        raise Malformed(f"a {what} that is not JSON: {str(exc)[:100]}") from None
    if not isinstance(data, dict):
        raise Malformed(f"a {what} is a JSON object")
    return data
