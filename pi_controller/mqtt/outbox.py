"""What goes out, and when the broker lets it: the outbox between the publish policy and the link.

Messages come in by what they are, each kind through its own door, and go out by priority:
1. discovery configs and the clean-ups of retained leftovers (`put_first`: Home Assistant needs an
   entity's config before its state), the latest per topic; a clean-up drops the states queued on its topic;
2. retained states (`put_state`): while connected, the latest value per topic (`pending`, each topic
   keeping its place: a busy topic does not starve the rest, a dashboard sees the present, not a queue);
   while the broker is away, every one in order with its timestamp (the outage buffer, `history`: past
   `buffer_messages` the oldest go, counted in `dropped`), sent before the latest on reconnecting;
3. answers to commands (`put_answer`): news, never coalesced, never ahead of a state, kept apart and
   bounded to a second's worth of the rate cap (`answer_bound`): past it the oldest go, counted in
   `answers_dropped`. A flood of commands costs answers, never states. They are not kept in the outage
   buffer nor its file.
(`online` and `offline` are the link's own, said directly.)

`pump` hands messages to the link at up to `max_messages_per_s`, only while connected. At a stop,
`flush` sends the configs and the latest states (the actuators' shut-down states among them) past
everything else, dropping the answers still queued, and waits for the broker to acknowledge each (QoS 1)
within its time. With `buffer_file`, the states still unsent are saved and sent after the next start;
that file is read back line by line within bounds (`MAX_FILE_BYTES`, `MAX_LINE_BYTES`) and only into our
own topics: anyone who can write it must not publish through us.
"""

from __future__ import annotations

import json
import math
import os
import stat
import time
from collections import deque
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, NamedTuple, Protocol

import structlog

from pi_controller.config import MqttSettings
from pi_controller.files import open_to_read, open_to_write
from pi_controller.mqtt.discovery import Topics
from pi_controller.token_bucket import TokenBucket

log = structlog.get_logger("pi_controller.telemetry")

# The outage buffer's file: a state is a few hundred bytes, the default bound (10,000) a few MB. A file
# over this is no buffer of ours (a copy gone wrong, a disk filled by someone else): refused whole.
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_LINE_BYTES = 64 * 1024  # a saved line; a payload of ours is far smaller
MAX_TOPIC_BYTES = 65535  # MQTT's own limit
FOREIGN_NAMED = 5  # topics not ours in the file, named in the log


class Message(NamedTuple):
    topic: str
    payload: bytes
    retain: bool


class Delivery(Protocol):
    """A message handed over (paho's MQTTMessageInfo): published once the broker acknowledged it."""

    def is_published(self) -> bool: ...

    def wait_for_publish(self, timeout: float | None = None) -> None: ...


class Sender(Protocol):
    """Where the outbox's messages go (the link)."""

    def connected(self) -> bool: ...

    def publish(self, message: Message) -> Delivery | None:
        """Handed over (QoS 1); None if the sender holds all it may and the message stays with us."""
        ...


class Outbox:
    def __init__(self, mqtt: MqttSettings, sender: Sender, timer: Callable[[], float]):
        self._bound = mqtt.buffer_messages
        self._file = Path(mqtt.buffer_file) if mqtt.buffer_file else None
        self._base = Topics.of(mqtt).base + "/"
        self._sender = sender
        self._timer = timer
        self._first: dict[str, Message] = {}  # configs and clean-ups, the latest per topic, in order
        self._history: deque[Message] = deque()  # states kept in order while the broker is away
        self._pending: dict[str, Message] = {}  # while connected: the latest state per topic, oldest first
        self._answers: deque[Message] = deque()
        self.answer_bound = max(10, int(mqtt.max_messages_per_s))  # a second's worth of the rate cap
        self.coalesced = 0  # states replaced by a newer one before they could be sent (the rate cap)
        self.dropped = 0  # states dropped from the outage buffer past its bound
        self.answers_dropped = 0
        rate = mqtt.max_messages_per_s
        self._bucket = TokenBucket(rate, rate, timer(), tokens=0.0)  # a second's worth at most
        self._restore()

    def __len__(self) -> int:
        """Messages kept in order: configs, the outage buffer, answers; not the states waiting on the rate cap."""
        return len(self._first) + len(self._history) + len(self._answers)

    def __iter__(self) -> Iterator[Message]:
        """Everything kept, in the order it would go out."""
        yield from self._first.values()
        yield from self._history
        yield from self._pending.values()
        yield from self._answers

    def waiting(self) -> set[str]:
        """The topics with a message not yet handed to the link."""
        return {message.topic for message in self}

    # -- in, by kind ---------------------------------------------------------------------------

    def put_state(self, topic: str, payload: bytes) -> None:
        """A retained state: while connected, its topic's latest value (keeping the topic's place); while
        the broker is away, kept in order in the outage buffer."""
        message = Message(topic, payload, True)
        if self._sender.connected():
            if topic in self._pending:
                self.coalesced += 1
            self._pending[topic] = message
        else:
            self._unpend()  # those from before the broker went, first
            self._keep(message)

    def put_answer(self, topic: str, payload: bytes) -> None:
        """An answer to a command: news each time, never coalesced, not retained; past its bound the
        oldest go."""
        if len(self._answers) >= self.answer_bound:
            self._answers.popleft()
            self.answers_dropped += 1
            if self.answers_dropped == 1 or self.answers_dropped % 1000 == 0:
                log.warning("telemetry_answers_dropped", dropped=self.answers_dropped, bound=self.answer_bound)
        self._answers.append(Message(topic, payload, False))

    def put_first(self, messages: Iterable[tuple[str, bytes]]) -> None:
        """Retained configs (or empty payloads that remove them), ahead of everything queued, in their order.
        They supersede the states queued on their topics: a state of a device gone, sent after its emptying
        (from the outage buffer, at reconnecting), would be retained again."""
        first = {topic: Message(topic, payload, True) for topic, payload in messages}
        if not first:
            return
        self._first = first | {topic: m for topic, m in self._first.items() if topic not in first}
        if any(m.topic in first for m in self._history):
            self._history = deque(m for m in self._history if m.topic not in first)
        for topic in first.keys() & self._pending.keys():
            del self._pending[topic]

    def _keep(self, message: Message) -> None:
        """Into the outage buffer, in order; past the bound the oldest go."""
        if len(self._history) >= self._bound:
            self._history.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("telemetry_dropped", dropped=self.dropped, bound=self._bound)
        self._history.append(message)

    # -- out -----------------------------------------------------------------------------------

    def pump(self) -> None:
        """By priority (configs, the outage buffer, the latest states, answers), as far as the rate cap
        allows."""
        if not self._sender.connected():
            self._unpend()  # the broker went away: they wait in order now
            return
        allowed = int(self._bucket.refill(self._timer()))
        sent = 0
        for queued in (self._first, self._history, self._pending, self._answers):
            sent += len(self._send(queued, allowed - sent))
        self._bucket.take(sent)

    def _send(self, queued: dict[str, Message] | deque[Message], allowed: float) -> list[tuple[str, Delivery]]:
        """Up to `allowed` of `queued`, oldest first, while the link takes them; what it took, by topic."""
        sent: list[tuple[str, Delivery]] = []
        while queued and len(sent) < allowed and self._sender.connected():
            message = queued[0] if isinstance(queued, deque) else next(iter(queued.values()))
            # Even when the connection dropped a moment ago, paho keeps a QoS 1 message and sends it after
            # reconnecting; only its own queue being full leaves the message with us.
            delivery = self._sender.publish(message)
            if delivery is None:
                break
            if isinstance(queued, deque):
                queued.popleft()
            else:
                del queued[message.topic]
            sent.append((message.topic, delivery))
        return sent

    def flush(self, wait_s: float) -> None:
        """At a stop: the configs and the latest states, the actuators' shut-down states among them,
        past everything else (the answers still queued are dropped; the outage buffer waits for the file
        or the next start: sent after them, its older states would be what the broker retains), each
        acknowledged by the broker within `wait_s` in all, or said not to be."""
        self._drop_answers()
        if not self._sender.connected():
            if self._pending or self._history:
                log.warning("telemetry_final_states_unsent", reason="the broker is away",
                            kept=str(self._file) if self._file else None)
            self._unpend()
            return
        handed = self._send(self._first, math.inf) + self._send(self._pending, math.inf)
        unconfirmed = _unconfirmed(handed, time.monotonic() + wait_s)
        if unconfirmed or self._pending:
            log.warning("telemetry_final_states_unconfirmed", unconfirmed=len(unconfirmed),
                        not_handed_over=len(self._pending), wait_s=wait_s,
                        topics=sorted(unconfirmed + list(self._pending))[:20],
                        consequence="the broker may retain what these topics said before the stop")

    def _drop_answers(self) -> None:
        self.answers_dropped += len(self._answers)
        self._answers.clear()

    def _unpend(self) -> None:
        """The latest states waiting on the rate cap into the outage buffer, in their order."""
        for message in self._pending.values():
            self._keep(message)
        self._pending.clear()

    # -- a restart of the daemon ---------------------------------------------------------------

    def save(self) -> None:
        """The states unsent, to the buffer file if there is one (configs go again at every connection,
        answers are news)."""
        self._unpend()
        if not self._history:
            return
        if self._file is None:
            log.warning("telemetry_unsent_at_stop", messages=len(self._history), fix="mqtt.buffer_file keeps them")
            return
        partial = Path(f"{self._file}.partial")  # replaced whole: a crash mid-write leaves the old file
        try:
            with open_to_write(partial) as f:  # never waiting: a FIFO nothing reads would block the stop for good
                f.writelines(json.dumps([topic, payload.decode(), retain]).encode() + b"\n"
                             for topic, payload, retain in self._history)
            os.replace(partial, self._file)
        except OSError as exc:  # a full or read-only disk: the states are lost, said once, the stop goes on
            log.error("telemetry_save_failed", messages=len(self._history), file=str(self._file),
                      error=str(exc)[:300])
            partial.unlink(missing_ok=True)
            return
        log.info("telemetry_saved", messages=len(self._history), file=str(self._file))

    def _restore(self) -> None:
        """The buffer file, into the outage buffer: a file anyone with the disk could edit, so each line is
        checked and a bad one skipped (never a crash loop), a file over `MAX_FILE_BYTES` refused whole,
        and only the newest `buffer_messages` held at a time. Taken up once: deleted, or kept aside as
        `<file>.refused`."""
        path = self._file
        if path is None or not path.exists():
            return
        try:
            with open_to_read(path) as f:  # never waiting: a FIFO nothing writes to would block the open for good
                info = os.fstat(f.fileno())
                if not stat.S_ISREG(info.st_mode):  # a FIFO or a device: its reads may never end
                    log.warning("telemetry_restore_failed", file=str(path), error="not a regular file")
                    return
                if info.st_size > MAX_FILE_BYTES:
                    path.replace(f"{path}.refused")
                    log.warning("telemetry_buffer_refused", file=str(path), bytes=info.st_size, limit=MAX_FILE_BYTES,
                                kept_as=f"{path}.refused", fix="not a buffer of ours: inspect it, then delete it")
                    return
                skipped, foreign = self._read(f)
        except OSError as exc:
            log.warning("telemetry_restore_failed", file=str(path), error=str(exc)[:300])
            return
        path.unlink(missing_ok=True)
        say = log.warning if skipped else log.info
        say("telemetry_restored", messages=len(self._history), skipped=skipped, not_ours=foreign, file=str(path))

    def _read(self, f: IO[bytes]) -> tuple[int, list[str]]:
        """Each line of `f` that is a message of ours into the outage buffer; how many were skipped, and
        the topics of those that were not ours."""
        skipped = 0
        foreign: list[str] = []
        while line := f.readline(MAX_LINE_BYTES + 1):
            if len(line) > MAX_LINE_BYTES:
                while line and not line.endswith(b"\n"):  # the rest of an overlong line, a chunk at a time
                    line = f.readline(MAX_LINE_BYTES)
                skipped += 1
                continue
            message = _restored(line)
            if message is None:
                skipped += 1
            elif not _ours(message.topic, self._base):
                skipped += 1
                if len(foreign) < FOREIGN_NAMED:
                    foreign.append(message.topic[:200])
            else:
                self._keep(message)
        return skipped, foreign


def _unconfirmed(handed: list[tuple[str, Delivery]], deadline: float) -> list[str]:
    """The topics of `handed` the broker has not acknowledged by `deadline` (monotonic)."""
    unconfirmed = []
    for topic, delivery in handed:
        try:
            delivery.wait_for_publish(max(0.0, deadline - time.monotonic()))
        except (RuntimeError, ValueError):  # the connection went meanwhile
            pass
        if not delivery.is_published():
            unconfirmed.append(topic)
    return unconfirmed


def _ours(topic: str, base: str) -> bool:
    """A topic under our own prefix that may be published to (no wildcard, no NUL)."""
    return topic.startswith(base) and not any(c in topic for c in "+#\0")


def _restored(line: bytes) -> Message | None:
    """A saved message, if the line is one: [topic, payload text, retain]."""
    try:
        topic, payload, retain = json.loads(line)
        if (isinstance(topic, str) and isinstance(payload, str) and isinstance(retain, bool)
                and 0 < len(topic.encode()) <= MAX_TOPIC_BYTES):
            return Message(topic, payload.encode(), retain)
    except (ValueError, TypeError, RecursionError):  # UnicodeError (a lone surrogate is valid JSON) is a ValueError
        pass
    return None
