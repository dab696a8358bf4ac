"""A node's part in a fleet rollout (`mqtt.fleet: true`), on the broker's retained announcement.

For each plugin announced with this node in a stage already let in, the node, by itself:
1. fetches the module's chunks (subscribing to them only now), and checks its size against
   `plugins.ceilings.max_file_bytes` and its sha256 before anything else; then the one check
   (`plugins/checks.py`: the signature, here always required, under `plugins.trusted_keys`, the manifest,
   the grant, the tick's budget beside the plugins of the folder), as `plugin install` and a start do;
2. installs it as the live version's shadow (`plugins/shadow.py`) and compares the two for the announced
   `shadow_ticks`: the shadow set refusing it (no room in what the live plugins and the other shadows leave of
   the tick), any error or quarantine of the shadow, or an agreement under the announced minimum, ends it
   there, the shadow removed and the live version untouched;
3. keeps the live version's files, promotes the shadow (the `update` entity's install), and watches the new
   version's first `live_ticks` calls: an error, a quarantine, a failsafe (any, on this node, but while the
   operator has the plugin switched off) or a refused load puts the kept files back (the watcher swaps them in,
   as for any file dropped in), by itself; kept files that cannot be written back leave the promoted version
   running, whole, and the node says so (`rollback_failed`), its next start trying again;
4. says where it is at each step on `<base>/<node_id>/fleet/<plugin>` (retained), each end (but `live`) with one
   reason and one log line, however it came (`_end`), and keeps its word on each rollout in its state folder from
   the promotion or its end on, so that a restart never runs a rollout it refused or
   rolled back again, and one stopped in the live window watches that window again (or finishes its rollback).
5. leaves the plugin to its owner when, in a window (or while the node was stopped after a promotion), the owner
   removed it, disabled it, put another version in (`plugin install`, a copy) or promoted the shadow by hand
   (`plugin promote`, also while the node was stopped in the shadow window: its note says so): that ends the
   node's part (`refused`, saying so), with the shadow removed and nothing put back over the owner's word; a
   plugin disabled, or `plugins.directory` moved by a reload, in the live window puts the version it replaced
   back into the rollout's folder (`rolled_back`, saying so).

The live plugin is only ever replaced by a rename of a whole module that loaded as a shadow, and the
plugin set keeps the running version over any replacement that fails to load: a node is never left without
a version of a plugin it runs. Messages are taken on paho's thread (parsed, bounded), acted on after a tick
on the event loop; module files are written on a worker thread, the node's word (a few hundred bytes) on
the event loop, whole but not flushed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import queue
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import structlog

from pi_controller.config import Settings
from pi_controller.files import write_atomically
from pi_controller.fleet import protocol
from pi_controller.fleet.protocol import Announcement, Malformed, Verdict
from pi_controller.keys import read_small
from pi_controller.mqtt.inbox import Inbound, Route
from pi_controller.plugins import checks
from pi_controller.plugins.install import InstallError, put
from pi_controller.plugins.manifest import read_manifest
from pi_controller.plugins.sandbox import PluginStatus
from pi_controller.plugins.shadow import FOLDER, promote
from pi_controller.plugins.signing import SUFFIX, read_signature
from pi_controller.status import Status

log = structlog.get_logger("pi_controller.fleet")

MIN_SWAP_TICKS = 300  # a shadow or a promoted version runs within this many ticks (or its window), or it did not load
MAX_INBOUND = 4096  # messages waiting for the next tick; past it, chunks are dropped (fetched again)
MAX_REASON = 500  # characters of a reason, said or kept
STOPPED_WHY = "the rollout was stopped before this node promoted it (its announcement says stopped)"
_ENDS = {protocol.REFUSED: ("fleet_rollout_refused", "error"),  # each end's log line and level (`_end`)
         protocol.ROLLED_BACK: ("fleet_rollout_failed", "error"), protocol.STOPPED: ("fleet_rollout_stopped", "info"),
         protocol.ROLLBACK_FAILED: ("fleet_rollback_failed", "error")}
# A node's word on a rollout, kept in its state folder (`_keep_word`): its ids, two reasons of MAX_REASON
# characters, each of which JSON may write in up to twelve bytes (a surrogate pair, \ud83d\ude00), and its
# plugins folder, a path of up to 4096 bytes that JSON may write in up to six each (\u001f).
MAX_WORD_BYTES = 40 * 1024


def _cut(text: Any, limit: int = MAX_REASON) -> str | None:
    """A reason (or another text) as a node says and keeps it: a string cut to `limit` characters (whole ones: its
    UTF-8 is never cut inside a character), None for anything else (a kept word's file may hold anything)."""
    return text[:limit] if isinstance(text, str) else None


def _log_end(name: str, phase: str, rollout: str, reason: str | None, version: str | None = None) -> None:
    """The one log line of a rollout's end but `live` (`_ENDS`: its event and level); `version` if it is known."""
    event, level = _ENDS[phase]
    known = {"version": version} if version is not None else {}
    getattr(log, level)(event, plugin=name, rollout=rollout, reason=reason, **known)


def _running(live: PluginStatus | None) -> str:
    """Which version of a plugin runs, as the plugin set's `live` status says: one loaded, or none."""
    if live is None or live.state != "loaded":
        return f"no version runs ({live.state if live else 'removed'})"
    return f"version {live.version or '(none given)'} ({(live.sha256 or '?')[:16]}..) runs still"


def _earlier(a: Announcement, rollout: str, kept: dict[str, Any] | None) -> Announcement:
    """The announcement of `rollout`, replaced by `a` while the node was away, as far as the node `kept` it (its
    word or its shadow's note): its version and module's sha256; `?` for what a node before they were kept left
    out (or a file holding anything), never `a`'s, which are another rollout's."""
    version, sha256 = (kept or {}).get("version"), (kept or {}).get("sha256")
    return replace(a, rollout=rollout, version=_cut(version, 64) or "?", sha256=_cut(sha256, 64) or "?")


@dataclass
class Rollout:
    """This node's progress in one announced rollout."""

    announcement: Announcement
    directory: Path  # the plugins folder it works in: the one followed when its fetch began (or at a restart), resolved
    phase: str = protocol.WAITING
    reason: str | None = None
    chunks: dict[int, bytes] = field(default_factory=dict)
    job: asyncio.Future[None] | None = None  # file work on a worker thread
    baseline: dict[str, int] | None = None  # the live version's counts when the promoted one took over
    waited: int = 0  # ticks until the shadow, then the promoted version, then a kept one put back, runs
    previous: str | None = None  # the sha256 of the version it replaces: the one live when its fetch began
    restoring: str | None = None  # why it rolls back, from the rollback's job until the version it replaced runs
    ending: Callable[[], None] | None = None  # its end, said once its shadow is removed (`_end_in_shadow`)
    replaced: bool = False  # by a rollout this node is not in: dropped once its end is said (`_replaced`)
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        return self.phase in (protocol.LIVE, protocol.STOPPED, *protocol.FAILED)


class FleetNode:
    def __init__(self, settings: Settings, status: Status, state_dir: Path | None):
        self.status = status  # its settings: the running config (a reload changes trusted_keys)
        self.node = settings.mqtt.node_id
        self.site = settings.mqtt.base_topic
        # Without a state folder (`run` without --state-dir; the unit always gives one), a private one of this
        # process's (mode 0700, a name nobody can guess): a fixed one in the shared /tmp could be made first by
        # another user, who would then choose the module a rollback puts back. A restart does not find it again.
        self.folder = (state_dir or Path(tempfile.mkdtemp(prefix=f"pi-controller-{self.node}-"))) / "fleet"
        self.rollouts: dict[str, Rollout] = {}
        self._inbound: queue.Queue[tuple[str, Any]] = queue.Queue(MAX_INBOUND)
        self._said: dict[str, bytes] = {}  # plugin -> the verdict last published
        self._taken: dict[str, str] = {}  # plugin -> the rollout of the last announcement of it this run took
        self._lost_chunks = False
        self.fetch: Callable[[str], None] = lambda topic: None  # subscribe, unsubscribe: telemetry's (`wire`)
        self.unfetch: Callable[[str], None] = lambda topic: None

    def wire(self, fetch: Callable[[str], None], unfetch: Callable[[str], None]) -> None:
        self.fetch, self.unfetch = fetch, unfetch

    def routes(self) -> dict[str, Route]:
        """The inbox's rows: the announcements (retained: what a returning node catches up from), the chunks,
        subscribed to only while a module is fetched, and this node's own verdicts, retained, swept at each
        connection (`_left_said`): subscribed after the announcements, they come after those retained."""
        return {protocol.rollout_topic(self.site, "+"): Route(self._announced),
                protocol.chunk_topic(self.site, "+", "+"): Route(self._chunk, on_demand=True),
                protocol.verdict_topic(self.site, self.node, "+"): Route(self._said_before, sweep=True)}

    # -- paho's thread: parse, bound, hand over ---------------------------------------------------

    def _announced(self, message: Inbound) -> None:
        if not message.payload:
            return  # a rollout's announcement cleared
        announcement = Announcement.parse(message.payload, self.status.settings.plugins.ceilings.max_file_bytes)
        if announcement.name != message.levels[0]:
            raise Malformed(f"an announcement of '{announcement.name}' on the topic of '{message.levels[0][:64]}'")
        self._inbound.put(("announcement", announcement))

    def _said_before(self, message: Inbound) -> None:
        if message.retained and message.payload:
            self._inbound.put(("verdict", (message.levels[0], Verdict.parse(message.payload))))

    def _chunk(self, message: Inbound) -> None:
        sha256, index = message.levels
        if len(message.payload) > protocol.CHUNK_BYTES or not index.isdigit() or len(index) > 6:
            raise Malformed(f"a chunk of {len(message.payload)} bytes at index {index[:8]!r}")
        try:
            self._inbound.put_nowait(("chunk", (sha256, int(index), message.payload)))
        except queue.Full:
            self._lost_chunks = True  # the fetch subscribes again: the broker sends the retained chunks anew

    # -- the event loop, after each tick ----------------------------------------------------------

    def tick(self, publish: Callable[[str, bytes], None]) -> None:
        """Take what arrived, move each rollout on, say where each stands (`publish`: a retained state)."""
        for _ in range(self._inbound.qsize()):
            kind, item = self._inbound.get_nowait()
            if kind == "announcement":
                self._announcement(item)
            elif kind == "verdict":
                self._left_said(item[0], item[1], publish)
            else:
                self._take_chunk(*item)
        if self._lost_chunks:
            self._lost_chunks = False
            for rollout in self.rollouts.values():
                if rollout.phase == protocol.FETCHING and rollout.job is None:
                    topic = protocol.chunk_topic(self.site, rollout.announcement.sha256, "+")
                    self.unfetch(topic)
                    self.fetch(topic)
        for name, rollout in list(self.rollouts.items()):
            self._advance(name, rollout)
            if rollout.ending is not None:
                continue  # it ends once its shadow is removed: until then, what it said last stands
            said = self._verdict(rollout).payload()
            if self._said.get(name) != said:
                self._said[name] = said
                publish(protocol.verdict_topic(self.site, self.node, name), said)
            if rollout.replaced and rollout.ended:
                del self.rollouts[name]

    def shown(self, name: str) -> dict[str, Any] | None:
        """For Home Assistant's update entity: the announced version, and how far this node is with it."""
        rollout = self.rollouts.get(name)
        if rollout is None or rollout.phase == protocol.WAITING:
            return None
        a, phase, reason = rollout.announcement, rollout.phase, rollout.reason
        # Why it ended, but live (the update entity's release summary, 255 characters at most in Home Assistant):
        # a rollout that failed or stopped with the promoted version still running looks "up to date" otherwise.
        summary = (f"{phase}: {reason}" if reason else phase)[:255] if rollout.ended and phase != protocol.LIVE else ""
        return {"version": a.version, "sha256": a.sha256, "phase": phase, "in_progress": not rollout.ended,
                "percent": protocol.PROGRESS.get(phase, 0), "summary": summary}

    def _announcement(self, a: Announcement) -> None:
        current = self.rollouts.get(a.name)
        if current is not None and current.announcement.rollout == a.rollout:
            current.announcement = a  # a stage let in, or the rollout stopped
            return
        note = self._shadow_note(a.name)  # of the shadow this node installed last, if any
        kept = self._kept_word(a.name)
        kept = kept if kept is not None and kept.get("rollout") == a.rollout else None  # its word on this one
        # The shadow of the rollout it replaces is removed first: the new one may install the very same module
        removal = self._abandon(a.name, current) if current is not None else self._remove_earlier_shadow(
            a, note, kept is not None and kept["phase"] in _ENDS)
        stage, first = a.stage_of(self.node), a.name not in self._taken
        self._taken[a.name] = a.rollout
        if stage is None and current is not None and not current.ended:
            self._replaced(a, current, removal)
            return
        if stage is None:
            if not (first and self._replaced_while_away(a, note, removal)):
                self.rollouts.pop(a.name, None)
            return
        rollout = self.rollouts[a.name] = Rollout(a, self._followed(), job=removal)
        if kept is not None:
            self._resume(a.name, rollout, kept)
            return
        live = self.status.plugins.status.get(a.name)
        if live is not None and live.sha256 == a.sha256 and self._our_shadow(a, note):  # stopped in its window
            rollout.phase = protocol.SHADOW
            self._ended_by_hand(a.name, rollout)  # promoted by hand meanwhile, as a running node would see it
        elif live is not None and live.sha256 == a.sha256:
            rollout.phase = protocol.LIVE
            log.info("fleet_version_already_live", plugin=a.name, version=a.version, rollout=a.rollout)

    def _left_said(self, name: str, verdict: Verdict, publish: Callable[[str, bytes], None]) -> None:
        """A verdict of this node's left retained on the broker (by this run, or an earlier one), taken after the
        retained announcements: one that says a rollout in progress that the node is not in (replaced meanwhile by
        one that leaves it out, or its announcement cleared, before anything of it was kept: it waited or fetched)
        would say so for good; the node says that rollout's end, `stopped`, as a running node says it."""
        if verdict.phase not in protocol.PROGRESS or verdict.phase == protocol.LIVE or name in self.rollouts \
                or name in self._said:
            return  # an end; or the node's word on the plugin this run, said (it stands over this) or said now
        if name in self._taken:
            why = f"replaced by rollout {self._taken[name]} while the node was away, which leaves this node out"
        else:
            why = "its announcement was cleared while the node was away"
        if verdict.phase == protocol.LIVE_WINDOW:
            why += ": the promoted version stays, its live window unfinished"
        said = self._verdict_of(name, verdict.rollout, protocol.STOPPED, why).payload()
        self._said[name] = said
        publish(protocol.verdict_topic(self.site, self.node, name), said)
        _log_end(name, protocol.STOPPED, verdict.rollout, why)

    def _resume(self, name: str, rollout: Rollout, kept: dict[str, Any]) -> None:
        """This node's rollout as it stood when the node stopped: an ended one stays ended; one promoted but not
        yet judged healthy watches its live window again from its first call, or, stopped before the promoted
        version ran or while rolling back, puts the kept version back."""
        rollout.phase, rollout.reason = kept["phase"], _cut(kept.get("reason"))  # the file may hold anything
        if rollout.phase not in (protocol.LIVE_WINDOW, protocol.ROLLBACK_FAILED):
            return
        rollout.phase = protocol.LIVE_WINDOW  # a rollback that failed is tried again (its kept word's `restoring`)
        previous, why, directory = kept.get("previous"), _cut(kept.get("restoring")), kept.get("directory")
        rollout.previous = previous if isinstance(previous, str) else None
        rollout.directory = Path(directory) if isinstance(directory, str) else rollout.directory  # kept resolved
        if self._ended_by_hand(name, rollout):  # while the node was stopped
            return
        live = self.status.plugins.status.get(name)
        if not isinstance(why, str) and live is not None and live.sha256 == rollout.announcement.sha256:
            log.warning("fleet_live_window_restarted", plugin=name, rollout=rollout.announcement.rollout,
                        note="the node stopped in the promoted version's live window; it is watched again")
            return
        why = why if isinstance(why, str) else "the node stopped while the version was promoted"
        if (self.folder / "previous" / name / f"{name}.wasm").is_file():
            self._roll_back(name, rollout, why)
        else:  # stopped before the live version's files were kept: it was never replaced
            self._end(name, rollout, protocol.ROLLED_BACK, f"{why}; the live version never changed")

    def _advance(self, name: str, rollout: Rollout) -> None:
        a = rollout.announcement
        if rollout.job is not None:
            if not rollout.job.done():
                return
            job, rollout.job = rollout.job, None
            if (error := job.exception()) is not None and rollout.restoring is not None:  # its files were not written
                self._rollback_failed(name, rollout,
                                      f"the version it replaced could not be put back ({str(error)[:300]})")
                return
            if job.exception() is not None:
                self._end(name, rollout, protocol.REFUSED, str(job.exception()))
                return
            if rollout.ending is not None:
                ending, rollout.ending = rollout.ending, None
                ending()
        if rollout.ended:
            return
        if a.state == "stopped" and rollout.phase in (protocol.WAITING, protocol.FETCHING, protocol.SHADOW):
            self._end_in_shadow(name, rollout, protocol.STOPPED, STOPPED_WHY)
            return
        stage = a.stage_of(self.node)
        if rollout.phase == protocol.WAITING and stage is not None and stage <= a.stage:
            self._start_fetch(name, rollout)
        elif rollout.phase == protocol.SHADOW:
            self._watch_shadow(name, rollout)
        elif rollout.phase == protocol.LIVE_WINDOW:
            self._watch_live(name, rollout)

    # -- fetch and check --------------------------------------------------------------------------

    def _start_fetch(self, name: str, rollout: Rollout) -> None:
        live = self.status.plugins.status.get(name)
        if live is None or live.state != "loaded":
            self._end(name, rollout, protocol.REFUSED, f"plugin '{name}' does not run here: a rollout replaces a "
                                                       "running version (install the first one with plugin install)")
            return
        if not self.status.settings.plugins.watch:
            self._end(name, rollout, protocol.REFUSED, "plugins.watch is off: a shadow or a promoted version "
                                                       "would not be loaded until a restart")
            return
        a = rollout.announcement
        rollout.phase, rollout.previous = protocol.FETCHING, live.sha256
        rollout.directory = self._followed()  # a reload may have moved it while the stage waited
        self.fetch(protocol.chunk_topic(self.site, a.sha256, "+"))
        log.info("fleet_fetching", plugin=name, version=a.version, rollout=a.rollout)

    def _take_chunk(self, sha256: str, index: int, data: bytes) -> None:
        for name, rollout in self.rollouts.items():
            a = rollout.announcement
            if rollout.phase != protocol.FETCHING or a.sha256 != sha256 or rollout.job is not None:
                continue
            if index >= a.chunks:
                self._end(name, rollout, protocol.REFUSED, f"chunk {index} of a module of {a.chunks} chunks")
                continue
            rollout.chunks[index] = data
            if len(rollout.chunks) == a.chunks:
                self.unfetch(protocol.chunk_topic(self.site, sha256, "+"))
                module = b"".join(rollout.chunks[i] for i in range(a.chunks))
                rollout.chunks = {}
                rollout.job = self._in_worker(partial(self._check_and_shadow, a, module, rollout.directory))
                rollout.phase = protocol.SHADOW

    def _check_and_shadow(self, a: Announcement, module: bytes, directory: Path) -> None:
        """On a worker thread: the bytes against the announcement, then the one check, then the shadow, noted
        (`_remove_earlier_shadow`). Its share of the tick is the shadow set's to grant, by its own rule beside the
        other shadows (`PluginSet._admit`): a refusal there is told by its sha256, and `_watch_shadow` says it."""
        if len(module) != a.size:
            raise InstallError(f"the module is {len(module)} bytes, not the {a.size} announced")
        digest = hashlib.sha256(module).hexdigest()
        if digest != a.sha256:
            raise InstallError(f"the module's sha256 is {digest[:16]}.., not the {a.sha256[:16]}.. announced")
        manifest = a.manifest.encode() if a.manifest is not None else None
        staged = put(self._staging(), a.name, module, manifest, a.signature.encode())[-1]
        running = self.status.settings
        settings = replace(running, plugins=replace(running.plugins, require_signature=True))
        problem = checks.problems(settings, directory, staged).get(a.name)
        if problem is not None:
            raise InstallError(problem.why)
        shadows = directory / FOLDER
        shadows.mkdir(exist_ok=True)
        self._note_shadow(a, directory)
        put(shadows, a.name, module, manifest, a.signature.encode())
        log.info("fleet_shadow_installed", plugin=a.name, version=a.version, rollout=a.rollout)

    # -- the windows ------------------------------------------------------------------------------

    def _watch_shadow(self, name: str, rollout: Rollout) -> None:
        a = rollout.announcement
        if self._ended_by_hand(name, rollout):
            return
        shadows = self.status.shadows
        loaded = shadows.plugins.status.get(name) if shadows is not None else None
        if loaded is not None and loaded.refused_sha256 == a.sha256:
            # refused, or unloaded: the live plugins now need its share of the tick. Refused as the replacement of
            # a shadow of the same name (put there by hand), it shows on that one's status, still "loaded".
            self._end_in_shadow(name, rollout, protocol.REFUSED, f"as a shadow: {loaded.reason}")
            return
        if shadows is None or loaded is None or loaded.sha256 != a.sha256:  # not adopted yet
            rollout.waited += 1
            if rollout.waited > max(a.shadow_ticks, MIN_SWAP_TICKS):
                self._end_in_shadow(name, rollout, protocol.REFUSED,
                                    "the shadow was not loaded (is the plugins folder followed?)")
            return
        stats = shadows.stats.get(name)
        compared = stats.agreement.ticks if stats is not None else 0
        errors = stats.errors if stats is not None else 0
        agreement = stats.agreement.percent() if stats is not None else 100.0
        rollout.counts = {"shadow_ticks": compared, "errors": errors, "agreement_percent": agreement}
        if errors or loaded.state == "quarantined":
            self._end_in_shadow(name, rollout, protocol.ROLLED_BACK,
                                f"the shadow failed {errors} of {compared} calls ({loaded.state}); the live version "
                                "never changed")
        elif compared >= a.shadow_ticks and agreement < a.min_agreement_percent:
            self._end_in_shadow(name, rollout, protocol.ROLLED_BACK,
                                f"the shadow agreed {agreement}% over {compared} ticks, under the "
                                f"{a.min_agreement_percent}% asked")
        elif compared >= a.shadow_ticks:
            self._go_live(name, rollout)

    def _go_live(self, name: str, rollout: Rollout) -> None:
        """Promote the shadow, compared. It runs in what the live plugins leave of the tick (`Shadows.follow_live`),
        so it has room in the running version's place."""
        rollout.phase, rollout.waited = protocol.LIVE_WINDOW, 0
        self._keep_word(name, rollout)  # a restart from here on watches the window again, or rolls back
        rollout.job = self._in_worker(partial(self._keep_and_promote, name, rollout.directory))

    def _keep_and_promote(self, name: str, directory: Path) -> None:
        """On a worker thread: the live version's files kept for a rollback, then the shadow made live."""
        live = directory / f"{name}.wasm"
        kept = self.folder / "previous" / name
        kept.mkdir(parents=True, exist_ok=True)
        for suffix, data in ((".wasm", live.read_bytes()), (".yaml", read_manifest(live)),
                             (SUFFIX, read_signature(live))):
            path = kept / f"{name}{suffix}"
            if data is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(data)
        log.info("fleet_promoting", plugin=name, done=promote(directory, name)[:300])
        (self.folder / FOLDER / f"{name}.json").unlink(missing_ok=True)  # no shadow left to remove

    def _watch_live(self, name: str, rollout: Rollout) -> None:
        a = rollout.announcement
        if self._ended_by_hand(name, rollout):
            return
        live = self.status.plugins.status[name]  # not removed
        if rollout.restoring is not None:  # said once the version it replaced runs again, or cannot
            rollout.waited += 1
            if live.sha256 == rollout.previous:
                self._end(name, rollout, protocol.ROLLED_BACK, rollout.restoring)
            elif live.refused_sha256 == rollout.previous or rollout.waited > MIN_SWAP_TICKS:  # put back whole
                self._rollback_failed(name, rollout,
                                      f"the kept version did not load either: {live.reason or live.state}")
            return
        if rollout.baseline is None:
            rollout.waited += 1
            if live.sha256 != a.sha256:  # the watcher may see the files moved in one by one: a refusal may pass,
                # but not one of the promoted module itself (moved last, after its manifest and signature)
                if live.refused_sha256 == a.sha256 or rollout.waited > max(a.live_ticks, MIN_SWAP_TICKS):
                    self._roll_back(name, rollout, f"the promoted version did not load: {live.reason or 'not seen'}")
                return
            rollout.baseline = self._live_counts(name)
            return
        now = self._live_counts(name)
        off = name in self.status.operator.disabled  # switched off from Home Assistant: not called, its window waits
        if off or now["failsafes"] < rollout.baseline["failsafes"]:  # its actuators failing safe then is the
            rollout.baseline["failsafes"] = now["failsafes"]  # operator's doing; a reload took an actuator's count
        if off:
            return
        delta = {key: now[key] - rollout.baseline[key] for key in now}
        rollout.counts = {"calls": delta["calls"], "errors": delta["errors"], "failsafes": delta["failsafes"],
                          "missed_ticks": delta["missed"], "state": live.state}
        if live.sha256 != a.sha256 or live.state != "loaded" or delta["errors"] or delta["failsafes"]:
            self._roll_back(name, rollout, f"{delta['errors']} errors and {delta['failsafes']} failsafes in "
                                           f"{delta['calls']} calls ({live.state}) after promotion")
        elif delta["calls"] >= a.live_ticks:
            rollout.phase = protocol.LIVE
            self._keep_word(name, rollout)
            log.info("fleet_version_live", plugin=name, version=a.version, rollout=a.rollout, **rollout.counts)

    def _live_counts(self, name: str) -> dict[str, int]:
        loop = self.status.loop
        assert loop is not None, "a tick ran: the loop is wired"
        stats = loop.plugin_stats.get(name)
        return {"calls": stats.calls if stats else 0, "errors": stats.errors if stats else 0,
                "failsafes": sum(loop.safety.failsafes.values()), "missed": loop.ticks.missed}

    def _roll_back(self, name: str, rollout: Rollout, why: str) -> None:
        kept = self.folder / "previous" / name
        wasm = kept / f"{name}.wasm"

        def restore() -> None:
            manifest, signature = (kept / f"{name}.yaml"), (kept / f"{name}{SUFFIX}")
            put(rollout.directory, name, wasm.read_bytes(),
                manifest.read_bytes() if manifest.exists() else None,
                signature.read_bytes() if signature.exists() else None)

        rollout.restoring = why
        self._keep_word(name, rollout)  # a restart finishes the rollback
        rollout.job, rollout.waited = self._in_worker(restore), 0
        log.warning("fleet_rolling_back", plugin=name, rollout=rollout.announcement.rollout, reason=why[:300])

    # -- endings ----------------------------------------------------------------------------------

    def _ended_by_hand(self, name: str, rollout: Rollout) -> bool:
        """Whether the owner removed or disabled the plugin, put another version of it in, or promoted its shadow,
        since this rollout began: if so, its part here ends, with the shadow removed and the plugins folder left
        as the owner left it (a rollback would put the version the rollout replaced back over the owner's word).
        A plugin disabled, or a plugins folder moved by a reload, in the live window is rolled back (`_put_back`)."""
        live = self.status.plugins.status.get(name)
        if rollout.directory != (followed := self._followed()):
            why = f"plugins.directory moved from {rollout.directory} to {followed} by a reload"
            if rollout.phase == protocol.LIVE_WINDOW:
                return self._put_back(name, rollout, why, f" in {rollout.directory}; the new folder is left as it is")
        elif live is None:
            why = f"plugin '{name}' was removed from the plugins folder by hand"
        elif live.state == "disabled":
            why = f"plugin '{name}' was disabled in the config"
            if rollout.phase == protocol.LIVE_WINDOW:
                return self._put_back(name, rollout, why, ", to run once the plugin is enabled again")
        elif live.sha256 is not None and rollout.previous is not None and live.sha256 not in (
                rollout.previous, rollout.announcement.sha256):
            why = f"another version of plugin '{name}' was put in by hand ({live.version or live.sha256[:16]})"
        elif rollout.phase == protocol.SHADOW and live.sha256 == rollout.announcement.sha256 != rollout.previous:
            why = f"the shadow of plugin '{name}' was promoted by hand (plugin promote) before it was compared"
        else:
            return False
        phase = protocol.ROLLED_BACK if rollout.restoring else protocol.REFUSED
        why = f"{rollout.restoring + '; then ' if rollout.restoring else ''}{why}: the node leaves it as it is"
        if rollout.phase == protocol.SHADOW:
            self._end_in_shadow(name, rollout, phase, why)
        else:
            self._end(name, rollout, phase, why)
        return True

    def _rollback_failed(self, name: str, rollout: Rollout, failed: str) -> None:
        """The version the rollout replaced does not run after its rollback, for the reason `failed` says: its files
        could not be written back (the plugins folder not writable, the disk full: `put` stages them all before it
        renames one, and puts back what its renames replaced if one fails, so the promoted version stays whole in
        the folder), or the plugin set refused them (a reload no longer trusts its key). The plugin set runs the
        last whole version it loaded, or none. The node says which: `rollback_failed` with what runs, its word kept
        with the rollback's reason (its next start tries again), `rolled_back` only if the version it replaced runs
        all the same."""
        live = self.status.plugins.status.get(name)
        if live is not None and live.state == "loaded" and live.sha256 == rollout.previous:
            self._end(name, rollout, protocol.ROLLED_BACK, f"{rollout.restoring}; {failed}, but {_running(live)}")
        else:
            self._end(name, rollout, protocol.ROLLBACK_FAILED, f"{rollout.restoring}; {failed}: {_running(live)}; "
                                                               "the node's next start tries again")

    def _put_back(self, name: str, rollout: Rollout, why: str, where: str) -> bool:
        """The promoted version has not finished its live window, and will not be called in it: the version it
        replaced is put back into the rollout's folder (`where` says what that means), and the node says rolled
        back once its files are (it does not run now: disabled, or in a folder no longer followed)."""
        done = f"{why}: the version it replaced is put back{where}"
        if rollout.restoring is not None:  # the rollback's files are back: `_advance` waited for its job
            self._end(name, rollout, protocol.ROLLED_BACK,
                      rollout.restoring if rollout.restoring == done else f"{rollout.restoring}; then {why}")
        elif (self.folder / "previous" / name / f"{name}.wasm").is_file():
            self._roll_back(name, rollout, done)
        else:  # stopped before the live version's files were kept: it was never replaced
            self._end(name, rollout, protocol.ROLLED_BACK, f"{why}; the live version never changed")
        return True

    def _end_in_shadow(self, name: str, rollout: Rollout, phase: str, why: str) -> None:
        """The rollout ends before a promotion in `phase`, for `why`: its shadow is removed, then it ends (`_end`).
        A node that says a rollout ended has nothing of it left in the plugins folder, as the owner's tool reads it;
        meanwhile `_advance` waits for the removal, so the end comes once. Its word is kept at once all the same: a
        node stopped before its next turn would otherwise fetch, shadow and compare a failed rollout anew at its
        start (and might promote it)."""
        removal = self._abandon(name, rollout)
        if removal is not None:
            self._keep_word(name, replace(rollout, phase=phase, reason=_cut(why)))
        self._end_after(rollout, removal, partial(self._end, name, rollout, phase, why))

    def _replaced(self, a: Announcement, rollout: Rollout, removal: asyncio.Future[None] | None) -> None:
        """`rollout`, not ended, is replaced by `a`, which leaves this node out: its end is still said (its verdict,
        retained, would otherwise say it in progress for good), once the `removal` of its shadow is done, as any end
        before a promotion (`_end_in_shadow`); then it is dropped. One already ending ends as it was to; one stopped
        in its live window leaves the promoted version in place; one rolling back ends once its rollback does."""
        rollout.replaced = True
        if rollout.restoring is not None:  # its rollback goes on, and ends as any rollback: the version it replaced
            return  # runs again, or its files could not be written (`_rollback_failed`)
        why = f"replaced by rollout {a.rollout}, which leaves this node out"
        if rollout.phase == protocol.LIVE_WINDOW:
            why += ": the promoted version stays, its live window unfinished"
        end = rollout.ending or partial(self._end, a.name, rollout, protocol.STOPPED, why)
        rollout.ending = None
        self._end_after(rollout, removal, end)

    def _replaced_while_away(self, a: Announcement, note: dict[str, Any] | None,
                             removal: asyncio.Future[None] | None) -> bool:
        """`a`, which leaves this node out, the first announcement of `a.name` this run takes: the rollout the
        node was in when it stopped (its word kept in the live window, or the `note` of its shadow), replaced by `a`
        meanwhile, ends as `_replaced` ends it in a running node: its verdict, retained on the broker, still says
        the window it was in. One whose end was kept but not said (stopped before its shadow's `removal`) says
        that end. Whether there was one."""
        word = self._kept_word(a.name)
        resumed = (protocol.LIVE_WINDOW, protocol.ROLLBACK_FAILED)  # a promoted version watched, or rolled back
        if word is not None and word["phase"] in resumed and word.get("rollout") != a.rollout:
            earlier = word.get("rollout")
        elif note is not None and note.get("rollout") != a.rollout:
            earlier = note.get("rollout")
        else:
            return False
        if not protocol.valid_id(earlier):
            return False
        word = word if word is not None and word.get("rollout") == earlier else None
        # Known by its id, version and module, as its word or its shadow's note kept them: dropped once its end is said
        rollout = self.rollouts[a.name] = Rollout(_earlier(a, earlier, word or note), self._followed(),
                                                  protocol.SHADOW, replaced=True)
        if word is not None and word["phase"] in resumed and isinstance(word.get("restoring"), str):
            self._resume(a.name, rollout, word)  # stopped while rolling back, or its rollback failed: it goes on
        elif word is not None and word["phase"] in _ENDS:
            self._end_after(rollout, removal, partial(self._end, a.name, rollout, word["phase"],
                                                      _cut(word.get("reason")) or ""))
            return True
        elif word is not None:
            rollout.phase = protocol.LIVE_WINDOW
        if not rollout.ended:
            self._replaced(a, rollout, removal)
        return True

    @staticmethod
    def _end_after(rollout: Rollout, removal: asyncio.Future[None] | None, end: Callable[[], None]) -> None:
        """`end` now if there is no `removal`; else once it is done (`_advance` waits for it): the end is said
        after the fact it reports."""
        if removal is None:
            end()
        else:
            rollout.job, rollout.ending = removal, end

    def _abandon(self, name: str, rollout: Rollout) -> asyncio.Future[None] | None:
        """Stop fetching; remove the shadow this rollout installed (the live version never changed), in this
        run of the node or an earlier one (stopped in the shadow window, it returns to a rollout stopped). Done
        once it is removed (`_removed`); None if there is none."""
        self.unfetch(protocol.chunk_topic(self.site, rollout.announcement.sha256, "+"))
        rollout.chunks = {}
        remove = partial(self._remove_shadow, name, rollout.directory, rollout.announcement.sha256)
        if rollout.job is not None and not rollout.job.done():  # the shadow it installs may land after this
            removed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def after(job: asyncio.Future[None]) -> None:
                if not job.cancelled():
                    job.exception()  # taken: the rollout it would refuse is gone
                self._removed(self._in_worker(remove), removed)

            rollout.job.add_done_callback(after)
            return removed
        if rollout.phase in (protocol.WAITING, protocol.FETCHING, protocol.SHADOW):
            return self._removed(self._in_worker(remove))
        return None

    def _removed(self, job: asyncio.Future[Any], removed: asyncio.Future[None] | None = None) -> asyncio.Future[None]:
        """`removed` (a new one if None) done once the removal `job` is, with nothing raised: what a new rollout of
        the plugin waits for before its own file work, which may put the same module in the same place. What the
        removal raised is said here, not as the new rollout's refusal."""
        removed = removed if removed is not None else asyncio.get_running_loop().create_future()

        def done(job: asyncio.Future[Any]) -> None:
            if not job.cancelled() and job.exception() is not None:
                log.warning("fleet_shadow_not_removed", error=str(job.exception())[:300])
            removed.set_result(None)

        job.add_done_callback(done)
        return removed

    def _remove_shadow(self, name: str, directory: Path, sha256: str) -> bool:
        """On a worker thread: the shadow of `name` in `directory` removed if it is the module `sha256` (not one
        put there by hand since), the module first (the shadow unloads), then what was beside it; and its note.
        Whether there was one to remove."""
        shadow = directory / FOLDER / f"{name}.wasm"
        ours = shadow.is_file() and hashlib.sha256(shadow.read_bytes()).hexdigest() == sha256
        if ours:
            for suffix in (".wasm", ".yaml", SUFFIX):
                shadow.with_suffix(suffix).unlink(missing_ok=True)
        note = self._shadow_note(name)
        if note is not None and note.get("sha256") == sha256:
            (self.folder / FOLDER / f"{name}.json").unlink(missing_ok=True)
        return ours

    def _note_shadow(self, a: Announcement, directory: Path) -> None:
        """Before its shadow is installed: which rollout's module it is, and where, kept in the state folder. The
        node's word is kept only from the promotion on; a node stopped in the shadow window finds the shadow it
        left by this note, for a rollout replaced meanwhile (`_remove_earlier_shadow`)."""
        note = {"rollout": a.rollout, "sha256": a.sha256, "version": a.version, "directory": str(directory)}
        (self.folder / FOLDER).mkdir(parents=True, exist_ok=True)
        write_atomically(self.folder / FOLDER / f"{a.name}.json", json.dumps(note).encode(), 0o600, flush=False)

    def _remove_earlier_shadow(self, a: Announcement, note: dict[str, Any] | None,
                               ended: bool) -> asyncio.Future[None] | None:
        """The first announcement of `a.name` this node takes: a shadow an earlier run installed (its `note`) for
        another rollout, or for `a` when the node's kept word says `a` `ended` (stopped before the removal that
        follows the word of an end before a promotion), is removed, whether or not `a` is this node's: nothing
        else would ever compare or remove it. Done once it is removed (`_removed`); None if there is none."""
        if note is None or (note.get("rollout") == a.rollout and not ended) \
                or not isinstance(note.get("sha256"), str) or not isinstance(note.get("directory"), str):
            return None
        why = "its rollout ended" if note.get("rollout") == a.rollout else f"replaced by rollout {a.rollout}"

        def remove() -> None:
            if self._remove_shadow(a.name, Path(note["directory"]), note["sha256"]):
                log.info("fleet_earlier_shadow_removed", plugin=a.name, rollout=str(note.get("rollout"))[:64],
                         why=why)

        return self._removed(self._in_worker(remove))

    def _our_shadow(self, a: Announcement, note: dict[str, Any] | None) -> bool:
        """Whether this node's `note` says it installed the module of `a` as the shadow of that very rollout, in
        the folder it follows: a node stopped in that shadow window, which did not promote it itself."""
        return note is not None and (note.get("rollout"), note.get("sha256")) == (a.rollout, a.sha256) \
            and isinstance(note.get("directory"), str) and Path(note["directory"]) == self._followed()

    def _followed(self) -> Path:
        """The plugins folder followed now, resolved: the same folder spelled another way (`--plugins plugins`,
        then an absolute path at a restart) is no folder moved."""
        return self.status.plugins.resolved  # resolved off the event loop: the folder may be on a hung mount

    def _end(self, name: str, rollout: Rollout, phase: str, why: str) -> None:
        """Every end of a rollout but `live`, whatever its cause and path: its phase and one reason, kept (a restart
        answers with the same), said in one log line; its verdict and the update entity say the same at the turn."""
        rollout.phase, rollout.reason = phase, _cut(why)
        self._keep_word(name, rollout)
        _log_end(name, phase, rollout.announcement.rollout, rollout.reason, rollout.announcement.version)

    def _verdict(self, rollout: Rollout) -> Verdict:
        a = rollout.announcement
        return self._verdict_of(a.name, a.rollout, rollout.phase, rollout.reason, rollout.counts)

    def _verdict_of(self, name: str, rollout: str, phase: str, reason: str | None,
                    counts: dict[str, Any] | None = None) -> Verdict:
        """A verdict on `rollout`, with the version of `name` that runs here, as the plugin set says."""
        live = self.status.plugins.status.get(name)
        return Verdict(rollout, phase, live.version if live else None, live.sha256 if live else None, reason,
                       counts or {})

    def _kept_word(self, name: str) -> dict[str, Any] | None:
        data = self._read_state(name, self.folder / f"{name}.json", "a node's word on a rollout")
        return data if data is not None and isinstance(data.get("phase"), str) else None

    def _shadow_note(self, name: str) -> dict[str, Any] | None:
        return self._read_state(name, self.folder / FOLDER / f"{name}.json", "the note of a rollout's shadow")

    def _read_state(self, name: str, path: Path, what: str) -> dict[str, Any] | None:
        try:
            data = json.loads(read_small(path, MAX_WORD_BYTES, what))
        except (FileNotFoundError, ValueError):
            return None  # none kept (or cut short by a power cut): the rollout is new to this node
        except OSError as exc:
            log.warning("fleet_state_unreadable", plugin=name, error=f"{path} {exc.strerror}"[:300])
            return None
        return data if isinstance(data, dict) else None

    def _keep_word(self, name: str, rollout: Rollout) -> None:
        a = rollout.announcement  # its version and module: what a restart shows of it, replaced while away
        word = {"rollout": a.rollout, "version": a.version, "sha256": a.sha256, "phase": rollout.phase,
                "reason": rollout.reason,
                "previous": rollout.previous, "restoring": _cut(rollout.restoring) or None,
                "directory": str(rollout.directory)}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            # Whole or not at all (a word cut short would make a restart forget a rollback), and on the event
            # loop, between two ticks: so without an fsync, which could cost a tick on an SD card. Mode 0600, as
            # the daemon's other state: only this node reads it, at its next start (the owner's tool and Home
            # Assistant read the verdict it publishes; no command reads the file).
            write_atomically(self.folder / f"{name}.json", json.dumps(word).encode(), 0o600, flush=False)
        except OSError as exc:
            log.warning("fleet_state_not_kept", plugin=name, error=str(exc)[:200])

    def _staging(self) -> Path:
        staging = self.folder / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        return staging

    def _in_worker(self, work: Callable[[], object]) -> asyncio.Future[Any]:
        """`work` on a worker thread; what it raises, `_advance` says as the rollout's refusal."""
        return asyncio.get_running_loop().run_in_executor(None, work)
