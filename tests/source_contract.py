"""The contract every source keeps, as one abstract suite (faststream's pattern).

A backend's tests subclass `SourceContract` and provide two fixtures: `publish` (an
async callable that enqueues bodies) and `make_source` (an async callable that opens a
new source on the same queue, closed by the fixture's teardown). `durable` says whether
a message survives its consumer (false only for the in-memory source).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from worker.sources import Message, Source

Publish = Callable[[list[bytes]], Awaitable[None]]
MakeSource = Callable[[], Awaitable[Source]]


async def collect(
    source: Source, count: int, *, batch: int = 100, within: float = 10.0
) -> list[Message]:
    """Fetch until `count` messages came (or fail after `within` seconds)."""
    got: list[Message] = []
    deadline = time.monotonic() + within
    while len(got) < count:
        assert time.monotonic() < deadline, f"only {len(got)} of {count} messages came"
        fetched = await source.fetch(min(batch, count - len(got)), 0.2)
        assert fetched is not None, "the source ended early"
        got.extend(fetched)
    return got


async def nothing_more(source: Source, wait: float = 0.5) -> bool:
    """True if no message comes within `wait` seconds."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        fetched = await source.fetch(10, 0.1)
        if fetched is None:
            return True
        if fetched:
            return False
    return True


def bodies(count: int, tag: str = "m") -> list[bytes]:
    return [b'{"n": %d, "tag": "%s"}' % (n, tag.encode()) for n in range(count)]


class SourceContract:
    durable = True

    async def test_delivers_every_published_body_once_in_batches(
        self, publish: Publish, make_source: MakeSource
    ) -> None:
        await publish(bodies(25))
        source = await make_source()
        first = await source.fetch(10, 2.0)
        assert first is not None
        assert 0 < len(first) <= 10
        rest = await collect(source, 25 - len(first))
        messages = first + rest
        assert sorted(m.body for m in messages) == sorted(bodies(25))
        assert len({m.id for m in messages}) == 25
        assert {m.delivery_count for m in messages} == {1}
        for message in messages:
            await source.ack(message)
        assert await nothing_more(source)

    async def test_acked_messages_are_not_delivered_to_the_next_consumer(
        self, publish: Publish, make_source: MakeSource
    ) -> None:
        await publish(bodies(5))
        source = await make_source()
        for message in await collect(source, 5):
            await source.ack(message)
        await source.close()
        again = await make_source()
        assert await nothing_more(again)

    async def test_unacked_messages_go_to_the_next_consumer(
        self, publish: Publish, make_source: MakeSource
    ) -> None:
        if not self.durable:
            return
        await publish(bodies(4))
        source = await make_source()
        messages = await collect(source, 4)
        done = sorted(messages, key=lambda m: m.body)[:2]
        for message in done:
            await source.ack(message)
        await source.close()
        successor = await make_source()
        again = await collect(successor, 2)
        assert sorted(m.body for m in again) == sorted(m.body for m in messages if m not in done)
        for message in again:
            await successor.ack(message)
        assert await nothing_more(successor)

    async def test_nack_delivers_the_message_again_after_the_delay(
        self, publish: Publish, make_source: MakeSource
    ) -> None:
        await publish(bodies(1))
        source = await make_source()
        (message,) = await collect(source, 1)
        started = time.monotonic()
        await source.nack(message, delay=0.3)
        (again,) = await collect(source, 1)
        assert time.monotonic() - started >= 0.25
        assert (again.id, again.body) == (message.id, message.body)
        await source.ack(again)
        assert await nothing_more(source)

    async def test_messages_of_concurrent_acks_all_finish(
        self, publish: Publish, make_source: MakeSource
    ) -> None:
        await publish(bodies(200, "many"))
        source = await make_source()
        messages = await collect(source, 200)
        await asyncio.gather(*(source.ack(m) for m in messages))
        await source.close()
        assert await nothing_more(await make_source())
