"""The postgres state store: the contract, plus replicas racing, reopening and errors.

Every test gets its own table prefix in POSTGRES_URL's database and drops its tables
afterwards, so runs can share one server.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from harness import TcpProxy

pytest.importorskip("asyncpg")
pytest.register_assert_rewrite("state_contract")

import asyncpg  # noqa: E402
from services import POSTGRES_URL, drop_postgres_tables, require  # noqa: E402
from state_contract import LEASE, StateStoreContract, closing, opened  # noqa: E402

from worker.errors import ConfigError, StateError  # noqa: E402
from worker.state import ClaimStatus, open_state_store  # noqa: E402
from worker.state.base import DELETE, DELETE_FINGERPRINT, DONE, Finish, Want  # noqa: E402
from worker.state.postgres import PostgresStateStore  # noqa: E402

StoreFactory = Callable[..., PostgresStateStore]


@pytest.fixture
def table_prefix() -> str:
    return f"cdp_sync_test_{uuid.uuid4().hex[:12]}_"


@pytest.fixture
async def make_store(table_prefix: str) -> AsyncIterator[StoreFactory]:
    """`make_store(url=POSTGRES_URL, **options)`: stores on this test's tables, closed
    afterwards, and the tables dropped."""
    require("postgresql")

    def build(url: str = POSTGRES_URL, **options: Any) -> PostgresStateStore:
        return PostgresStateStore(url, table_prefix=table_prefix, **options)

    async with closing(build) as make:
        yield make
    await drop_postgres_tables(table_prefix)


@pytest.fixture
async def pg_store(make_store: StoreFactory) -> PostgresStateStore:
    return await opened(make_store)


class TestPostgresState(StateStoreContract):
    """The contract, on this test's tables (`make_store` above)."""

    unreachable = (("postgresql://cdp:s3cret@127.0.0.1:1/state", "127.0.0.1:1/state"),)


# -- several replicas ------------------------------------------------------------------------


async def test_replicas_starting_together_create_the_tables_once(
    make_store: StoreFactory,
) -> None:
    stores = [make_store() for _ in range(4)]
    await asyncio.gather(*(store.open() for store in stores))
    assert (await stores[0].claim("ORD-1", "w0", LEASE)).status is ClaimStatus.CREATE
    assert (await stores[3].claim("ORD-1", "w3", LEASE)).status is ClaimStatus.BUSY


class _CountingPool:
    """Wraps the store's pool and records each call: one call is one round trip."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.pool, name)

        async def call(*args: Any) -> Any:
            self.calls.append(name)
            return await method(*args)

        return call


async def test_every_operation_is_one_statement(
    pg_store: PostgresStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = _CountingPool(pg_store._pool)
    monkeypatch.setattr(pg_store, "_pool", counting)
    await pg_store.claim("ORD-1", "w1", LEASE)
    await pg_store.renew("ORD-1", "w1", LEASE)
    await pg_store.complete("ORD-1", "w1", "c", "h")
    await pg_store.claim("ORD-1", "w2", LEASE)
    await pg_store.claim("ORD-2", "w1", LEASE)
    await pg_store.fail("ORD-2", "w1", "cdp_rejected")
    await pg_store.claim("ORD-3", "w1", LEASE)
    await pg_store.release("ORD-3", "w1", sent=True)
    await pg_store.claim("ORD-3", "w2", LEASE)
    await pg_store.set_checkpoint("k", "v")
    assert len(counting.calls) == 10


async def test_claim_many_is_one_statement(
    pg_store: PostgresStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = _CountingPool(pg_store._pool)
    monkeypatch.setattr(pg_store, "_pool", counting)
    answers = await pg_store.claim_many([(f"ORD-{i}", Want()) for i in range(200)], "w", LEASE)
    assert [a.status for a in answers] == [ClaimStatus.CREATE] * 200
    assert counting.calls == ["fetch"]


async def test_record_many_is_one_statement(
    pg_store: PostgresStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    refs = [f"ORD-{i}" for i in range(100)]
    await pg_store.claim_many([(ref, Want()) for ref in refs], "w", LEASE)
    counting = _CountingPool(pg_store._pool)
    monkeypatch.setattr(pg_store, "_pool", counting)
    finishes = [Finish(ref, DONE, f"c-{ref}", "h", "fp") for ref in reversed(refs)]
    assert await pg_store.record_many("w", finishes) == [None] * 100
    assert counting.calls == ["fetch"]


# -- retention -------------------------------------------------------------------------------


# -- durability ------------------------------------------------------------------------------


async def test_the_tables_carry_the_prefix(pg_store: PostgresStateStore, table_prefix: str) -> None:
    await pg_store.claim("ORD-1", "w1", LEASE)
    await pg_store.complete("ORD-1", "w1", "contact-1", "href-1")
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        row = await conn.fetchrow(
            f"SELECT status, owner, attempts, contact_ref FROM {table_prefix}orders"
            " WHERE order_ref = 'ORD-1'"
        )
    finally:
        await conn.close()
    assert tuple(row) == ("done", None, 1, "contact-1")


async def test_tables_of_the_first_release_are_migrated(
    make_store: StoreFactory, table_prefix: str
) -> None:
    """Created by the release before convergent sync: columns added, the status check
    widened, and its done records read as content unknown (updated once)."""
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(
            f"CREATE TABLE {table_prefix}orders (order_ref text PRIMARY KEY,"
            " status text NOT NULL CHECK (status IN ('in_flight', 'done', 'dead')),"
            " owner text, lease_until double precision NOT NULL DEFAULT 0,"
            " attempts integer NOT NULL DEFAULT 0, contact_ref text, href text,"
            " reason text, updated_at double precision NOT NULL)"
        )
        await conn.execute(
            f"INSERT INTO {table_prefix}orders VALUES"
            " ('ORD-1', 'done', NULL, 0, 1, 'c-1', 'h-1', NULL, 1.0)"
        )
    finally:
        await conn.close()
    store = await opened(make_store)
    claim = await store.claim("ORD-1", "w1", LEASE, Want("fp-a"))
    assert (claim.status, claim.contact_ref) == (ClaimStatus.UPDATE, "c-1")
    await store.claim("ORD-2", "w1", LEASE, Want(DELETE_FINGERPRINT, None, DELETE))
    await store.mark_deleted("ORD-2", "w1")  # the new status passes the check


# -- errors ----------------------------------------------------------------------------------


async def test_an_unknown_database_is_a_state_error_without_the_password() -> None:
    require("postgresql")
    parts = urlsplit(POSTGRES_URL)
    netloc = f"{parts.username or 'postgres'}:s3cret@{parts.hostname}:{parts.port or 5432}"
    store = open_state_store(urlunsplit(parts._replace(netloc=netloc, path="/cdp_sync_no_db")))
    with pytest.raises(StateError) as info:
        await store.open()
    assert "cdp_sync_no_db" in str(info.value)
    assert "s3cret" not in str(info.value)
    await store.close()


async def test_connections_the_server_dropped_are_replaced(pg_store: PostgresStateStore) -> None:
    await pg_store.claim("ORD-1", "w1", LEASE)
    pool = pg_store._pool
    assert pool is not None
    pid = await pool.fetchval("SELECT pg_backend_pid()")  # the pool's one idle connection
    conn = await asyncpg.connect(POSTGRES_URL)
    try:  # as a server restart or an idle-connection reaper would
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid) is True
    finally:
        await conn.close()
    await asyncio.sleep(0.1)
    assert await pg_store.renew("ORD-1", "w1", LEASE) is True


async def test_losing_the_server_is_a_state_error(make_store: StoreFactory) -> None:
    relay = TcpProxy(POSTGRES_URL)
    port = await relay.start()
    parts = urlsplit(POSTGRES_URL)
    netloc = f"{parts.username or 'postgres'}:s3cret@127.0.0.1:{port}"
    store = make_store(url=urlunsplit(parts._replace(netloc=netloc)))
    await store.open()
    assert (await store.claim("ORD-1", "w1", LEASE)).status is ClaimStatus.CREATE
    await relay.cut()
    with pytest.raises(StateError, match="renew failed") as info:
        await store.renew("ORD-1", "w1", LEASE)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://cdp:s3cret@127.0.0.1:notaport/state", "invalid postgresql URL"),
        ("postgresql:s3cret", "postgresql://"),
    ],
)
def test_a_malformed_url_is_a_config_error_without_the_password(url: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        open_state_store(url)
    assert "--state / WORKER_STATE" in str(info.value)
    assert "s3cret" not in str(info.value)


async def test_a_bad_url_option_is_a_config_error_without_the_password() -> None:
    store = open_state_store("postgresql://cdp:s3cret@127.0.0.1:1/state?sslmode=sometimes")
    with pytest.raises(ConfigError) as info:
        await store.open()
    assert "--state / WORKER_STATE" in str(info.value)
    assert "s3cret" not in str(info.value)
    await store.close()


def test_a_table_prefix_must_be_an_identifier() -> None:
    with pytest.raises(ValueError, match="table_prefix"):
        PostgresStateStore(POSTGRES_URL, table_prefix="x; DROP TABLE y; --")


# -- the factory -----------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["postgresql://u@db:5432/x", "postgres://u:pw@db/x"])
def test_factory_postgres_urls(url: str) -> None:
    store = open_state_store(url, retention_seconds=3600)
    assert isinstance(store, PostgresStateStore)
    assert store.table_prefix == "cdp_sync_"


def test_the_class_is_importable_from_the_package() -> None:
    from worker.state import PostgresStateStore as exported

    assert exported is PostgresStateStore


def test_the_location_names_the_database_and_tables_not_the_password() -> None:
    store = PostgresStateStore("postgresql://cdp:s3cret@db:5433/cdp", table_prefix="eu_")
    assert store.location == "postgresql db:5433/cdp tables eu_*"
