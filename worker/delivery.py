"""One event's way through DESIGN section 3, from its claim to a recorded outcome.

The pipeline claims the orderRef and hands the event to `Delivery.run`, which POSTs,
classifies, retries, reconciles and finally records `done` or `dead` and acks. When it
cannot finish (the worker stops), it raises and the pipeline gives the message and the
claim back; `sent_in_doubt` then tells whether a POST of ours may have reached CDP.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from .cdp import Outcome, Verdict
from .contact import Event, build_body
from .limits import backoff_delay
from .observability import get_logger
from .sources import Message

if TYPE_CHECKING:
    from .pipeline import Worker

log = get_logger("worker.delivery")


class Draining(Exception):
    """Raised inside a delivery that must give its message back because the worker stops."""


class LeaseLost(Exception):
    """Raised before a request when our claim on the order may have passed to another worker."""


def dead_letter(
    reason: str,
    detail: str | None,
    *,
    order_ref: str | None,
    event_id: str | None,
    status: int | None,
    attempts: int,
    event: dict[str, Any] | None,
    raw: bytes | None = None,
) -> dict[str, Any]:
    """A dead letter as DESIGN section 5 shapes it: the event, or the raw text if not JSON."""
    letter: dict[str, Any] = {
        "reason": reason,
        "detail": detail,
        "orderRef": order_ref,
        "eventId": event_id,
        "status": status,
        "attempts": attempts,
        "deadAt": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    if event is not None:
        letter["event"] = event
    else:
        letter["raw"] = (raw or b"").decode("utf-8", "replace")
    return letter


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
        self, worker: Worker, message: Message, event: Event, *, in_doubt: bool, claims: int
    ) -> None:
        self.worker = worker
        self.message = message
        self.event = event
        self.claims = claims
        # Reconcile before the first POST if an earlier owner may have sent one.
        self.reconcile = in_doubt
        # True from the moment a POST may have left until an answer or a listing says
        # otherwise: a claim given back in that window must leave the record in doubt.
        self.sent_in_doubt = in_doubt
        self.attempts = 0
        self._not_found_since: float | None = None
        self._not_found_tries = 0

    async def run(self) -> None:
        worker, settings = self.worker, self.worker.settings
        body = build_body(
            self.event, base_url=settings.cdp_base_url, api_version=settings.cdp_api_version
        )
        while True:
            if self.reconcile and await self._reconcile():
                return
            if self.reconcile:
                continue  # the listing failed; it was counted and backed off
            if self.attempts >= settings.max_attempts or self.claims > settings.max_attempts:
                await self._dead("retries_exhausted", "gave up after the last attempt", None)
                return
            self.attempts += 1
            structlog.contextvars.bind_contextvars(attempt=self.attempts)

            def post() -> Awaitable[Outcome]:
                # In doubt from the moment the POST leaves, not while it waits its turn.
                self.sent_in_doubt = True
                return worker.client.create_contact(self.event.order_ref, body)

            outcome = await worker.request(self.event.order_ref, post)
            if await self._act_on(outcome):
                return

    async def _act_on(self, outcome: Outcome) -> bool:
        """Act on a POST's outcome; True once the event is finished."""
        verdict = outcome.verdict
        if verdict in (Verdict.REJECTED, Verdict.NOT_FOUND, Verdict.AUTH, Verdict.RETRY):
            # CDP answered that nothing was created. After CREATED or CONFLICT a contact
            # exists: until it is recorded, a claim given back must leave it in doubt.
            self.sent_in_doubt = False
        if verdict is Verdict.CREATED:
            await self._done(outcome.contact_ref or "", outcome.href or "", "delivered")
            return True
        if verdict is Verdict.REJECTED:
            await self._dead("cdp_rejected", outcome.message, outcome.status)
            return True
        if verdict is Verdict.NOT_FOUND:
            return await self._not_found(outcome)
        if verdict is Verdict.AUTH:
            self.attempts -= 1  # the credentials' fault, not the event's
            await self.worker.auth_failed(self.event.order_ref)
            return False
        if verdict in (Verdict.CONFLICT, Verdict.IN_DOUBT):
            self.reconcile = True
        # CDP's error text stays out of logs (it may quote the contact); the dead letter
        # keeps it if the event gives up.
        log.info("event.retry", status=outcome.status, reason=outcome.label)
        await self._backoff(self.attempts, outcome)
        return False

    async def _not_found(self, outcome: Outcome) -> bool:
        """404: the order may not exist yet. Retry for the grace period, not counted."""
        self.attempts -= 1
        now = time.monotonic()
        if self._not_found_since is None:
            self._not_found_since = now
        waited = now - self._not_found_since
        if waited >= self.worker.settings.not_found_grace:
            await self._dead("order_not_found", outcome.message, outcome.status)
            return True
        self._not_found_tries += 1
        left = self.worker.settings.not_found_grace - waited
        delay = min(backoff_delay(self._not_found_tries, base=self.worker.backoff_base), left)
        self.worker.metrics.retries.labels("404").inc()
        log.info("event.order_not_found_yet", retry_in=round(delay, 3))
        await self.worker.sleep(delay)
        return False

    async def _reconcile(self) -> bool:
        """List the order's contacts: record one that exists (True), or clear the doubt."""
        worker = self.worker
        order_ref = self.event.order_ref
        listing = await worker.request(order_ref, lambda: worker.client.list_contacts(order_ref))
        if listing.verdict is Verdict.CREATED:
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
            await worker.auth_failed(self.event.order_ref)
            return False
        self.attempts += 1
        if self.attempts >= worker.settings.max_attempts:
            await self._dead(
                "retries_exhausted", "could not list the order's contacts", listing.status
            )
            return True
        await self._backoff(self.attempts, listing)
        return False

    async def _backoff(self, attempt: int, outcome: Outcome) -> None:
        self.worker.metrics.retries.labels(_retry_reason(outcome)).inc()
        base = self.worker.backoff_base
        await self.worker.sleep(backoff_delay(attempt, retry_after=outcome.retry_after, base=base))

    async def _done(self, contact_ref: str, href: str, outcome: str) -> None:
        worker = self.worker
        await worker.state.complete(self.event.order_ref, worker.owner, contact_ref, href)
        await worker.source.ack(self.message)
        worker.metrics.mark_success()
        worker.finish(outcome, contact_ref=contact_ref)

    async def _dead(self, reason: str, detail: str | None, status: int | None) -> None:
        worker = self.worker
        letter = dead_letter(
            reason,
            detail,
            order_ref=self.event.order_ref,
            event_id=self.event.event_id,
            status=status,
            attempts=self.attempts,
            event=self.event.raw,
        )
        await worker.dead_letters.put(letter)
        await worker.state.fail(self.event.order_ref, worker.owner, reason)
        await worker.source.ack(self.message)
        worker.summary[f"dead:{reason}"] += 1
        worker.finish("dead_lettered", reason=reason, status=status)  # detail: see above
