"""The RabbitMQ source against the contract (tests/source_contract.py), plus what is its own:
close() giving back unfinished messages, prefetch, the dead-letter queue, reconnection,
quorum queues' delivery counts, and the pipeline end to end on a queue."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
import types
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import services
from harness import OpenedSources, TcpProxy
from source_contract import MakeSource, Publish, SourceContract, bodies, collect, nothing_more

from worker.errors import ConfigError, SourceError
from worker.sources import (
    Source,
    default_dead_letter_url,
    letter_key,
    open_dead_letter_sink,
    open_publisher,
    open_source,
)

aio_pika = pytest.importorskip("aio_pika")


def queue_of(url: str) -> str:
    match = re.search(r"queue=([^&]+)", url)
    assert match, url
    return match.group(1)


@pytest.fixture
async def queue_url() -> AsyncIterator[str]:
    """A queue of its own for each test, deleted (with its dead-letter queue) afterwards."""
    services.require("rabbitmq")
    queue = f"test-{uuid.uuid4().hex[:12]}"
    yield f"{services.AMQP_URL}?queue={queue}"
    connection = await aio_pika.connect(services.AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for name in (queue, queue + ".dead-letter"):
            await channel.queue_delete(name)


async def publish_to(url: str, lines: list[bytes]) -> None:
    publisher = open_publisher(url)
    await publisher.open()
    try:
        await publisher.publish(lines)
    finally:
        await publisher.close()


async def drain_queue(name: str) -> list[Any]:
    """Every message of queue `name`, taken off it (basic.get, auto-ack)."""
    messages = []
    connection = await aio_pika.connect(services.AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            messages.append(message)
    return messages


async def ready_count(name: str) -> int:
    connection = await aio_pika.connect(services.AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)


async def until(condition: Callable[[], bool], within: float, what: str) -> float:
    """Wait until `condition()` holds; returns how long it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within, f"{what} did not happen in {within} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


class TestRabbitMQSource(SourceContract):
    @pytest.fixture
    def publish(self, queue_url: str) -> Publish:
        async def publish(lines: list[bytes]) -> None:
            await publish_to(queue_url, lines)

        return publish

    @pytest.fixture
    def make_source(self, queue_url: str, opened: OpenedSources) -> MakeSource:
        async def make() -> Source:
            # The contract holds up to 200 messages unacked in one consumer, which the
            # default prefetch (64) would not hand out: prefetch bounds exactly that.
            return await opened.source(f"{queue_url}&prefetch=256")

        return make

    async def test_close_gives_unfinished_messages_back_at_once(
        self, publish: Publish, make_source: MakeSource
    ) -> None:
        await publish(bodies(6))
        source = await make_source()
        messages = await collect(source, 6)
        await source.ack(messages[0])
        await source.nack(messages[1], delay=60)  # waiting for a local redelivery
        await source.close()
        started = time.monotonic()
        successor = await make_source()
        again = await collect(successor, 5, within=5)
        assert time.monotonic() - started < 2.0  # not after some timeout
        assert sorted(m.body for m in again) == sorted(m.body for m in messages[1:])
        assert {m.delivery_count for m in again} == {2}  # redelivered, by RabbitMQ's word
        assert {m.id for m in again} == {m.id for m in messages[1:]}  # the publisher's ids
        for message in again:
            await successor.ack(message)
        assert await nothing_more(successor)

    async def test_prefetch_bounds_what_one_consumer_holds_unacked(
        self, queue_url: str, publish: Publish, opened: OpenedSources
    ) -> None:
        await publish(bodies(10))
        source = await opened.source(f"{queue_url}&prefetch=3")
        held = await collect(source, 3)
        assert await nothing_more(source, 0.5)  # 7 more are ready, none comes
        assert await source.lag() == 7
        await source.ack(held[0])
        (fourth,) = await collect(source, 1)
        assert await nothing_more(source, 0.3)
        assert fourth.body not in {m.body for m in held}
        await source.nack(held[1], delay=0.1)  # a local requeue takes no new slot
        (again,) = await collect(source, 1)
        assert again is held[1]
        assert await source.lag() == 6

    async def test_dead_letters_go_to_the_queue_beside_as_json_with_their_key(
        self, queue_url: str
    ) -> None:
        beside = default_dead_letter_url(queue_url)
        dlq = queue_of(queue_url) + ".dead-letter"
        assert queue_of(beside) == dlq
        letter = {"reason": "invalid_event", "eventId": "e1", "orderRef": None, "event": {"a": 1}}
        sink = open_dead_letter_sink(beside)
        await sink.open()
        try:
            await sink.put(letter)
            await sink.put({**letter, "deadAt": "later"})  # the same letter: stored once
            await sink.put({**letter, "eventId": "e2"})
        finally:
            await sink.close()
        stored = await drain_queue(dlq)
        assert [orjson.loads(m.body) for m in stored] == [letter, {**letter, "eventId": "e2"}]
        assert stored[0].message_id == letter_key(letter)  # for readers to deduplicate
        assert stored[0].content_type == "application/json"
        assert stored[0].delivery_mode == aio_pika.DeliveryMode.PERSISTENT

    async def test_the_publisher_keeps_order_across_batches(
        self, queue_url: str, publish: Publish, make_source: MakeSource
    ) -> None:
        lines = bodies(1200, "ordered")  # more than one batch of confirms
        await publish(lines)
        assert await ready_count(queue_of(queue_url)) == 1200
        got = [m.body for m in await drain_queue(queue_of(queue_url))]
        assert got == lines

    async def test_quorum_queues_count_deliveries(
        self, queue_url: str, publish: Publish, make_source: MakeSource
    ) -> None:
        # Created by an operator with arguments of its own: the source uses it as it is.
        connection = await aio_pika.connect(services.AMQP_URL)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(
                queue_of(queue_url), durable=True, arguments={"x-queue-type": "quorum"}
            )
        await publish(bodies(1))
        counts = []
        for _ in range(3):
            source = await make_source()
            (message,) = await collect(source, 1)
            counts.append(message.delivery_count)
            await source.close()  # given back unfinished: one more delivery
        assert counts == [1, 2, 3]  # beyond the classic queues' "redelivered" (2)

    async def test_the_robust_connection_comes_back_after_a_network_drop(
        self, queue_url: str, publish: Publish, opened: OpenedSources
    ) -> None:
        async with TcpProxy(services.AMQP_URL) as proxy:
            url = proxy.url(queue_url) + "&reconnect_interval=0.1"
            await self._survives(proxy, proxy.drop, url, publish, opened)

    async def test_the_robust_connection_comes_back_after_the_broker_closes_it(
        self, queue_url: str, publish: Publish, opened: OpenedSources
    ) -> None:
        if shutil.which("rabbitmqctl") is None:
            pytest.skip("rabbitmqctl is not installed (the network-drop test still runs)")
        try:
            await _rabbitmqctl("list_connections", "-q", "pid")
        except AssertionError as exc:
            pytest.skip(f"rabbitmqctl cannot reach the broker: {exc}")
        name = f"cdp-sync-test-{uuid.uuid4().hex[:8]}"

        async def close_it() -> None:  # CONNECTION_FORCED, to this connection only
            listing = await _rabbitmqctl("list_connections", "-q", "pid", "client_properties")
            pids = [line.split("\t")[0] for line in listing.splitlines() if name in line]
            assert len(pids) == 1, listing
            await _rabbitmqctl("close_connection", pids[0], "test")

        async with TcpProxy(services.AMQP_URL) as proxy:
            url = proxy.url(queue_url) + f"&reconnect_interval=0.1&name={name}"
            await self._survives(proxy, close_it, url, publish, opened)

    @staticmethod
    async def _survives(
        proxy: TcpProxy,
        drop: Callable[[], Awaitable[None]],
        url: str,
        publish: Publish,
        opened: OpenedSources,
    ) -> None:
        """Messages held across a connection loss come again; acks of the old ones fail;
        `connected` is off until the connection is back. The proxy keeps the broker out
        of reach for a while, so that the reconnection does not win the race."""
        await publish(bodies(3))
        source = await opened.source(url)
        before = await collect(source, 3)
        await source.ack(before[0])  # confirmed: a drop right after does not undo it
        assert source.connected
        proxy.refusing = True
        await drop()
        await until(lambda: not source.connected, 5, "noticing the loss")
        assert await source.lag() is None  # unknown while disconnected
        with pytest.raises(SourceError, match=r"basic\.ack failed"):
            await source.ack(before[1])  # its channel is gone
        await source.nack(before[2])  # forgotten: RabbitMQ redelivers it
        await asyncio.sleep(0.3)  # a few reconnection attempts fail
        assert not source.connected
        proxy.refusing = False
        await until(lambda: source.connected, 10, "reconnecting")
        after = await collect(source, 2, within=10)
        assert sorted(m.body for m in after) == sorted(m.body for m in before[1:])
        assert {m.id for m in after} == {m.id for m in before[1:]}
        assert {m.delivery_count for m in after} == {2}
        for message in after:
            await source.ack(message)
        assert await nothing_more(source)
        assert await source.lag() == 0


async def _rabbitmqctl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode(errors="replace")
    return out.decode(errors="replace")


def test_the_url_needs_a_queue_and_a_sound_prefetch() -> None:
    with pytest.raises(ConfigError, match=r"WORKER_SOURCE: an amqp:// URL needs \?queue=NAME"):
        open_source("amqp://guest:s3cret@127.0.0.1:5672/")
    with pytest.raises(ConfigError, match="prefetch must be a whole number"):
        open_source("amqp://guest:s3cret@127.0.0.1:5672/?queue=q&prefetch=-1")
    with pytest.raises(ConfigError, match="WORKER_DLQ"):
        open_dead_letter_sink("amqps://guest:s3cret@broker/prod")


def test_the_dead_letter_url_names_the_queue_beside() -> None:
    from worker._urls import safe_url
    from worker.sources.rabbitmq import dead_letter_url

    url = "amqps://app:s3cret@broker:5671/prod?queue=order-contacts&prefetch=16&heartbeat=30"
    assert dead_letter_url(url) == (
        "amqps://app:s3cret@broker:5671/prod?queue=order-contacts.dead-letter&heartbeat=30"
    )
    assert safe_url(url) == (
        "amqps://broker:5671/prod?queue=order-contacts&prefetch=16&heartbeat=30"
    )
    source = open_source(url)
    assert "s3cret" not in source.name
    assert source.name.endswith("queue=order-contacts")


def test_message_ids_and_delivery_counts() -> None:
    from worker.sources.rabbitmq import RabbitMQSource

    source = RabbitMQSource("amqp://guest:guest@127.0.0.1/?queue=q")

    def delivered(**fields: Any) -> Any:
        defaults = {"message_id": None, "delivery_tag": 7, "headers": {}, "redelivered": False}
        return types.SimpleNamespace(body=b"{}", **{**defaults, **fields})

    # aio-pika gives every message it publishes a message_id; other clients may not.
    plain = source._message(delivered())
    assert re.fullmatch(r"amqp-[0-9a-f]{8}\.0-7", plain.id)
    assert plain.delivery_count == 1
    assert source._message(delivered(message_id="m-1")).id == "m-1"
    assert source._message(delivered(redelivered=True)).delivery_count == 2
    # Quorum queues count earlier deliveries that failed.
    quorum = delivered(redelivered=True, headers={"x-delivery-count": 4})
    assert source._message(quorum).delivery_count == 5
    source._on_channel_reopened(None)  # delivery tags start again on a new channel
    assert source._message(delivered()).id != plain.id


async def test_errors_never_echo_the_password() -> None:
    services.require("rabbitmq")
    parts = urlsplit(services.AMQP_URL)
    wrong = f"amqp://guest:s3cret-pw@{parts.hostname}:{parts.port or 5672}/?queue=q"
    for url in (wrong, "amqp://guest:s3cret-pw@127.0.0.1:1/?queue=q"):
        source = open_source(url)
        with pytest.raises(SourceError) as failed:
            await source.open()
        assert "s3cret-pw" not in str(failed.value)
        assert "cannot reach RabbitMQ" in str(failed.value)
        assert not source.connected
        await source.close()
