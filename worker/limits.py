"""Pacing: the process-wide rate limit, retry backoff, and the 429 brake.

The local rate limit is asyncio-throttle's sliding log, used so that it stays cheap and
smooth at any rate:

* one coroutine at a time waits in the throttler (the others queue on an `asyncio.Lock`,
  which is FIFO and costs nothing while waiting): the throttler polls once per waiter, so
  thousands of waiters would burn a core;
* the budget is sliced: instead of N per second (a burst of a whole second's budget at
  once), it allows `k` per `k/N` seconds with `k/N` about 50 ms, so any one-second window
  the server sees holds at most about N requests.

A 429 brakes the whole process (DESIGN section 3): every request waits out `Retry-After`,
and the rate drops by 30%; it climbs back 10% per quiet interval (RudderStack's adaptive
throttle), never above the configured limit.
"""

from __future__ import annotations

import asyncio
import math
import random
import time

from asyncio_throttle.throttler import Throttler

# Width of one slice of the budget, in seconds: small enough to be smooth, large enough
# that the throttler's polling and sleep overshoot cost little of the rate.
SLICE_SECONDS = 0.05
# How often the single waiter re-checks the sliding log, in seconds. The loss of rate is
# at most about POLL/SLICE (4%), on average half of it.
POLL_SECONDS = 0.002
# Multiplicative decrease on a 429, recovery per quiet interval, and the floor.
BRAKE_FACTOR = 0.7
RECOVERY_FACTOR = 1.1
RECOVERY_INTERVAL = 5.0
MIN_RATE_FRACTION = 0.1
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
    """Process-wide pacing of CDP requests: `await acquire()` before each one.

    `rate` is requests per second; 0 means no limit (the 429 brake still applies).
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._lock = asyncio.Lock()
        self._fraction = 1.0
        self._hold_until = 0.0
        self._last_brake = -math.inf  # the last 429 (or recovery step): quiet is counted from it
        self._last_decrease = -math.inf  # the last 30% decrease: at most one a second
        self._throttler = self._build(rate)

    @staticmethod
    def _build(rate: float) -> Throttler | None:
        if rate <= 0:
            return None
        throttler = Throttler(rate_limit=1, retry_interval=POLL_SECONDS)
        RateLimiter._slice(throttler, rate)
        return throttler

    @staticmethod
    def _slice(throttler: Throttler, rate: float) -> None:
        """`k` per `k / rate` seconds, with `k / rate` about one slice."""
        per_slice = max(1, math.ceil(rate * SLICE_SECONDS))
        throttler.rate_limit = per_slice
        throttler.period = per_slice / rate

    @property
    def effective_rate(self) -> float:
        return self.rate * self._fraction

    async def acquire(self) -> float:
        """Wait for a slot; return the seconds waited (for the wait-time metric)."""
        started = time.monotonic()
        if self._throttler is None and self._hold_until <= started and not self._lock.locked():
            return 0.0  # unlimited and not braked: the hot path takes no lock
        async with self._lock:
            self._recover()
            # A 429 that arrives while we wait out an earlier one may extend the hold.
            while (hold := self._hold_until - time.monotonic()) > 0:  # noqa: ASYNC110 - a moving deadline, not an event
                await asyncio.sleep(hold)
            if self._throttler is not None:
                await self._throttler.acquire()  # type: ignore[no-untyped-call]  # untyped library
        return time.monotonic() - started

    def brake(self, retry_after: float | None) -> None:
        """A 429: hold everyone for Retry-After; lower the rate, at most once a second."""
        now = time.monotonic()
        pause = retry_after if retry_after is not None else DEFAULT_THROTTLE_PAUSE
        self._hold_until = max(self._hold_until, now + pause)
        if self.rate > 0 and now - self._last_decrease >= 1.0:
            self._set_fraction(max(MIN_RATE_FRACTION, self._fraction * BRAKE_FACTOR))
            self._last_decrease = now
        self._last_brake = now

    def _recover(self) -> None:
        if self._fraction >= 1.0:
            return
        quiet = time.monotonic() - self._last_brake
        if quiet >= RECOVERY_INTERVAL:
            self._last_brake = time.monotonic()  # one step per quiet interval
            self._set_fraction(min(1.0, self._fraction * RECOVERY_FACTOR))

    def _set_fraction(self, fraction: float) -> None:
        # The same throttler, re-sliced: its log of recent requests stays, so a change of
        # rate cannot let an extra slice out at once.
        self._fraction = fraction
        if self._throttler is not None:
            self._slice(self._throttler, self.rate * fraction)
