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
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


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

    async def submit(self, item: T) -> R:
        """Queue `item`; return its result once the batch it went in is flushed."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queued.append((item, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._run(), name=self._name)
        return await future

    async def wait_idle(self) -> None:
        """Return once everything submitted so far has been flushed."""
        if self._flusher is not None:
            await asyncio.wait([self._flusher])

    async def _run(self) -> None:
        while self._queued:
            if self._window and (self._max_batch is None or len(self._queued) < self._max_batch):
                # A short window lets the callers of about the same moment join the batch
                # (with requests 40 ms long they trickle in: 2 per commit without it).
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
                raise
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():  # a cancelled caller no longer waits
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
