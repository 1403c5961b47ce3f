"""The state store's rules, written once: how a record moves, and what each claim answers.

`Record` is one orderRef's row (the same columns in every backend). Each function takes
the record found (None: there is none) and returns the answer and the record to store
(None: delete it; the record passed in, unchanged: write nothing). The memory and sqlite
stores run these functions inside their lock or transaction (sqlite writes the outcome
of a claim it holds with one UPDATE, `finish` translated); the redis Lua scripts and
the postgres PL/pgSQL function are translations of them, line by line, and the contract
suite (`tests/state_contract.py`) holds all four to the same answers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from worker import versions
from worker.state.base import (
    CREATE,
    DEAD,
    DELETE,
    DELETED,
    DONE,
    IN_FLIGHT,
    RECONCILE,
    RECORDING,
    UPDATE,
    Claim,
    ClaimStatus,
    Finish,
    Record,
    Want,
    not_owner,
)
from worker.versions import Version


def _take(
    rec: Record | None, owner: str, now: float, lease: float, op: str, want: Want, attempts: int
) -> Record:
    """The record once `owner` holds it for `op`; what CDP confirmed stays."""
    # Built whole rather than by dataclasses.replace, here and in _finished: one of each
    # per event, and replace costs twice the construction it ends in.
    if rec is None:
        return Record(IN_FLIGHT, now, owner, now + lease, attempts, op)
    return Record(
        IN_FLIGHT, now, owner, now + lease, attempts, op,
        rec.contact_ref, rec.href, rec.fingerprint, rec.version, rec.reason,
    )  # fmt: skip


def _skip(rec: Record, status: ClaimStatus, want: Want, now: float) -> tuple[Claim, Record]:
    """Nothing to do at CDP; the record's version still moves forward to the event's."""
    claim = Claim(status, previous=rec.status, reason=rec.reason)
    moved = versions.forward(rec.version, want.version)
    if moved == rec.version:
        return claim, rec
    return claim, dataclasses.replace(rec, version=moved, updated_at=now)


def claim(
    rec: Record | None, owner: str, now: float, lease: float, want: Want
) -> tuple[Claim, Record | None]:
    """What a claim answers, and the record it leaves (see `StateStore.claim`)."""
    if rec is None:
        op = DELETE if want.op == DELETE else CREATE
        return Claim(ClaimStatus(op), attempts=1), _take(None, owner, now, lease, op, want, 1)
    if rec.status == IN_FLIGHT and rec.lease_until > now:
        return Claim(ClaimStatus.BUSY, previous=IN_FLIGHT), rec
    if versions.older(want.version, rec.version):
        return Claim(ClaimStatus.STALE, previous=rec.status, reason=rec.reason), rec
    if rec.status == IN_FLIGHT:
        # The lease ran out, or was given back after a send: the previous owner may
        # have changed CDP's side, and what the contact holds is unknown.
        return _in_doubt(rec, owner, now, lease, want, rec.attempts + 1)
    if rec.status == DONE:
        return _claim_done(rec, owner, now, lease, want)
    if rec.status == DELETED:
        if want.op == DELETE:
            return _skip(rec, ClaimStatus.DUPLICATE, want, now)
        return Claim(ClaimStatus.CREATE, attempts=1, previous=DELETED), _take(
            rec, owner, now, lease, CREATE, want, 1
        )
    # dead: worked again for other content (the producer fixed it), and an erasure is
    # always carried out, whatever was recorded before.
    if want.op != DELETE and (
        rec.fingerprint is None or want.fingerprint in (None, rec.fingerprint)
    ):
        return _skip(rec, ClaimStatus.DUPLICATE, want, now)
    return _in_doubt(rec, owner, now, lease, want, 1)


def _claim_done(
    rec: Record, owner: str, now: float, lease: float, want: Want
) -> tuple[Claim, Record | None]:
    if want.op == DELETE:
        claim = Claim(ClaimStatus.DELETE, 1, rec.contact_ref, rec.href, previous=DONE)
        return claim, _take(rec, owner, now, lease, DELETE, want, 1)
    if want.fingerprint is None or want.fingerprint == rec.fingerprint:
        return _skip(rec, ClaimStatus.DUPLICATE, want, now)
    if want.on_change == "ignore":
        # A record without a fingerprint may hold this very content: not a change.
        status = ClaimStatus.DUPLICATE if rec.fingerprint is None else ClaimStatus.CHANGED
        return _skip(rec, status, want, now)
    claim = Claim(ClaimStatus.UPDATE, 1, rec.contact_ref, rec.href, previous=DONE)
    return claim, _take(rec, owner, now, lease, UPDATE, want, 1)


def _in_doubt(
    rec: Record, owner: str, now: float, lease: float, want: Want, attempts: int
) -> tuple[Claim, Record]:
    claim = Claim(
        ClaimStatus.IN_DOUBT,
        attempts,
        rec.contact_ref,
        rec.href,
        previous=rec.status,
        reason=rec.reason,
    )
    return claim, _take(rec, owner, now, lease, RECONCILE, want, attempts)


def _owned(rec: Record | None, order_ref: str, owner: str, action: str) -> Record:
    if rec is None or rec.status != IN_FLIGHT or rec.owner != owner:
        raise not_owner(order_ref, owner, action)
    return rec


_KEEP: Any = object()  # a field of _finished left as the record has it


def _finished(
    rec: Record,
    status: str,
    now: float,
    version: Version | None = None,
    *,
    contact_ref: str | None = _KEEP,
    href: str | None = _KEEP,
    fingerprint: str | None = _KEEP,
    reason: str | None = _KEEP,
) -> Record:
    """The record finished as `status`, its version moved forward to `version`'s; the
    fields given replace the record's."""
    return Record(
        status, now, None, 0.0, rec.attempts, None,
        rec.contact_ref if contact_ref is _KEEP else contact_ref,
        rec.href if href is _KEEP else href,
        rec.fingerprint if fingerprint is _KEEP else fingerprint,
        versions.forward(rec.version, version),
        rec.reason if reason is _KEEP else reason,
    )  # fmt: skip


def complete(
    rec: Record | None,
    order_ref: str,
    owner: str,
    now: float,
    contact_ref: str,
    href: str,
    fingerprint: str | None,
    version: Version | None,
) -> Record:
    """`done`; raises NotOwner (see `StateStore.complete`)."""
    if (
        rec is not None
        and rec.status == DONE
        and (rec.contact_ref, rec.fingerprint) == (contact_ref, fingerprint)
    ):
        return rec  # a retried write that had landed
    held = _owned(rec, order_ref, owner, RECORDING[DONE])
    return _finished(
        held,
        DONE,
        now,
        contact_ref=contact_ref,
        href=href,
        fingerprint=fingerprint,
        version=version,
        reason=None,
    )


def mark_deleted(
    rec: Record | None, order_ref: str, owner: str, now: float, version: Version | None
) -> Record:
    """`deleted`; raises NotOwner (see `StateStore.mark_deleted`)."""
    if rec is not None and rec.status == DELETED:
        return rec
    held = _owned(rec, order_ref, owner, RECORDING[DELETED])
    return _finished(
        held,
        DELETED,
        now,
        contact_ref=None,
        href=None,
        fingerprint=None,
        version=version,
        reason=None,
    )


def fail(
    rec: Record | None,
    order_ref: str,
    owner: str,
    now: float,
    reason: str,
    fingerprint: str | None,
    version: Version | None,
) -> Record:
    """`dead`; raises NotOwner (see `StateStore.fail`)."""
    held = _owned(rec, order_ref, owner, RECORDING[DEAD])
    return _finished(
        held,
        DEAD,
        now,
        reason=reason,
        fingerprint=fingerprint,
        version=version,
    )


def finish(rec: Record | None, owner: str, now: float, outcome: Finish) -> Record:
    """`complete`, `mark_deleted` or `fail`, by the outcome's status."""
    ref, version = outcome.order_ref, outcome.version
    if outcome.status == DONE:
        contact_ref, href = outcome.contact_ref or "", outcome.href or ""
        return complete(rec, ref, owner, now, contact_ref, href, outcome.fingerprint, version)
    if outcome.status == DELETED:
        return mark_deleted(rec, ref, owner, now, version)
    return fail(rec, ref, owner, now, outcome.reason or "", outcome.fingerprint, version)


def forget(rec: Record | None, now: float) -> Record | None:
    """A dead record reopened (`worker dlq replay`), or None if it is not dead.

    Not removed: put in doubt, as if a claim had been abandoned, so the replayed event
    lists the order's contacts first. A contact may exist (a failed update, or a create
    that arrived before the event gave up); posting blindly could make a second one.
    """
    if rec is None or rec.status != DEAD:
        return None
    return dataclasses.replace(
        rec, status=IN_FLIGHT, owner=None, lease_until=0.0, attempts=0, op=RECONCILE,
        reason=None, updated_at=now,
    )  # fmt: skip


def renew(rec: Record | None, owner: str, now: float, lease: float) -> Record | None:
    """The record with its lease extended, or None if `owner` does not hold it."""
    if rec is None or rec.status != IN_FLIGHT or rec.owner != owner:
        return None
    return dataclasses.replace(rec, lease_until=now + lease, updated_at=now)


def release(rec: Record | None, owner: str, now: float, *, sent: bool) -> Record | None:
    """The record once a claim is given back (see `StateStore.release`); a record the
    owner does not hold is returned unchanged."""
    if rec is None or rec.status != IN_FLIGHT or rec.owner != owner:
        return rec
    if sent or rec.op == RECONCILE:
        return dataclasses.replace(rec, lease_until=0.0, updated_at=now)
    if rec.op == CREATE:
        if rec.version is None:
            return None  # as if never claimed
        return _finished(rec, DELETED, now)  # the tombstone it was claimed over
    if rec.contact_ref is None:  # an erasure of an order we had no record of
        return None
    return _finished(rec, DONE, now)  # an UPDATE or DELETE of a done record, not sent
