"""The rate limit shared by replicas through Redis (GCRA): one total, smooth, and safe
when Redis is gone (nothing is sent rather than too much)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import services

from worker.limits import SHARED_HEADROOM, RateLimiter, SharedRateLimit


@pytest.fixture
async def shared_url() -> AsyncIterator[str]:
    services.require("redis")
    key = f"test-rate-{uuid.uuid4().hex[:10]}"
    yield f"{services.REDIS_URL}?key={key}"
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(services.REDIS_URL)
    await client.delete(key)
    await client.aclose()


async def replica(url: str, rate: float, until: float, stamps: list[float]) -> None:
    shared = SharedRateLimit(url)
    await shared.open()
    limiter = RateLimiter(rate, shared)
    try:
        while time.monotonic() < until:
            await limiter.acquire()
            stamps.append(time.monotonic())
    finally:
        await shared.close()


def busiest_second(stamps: list[float]) -> int:
    stamps = sorted(stamps)
    most, first = 0, 0
    for last, stamp in enumerate(stamps):
        while stamp - stamps[first] >= 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


async def test_three_replicas_together_stay_under_one_limit(shared_url: str) -> None:
    stamps: list[float] = []
    until = time.monotonic() + 2.5
    await asyncio.gather(*(replica(shared_url, 40.0, until, stamps) for _ in range(3)))
    # 40/s in total, not 120/s, spaced one interval apart (a late caller may take its
    # slot together with the next one's: at most one extra in any second, and its own).
    assert busiest_second(stamps) <= 40 + 2
    assert len(stamps) >= 40  # and it does admit: about 100 in 2.5 s on a quiet machine


async def test_the_shared_limit_admits_a_little_under_the_rate(shared_url: str) -> None:
    # SHARED_HEADROOM: what arrives at CDP in a second is what was admitted plus the
    # jitter on the way, so the admissions themselves keep 2% under the rate.
    stamps: list[float] = []
    started = time.monotonic()
    await replica(shared_url, 200.0, started + 3.0, stamps)
    span = stamps[-1] - stamps[0]
    # The schedule's first two slots come at once (the tolerance); then one per interval.
    assert len(stamps) - 2 <= span * 200.0 * SHARED_HEADROOM + 1
    assert SHARED_HEADROOM == 0.98


async def test_an_unreachable_redis_admits_nothing_and_says_so() -> None:
    shared = SharedRateLimit("redis://127.0.0.1:1/0")
    await shared.open()
    limiter = RateLimiter(50.0, shared)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(limiter.acquire(), 1.5)
        assert limiter.available is False
    finally:
        await shared.close()


async def test_a_replica_recovers_when_redis_comes_back(
    shared_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("worker.limits.SHARED_RETRY_SECONDS", 0.05)
    shared = SharedRateLimit(shared_url)
    await shared.open()
    limiter = RateLimiter(50.0, shared)
    real_script = shared._script
    failures = 3

    async def flaky(**kwargs: object) -> object:
        nonlocal failures
        if failures:
            failures -= 1
            raise ConnectionError("redis went away")
        return await real_script(**kwargs)

    shared._script = flaky
    try:
        await asyncio.wait_for(limiter.acquire(), 5)
        assert limiter.available is True
        assert failures == 0
    finally:
        await shared.close()


async def test_what_one_replica_learns_from_a_429_slows_every_replica(shared_url: str) -> None:
    learner_limit, other_limit = SharedRateLimit(shared_url), SharedRateLimit(shared_url)
    await learner_limit.open()
    await other_limit.open()
    learner, other = RateLimiter(100.0, learner_limit), RateLimiter(100.0, other_limit)
    try:
        await learner.acquire()
        learner.brake(0.0)  # a 429: the shared pace drops to 95
        assert learner.effective_rate == pytest.approx(95.0)
        for _ in range(5):  # three steps lower, as if 429s kept coming
            learner._last_429 -= 10
            learner.brake(0.0)
        taught = learner.effective_rate
        await learner.acquire()  # carries the pace to Redis
        stamps: list[float] = []
        until = time.monotonic() + 1.0
        while time.monotonic() < until:
            await other.acquire()  # this replica saw no 429 at all
            stamps.append(time.monotonic())
        assert other.effective_rate == 100.0  # its own view is unchanged...
        assert len(stamps) <= taught + 3  # ...yet it is paced at what the other learned
    finally:
        await learner_limit.close()
        await other_limit.close()
