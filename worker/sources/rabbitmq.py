"""RabbitMQ: the queue consumer, the dead-letter queue, and a publisher.

`amqp://user:pass@host:5672/vhost?queue=order-contacts&prefetch=64` (DESIGN section 5);
`amqps://` for TLS. Every part holds one robust aio-pika connection, which reconnects on
its own and restores its channel, queue and consumer. The queue is declared durable if
missing; one that exists with other arguments (a quorum queue, a dead-letter exchange)
is used as it is. Other query parameters go to aio-pika untouched (`heartbeat`,
`reconnect_interval`, `name`, the TLS files).

The source consumes with manual acks: a consumer callback fills a local buffer that
`fetch` drains, and `prefetch` (basic.qos, per consumer) bounds how many messages this
consumer holds unacked, buffered and in the pipeline together. `nack(delay)` is a local
requeue: the message stays unacked here and is handed out again after `delay`. On
`close` every message not finished goes back to the queue at once (basic.nack with
requeue). Messages whose channel died with the connection are redelivered by RabbitMQ
itself: acking one raises SourceError and nacking one forgets it, and the redelivered
copy is deduplicated by the state store.

RabbitMQ does not redeliver a message while the consumer's channel lives, so `hold` has
nothing to do, as long as a delivery is finished within the broker's `consumer_timeout`
(30 min by default; the worker's retries end well before).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl

import aio_pika
import aiormq.abc
import orjson
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustQueue,
)
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, ChannelPreconditionFailed

from .._batching import Batcher
from .._urls import ParsedUrl, dead_letters_beside
from ..errors import ConfigError, SourceError
from .base import (
    Broker,
    DeadLetterSink,
    Message,
    Publisher,
    Redeliveries,
    Source,
    letter_key,
)

# Query parameters that are ours; the rest of the URL goes to aio-pika untouched.
_OWN_PARAMS = {"queue", "prefetch"}
# Messages one consumer holds unacked (basic.qos prefetch_count); 0 means no limit.
DEFAULT_PREFETCH = 64
# Seconds between reconnection attempts, unless the URL says (aio-pika's own is 5).
DEFAULT_RECONNECT_INTERVAL = 2.0
# Seconds to connect at open(); later reconnections retry for as long as it takes.
CONNECT_TIMEOUT = 10.0
# Seconds one broker operation may wait (e.g. for a reconnection) before it fails.
OPERATION_TIMEOUT = 30.0
# Messages published at once, their confirms awaited together.
PUBLISH_BATCH = 500
# Dead letters this process stored, remembered to skip storing one twice (see the sink).
RECENT_LETTERS = 1000
# What the broker and the client raise when a connection or channel fails.
_FAILURES: tuple[type[BaseException], ...] = (
    AMQPError,
    ChannelInvalidStateError,
    OSError,
    TimeoutError,
)


def split_url(url: str, label: str) -> ParsedUrl:
    """The URL split: ours (`queue`, `prefetch`) apart, the rest for aio-pika."""
    parsed = ParsedUrl.split(url, label, _OWN_PARAMS)
    if not parsed.params.get("queue"):
        raise ConfigError(f"{label}: an amqp:// URL needs ?queue=NAME")
    prefetch = parsed.params.get("prefetch")
    if prefetch is not None and not (prefetch.isdigit() and int(prefetch) <= 65535):
        raise ConfigError(f"{label}: prefetch must be a whole number from 0 to 65535")
    return parsed


def dead_letter_url(source_url: str) -> str:
    """The default dead-letter queue beside a source queue: `<queue>.dead-letter`."""
    return dead_letters_beside(source_url, "queue", drop=("prefetch",))


class _AmqpClient:
    """One robust connection and channel per part, made at open() and closed at close()."""

    def __init__(self, url: str, label: str, role: str) -> None:
        self.parsed = split_url(url, label)
        self.url = self.parsed.client_url
        self.params = self.parsed.params
        self.label = label
        self.role = role
        self.queue_name = self.params["queue"]
        self.connection: AbstractRobustConnection | None = None
        self.channel: AbstractRobustChannel | None = None

    def scrub(self, exc: BaseException) -> str:
        """The exception's text without the URL's password (in either of its forms)."""
        return self.parsed.quote(exc)

    def failure(self, what: str, exc: BaseException) -> SourceError:
        return SourceError(f"{self.label}: {what} ({self.parsed.safe}): {self.scrub(exc)}")

    async def connect(self, *, publisher_confirms: bool) -> AbstractRobustChannel:
        options: dict[str, Any] = {}
        query = dict(parse_qsl(self.parsed.rest))
        if "reconnect_interval" not in query:
            options["reconnect_interval"] = DEFAULT_RECONNECT_INTERVAL
        if "name" not in query:  # how the connection shows in the management UI
            name = f"cdp-sync {self.role} {socket.gethostname()}-{os.getpid()}"
            options["client_properties"] = {"connection_name": name}
        try:
            self.connection = await aio_pika.connect_robust(
                self.url, timeout=CONNECT_TIMEOUT, **options
            )
            # on_return_raises: a message no queue took fails its publish, not silently.
            self.channel = await self.connection.channel(
                publisher_confirms=publisher_confirms, on_return_raises=publisher_confirms
            )
        except _FAILURES as exc:
            await self.aclose()
            raise self.failure("cannot reach RabbitMQ", exc) from None
        except BaseException:
            await self.aclose()
            raise
        return self.channel

    async def declare(self, name: str) -> AbstractRobustQueue:
        """The durable queue `name`, declared if missing; an existing one as it is.

        A queue created with other arguments (x-queue-type=quorum, a dead-letter exchange)
        refuses a plain redeclaration (PRECONDITION_FAILED, which closes the channel), so
        the declaration is tried on a throwaway channel first.
        """
        channel = self.channel
        assert channel is not None
        try:
            underlay = await channel.get_underlay_channel()
            probe = await underlay.connection.channel(publisher_confirms=False)
            try:
                await probe.queue_declare(name, durable=True)
                as_it_is = False
            except ChannelPreconditionFailed:
                as_it_is = True
            finally:
                with contextlib.suppress(*_FAILURES):
                    await probe.close()
            if as_it_is:
                return await channel.declare_queue(name, passive=True)
            return await channel.declare_queue(name, durable=True)
        except _FAILURES as exc:
            raise self.failure(f"cannot declare the queue {name!r}", exc) from None

    async def aclose(self) -> None:
        channel, self.channel = self.channel, None
        connection, self.connection = self.connection, None
        if channel is not None:
            with contextlib.suppress(*_FAILURES):
                await channel.close()
        if connection is not None:
            with contextlib.suppress(*_FAILURES):
                await connection.close()


def _delivery_count(incoming: AbstractIncomingMessage) -> int:
    """Quorum queues count failed deliveries in `x-delivery-count`; classic ones only
    say whether the message was delivered before."""
    earlier = (incoming.headers or {}).get("x-delivery-count")
    if isinstance(earlier, int) and not isinstance(earlier, bool) and earlier >= 0:
        return earlier + 1
    return 2 if incoming.redelivered else 1


def _dead(incoming: AbstractIncomingMessage) -> bool:
    """True if the message came on a channel that has closed since (a connection drop):
    it can be neither acked nor nacked, and RabbitMQ delivers it again by itself."""
    try:
        incoming.channel  # noqa: B018 - raises once the channel is closed
    except ChannelInvalidStateError:
        return True
    return False


class RabbitMQSource(Source):
    """A consumer on a RabbitMQ queue, with manual acks."""

    def __init__(self, url: str) -> None:
        self._amqp = _AmqpClient(url, "--source / WORKER_SOURCE", "consumer")
        self.queue = self._amqp.queue_name
        prefetch = self._amqp.params.get("prefetch")
        self.prefetch = DEFAULT_PREFETCH if prefetch is None else int(prefetch)
        self._queue: AbstractRobustQueue | None = None
        self._consumer_tag: str | None = None
        self._connected = False
        # Message ids of messages without an AMQP message_id: delivery tags, unique per
        # channel, prefixed with this consumer and its connection's generation.
        self._session = uuid.uuid4().hex[:8]
        self._generation = 0
        self._buffer: deque[AbstractIncomingMessage] = deque()  # delivered, not handed out
        self._arrived = asyncio.Event()
        self._redeliver: deque[Message] = deque()  # nacked and due again
        self._redeliveries = Redeliveries(self._due_again)
        self._unacked: set[Message] = set()  # handed out, not acked: given back at close
        self._confirms: Batcher[aiormq.abc.AbstractChannel, None] = Batcher(
            self._confirm_acks, name="amqp-acks"
        )

    @property
    def name(self) -> str:
        return self._amqp.parsed.safe + f" queue={self.queue}"

    @property
    def connected(self) -> bool:
        return self._connected

    async def open(self) -> None:
        channel = await self._amqp.connect(publisher_confirms=False)
        connection = self._amqp.connection
        assert connection is not None
        try:
            await channel.set_qos(prefetch_count=self.prefetch)
            self._queue = await self._amqp.declare(self.queue)
            self._consumer_tag = await self._queue.consume(self._on_message, no_ack=False)
        except _FAILURES as exc:
            await self._amqp.aclose()
            raise self._amqp.failure(f"cannot consume from {self.queue!r}", exc) from None
        except BaseException:
            await self._amqp.aclose()
            raise
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)
        channel.reopen_callbacks.add(self._on_channel_reopened)
        self._connected = True

    def _on_connection_lost(self, _sender: object, _exc: BaseException | None) -> None:
        self._connected = False
        # What was delivered on the dead channel comes again from RabbitMQ.
        self._buffer.clear()

    def _on_channel_reopened(self, _sender: object) -> None:
        self._generation += 1  # delivery tags start again from 1 on the new channel

    def _on_reconnected(self, _sender: object) -> None:
        self._connected = True

    async def _on_message(self, incoming: AbstractIncomingMessage) -> None:
        if self._queue is None or _dead(incoming):
            return  # closing, or the channel died: RabbitMQ delivers it again
        self._buffer.append(incoming)
        self._arrived.set()

    async def close(self) -> None:
        await self._confirms.wait_idle()
        await self._redeliveries.cancel()
        queue, self._queue = self._queue, None
        if queue is not None and self._consumer_tag is not None:
            with contextlib.suppress(*_FAILURES):
                async with asyncio.timeout(OPERATION_TIMEOUT):
                    await queue.cancel(self._consumer_tag)  # no more deliveries
            await asyncio.sleep(0)  # deliveries that came before the cancel-ok
        # Back to the queue at once: handed out and unfinished, or not handed out yet.
        returning = [m.token for m in self._unacked] + list(self._buffer)
        for incoming in returning:
            if not incoming.processed and not _dead(incoming):
                with contextlib.suppress(*_FAILURES):
                    await incoming.nack(requeue=True)
        self._unacked.clear()
        self._buffer.clear()
        self._redeliver.clear()
        self._consumer_tag = None
        self._connected = False
        self._arrived.set()  # wakes a fetch still waiting
        await self._amqp.aclose()

    async def fetch(self, max_messages: int, timeout: float) -> list[Message] | None:
        if self._queue is None:
            raise SourceError("the RabbitMQ source is not open")
        if not self._redeliver and not self._buffer:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._arrived.wait()
        batch: list[Message] = []
        while self._redeliver and len(batch) < max_messages:
            message = self._redeliver.popleft()
            if _dead(message.token):
                self._unacked.discard(message)
            else:
                batch.append(message)
        while self._buffer and len(batch) < max_messages:
            incoming = self._buffer.popleft()
            if not _dead(incoming):
                message = self._message(incoming)
                self._unacked.add(message)
                batch.append(message)
        return batch

    def _message(self, incoming: AbstractIncomingMessage) -> Message:
        message_id = incoming.message_id or (
            f"amqp-{self._session}.{self._generation}-{incoming.delivery_tag}"
        )
        return Message(
            id=message_id,
            body=incoming.body,
            delivery_count=_delivery_count(incoming),
            token=incoming,
        )

    async def ack(self, message: Message) -> None:
        """basic.ack, then a round trip on the same channel, coalesced: acks arriving
        together share one. The broker handles a channel's frames in order, so once the
        round trip is answered it has processed the ack, which a connection drop can no
        longer lose (a bare basic.ack is only a write, and has no answer)."""
        incoming: AbstractIncomingMessage = message.token
        try:
            channel = incoming.channel
            await incoming.ack()
        except _FAILURES as exc:  # MessageProcessError (acked twice) is an AMQPError
            self._forget_if_dead(message)
            raise SourceError(f"basic.ack failed: {self._amqp.scrub(exc)}") from None
        try:
            await self._confirms.submit(channel)
        except SourceError:
            self._forget_if_dead(message)
            raise
        self._unacked.discard(message)

    async def _confirm_acks(
        self, channels: list[aiormq.abc.AbstractChannel]
    ) -> list[SourceError | None]:
        """One round trip per channel the acks of the batch went on."""
        confirmed: dict[int, SourceError | None] = {}
        for channel in {id(channel): channel for channel in channels}.values():
            try:
                async with asyncio.timeout(OPERATION_TIMEOUT):
                    # A no-op that the broker answers: the prefetch it already has.
                    await channel.basic_qos(prefetch_count=self.prefetch)
            except _FAILURES as exc:
                failure = SourceError(f"basic.ack unconfirmed: {self._amqp.scrub(exc)}")
                confirmed[id(channel)] = failure
            else:
                confirmed[id(channel)] = None
        return [confirmed[id(channel)] for channel in channels]

    def _forget_if_dead(self, message: Message) -> None:
        if _dead(message.token):  # redelivered by RabbitMQ: nothing to give back at close
            self._unacked.discard(message)

    async def nack(self, message: Message, *, delay: float = 0.0) -> None:
        """Deliver again here after `delay`; the message stays unacked on this consumer."""
        if _dead(message.token):
            self._unacked.discard(message)  # its channel died: RabbitMQ redelivers it
            return
        self._redeliveries.later(message, delay)

    def _due_again(self, message: Message) -> None:
        if self._queue is not None:
            self._redeliver.append(message)
            self._arrived.set()

    async def lag(self) -> int | None:
        """Messages ready in the queue (a passive declare); unacked ones are not counted."""
        channel = self._amqp.channel
        if channel is None or not self._connected:
            return None
        try:
            async with asyncio.timeout(OPERATION_TIMEOUT):
                underlay = await channel.get_underlay_channel()
                declared = await underlay.queue_declare(self.queue, passive=True)
        except _FAILURES as exc:
            raise self._amqp.failure(f"cannot read the length of {self.queue!r}", exc) from None
        return declared.message_count


class _Producer:
    """Publishes persistent messages to a durable queue through the default exchange,
    with publisher confirms: a publish returns once the broker has the message."""

    def __init__(self, url: str, label: str, role: str) -> None:
        self._amqp = _AmqpClient(url, label, role)
        self.queue = self._amqp.queue_name

    async def open(self) -> None:
        await self._amqp.connect(publisher_confirms=True)
        try:
            await self._amqp.declare(self.queue)
        except BaseException:
            await self._amqp.aclose()
            raise

    async def close(self) -> None:
        await self._amqp.aclose()

    async def send(self, messages: Sequence[aio_pika.Message], what: str) -> None:
        channel = self._amqp.channel
        if channel is None:
            raise SourceError(f"the RabbitMQ {what} is not open")
        try:
            async with asyncio.timeout(OPERATION_TIMEOUT):
                exchange = channel.default_exchange
                results = await asyncio.gather(
                    *(exchange.publish(m, routing_key=self.queue) for m in messages),
                    return_exceptions=True,
                )
        except _FAILURES as exc:
            raise self._amqp.failure(f"cannot publish to {self.queue!r}", exc) from None
        for result in results:
            if isinstance(result, BaseException):
                raise self._amqp.failure(f"cannot publish to {self.queue!r}", result)


class RabbitMQDeadLetterSink(DeadLetterSink):
    """Dead letters as JSON messages of a durable queue, `<queue>.dead-letter` by default.

    Each letter's AMQP message_id is its `letter_key`. A queue cannot be read without
    consuming it, so a letter stored by a run that a crash cut short (before the source
    message was acked) is not looked up: it may be stored a second time, with the same
    message_id, for whoever reads the queue to deduplicate. Within one process, a letter
    is stored once (e.g. when the ack after it failed with a connection drop).
    """

    def __init__(self, url: str) -> None:
        self._producer = _Producer(url, "--dlq / WORKER_DLQ", "dead-letters")
        self.queue = self._producer.queue
        self._stored: OrderedDict[str, None] = OrderedDict()

    async def open(self) -> None:
        await self._producer.open()

    async def close(self) -> None:
        await self._producer.close()

    async def read_all(self) -> list[dict[str, Any]]:
        """Get every letter without acking it, then give them all back (requeue)."""
        amqp = self._producer._amqp
        if amqp.channel is None:
            raise SourceError("the RabbitMQ dead-letter sink is not open")
        held: list[Any] = []
        letters: list[dict[str, Any]] = []
        try:
            async with asyncio.timeout(OPERATION_TIMEOUT):
                queue = await amqp.declare(self.queue)
                while (message := await queue.get(no_ack=False, fail=False)) is not None:
                    held.append(message)
                    with contextlib.suppress(orjson.JSONDecodeError):
                        letters.append(orjson.loads(message.body))
                for message in held:
                    await message.nack(requeue=True)
        except _FAILURES as exc:
            raise amqp.failure(f"cannot read {self.queue!r}", exc) from None
        return letters

    async def put(self, letter: dict[str, Any]) -> None:
        key = letter_key(letter)
        if key in self._stored:
            return
        message = aio_pika.Message(
            orjson.dumps(letter),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=key,
        )
        await self._producer.send([message], "dead-letter sink")
        self._stored[key] = None
        if len(self._stored) > RECENT_LETTERS:
            self._stored.popitem(last=False)


class RabbitMQPublisher(Publisher):
    """Persistent messages, each with a message_id, confirmed by the broker in batches."""

    def __init__(self, url: str) -> None:
        self._producer = _Producer(url, "--to", "publisher")
        self.queue = self._producer.queue

    async def open(self) -> None:
        await self._producer.open()

    async def close(self) -> None:
        await self._producer.close()

    async def publish(self, bodies: Sequence[bytes]) -> None:
        for start in range(0, len(bodies), PUBLISH_BATCH):
            # A message_id of its own: the event's default eventId, stable across
            # redeliveries (a delivery tag is not).
            messages = [
                aio_pika.Message(
                    body,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=uuid.uuid4().hex,
                )
                for body in bodies[start : start + PUBLISH_BATCH]
            ]
            await self._producer.send(messages, "publisher")


BROKER = Broker(
    source=RabbitMQSource,
    dead_letters=RabbitMQDeadLetterSink,
    publisher=RabbitMQPublisher,
    dead_letter_url=dead_letter_url,
)
