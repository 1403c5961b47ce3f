"""The pipeline on a Redis stream: a long-running consumer, dead letters beside the stream."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
import services

from worker.config import Settings
from worker.demo import generate_events
from worker.emulator import Emulator
from worker.pipeline import Worker
from worker.sources import open_publisher
from worker.state import MemoryStateStore


@pytest.fixture
async def stream_url() -> AsyncIterator[str]:
    services.require("redis")
    import redis.asyncio as aioredis

    stream = f"e2e-{uuid.uuid4().hex[:12]}"
    yield f"{services.REDIS_URL}?stream={stream}&group=cdp-sync"
    client = aioredis.Redis.from_url(services.REDIS_URL)
    await client.delete(stream, stream + ".dead-letter")
    await client.aclose()


async def test_a_worker_on_a_redis_stream_delivers_once_and_dead_letters_beside_it(
    stream_url: str,
    emulator: Emulator,
    make_settings: Callable[..., Settings],
    state: MemoryStateStore,
) -> None:
    import redis.asyncio as aioredis

    lines = generate_events(300, duplicate_share=0.2, invalid_rounds=2, seed=4)
    publisher = open_publisher(stream_url)
    await publisher.open()
    await publisher.publish(lines)
    await publisher.close()
    emulator.config.error_rate = 0.05
    settings = make_settings(source=stream_url, dlq=None, concurrency=16)
    worker = Worker(settings, state=state)
    worker.backoff_base = 0.01
    run = asyncio.create_task(worker.run())
    while worker.summary["delivered"] + worker.summary["duplicate"] + worker.summary[
        "dead_lettered"
    ] < len(lines):
        assert not run.done(), run
        await asyncio.sleep(0.05)
    worker.stop()
    await run
    await worker.close()

    stats = emulator.stats()
    assert stats["orders"] == 300
    assert stats["duplicate_orders"] == 0
    client = aioredis.Redis.from_url(services.REDIS_URL)
    stream = stream_url.split("stream=")[1].split("&")[0]
    letters: list[dict[str, Any]] = [
        orjson.loads(fields[b"letter"])
        for _, fields in await client.xrange(stream + ".dead-letter")
    ]
    pending = await client.xpending(stream, "cdp-sync")
    await client.aclose()
    assert Counter(letter["reason"] for letter in letters) == {
        "malformed_json": 2,
        "invalid_order_ref": 2,
        "invalid_event": 4,
    }
    assert pending["pending"] == 0  # every entry acked
