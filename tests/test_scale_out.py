"""Replicas: three `worker run` processes on one Redis stream, with shared Redis state and
one shared rate limit, one of them SIGKILLed mid-run. Every valid order gets exactly one
contact, nothing is lost, every invalid event is dead-lettered once, and the emulator
never sees more than the limit in any one-second window."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import orjson
import pytest
import services
from conftest import SECRET_KEY, SECRET_TOKEN

from worker.contact import parse_event
from worker.demo import generate_events
from worker.emulator import Emulator, EmulatorConfig
from worker.errors import InvalidEvent
from worker.sources import open_publisher

RATE = 150.0  # requests/s for all replicas together


@pytest.fixture
async def names() -> AsyncIterator[dict[str, str]]:
    services.require("redis")
    import redis.asyncio as aioredis

    run = uuid.uuid4().hex[:10]
    yield {"stream": f"scale-{run}", "prefix": f"scale-{run}:", "key": f"scale-{run}:rate"}
    client = aioredis.Redis.from_url(services.REDIS_URL)
    keys = [key async for key in client.scan_iter(f"scale-{run}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.mark.slow
async def test_three_replicas_one_killed_deliver_everything_once_under_the_limit(
    names: dict[str, str],
) -> None:
    import redis.asyncio as aioredis

    lines = generate_events(1500, duplicate_share=0.2, invalid_rounds=5, seed=21)
    valid = set()
    for line in lines:
        with contextlib.suppress(InvalidEvent):
            valid.add(parse_event(line, default_event_id="-").order_ref)
    stream = names["stream"]
    source_url = f"{services.REDIS_URL}?stream={stream}&group=cdp-sync&claim_idle=3000"
    publisher = open_publisher(source_url)
    await publisher.open()
    await publisher.publish(lines)
    await publisher.close()

    config = EmulatorConfig(
        client_key=SECRET_KEY, api_token=SECRET_TOKEN, latency=0.02, error_rate=0.02,
        timeout_after_create_rate=0.01, reset_after_create_rate=0.01, hang_seconds=2.0, seed=5,
    )  # fmt: skip
    async with Emulator(config) as cdp:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "CDP_"))}
        env.update(
            CDP_BASE_URL=cdp.url,
            CDP_CLIENT_KEY=SECRET_KEY,
            CDP_API_TOKEN=SECRET_TOKEN,
            WORKER_SOURCE=source_url,
            WORKER_STATE=f"{services.REDIS_URL}?prefix={names['prefix']}",
            WORKER_RATE_LIMIT=str(RATE),
            WORKER_RATE_LIMIT_BACKEND=f"{services.REDIS_URL}?key={names['key']}",
            WORKER_CONCURRENCY="16",
            WORKER_REQUEST_TIMEOUT="1",
            WORKER_LEASE_SECONDS="4",
            WORKER_HTTP_PORT="0",
            WORKER_LOG_FORMAT="json",
        )
        replicas = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", "worker", "run", env=env,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )
            for _ in range(3)
        ]  # fmt: skip
        client = aioredis.Redis.from_url(services.REDIS_URL)
        try:
            while cdp.stats()["contacts"] < 300:
                await asyncio.sleep(0.05)
            replicas[0].kill()  # SIGKILL: its claims and pending entries are left behind
            await replicas[0].wait()
            deadline = time.monotonic() + 120
            while True:
                letters = await client.xlen(stream + ".dead-letter")
                pending = (await client.xpending(stream, "cdp-sync"))["pending"]
                done = len(cdp.stats()["contacts_per_order"]) == len(valid)
                if done and letters >= 20 and pending == 0:
                    break
                assert time.monotonic() < deadline, (cdp.stats()["orders"], letters, pending)
                await asyncio.sleep(0.2)
            for replica in replicas[1:]:
                replica.send_signal(signal.SIGTERM)
            for replica in replicas[1:]:
                _, stderr = await asyncio.wait_for(replica.communicate(), 30)
                assert replica.returncode == 0, stderr.decode()
            entries = await client.xrange(stream + ".dead-letter")
        finally:
            for replica in replicas:
                if replica.returncode is None:
                    replica.kill()
                    await replica.wait()
            await client.aclose()
        stats = cdp.stats()

    per_order = stats["contacts_per_order"]
    assert set(per_order) == valid  # nothing lost
    assert set(per_order.values()) == {1}  # nothing doubled
    reasons = Counter(orjson.loads(fields[b"letter"])["reason"] for _, fields in entries)
    assert reasons == {"malformed_json": 5, "invalid_order_ref": 5, "invalid_event": 10}
    # The shared limit held across replicas.
    print("busiest second at the emulator:", stats["max_posts_in_any_second"])
    assert stats["max_posts_in_any_second"] <= RATE + 1
