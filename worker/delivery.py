"""One event's way through DESIGN sections 3 and 4, from its claim to a recorded outcome.

The pipeline claims the orderRef with what the event wants (its body's fingerprint, its
version, upsert or delete) and hands the event and the claim's answer to `Delivery.run`.
The answer names the first step; each step is one request to CDP, and its outcome names
the next, until the outcome is recorded (`done`, `deleted` or `dead`, then the ack):

- CREATE: POST the contact. A timeout or 409 leaves its fate unknown: LIST.
- UPDATE: replace the known contact's body (idempotent: a timeout just sends it again).
  A 404 means the contact was deleted at CDP: LIST, and create it if none is left.
- DELETE: delete each contact of an erasure (a 404 is "gone already").
- LIST: what CDP holds for the order, when our records cannot tell (an abandoned claim,
  a request in doubt, a 409, `--verify-new`, an erasure of an order we have no record
  of). None: CREATE. Some: adopt the first, DELETE the others, and UPDATE the adopted
  one (what it holds is not known: even after our own POST timed out, the contact found
  may be another's), unless `--on-change ignore`.

When it cannot finish (the worker stops, the lease is lost) the gate raises and the
pipeline gives the message and the claim back; `sent_in_doubt` then tells whether a
request of ours may have changed CDP's side.

A delivery knows its collaborators only by the small Protocols below, so its logic is
tested with plain fakes (tests/test_delivery.py): the request gate (`gate.RequestGate`),
the outcome recorder (`outcomes.Recorder`), the CDP client (`cdp.CdpClient`) and a
`Policy` of numbers from the settings.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from .cdp import Outcome, Verdict
from .config import Settings
from .contact import Event
from .limits import BACKOFF_BASE, backoff_delay
from .observability import get_logger
from .sources import Message
from .state import Claim, ClaimStatus

log = get_logger("worker.delivery")

Contact = tuple[str, str]  # (contactRef, href)


# Answers to a write that say it changed nothing at CDP.
NOTHING_CHANGED = frozenset((Verdict.REJECTED, Verdict.NOT_FOUND, Verdict.AUTH, Verdict.RETRY))


class Step(enum.StrEnum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    LIST = "list"


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
        self,
        message: Message,
        event: Event,
        contact: Contact,
        outcome: str,
        *,
        fingerprint: str | None,
    ) -> None: ...

    async def deleted(self, message: Message, event: Event) -> None: ...

    async def dead(
        self,
        message: Message,
        event: Event,
        reason: str,
        detail: str | None,
        *,
        status: int | None,
        attempts: int,
        fingerprint: str | None,
    ) -> None: ...


class Client(Protocol):
    """The CDP calls a delivery makes."""

    async def create_contact(self, order_ref: str, body: Mapping[str, Any]) -> Outcome: ...

    async def update_contact(self, contact_ref: str, body: Mapping[str, Any]) -> Outcome: ...

    async def delete_contact(self, contact_ref: str) -> Outcome: ...

    async def list_contacts(self, order_ref: str) -> Outcome: ...


@dataclass(frozen=True, slots=True)
class Policy:
    """The numbers a delivery follows (DESIGN sections 3 and 6)."""

    max_attempts: int
    not_found_grace: float
    # First backoff step in seconds (DESIGN: 0.5); tests shrink it to run quickly.
    backoff_base: float = BACKOFF_BASE
    on_change: str = "update"  # --on-change: "ignore" never updates an existing contact
    verify_new: bool = False  # --verify-new: list before creating an order we never saw

    @classmethod
    def from_settings(cls, settings: Settings, *, backoff_base: float = BACKOFF_BASE) -> Policy:
        return cls(
            max_attempts=settings.max_attempts,
            not_found_grace=settings.not_found_grace,
            backoff_base=backoff_base,
            on_change=settings.on_change,
            verify_new=settings.verify_new,
        )


def _retry_reason(outcome: Outcome) -> str:
    """A low-cardinality label for the retries metric."""
    if outcome.status is None:
        return outcome.label  # timeout, connection
    if outcome.status >= 500:
        return "5xx"
    return outcome.label


class Delivery:
    """Delivers one claimed event. `run()` returns once the outcome is recorded and acked.

    `body` and `fingerprint` are the event's CDP body and its hash (None and the
    erasure's fingerprint for an erasure); `claim` is the state store's answer, one that
    holds the order (CREATE, UPDATE, DELETE or IN_DOUBT).
    """

    def __init__(
        self,
        message: Message,
        event: Event,
        *,
        body: Mapping[str, Any] | None,
        fingerprint: str,
        claim: Claim,
        gate: Gate,
        recorder: Recorder,
        client: Client,
        policy: Policy,
        claims: int,
    ) -> None:
        self.message = message
        self.event = event
        self.body = body
        self.fingerprint = fingerprint
        self.gate = gate
        self.recorder = recorder
        self.client = client
        self.policy = policy
        self.claims = claims
        known = (claim.contact_ref, claim.href or "") if claim.contact_ref else None
        self.contact: Contact | None = known  # the contact to update, or adopted
        self.doomed: list[Contact] = []  # contacts to delete before the outcome
        self.step = self._first_step(claim)
        self.reconciled = False  # the contact was found by a listing, not made or known
        # Whether CDP's side may differ from what the record said at the claim: a claim
        # given back then must leave the order in doubt. True from the moment a write
        # leaves, and it stays true once a write may have landed (only the recorded
        # outcome settles it), or a listing showed CDP's side is not the record's.
        self._writing = False
        self._changed = claim.status is ClaimStatus.IN_DOUBT
        self._from_nothing = claim.status is ClaimStatus.CREATE
        self.attempts = 0  # the event's own, counted toward max_attempts
        self._retries = 0  # every backoff, counted or not: how long the next one is
        self._answers_seen = gate.answers  # CDP's answers so far: did others get one since?
        self._not_found_since: float | None = None
        self._not_found_tries = 0

    def _first_step(self, claim: Claim) -> Step:
        status = claim.status
        if status is ClaimStatus.IN_DOUBT:
            return Step.LIST
        if status is ClaimStatus.DELETE:
            if self.contact is None:  # an erasure of an order we have no record of
                return Step.LIST
            self.doomed = [self.contact]
            return Step.DELETE
        if status is ClaimStatus.UPDATE:
            return Step.UPDATE
        if self.policy.verify_new and claim.previous is None:
            return Step.LIST  # the store never saw it: CDP may still hold its contact
        return Step.CREATE

    @property
    def sent_in_doubt(self) -> bool:
        return self._writing or self._changed

    async def run(self) -> None:
        while not await self._take_step():
            pass

    async def _take_step(self) -> bool:
        """One request of the current step; True once the event is finished."""
        if self.step is Step.LIST:
            return await self._list()
        if self.attempts >= self.policy.max_attempts or self.claims > self.policy.max_attempts:
            await self._dead("retries_exhausted", "gave up after the last attempt", None)
            return True
        self.attempts += 1
        structlog.contextvars.bind_contextvars(attempt=self.attempts)
        if self.step is Step.CREATE:
            return await self._create()
        if self.step is Step.UPDATE:
            return await self._update()
        return await self._delete()

    async def _send(self, call: Callable[[], Awaitable[Outcome]]) -> Outcome:
        """A request that changes CDP's side: in doubt from the moment it leaves (not
        while it waits its turn at the gate) until CDP's answer says what happened."""

        def sending() -> Awaitable[Outcome]:
            self._writing = True
            return call()

        try:
            outcome = await self.gate.request(self.event.order_ref, sending)
        except BaseException:
            self._changed = self._changed or self._writing  # it left: it may have landed
            raise
        finally:
            self._writing = False
        if outcome.verdict not in NOTHING_CHANGED:
            self._changed = True  # done (not recorded yet), a conflict, or in doubt
        return outcome

    # -- the steps ----------------------------------------------------------------------

    async def _create(self) -> bool:
        body = self.body
        assert body is not None  # an erasure never creates
        order_ref = self.event.order_ref
        outcome = await self._send(lambda: self.client.create_contact(order_ref, body))
        if outcome.verdict is Verdict.OK:
            created = (outcome.contact_ref or "", outcome.href or "")
            await self._done(created, "delivered", self.fingerprint)
            return True
        if outcome.verdict is Verdict.NOT_FOUND:
            return await self._not_found(outcome)
        if outcome.verdict in (Verdict.IN_DOUBT, Verdict.CONFLICT):
            self.step = Step.LIST  # it may exist: look before posting again
        return await self._failed(outcome)

    async def _update(self) -> bool:
        body, contact = self.body, self.contact
        assert body is not None
        assert contact is not None
        ref = contact[0]
        outcome = await self._send(lambda: self.client.update_contact(ref, body))
        if outcome.verdict is Verdict.OK:
            href = outcome.href or contact[1]
            settled = "reconciled" if self.reconciled else "updated"
            await self._done((outcome.contact_ref or ref, href), settled, self.fingerprint)
            return True
        if outcome.verdict in (Verdict.NOT_FOUND, Verdict.CONFLICT):
            # A 404: deleted at CDP meanwhile. Find out what is left, create it again if
            # nothing; the record no longer says what CDP holds. Counted and backed off,
            # so a CDP that keeps listing a contact it answers 404 for cannot loop us.
            log.info("cdp.contact_gone" if outcome.status == 404 else "cdp.conflict")
            self._changed = True
            self.step, self.contact = Step.LIST, None
        return await self._failed(outcome)  # in doubt: an update is simply sent again

    async def _delete(self) -> bool:
        ref = self.doomed[0][0]
        outcome = await self._send(lambda: self.client.delete_contact(ref))
        if outcome.verdict in (Verdict.OK, Verdict.NOT_FOUND):  # 404: gone already
            self.doomed.pop(0)
            self.attempts = 0  # each contact has its own attempts
            if self.doomed:
                return False
            if self.event.erasure:
                await self.recorder.deleted(self.message, self.event)
                return True
            return await self._after_listing_adopted()
        return await self._failed(outcome)

    async def _list(self) -> bool:
        """What CDP holds for the order; the next step follows from it."""
        order_ref = self.event.order_ref
        listing = await self.gate.request(order_ref, lambda: self.client.list_contacts(order_ref))
        if listing.verdict is not Verdict.OK:
            return await self._listing_failed(listing)
        found = list(listing.contacts)
        if self.event.erasure:
            self.doomed = found
            if not found:
                await self.recorder.deleted(self.message, self.event)
                return True
            self.step = Step.DELETE
            return False
        if not found:
            if self._from_nothing:
                self._changed = False  # CDP holds none, as the record said: nothing arrived
            self.step = Step.CREATE
            return False
        self.contact, self.doomed = found[0], found[1:]
        if self.doomed:
            # One contact per order: the others are duplicates (of an earlier failure,
            # or made outside this worker), deleted before the outcome is recorded.
            log.warning("cdp.several_contacts", count=len(found))
            self.step = Step.DELETE
            return False
        return await self._after_listing_adopted()

    async def _after_listing_adopted(self) -> bool:
        """The adopted contact is the order's only one: update it, or record it as is."""
        self.reconciled = True
        if self.policy.on_change == "update":
            self.step = Step.UPDATE
            return False
        # Under --on-change ignore it keeps what it holds, which is unknown.
        assert self.contact is not None
        await self._done(self.contact, "reconciled", None)
        return True

    # -- failures -----------------------------------------------------------------------

    async def _failed(self, outcome: Outcome) -> bool:
        """A request that did not do what was asked; True once the event is finished."""
        verdict = outcome.verdict
        if verdict is Verdict.REJECTED:
            await self._dead("cdp_rejected", outcome.message, outcome.status)
            return True
        if verdict is Verdict.AUTH:
            self.attempts -= 1  # the credentials' fault, not the event's
            self._auth_failed()
            return False
        if verdict is not Verdict.CONFLICT and not self._counts(outcome):
            self.attempts -= 1  # CDP's fault, not (surely) the event's
        # CDP's error text stays out of logs (it may quote the contact); the dead letter
        # keeps it if the event gives up.
        log.info("event.retry", status=outcome.status, reason=outcome.label, step=self.step.value)
        await self._backoff(outcome)
        return False

    async def _listing_failed(self, listing: Outcome) -> bool:
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
        """404 to a create: the order may not exist yet. Retry for the grace period, not
        counted."""
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

    async def _backoff(self, outcome: Outcome) -> None:
        self._retries += 1
        delay = backoff_delay(
            self._retries, retry_after=outcome.retry_after, base=self.policy.backoff_base
        )
        await self.gate.retry_in(delay, _retry_reason(outcome))

    async def _done(self, contact: Contact, outcome: str, fingerprint: str | None) -> None:
        """Record `done`: the contact holds the body of `fingerprint` (None: unknown)."""
        await self.recorder.done(
            self.message, self.event, contact, outcome, fingerprint=fingerprint
        )

    async def _dead(self, reason: str, detail: str | None, status: int | None) -> None:
        await self.recorder.dead(
            self.message,
            self.event,
            reason,
            detail,
            status=status,
            attempts=self.attempts,
            fingerprint=self.fingerprint,
        )
