"""The request gate: the one door every CDP request goes through.

Before a request leaves, in this order: no pause may be on (auth, outage: `pauses.py`), a
concurrency slot, the rate limit, the stop flag, and our lease on the order. Because
every request passes here, "nothing is sent while paused or after a stop" holds by
construction, for the messages already fetched as much as for new ones: a pause stops
every request at once. The gate also keeps the request metrics, applies the 429 brake
and notes every outcome for the outage detector (DESIGN sections 3 and 7).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from .cdp import Outcome
from .errors import Draining
from .limits import RateLimiter
from .observability import Metrics, get_logger
from .pauses import WHY, Pause, Pauses, Recent, systemic

log = get_logger("worker.gate")

T = TypeVar("T")
Call = Callable[[], Awaitable[Outcome]]

# Request latencies kept for the demo's percentiles.
LATENCY_SAMPLES = 100_000
# Readiness while the shared rate limit's Redis is away: `RateLimiter.acquire` admits
# nothing meanwhile, so that pause is the limiter's own.
LIMIT_UNAVAILABLE = "paused: the shared rate limit cannot be reached"


class LeaseCheck(Protocol):
    """What the gate asks before sending for an order (`leases.Leases`)."""

    async def ensure(self, order_ref: str) -> None:
        """Return if our lease outlasts one request; raise LeaseLost if not."""


class RequestGate:
    """Slots, pacing, pauses and the stop flag in front of every CDP request.

    `stop()` is the worker's stop flag: once set, nothing new is sent, and every wait of
    a delivery (`sleep`, `unless_stopped`) ends by raising `Draining`.
    """

    def __init__(
        self,
        *,
        concurrency: int,
        limiter: RateLimiter,
        metrics: Metrics,
        leases: LeaseCheck,
        backoff_base: float,
    ) -> None:
        self.limiter = limiter
        self.metrics = metrics
        self.latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.recent = Recent()
        self.pauses = Pauses(
            metrics, self._send_past_pauses, self.recent, backoff_base=backoff_base
        )
        self._leases = leases
        self._slots = asyncio.Semaphore(concurrency)
        self._stopping = asyncio.Event()
        metrics.concurrency_limit.set(concurrency)
        # Read at each scrape, not kept up per request (two locked updates per request).
        self._in_flight = 0
        metrics.in_flight.set_function(lambda: self._in_flight)
        if limiter.shared is not None:
            paused = metrics.paused.labels("rate_limit_backend")
            limiter.shared.on_change = lambda available: paused.set(0 if available else 1)

    # -- the stop flag -------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self) -> None:
        self._stopping.set()

    async def unless_stopped(self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable` unless stop() comes first: then cancel it and raise Draining."""
        work = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when our caller is cancelled: leave no task behind
            stop.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
        if work.cancelled():
            raise Draining
        return work.result()

    async def sleep(self, seconds: float) -> None:
        """Sleep between attempts, cut short by stop() (Draining: the message goes back)."""
        await self.unless_stopped(asyncio.sleep(seconds))

    async def retry_in(self, seconds: float, reason: str) -> None:
        """Count a retry (`retries_total{reason}`) and sleep until it is due."""
        self.metrics.retries.labels(reason).inc()
        await self.sleep(seconds)

    # -- pauses --------------------------------------------------------------------------

    @property
    def pause_reason(self) -> str | None:
        """Why the gate holds every request back, for readiness; None when it does not."""
        reason = self.pauses.reason
        return None if reason is None else WHY[reason]

    async def wait_unpaused(self) -> None:
        """Return once no pause is on; Draining if the worker stops first."""
        if not self.pauses.lifted.is_set():
            await self.unless_stopped(self.pauses.lifted.wait())

    def auth_failed(self, probe: Call) -> None:
        """401/403: pause every request until `probe` (a listing) gets past authentication.

        Called by every delivery that hears it; the first starts the one probe.
        """
        self.pauses.begin(Pause.AUTH, probe)

    @property
    def answers(self) -> int:
        """Requests CDP has answered so far (see `failed`)."""
        return self.recent.answers

    def failed(self, outcome: Outcome, probe: Call, answers_before: int) -> bool:
        """A request failed without CDP rejecting the event: does it count as an attempt?

        A failure that is CDP's (no answer, a 408, a 5xx) counts only if CDP answered
        other requests since `answers_before` (the delivery's previous failure, or its
        start): others succeed, so it may be the event's. When nearly all recent requests
        fail, it is an outage: every request is paused until `probe` (a listing) is
        answered, and nothing counts. A 429 never counts: CDP paces us (the brake).
        """
        if outcome.status == 429:
            return False
        if not systemic(outcome):
            return True
        if self.recent.outage:
            self.pauses.begin(Pause.OUTAGE, probe, outcome)
            return False
        return self.pauses.reason is None and self.recent.answers > answers_before

    async def close(self) -> None:
        """Stop the probe, if one runs."""
        await self.pauses.close()

    # -- the door ------------------------------------------------------------------------

    async def request(self, order_ref: str, call: Call) -> Outcome:
        """Send one request for `order_ref` through every check; see the module docstring.

        Raises Draining once the worker stops and LeaseLost when our claim on the order
        may have passed to another worker: either way nothing was sent.
        """
        while True:
            await self.wait_unpaused()
            async with self._slots:
                await self._pace()
                await self._leases.ensure(order_ref)  # may take a state-store round trip
                # Nothing awaited between these checks and the send: a pause or a stop that
                # began while we waited our turn holds this request too.
                if self._stopping.is_set():
                    raise Draining
                if self.pauses.lifted.is_set():
                    return await self._timed(call)

    async def _send_past_pauses(self, call: Call) -> Outcome:
        """A probe: past the pause (it is what the probe tests) and past the lease check
        (a listing cannot create a second contact), not past the slots or the limit."""
        async with self._slots:
            await self._pace()
            return await self._timed(call)

    async def _pace(self) -> None:
        """The rate limit (its wait counted), then the stop flag."""
        waited = await self.limiter.acquire()
        if waited:
            self.metrics.rate_limit_wait.inc(waited)
        if self._stopping.is_set():
            raise Draining

    async def _timed(self, call: Call) -> Outcome:
        """Send, and count what came back; a 429 brakes every request of the process."""
        metrics = self.metrics
        self._in_flight += 1
        try:
            outcome = await call()
        finally:
            self._in_flight -= 1
        metrics.requests_by_status[outcome.label].inc()
        metrics.request_duration.observe(outcome.duration)
        self.latencies.append(outcome.duration)
        self.recent.note(outcome)
        if outcome.status == 429:
            metrics.throttled.inc()
            self.limiter.brake(outcome.retry_after)
        elif outcome.status is not None:
            self.limiter.accepted()  # what CDP accepts is learned from these
        return outcome
