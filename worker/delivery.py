"""One event's way through DESIGN section 3, from its claim to a recorded outcome.

The pipeline claims the orderRef and hands the event to `Delivery.run`, which POSTs,
classifies, retries, reconciles and finally has the outcome recorded (`done` or `dead`,
then the ack). When it cannot finish (the worker stops, the lease is lost) the gate
raises and the pipeline gives the message and the claim back; `sent_in_doubt` then tells
whether a POST of ours may have reached CDP.

A delivery knows its collaborators only by the small Protocols below, so its retry and
reconciliation logic is tested with plain fakes (tests/test_delivery.py): the request
gate (`gate.RequestGate`), the outcome recorder (`outcomes.Recorder`), the CDP client
(`cdp.CdpClient`) and a `Policy` of numbers from the settings.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from .cdp import Outcome, Verdict
from .config import Settings
from .contact import Event, build_body
from .limits import BACKOFF_BASE, backoff_delay
from .observability import get_logger
from .sources import Message

log = get_logger("worker.delivery")


class Gate(Protocol):
    """The request gate, as a delivery uses it."""

    async def request(self, order_ref: str, call: Callable[[], Awaitable[Outcome]]) -> Outcome:
        """Send `call` through slots, pacing, pauses and the lease check."""

    async def retry_in(self, seconds: float, reason: str) -> None:
        """Count a retry for `reason` and sleep; Draining if the worker stops meanwhile."""

    def auth_failed(self, probe: Callable[[], Awaitable[Outcome]]) -> None:
        """CDP refused the credentials: pause every request until `probe` succeeds."""

    @property
    def answers(self) -> int:
        """Requests CDP has answered so far, this delivery's and others'."""

    def failed(
        self, outcome: Outcome, probe: Callable[[], Awaitable[Outcome]], answers_before: int
    ) -> bool:
        """A retryable failure: True if it counts as this event's attempt, which it does
        only if CDP answered others since `answers_before` (never during an outage,
        which the gate may declare and probe for with `probe`)."""


class Recorder(Protocol):
    """The outcome recorder, as a delivery uses it: record, ack, count."""

    async def done(
        self, message: Message, event: Event, contact_ref: str, href: str, outcome: str
    ) -> None: ...

    async def dead(
        self,
        message: Message,
        event: Event,
        reason: str,
        detail: str | None,
        *,
        status: int | None,
        attempts: int,
    ) -> None: ...


class Client(Protocol):
    """The CDP calls a delivery makes."""

    async def create_contact(self, order_ref: str, body: Mapping[str, Any]) -> Outcome: ...

    async def list_contacts(self, order_ref: str) -> Outcome: ...


@dataclass(frozen=True, slots=True)
class Policy:
    """The numbers a delivery follows (DESIGN sections 3 and 6)."""

    max_attempts: int
    not_found_grace: float
    base_url: str
    api_version: str
    # First backoff step in seconds (DESIGN: 0.5); tests shrink it to run quickly.
    backoff_base: float = BACKOFF_BASE

    @classmethod
    def from_settings(cls, settings: Settings, *, backoff_base: float = BACKOFF_BASE) -> Policy:
        return cls(
            max_attempts=settings.max_attempts,
            not_found_grace=settings.not_found_grace,
            base_url=settings.cdp_base_url,
            api_version=settings.cdp_api_version,
            backoff_base=backoff_base,
        )


def _retry_reason(outcome: Outcome) -> str:
    """A low-cardinality label for the retries metric."""
    if outcome.status is None:
        return outcome.label  # timeout, connection
    if outcome.status >= 500:
        return "5xx"
    return outcome.label


class Delivery:
    """Delivers one claimed event. `run()` returns once the outcome is recorded and acked."""

    def __init__(
        self,
        message: Message,
        event: Event,
        *,
        gate: Gate,
        recorder: Recorder,
        client: Client,
        policy: Policy,
        in_doubt: bool,
        claims: int,
    ) -> None:
        self.message = message
        self.event = event
        self.gate = gate
        self.recorder = recorder
        self.client = client
        self.policy = policy
        self.claims = claims
        # Reconcile before the first POST if an earlier owner may have sent one.
        self.reconcile = in_doubt
        # True from the moment a POST may have left until an answer or a listing says
        # otherwise: a claim given back in that window must leave the record in doubt.
        self.sent_in_doubt = in_doubt
        self.attempts = 0  # the event's own, counted toward max_attempts
        self._retries = 0  # every backoff, counted or not: how long the next one is
        self._answers_seen = gate.answers  # CDP's answers so far: did others get one since?
        self._not_found_since: float | None = None
        self._not_found_tries = 0

    async def run(self) -> None:
        policy, order_ref = self.policy, self.event.order_ref
        body = build_body(self.event, base_url=policy.base_url, api_version=policy.api_version)
        while True:
            if self.reconcile and await self._reconcile():
                return
            if self.reconcile:
                continue  # the listing failed; it was counted and backed off
            if self.attempts >= policy.max_attempts or self.claims > policy.max_attempts:
                await self._dead("retries_exhausted", "gave up after the last attempt", None)
                return
            self.attempts += 1
            structlog.contextvars.bind_contextvars(attempt=self.attempts)

            def post() -> Awaitable[Outcome]:
                # In doubt from the moment the POST leaves, not while it waits its turn.
                self.sent_in_doubt = True
                return self.client.create_contact(order_ref, body)

            outcome = await self.gate.request(order_ref, post)
            if await self._act_on(outcome):
                return

    async def _act_on(self, outcome: Outcome) -> bool:
        """Act on a POST's outcome; True once the event is finished."""
        verdict = outcome.verdict
        if verdict in (Verdict.REJECTED, Verdict.NOT_FOUND, Verdict.AUTH, Verdict.RETRY):
            # CDP answered that nothing was created. After CREATED or CONFLICT a contact
            # exists: until it is recorded, a claim given back must leave it in doubt.
            self.sent_in_doubt = False
        if verdict is Verdict.OK:
            await self._done(outcome.contact_ref or "", outcome.href or "", "delivered")
            return True
        if verdict is Verdict.REJECTED:
            await self._dead("cdp_rejected", outcome.message, outcome.status)
            return True
        if verdict is Verdict.NOT_FOUND:
            return await self._not_found(outcome)
        if verdict is Verdict.AUTH:
            self.attempts -= 1  # the credentials' fault, not the event's
            self._auth_failed()
            return False
        if verdict in (Verdict.CONFLICT, Verdict.IN_DOUBT):
            self.reconcile = True
        if verdict is not Verdict.CONFLICT and not self._counts(outcome):
            self.attempts -= 1  # CDP's fault, not (surely) the event's
        # CDP's error text stays out of logs (it may quote the contact); the dead letter
        # keeps it if the event gives up.
        log.info("event.retry", status=outcome.status, reason=outcome.label)
        await self._backoff(outcome)
        return False

    def _counts(self, failure: Outcome) -> bool:
        """Whether a failure counts as the event's attempt (see Gate.failed)."""
        counted = self.gate.failed(failure, self._probe, self._answers_seen)
        self._answers_seen = self.gate.answers
        return counted

    def _probe(self) -> Awaitable[Outcome]:
        """What ends a pause this delivery ran into: a listing of its order's contacts."""
        return self.client.list_contacts(self.event.order_ref)

    def _auth_failed(self) -> None:
        """Pause at the gate; the next request of this delivery waits there until a probe
        (a listing of this order) gets through."""
        self.gate.auth_failed(self._probe)

    async def _not_found(self, outcome: Outcome) -> bool:
        """404: the order may not exist yet. Retry for the grace period, not counted."""
        self.attempts -= 1
        now = time.monotonic()
        if self._not_found_since is None:
            self._not_found_since = now
        waited = now - self._not_found_since
        grace = self.policy.not_found_grace
        if waited >= grace:
            await self._dead("order_not_found", outcome.message, outcome.status)
            return True
        self._not_found_tries += 1
        delay = backoff_delay(self._not_found_tries, base=self.policy.backoff_base)
        delay = min(delay, grace - waited)
        log.info("event.order_not_found_yet", retry_in=round(delay, 3))
        await self.gate.retry_in(delay, "404")
        return False

    async def _reconcile(self) -> bool:
        """List the order's contacts: record one that exists (True), or clear the doubt."""
        order_ref = self.event.order_ref
        listing = await self.gate.request(order_ref, lambda: self.client.list_contacts(order_ref))
        if listing.verdict is Verdict.OK:
            self.reconcile = False
            if listing.contacts:
                ref, href = listing.contacts[0]
                if len(listing.contacts) > 1:
                    log.warning("cdp.several_contacts", count=len(listing.contacts))
                await self._done(ref, href, "reconciled")
                return True
            self.sent_in_doubt = False  # CDP has no contact: nothing of ours arrived
            return False
        if listing.verdict is Verdict.AUTH:
            self._auth_failed()
            return False
        if self._counts(listing):
            self.attempts += 1
            if self.attempts >= self.policy.max_attempts:
                await self._dead(
                    "retries_exhausted", "could not list the order's contacts", listing.status
                )
                return True
        await self._backoff(listing)
        return False

    async def _backoff(self, outcome: Outcome) -> None:
        self._retries += 1
        delay = backoff_delay(
            self._retries, retry_after=outcome.retry_after, base=self.policy.backoff_base
        )
        await self.gate.retry_in(delay, _retry_reason(outcome))

    async def _done(self, contact_ref: str, href: str, outcome: str) -> None:
        await self.recorder.done(self.message, self.event, contact_ref, href, outcome)

    async def _dead(self, reason: str, detail: str | None, status: int | None) -> None:
        await self.recorder.dead(
            self.message, self.event, reason, detail, status=status, attempts=self.attempts
        )
