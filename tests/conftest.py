"""Factory fixtures (as arq's conftest does): an emulator, settings, and workers built on it."""

from __future__ import annotations

import random
import types
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import aiohttp
import aioresponses.core as aioresponses_core
import orjson
import pytest
import structlog
from aioresponses import aioresponses
from harness import Harness, OpenedSources
from yarl import URL

from worker.config import Settings
from worker.demo import contact_event
from worker.emulator import Emulator, EmulatorConfig
from worker.limits import BACKOFF_BASE
from worker.observability import configure_logging
from worker.pipeline import Worker
from worker.sources import MemoryDeadLetterSink, MemorySource
from worker.state import MemoryStateStore

# Personal data and credentials seeded into tests; no log line may ever contain them.
SECRET_KEY = "ck-3f9a1c7e-client-key"
SECRET_TOKEN = "tok-9b8d7c6e5f4a-api-token"


class _Response(aiohttp.ClientResponse):
    """aioresponses 0.7.x builds responses without aiohttp 3.14's new `stream_writer`
    argument (pnuckowski/aioresponses#289); supply a stand-in."""

    def __init__(self, method: str, url: URL, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", types.SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


@pytest.fixture
def mocked(monkeypatch: pytest.MonkeyPatch) -> Iterator[aioresponses]:
    """aioresponses in place of CDP: for the client's unit tests and PII edge cases."""
    monkeypatch.setattr(aioresponses_core, "ClientResponse", _Response)
    with aioresponses() as mock:
        yield mock


@pytest.fixture(autouse=True)
def _logging() -> Iterable[None]:
    """JSON logs at debug, printed to the (captured) stdout, as in production."""
    configure_logging("json", "debug")
    yield
    structlog.contextvars.clear_contextvars()


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    config = EmulatorConfig(client_key=SECRET_KEY, api_token=SECRET_TOKEN, seed=11)
    async with Emulator(config) as running:
        yield running


@pytest.fixture
def make_settings(emulator: Emulator) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "source": "memory:",
            "state": "memory:",
            "dlq": "memory:",
            "cdp_base_url": emulator.url,
            "cdp_client_key": SECRET_KEY,
            "cdp_api_token": SECRET_TOKEN,
            "rate_limit": 0.0,
            "request_timeout": 2.0,
            "lease_seconds": 10.0,
            "shutdown_timeout": 5.0,
            "http_port": 0,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
async def state() -> AsyncIterator[MemoryStateStore]:
    """The test's state store: open for the whole test, shared by the workers it makes."""
    store = MemoryStateStore()
    await store.open()
    yield store
    await store.close()


@pytest.fixture
def make_worker(
    make_settings: Callable[..., Settings], state: MemoryStateStore
) -> Callable[..., Harness]:
    shared = state

    def make(
        events: Iterable[bytes | str | dict[str, Any]],
        *,
        state: MemoryStateStore | None = None,
        backoff_base: float = BACKOFF_BASE,
        **overrides: Any,
    ) -> Harness:
        """A worker on `events`; `backoff_base` shrinks its backoff, `overrides` its settings."""
        bodies = [orjson.dumps(e) if isinstance(e, dict) else e for e in events]
        source = MemorySource(bodies)
        state = state or shared
        dead = MemoryDeadLetterSink()
        worker = Worker(
            make_settings(**overrides),
            source=source,
            state=state,
            dead_letters=dead,
            backoff_base=backoff_base,
        )
        return Harness(worker, source, state, dead)

    return make


@pytest.fixture
def events() -> Callable[[int], list[dict[str, Any]]]:
    """`events(n)`: n valid events with distinct orderRefs and made-up personal data."""
    rng = random.Random(5)

    def make(count: int) -> list[dict[str, Any]]:
        return [contact_event(rng, number) for number in range(1, count + 1)]

    return make


@pytest.fixture
async def opened() -> AsyncIterator[OpenedSources]:
    """Sources a test opens, closed at its end."""
    tracker = OpenedSources()
    yield tracker
    await tracker.close_all()
