"""The request gate: the one door every CDP request goes through.

Before a request leaves, in this order: no pause may be on (auth now; outages next), a
concurrency slot, the rate limit, the stop flag, and our lease on the order. Because
every request passes here, "nothing is sent while paused or after a stop" holds by
construction, for the messages already fetched as much as for new ones: a pause stops
every request at once. The gate also keeps the request metrics and applies the 429
brake (DESIGN sections 3 and 7).

A pause is lifted only by its probe: while CDP refuses the credentials, one listing at a
time goes out (past the pause, with backoff) until one gets through.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from .cdp import Outcome, Verdict
from .errors import Draining
from .limits import BACKOFF_CAP, RateLimiter, backoff_delay
from .observability import Metrics, get_logger

log = get_logger("worker.gate")

T = TypeVar("T")
Call = Callable[[], Awaitable[Outcome]]

# Request latencies kept for the demo's percentiles.
LATENCY_SAMPLES = 100_000
# Why readiness is off while a pause is on. The shared limit pauses by itself: while its
# Redis is away, `RateLimiter.acquire` admits nothing.
AUTH_PAUSE = "paused: CDP rejected the credentials"
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
        self._leases = leases
        self._backoff_base = backoff_base
        self._slots = asyncio.Semaphore(concurrency)
        self._stopping = asyncio.Event()
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._probe: asyncio.Task[None] | None = None
        metrics.concurrency_limit.set(concurrency)

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
        return None if self._unpaused.is_set() else AUTH_PAUSE

    async def wait_unpaused(self) -> None:
        """Return once no pause is on; Draining if the worker stops first."""
        if not self._unpaused.is_set():
            await self.unless_stopped(self._unpaused.wait())

    def auth_failed(self, probe: Call) -> None:
        """401/403: pause every request until `probe` (a listing) gets past authentication.

        Called by every delivery that hears it; the first starts the one probe.
        """
        if not self._unpaused.is_set():
            return
        self._unpaused.clear()
        self.metrics.auth_paused.set(1)
        log.error("cdp.auth_failed", probe=0)
        self._probe = asyncio.create_task(self._probe_auth(probe), name="auth-probe")

    async def _probe_auth(self, probe: Call) -> None:
        """List an order's contacts with backoff until CDP answers it: then resume."""
        attempt = 0
        while not self._unpaused.is_set():
            attempt += 1
            # Never hammer CDP with bad credentials: at least one base step between probes.
            base = self._backoff_base
            await asyncio.sleep(backoff_delay(attempt, base=2 * base, cap=BACKOFF_CAP) + base)
            try:
                # Past the pause (it is what the probe tests) and past the lease check (a
                # listing cannot create a second contact).
                async with self._slots:
                    await self._pace()
                    outcome = await self._timed(probe)
            except Draining:
                return
            except Exception:  # a bug must not end the probing: the pause would never lift
                log.exception("cdp.auth_probe_failed", probe=attempt)
                continue
            if outcome.verdict is Verdict.AUTH:
                log.error("cdp.auth_failed", probe=attempt, status=outcome.status)
            elif outcome.verdict is Verdict.CREATED:  # a listing that worked
                log.info("cdp.auth_recovered", probe=attempt)
                self.metrics.auth_paused.set(0)
                self._unpaused.set()
            else:  # CDP unreachable or busy: says nothing about the credentials
                log.info("cdp.auth_probe_inconclusive", probe=attempt, reason=outcome.label)

    async def close(self) -> None:
        """Stop the probe, if one runs."""
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await probe

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
                if self._unpaused.is_set():
                    return await self._timed(call)

    async def _pace(self) -> None:
        """The rate limit (its wait counted), then the stop flag."""
        waited = await self.limiter.acquire()
        self.metrics.rate_limit_wait.inc(waited)
        if self._stopping.is_set():
            raise Draining

    async def _timed(self, call: Call) -> Outcome:
        """Send, and count what came back; a 429 brakes every request of the process."""
        metrics = self.metrics
        metrics.in_flight.inc()
        try:
            outcome = await call()
        finally:
            metrics.in_flight.dec()
        metrics.requests.labels(outcome.label).inc()
        metrics.request_duration.observe(outcome.duration)
        self.latencies.append(outcome.duration)
        if outcome.status == 429:
            metrics.throttled.inc()
            self.limiter.brake(outcome.retry_after)
        return outcome
