"""The core loop: source -> parse -> claim -> pace -> POST -> record -> ack.

`Worker.run()` fetches messages in batches, parses them (contact.py) and claims the first
event of each order in the batch in one store operation (`claim_many`, state/); each
event is then worked in its own task, at most `max_pending` at a time: `Delivery`
(delivery.py) follows it through DESIGN section 3, sending every request through the
request gate (gate.py). Every exit goes through the outcome recorder (outcomes.py):
the outcome is recorded durably before the ack, or the message is given back (nack) and
its claim with it. Events of one orderRef are worked one after the other in this
process; other replicas are kept out by the claim's lease (leases.py), renewed while the
event is worked.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import structlog

from ._loops import running_loop_name
from .cdp import CdpClient
from .config import Settings
from .contact import DELETE_FINGERPRINT, Event, build_body, parse_event
from .contact import fingerprint as body_fingerprint
from .delivery import Delivery, Policy
from .errors import ConfigError, Draining, InvalidEvent, LeaseLost, SourceError, StateError
from .gate import LIMIT_UNAVAILABLE, RequestGate
from .leases import Leases
from .limits import BACKOFF_BASE, RateLimiter, SharedRateLimit
from .observability import HealthServer, Metrics, get_logger
from .outcomes import Recorder
from .sources import (
    DeadLetterSink,
    Message,
    Source,
    default_dead_letter_url,
    open_dead_letter_sink,
    open_source,
)
from .state import Claim, ClaimStatus, StateStore, Want, open_state_store

log = get_logger("worker.pipeline")

# Messages fetched at once; more than the requests in flight, so that events waiting on a
# retry do not starve the connection pool.
FETCH_BATCH = 256
PENDING_PER_REQUEST_SLOT = 4
# A fetch waits until this share (1/N) of the pending room is free: fewer, fuller batches
# (each one claim_many) instead of a fetch for every event that finishes.
REFILL_SHARE = 4
# How long one fetch may block, so that a stop is noticed promptly.
FETCH_TIMEOUT = 1.0
# An orderRef held by another replica: ask again after about this long.
BUSY_RETRY_SECONDS = 2.0
# Orders whose busy_elsewhere line is remembered (to log it once per lease), at most.
BUSY_SAID_KEPT = 10_000
# The outcome counted for each claim answer that leaves nothing to send.
SKIPPED = {
    ClaimStatus.DUPLICATE: "duplicate",
    ClaimStatus.STALE: "stale",
    ClaimStatus.CHANGED: "changed_ignored",
}
# How long giving back what a cut-short drain left may take (see _return_leftovers): a
# store or broker slower than this is away, and leases and redeliveries take over.
LEFTOVERS_TIMEOUT = 5.0
# Retention sweeps, once at start (by the store) and then this often.
SWEEP_INTERVAL = 3600.0
# How often the source's lag is read for the metric.
LAG_INTERVAL = 10.0


def default_owner() -> str:
    """hostname-pid plus a random suffix: unique even when a pid is reused after a crash."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class _Ready:
    """A parsed event about to be claimed: its message, its CDP body (None for an
    erasure) and that body's fingerprint."""

    message: Message
    event: Event
    body: dict[str, Any] | None
    fingerprint: str

    def want(self, on_change: str) -> Want:
        """The claim's question for this event."""
        event = self.event
        return Want(self.fingerprint, event.version, event.op, on_change)


def _bind(event: Event) -> None:
    """The event's fields on every log line of its task."""
    structlog.contextvars.bind_contextvars(
        order_ref=event.order_ref,
        event_id=event.event_id,
        version=None if event.version is None else str(event.version),
        attempt=0,
    )


class _Part(Protocol):
    """What the worker opens and closes: state store, sink, source, client, health server."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...


class Worker:
    """One worker process. `await run()` until the source ends or `stop()`; then `close()`.

    Parts may be passed in (tests, the demo); otherwise they are built from `settings`.
    `backoff_base` is the first backoff step in seconds (DESIGN: 0.5); tests shrink it.
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
        backoff_base: float = BACKOFF_BASE,
    ) -> None:
        self.settings = settings
        # Parts are built here, not in run(), so that a bad URL fails before anything is
        # consumed. Parts passed in belong to the caller, who opens and closes them.
        self.state = state or open_state_store(
            settings.state, retention_seconds=settings.state_retention
        )
        self.dead_letters = dead_letters or open_dead_letter_sink(
            settings.dlq or default_dead_letter_url(settings.source)
        )
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
            ca_file=settings.cdp_ca_file,
        )
        given: tuple[object, ...] = (state, dead_letters, source, client)
        built: tuple[_Part, ...] = (self.state, self.dead_letters, self.source, self.client)
        # In opening order: the file source reads its checkpoint from the state store.
        self._owned = [part for arg, part in zip(given, built, strict=True) if arg is None]
        shared = None
        if settings.rate_limit_backend != "local" and settings.rate_limit > 0:
            shared = SharedRateLimit(settings.rate_limit_backend)
            self._owned.append(shared)
        self.metrics = metrics or Metrics()
        self.owner = owner or default_owner()
        self.policy = Policy.from_settings(settings, backoff_base=backoff_base)
        self.leases = Leases(
            self.state,
            self.source,
            owner=self.owner,
            lease_seconds=settings.lease_seconds,
            request_timeout=settings.request_timeout,
        )
        self.gate = RequestGate(
            concurrency=settings.concurrency,
            limiter=RateLimiter(settings.rate_limit, shared),
            metrics=self.metrics,
            leases=self.leases,
            backoff_base=backoff_base,
        )
        self.recorder = Recorder(
            state=self.state,
            source=self.source,
            dead_letters=self.dead_letters,
            metrics=self.metrics,
            owner=self.owner,
        )
        self._max_pending = max(settings.concurrency * PENDING_PER_REQUEST_SLOT, 64)
        # The next fetch waits until this few events are being worked (see _consume).
        self._refill_at = self._max_pending - self._max_pending // REFILL_SHARE
        self._tasks: set[asyncio.Task[None]] = set()
        self._few_enough = asyncio.Event()  # set once len(_tasks) <= _wake_at
        self._wake_at = 0
        self._working: dict[str, asyncio.Future[None]] = {}  # orderRef -> its delivery
        self._waiting: Counter[str] = Counter()  # orderRef -> its events waiting their turn
        self._bug_failures: dict[str, int] = {}  # message id -> unexpected failures so far
        self._busy_said: dict[str, float] = {}  # orderRef -> when busy_elsewhere was logged
        self._running = False
        self._health: HealthServer | None = None

    @property
    def summary(self) -> Counter[str]:
        """Events finished so far, by outcome (and `dead:<reason>`)."""
        return self.recorder.summary

    @property
    def latencies(self) -> deque[float]:
        """Recent request latencies in seconds (the demo's percentiles)."""
        return self.gate.latencies

    # -- life cycle ---------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        """Readiness: consuming, source connected, not paused, not draining."""
        if self.gate.stopping:
            return False, "draining"
        if not self._running:
            return False, "starting"
        if (paused := self.gate.pause_reason) is not None:
            return False, paused
        if not self.source.connected:
            return False, "source disconnected"
        if (stalled := self.recorder.stalled) is not None:
            return False, stalled
        if not self.gate.limiter.available:
            return False, LIMIT_UNAVAILABLE
        return True, "consuming"

    def stop(self) -> None:
        """Stop taking messages; in-flight work finishes within the shutdown timeout."""
        if not self.gate.stopping:
            log.info("worker.stopping", in_flight=len(self._tasks))
            self.gate.stop()

    async def open(self) -> None:
        """Open the health server, then the parts this worker built.

        The health server first: a port that is taken is a configuration error, found
        before any part creates a file or connects (readiness says "starting" meanwhile).
        """
        port = self.settings.http_port
        if port:
            health = HealthServer(self.metrics, self.ready, port)
            try:
                await health.open()
            except OSError as exc:
                await health.close()
                raise ConfigError(
                    f"--http-port / WORKER_HTTP_PORT: cannot listen on port {port} "
                    f"({exc.strerror or exc})"
                ) from None
            self._health = health
        if self.source in self._owned:
            await self.source.check()  # a missing file: fail before the state file exists
        for part in self._owned:
            await part.open()

    async def close(self) -> None:
        """Close what open() opened, whatever state run() left it in."""
        await self.gate.close()
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
        await self._say_where_the_state_is()
        self._running = True
        log.info(
            "worker.started",
            source=self.source.name,
            owner=self.owner,
            rate_limit=self.settings.rate_limit,
            concurrency=self.settings.concurrency,
            api_version=self.settings.cdp_api_version,
            loop=running_loop_name(),
        )
        helpers = [
            asyncio.create_task(self.leases.renew_forever(), name="lease-renewer"),
            asyncio.create_task(self._sweep_periodically(), name="retention-sweeper"),
            asyncio.create_task(self._watch_lag(), name="lag-watcher"),
        ]
        try:
            with contextlib.suppress(Draining):  # stop() came: no more fetching
                await self._consume()
            await self._drain()
            await self._return_leftovers()
        finally:
            self._running = False
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
        log.info("worker.finished", **self.summary)

    async def _say_where_the_state_is(self) -> None:
        """Which store this run uses, and whether it knows any order: a run started from
        another directory would otherwise make a second, empty SQLite file unnoticed."""
        try:
            empty = await self.state.is_empty()
        except StateError as exc:
            log.warning("state.opened", location=self.state.location, error=str(exc))
            return
        log.info("state.opened", location=self.state.location, empty=empty)
        if empty and self.settings.verify_new:
            log.info(
                "state.empty",
                location=self.state.location,
                consequence="--verify-new: each order is looked up at CDP before it is created",
            )
        elif empty:
            log.warning(
                "state.empty",
                location=self.state.location,
                consequence="every order of this run is created at CDP, as if new; "
                "--verify-new looks each one up first",
            )

    async def _consume(self) -> None:
        """Fetch and start work until the source ends; Draining once stop() is called."""
        gate = self.gate
        while not gate.stopping:
            await gate.wait_unpaused()
            if len(self._tasks) > self._refill_at:
                # Fetch once enough events are done to make a batch worth its round trip
                # (and one claim_many), not for every event that finishes.
                await gate.unless_stopped(self._until_at_most(self._refill_at))
                continue
            room = self._max_pending - len(self._tasks)
            fetched = await gate.unless_stopped(
                self.source.fetch(min(room, FETCH_BATCH), FETCH_TIMEOUT)
            )
            if fetched is None:  # a finite source handed out its last message
                if not self._tasks:
                    return
                await gate.unless_stopped(self._until_at_most(len(self._tasks) - 1))
                continue
            self.metrics.events_received.inc(len(fetched))
            await self._start(fetched)

    async def _until_at_most(self, tasks: int) -> None:
        """Return once at most `tasks` events are being worked."""
        self._wake_at = tasks
        self._few_enough.clear()
        if len(self._tasks) > tasks:
            await self._few_enough.wait()

    def _spawn(self, message: Message, work: Coroutine[Any, Any, None]) -> None:
        """Work one message in a task of its own: the only task made per event."""
        task = asyncio.create_task(self._guarded(message, work))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if len(self._tasks) <= self._wake_at:
            self._few_enough.set()

    async def _drain(self) -> None:
        """Let in-flight deliveries finish within the shutdown timeout; give back the rest."""
        if not self._tasks:
            return
        timeout = self.settings.shutdown_timeout if self.gate.stopping else None
        _, late = await asyncio.wait(set(self._tasks), timeout=timeout)
        if late:
            log.warning("worker.shutdown_timeout", unfinished=len(late))
            for task in late:
                task.cancel()
            await asyncio.wait(late)

    async def _return_leftovers(self) -> None:
        """Give back what the drain's cancellations left: claims, then messages.

        A task cancelled before it started, or while it gave its claim back, leaves both
        behind; without this its message would never come back from a source that is
        not closed (and a broker's would only after its own timeout), and its order
        would stay busy for a whole lease.
        """
        try:
            async with asyncio.timeout(LEFTOVERS_TIMEOUT):
                claims = await self.leases.release_outstanding()
                messages = await self.recorder.give_back_unsettled()
        except TimeoutError:
            log.warning("worker.leftovers_timeout", timeout=LEFTOVERS_TIMEOUT)
            return
        if claims or messages:
            log.info("worker.leftovers_returned", claims=claims, messages=messages)

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

    async def _start(self, messages: list[Message]) -> None:
        """Parse a fetched batch, claim the first event of each free order all in one
        store operation (`claim_many`), and start one task per event.

        An event whose order is being worked already (in this process, or earlier in the
        batch) waits for it in its task, then claims on its own: see `_one_at_a_time`.
        """
        self.recorder.taken(messages)
        ready: list[_Ready] = []
        for message in messages:
            try:
                event = self._parse(message)
                # Busy while worked, and while an earlier event of it waits its turn.
                waits = event.order_ref in self._working or event.order_ref in self._waiting
                item = None if waits else _Ready(message, event, *self._body_of(event))
            except InvalidEvent as invalid:
                self._spawn(message, self.recorder.reject(message, invalid))
                continue
            except Exception:  # noqa: BLE001 - a bug: the message's own task meets it again
                self._spawn(message, self._handle_message(message))
                continue
            if item is None:
                self._spawn(message, self._one_at_a_time(event, message))
                continue
            self._working[event.order_ref] = asyncio.get_running_loop().create_future()
            ready.append(item)
        if not ready:
            return
        claimed_at = time.monotonic()
        self.leases.claiming(r.event.order_ref for r in ready)
        claims: list[Claim] | None
        try:
            claims = await self.state.claim_many(
                [(r.event.order_ref, r.want(self.settings.on_change)) for r in ready],
                self.owner,
                self.settings.lease_seconds,
            )
        except Exception:  # noqa: BLE001 - each event claims on its own, and reports
            claims = None
        if claims is None or len(claims) != len(ready):
            for r in ready:
                self._spawn(r.message, self._claim_again(r))
            return
        for r, claim in zip(ready, claims, strict=True):
            self._spawn(r.message, self._claimed(r, claim, claimed_at))

    async def _claim_again(self, r: _Ready) -> None:
        """After a failed claim_many: some claims may have landed (a pipeline is not a
        transaction), and a claim of ours would answer BUSY for a whole lease. Give them
        back (a no-op where we hold nothing; nothing was sent), then claim on our own."""
        try:
            await self.leases.release(r.event.order_ref, sent=False)
        finally:
            self._finished(r.event.order_ref)
        await self._one_at_a_time(r.event, r.message)

    def _parse(self, message: Message) -> Event:
        return parse_event(
            message.body, default_event_id=message.id, api_version=self.settings.cdp_api_version
        )

    async def _guarded(self, message: Message, work: Awaitable[None]) -> None:
        """Await one message's work; what escapes it gives the message back."""
        structlog.contextvars.bind_contextvars(message_id=message.id)
        try:
            await work
            self._bug_failures.pop(message.id, None)
        except (StateError, SourceError) as exc:
            # The state store, the sink or the broker is down: give the message back
            # untouched; it is worked again once the part is back. No traceback: this is
            # an outage, not a bug, and it says so in one line per event.
            log.error("event.failed", error=str(exc))  # noqa: TRY400 - one line, see above
            self.summary["failed"] += 1
            await self.recorder.give_back(message, delay=BUSY_RETRY_SECONDS)
        except Exception as exc:
            log.exception("event.failed")  # a bug: the traceback is wanted
            self.summary["failed"] += 1
            await self._after_bug(message, exc)

    async def _after_bug(self, message: Message, exc: Exception) -> None:
        """Give the message back, until the same message has failed max-attempts times:
        then dead-letter it, so that a bug on one message cannot loop for ever."""
        failures = self._bug_failures[message.id] = self._bug_failures.get(message.id, 0) + 1
        if failures < self.settings.max_attempts:
            await self.recorder.give_back(message, delay=BUSY_RETRY_SECONDS)
            return
        del self._bug_failures[message.id]
        try:
            parsed = orjson.loads(message.body)
        except orjson.JSONDecodeError:
            parsed = None
        try:
            event = parsed if isinstance(parsed, dict) else None
            await self.recorder.give_up(message, event, failures, exc)
        except Exception:
            log.exception("event.dead_letter_failed")
            await self.recorder.give_back(message, delay=BUSY_RETRY_SECONDS)

    async def _handle_message(self, message: Message) -> None:
        try:
            event = self._parse(message)
        except InvalidEvent as invalid:
            await self.recorder.reject(message, invalid)
            return
        await self._one_at_a_time(event, message)

    async def _one_at_a_time(self, event: Event, message: Message) -> None:
        """Claim and deliver, after any earlier event of the same orderRef in this process
        is done.

        RudderStack's per-key barrier: a duplicate waits for its twin and then finds the
        order `done`, instead of racing it to CDP; other orders flow past.
        """
        _bind(event)
        order_ref = event.order_ref
        self._waiting[order_ref] += 1
        try:
            while (earlier := self._working.get(order_ref)) is not None:
                await asyncio.shield(earlier)  # shielded: our cancellation must not cancel it
        except asyncio.CancelledError:
            await self.recorder.give_back(message)  # drained while waiting for its twin
            raise
        finally:
            self._waiting[order_ref] -= 1
            if not self._waiting[order_ref]:
                del self._waiting[order_ref]
        self._working[order_ref] = asyncio.get_running_loop().create_future()
        try:
            if self.gate.stopping:  # fetched before the stop, not started: give it back
                await self.recorder.give_back(message)
                return
            r = _Ready(message, event, *self._body_of(event))
            claimed_at = time.monotonic()
            want = r.want(self.settings.on_change)
            self.leases.claiming((order_ref,))
            claim = await self.state.claim(order_ref, self.owner, self.settings.lease_seconds, want)
            await self._act(r, claim, claimed_at)
        finally:
            self._finished(order_ref)

    async def _claimed(self, r: _Ready, claim: Claim, claimed_at: float) -> None:
        """The task of an event claimed with its batch; it holds the order's barrier."""
        _bind(r.event)
        try:
            await self._act(r, claim, claimed_at)
        finally:
            self._finished(r.event.order_ref)

    def _finished(self, order_ref: str) -> None:
        """Lift the order's barrier: the next event of it in this process may go."""
        self._working.pop(order_ref).set_result(None)

    async def _act(self, r: _Ready, claim: Claim, claimed_at: float) -> None:
        """Deliver under the claim, or skip the event if the claim says so."""
        message, order_ref = r.message, r.event.order_ref
        if not claim.held:
            self.leases.settled(order_ref)
            await self._skip(message, order_ref, claim)
            return
        if self.gate.stopping:  # claimed with its batch as the stop came: nothing sent
            await self.leases.release(order_ref, sent=False)
            await self.recorder.give_back(message)
            return
        self.leases.hold(order_ref, message, claimed_at)
        # A message the transport keeps redelivering (its consumers die on it) counts
        # like a claim that keeps expiring: both end in retries_exhausted.
        delivery = Delivery(
            message,
            r.event,
            body=r.body,
            fingerprint=r.fingerprint,
            claim=claim,
            gate=self.gate,
            recorder=self.recorder,
            client=self.client,
            policy=self.policy,
            claims=max(claim.attempts, message.delivery_count),
        )
        try:
            await delivery.run()
            self.leases.settled(order_ref)  # its outcome is recorded
        except LeaseLost:
            # Another worker may own the order now: leave the record alone (it reconciles).
            self.leases.settled(order_ref)
            log.warning("event.lease_lost", sent_in_doubt=delivery.sent_in_doubt)
            await self.recorder.give_back(message, delay=BUSY_RETRY_SECONDS)
        except (Draining, asyncio.CancelledError) as stopped:
            await self.leases.release(order_ref, sent=delivery.sent_in_doubt)
            await self.recorder.give_back(message)
            log.info("event.returned", sent_in_doubt=delivery.sent_in_doubt)
            if not isinstance(stopped, Draining):
                raise
        except BaseException:
            await self.leases.release(order_ref, sent=delivery.sent_in_doubt)
            raise
        finally:
            self.leases.drop(order_ref)

    def _body_of(self, event: Event) -> tuple[dict[str, Any] | None, str]:
        """The event's CDP body (None for an erasure) and its fingerprint."""
        if event.erasure:
            return None, DELETE_FINGERPRINT
        settings = self.settings
        body = build_body(
            event, base_url=settings.cdp_base_url, api_version=settings.cdp_api_version
        )
        return body, body_fingerprint(body)

    async def _skip(self, message: Message, order_ref: str, claim: Claim) -> None:
        """An answer that does not hold the order: nothing to send, or not now."""
        if claim.status is ClaimStatus.BUSY:
            self._say_busy(order_ref)
            await self.recorder.give_back(message, delay=BUSY_RETRY_SECONDS)
            return
        await self.recorder.skipped(message, SKIPPED[claim.status], status=claim.previous)

    def _say_busy(self, order_ref: str) -> None:
        """`event.busy_elsewhere`, once per order and lease: not at every retry of every
        copy of the event while another worker holds the order."""
        now, lease = time.monotonic(), self.settings.lease_seconds
        said = self._busy_said
        if now - said.get(order_ref, -math.inf) < lease:
            return
        said.pop(order_ref, None)
        said[order_ref] = now  # at the end: the dict stays in the order of these times
        while len(said) > BUSY_SAID_KEPT or now - next(iter(said.values())) >= lease:
            del said[next(iter(said))]  # the oldest: its lease is over, or too many
        log.info("event.busy_elsewhere")
