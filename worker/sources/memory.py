"""In-memory source and dead-letter sink, for tests and the embedded demo."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from .base import DeadLetterSink, Message, Redeliveries, Source


class MemorySource(Source):
    """Messages from a list; acks, nacks and redeliveries recorded for assertions.

    finite=True ends once every message was handed out and none awaits redelivery.
    """

    def __init__(self, bodies: Iterable[bytes | str] = (), *, finite: bool = True) -> None:
        self.finite = finite
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._redeliveries = Redeliveries(self._queue.put_nowait)
        self.acked: list[Message] = []
        self.nacked: list[Message] = []
        self._counter = 0
        for body in bodies:
            self.put(body)

    def put(self, body: bytes | str) -> None:
        self._counter += 1
        data = body.encode() if isinstance(body, str) else body
        self._queue.put_nowait(Message(id=f"mem-{self._counter}", body=data))

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def fetch(self, max_messages: int, timeout: float) -> list[Message] | None:
        if self.finite and self._queue.empty() and not self._redeliveries.pending:
            return None
        batch: list[Message] = []
        try:
            batch.append(await asyncio.wait_for(self._queue.get(), timeout))
        except TimeoutError:
            return batch
        while len(batch) < max_messages and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def ack(self, message: Message) -> None:
        self.acked.append(message)

    async def nack(self, message: Message, *, delay: float = 0.0) -> None:
        self.nacked.append(message)
        self._redeliveries.later(message, delay)


class MemoryDeadLetterSink(DeadLetterSink):
    def __init__(self) -> None:
        self.letters: list[dict[str, Any]] = []

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def put(self, letter: dict[str, Any]) -> None:
        self.letters.append(letter)

    async def read_all(self) -> list[dict[str, Any]]:
        return list(self.letters)
