"""Pacing: retry backoff with full jitter, the sliced sliding-log rate limit, what a 429
teaches (the pace learned from it, and the probe back up).

Timing assertions are structural (what a sliding log guarantees between any two admitted
requests, whatever the scheduler does) or lower bounds (a wait happened), never an upper
bound on wall-clock throughput, so they hold on a loaded 2-core machine. The brake's clock
is a fake: `worker.limits.time` is swapped for one whose `monotonic()` the test moves.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
import types
from collections.abc import Coroutine
from typing import Any

import pytest
from asyncio_throttle.throttler import Throttler

import worker.limits as limits
from worker.limits import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    BURST_GAP,
    LEARN_FACTOR,
    MIN_RATE_FRACTION,
    PROBE_FACTOR,
    QUIET_INTERVAL,
    SLICE_SECONDS,
    SLOT_MARGIN_SECONDS,
    RateLimiter,
    backoff_delay,
)

# -- backoff ---------------------------------------------------------------------------------


def samples(count: int, attempt: int, **kwargs: Any) -> list[float]:
    return [backoff_delay(attempt, **kwargs) for _ in range(count)]


@pytest.mark.parametrize("attempt", range(1, 13))
def test_backoff_stays_within_the_full_jitter_range(attempt: int) -> None:
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))
    delays = samples(2000, attempt)
    assert all(0.0 <= delay <= ceiling for delay in delays)
    assert max(delays) > ceiling * 0.9  # the whole range is used, up to the ceiling


def test_backoff_defaults_are_the_designs() -> None:
    assert (BACKOFF_BASE, BACKOFF_CAP) == (0.5, 60.0)


def test_backoff_is_full_jitter_not_equal_jitter() -> None:
    ceiling = BACKOFF_BASE * 2**4  # attempt 5: 8 s
    delays = samples(4000, 5)
    assert 0.45 * ceiling <= statistics.fmean(delays) <= 0.55 * ceiling
    assert min(delays) < 0.05 * ceiling  # equal jitter would never go below half
    assert max(delays) > 0.95 * ceiling
    assert len({round(delay, 6) for delay in delays}) > 3900  # spread, not a few values
    below_half = sum(delay < ceiling / 2 for delay in delays)
    assert 1700 <= below_half <= 2300


def test_backoff_with_custom_base_and_cap() -> None:
    assert all(0.0 <= d <= 0.1 for d in samples(500, 1, base=0.1, cap=10))
    assert all(0.0 <= d <= 0.8 for d in samples(500, 4, base=0.1, cap=10))
    assert all(0.0 <= d <= 2.0 for d in samples(500, 9, base=0.1, cap=2.0))


def test_retry_after_is_a_floor() -> None:
    assert samples(200, 1, retry_after=5.0) == [5.0] * 200  # ceiling 0.5 < 5
    late = samples(2000, 10, retry_after=5.0)  # ceiling 60
    assert all(5.0 <= delay <= 60.0 for delay in late)
    assert max(late) > 50.0  # a floor, not a fixed value
    assert samples(50, 3, retry_after=0.0) != [0.0] * 50
    # A Retry-After longer than the backoff cap (the client caps it at 300) is honoured.
    assert samples(20, 30, retry_after=300.0) == [300.0] * 20


@pytest.mark.parametrize("attempt", [30, 64, 100, 1024, 1025, 5000, 10**6])
def test_the_cap_holds_for_any_attempt(attempt: int) -> None:
    delays = samples(1000, attempt)
    assert all(0.0 <= delay <= BACKOFF_CAP for delay in delays)
    assert max(delays) > BACKOFF_CAP * 0.9


@pytest.mark.parametrize("attempt", [0, -3])
def test_an_attempt_below_one_backs_off_like_the_first(attempt: int) -> None:
    assert all(0.0 <= delay <= BACKOFF_BASE for delay in samples(500, attempt))


# -- the rate limit: configuration -----------------------------------------------------------


def completes_without_suspending(coro: Coroutine[Any, Any, float]) -> bool:
    """Drive `coro` one step: True if it finished (never waited), else close it (it waited)."""
    try:
        coro.send(None)
    except StopIteration:
        return True
    coro.close()
    return False


async def test_rate_zero_has_no_throttler_and_never_waits() -> None:
    limiter = RateLimiter(0)
    assert limiter._throttler is None
    assert limiter.effective_rate == 0
    assert all(completes_without_suspending(limiter.acquire()) for _ in range(5000))
    waits = await asyncio.gather(*(limiter.acquire() for _ in range(500)))
    assert all(wait >= 0 for wait in waits)


async def test_a_slice_goes_at_once_and_the_next_request_waits() -> None:
    limiter = RateLimiter(100)  # 10 per 100 ms
    assert all(completes_without_suspending(limiter.acquire()) for _ in range(10))
    assert not completes_without_suspending(limiter.acquire())
    assert not limiter._lock.locked()  # the abandoned waiter let go of the lock


@pytest.mark.parametrize(
    ("rate", "per_slice", "period"),
    [
        (100, 10, 0.1),
        (200, 20, 0.1),
        (1000, 100, 0.1),
        (50, 5, 0.1),
        (33, 4, 4 / 33),  # ceil(3.3) = 4 per 4/33 s
        (10, 1, 0.1),
        (5, 1, 0.2),
        (1, 1, 1.0),
        (0.5, 1, 2.0),
    ],
)
def test_the_budget_is_sliced(rate: float, per_slice: int, period: float) -> None:
    limiter = RateLimiter(rate)
    throttler = limiter._throttler
    assert throttler is not None
    assert throttler.rate_limit == per_slice
    assert throttler.period == pytest.approx(period)
    assert throttler.rate_limit / throttler.period == pytest.approx(rate)  # the same rate
    # About one slice wide, or one request per slot when the rate is below one per slice.
    assert throttler.period == pytest.approx(SLICE_SECONDS, rel=0.25) or per_slice == 1
    assert limiter.effective_rate == rate


# -- the rate limit: behaviour ---------------------------------------------------------------


async def test_acquisitions_are_spread_over_slices_at_100_per_second() -> None:
    limiter = RateLimiter(100)  # 10 per 100 ms
    per_slice, period = 10, 0.1
    throttler = limiter._throttler
    assert throttler is not None
    original = throttler.acquire
    admitted: list[float] = []  # the sliding log's own admission times

    async def recording_acquire() -> None:
        await original()
        admitted.append(throttler._task_logs[-1])  # no other coroutine ran in between

    throttler.acquire = recording_acquire
    returned: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        returned.append(time.monotonic())

    await asyncio.gather(*(one() for _ in range(60)))
    assert len(admitted) == len(returned) == 60
    assert admitted == sorted(admitted)
    assert all(a <= r for a, r in zip(admitted, returned, strict=True))
    # A sliding log admits at most `per_slice` in any window of `period`: the (k+1)-th
    # admission after any admission comes more than a whole period later ...
    for i in range(len(admitted) - per_slice):
        assert admitted[i + per_slice] - admitted[i] > period, i
    # ... so there is no burst: any 100 ms window holds at most one slice's worth ...
    for i, start in enumerate(admitted):
        assert sum(1 for t in admitted[i:] if t - start < period) <= per_slice
    # ... and 60 acquisitions span more than five whole periods, however fast the machine.
    assert admitted[-1] - admitted[0] > 5 * period
    assert returned[-1] - returned[0] >= admitted[-1] - admitted[0] - 0.01


async def test_only_one_coroutine_waits_inside_the_throttler() -> None:
    limiter = RateLimiter(20)  # two per 100 ms
    throttler = limiter._throttler
    assert throttler is not None
    original = throttler.acquire
    inside = 0
    most_inside = 0
    entered = 0

    async def counting_acquire() -> None:
        nonlocal inside, most_inside, entered
        inside += 1
        entered += 1
        most_inside = max(most_inside, inside)
        try:
            await original()
        finally:
            inside -= 1

    throttler.acquire = counting_acquire
    admitted = 0

    async def one() -> None:
        nonlocal admitted
        await limiter.acquire()
        admitted += 1

    tasks = [asyncio.create_task(one()) for _ in range(500)]
    await asyncio.sleep(0.2)
    assert most_inside == 1
    assert entered >= 2
    assert 1 <= admitted < 50  # paced: nowhere near 500 in 0.2 s
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert sum(isinstance(r, asyncio.CancelledError) for r in results) == 500 - admitted
    assert inside == 0
    # Cancelled waiters leave nothing behind: the next caller gets through.
    await asyncio.wait_for(limiter.acquire(), 2)
    assert most_inside == 1


# -- what a 429 teaches ----------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0, 100])
async def test_the_first_429_of_a_burst_holds_every_request_for_retry_after(rate: float) -> None:
    limiter = RateLimiter(rate)
    await limiter.acquire()
    started = time.monotonic()
    limiter.brake(0.2)
    waits = await asyncio.gather(*(limiter.acquire() for _ in range(3)))
    elapsed = time.monotonic() - started
    assert elapsed >= 0.15
    assert all(wait >= 0.15 for wait in waits)  # everyone, not just the first


async def test_a_brake_without_retry_after_pauses_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert limits.DEFAULT_THROTTLE_PAUSE == 1.0
    monkeypatch.setattr(limits, "DEFAULT_THROTTLE_PAUSE", 0.2)
    limiter = RateLimiter(100)
    limiter.brake(None)
    assert await limiter.acquire() >= 0.15


class FakeClock:
    """Stands in for the `time` module inside worker.limits."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(limits, "time", types.SimpleNamespace(monotonic=fake.monotonic))
    return fake


def answered(limiter: RateLimiter, clock: FakeClock, per_second: float, seconds: float) -> None:
    """CDP accepted `per_second` requests for `seconds`, evenly spread."""
    for _ in range(round(per_second * seconds)):
        clock.now += 1 / per_second
        limiter.accepted()


@pytest.mark.parametrize("rate", [0, 1000])
def test_a_429_paces_just_under_what_cdp_accepted_over_the_last_second(
    clock: FakeClock, rate: float
) -> None:
    limiter = RateLimiter(rate)
    answered(limiter, clock, 200, 3.0)  # a server that takes 200/s
    limiter.brake(None)
    assert limiter.effective_rate == pytest.approx(200 * LEARN_FACTOR, rel=0.01)
    throttler = limiter._throttler
    assert throttler is not None  # paced now, even under --rate-limit 0
    # What is sent, with the waiter's margin past each slot, is the pace itself (a
    # configured rate keeps its whole period: see test_the_budget_is_sliced).
    sent = throttler.rate_limit / (throttler.period + SLOT_MARGIN_SECONDS)
    assert sent == pytest.approx(limiter.effective_rate)


def test_only_the_first_429_of_a_burst_holds_and_the_pace_does_not_ratchet_down(
    clock: FakeClock,
) -> None:
    limiter = RateLimiter(0)
    answered(limiter, clock, 200, 2.0)
    limiter.brake(0.5)
    held_until = limiter._hold_until
    pace = limiter.effective_rate
    clock.now += 0.1
    limiter.brake(0.5)  # the same burst: no second hold, the same pace
    assert limiter._hold_until == held_until
    assert limiter.effective_rate == pytest.approx(pace)
    clock.now += BURST_GAP + 0.1
    answered(limiter, clock, pace, 1.0)
    limiter.brake(0.5)  # a new burst: it holds again
    assert limiter._hold_until > held_until


def test_a_429_with_nothing_accepted_yet_only_holds(clock: FakeClock) -> None:
    limiter = RateLimiter(0)
    limiter.brake(2.0)
    assert limiter._throttler is None
    assert limiter.effective_rate == 0  # nothing learned: no pace invented
    assert math.isclose(limiter._hold_until, clock.now + 2.0)


def test_the_pace_never_drops_below_its_floor(clock: FakeClock) -> None:
    limiter = RateLimiter(100)
    answered(limiter, clock, 2, 1.0)
    limiter.brake(0.0)
    assert limiter.effective_rate == pytest.approx(100 * MIN_RATE_FRACTION)


async def test_the_pace_probes_upward_per_quiet_interval_up_to_the_limit(clock: FakeClock) -> None:
    limiter = RateLimiter(250)
    answered(limiter, clock, 200, 1.0)
    limiter.brake(0.0)
    learned = limiter.effective_rate
    clock.now += QUIET_INTERVAL - 0.1
    await limiter.acquire()
    assert limiter.effective_rate == pytest.approx(learned)  # not quiet long enough
    clock.now += 0.2
    await limiter.acquire()
    assert limiter.effective_rate == pytest.approx(learned * PROBE_FACTOR)
    await limiter.acquire()
    assert limiter.effective_rate == pytest.approx(learned * PROBE_FACTOR)  # one step
    for _ in range(20):
        clock.now += QUIET_INTERVAL
        await limiter.acquire()
    assert limiter.effective_rate == 250  # back to the limit, never above
    throttler = limiter._throttler
    assert throttler is not None
    assert throttler.rate_limit / throttler.period == pytest.approx(250)


async def test_without_a_limit_the_probe_keeps_climbing_to_find_a_raised_one(
    clock: FakeClock,
) -> None:
    limiter = RateLimiter(0)
    answered(limiter, clock, 100, 1.0)
    limiter.brake(0.0)
    learned = limiter.effective_rate
    for _ in range(30):
        clock.now += QUIET_INTERVAL
        await limiter.acquire()
    assert limiter.effective_rate == pytest.approx(learned * PROBE_FACTOR**30)


async def test_a_429_during_the_probe_restarts_the_quiet_interval(clock: FakeClock) -> None:
    limiter = RateLimiter(0)
    answered(limiter, clock, 100, 1.0)
    limiter.brake(0.0)
    clock.now += QUIET_INTERVAL - 0.5
    answered(limiter, clock, 95, 0.4)
    limiter.brake(0.0)
    learned = limiter.effective_rate
    clock.now += QUIET_INTERVAL - 0.2
    await limiter.acquire()
    assert limiter.effective_rate == pytest.approx(learned)


async def test_the_waiter_sleeps_until_a_slot_frees_instead_of_polling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A poll interval of a whole second: a waiter that polled would take over a second
    # per blocked request; one that sleeps until the oldest entry leaves takes 100 ms.
    monkeypatch.setattr(limits, "POLL_SECONDS", 1.0)
    limiter = RateLimiter(20)  # two per 100 ms slice
    started = time.monotonic()
    for _ in range(4):
        await limiter.acquire()
    assert time.monotonic() - started < 0.9  # about 0.1 s; polling would be 1 s


def test_the_waiter_wakes_when_the_slot_is_free_on_uvloop_too() -> None:
    # uvloop's timers count whole milliseconds of a clock read to the millisecond: a sleep
    # of exactly the time left wakes up to 1.5 ms early a third of the time, and the
    # throttler's own poll (POLL_SECONDS later) then costs a second wake-up per slice.
    uvloop = pytest.importorskip("uvloop")
    rng = random.Random(3)

    def busy(seconds: float) -> None:  # the loop at work between wake-ups
        until = time.perf_counter() + seconds
        while time.perf_counter() < until:
            pass

    async def early_wakes() -> int:
        throttler = Throttler(rate_limit=1, period=0.0105)
        early = 0
        for _ in range(60):
            busy(rng.random() * 0.002)
            await throttler.acquire()  # type: ignore[no-untyped-call]
            busy(rng.random() * 0.002)
            await limits._until_a_slot_is_free(throttler)
            throttler.flush()  # type: ignore[no-untyped-call]
            early += len(throttler._task_logs) >= throttler.rate_limit
        return early

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(early_wakes()) == 0
