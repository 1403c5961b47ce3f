"""A worker on memory parts, for the pipeline tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from urllib.parse import urlsplit, urlunsplit

from worker.config import OPTIONS
from worker.contact import parse_event
from worker.errors import InvalidEvent
from worker.pipeline import Worker
from worker.sources import MemoryDeadLetterSink, MemorySource, Source, open_source
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


_ENV_OF = {option.name: option.env for option in OPTIONS}


def worker_env(cdp_url: str, key: str, token: str, **settings: str) -> dict[str, str]:
    """The environment of a `worker run` process talking to the CDP at `cdp_url`.

    This process's environment without any WORKER_ or CDP_ variable of its own, then the
    CDP credentials, JSON logs, no health port, and `settings` by option name
    (`rate_limit="0"` sets WORKER_RATE_LIMIT), overriding those.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "CDP_"))}
    env.update(
        CDP_BASE_URL=cdp_url,
        CDP_CLIENT_KEY=key,
        CDP_API_TOKEN=token,
        WORKER_HTTP_PORT="0",
        WORKER_LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
    )
    env.update({_ENV_OF[name]: value for name, value in settings.items()})
    return env


def free_port() -> int:
    """A port nothing listens on right now (port 0 means "off" to the worker)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class TcpProxy:
    """A TCP proxy to a server whose connections can be cut, as a network failure does.

    `start()` (or `async with`) listens on a free local port; `drop()` aborts the open
    connections; `refusing = True` aborts new ones at once, as if the server were down;
    `cut()` does both for good.
    """

    def __init__(self, target_url: str) -> None:
        target = urlsplit(target_url)
        self.target = (target.hostname or "127.0.0.1", target.port or 0)
        self.port = 0
        self.refusing = False
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._pipes: set[asyncio.Task[None]] = set()

    def url(self, url: str) -> str:
        """`url` with its host and port replaced by the proxy's (user info kept)."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.cut()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        self._writers += [writer, upstream_writer]
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            pipe = asyncio.create_task(self._pipe(source, sink))
            self._pipes.add(pipe)
            pipe.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def drop(self) -> None:
        writers, self._writers = self._writers, []
        for writer in writers:
            writer.transport.abort()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self.drop()


def valid_order_refs(lines: list[bytes]) -> set[str]:
    """The orderRefs of the lines the worker should deliver (the invalid ones left out)."""
    refs = set()
    for line in lines:
        with contextlib.suppress(InvalidEvent):
            refs.add(parse_event(line, default_event_id="-").order_ref)
    return refs


class OpenedSources:
    """Sources a test opened; the `opened` fixture closes them at its end."""

    def __init__(self) -> None:
        self.sources: list[Source] = []

    async def source(self, url: str) -> Source:
        """Open the source at `url`; it is closed at the end of the test."""
        source = open_source(url)
        await source.open()
        self.sources.append(source)
        return source

    async def close_all(self) -> None:
        for source in self.sources:
            await source.close()
