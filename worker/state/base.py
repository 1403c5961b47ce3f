"""The state store contract: one record per orderRef, atomic in every backend.

A record moves `in_flight(owner, lease_until, attempts)` -> `done(contact_ref, href, at)` or
`dead(reason, at)` (DESIGN section 4). The pipeline claims an orderRef before it sends
anything, renews the lease while it works, and records the outcome before it acks.

Backends: memory (tests), sqlite (default, group commits), and later redis and postgres.
Every backend passes the same contract suite, `tests/state_contract.py`.
"""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

from worker.errors import NotOwner

# A record's status, as every backend stores it.
IN_FLIGHT = "in_flight"
DONE = "done"
DEAD = "dead"


class ClaimStatus(enum.StrEnum):
    CLAIMED = "claimed"  # the caller now owns the orderRef: go
    DONE = "done"  # a contact was already created: skip, ack, count as duplicate
    DEAD = "dead"  # already dead-lettered: skip, ack, count as duplicate
    BUSY = "busy"  # another owner holds a live lease: retry later, do not ack
    IN_DOUBT = "in_doubt"  # an earlier lease ran out or was given back after a send: reconcile


@dataclass(frozen=True, slots=True)
class Claim:
    """The answer to `claim`.

    `attempts` counts claims of this orderRef so far, this one included (for CLAIMED and
    IN_DOUBT; 0 for the other statuses): a poison event that kills its worker every time
    is caught by it. For DONE, `contact_ref`/`href` are set; for DEAD, `reason`.
    """

    status: ClaimStatus
    attempts: int = 0
    contact_ref: str | None = None
    href: str | None = None
    reason: str | None = None


def not_owner(order_ref: str, owner: str, action: str) -> NotOwner:
    """What completing, failing... an order one does not hold raises, in every backend."""
    return NotOwner(f"cannot {action} order {order_ref!r}: {owner!r} does not hold it")


def now() -> float:
    """Wall-clock seconds: leases and retention are compared across processes and hosts."""
    return time.time()


class StateStore(ABC):
    """Idempotency by orderRef. All methods are coroutines and atomic.

    When `claim` returns CLAIMED or IN_DOUBT the caller owns the record (`owner`) until
    `lease_until`; only the owner may renew, complete, fail or release it. A lease that
    runs out makes the next `claim` by anyone return IN_DOUBT and transfer ownership.
    Until that happens the owner still holds the record: renew/complete/fail/release by the
    owner succeed after its lease ran out, as long as nobody claimed it meanwhile.
    """

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
    async def claim(self, order_ref: str, owner: str, lease_seconds: float) -> Claim:
        """Take the orderRef for `owner` for `lease_seconds`, or say why not.

        No record -> CLAIMED (attempts=1). in_flight with a live lease of another owner ->
        BUSY. in_flight whose lease ran out, or that was released with `sent=True`, ->
        IN_DOUBT (owner becomes `owner`, attempts+1). done -> DONE. dead -> DEAD.
        in_flight held by the same owner with a live lease -> BUSY as well: the pipeline
        serialises events of one orderRef itself, so a re-claim by the same owner is a bug
        or a duplicate in flight.
        """

    @abstractmethod
    async def renew(self, order_ref: str, owner: str, lease_seconds: float) -> bool:
        """Extend the lease to now + lease_seconds.

        False if `owner` no longer holds it (another owner took it over, or it is done,
        dead, released or unknown).
        """

    @abstractmethod
    async def complete(self, order_ref: str, owner: str, contact_ref: str, href: str) -> None:
        """Record `done`. Durable when this returns. Raises StateError if not the owner.

        A record already done keeps its first contact (completing twice is harmless, whoever
        calls it). A dead record is not owned: completing it raises StateError.
        """

    @abstractmethod
    async def fail(self, order_ref: str, owner: str, reason: str) -> None:
        """Record `dead(reason)`. Durable when this returns. Raises StateError if not the owner.

        A done or dead record is not owned: failing it raises StateError (done stays done).
        """

    @abstractmethod
    async def release(self, order_ref: str, owner: str, *, sent: bool) -> None:
        """Give the claim back without an outcome (shutdown, or busy retried elsewhere).

        sent=False: nothing reached CDP, the record is removed (next claim: CLAIMED).
        sent=True: a POST's fate is unknown, the lease is expired now (next claim: IN_DOUBT).
        A no-op if `owner` does not hold it.
        """

    @abstractmethod
    async def forget(self, order_ref: str) -> bool:
        """Remove a `dead` record so the order is worked again (`worker dlq replay`).

        True if a dead record went; False (and nothing changes) for a done, in-flight or
        missing one: a contact that exists, or a delivery under way, is never reopened.
        """

    @abstractmethod
    async def get_checkpoint(self, key: str) -> str | None:
        """A source's saved position (e.g. the file source's acked byte offset), or None."""

    @abstractmethod
    async def set_checkpoint(self, key: str, value: str) -> None:
        """Save a source's position. Durable when this returns."""

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
        """Delete done/dead records older than retention; return how many went."""
