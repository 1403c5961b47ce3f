"""The pipeline on each broker: a long-running consumer, one contact per order, dead letters
beside the source, and nothing left unacknowledged (the source's own lag says so)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable

import pytest
import services

from worker import dlq
from worker.config import Settings
from worker.demo import generate_events
from worker.emulator import Emulator
from worker.pipeline import Worker
from worker.sources import default_dead_letter_url, open_publisher, open_source
from worker.state import MemoryStateStore


async def _remove(broker: str, name: str) -> None:
    if broker == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(services.REDIS_URL)
        await client.delete(name, name + ".dead-letter")
        await client.aclose()
    elif broker == "rabbitmq":
        import aio_pika

        connection = await aio_pika.connect(services.AMQP_URL)
        async with connection:
            channel = await connection.channel()
            for queue in (name, name + ".dead-letter"):
                await channel.queue_delete(queue)
    else:
        import nats
        from nats.js.errors import NotFoundError

        stream = name.upper().replace("-", "_")
        client = await nats.connect(services.NATS_URL)
        try:
            await client.jetstream().delete_stream(stream)
            with contextlib.suppress(NotFoundError):  # no event was dead-lettered
                await client.jetstream().delete_stream(f"{stream}_DEAD_LETTER")
        finally:
            await client.close()


@pytest.fixture(params=["redis", "rabbitmq", "nats"])
async def broker_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    broker: str = request.param
    services.require(broker)
    name = f"e2e-{uuid.uuid4().hex[:10]}"
    if broker == "redis":
        url = f"{services.REDIS_URL}?stream={name}&group=cdp-sync"
    elif broker == "rabbitmq":
        url = f"{services.AMQP_URL}?queue={name}"
    else:
        url = f"{services.NATS_URL}?stream={name.upper().replace('-', '_')}&subject={name}"
    yield url
    await _remove(broker, name)


async def test_a_worker_on_a_broker_delivers_once_and_dead_letters_beside_it(
    broker_url: str,
    emulator: Emulator,
    make_settings: Callable[..., Settings],
    state: MemoryStateStore,
) -> None:
    lines = generate_events(200, duplicate_share=0.2, invalid_rounds=2, seed=4)
    publisher = open_publisher(broker_url)
    await publisher.open()
    await publisher.publish(lines)
    await publisher.close()
    emulator.config.error_rate = 0.05
    settings = make_settings(source=broker_url, dlq=None, concurrency=16)
    worker = Worker(settings, state=state, backoff_base=0.01)
    run = asyncio.create_task(worker.run())
    finished = ("delivered", "duplicate", "dead_lettered")
    while sum(worker.summary[outcome] for outcome in finished) < len(lines):
        assert not run.done(), run
        await asyncio.sleep(0.05)
    assert worker.ready() == (True, "consuming")
    worker.stop()
    await run
    await worker.close()

    stats = emulator.stats()
    assert stats["orders"] == 200
    assert stats["duplicate_orders"] == 0
    assert worker.summary["duplicate"] == 40
    letters = await dlq.read_letters(default_dead_letter_url(broker_url))
    assert Counter(letter["reason"] for letter in letters) == {
        "malformed_json": 2,
        "invalid_order_ref": 2,
        "invalid_event": 4,
    }
    source = open_source(broker_url)
    await source.open()
    try:
        assert await source.lag() == 0  # nothing waiting, nothing unacknowledged
    finally:
        await source.close()
