"""Redis Streams: the consumer-group source, the dead-letter stream, and a publisher.

`redis://host:6379/0?stream=order-contacts&group=cdp-sync` (DESIGN section 5). The group
is created at the stream's start if missing, so events published before the first worker
started are delivered too. Entries are read in batches with a blocking XREADGROUP, acked
(XACK, coalesced) once their outcome is durable, and entries pending on a consumer that
went quiet for `claim_idle` ms (a dead replica) are taken over with XAUTOCLAIM; their
delivery count comes from XPENDING so the pipeline can dead-letter a poison entry.
At close, a consumer with nothing pending leaves the group (XGROUP DELCONSUMER), so that
restarts do not pile up hostname-pid consumers; one with entries pending stays, for the
others to take them over.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import RedisError, ResponseError

from .._batching import Batcher
from .._redis import connect
from .._urls import ParsedUrl, dead_letters_beside
from ..errors import ConfigError, SourceError
from ..observability import get_logger
from .base import (
    Broker,
    DeadLetterSink,
    Message,
    Publisher,
    Redeliveries,
    Source,
    letter_key,
)

if TYPE_CHECKING:
    import redis.asyncio as aioredis

log = get_logger("worker.sources.redis")

# The entry field holding the event JSON (DESIGN section 5), and a dead letter's.
EVENT_FIELD = b"event"
LETTER_FIELD = b"letter"
# Query parameters that are ours; the rest of the URL goes to redis-py untouched.
_OWN_PARAMS = {"stream", "group", "consumer", "claim_idle"}
# Entries pending this long on another consumer are taken over (ms). Longer than the
# lease renewer's interval, which keeps our own long-running entries fresh via hold().
DEFAULT_CLAIM_IDLE_MS = 60_000
# How often XAUTOCLAIM looks for entries of dead consumers.
AUTOCLAIM_INTERVAL = 5.0
# How long to wait before fetching again after losing the connection.
RECONNECT_PAUSE = 1.0
# Recent dead letters indexed at open, to skip one a killed run already stored.
RECENT_LETTERS = 1000
# Deletes the consumer (KEYS[1] stream, ARGV group, consumer) only if it has no entry
# pending, and returns how many it has: DELCONSUMER drops a consumer's pending entries
# for good, so the check and the delete must be one atomic step.
_LEAVE_GROUP = """
local summary = redis.call('XPENDING', KEYS[1], ARGV[1])
for _, row in ipairs(summary[4] or {}) do
  if row[1] == ARGV[2] then return tonumber(row[2]) end
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 0
"""


def split_url(url: str, label: str) -> ParsedUrl:
    """The URL split: ours apart, the rest for redis-py; `?stream=` is required."""
    parsed = ParsedUrl.split(url, label, _OWN_PARAMS)
    if not parsed.params.get("stream"):
        raise ConfigError(f"{label}: a redis:// URL needs ?stream=NAME")
    return parsed


def dead_letter_url(source_url: str) -> str:
    """The default dead-letter stream beside a source stream: `<stream>.dead-letter`."""
    return dead_letters_beside(source_url, "stream", drop=("group", "consumer", "claim_idle"))


class _RedisClient:
    """One client per part, created at open() and closed at close()."""

    def __init__(self, url: str, label: str) -> None:
        self.parsed = split_url(url, label)
        self.url, self.params = self.parsed.client_url, self.parsed.params
        self.label = label
        self.client: aioredis.Redis | None = None

    async def connect(self) -> aioredis.Redis:
        self.client = await connect(self.url, self.label)
        return self.client

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None


class RedisStreamSource(Source):
    """A consumer in a Redis Streams consumer group."""

    def __init__(self, url: str) -> None:
        self._redis = _RedisClient(url, "--source / WORKER_SOURCE")
        params = self._redis.params
        self.stream = params["stream"]
        self.group = params.get("group") or "cdp-sync"
        self.consumer = params.get("consumer") or f"{socket.gethostname()}-{os.getpid()}"
        self.claim_idle_ms = int(params.get("claim_idle") or DEFAULT_CLAIM_IDLE_MS)
        self._connected = False
        self._next_autoclaim = 0.0
        # A restarted process with the same consumer name first takes back its own
        # pending entries (XREADGROUP from id 0), then reads new ones.
        self._own_pending_left = True
        self._own_pending_from: bytes | str = "0"
        self._redeliveries = Redeliveries()
        self._acks: Batcher[bytes, None] = Batcher(self._send_acks, name="redis-acks")
        self._unacked: dict[bytes, Message] = {}  # handed out, not acked: given back at close

    @property
    def name(self) -> str:
        return self._redis.parsed.safe + f" stream={self.stream} group={self.group}"

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def client(self) -> aioredis.Redis:
        if self._redis.client is None:
            raise SourceError("the Redis source is not open")
        return self._redis.client

    async def open(self) -> None:
        client = await self._redis.connect()
        try:
            await client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                failure = self._redis.parsed.quote(exc)
                message = f"--source: cannot create the consumer group: {failure}"
                raise SourceError(message) from None
        self._connected = True

    async def close(self) -> None:
        await self._acks.wait_idle()
        if self._redis.client is not None and self._unacked:
            # Make what we did not finish claimable at once by the other consumers,
            # instead of after `claim_idle`: XCLAIM to ourselves with a long idle time.
            ids: list[Any] = list(self._unacked)
            with contextlib.suppress(RedisError, OSError):  # claimable after claim_idle anyway
                await self.client.xclaim(
                    self.stream, self.group, self.consumer, 0, ids,
                    idle=self.claim_idle_ms * 10, justid=True,
                )  # fmt: skip
        if self._redis.client is not None:
            await self._leave_group()
        self._unacked.clear()
        await self._redeliveries.cancel()
        self._connected = False
        await self._redis.aclose()

    async def _leave_group(self) -> None:
        """Delete this consumer from the group unless entries are still pending on it."""
        try:
            pending: Any = await self.client.eval(
                _LEAVE_GROUP, 1, self.stream, self.group, self.consumer
            )
        except (RedisError, OSError) as exc:  # a consumer left behind is only untidy
            failure = self._redis.parsed.quote(exc)
            log.warning("source.consumer_not_removed", consumer=self.consumer, error=failure)
            return
        if pending:
            log.info(
                "source.consumer_kept",
                stream=self.stream,
                group=self.group,
                consumer=self.consumer,
                pending=int(pending),
                consequence="its pending entries are taken over by the other consumers "
                "(XAUTOCLAIM), or by this consumer name when it starts again",
            )

    async def fetch(self, max_messages: int, timeout: float) -> list[Message] | None:
        batch = self._redeliveries.take(max_messages)
        if batch:
            return batch
        try:
            if self._own_pending_left:
                batch = await self._read_own_pending(max_messages)
            if not batch:
                batch = await self._autoclaim(max_messages)
            if not batch:
                batch = await self._read(max_messages, timeout)
        except (RedisError, OSError):
            self._connected = False
            await asyncio.sleep(min(timeout, RECONNECT_PAUSE))
            return []
        self._connected = True
        for message in batch:
            self._unacked[message.token] = message
        return batch

    async def _read(self, max_messages: int, timeout: float) -> list[Message]:
        reply: Any = await self.client.xreadgroup(
                self.group, self.consumer, {self.stream: ">"},
                count=max_messages, block=max(1, int(timeout * 1000)),
            )  # fmt: skip
        messages = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                messages.append(self._message(entry_id, fields, 1))
        return messages

    async def _read_own_pending(self, max_messages: int) -> list[Message]:
        """Entries delivered to this consumer name before a restart, and never acked."""
        reply: Any = await self.client.xreadgroup(
            self.group, self.consumer, {self.stream: self._own_pending_from}, count=max_messages
        )
        entries = [(entry_id, fields) for _s, found in reply or [] for entry_id, fields in found]
        if not entries:
            self._own_pending_left = False
            return []
        self._own_pending_from = entries[-1][0]
        gone = [entry_id for entry_id, fields in entries if not fields]
        if gone:  # trimmed away before anyone finished them: nothing left to deliver
            await self.client.xack(self.stream, self.group, *gone)
        counts = await self._delivery_counts([entry_id for entry_id, _ in entries])
        return [
            self._message(entry_id, fields, counts.get(entry_id, 2))
            for entry_id, fields in entries
            if fields
        ]

    async def _autoclaim(self, max_messages: int) -> list[Message]:
        """Take over entries a dead consumer left pending, with their delivery counts."""
        now = time.monotonic()
        if now < self._next_autoclaim:
            return []
        self._next_autoclaim = now + AUTOCLAIM_INTERVAL
        reply: Any = await self.client.xautoclaim(
            self.stream, self.group, self.consumer, self.claim_idle_ms, count=max_messages
        )
        claimed, deleted = reply[1], reply[2] if len(reply) > 2 else []
        if deleted:  # trimmed away before anyone finished them: nothing left to deliver
            await self.client.xack(self.stream, self.group, *deleted)
        if not claimed:
            return []
        counts = await self._delivery_counts([entry_id for entry_id, _ in claimed])
        return [
            self._message(entry_id, fields, counts.get(entry_id, 2))
            for entry_id, fields in claimed
            if fields is not None
        ]

    async def _delivery_counts(self, ids: list[bytes]) -> dict[bytes, int]:
        pending: Any = await self.client.xpending_range(
                self.stream, self.group, min=ids[0], max=ids[-1], count=len(ids) * 2,
                consumername=self.consumer,
            )  # fmt: skip
        return {entry["message_id"]: int(entry["times_delivered"]) for entry in pending}

    def _message(self, entry_id: bytes, fields: dict[bytes, bytes], count: int) -> Message:
        # An entry without the event field is bad input: deliver it empty, so that it is
        # dead-lettered as malformed_json rather than dropped.
        body = fields.get(EVENT_FIELD, b"")
        return Message(id=entry_id.decode(), body=body, delivery_count=count, token=entry_id)

    async def ack(self, message: Message) -> None:
        """XACK, coalesced: acks arriving together share one command."""
        await self._acks.submit(message.token)
        self._unacked.pop(message.token, None)

    async def _send_acks(self, entry_ids: list[bytes]) -> list[None]:
        try:
            await self.client.xack(self.stream, self.group, *entry_ids)
        except (RedisError, OSError, SourceError) as exc:
            raise SourceError(f"XACK failed: {self._redis.parsed.quote(exc)}") from None
        return [None] * len(entry_ids)

    async def nack(self, message: Message, *, delay: float = 0.0) -> None:
        """Deliver again here after `delay`; the entry stays pending on this consumer."""
        self._redeliveries.later(message, delay)

    async def hold(self, message: Message) -> None:
        """Reset the entry's idle time so no other consumer takes it over while we work."""
        await self.client.xclaim(
            self.stream, self.group, self.consumer, 0, [message.token], justid=True
        )

    async def lag(self) -> int | None:
        """Entries not yet delivered to the group plus those pending (Redis >= 7)."""
        groups: Any = await self.client.xinfo_groups(self.stream)
        for group in groups:
            name = group.get("name")
            if name in (self.group, self.group.encode()):
                lag = group.get("lag")
                return int(lag or 0) + int(group.get("pending") or 0)
        return None


class RedisDeadLetterSink(DeadLetterSink):
    """Dead letters as entries of a stream (field `letter`), `<stream>.dead-letter` by default."""

    def __init__(self, url: str) -> None:
        self._redis = _RedisClient(url, "--dlq / WORKER_DLQ")
        self.stream = self._redis.params["stream"]
        self._earlier: set[str] = set()

    async def open(self) -> None:
        client = await self._redis.connect()
        recent: Any = await client.xrevrange(self.stream, count=RECENT_LETTERS)
        for _entry_id, fields in recent:
            try:
                self._earlier.add(letter_key(orjson.loads(fields.get(LETTER_FIELD, b""))))
            except (orjson.JSONDecodeError, AttributeError):
                continue

    async def close(self) -> None:
        await self._redis.aclose()

    async def read_all(self) -> list[dict[str, Any]]:
        client = self._redis.client
        if client is None:
            raise SourceError("the Redis dead-letter sink is not open")
        entries: Any = await client.xrange(self.stream)
        letters = []
        for _entry_id, fields in entries:
            try:
                letters.append(orjson.loads(fields.get(LETTER_FIELD, b"")))
            except orjson.JSONDecodeError:
                continue
        return letters

    async def put(self, letter: dict[str, Any]) -> None:
        if self._earlier and letter_key(letter) in self._earlier:
            return  # stored by the run a crash cut short
        client = self._redis.client
        if client is None:
            raise SourceError("the Redis dead-letter sink is not open")
        try:
            await client.xadd(self.stream, {LETTER_FIELD: orjson.dumps(letter)})
        except (RedisError, OSError) as exc:
            failure = self._redis.parsed.quote(exc)
            raise SourceError(f"dead-letter stream {self.stream!r}: {failure}") from None


class RedisPublisher(Publisher):
    """XADD events (field `event`), pipelined."""

    def __init__(self, url: str) -> None:
        self._redis = _RedisClient(url, "--to")
        self.stream = self._redis.params["stream"]

    async def open(self) -> None:
        await self._redis.connect()

    async def close(self) -> None:
        await self._redis.aclose()

    async def publish(self, bodies: Sequence[bytes]) -> None:
        client = self._redis.client
        if client is None:
            raise SourceError("the Redis publisher is not open")
        async with client.pipeline(transaction=False) as pipe:
            for body in bodies:
                pipe.xadd(self.stream, {EVENT_FIELD: body})
            await pipe.execute()


BROKER = Broker(
    source=RedisStreamSource,
    dead_letters=RedisDeadLetterSink,
    publisher=RedisPublisher,
    dead_letter_url=dead_letter_url,
)
