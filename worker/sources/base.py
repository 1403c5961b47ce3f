"""The source and dead-letter sink contracts, shaped for brokers.

A source hands out `Message`s in batches and takes them back one by one: `ack` once the
outcome is durable, `nack` to have one delivered again (shutdown, or another replica holds
its orderRef), `hold` to keep a message from being redelivered during long retries (NATS
`in_progress`). Every broker of DESIGN section 5 maps onto these five calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson


@dataclass(eq=False, slots=True)
class Message:
    """One message as the transport delivered it.

    `id` is the transport's message id (an event's default eventId); `delivery_count`
    counts deliveries, this one included, where the transport knows it; `token` is the
    source's own handle (line number, stream entry id, broker message).
    """

    id: str
    body: bytes
    delivery_count: int = 1
    token: Any = field(default=None, repr=False)

    def __repr__(self) -> str:  # the body is personal data: never in a repr
        return f"Message(id={self.id!r}, delivery_count={self.delivery_count})"


class Source(ABC):
    """Where events come from. `open()`, then `fetch`/`ack`/`nack` until `close()`."""

    #: A finite source (a file without --follow) ends; `fetch` then returns None.
    finite: bool = False

    @abstractmethod
    async def open(self) -> None:
        """Connect (and create what the source needs, e.g. a consumer group)."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect. Unacked messages go back to the transport. Idempotent."""

    @abstractmethod
    async def fetch(self, max_messages: int, timeout: float) -> list[Message] | None:
        """Up to `max_messages`, waiting at most `timeout` s for the first one.

        [] when nothing came in time; None once a finite source has handed out its last
        message (messages handed out before may still be awaiting their ack).
        """

    @abstractmethod
    async def ack(self, message: Message) -> None:
        """The message is finished: its outcome is durably recorded. Durable on return."""

    @abstractmethod
    async def nack(self, message: Message, *, delay: float = 0.0) -> None:
        """Deliver the message again, not before `delay` seconds.

        Not a failed delivery: `delivery_count` counts the transport's redeliveries (a
        consumer that died), which is what the pipeline's poison check looks at.
        """

    async def check(self) -> None:  # noqa: B027 - optional, no-op by default
        """Fail now (SourceError) if `open` surely will, before other parts are opened and
        create files: a file that is not there. Cheap and without side effects."""

    async def hold(self, message: Message) -> None:  # noqa: B027 - optional, no-op by default
        """Keep a message being worked from being redelivered elsewhere (called periodically)."""

    @property
    def connected(self) -> bool:
        """False while the transport is down (readiness off)."""
        return True

    async def lag(self) -> int | None:
        """Messages waiting to be worked (exported as a metric), if the transport knows."""
        return None

    @property
    def name(self) -> str:
        """The URL without credentials, for logs."""
        return type(self).__name__


# A timer may fire this much before its deadline (the loop's clock resolution): due.
_EARLY = 0.001


class Redeliveries:
    """Messages given back to a source (`nack`), delivered again once their delay is over.

    Every source has them: a nack is local (the message stays with this consumer), so
    the source keeps it until it is due. Due messages go to `deliver`, or, without one,
    wait in a list that `take` hands out. `keep(message)`, if given, is awaited every
    `keep_every` seconds while a message waits (NATS `in_progress`, so that the server
    does not redeliver it elsewhere meanwhile).
    """

    def __init__(
        self,
        deliver: Callable[[Message], None] | None = None,
        *,
        keep: Callable[[Message], Coroutine[Any, Any, None]] | None = None,
        keep_every: float = math.inf,
    ) -> None:
        self._due: list[Message] = []
        self._deliver = deliver or self._keep_due
        self._keep = keep
        self._keep_every = keep_every
        self._timers: dict[Message, asyncio.TimerHandle] = {}
        self._keeping: set[asyncio.Task[None]] = set()

    @property
    def waiting(self) -> int:
        """Messages whose delay is not over yet."""
        return len(self._timers)

    @property
    def pending(self) -> bool:
        """Any message waiting, or due and not taken yet: a finite source is not over."""
        return bool(self._timers or self._due)

    def later(self, message: Message, delay: float) -> None:
        """Deliver `message` again in `delay` seconds (at the next loop iteration for 0).

        Given back again while it waits, the newer delay replaces the older one.
        """
        if (earlier := self._timers.pop(message, None)) is not None:
            earlier.cancel()
        until = time.monotonic() + delay
        self._arm(message, until, min(delay, self._keep_every))

    def take(self, limit: int) -> list[Message]:
        """Up to `limit` due messages (only without a `deliver` callback)."""
        batch, self._due = self._due[:limit], self._due[limit:]
        return batch

    def _keep_due(self, message: Message) -> None:
        self._due.append(message)  # looked up now: take() replaces the list

    def _arm(self, message: Message, until: float, step: float) -> None:
        loop = asyncio.get_running_loop()
        self._timers[message] = loop.call_later(max(step, 0.0), self._tick, message, until)

    def _tick(self, message: Message, until: float) -> None:
        left = until - time.monotonic()
        if left <= _EARLY:
            del self._timers[message]
            self._deliver(message)
            return
        if self._keep is not None:
            task = asyncio.create_task(self._keep(message), name="keep-redelivery")
            self._keeping.add(task)
            task.add_done_callback(self._keeping.discard)
        self._arm(message, until, min(left, self._keep_every))

    async def cancel(self) -> None:
        """Forget every message not handed out (at close: the transport has them back)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._due.clear()
        for task in list(self._keeping):
            task.cancel()
        if self._keeping:
            await asyncio.wait(list(self._keeping))


def letter_key(letter: dict[str, Any]) -> str:
    """What makes two dead letters the same: reason, ids and the event (or raw text).

    Not `deadAt`, `attempts` or `detail`, which differ when a crash makes a second run
    dead-letter the same message again.
    """
    identity = {k: letter.get(k) for k in ("reason", "eventId", "orderRef", "event", "raw")}
    if letter.get("sha256"):  # a cut text: the whole one tells two letters apart
        identity["sha256"] = letter["sha256"]
    return hashlib.sha256(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS)).hexdigest()


# The most bytes of a message's text a dead letter holds (DESIGN section 2).
LETTER_RAW_LIMIT = 64 * 1024


def dead_letter(
    reason: str,
    detail: str | None,
    *,
    order_ref: str | None,
    event_id: str | None,
    status: int | None,
    attempts: int,
    event: dict[str, Any] | None,
    raw: bytes | None = None,
) -> dict[str, Any]:
    """A dead letter as DESIGN section 5 shapes it: the event, or the raw text if not JSON.

    Whatever the message, the letter can be written: an event that cannot be written back
    as JSON (orjson reads 1024 levels deep, writes 255) is kept as its `raw` text instead,
    and a text longer than LETTER_RAW_LIMIT bytes is cut there, with `"truncated": true`
    and the `sha256` of the whole.
    """
    letter: dict[str, Any] = {
        "reason": reason,
        "detail": detail,
        "orderRef": order_ref,
        "eventId": event_id,
        "status": status,
        "attempts": attempts,
        "deadAt": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    if event is not None and _writable(event):
        letter["event"] = event
        return letter
    return _holding_text(letter, raw or b"")


def shrunk(letter: dict[str, Any]) -> dict[str, Any]:
    """The letter with its event as text cut to LETTER_RAW_LIMIT: for a sink that takes
    only so much in one message (NATS's max_payload, 1 MiB by default)."""
    if letter.get("event") is None:
        return letter
    kept = {k: v for k, v in letter.items() if k != "event"}
    return _holding_text(kept, orjson.dumps(letter["event"]))


def _holding_text(letter: dict[str, Any], text: bytes) -> dict[str, Any]:
    if len(text) > LETTER_RAW_LIMIT:
        letter["truncated"] = True
        letter["sha256"] = hashlib.sha256(text).hexdigest()
        end = LETTER_RAW_LIMIT
        # Never half a UTF-8 character (at most 3 continuation bytes end one); bytes that
        # are not UTF-8 at all are cut where they are.
        while end > LETTER_RAW_LIMIT - 3 and text[end] & 0xC0 == 0x80:
            end -= 1
        text = text[:end]
    letter["raw"] = text.decode("utf-8", "replace")
    return letter


def _writable(event: dict[str, Any]) -> bool:
    try:
        orjson.dumps(event)
    except orjson.JSONEncodeError:
        return False
    return True


class DeadLetterSink(ABC):
    """Where undeliverable events go, one JSON object each (DESIGN section 5).

    A crash between storing a letter and recording that it was stored (checkpoint, state)
    makes the next run dead-letter the same message again; sinks skip a letter an earlier
    run already stored (`letter_key`), so each message is dead-lettered once.
    """

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def put(self, letter: dict[str, Any]) -> None:
        """Store one dead letter. Durable on return: the message is acked right after."""

    @abstractmethod
    async def read_all(self) -> list[dict[str, Any]]:
        """Every letter stored, oldest first, leaving them in place (`worker dlq`)."""

    async def open_to_read(self) -> None:
        """Open for `read_all` only (`worker dlq`): a sink that sets itself up at `open`
        (streams, queues) changes nothing on the server here."""
        await self.open()


class Publisher(ABC):
    """Puts events into a source (`worker publish`, tests, benchmarks, backfills)."""

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def publish(self, bodies: Sequence[bytes]) -> None:
        """Enqueue each body as one message, in order. Done when this returns."""


@dataclass(frozen=True, slots=True)
class Broker:
    """One broker's parts, each built from a URL: what `sources/__init__.py` registers.

    Each broker module (redis, rabbitmq, nats) ends with its `BROKER`; the registry
    imports the module only once its client library is known to be installed.
    """

    source: Callable[[str], Source]
    dead_letters: Callable[[str], DeadLetterSink]
    publisher: Callable[[str], Publisher]
    #: Where dead letters go by default, beside the source URL (DESIGN section 5).
    dead_letter_url: Callable[[str], str]
