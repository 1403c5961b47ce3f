"""The state store contract: one record per orderRef, atomic in every backend.

A record is `in_flight(owner, lease_until, attempts, op)` while a worker holds the order,
and otherwise `done(contact_ref, href, fingerprint, version)`, `deleted(version)` or
`dead(reason, fingerprint)` (DESIGN section 4). The pipeline claims an orderRef with what
its event wants (`Want`: the body's fingerprint, the version, upsert or delete); the
answer (`Claim`) says what to do at CDP: create, update, delete, nothing (duplicate,
stale, changed but ignored), later (busy), or look first (in doubt). It renews the lease
while it works, and records the outcome before it acks.

The rules are written once, in Python, in `rules.py` (memory and sqlite run them); redis
(Lua) and postgres (PL/pgSQL) carry a translation, and one contract suite,
`tests/state_contract.py`, holds all four to the same answers.
"""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

# The envelope's ops, re-exported: the backends and their tests speak of them here.
from worker.contact import DELETE as DELETE
from worker.contact import DELETE_FINGERPRINT as DELETE_FINGERPRINT
from worker.contact import UPSERT as UPSERT
from worker.errors import NotOwner
from worker.versions import Version

# A record's status, as every backend stores it.
IN_FLIGHT = "in_flight"
DONE = "done"
DELETED = "deleted"
DEAD = "dead"
FINISHED = (DONE, DELETED, DEAD)  # swept after the retention

# What an in-flight record's owner is doing, as stored (`op`): it tells `release` what
# the record was before the claim. DELETE is also the envelope's erasure, whose other op
# is UPSERT.
CREATE, UPDATE, RECONCILE = "create", "update", "reconcile"
# --on-change: update a changed contact, or leave it as first created.
ON_CHANGE = ("update", "ignore")


class ClaimStatus(enum.StrEnum):
    CREATE = "create"  # the caller holds the order: POST its contact
    UPDATE = "update"  # the caller holds it: replace contact_ref's body with the event's
    DELETE = "delete"  # the caller holds it: delete contact_ref (None: list and delete all)
    DUPLICATE = "duplicate"  # finished with this content before: skip, ack
    STALE = "stale"  # the record holds a newer version: skip, ack
    CHANGED = "changed"  # the content changed but --on-change ignore: skip, ack
    BUSY = "busy"  # another owner holds a live lease: retry later, do not ack
    IN_DOUBT = "in_doubt"  # the caller holds it, but CDP's side is unknown: list first


# The answers under which the caller holds the order (and must finish or release it).
HELD = frozenset((ClaimStatus.CREATE, ClaimStatus.UPDATE, ClaimStatus.DELETE, ClaimStatus.IN_DOUBT))


@dataclass(frozen=True, slots=True)
class Want:
    """What an event asks of its order: the claim's question.

    `fingerprint`: of the CDP body the event would send (`DELETE_FINGERPRINT` for an
    erasure; None: unknown, which never counts as a change). `version`: the event's, or
    None (it applies in the order worked). `op`: UPSERT or DELETE. `on_change`: "update"
    or "ignore" (`--on-change`).
    """

    fingerprint: str | None = None
    version: Version | None = None
    op: str = UPSERT
    on_change: str = "update"


# The default question: an upsert whose content is unknown (a done record is a duplicate).
ANY_UPSERT = Want()


@dataclass(frozen=True, slots=True)
class Record:
    """One orderRef's row, the same columns in every backend (`COLUMNS`).

    While in flight, `contact_ref`, `href`, `fingerprint` and `version` still describe what
    CDP confirmed before the claim, so that `release` can put them back.
    """

    status: str
    updated_at: float
    owner: str | None = None
    lease_until: float = 0.0
    attempts: int = 0
    op: str | None = None
    contact_ref: str | None = None
    href: str | None = None
    fingerprint: str | None = None
    version: Version | None = None
    reason: str | None = None

    @classmethod
    def from_columns(cls, row: Sequence[Any]) -> Record:
        """A record from its stored columns, in `COLUMNS` order (strings from redis, typed
        values from sql; None or "" for a column with nothing)."""
        status, updated_at, owner, lease_until, attempts, op, ref, href, fp, kind, version, why = (
            row
        )
        return cls(
            str(status),
            float(updated_at or 0.0),
            owner or None,
            float(lease_until or 0.0),
            int(attempts or 0),
            op or None,
            ref or None,
            href or None,
            fp or None,
            Version(kind, int(version)) if kind else None,
            why or None,
        )


@dataclass(frozen=True, slots=True)
class Finish:
    """An outcome to record (`record_many`): DONE with the contact CDP holds and the
    fingerprint of its body, DELETED, or DEAD with its reason (the contact is kept)."""

    order_ref: str
    status: str  # DONE, DELETED or DEAD
    contact_ref: str | None = None
    href: str | None = None
    fingerprint: str | None = None
    version: Version | None = None
    reason: str | None = None


# A record's stored columns (redis: hash fields), in `Record.from_columns` order.
COLUMNS = (
    "status", "updated_at", "owner", "lease_until", "attempts", "op", "contact_ref", "href",
    "fingerprint", "version_kind", "version", "reason",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Claim:
    """The answer to `claim`.

    `attempts` counts the claims of this order's current operation, this one included
    (0 unless the caller holds it): a poison event that kills its worker every time is
    caught by it. `contact_ref`/`href`: the contact the record knows (UPDATE, DELETE,
    IN_DOUBT; None when it knows none). `previous`: the record's status before the
    claim (None: no record), for the skipped event's log line. `reason`: a dead
    record's.
    """

    status: ClaimStatus
    attempts: int = 0
    contact_ref: str | None = None
    href: str | None = None
    previous: str | None = None
    reason: str | None = None

    @property
    def held(self) -> bool:
        return self.status in HELD


def not_owner(order_ref: str, owner: str, action: str) -> NotOwner:
    """What completing, failing... an order one does not hold raises, in every backend."""
    return NotOwner(f"cannot {action} order {order_ref!r}: {owner!r} does not hold it")


def check_distinct(order_refs: Sequence[str], operation: str) -> None:
    """The precondition of `claim_many` and `record_many`: no orderRef twice in one batch."""
    if len(set(order_refs)) != len(order_refs):
        raise ValueError(f"{operation}: an orderRef appears twice in one batch")


# What an owner that does not hold the order cannot do, by the outcome recorded.
RECORDING = {DONE: "complete", DELETED: "record the deletion of", DEAD: "fail"}


def refused(finish: Finish, owner: str) -> NotOwner:
    """The NotOwner of recording `finish` for an order `owner` does not hold."""
    return not_owner(finish.order_ref, owner, RECORDING[finish.status])


def now() -> float:
    """Wall-clock seconds: leases and retention are compared across processes and hosts."""
    return time.time()


class StateStore(ABC):
    """Idempotency by orderRef. All methods are coroutines and atomic.

    When `claim`'s answer holds the order (`Claim.held`) the caller owns the record (`owner`) until
    `lease_until`; only the owner may renew, complete, fail or release it. A lease that
    runs out makes the next `claim` by anyone return IN_DOUBT and transfer ownership.
    Until that happens the owner still holds the record: renew/complete/fail/release by the
    owner succeed after its lease ran out, as long as nobody claimed it meanwhile.
    """

    #: True for a store that groups concurrent operations into one commit itself
    #: (sqlite's writer thread, memory's lock): a caller may send it outcomes one by
    #: one. False: each call is a round trip, and callers batch with `record_many`.
    groups_writes: ClassVar[bool] = False

    @abstractmethod
    async def open(self) -> None:
        """Connect, create tables, sweep old records. Called once before use.

        The sweep is `sweep(retention)` with the retention the store was constructed with
        (none: no sweep); in_flight records are never swept, however old.
        """

    @abstractmethod
    async def close(self) -> None:
        """Flush pending writes and disconnect. Idempotent."""

    @abstractmethod
    async def claim(
        self, order_ref: str, owner: str, lease_seconds: float, want: Want = ANY_UPSERT
    ) -> Claim:
        """Take the orderRef for `owner` for `lease_seconds` to do what `want` needs, or
        say why not. The rules (`rules.claim`), by the record found:

        - none: CREATE (DELETE without a contact_ref for an erasure).
        - done: STALE if the event is older; DELETE for an erasure; DUPLICATE for the
          same fingerprint (or an unknown one); for another, or a record that has none
          (written before fingerprints), UPDATE, or CHANGED under on_change "ignore"
          (which leaves a record without a fingerprint a DUPLICATE).
        - deleted: STALE if older; DUPLICATE for an erasure; CREATE otherwise.
        - dead: STALE if older; IN_DOUBT for an erasure (always carried out) and for
          another fingerprint (the producer fixed it; what CDP holds is unknown: a
          create may have arrived before it gave up); DUPLICATE otherwise, and for a
          record without a fingerprint.
        - in_flight with a live lease (of anyone, the caller too): BUSY.
        - in_flight whose lease ran out, or that was released after a send: STALE if
          older than the record's version; otherwise IN_DOUBT (owner becomes `owner`).

        DUPLICATE, STALE and CHANGED move the record's version forward to the event's
        (A v1, A v3, then B v2: B is stale). Versions of another kind, or missing, are
        never older. A held answer counts an attempt.
        """

    @abstractmethod
    async def claim_many(
        self, wants: Sequence[tuple[str, Want]], owner: str, lease_seconds: float
    ) -> list[Claim]:
        """`claim` of each (order_ref, want), in one store operation where the backend can
        (one transaction, script round trip or statement): the answers, in order.

        The orderRefs must be distinct (ValueError otherwise): the pipeline claims the
        first event of each order in a fetched batch this way, and the others after it.
        Each claim is atomic on its own, as `claim`; the batch is not atomic as a whole:
        a failure (StateError) may leave some of them claimed: the caller gives those
        back (`release`, which is a no-op where it holds nothing).
        """

    @abstractmethod
    async def renew(self, order_ref: str, owner: str, lease_seconds: float) -> bool:
        """Extend the lease to now + lease_seconds.

        False if `owner` no longer holds it (another owner took it over, or it is done,
        dead, released or unknown).
        """

    @abstractmethod
    async def record_many(self, owner: str, finishes: Sequence[Finish]) -> list[NotOwner | None]:
        """Record each outcome as `complete`, `mark_deleted` or `fail` would (by its
        status), all in one store operation where the backend can (one transaction,
        pipeline or statement): durable when this returns. Each has its own answer: None
        (recorded), or the NotOwner its own method would raise. The orderRefs must be
        distinct. After a StateError some may have been recorded (a pipeline is no
        transaction): recording them again is harmless, but for `fail`, whose NotOwner then
        only means the order was finished already.
        """

    async def complete(
        self,
        order_ref: str,
        owner: str,
        contact_ref: str,
        href: str,
        *,
        fingerprint: str | None = None,
        version: Version | None = None,
    ) -> None:
        """Record `done`: CDP's contact `contact_ref` holds the body of `fingerprint`.

        Durable when this returns. The record's version moves to `version` (unless None).
        Raises NotOwner unless `owner` holds it; completing a done record again with the
        same contact and fingerprint is harmless (a retried write that had landed).
        """
        await self.record_one(
            owner, Finish(order_ref, DONE, contact_ref, href, fingerprint, version)
        )

    async def mark_deleted(
        self, order_ref: str, owner: str, *, version: Version | None = None
    ) -> None:
        """Record `deleted` (a tombstone: an older event is stale, a newer one creates).

        Durable when this returns. Raises NotOwner unless `owner` holds it, or the record
        is deleted already.
        """
        await self.record_one(owner, Finish(order_ref, DELETED, version=version))

    async def fail(
        self,
        order_ref: str,
        owner: str,
        reason: str,
        *,
        fingerprint: str | None = None,
        version: Version | None = None,
    ) -> None:
        """Record `dead(reason)` for the event of `fingerprint`; the contact the record
        knew (if any) is kept. Durable when this returns. Raises NotOwner unless `owner`
        holds it.
        """
        finish = Finish(order_ref, DEAD, fingerprint=fingerprint, version=version, reason=reason)
        await self.record_one(owner, finish)

    async def record_one(self, owner: str, finish: Finish) -> None:
        """One outcome (`record_many` of one); NotOwner unless `owner` holds the order."""
        (refused,) = await self.record_many(owner, [finish])
        if refused is not None:
            raise refused

    @abstractmethod
    async def release(self, order_ref: str, owner: str, *, sent: bool) -> None:
        """Give the claim back without an outcome (shutdown, or busy retried elsewhere).

        sent=True: a request's fate is unknown, the lease is expired now (next claim:
        IN_DOUBT). sent=False: nothing of this owner's reached CDP, so the record is what
        it was before the claim: none again after a CREATE from nothing, deleted after one
        over a tombstone, done after an UPDATE or a DELETE of a known contact; a claim
        that was IN_DOUBT stays in doubt. A no-op if `owner` does not hold it.
        """

    @abstractmethod
    async def forget(self, order_ref: str) -> bool:
        """Reopen a `dead` record so the order is worked again (`worker dlq replay`).

        It is put in doubt (the next claim is IN_DOUBT, and lists the order's contacts
        first), not removed: a contact may exist at CDP. True if a dead record was
        reopened; False (and nothing changes) for a done, deleted, in-flight or missing
        one: a contact that exists, or a delivery under way, is never reopened.
        """

    @abstractmethod
    async def lookup(self, order_ref: str) -> Record | None:
        """The order's record as stored, or None: read only, nothing is taken or changed
        (`worker inspect`). A record past its retention may be gone already."""

    @abstractmethod
    async def get_checkpoint(self, key: str) -> str | None:
        """A source's saved position (e.g. the file source's acked byte offset), or None."""

    @abstractmethod
    async def set_checkpoint(self, key: str, value: str, *, urgent: bool = False) -> None:
        """Save a source's position. Durable when this returns.

        A store that groups its writes may hold a checkpoint back to share a later commit
        (an older one only makes a restart read a few lines again); `urgent` (a source
        closing, or switching files) has it written at once."""

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the records live, for the start-up log line: an absolute path for a
        file, host, port and namespace for a server; never a password."""

    @abstractmethod
    async def is_empty(self) -> bool:
        """True if the store holds no record of any order (a new or a lost store)."""

    @abstractmethod
    async def sweep(self, retention_seconds: float) -> int:
        """Delete done, deleted and dead records older than retention; return how many went."""
