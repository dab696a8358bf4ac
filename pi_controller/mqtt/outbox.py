"""What goes out, and when the broker lets it: the outbox between the publish policy and the link.

Messages come in by what they are, each kind through its own door: a retained state (`put_state`), an
answer to a command (`put_answer`), and discovery configs with the clean-ups of retained leftovers
(`put_first`, ahead of everything queued: Home Assistant needs an entity's config before its state).
How each kind is queued, bounded and ordered is decided here alone, so that giving them priorities
(availability and states before answers, answers bounded apart) changes this module and no caller.

`pump` hands messages to the link at up to `max_messages_per_s`, only while connected. While the broker
is away the outbox keeps messages in order with their original timestamps; past `buffer_messages` the
oldest are dropped and counted. While connected but held back by the rate cap, a state waits as the
latest value of its topic (`pending`): a dashboard sees the present, not a queue. With `buffer_file`, what
is unsent at a stop is saved, and sent after the next start.
"""

from __future__ import annotations

import json
import os
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Protocol

import structlog

from pi_controller.config import MqttSettings
from pi_controller.token_bucket import TokenBucket

log = structlog.get_logger("pi_controller.telemetry")


class Message(NamedTuple):
    topic: str
    payload: bytes
    retain: bool


class Sender(Protocol):
    """Where the outbox's messages go (the link)."""

    def connected(self) -> bool: ...

    def publish(self, message: Message) -> bool:
        """Handed over (QoS 1); False if the sender holds all it may and the message stays with us."""
        ...


class Outbox:
    def __init__(self, mqtt: MqttSettings, sender: Sender, timer: Callable[[], float]):
        self._bound = mqtt.buffer_messages
        self._file = Path(mqtt.buffer_file) if mqtt.buffer_file else None
        self._sender = sender
        self._timer = timer
        self._queue: deque[Message] = deque()  # in order, kept while the broker is away
        self._pending: dict[str, Message] = {}  # while connected: the latest state per topic, oldest first
        self.coalesced = 0  # states replaced by a newer one before they could be sent (the rate cap)
        self.dropped = 0
        rate = mqtt.max_messages_per_s
        self._bucket = TokenBucket(rate, rate, timer(), tokens=0.0)  # a second's worth at most
        self._restore()

    def __len__(self) -> int:
        """Messages kept in order (during an outage, all of them); not the states waiting on the rate cap."""
        return len(self._queue)

    def __iter__(self) -> Iterator[Message]:
        return iter(self._queue)

    def waiting(self) -> set[str]:
        """The topics with a message not yet handed to the link."""
        return {message.topic for message in self._queue} | set(self._pending)

    # -- in, by kind ---------------------------------------------------------------------------

    def put_state(self, topic: str, payload: bytes) -> None:
        """A retained state. While connected it waits as its topic's latest value (keeping the topic's
        place: a busy topic does not starve the rest); while the broker is away it keeps its place in order."""
        message = Message(topic, payload, True)
        if self._sender.connected():
            if topic in self._pending:
                self.coalesced += 1
            self._pending[topic] = message
        else:
            self._keep(message)

    def put_answer(self, topic: str, payload: bytes) -> None:
        """An answer to a command: news each time, never coalesced, not retained."""
        self._keep(Message(topic, payload, False))

    def put_first(self, messages: Iterable[tuple[str, bytes]]) -> None:
        """Retained configs (or empty payloads that remove them), ahead of everything queued, in their order."""
        self._queue.extendleft(reversed([Message(topic, payload, True) for topic, payload in messages]))

    def _keep(self, message: Message) -> None:
        """In order; past the bound the oldest go."""
        if len(self._queue) >= self._bound:
            self._queue.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("telemetry_dropped", dropped=self.dropped, bound=self._bound)
        self._queue.append(message)

    # -- out -----------------------------------------------------------------------------------

    def pump(self, budget: int | None = None) -> None:
        """The queue first (it is older), then the latest states, as far as the rate cap allows (or
        `budget` messages, at a stop)."""
        if not self._sender.connected():
            self._unpend()  # the broker went away: they wait in order now
            return
        tokens = self._bucket.refill(self._timer())
        allowed = int(tokens) if budget is None else budget
        sent = 0
        while (self._queue or self._pending) and sent < allowed and self._sender.connected():
            message = self._queue[0] if self._queue else next(iter(self._pending.values()))
            # Even when the connection dropped a moment ago, paho keeps a QoS 1 message and sends it after
            # reconnecting; only its own queue being full leaves the message with us.
            if not self._sender.publish(message):
                break
            if self._queue:
                self._queue.popleft()
            else:
                del self._pending[message.topic]
            sent += 1
        self._bucket.take(sent)

    def flush(self) -> None:
        """Everything kept, as far as the link takes it now (a stop)."""
        self.pump(budget=len(self._queue) + len(self._pending))

    def _unpend(self) -> None:
        """The latest states waiting on the rate cap into the queue, in their order."""
        for message in self._pending.values():
            self._keep(message)
        self._pending.clear()

    # -- a restart of the daemon ---------------------------------------------------------------

    def save(self) -> None:
        """What is unsent, to the buffer file if there is one."""
        self._unpend()
        if self._file is None or not self._queue:
            return
        partial = f"{self._file}.partial"  # replaced whole: a crash mid-write leaves the old file
        with open(partial, "w", encoding="utf-8") as f:
            for topic, payload, retain in self._queue:
                f.write(json.dumps([topic, payload.decode(), retain]) + "\n")
        os.replace(partial, self._file)
        log.info("telemetry_saved", messages=len(self._queue), file=str(self._file))

    def _restore(self) -> None:
        path = self._file
        if path is None or not path.exists():
            return
        skipped = 0
        try:
            for line in path.read_text(encoding="utf-8").splitlines():
                message = _restored(line)
                if message is None:  # a file anyone could edit: a bad line is skipped, never a crash loop
                    skipped += 1
                else:
                    self._keep(message)
        except (OSError, ValueError) as exc:
            log.warning("telemetry_restore_failed", file=str(path), error=str(exc))
        path.unlink(missing_ok=True)
        log.info("telemetry_restored", messages=len(self._queue), skipped=skipped, file=str(path))


def _restored(line: str) -> Message | None:
    """A saved message, if the line is one: [topic, payload text, retain]."""
    try:
        topic, payload, retain = json.loads(line)
    except (ValueError, TypeError):
        return None
    if not (isinstance(topic, str) and topic and isinstance(payload, str) and isinstance(retain, bool)):
        return None
    return Message(topic, payload.encode(), retain)
