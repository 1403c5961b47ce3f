"""Convergence, model-based (DESIGN section 4): whatever the order, duplication and
interleaving of an order's events, CDP ends holding its latest version, once.

Hypothesis generates per-order version histories (upserts of changing bodies, erasures,
re-creations), identical redeliveries and a shuffle of the lot; several workers on one
shared state store work them at once through the real pipeline, against the emulator over
real HTTP with faults (5xx, timeouts and dropped connections after creates, updates and
deletes). The model (`worker.demo.expected_bodies`) says what CDP must hold per order;
`convergence_problems` compares, and hypothesis shrinks any history that breaks it.
Every state backend runs it: memory with many examples, the others with a few.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from services import POSTGRES_URL, REDIS_URL, delete_redis_keys, drop_postgres_tables, require

from worker.config import Settings
from worker.demo import changed, contact_event, convergence_problems, expected_bodies
from worker.emulator import Emulator, EmulatorConfig
from worker.pipeline import Worker
from worker.sources import MemoryDeadLetterSink, MemorySource
from worker.state import MemoryStateStore, SqliteStateStore, StateStore

KEY, TOKEN = "conv-key", "conv-token"


# -- the histories ------------------------------------------------------------------------

# One order: its kind of version, and its events in version order, each an upsert of one
# of a few bodies (0..3) or an erasure (None).
order_history = st.tuples(
    st.sampled_from(["version", "occurredAt"]),
    st.lists(st.one_of(st.integers(0, 3), st.none()), min_size=1, max_size=5),
)
scenario = st.fixed_dictionaries(
    {
        "orders": st.lists(order_history, min_size=1, max_size=4),
        "copies": st.lists(st.integers(0, 2), min_size=20, max_size=20),  # redeliveries
        "workers": st.integers(1, 3),
        # How often the first worker is stopped mid-run (its claims released, possibly in
        # doubt) and started again on the same queue and store.
        "restarts": st.lists(st.floats(0.01, 0.2), max_size=2),
        "seed": st.integers(0, 2**16),
        "on_change": st.just("update"),
    }
)


def events_of(orders: list[tuple[str, list[int | None]]], seed: int) -> list[dict[str, Any]]:
    """The events of each order's history (not shuffled yet)."""
    events = []
    for number, (kind, history) in enumerate(orders):
        rng = random.Random(seed * 31 + number)
        first = contact_event(rng, number)
        bodies = [first] + [changed(rng, first, number * 10 + i) for i in range(1, 4)]
        for revision, variant in enumerate(history, start=1):
            if variant is None:
                event: dict[str, Any] = {"orderRef": first["orderRef"], "op": "delete"}
            else:
                event = {k: v for k, v in bodies[variant].items() if k != "occurredAt"}
            event["eventId"] = f"o{number}-r{revision}"
            if kind == "version":
                event["version"] = revision
            else:  # an occurredAt producer, with offsets: compared as instants
                event["occurredAt"] = f"2026-11-26T{10 + revision:02d}:30:00+01:00"
            events.append(event)
    return events


def shuffled_lines(drawn: dict[str, Any]) -> list[bytes]:
    events = events_of(drawn["orders"], drawn["seed"])
    lines = []
    for number, event in enumerate(events):
        lines.extend([orjson.dumps(event)] * (1 + drawn["copies"][number % 20]))
    random.Random(drawn["seed"]).shuffle(lines)
    return lines


# -- the stores ---------------------------------------------------------------------------

# `async with stores(tmp_path) as replica:` `replica()` opens one more store on the same
# records (another worker process); all are closed and their records removed at the end.
Stores = Callable[[Path], Any]


@asynccontextmanager
async def memory_stores(tmp_path: Path) -> AsyncIterator[Callable[[], Any]]:
    store = MemoryStateStore()
    await store.open()

    async def same() -> StateStore:
        return store  # one process: the replicas share the store itself

    yield same
    await store.close()


@asynccontextmanager
async def sqlite_stores(tmp_path: Path) -> AsyncIterator[Callable[[], Any]]:
    path = tmp_path / f"state-{uuid.uuid4().hex[:8]}.db"
    async with _replicas(lambda: SqliteStateStore(path)) as replica:
        yield replica


@asynccontextmanager
async def redis_stores(tmp_path: Path) -> AsyncIterator[Callable[[], Any]]:
    from worker.state.redis import RedisStateStore

    prefix = f"test-convergence-{uuid.uuid4().hex[:8]}:"
    async with _replicas(lambda: RedisStateStore(REDIS_URL, key_prefix=prefix)) as replica:
        yield replica
    await delete_redis_keys(prefix)


@asynccontextmanager
async def postgres_stores(tmp_path: Path) -> AsyncIterator[Callable[[], Any]]:
    from worker.state.postgres import PostgresStateStore

    prefix = f"test_conv_{uuid.uuid4().hex[:8]}_"
    async with _replicas(lambda: PostgresStateStore(POSTGRES_URL, table_prefix=prefix)) as replica:
        yield replica
    await drop_postgres_tables(prefix)


@asynccontextmanager
async def _replicas(build: Callable[[], StateStore]) -> AsyncIterator[Callable[[], Any]]:
    opened: list[StateStore] = []

    async def replica() -> StateStore:
        store = build()
        await store.open()
        opened.append(store)
        return store

    try:
        yield replica
    finally:
        for store in opened:
            await store.close()


# -- one run --------------------------------------------------------------------------------


async def converge(drawn: dict[str, Any], stores: Stores, tmp_path: Path) -> None:
    lines = shuffled_lines(drawn)
    faults = EmulatorConfig(
        client_key=KEY, api_token=TOKEN, seed=drawn["seed"], error_rate=0.1, latency=0.01,
        timeout_after_create_rate=0.1, reset_after_create_rate=0.1,
        timeout_after_update_rate=0.1, reset_after_update_rate=0.1,
        timeout_after_delete_rate=0.1, reset_after_delete_rate=0.1, hang_seconds=0.5,
    )  # fmt: skip
    async with Emulator(faults) as emulator, stores(tmp_path) as replica:
        dead = MemoryDeadLetterSink()
        count = drawn["workers"]
        sources = [MemorySource(lines[number::count]) for number in range(count)]

        async def worker_on(source: MemorySource, **overrides: Any) -> Worker:
            values: dict[str, Any] = {
                "source": "memory:", "state": "memory:", "dlq": "memory:",
                "cdp_base_url": emulator.url, "cdp_client_key": KEY, "cdp_api_token": TOKEN,
                "rate_limit": 0.0, "request_timeout": 0.25, "lease_seconds": 1.0,
                "shutdown_timeout": 5.0, "http_port": 0, "on_change": drawn["on_change"],
                "max_attempts": 50, **overrides,
            }  # fmt: skip
            return Worker(
                Settings(**values),
                source=source,
                state=await replica(),
                dead_letters=dead,
                backoff_base=0.005,
            )

        async def restarted(source: MemorySource) -> None:
            for after in drawn["restarts"]:
                worker = await worker_on(source, shutdown_timeout=0.01)
                running = asyncio.create_task(worker.run())
                await asyncio.sleep(after)
                worker.stop()  # what is still in flight after 10 ms is given back
                await running
                await worker.close()
            await to_the_end(await worker_on(source))

        async def to_the_end(worker: Worker) -> None:
            try:
                await worker.run()
            finally:
                await worker.close()

        runs = [restarted(sources[0])]
        runs += [to_the_end(await worker_on(source)) for source in sources[1:]]
        await asyncio.wait_for(asyncio.gather(*runs), 120)
        assert dead.letters == []
        expected = expected_bodies(lines, base_url=emulator.url)
        if drawn["on_change"] == "ignore":
            expected = first_bodies(lines, emulator.url, expected)
        assert convergence_problems(emulator, expected) == []


def first_bodies(
    lines: list[bytes], base_url: str, latest: dict[str, dict[str, Any] | None]
) -> dict[str, dict[str, Any] | None]:
    """Under --on-change ignore, one worker, no erasures: the body of each order's first
    event in the order read (what created the contact; every later one is ignored)."""
    firsts: dict[str, bytes] = {}
    for line in lines:
        firsts.setdefault(orjson.loads(line)["orderRef"], line)
    assert firsts.keys() == latest.keys()
    return expected_bodies(list(firsts.values()), base_url=base_url)


def run(drawn: dict[str, Any], stores: Stores, tmp_path: Path) -> None:
    asyncio.run(converge(drawn, stores, tmp_path))


_SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture]}


@settings(max_examples=40, **_SETTINGS)
@given(drawn=scenario)
def test_memory_store_converges(drawn: dict[str, Any], tmp_path: Path) -> None:
    run(drawn, memory_stores, tmp_path)


@pytest.mark.slow
@settings(max_examples=8, **_SETTINGS)
@given(drawn=scenario)
def test_sqlite_store_converges(drawn: dict[str, Any], tmp_path: Path) -> None:
    run(drawn, sqlite_stores, tmp_path)


@pytest.mark.slow
@settings(max_examples=8, **_SETTINGS)
@given(drawn=scenario)
def test_redis_store_converges(drawn: dict[str, Any], tmp_path: Path) -> None:
    require("redis")
    run(drawn, redis_stores, tmp_path)


@pytest.mark.slow
@settings(max_examples=8, **_SETTINGS)
@given(drawn=scenario)
def test_postgres_store_converges(drawn: dict[str, Any], tmp_path: Path) -> None:
    require("postgresql")
    run(drawn, postgres_stores, tmp_path)


@settings(max_examples=15, **_SETTINGS)
@given(
    drawn=scenario.map(
        lambda d: {
            **d,
            "on_change": "ignore",
            "workers": 1,  # several would race for which event is "first"
            # no erasures: the first body is then what create-once leaves
            "orders": [(kind, [v if v is not None else 0 for v in h]) for kind, h in d["orders"]],
        }
    )
)
def test_on_change_ignore_leaves_every_order_with_its_first_body(
    drawn: dict[str, Any], tmp_path: Path
) -> None:
    run(drawn, memory_stores, tmp_path)
