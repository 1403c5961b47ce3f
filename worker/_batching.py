"""Group commit: what many callers ask for at about the same time, done in one round.

Acks to a broker, a file source's checkpoint, dead letters to a file, operations on the
SQLite file: each caller wants "done and durable when I return", and one round trip,
write or fsync per caller would cost far more than one per burst. `Batcher.submit(item)`
queues the item and waits; a single flusher task takes everything queued, hands it to
`flush` as one list, and settles every caller with its own result. Items that arrive
while a flush is under way go together in the next one, so the batches grow by
themselves with the load.

With a window, a batch may also wait for company before it goes (the SQLite store's
commits: one costs about five operations in it): for as long as the window, less when
company keeps coming, and only where waiting has been finding company lately.

The flusher is a task of its own: a cancelled caller must not abandon the items of the
others riding on the same flush (they would wait for ever).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# With a window: an item that comes once the batch has waited this share of its window
# takes the batch along at once (the flush rides that item's wake-up, not a timer's).
EARLY = 0.5
# With a window: a batch whose first item came a gap `g` after the item before it expects
# company every g or so, and waits up to STRETCH * g for it (at least the window, at most
# the longest). Paced requests are answered in groups a slice apart: the next group, g
# later, joins the batch; the one after, 2g later, comes once it has waited more than
# half of that (EARLY) and takes it along (each with a margin of g/4 or more for jitter):
# two groups and a bit to a commit. The rest of the group whose first item took a batch
# along starts the next one with the gap before its group. Where STRETCH * g is more than
# the longest, no company is expected in time and the batch goes at once: waiting would
# cost a wake-up (and the callers the wait) for nothing.
STRETCH = 2.5
# The company waiting found of late (items that joined a waiting batch, a moving average
# with this weight for the newest): below COMPANY_MIN a batch waits only once in
# PROBE_EVERY, so that callers one after the other (each waiting for its own result,
# none can join another's) are not kept waiting for company that cannot come, and
# company that comes back is seen again.
COMPANY_WEIGHT = 0.25
COMPANY_MIN = 0.5
PROBE_EVERY = 16


class Batcher(Generic[T, R]):
    """Runs `flush` over everything submitted meanwhile, one batch at a time.

    `flush(items)` returns one result (or exception) per item, in order; if it raises,
    every caller of the batch gets that exception. `max_batch` bounds one batch.
    `window` (seconds) is how long a batch may wait for company before it goes (0: at
    once, the batch is whatever queued while the last flush ran): it goes when `enough`
    items are in it, with an urgent item, with the first item that comes once it has
    waited half the window (EARLY), or when the window is over, whichever is first.
    `longest` (default: the window) is as far as the window of a batch that began after
    a gap stretches (see STRETCH).
    """

    def __init__(
        self,
        flush: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        name: str,
        max_batch: int | None = None,
        window: float = 0.0,
        longest: float | None = None,
        enough: int | None = None,
    ) -> None:
        self._flush = flush
        self._name = name
        self._max_batch = max_batch
        self._shortest = window
        self._longest = window if longest is None else max(window, longest)
        self._window = window  # the waiting batch's, stretched by the gap before it
        bounds = [n for n in (enough, max_batch) if n is not None]
        self._enough = min(bounds) if bounds else None
        self._queued: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._due: asyncio.TimerHandle | None = None  # the flush an unhurried item waits for
        # When the latest item came, and the gap before the batch's first one (a new
        # batcher assumes company).
        self._last_submit = time.monotonic()
        self._gap = 0.0
        self._carried = 0.0  # the gap before the item that took the last batch along
        self._first_at: float | None = None  # when the oldest item in a hurry came
        self._urgent = False  # an urgent item is queued
        self._waiting: asyncio.Future[None] | None = None  # set while a batch waits
        self._company = 1.0  # see COMPANY_WEIGHT
        self._unprobed = 0  # batches that went without waiting, company being scarce

    async def submit(self, item: T, *, within: float | None = None, urgent: bool = False) -> R:
        """Queue `item`; return its result once the batch it went in is flushed.

        `urgent`: the batch goes without waiting for company (whoever waits for this
        item holds others up meanwhile: a claim that work waits for).
        `within`: the item is in no hurry. It starts no flush of its own; it goes with the
        next batch another item starts, or `within` seconds from now, whichever is first
        (a checkpoint rides with the outcomes' commit instead of paying for one).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        if within is None:
            now = time.monotonic()
            gap, self._last_submit = now - self._last_submit, now
            if self._first_at is None:  # a new batch: the gap before it decides (STRETCH)
                self._first_at = now
                # The rest of a group whose first item took the last batch along: the
                # gap before the group is this batch's too (see STRETCH).
                self._gap, self._carried = max(gap, self._carried), 0.0
                self._window = min(self._longest, max(self._shortest, STRETCH * self._gap))
            self._urgent = self._urgent or urgent
            self._queued.append((item, future))
            self._start(gap)
        else:
            self._queued.append((item, future))
            if self._due is None:
                self._due = loop.call_later(within, self._start)
        return await future

    @property
    def busy(self) -> bool:
        """Whether a batch is being flushed (or waits for company) now."""
        return self._flusher is not None and not self._flusher.done()

    async def wait_idle(self) -> None:
        """Return once everything submitted so far has been flushed."""
        if self._queued:
            self._urgent = True  # no more waiting for company
            self._start()  # unhurried items too: nothing is left behind
        if self._flusher is not None:
            await asyncio.wait([self._flusher])

    def _start(self, gap: float = 0.0) -> None:
        """Have everything queued flushed: unhurried items go with this batch. `gap`: how
        long before the item that calls this the one before it came."""
        if self._due is not None:
            self._due.cancel()
            self._due = None
        if not self.busy:
            self._flusher = asyncio.create_task(self._run(), name=self._name)
        elif self._waiting is not None and not self._waiting.done() and self._waited_enough():
            self._carried = gap
            self._stop_waiting()

    def _waited_enough(self) -> bool:
        """Whether the batch should go now: enough in it, or waited long enough (or only
        unhurried items in it: their time is up)."""
        if self._urgent or self._first_at is None:
            return True
        if self._enough is not None and len(self._queued) >= self._enough:
            return True
        return time.monotonic() - self._first_at >= EARLY * self._window

    def _stop_waiting(self) -> None:
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(None)

    def _worth_waiting(self) -> bool:
        """Whether the batch queued now waits for company (see STRETCH, COMPANY_MIN)."""
        if not self._window or self._waited_enough() or STRETCH * self._gap > self._longest:
            return False
        if self._company >= COMPANY_MIN:
            return True
        self._unprobed += 1
        if self._unprobed < PROBE_EVERY:
            return False
        self._unprobed = 0
        return True

    async def _wait_for_company(self) -> None:
        """Wait until the window is over or `_start` finds the batch ready to go."""
        loop = asyncio.get_running_loop()
        waiting = self._waiting = loop.create_future()
        before = len(self._queued)
        waited = 0.0 if self._first_at is None else time.monotonic() - self._first_at
        timer = loop.call_later(self._window - waited, self._stop_waiting)
        try:
            await waiting
        finally:
            timer.cancel()
            self._waiting = None
        joined = len(self._queued) - before
        self._company += COMPANY_WEIGHT * (joined - self._company)

    async def _run(self) -> None:
        while self._queued:
            if self._worth_waiting():
                # Answers to requests sent together come back a few ms apart, with
                # stragglers behind: a batch that waits for them makes one commit (one
                # fsync, one thread hop) of several.
                await self._wait_for_company()
            cut = len(self._queued) if self._max_batch is None else self._max_batch
            batch, self._queued = self._queued[:cut], self._queued[cut:]
            # An urgent item goes in this batch; what max_batch left over has waited enough.
            self._urgent = bool(self._queued)
            if not self._queued:
                self._first_at = None  # what comes next starts a batch of its own
            try:
                results: Sequence[R | BaseException] = await self._flush([i for i, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every caller of the batch must hear of it
                results = [exc] * len(batch)
            except BaseException:
                # The flusher itself is cancelled (the loop shuts down): whether this batch
                # was done is unknown, and nobody flushes what waits: no caller is left
                # waiting for ever, each is cancelled as its flush was.
                for _, future in batch + self._queued:
                    future.cancel()
                self._queued = []
                if self._due is not None:
                    self._due.cancel()
                    self._due = None
                raise
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():  # a cancelled caller no longer waits
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
