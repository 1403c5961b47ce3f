"""Group commit: what many callers ask for at about the same time, done in one round.

Acks to a broker, a file source's checkpoint, dead letters to a file, operations on the
SQLite file: each caller wants "done and durable when I return", and one round trip,
write or fsync per caller would
cost far more than one per burst. `Batcher.submit(item)` queues the item and waits; a
single flusher task takes everything queued, hands it to `flush` as one list, and
settles every caller with its own result. Items that arrive while a flush is under way
go together in the next one, so the batches grow by themselves with the load and no
timer adds latency when it is light.

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

# An item that came more than this many windows after the one before it goes at once.
LONELY = 5


class Batcher(Generic[T, R]):
    """Runs `flush` over everything submitted meanwhile, one batch at a time.

    `flush(items)` returns one result (or exception) per item, in order; if it raises,
    every caller of the batch gets that exception. `max_batch` bounds one batch;
    `window` (seconds) is how long a batch that is not full waits for more before it
    goes (0: at once, the batch is whatever queued while the last flush ran).
    """

    def __init__(
        self,
        flush: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        name: str,
        max_batch: int | None = None,
        window: float = 0.0,
    ) -> None:
        self._flush = flush
        self._name = name
        self._max_batch = max_batch
        self._window = window
        self._queued: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._due: asyncio.TimerHandle | None = None  # the flush an unhurried item waits for
        # When the latest item came, and the gap before it (a new batcher assumes company).
        self._last_submit = time.monotonic()
        self._gap = 0.0

    async def submit(self, item: T, *, within: float | None = None) -> R:
        """Queue `item`; return its result once the batch it went in is flushed.

        `within`: the item is in no hurry. It starts no flush of its own; it goes with the
        next batch another item starts, or `within` seconds from now, whichever is first
        (a checkpoint rides with the outcomes' commit instead of paying for one).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._queued.append((item, future))
        if within is None:
            now = time.monotonic()
            self._gap, self._last_submit = now - self._last_submit, now
            self._start()
        elif self._due is None:
            self._due = loop.call_later(within, self._start)
        return await future

    async def wait_idle(self) -> None:
        """Return once everything submitted so far has been flushed."""
        if self._queued:
            self._start()  # unhurried items too: nothing is left behind
        if self._flusher is not None:
            await asyncio.wait([self._flusher])

    def _start(self) -> None:
        """Have everything queued flushed: unhurried items go with this batch."""
        if self._due is not None:
            self._due.cancel()
            self._due = None
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._run(), name=self._name)

    async def _run(self) -> None:
        while self._queued:
            not_full = self._max_batch is None or len(self._queued) < self._max_batch
            if self._window and not_full and self._gap < LONELY * self._window:
                # A short window lets the callers of about the same moment join the batch
                # (with requests 40 ms long they trickle in: 2 per commit without it). Not
                # for an item that came long after the one before it (a paced worker's):
                # no company is coming, and waiting would cost a wake-up for nothing.
                await asyncio.sleep(self._window)
            cut = len(self._queued) if self._max_batch is None else self._max_batch
            batch, self._queued = self._queued[:cut], self._queued[cut:]
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
