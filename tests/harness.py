"""A worker on memory parts, for the pipeline tests."""

from __future__ import annotations

import socket

from worker.pipeline import Worker
from worker.sources import MemoryDeadLetterSink, MemorySource
from worker.state import MemoryStateStore


class Harness:
    """A worker on memory parts, with the parts at hand for assertions."""

    def __init__(
        self,
        worker: Worker,
        source: MemorySource,
        state: MemoryStateStore,
        dead: MemoryDeadLetterSink,
    ) -> None:
        self.worker, self.source, self.state, self.dead = worker, source, state, dead

    @property
    def reasons(self) -> list[str]:
        return [letter["reason"] for letter in self.dead.letters]

    async def run(self) -> Harness:
        """Run the worker to the end; the state store (the test's) stays open."""
        try:
            await self.worker.run()
        finally:
            await self.worker.close()
        return self


def free_port() -> int:
    """A port nothing listens on right now (port 0 means "off" to the worker)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
