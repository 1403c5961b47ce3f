"""NATS JetStream: the durable pull consumer source, the dead-letter subject, and a publisher.

`nats://host:4222?stream=ORDER_CONTACTS&subject=order-contacts&durable=cdp-sync` (DESIGN
section 5; `tls://` for TLS, `nats://user:pass@...` or `nats://token@...` for auth, several
servers as `nats://h1:4222,h2:4222?...`). Our own query parameters:

- `stream`, `subject` (required): the stream is created if missing (file storage, subject
  `<subject>`) and extended when it lacks it.
- `durable` (default `cdp-sync`): the durable pull consumer every replica shares; it is
  created, or updated to the parameters below, at open.
- `ack_wait` (seconds, default 60): how long a delivery may go without an ack or a hold
  (`in_progress`) before the server redelivers it. The pipeline holds the messages it works
  every `WORKER_LEASE_SECONDS / 3` s, so keep `ack_wait` above that.
- `max_deliver` (default 20): deliveries after which the server gives up on a message. The
  pipeline dead-letters a message (`retries_exhausted`) once its delivery count exceeds
  `WORKER_MAX_ATTEMPTS` (8), so keep `max_deliver` above that or a poison message just
  stops being delivered instead of being dead-lettered.

Acks are `ack_sync` (the server confirmed it: durable on return). A `nack` is local: the
message is kept and handed out again by this source after the delay, with `in_progress`
sent meanwhile so that the server does not redeliver it (no delivery is counted). `close`
naks every message handed out and not acked (and any a pull brought in after the last
fetch) with a short delay, so that another replica gets it at once rather than after
`ack_wait`. A dead-lettered message is acked by the pipeline once the letter is stored
(not `term`ed): the letter on `<subject>.dead-letter` is its record.

Dead letters have a stream of their own, `<stream>_DEAD_LETTER` (created if missing, file
storage, no limits), never the operator's stream, whose retention is made for events. The
dead-letter URL still names the source's stream (`?stream=ORDER_CONTACTS&subject=
order-contacts.dead-letter`): the sink stores and reads in ORDER_CONTACTS_DEAD_LETTER. A
subject belongs to one stream only: an earlier version added `<subject>.dead-letter` to the
operator's stream; the sink takes it back at open and moves the letters stored there.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RawStreamMsg, StorageType, StreamConfig

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
    shrunk,
)

log = get_logger("worker.sources.nats")

# The stream of the dead letters of a stream's events is named `<stream>` + this.
DEAD_LETTER_STREAM_SUFFIX = "_DEAD_LETTER"
DEFAULT_DURABLE = "cdp-sync"
# Query parameters that are ours; anything else is a typo, refused with a ConfigError.
_OWN_PARAMS = {"stream", "subject", "durable", "ack_wait", "max_deliver"}
# Comfortably above one delivery without a hold (the pipeline holds every lease/3 s).
DEFAULT_ACK_WAIT = 60.0
# Above WORKER_MAX_ATTEMPTS (8): the pipeline dead-letters a poison message first.
DEFAULT_MAX_DELIVER = 20
# Unfinished messages go back to the stream at close with this delay: by then this
# consumer's connection (and any pull request of it the server still holds) is gone.
SHUTDOWN_NAK_DELAY = 1.0
# How long the server has to confirm an ack.
ACK_TIMEOUT = 5.0
# How long to wait before fetching again after the connection or the consumer failed.
RECONNECT_PAUSE = 1.0
# How long a stream created here remembers `Nats-Msg-Id`s: a dead letter a killed run
# already stored is skipped if the next run stores it again within this window.
DUPLICATE_WINDOW = 24 * 3600.0
# Bytes of a message besides a letter's own (headers, subject) under max_payload.
LETTER_HEADROOM = 4096
# Publishes awaited together, and how long one chunk may take.
PUBLISH_CHUNK = 500
PUBLISH_TIMEOUT = 30.0
# How long the first connection may take at open (the process exits 1 if it fails).
CONNECT_TIMEOUT = 5

_NAME = re.compile(r"[^\s.*>/\\]+")  # stream and consumer names
_TOKEN = re.compile(r"[^\s.*>]+")  # one token of a literal subject


def split_url(url: str, label: str) -> tuple[list[str], ParsedUrl]:
    """(the server URLs for nats-py, the URL split). Never echoes a password in errors."""
    parsed = ParsedUrl.split(url, label, _OWN_PARAMS, strict=True, user_is_secret=True)
    query = parsed.params
    if not parsed.hosts:
        raise ConfigError(f"{label}: a nats:// URL needs a host, e.g. nats://127.0.0.1:4222")
    for key in ("stream", "subject"):
        if not query.get(key):
            raise ConfigError(f"{label}: a nats:// URL needs ?stream=NAME&subject=NAME")
    for key in ("stream", "durable"):
        if key in query and not _NAME.fullmatch(query[key]):
            raise ConfigError(f"{label}: {key}={query[key]!r} is not a valid JetStream name")
    if not all(_TOKEN.fullmatch(token) for token in query["subject"].split(".")):
        raise ConfigError(f"{label}: subject={query['subject']!r} must be a literal subject")
    hosts = [host for host in parsed.hosts.split(",") if host]
    return [f"{parsed.scheme}://{parsed.userinfo}{host}" for host in hosts], parsed


def _number(params: dict[str, str], key: str, default: float, label: str) -> float:
    raw = params.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigError(f"{label}: {key}={raw!r} must be a positive number")
    return value


def dead_letter_url(source_url: str) -> str:
    """The default dead-letter subject beside a source subject: `<subject>.dead-letter`."""
    return dead_letters_beside(source_url, "subject", drop=("durable", "max_deliver", "ack_wait"))


def dead_letter_stream(stream: str) -> str:
    """Where the dead letters of a dead-letter URL naming `stream` are stored:
    `<stream>_DEAD_LETTER` (a name that already ends so is that stream itself)."""
    if stream.endswith(DEAD_LETTER_STREAM_SUFFIX):
        return stream
    return stream + DEAD_LETTER_STREAM_SUFFIX


def _covers(pattern: str, subject: str) -> bool:
    """Whether a stream subject (maybe with `*` / `>` wildcards) captures `subject`."""
    parts, wanted = pattern.split("."), subject.split(".")
    for index, part in enumerate(parts):
        if part == ">":
            return len(wanted) > index
        if index >= len(wanted) or part not in ("*", wanted[index]):
            return False
    return len(parts) == len(wanted)


class _NatsConnection:
    """One connection per part, created at open() and closed at close()."""

    def __init__(self, url: str, label: str) -> None:
        self.servers, self.parsed = split_url(url, label)
        self.params = self.parsed.params
        self.label = label
        self.stream = self.params["stream"]
        self.subject = self.params["subject"]
        self.client: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._last_error: Exception | None = None
        self.connected = False

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise SourceError(f"{self.label}: the NATS connection is not open")
        return self._js

    def describe(self, exc: BaseException) -> str:
        """An exception for a message: nats-py's are often blank (TimeoutError())."""
        return self.parsed.describe(exc)

    async def connect(self) -> JetStreamContext:
        client = NatsClient()
        self._last_error = None
        try:
            # The first connection gives up soon (a clear error, before anything is
            # consumed): a second try per server, after reconnect_time_wait (2 s)...
            await client.connect(
                self.servers,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                closed_cb=self._on_disconnected,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                connect_timeout=CONNECT_TIMEOUT,
                name="cdp-sync",
            )
        except (nats.errors.Error, OSError) as exc:
            await client.close()
            cause = self._last_error if isinstance(exc, nats.errors.NoServersError) else exc
            raise SourceError(
                f"{self.label}: cannot reach {self.parsed.safe}: {self.describe(cause or exc)}"
            ) from None
        # ...and once connected, a long-running worker reconnects for as long as it takes
        # (nats-py reads these options at each reconnection).
        client.options["allow_reconnect"] = True
        client.options["max_reconnect_attempts"] = -1
        self.client = client
        self._js = client.jetstream()
        self.connected = True
        return self._js

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = exc
        log.warning("source.nats_error", error=self.describe(exc))

    async def _on_disconnected(self) -> None:
        self.connected = False

    async def _on_reconnected(self) -> None:
        self.connected = True
        log.info("source.nats_reconnected")

    async def ensure_stream(self, subjects: Sequence[str], stream: str | None = None) -> None:
        """Create the stream (the URL's, or `stream`), or add the subjects it lacks."""
        name = stream or self.stream
        try:
            await self._ensure_stream(self.js, name, list(subjects))
        except (nats.errors.Error, OSError) as exc:
            raise SourceError(
                f"{self.label}: cannot set up stream {name!r} "
                f"for subjects {', '.join(subjects)}: {self.describe(exc)}"
            ) from None

    async def _ensure_stream(self, js: JetStreamContext, name: str, subjects: list[str]) -> None:
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            config = StreamConfig(
                name=name,
                subjects=subjects,
                storage=StorageType.FILE,
                duplicate_window=DUPLICATE_WINDOW,
            )
            try:
                await js.add_stream(config)
            except nats.js.errors.BadRequestError:
                info = await js.stream_info(name)  # a replica created it just now
            else:
                return
        have = list(info.config.subjects or [])
        missing = [s for s in subjects if not any(_covers(p, s) for p in have)]
        if missing:
            await js.update_stream(info.config.evolve(subjects=have + missing))

    async def aclose(self) -> None:
        client, self.client, self._js = self.client, None, None
        self.connected = False
        if client is not None and not client.is_closed:
            with contextlib.suppress(nats.errors.Error, OSError):
                await client.flush(timeout=2)  # what is buffered (acks, naks) reaches the server
            await client.close()


class NatsSource(Source):
    """A client of a JetStream durable pull consumer, shared by every replica."""

    def __init__(self, url: str) -> None:
        label = "--source / WORKER_SOURCE"
        self._nats = _NatsConnection(url, label)
        params = self._nats.params
        self.stream = self._nats.stream
        self.subject = self._nats.subject
        self.durable = params.get("durable") or DEFAULT_DURABLE
        self.ack_wait = _number(params, "ack_wait", DEFAULT_ACK_WAIT, label)
        self.max_deliver = int(_number(params, "max_deliver", DEFAULT_MAX_DELIVER, label))
        self._sub: JetStreamContext.PullSubscription | None = None
        # Fetched (or nacked, once their delay is over) and not handed out yet.
        self._ready: list[Message] = []
        # The pull under way: a fetch cancelled by a stop leaves it running, and what it
        # brings lands in _ready (handed out next, or given back at close), never lost.
        self._pulling: asyncio.Task[None] | None = None
        # Nacked messages wait here, kept from redelivery by in_progress every ack_wait/3.
        self._redeliveries = Redeliveries(
            self._due_again, keep=self._keep, keep_every=self.ack_wait / 3
        )
        self._unacked: dict[int, Message] = {}  # stream seq -> handed out, not acked

    @property
    def name(self) -> str:
        return (
            self._nats.parsed.safe.split("?")[0]
            + f" stream={self.stream} subject={self.subject} durable={self.durable}"
        )

    @property
    def connected(self) -> bool:
        return self._nats.connected

    async def open(self) -> None:
        await self._nats.connect()
        await self._nats.ensure_stream([self.subject])
        await self._bind()

    async def _bind(self) -> None:
        """Create (or update to our parameters) the durable consumer, and a pull on it."""
        js = self._nats.js
        config = ConsumerConfig(
            name=self.durable,
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=self.max_deliver,
            filter_subject=self.subject,  # not the dead letters beside it
        )
        try:
            await js.add_consumer(self.stream, config)
            self._sub = await js.pull_subscribe_bind(durable=self.durable, stream=self.stream)
        except (nats.errors.Error, OSError) as exc:
            raise SourceError(
                f"--source: cannot create the consumer {self.durable!r} on {self.stream!r}: "
                f"{self._nats.describe(exc)}"
            ) from None

    async def _unbind(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await sub.unsubscribe()

    async def close(self) -> None:
        await self._redeliveries.cancel()
        if self._pulling is not None:
            # Ends within its fetch timeout; what it brings is given back below.
            _, late = await asyncio.wait([self._pulling], timeout=ACK_TIMEOUT)
            for task in late:
                task.cancel()
                await asyncio.wait([task])
            failed = None if self._pulling.cancelled() else self._pulling.exception()
            if failed is not None:  # retrieved here rather than reported as never retrieved
                log.warning("source.pull_failed", error=self._nats.describe(failed))
            self._pulling = None
        client = self._nats.client
        try:
            if client is not None and client.is_connected:
                await self._give_back_unfinished(client)
        finally:
            self._unacked.clear()
            self._ready.clear()
            self._sub = None
            await self._nats.aclose()

    async def _give_back_unfinished(self, client: NatsClient) -> None:
        """Nak what we did not finish, so another consumer gets it now, not after ack_wait."""
        leftovers: list[Msg] = []
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await client.flush(timeout=2)  # deliveries already sent to us arrive first
            # Messages a pull brought after the fetch that asked for them returned wait in
            # the subscription's queue (nats-py has no public call to take them).
            queue: asyncio.Queue[Msg] | None = getattr(self._sub._sub, "_pending_queue", None)
            while queue is not None and not queue.empty():
                msg = queue.get_nowait()
                if not JetStreamContext.is_status_msg(msg):
                    leftovers.append(msg)
        leftovers.extend(message.token for message in self._unacked.values())
        for msg in leftovers:
            with contextlib.suppress(nats.errors.Error, OSError):  # redelivered after ack_wait
                await msg.nak(delay=SHUTDOWN_NAK_DELAY)

    async def fetch(self, max_messages: int, timeout: float) -> list[Message] | None:
        if self._nats.client is None:
            raise SourceError("the NATS source is not open")
        if not self._ready:
            if self._pulling is None or self._pulling.done():
                self._pulling = asyncio.create_task(
                    self._pull(max_messages, max(timeout, 0.01)), name="nats-pull"
                )
            pulling = self._pulling
            await asyncio.wait([pulling])  # a cancelled fetch leaves the pull running
            pulling.result()  # a bug of ours surfaces here, not as a lost task
        batch, self._ready = self._ready[:max_messages], self._ready[max_messages:]
        return batch

    async def _pull(self, max_messages: int, timeout: float) -> None:
        try:
            if self._sub is None:  # the consumer went away before: set it up again
                await self._nats.ensure_stream([self.subject])
                await self._bind()
            assert self._sub is not None
            msgs = await self._sub.fetch(batch=max_messages, timeout=timeout)
        except TimeoutError:  # nothing came in time (nats' TimeoutError is one too)
            return
        except (nats.errors.Error, OSError, SourceError) as exc:
            if isinstance(exc, nats.js.errors.APIError | SourceError):
                await self._unbind()  # the consumer or stream went away: set up again next time
            log.warning("source.fetch_failed", error=self._nats.describe(exc))
            await asyncio.sleep(min(timeout, RECONNECT_PAUSE))
            return
        for msg in msgs:
            message = self._message(msg)
            self._unacked[msg.metadata.sequence.stream] = message
            self._ready.append(message)

    def _message(self, msg: Msg) -> Message:
        metadata = msg.metadata
        return Message(
            id=str(metadata.sequence.stream),
            body=msg.data,
            delivery_count=metadata.num_delivered,
            token=msg,
        )

    async def ack(self, message: Message) -> None:
        """ack_sync: the server confirmed it, so the message is finished on return."""
        msg: Msg = message.token
        try:
            await msg.ack_sync(timeout=ACK_TIMEOUT)
        except nats.errors.MsgAlreadyAckdError:
            pass
        except (nats.errors.Error, OSError) as exc:
            raise SourceError(
                f"ack of message {message.id} failed: {self._nats.describe(exc)}"
            ) from None
        seq = int(message.id)
        if self._unacked.get(seq) is message:
            del self._unacked[seq]

    async def nack(self, message: Message, *, delay: float = 0.0) -> None:
        """Deliver again here after `delay`; `in_progress` meanwhile keeps the server from
        redelivering it (a nack is not a failed delivery: num_delivered stays)."""
        await self._keep(message)
        self._redeliveries.later(message, delay)

    def _due_again(self, message: Message) -> None:
        self._ready.append(message)  # looked up now: fetch() replaces the list

    async def _keep(self, message: Message) -> None:
        msg: Msg = message.token
        with contextlib.suppress(nats.errors.Error, OSError):  # else redelivered after ack_wait
            await msg.in_progress()

    async def hold(self, message: Message) -> None:
        """`in_progress`: the server restarts the message's ack_wait."""
        msg: Msg = message.token
        try:
            await msg.in_progress()
        except (nats.errors.Error, OSError) as exc:
            raise SourceError(
                f"in_progress of message {message.id} failed: {self._nats.describe(exc)}"
            ) from None

    async def lag(self) -> int | None:
        """Messages not yet delivered to the consumer plus those delivered and not acked."""
        info = await self._nats.js.consumer_info(self.stream, self.durable)
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


class NatsDeadLetterSink(DeadLetterSink):
    """Dead letters as JSON messages on a subject, `<subject>.dead-letter` by default,
    stored in a stream of their own: `<stream>_DEAD_LETTER` for the URL's `stream`.

    Each is published with `Nats-Msg-Id` = `letter_key(letter)`: the stream's duplicate
    window (`DUPLICATE_WINDOW` for a stream created here; 2 minutes is the server's
    default for others) drops a letter a killed run already stored.
    """

    def __init__(self, url: str) -> None:
        self._nats = _NatsConnection(url, "--dlq / WORKER_DLQ")
        self.stream = self._nats.stream  # the operator's, which the letters never enter
        self.own_stream = dead_letter_stream(self.stream)
        self.subject = self._nats.subject

    async def open(self) -> None:
        js = await self._nats.connect()
        try:
            await self._free_subject(js)
        except (nats.errors.Error, OSError) as exc:
            raise SourceError(self._cannot_set_up(exc)) from None
        await self._nats.ensure_stream([self.subject], stream=self.own_stream)
        try:
            await self._move_earlier_letters(js)
        except (nats.errors.Error, OSError) as exc:
            raise SourceError(self._cannot_set_up(exc)) from None

    async def open_to_read(self) -> None:
        """Connect only: no stream is made, changed or moved by looking at the letters."""
        await self._nats.connect()

    def _cannot_set_up(self, exc: BaseException) -> str:
        return (
            f"{self._nats.label}: cannot set up stream {self.own_stream!r} for subject "
            f"{self.subject!r}: {self._nats.describe(exc)}"
        )

    async def _free_subject(self, js: JetStreamContext) -> None:
        """Make sure no stream but the letters' own captures the subject: a subject belongs
        to one stream only. An earlier version added it to the operator's stream, which
        gives it back here; a stream that captures it otherwise (a wildcard) is refused,
        for the letters would land in it."""
        try:
            owner = await js.find_stream_name_by_subject(self.subject)
        except nats.js.errors.NotFoundError:
            return
        if owner == self.own_stream:
            return
        if owner == self.stream:
            config = (await js.stream_info(owner)).config
            subjects = list(config.subjects or [])
            if self.subject in subjects and len(subjects) > 1:
                kept = [subject for subject in subjects if subject != self.subject]
                await js.update_stream(config.evolve(subjects=kept))
                return
        raise SourceError(
            f"{self._nats.label}: stream {owner!r} captures the dead-letter subject "
            f"{self.subject!r}, and a subject belongs to one stream only: dead letters need "
            f"a stream of their own ({self.own_stream!r}); give the dead-letter URL a "
            f"subject that {owner!r} does not capture"
        )

    async def _move_earlier_letters(self, js: JetStreamContext) -> None:
        """Letters an earlier version stored in the operator's stream go to their own:
        copied with their `Nats-Msg-Id` (copied twice, by a crash or two replicas, each is
        stored once), then purged from the operator's stream."""
        if self.stream == self.own_stream:
            return
        try:
            info = await js.stream_info(self.stream, subjects_filter=self.subject)
        except nats.js.errors.NotFoundError:
            return
        if not (info.state.subjects or {}).get(self.subject):
            return
        moved = 0
        async for found in self._stored(self.stream):
            msg_id = (found.headers or {}).get("Nats-Msg-Id")
            headers = {"Nats-Msg-Id": msg_id} if msg_id else None
            await js.publish(
                self.subject, found.data or b"", stream=self.own_stream, headers=headers
            )
            moved += 1
        await js.purge_stream(self.stream, subject=self.subject)
        log.info(
            "dlq.letters_moved", source_stream=self.stream, stream=self.own_stream, letters=moved
        )

    async def close(self) -> None:
        await self._nats.aclose()

    async def _stored(self, stream: str) -> AsyncIterator[RawStreamMsg]:
        """Every message on the subject in `stream`, read by sequence (no consumer made)."""
        js = self._nats.js
        seq = 1
        while True:
            try:
                found = await js.get_msg(stream, seq=seq, subject=self.subject, next=True)
            except nats.js.errors.NotFoundError:
                return
            yield found
            seq = int(found.seq or seq) + 1

    async def read_all(self) -> list[dict[str, Any]]:
        """Every letter in the letters' stream, oldest first, then any an earlier version
        left in the operator's stream that no sink has moved yet."""
        letters: list[dict[str, Any]] = []
        streams = [self.own_stream] + ([self.stream] if self.stream != self.own_stream else [])
        try:
            for stream in streams:
                async for found in self._stored(stream):
                    with contextlib.suppress(orjson.JSONDecodeError):
                        letters.append(orjson.loads(found.data or b""))
        except (nats.errors.Error, OSError) as exc:
            raise SourceError(
                f"cannot read {self.subject!r} in {self.own_stream!r}: {self._nats.describe(exc)}"
            ) from None
        return letters

    async def put(self, letter: dict[str, Any]) -> None:
        """Published and acked by the stream (stored, or a duplicate of a stored one).

        A letter larger than the server takes in one message (max_payload: a big event
        and the letter around it) holds its event as text, cut: refused, it would be
        tried again for ever.
        """
        js = self._nats.js
        data = orjson.dumps(letter)
        client = self._nats.client
        if client is not None and len(data) > client.max_payload - LETTER_HEADROOM:
            letter = shrunk(letter)
            data = orjson.dumps(letter)
        try:
            await js.publish(
                self.subject,
                data,
                stream=self.own_stream,  # a check: never into a stream of someone else's
                headers={"Nats-Msg-Id": letter_key(letter)},
            )
        except (nats.errors.Error, OSError) as exc:
            raise SourceError(
                f"dead-letter subject {self.subject!r}: {self._nats.describe(exc)}"
            ) from None


class NatsPublisher(Publisher):
    """JetStream publishes, sent in order and acked in chunks."""

    def __init__(self, url: str) -> None:
        self._nats = _NatsConnection(url, "--to")
        self.stream = self._nats.stream
        self.subject = self._nats.subject

    async def open(self) -> None:
        await self._nats.connect()
        await self._nats.ensure_stream([self.subject])

    async def close(self) -> None:
        await self._nats.aclose()

    async def publish(self, bodies: Sequence[bytes]) -> None:
        js = self._nats.js
        try:
            for start in range(0, len(bodies), PUBLISH_CHUNK):
                # publish_async sends one after the other (order kept); the acks come back
                # together.
                acks = [
                    await js.publish_async(self.subject, body, stream=self.stream)
                    for body in bodies[start : start + PUBLISH_CHUNK]
                ]
                await asyncio.wait_for(asyncio.gather(*acks), PUBLISH_TIMEOUT)
        except (nats.errors.Error, OSError) as exc:
            raise SourceError(
                f"--to: publishing to {self.subject!r} failed: {self._nats.describe(exc)}"
            ) from None


BROKER = Broker(
    source=NatsSource,
    dead_letters=NatsDeadLetterSink,
    publisher=NatsPublisher,
    dead_letter_url=dead_letter_url,
)
