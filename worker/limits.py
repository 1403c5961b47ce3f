"""Pacing: the process-wide rate limit, retry backoff, and what a 429 teaches.

The local rate limit is asyncio-throttle's sliding log, used so that it stays cheap and
smooth at any rate:

* one coroutine at a time waits in the throttler (the others queue on an `asyncio.Lock`,
  which is FIFO and costs nothing while waiting): the throttler polls once per waiter, so
  thousands of waiters would burn a core;
* the budget is sliced: instead of N per second (a burst of a whole second's budget at
  once), it allows `k` per `k/N` seconds with `k/N` about 100 ms, so any one-second window
  the server sees holds at most about N requests (exactly N where a second is a whole
  number of slices, as at 50/s and 100/s).

CDP publishes no rate limit, so the worker finds it (DESIGN section 3: a 429 slows the
whole process). On a 429 it paces at just under what the server accepted over the last
second, holds every request for `Retry-After` only on the first 429 of a burst, and then
probes upward a few per cent per quiet interval, up to the configured limit (or without
bound under `--rate-limit 0`), so that a raised limit is found again. A saw-tooth that
stays within a few per cent of the server's limit, instead of one that halves the rate
(x0.7 per 429) or bursts and stops (a hold and no pace).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import time as _throttle_clock  # asyncio-throttle's clock: tests replace `time`
from collections import deque
from collections.abc import Callable
from typing import Any

from asyncio_throttle.throttler import Throttler

from . import _extras
from ._urls import ParsedUrl
from .observability import get_logger

log = get_logger("worker.limits")


# Width of one slice of the budget, in seconds: small enough to be smooth, large enough
# that the throttler's sleep overshoot costs little of the rate and that a slice's
# requests share their wake-ups. What a paced event costs is mostly wake-ups (about 85 us
# of CPU each on a 2-core VM, woken from idle): the slice's requests go in one, their
# answers come back in one or two, their outcomes share a commit. At the default 50/s,
# 5 per 100 ms cost 10% less CPU per event than 3 per 60 ms.
SLICE_SECONDS = 0.1
# How often the single waiter re-checks the sliding log, in seconds, should it find no
# room after its sleep (see _until_a_slot_is_free).
POLL_SECONDS = 0.002
# The waiter sleeps this much past the moment a slot frees: uvloop's timers fire up to
# 1.5 ms early (whole milliseconds of a clock read to the millisecond), and a waiter that
# woke too early would poll, a second wake-up per slice. It is at most 2% of a slice;
# with the sleep's own overshoot a limited rate reaches 96-98% of its setting (48.2/s at
# 50/s, 97.8/s at 100/s), as it did with the poll.
SLOT_MARGIN_SECONDS = 0.002
# On a 429: pace at this share of what the server accepted over the last second.
LEARN_FACTOR = 0.95
# Then probe upward: this factor per quiet interval (no 429 meanwhile).
PROBE_FACTOR = 1.03
QUIET_INTERVAL = 2.0
# 429s closer together than this are one burst: only its first holds every request.
BURST_GAP = 1.0
# The learned pace never goes below this share of the configured limit, nor below
# MIN_LEARNED_RATE requests/s under --rate-limit 0.
MIN_RATE_FRACTION = 0.1
MIN_LEARNED_RATE = 1.0
# Wait on a 429 that carries no Retry-After.
DEFAULT_THROTTLE_PAUSE = 1.0
# Retry backoff: exponential with full jitter, from DESIGN section 3.
BACKOFF_BASE = 0.5
BACKOFF_CAP = 60.0


def backoff_delay(
    attempt: int,
    *,
    retry_after: float | None = None,
    base: float = BACKOFF_BASE,
    cap: float = BACKOFF_CAP,
) -> float:
    """Seconds to wait before attempt `attempt + 1` (attempt counts from 1).

    Full jitter (AWS architecture blog): uniform in [0, min(cap, base * 2^(attempt-1))].
    A server's `Retry-After` (already capped by the client) is a floor, not a suggestion.
    """
    # The exponent is bounded: 2 ** 1024 no longer converts to a float (OverflowError), and
    # attempts do grow that far (the auth probe counts for as long as credentials are wrong).
    ceiling = min(cap, base * 2.0 ** min(max(attempt - 1, 0), 1000))
    delay = random.uniform(0.0, ceiling)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


class RateLimiter:
    """Process-wide pacing of CDP requests: `await acquire()` before each one, and tell it
    how CDP answered (`accepted()` for any answer but a 429, `brake()` for a 429).

    `rate` is requests per second; 0 means no limit until a 429 teaches one. With
    `shared`, the rate is the total of every replica using the same Redis key, and the
    local throttler stands aside.
    """

    def __init__(self, rate: float, shared: SharedRateLimit | None = None) -> None:
        self.rate = rate
        self.shared = shared if rate > 0 else None
        self._lock = asyncio.Lock()
        self._learned: float | None = None  # the pace a 429 taught, while below `rate`
        self._accepted: deque[float] = deque()  # when answers other than 429 came, 1 s
        self._hold_until = 0.0
        self._last_429 = -math.inf
        self._last_step = -math.inf  # the last 429 or probe step: quiet is counted from it
        self._throttler = None if self.shared else self._build(rate)

    @property
    def available(self) -> bool:
        """False while a shared limit cannot be reached: nothing is sent meanwhile."""
        return self.shared is None or self.shared.available

    @staticmethod
    def _build(rate: float, *, learned: bool = False) -> Throttler | None:
        if rate <= 0:
            return None
        throttler = Throttler(rate_limit=1, retry_interval=POLL_SECONDS)
        RateLimiter._slice(throttler, rate, learned=learned)
        return throttler

    @staticmethod
    def _slice(throttler: Throttler, rate: float, *, learned: bool = False) -> None:
        """`k` per `k / rate` seconds, with `k / rate` about one slice.

        A configured rate is never exceeded, so the waiter's SLOT_MARGIN_SECONDS past each
        slot is lost to it. A `learned` pace has its own margin below what CDP accepted
        (LEARN_FACTOR): there the margin we add ourselves is taken out of the period, so
        that the pace is what is sent (it was 2% under, and the unknown limit 1% lower).
        """
        per_slice = max(1, math.ceil(rate * SLICE_SECONDS))
        period = per_slice / rate
        throttler.rate_limit = per_slice
        throttler.period = max(period - SLOT_MARGIN_SECONDS, period / 2) if learned else period

    @property
    def effective_rate(self) -> float:
        """Requests per second now: the configured rate, or the learned pace below it;
        0 while there is no limit at all."""
        if self._learned is None:
            return self.rate
        return self._learned

    async def acquire(self) -> float:
        """Wait for a slot; return the seconds waited (for the wait-time metric)."""
        started = time.monotonic()
        unlimited = self._throttler is None and self.shared is None
        if unlimited and self._hold_until <= started and not self._lock.locked():
            return 0.0  # unlimited and not braked: the hot path takes no lock
        async with self._lock:
            self._probe(time.monotonic())
            # A 429 that arrives while we wait out an earlier one may extend the hold.
            while (hold := self._hold_until - time.monotonic()) > 0:  # noqa: ASYNC110 - a moving deadline, not an event
                await asyncio.sleep(hold)
            if self.shared is not None:
                await self.shared.acquire(self.effective_rate)
            elif self._throttler is not None:
                await _until_a_slot_is_free(self._throttler)
                await self._throttler.acquire()  # type: ignore[no-untyped-call]  # untyped library
        return time.monotonic() - started

    def accepted(self) -> None:
        """CDP answered a request without a 429: what it accepts is measured from these."""
        now = time.monotonic()
        accepted = self._accepted
        accepted.append(now)
        while accepted[0] <= now - 1.0:
            accepted.popleft()

    def brake(self, retry_after: float | None) -> None:
        """A 429. The first of a burst holds every request for Retry-After and paces just
        under what CDP accepted over the last second; the rest of the burst only restart
        the quiet interval."""
        now = time.monotonic()
        first = now - self._last_429 >= BURST_GAP
        self._last_429 = self._last_step = now
        if not first:
            # The rest of a burst: requests sent before the pace took hold. Learning from
            # them again would ratchet the pace down as the window slides past the burst.
            return
        pause = retry_after if retry_after is not None else DEFAULT_THROTTLE_PAUSE
        self._hold_until = max(self._hold_until, now + pause)
        floor = self.rate * MIN_RATE_FRACTION if self.rate > 0 else MIN_LEARNED_RATE
        if self.shared is not None:
            # This replica sees only its share of what CDP accepted; the shared pace is a
            # total, so it is lowered from what it is.
            self._set_pace(max(floor, self.effective_rate * LEARN_FACTOR))
            return
        accepted = self._accepted
        while accepted and accepted[0] <= now - 1.0:
            accepted.popleft()
        if not accepted:
            return  # nothing to learn from (the first request was refused): just hold
        pace = max(floor, len(accepted) * LEARN_FACTOR)
        if self.effective_rate > 0:
            pace = min(pace, self.effective_rate)
        self._set_pace(pace)

    def _probe(self, now: float) -> None:
        """After a quiet interval, a few per cent more, up to the configured rate."""
        if self._learned is None or now - self._last_step < QUIET_INTERVAL:
            return
        self._last_step = now  # one step per quiet interval
        self._set_pace(self._learned * PROBE_FACTOR)

    def _set_pace(self, pace: float) -> None:
        if self.rate > 0 and pace >= self.rate:
            self._learned = None  # back at the configured limit
            pace = self.rate
        else:
            self._learned = pace
        if self.shared is not None:
            self.shared.teach(self._learned)  # every replica slows, not just this one
            return
        # The same throttler, re-sliced: its log of recent requests stays, so a change of
        # rate cannot let an extra slice out at once.
        learned = self._learned is not None
        if self._throttler is None:
            self._throttler = self._build(pace, learned=learned)
        else:
            self._slice(self._throttler, pace, learned=learned)


async def _until_a_slot_is_free(throttler: Throttler) -> None:
    """Sleep until the throttler's sliding log has room, in one sleep.

    Its own `acquire` polls every `retry_interval` (2 ms) while the log is full: 500
    wake-ups a second whatever the rate, ten per event at 50/s. The time the oldest entry
    leaves the log is known, so sleep until then (and SLOT_MARGIN_SECONDS more); `acquire`
    then finds room at once. Its log is read directly (asyncio-throttle has no accessor
    for it), on its own clock.
    """
    throttler.flush()  # type: ignore[no-untyped-call]  # untyped library
    log = throttler._task_logs
    if len(log) >= throttler.rate_limit:
        due = log[0] + throttler.period - _throttle_clock.monotonic()
        if due > 0:
            await asyncio.sleep(due + SLOT_MARGIN_SECONDS)


# GCRA (generic cell rate algorithm) over one Redis key holding the theoretical arrival
# time (TAT) in microseconds of Redis's own clock, so replicas' clocks do not matter.
# Admits when TAT - tolerance <= now and moves TAT one interval on; otherwise returns
# the microseconds to wait. A TAT in the past restarts from now: idle time is not saved
# up as a burst beyond the tolerance. Doubles hold microsecond epochs exactly (< 2^53).
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
-- What a replica learned from CDP's 429s slows every replica (see RateLimiter.brake):
-- ARGV[2] teaches a pace ('' nothing new, '-' forget it), which lives 10 s unless taught
-- again (the learner re-teaches as it probes upward).
if ARGV[2] == '-' then
  redis.call('DEL', KEYS[2])
elseif ARGV[2] ~= '' then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', 10000)
end
local learned = tonumber(redis.call('GET', KEYS[2]) or '0')
if learned > 0 and 1000000 / learned > interval then interval = 1000000 / learned end
-- A tolerance of one interval (see SharedRateLimit.acquire).
local tolerance = interval
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait > 0 then return math.ceil(wait) end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
return 0
"""
# How much before its turn a waiter asks again (covers sleep overshoot and a round trip).
SHARED_EARLY_SECONDS = 0.002
# The shared limit admits this share of the rate. What CDP counts in a second is the
# admissions (at most rate + 2 in any second, see acquire) shifted by each request's own
# delay between admission and arrival (a busy replica's loop, the network, the server's
# own pauses). Three replicas sharing 150/s on two cores: 1% under the rate, the busiest
# second at the server held 151-152 (without it 153-154) on a quiet machine but reached
# 154 on a busy one; 2% under, it held 150-152 there, and 98% of the rate was sent.
SHARED_HEADROOM = 0.98
# Retry pause while the shared limit's Redis cannot be reached.
SHARED_RETRY_SECONDS = 1.0


class SharedRateLimit:
    """One rate for all replicas: `--rate-limit-backend redis://HOST:6379/0[?key=NAME]`.

    Admissions are spaced one interval apart across replicas, with a tolerance of one
    interval for late callers. If Redis cannot be reached, nothing is admitted (the limit
    must hold even then): `available` turns False, which takes the worker's readiness
    down, and acquire() keeps trying.
    """

    def __init__(self, url: str) -> None:
        # A missing extra is a configuration error, found at start.
        label = "--rate-limit-backend / WORKER_RATE_LIMIT_BACKEND"
        _extras.require(_extras.REDIS, label)
        parsed = ParsedUrl.split(url, label, {"key"})
        self.url = parsed.client_url
        self.key = parsed.params.get("key") or "cdp-sync:rate-limit"
        self.learned_key = f"{self.key}:learned"
        self.available = True
        self._teach = ""  # carried by the next admission: a pace, "-" (forget it), or none
        # Called with the new availability when it changes (the gate sets a metric).
        self.on_change: Callable[[bool], None] | None = None
        self._client: Any = None
        self._script: Any = None

    async def open(self) -> None:
        from ._redis import client  # redis-py: only now that the extra is known to be there

        # No PING: an unreachable Redis pauses sending (see acquire), it does not stop start-up.
        self._client = client(self.url)
        self._script = self._client.register_script(_GCRA)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def teach(self, pace: float | None) -> None:
        """What this replica learned from a 429 (None: nothing, back at the configured
        rate), for every replica: sent with the next admission, no round trip of its own."""
        self._teach = "-" if pace is None else f"{pace:.3f}"

    def _set_available(self, available: bool) -> None:
        self.available = available
        if self.on_change is not None:
            self.on_change(available)

    async def acquire(self, rate: float) -> None:
        # The script tolerates one interval: a caller that wakes up late (a busy loop, a
        # slow round trip) still gets the slot it was due, instead of the schedule
        # restarting from its late "now" and the slot being lost. Without it three
        # replicas on a loaded machine reached 85-96% of the rate; with it the whole rate,
        # and any one-second window still holds at most rate + 2 admissions.
        interval = 1_000_000 / (rate * SHARED_HEADROOM)
        while True:
            try:
                keys, args = [self.key, self.learned_key], [interval, self._teach]
                wait_us = int(await self._script(keys=keys, args=args))
                self._teach = ""
            except Exception as exc:  # noqa: BLE001 - any failure to reach Redis pauses sending
                if self.available:
                    self._set_available(False)
                    log.error("ratelimit.unavailable", error=type(exc).__name__)  # noqa: TRY400 - no traceback, one line
                await asyncio.sleep(SHARED_RETRY_SECONDS)
                continue
            if not self.available:
                self._set_available(True)
                log.info("ratelimit.available")
            if wait_us <= 0:
                return
            # Wake a little early and ask again: a late wake-up would waste its slot
            # (with no tolerance there is no catching up), an early one costs a round trip.
            await asyncio.sleep(max(wait_us / 1_000_000 - SHARED_EARLY_SECONDS, 0.0005))
