"""`memory:` state store: dicts behind one asyncio.Lock, for tests and `worker demo`.

Nothing survives the process. It follows the contract of `base.StateStore` exactly, so
it is also the readable reference for what the sqlite store does in SQL.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from worker.errors import StateError
from worker.state import base
from worker.state.base import DEAD, DONE, IN_FLIGHT, Claim, ClaimStatus, StateStore, not_owner


@dataclass(slots=True)
class _Record:
    """One orderRef's row; the same columns as the sqlite `orders` table."""

    status: str
    owner: str | None
    lease_until: float
    attempts: int
    updated_at: float
    contact_ref: str | None = None
    href: str | None = None
    reason: str | None = None


class MemoryStateStore(StateStore):
    """In-process state store.

    `retention_seconds`: done/dead records older than this are swept by `open()`;
    None sweeps nothing there (callers can still call `sweep`).
    """

    def __init__(self, *, retention_seconds: float | None = None) -> None:
        self._retention = retention_seconds
        self._orders: dict[str, _Record] = {}
        self._checkpoints: dict[str, str] = {}
        # Every method body is free of awaits, so the event loop alone would make it atomic;
        # the lock keeps that true if one ever gains an await (and documents the intent).
        self._lock = asyncio.Lock()
        self._opened = False
        self._closed = False

    async def open(self) -> None:
        if self._opened:
            raise StateError("state store opened twice")
        self._opened = True
        if self._retention is not None:
            await self.sweep(self._retention)

    async def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if not self._opened or self._closed:
            raise StateError("state store is not open")

    async def claim(self, order_ref: str, owner: str, lease_seconds: float) -> Claim:
        self._check_open()
        async with self._lock:
            t = base.now()
            rec = self._orders.get(order_ref)
            if rec is None:
                self._orders[order_ref] = _Record(IN_FLIGHT, owner, t + lease_seconds, 1, t)
                return Claim(ClaimStatus.CLAIMED, attempts=1)
            if rec.status == DONE:
                return Claim(ClaimStatus.DONE, contact_ref=rec.contact_ref, href=rec.href)
            if rec.status == DEAD:
                return Claim(ClaimStatus.DEAD, reason=rec.reason)
            if rec.lease_until > t:
                return Claim(ClaimStatus.BUSY)
            # Lease ran out (or was given back after a send): the previous owner may have
            # POSTed, so the new owner must reconcile before sending.
            rec.owner = owner
            rec.lease_until = t + lease_seconds
            rec.attempts += 1
            rec.updated_at = t
            return Claim(ClaimStatus.IN_DOUBT, attempts=rec.attempts)

    async def renew(self, order_ref: str, owner: str, lease_seconds: float) -> bool:
        self._check_open()
        async with self._lock:
            rec = self._orders.get(order_ref)
            if rec is None or rec.status != IN_FLIGHT or rec.owner != owner:
                return False
            t = base.now()
            rec.lease_until = t + lease_seconds
            rec.updated_at = t
            return True

    def _owned(self, order_ref: str, owner: str, action: str) -> _Record:
        rec = self._orders.get(order_ref)
        if rec is None or rec.status != IN_FLIGHT or rec.owner != owner:
            raise not_owner(order_ref, owner, action)
        return rec

    async def complete(self, order_ref: str, owner: str, contact_ref: str, href: str) -> None:
        self._check_open()
        async with self._lock:
            current = self._orders.get(order_ref)
            if current is not None and current.status == DONE:
                return  # the first contact stays: it is the one CDP holds
            rec = self._owned(order_ref, owner, "complete")
            rec.status = DONE
            rec.contact_ref = contact_ref
            rec.href = href
            rec.lease_until = 0.0
            rec.updated_at = base.now()

    async def fail(self, order_ref: str, owner: str, reason: str) -> None:
        self._check_open()
        async with self._lock:
            rec = self._owned(order_ref, owner, "fail")
            rec.status = DEAD
            rec.reason = reason
            rec.lease_until = 0.0
            rec.updated_at = base.now()

    async def release(self, order_ref: str, owner: str, *, sent: bool) -> None:
        self._check_open()
        async with self._lock:
            rec = self._orders.get(order_ref)
            if rec is None or rec.status != IN_FLIGHT or rec.owner != owner:
                return
            if sent:
                rec.lease_until = 0.0
                rec.updated_at = base.now()
            else:
                del self._orders[order_ref]

    async def forget(self, order_ref: str) -> bool:
        self._check_open()
        async with self._lock:
            rec = self._orders.get(order_ref)
            if rec is None or rec.status != DEAD:
                return False
            del self._orders[order_ref]
            return True

    async def get_checkpoint(self, key: str) -> str | None:
        self._check_open()
        return self._checkpoints.get(key)

    async def set_checkpoint(self, key: str, value: str) -> None:
        self._check_open()
        self._checkpoints[key] = value

    @property
    def location(self) -> str:
        return "memory (this process only)"

    async def is_empty(self) -> bool:
        self._check_open()
        return not self._orders

    async def sweep(self, retention_seconds: float) -> int:
        self._check_open()
        async with self._lock:
            cutoff = base.now() - retention_seconds
            old = [
                ref
                for ref, rec in self._orders.items()
                if rec.status in (DONE, DEAD) and rec.updated_at < cutoff
            ]
            for ref in old:
                del self._orders[ref]
            return len(old)
