"""The claims this worker holds: their leases kept alive, and checked before each request.

A claim in the state store is a lease (DESIGN section 4): another replica may take the
order over once it runs out. While an event is worked, `renew_forever` extends the lease
every third of its length and holds the message at the source (so the transport does
not redeliver it elsewhere either); before each request the gate calls `ensure`, so that
nothing is sent for an order whose lease might end mid-request.

It also keeps the ledger of claims not yet given back: every order a claim of ours may
hold, from the moment the claim is asked for until its outcome is recorded or it is
given back. A drain that cancels a task before it could give its claim back leaves the
order there, and `release_outstanding` gives it back after the drain: a stop leaves no
order busy for a whole lease.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from .errors import LeaseLost
from .observability import get_logger
from .sources import Message, Source
from .state import StateStore

log = get_logger("worker.leases")

# A request is sent only if our lease outlasts its timeout by this much (seconds).
LEASE_MARGIN = 1.0


class Leases:
    """Orders claimed by `owner`, with the monotonic time each lease runs out."""

    def __init__(
        self,
        state: StateStore,
        source: Source,
        *,
        owner: str,
        lease_seconds: float,
        request_timeout: float,
    ) -> None:
        self._state = state
        self._source = source
        self.owner = owner
        self.lease_seconds = lease_seconds
        self._needed = request_timeout + LEASE_MARGIN
        self._held: dict[str, Message] = {}  # orderRef -> the message being worked
        self._until: dict[str, float] = {}  # orderRef -> monotonic end of our lease
        self._outstanding: set[str] = set()  # orderRefs a claim of ours may hold

    def claiming(self, order_refs: Iterable[str]) -> None:
        """A claim of these orders is about to be asked for: from now on it may be ours,
        even if its answer never arrives."""
        self._outstanding.update(order_refs)

    def settled(self, order_ref: str) -> None:
        """The claim of `order_ref` is over: not won, its outcome recorded, or left to
        the worker that took the order over."""
        self._outstanding.discard(order_ref)

    def hold(self, order_ref: str, message: Message, claimed_at: float) -> None:
        """A claim was just won (at `claimed_at`, monotonic): keep it alive from now on."""
        self._held[order_ref] = message
        self._until[order_ref] = claimed_at + self.lease_seconds

    def drop(self, order_ref: str) -> None:
        """The event of `order_ref` is finished or given back: stop renewing it."""
        self._held.pop(order_ref, None)
        self._until.pop(order_ref, None)

    async def ensure(self, order_ref: str) -> None:
        """Return if our lease outlasts one request, renewing it first if need be.

        Raises LeaseLost when it cannot be renewed: another worker may own the order now.
        """
        until = self._until.get(order_ref)
        if until is None or until - time.monotonic() >= self._needed:
            return  # not a claim of ours (nothing to protect), or long enough
        try:
            renewed = await self._state.renew(order_ref, self.owner, self.lease_seconds)
        except Exception:
            log.warning("state.renew_failed", exc_info=True)
            renewed = False
        if not renewed:
            raise LeaseLost
        self._until[order_ref] = time.monotonic() + self.lease_seconds

    async def renew_forever(self) -> None:
        """Keep our claims' leases, and the messages behind them, from running out."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            for order_ref, message in list(self._held.items()):
                renewed_at = time.monotonic()
                try:
                    renewed = await self._state.renew(order_ref, self.owner, self.lease_seconds)
                    if self._held.get(order_ref) is not message:
                        continue  # finished while we renewed: nothing to keep
                    if renewed:
                        self._until[order_ref] = renewed_at + self.lease_seconds
                    else:
                        log.warning("state.lease_lost", order_ref=order_ref)
                        self._until[order_ref] = 0.0  # the next request stops
                    await self._source.hold(message)
                except Exception:
                    log.exception("state.renew_failed", order_ref=order_ref)

    async def release(self, order_ref: str, *, sent: bool) -> None:
        """Give the claim back (shutdown, or a failure): whatever fails, the lease runs out.

        It is dropped first, so that the renewer cannot extend a lease given back.
        """
        self.drop(order_ref)
        try:
            await self._state.release(order_ref, self.owner, sent=sent)
        except Exception as exc:  # noqa: BLE001 - the lease runs out on its own
            log.warning("state.release_failed", error=str(exc))
        self.settled(order_ref)  # not reached if cancelled: release_outstanding does it

    async def release_outstanding(self) -> int:
        """Give back every claim still outstanding once the work is over; how many.

        Only a cancellation leaves one: of a task that had not started, or that was
        giving its claim back. Whether a request of it left is not known here, so each
        is given back in doubt (the next claim lists the order's contacts first). A
        claim that is not ours any more is left as it is (release is a no-op for it).
        """
        left = list(self._outstanding)
        await asyncio.gather(*(self.release(order_ref, sent=True) for order_ref in left))
        return len(left)
