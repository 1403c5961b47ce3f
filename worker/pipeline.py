"""The core loop: source -> parse -> claim -> pace -> POST -> record -> ack.

`Worker.run()` fetches messages in batches and works each in its own task, at most
`max_pending` at a time: parse, claim the orderRef, then `Delivery` (delivery.py) follows
the event through DESIGN section 3. Every exit records the outcome durably (state store,
dead-letter sink) before the ack, or gives the message back (nack) and its claim with it.
Events of one orderRef are worked one after the other in this process; other replicas
are kept out by the claim's lease, which is renewed while the event is worked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import orjson
import structlog

from .cdp import CdpClient, Outcome, Verdict
from .config import Settings
from .contact import Event, parse_event
from .delivery import Delivery, Draining, LeaseLost, dead_letter
from .errors import InvalidEvent, SourceError, StateError
from .limits import BACKOFF_BASE, BACKOFF_CAP, RateLimiter, SharedRateLimit, backoff_delay
from .observability import HealthServer, Metrics, get_logger
from .sources import DeadLetterSink, Message, Source, open_dead_letter_sink, open_source
from .state import ClaimStatus, StateStore, open_state_store

log = get_logger("worker.pipeline")

# Messages fetched at once; more than the requests in flight, so that events waiting on a
# retry do not starve the connection pool.
FETCH_BATCH = 256
PENDING_PER_REQUEST_SLOT = 4
# How long one fetch may block, so that a stop is noticed promptly.
FETCH_TIMEOUT = 1.0
# An orderRef held by another replica: ask again after about this long.
BUSY_RETRY_SECONDS = 2.0
# Retention sweeps, once at start (by the store) and then this often.
SWEEP_INTERVAL = 3600.0
# A request is sent only if our lease outlasts its timeout by this much (seconds).
LEASE_MARGIN = 1.0
# How often the source's lag is read for the metric.
LAG_INTERVAL = 10.0
# Request latencies kept for the demo's percentiles.
LATENCY_SAMPLES = 100_000


def default_owner() -> str:
    """hostname-pid plus a random suffix: unique even when a pid is reused after a crash."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class _Part(Protocol):
    """What the worker opens and closes: state store, sink, source, client, health server."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...


class Worker:
    """One worker process. `await run()` until the source ends or `stop()`; then `close()`.

    Parts may be passed in (tests, the demo); otherwise they are built from `settings`.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        source: Source | None = None,
        state: StateStore | None = None,
        dead_letters: DeadLetterSink | None = None,
        client: CdpClient | None = None,
        metrics: Metrics | None = None,
        owner: str | None = None,
    ) -> None:
        self.settings = settings
        # Parts are built here, not in run(), so that a bad URL fails before anything is
        # consumed. Parts passed in belong to the caller, who opens and closes them.
        self.state = state or open_state_store(
            settings.state, retention_seconds=settings.state_retention
        )
        self.dead_letters = dead_letters or open_dead_letter_sink(settings.dead_letter_url)
        self.source = source or open_source(
            settings.source, state=self.state, follow=settings.follow
        )
        self.client = client or CdpClient(
            settings.cdp_base_url,
            settings.cdp_client_key,
            settings.cdp_api_token,
            api_version=settings.cdp_api_version,
            timeout=settings.request_timeout,
            concurrency=settings.concurrency,
        )
        given: tuple[object, ...] = (state, dead_letters, source, client)
        built: tuple[_Part, ...] = (self.state, self.dead_letters, self.source, self.client)
        # In opening order: the file source reads its checkpoint from the state store.
        self._owned = [part for arg, part in zip(given, built, strict=True) if arg is None]
        self.metrics = metrics or Metrics()
        self.owner = owner or default_owner()
        shared = None
        if settings.rate_limit_backend != "local" and settings.rate_limit > 0:
            shared = SharedRateLimit(settings.rate_limit_backend)
            self._owned.append(shared)
        self.limiter = RateLimiter(settings.rate_limit, shared)
        # First backoff step in seconds (DESIGN: 0.5); tests shrink it to run quickly.
        self.backoff_base = BACKOFF_BASE
        self.summary: Counter[str] = Counter()
        self.latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._max_pending = max(settings.concurrency * PENDING_PER_REQUEST_SLOT, 64)
        self._tasks: set[asyncio.Task[None]] = set()
        self._working: dict[str, asyncio.Future[None]] = {}  # orderRef -> its delivery
        self._bug_failures: dict[str, int] = {}  # message id -> unexpected failures so far
        # Claimed by us: leases renewed and messages held by _renew_leases.
        self._held: dict[str, Message] = {}
        self._lease_until: dict[str, float] = {}  # orderRef -> monotonic end of our lease
        self._stopping = asyncio.Event()
        self._auth_ok = asyncio.Event()
        self._auth_ok.set()
        self._auth_probe: asyncio.Task[None] | None = None
        self._running = False
        self._health: HealthServer | None = None
        self.metrics.concurrency_limit.set(settings.concurrency)

    # -- life cycle ---------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        """Readiness: consuming, source connected, not paused for auth, not draining."""
        if self._stopping.is_set():
            return False, "draining"
        if not self._running:
            return False, "starting"
        if not self._auth_ok.is_set():
            return False, "paused: CDP rejected the credentials"
        if not self.source.connected:
            return False, "source disconnected"
        if not self.limiter.available:
            return False, "paused: the shared rate limit cannot be reached"
        return True, "consuming"

    def stop(self) -> None:
        """Stop taking messages; in-flight work finishes within the shutdown timeout."""
        if not self._stopping.is_set():
            log.info("worker.stopping", in_flight=len(self._tasks))
            self._stopping.set()

    async def open(self) -> None:
        """Open the parts this worker built, then the health server."""
        for part in self._owned:
            await part.open()
        if self.settings.http_port:
            self._health = HealthServer(self.metrics, self.ready, self.settings.http_port)
            await self._health.open()

    async def close(self) -> None:
        """Close what open() opened, whatever state run() left it in."""
        if self._auth_probe is not None:
            self._auth_probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._auth_probe
        parts: list[_Part] = [self._health] if self._health else []
        for part in [*parts, *reversed(self._owned)]:
            try:
                await part.close()
            except Exception:
                log.exception("worker.close_failed", part=type(part).__name__)
        self._health = None

    async def run(self) -> None:
        """Consume until a finite source is finished or `stop()` is called, then drain."""
        await self.open()
        self._running = True
        log.info(
            "worker.started",
            source=self.source.name,
            owner=self.owner,
            rate_limit=self.settings.rate_limit,
            concurrency=self.settings.concurrency,
            api_version=self.settings.cdp_api_version,
        )
        helpers = [
            asyncio.create_task(self._renew_leases(), name="lease-renewer"),
            asyncio.create_task(self._sweep_periodically(), name="retention-sweeper"),
            asyncio.create_task(self._watch_lag(), name="lag-watcher"),
        ]
        try:
            await self._consume()
            await self._drain()
        finally:
            self._running = False
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
        log.info("worker.finished", **self.summary)

    async def _consume(self) -> None:
        while not self._stopping.is_set():
            if not await self._until_stop(self._auth_ok.wait()):
                break
            room = self._max_pending - len(self._tasks)
            if room <= 0:
                await self._until_stop(self._any_task_done())
                continue
            fetched = await self._until_stop(
                self.source.fetch(min(room, FETCH_BATCH), FETCH_TIMEOUT)
            )
            if fetched is False:
                break
            if fetched is None:  # a finite source handed out its last message
                if not self._tasks:
                    break
                await self._until_stop(self._any_task_done())
                continue
            assert isinstance(fetched, list)
            for message in fetched:
                self.metrics.events_received.inc()
                task = asyncio.create_task(self._handle(message))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _any_task_done(self) -> None:
        if self._tasks:  # they may all have finished since the caller looked
            await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)

    async def _until_stop(self, awaitable: Awaitable[Any]) -> Any:
        """Await `awaitable` unless stop() comes first (then cancel it and return False)."""
        work = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if work.done():
            return work.result()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        return False

    async def _drain(self) -> None:
        """Let in-flight deliveries finish within the shutdown timeout; give back the rest."""
        if not self._tasks:
            return
        timeout = self.settings.shutdown_timeout if self._stopping.is_set() else None
        _, late = await asyncio.wait(set(self._tasks), timeout=timeout)
        if late:
            log.warning("worker.shutdown_timeout", unfinished=len(late))
            for task in late:
                task.cancel()
            await asyncio.wait(late)

    async def _renew_leases(self) -> None:
        """Keep our claims' leases, and the messages behind them, from running out."""
        interval = self.settings.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            for order_ref, message in list(self._held.items()):
                renewed_at = time.monotonic()
                try:
                    if await self.state.renew(order_ref, self.owner, self.settings.lease_seconds):
                        self._lease_until[order_ref] = renewed_at + self.settings.lease_seconds
                    else:
                        log.warning("state.lease_lost", order_ref=order_ref)
                        self._lease_until[order_ref] = 0.0  # the next request stops
                    await self.source.hold(message)
                except Exception:
                    log.exception("state.renew_failed", order_ref=order_ref)

    async def _watch_lag(self) -> None:
        while True:
            try:
                lag = await self.source.lag()
            except Exception:
                log.warning("source.lag_unknown", exc_info=True)
            else:
                if lag is not None:
                    self.metrics.source_lag.set(lag)
            await asyncio.sleep(LAG_INTERVAL)

    async def _sweep_periodically(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                removed = await self.state.sweep(self.settings.state_retention)
                log.info("state.swept", removed=removed)
            except Exception:
                log.exception("state.sweep_failed")

    # -- one message --------------------------------------------------------------------

    async def _handle(self, message: Message) -> None:
        structlog.contextvars.bind_contextvars(message_id=message.id)
        try:
            await self._handle_message(message)
            self._bug_failures.pop(message.id, None)
        except (StateError, SourceError) as exc:
            # The state store, the sink or the broker is down: give the message back
            # untouched; it is worked again once the part is back. No traceback: this is
            # an outage, not a bug, and it says so in one line per event.
            log.error("event.failed", error=str(exc))  # noqa: TRY400 - one line, see above
            self.summary["failed"] += 1
            await self._give_back(message, delay=BUSY_RETRY_SECONDS)
        except Exception as exc:
            log.exception("event.failed")  # a bug: the traceback is wanted
            self.summary["failed"] += 1
            await self._after_bug(message, exc)

    async def _after_bug(self, message: Message, exc: Exception) -> None:
        """Give the message back, until the same message has failed max-attempts times:
        then dead-letter it, so that a bug on one message cannot loop for ever."""
        failures = self._bug_failures[message.id] = self._bug_failures.get(message.id, 0) + 1
        if failures < self.settings.max_attempts:
            await self._give_back(message, delay=BUSY_RETRY_SECONDS)
            return
        del self._bug_failures[message.id]
        try:
            parsed = orjson.loads(message.body)
        except orjson.JSONDecodeError:
            parsed = None
        event = parsed if isinstance(parsed, dict) else None
        order_ref = event.get("orderRef") if event else None
        letter = dead_letter(
            "retries_exhausted",
            f"the worker failed on this message {failures} times ({type(exc).__name__})",
            order_ref=order_ref if isinstance(order_ref, str) else None,
            event_id=message.id,
            status=None,
            attempts=failures,
            event=event,
            raw=message.body,
        )
        try:
            await self.dead_letters.put(letter)
            await self.source.ack(message)
        except Exception:
            log.exception("event.dead_letter_failed")
            await self._give_back(message, delay=BUSY_RETRY_SECONDS)
            return
        self.summary["dead:retries_exhausted"] += 1
        self.finish("dead_lettered", reason="retries_exhausted", status=None)

    async def _handle_message(self, message: Message) -> None:
        try:
            event = parse_event(
                message.body,
                default_event_id=message.id,
                api_version=self.settings.cdp_api_version,
            )
        except InvalidEvent as invalid:
            await self._reject_unparsed(message, invalid)
            return
        structlog.contextvars.bind_contextvars(
            order_ref=event.order_ref, event_id=event.event_id, attempt=0
        )
        await self._one_at_a_time(event, message)

    async def _give_back(self, message: Message, *, delay: float = 0.0) -> None:
        try:
            await self.source.nack(message, delay=delay)
        except Exception:
            log.exception("source.nack_failed")

    async def _one_at_a_time(self, event: Event, message: Message) -> None:
        """Deliver, after any earlier event of the same orderRef in this process is done.

        RudderStack's per-key barrier: a duplicate waits for its twin and then finds the
        order `done`, instead of racing it to CDP; other orders flow past.
        """
        order_ref = event.order_ref
        try:
            while (earlier := self._working.get(order_ref)) is not None:
                await asyncio.shield(earlier)  # shielded: our cancellation must not cancel it
        except asyncio.CancelledError:
            await self._give_back(message)  # drained while waiting for its twin
            raise
        finished = asyncio.get_running_loop().create_future()
        self._working[order_ref] = finished
        try:
            await self._deliver(message, event)
        finally:
            del self._working[order_ref]
            finished.set_result(None)

    async def _deliver(self, message: Message, event: Event) -> None:
        if self._stopping.is_set():  # fetched before the stop, not started: give it back
            await self._give_back(message)
            return
        claimed_at = time.monotonic()
        claim = await self.state.claim(event.order_ref, self.owner, self.settings.lease_seconds)
        if claim.status in (ClaimStatus.DONE, ClaimStatus.DEAD):
            await self.source.ack(message)
            self.finish("duplicate", status=claim.status.value)
            return
        if claim.status is ClaimStatus.BUSY:
            log.info("event.busy_elsewhere")
            await self._give_back(message, delay=BUSY_RETRY_SECONDS)
            return
        self._held[event.order_ref] = message
        self._lease_until[event.order_ref] = claimed_at + self.settings.lease_seconds
        # A message the transport keeps redelivering (its consumers die on it) counts
        # like a claim that keeps expiring: both end in retries_exhausted.
        delivery = Delivery(
            self,
            message,
            event,
            in_doubt=claim.status is ClaimStatus.IN_DOUBT,
            claims=max(claim.attempts, message.delivery_count),
        )
        try:
            await delivery.run()
        except LeaseLost:
            # Another worker may own the order now: leave the record alone (it reconciles).
            log.warning("event.lease_lost", sent_in_doubt=delivery.sent_in_doubt)
            await self._give_back(message, delay=BUSY_RETRY_SECONDS)
        except (Draining, asyncio.CancelledError) as stopped:
            await self._release(event.order_ref, sent=delivery.sent_in_doubt)
            await self._give_back(message)
            log.info("event.returned", sent_in_doubt=delivery.sent_in_doubt)
            if not isinstance(stopped, Draining):
                raise
        except BaseException:
            await self._release(event.order_ref, sent=delivery.sent_in_doubt)
            raise
        finally:
            self._held.pop(event.order_ref, None)
            self._lease_until.pop(event.order_ref, None)

    async def _release(self, order_ref: str, *, sent: bool) -> None:
        try:
            await self.state.release(order_ref, self.owner, sent=sent)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the lease runs out on its own
            log.warning("state.release_failed", error=str(exc))

    async def _reject_unparsed(self, message: Message, invalid: InvalidEvent) -> None:
        letter = dead_letter(
            invalid.reason,
            invalid.message,
            order_ref=invalid.order_ref,
            event_id=invalid.event_id or message.id,
            status=None,
            attempts=0,
            event=invalid.event,
            raw=message.body if invalid.event is None else None,
        )
        await self.dead_letters.put(letter)
        await self.source.ack(message)
        self.summary[f"dead:{invalid.reason}"] += 1
        self.finish(
            "dead_lettered",
            reason=invalid.reason,
            detail=invalid.message,
            order_ref=invalid.order_ref,
            event_id=invalid.event_id or message.id,
        )

    def finish(self, outcome: str, **fields: Any) -> None:
        self.metrics.events.labels(outcome).inc()
        self.summary[outcome] += 1
        level = log.warning if outcome == "dead_lettered" else log.info
        level(f"event.{outcome}", **fields)

    # -- pacing and requests, shared by every delivery ------------------------------------

    async def request(self, order_ref: str, call: Callable[[], Awaitable[Outcome]]) -> Outcome:
        """One CDP request: a concurrency slot, the rate limit, then checks, then the call.

        Nothing new is sent once the worker stops, nor for an order whose claim we may no
        longer hold: either raises Draining / LeaseLost and the message goes back.
        """
        async with self._slots:
            waited = await self.limiter.acquire()
            self.metrics.rate_limit_wait.inc(waited)
            if self._stopping.is_set():
                raise Draining
            await self._ensure_lease(order_ref)
            self.metrics.in_flight.inc()
            try:
                outcome = await call()
            finally:
                self.metrics.in_flight.dec()
        self.metrics.requests.labels(outcome.label).inc()
        self.metrics.request_duration.observe(outcome.duration)
        self.latencies.append(outcome.duration)
        if outcome.status == 429:
            self.metrics.throttled.inc()
            self.limiter.brake(outcome.retry_after)
        return outcome

    async def _ensure_lease(self, order_ref: str) -> None:
        """Send only while our lease outlasts the request, renewing it first if need be."""
        if order_ref not in self._lease_until:
            return  # not a claimed order (the auth probe)
        needed = self.settings.request_timeout + LEASE_MARGIN
        if self._lease_until[order_ref] - time.monotonic() >= needed:
            return
        try:
            renewed = await self.state.renew(order_ref, self.owner, self.settings.lease_seconds)
        except Exception:
            log.warning("state.renew_failed", exc_info=True)
            renewed = False
        if not renewed:
            raise LeaseLost
        self._lease_until[order_ref] = time.monotonic() + self.settings.lease_seconds

    async def sleep(self, seconds: float) -> None:
        """Sleep between attempts, cut short by stop(): the message goes back instead."""
        if await self._until_stop(asyncio.sleep(seconds)) is False:
            raise Draining

    async def auth_failed(self, order_ref: str) -> None:
        """401/403: pause consuming and wait until a probe gets past authentication."""
        if self._auth_ok.is_set():
            self._auth_ok.clear()
            self.metrics.auth_paused.set(1)
            log.error("cdp.auth_failed", probe=0)
            self._auth_probe = asyncio.create_task(self._probe_auth(order_ref))
        if await self._until_stop(self._auth_ok.wait()) is False:
            raise Draining

    async def _probe_auth(self, order_ref: str) -> None:
        """List an order's contacts with backoff until CDP answers it: then resume."""
        probe = 0
        while not self._auth_ok.is_set():
            probe += 1
            # Never hammer CDP with bad credentials: at least one base step between probes.
            delay = backoff_delay(probe, base=2 * self.backoff_base, cap=BACKOFF_CAP)
            await asyncio.sleep(delay + self.backoff_base)
            outcome = await self.request(order_ref, lambda: self.client.list_contacts(order_ref))
            if outcome.verdict is Verdict.AUTH:
                log.error("cdp.auth_failed", probe=probe, status=outcome.status)
            elif outcome.verdict is Verdict.CREATED:  # a listing that worked
                log.info("cdp.auth_recovered", probe=probe)
                self.metrics.auth_paused.set(0)
                self._auth_ok.set()
            else:  # CDP unreachable or busy: says nothing about the credentials
                log.info("cdp.auth_probe_inconclusive", probe=probe, reason=outcome.label)
