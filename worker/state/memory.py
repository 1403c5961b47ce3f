"""`memory:` state store: a dict behind one asyncio.Lock, for tests and `worker demo`.

Nothing survives the process. It runs the rules of `rules.py` directly, so it is also
the readable reference for what the other stores do in SQL and Lua.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from worker.errors import NotOwner, StateError
from worker.state import base, rules
from worker.state.base import ANY_UPSERT, FINISHED, Claim, Finish, Record, StateStore, Want


class MemoryStateStore(StateStore):
    """In-process state store.

    `retention_seconds`: finished records older than this are swept by `open()`;
    None sweeps nothing there (callers can still call `sweep`).
    """

    groups_writes = True  # no I/O: one call costs what one more in a batch would

    def __init__(self, *, retention_seconds: float | None = None) -> None:
        self._retention = retention_seconds
        self._orders: dict[str, Record] = {}
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

    def _store(self, order_ref: str, rec: Record | None) -> None:
        if rec is None:
            self._orders.pop(order_ref, None)
        else:
            self._orders[order_ref] = rec

    async def lookup(self, order_ref: str) -> Record | None:
        self._check_open()
        return self._orders.get(order_ref)

    async def claim(
        self, order_ref: str, owner: str, lease_seconds: float, want: Want = ANY_UPSERT
    ) -> Claim:
        return (await self.claim_many([(order_ref, want)], owner, lease_seconds))[0]

    async def claim_many(
        self, wants: Sequence[tuple[str, Want]], owner: str, lease_seconds: float
    ) -> list[Claim]:
        self._check_open()
        base.check_distinct([ref for ref, _ in wants], "claim_many")
        async with self._lock:
            t = base.now()
            answers = []
            for order_ref, want in wants:
                answer, rec = rules.claim(
                    self._orders.get(order_ref), owner, t, lease_seconds, want
                )
                self._store(order_ref, rec)
                answers.append(answer)
            return answers

    async def renew(self, order_ref: str, owner: str, lease_seconds: float) -> bool:
        self._check_open()
        async with self._lock:
            t = base.now()
            renewed = rules.renew(self._orders.get(order_ref), owner, t, lease_seconds)
            if renewed is None:
                return False
            self._orders[order_ref] = renewed
            return True

    async def _change(
        self, order_ref: str, change: Callable[[Record | None, float], Record | None]
    ) -> None:
        """Apply one of `rules`' transitions to the order's record, atomically."""
        self._check_open()
        async with self._lock:
            self._store(order_ref, change(self._orders.get(order_ref), base.now()))

    async def record_many(self, owner: str, finishes: Sequence[Finish]) -> list[NotOwner | None]:
        self._check_open()
        base.check_distinct([finish.order_ref for finish in finishes], "record_many")
        async with self._lock:
            t = base.now()
            answers: list[NotOwner | None] = []
            for finish in finishes:
                ref = finish.order_ref
                try:
                    self._store(ref, rules.finish(self._orders.get(ref), owner, t, finish))
                except NotOwner as refused:
                    answers.append(refused)
                else:
                    answers.append(None)
            return answers

    async def release(self, order_ref: str, owner: str, *, sent: bool) -> None:
        await self._change(order_ref, lambda rec, now: rules.release(rec, owner, now, sent=sent))

    async def forget(self, order_ref: str) -> bool:
        self._check_open()
        async with self._lock:
            reopened = rules.forget(self._orders.get(order_ref), base.now())
            if reopened is None:
                return False
            self._orders[order_ref] = reopened
            return True

    async def get_checkpoint(self, key: str) -> str | None:
        self._check_open()
        return self._checkpoints.get(key)

    async def set_checkpoint(self, key: str, value: str, *, urgent: bool = False) -> None:
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
                if rec.status in FINISHED and rec.updated_at < cutoff
            ]
            for ref in old:
                del self._orders[ref]
            return len(old)
