"""The redis state store: the contract, plus replicas racing, TTLs, reopening and errors.

Every test gets its own key prefix in REDIS_URL's database (15 by default), and deletes
its keys afterwards, so runs can share one Redis.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from harness import TcpProxy

pytest.importorskip("redis.asyncio")
pytest.register_assert_rewrite("state_contract")

import redis.asyncio as aioredis  # noqa: E402
from services import REDIS_URL, delete_redis_keys, require  # noqa: E402
from state_contract import DAY, LEASE, FakeClock, StateStoreContract, closing, opened  # noqa: E402

from worker.errors import ConfigError, StateError  # noqa: E402
from worker.state import ClaimStatus, open_state_store  # noqa: E402
from worker.state.base import DEAD, DELETED, DONE, Finish, Want  # noqa: E402
from worker.state.redis import RedisStateStore  # noqa: E402
from worker.versions import NUMBER, Version  # noqa: E402

StoreFactory = Callable[..., RedisStateStore]


@pytest.fixture
async def make_store() -> AsyncIterator[StoreFactory]:
    """`make_store(url=REDIS_URL, **options)`: stores sharing this test's key prefix, closed
    afterwards, and their keys deleted."""
    require("redis")
    prefix = f"cdp-sync-test:{uuid.uuid4().hex}:"

    def build(url: str = REDIS_URL, **options: Any) -> RedisStateStore:
        return RedisStateStore(url, key_prefix=prefix, **options)

    async with closing(build) as make:
        yield make
    await delete_redis_keys(prefix)


@pytest.fixture
async def redis_store(make_store: StoreFactory) -> RedisStateStore:
    return await opened(make_store)


@pytest.fixture
async def raw() -> AsyncIterator[aioredis.Redis]:
    """A plain client on the test database, to look at what the store wrote."""
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    await client.aclose()


class TestRedisState(StateStoreContract):
    """The contract, on this test's key prefix (`make_store` above)."""

    unreachable = (
        ("redis://:s3cret@127.0.0.1:1/0", "127.0.0.1:1/0"),  # nothing listens there
        ("rediss://user:s3cret@127.0.0.1:1/0", "127.0.0.1:1/0"),
        ("redis://:s3cret%2Fx@127.0.0.1:1/0", "127.0.0.1:1/0"),  # encoded: neither form shows
    )


# -- several replicas ------------------------------------------------------------------------


async def test_every_operation_is_one_round_trip(
    redis_store: RedisStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = redis_store._client
    assert client is not None
    commands: list[str] = []
    execute: Callable[..., Awaitable[Any]] = client.execute_command

    async def counting(*args: Any, **options: Any) -> Any:
        commands.append(str(args[0]))
        return await execute(*args, **options)

    monkeypatch.setattr(client, "execute_command", counting)
    await redis_store.claim("ORD-1", "w1", LEASE)
    await redis_store.renew("ORD-1", "w1", LEASE)
    await redis_store.complete("ORD-1", "w1", "c", "h")
    await redis_store.claim("ORD-1", "w2", LEASE)
    await redis_store.claim("ORD-2", "w1", LEASE)
    await redis_store.fail("ORD-2", "w1", "cdp_rejected")
    await redis_store.claim("ORD-3", "w1", LEASE)
    await redis_store.release("ORD-3", "w1", sent=True)
    assert commands == ["EVALSHA"] * 8


async def test_claim_many_is_one_pipeline_of_evalsha(
    redis_store: RedisStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = redis_store._client
    assert client is not None
    sent: list[list[str]] = []
    pipeline = client.pipeline

    def counting(*args: Any, **options: Any) -> Any:
        pipe = pipeline(*args, **options)
        execute = pipe.execute

        async def counted(*a: Any, **o: Any) -> Any:
            sent.append([str(command[0][0]) for command in pipe.command_stack])
            return await execute(*a, **o)

        pipe.execute = counted
        return pipe

    monkeypatch.setattr(client, "pipeline", counting)
    answers = await redis_store.claim_many([(f"ORD-{i}", Want()) for i in range(50)], "w1", LEASE)
    assert [a.status for a in answers] == [ClaimStatus.CREATE] * 50
    assert sent == [["EVALSHA"] * 50]  # no SCRIPT EXISTS first: one round trip


async def test_record_many_is_one_pipeline_of_evalsha(
    redis_store: RedisStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    refs = [f"ORD-{i}" for i in range(30)]
    await redis_store.claim_many([(ref, Want()) for ref in refs], "w1", LEASE)
    client = redis_store._client
    assert client is not None
    sent: list[int] = []
    pipeline = client.pipeline

    def counting(*args: Any, **options: Any) -> Any:
        pipe = pipeline(*args, **options)
        execute = pipe.execute

        async def counted(*a: Any, **o: Any) -> Any:
            sent.append(len(pipe.command_stack))
            return await execute(*a, **o)

        pipe.execute = counted
        return pipe

    monkeypatch.setattr(client, "pipeline", counting)
    finishes = [Finish(ref, DONE, f"c-{ref}", "h", "fp") for ref in refs[:10]]
    finishes += [Finish(ref, DELETED) for ref in refs[10:20]]
    finishes += [Finish(ref, DEAD, reason="cdp_rejected") for ref in refs[20:]]
    assert await redis_store.record_many("w1", finishes) == [None] * 30
    assert sent == [30]


async def test_claim_many_reloads_its_script_after_a_script_flush(
    redis_store: RedisStateStore, raw: aioredis.Redis
) -> None:
    await redis_store.claim("ORD-1", "w1", LEASE)
    await raw.script_flush()  # as after a Redis restart or failover
    answers = await redis_store.claim_many([("ORD-1", Want()), ("ORD-2", Want())], "w2", LEASE)
    assert [a.status for a in answers] == [ClaimStatus.BUSY, ClaimStatus.CREATE]
    assert (await redis_store.claim("ORD-2", "w3", LEASE)).status is ClaimStatus.BUSY


# -- retention -------------------------------------------------------------------------------


async def test_finished_records_expire_after_the_retention_in_flight_ones_never(
    make_store: StoreFactory, raw: aioredis.Redis
) -> None:
    store = make_store(retention_seconds=3600)
    await store.open()
    for ref in ("done", "dead", "in-flight", "released"):
        await store.claim(ref, "w1", LEASE)
    await store.complete("done", "w1", "c", "h")
    await store.fail("dead", "w1", "cdp_rejected")
    await store.release("released", "w1", sent=True)

    for ref in ("done", "dead"):
        ttl_ms = await raw.pttl(store.order_prefix + ref)
        assert 3590_000 < ttl_ms <= 3600_000, ref
    for ref in ("in-flight", "released"):
        assert await raw.pttl(store.order_prefix + ref) == -1, ref  # no expiry at all
    # Completing again (a retried write that had landed) does not extend its life.
    await raw.pexpire(store.order_prefix + "done", 1000_000)
    await store.complete("done", "w1", "c", "h")
    assert await raw.pttl(store.order_prefix + "done") <= 1000_000


async def test_without_retention_nothing_expires(
    redis_store: RedisStateStore, raw: aioredis.Redis
) -> None:
    await redis_store.claim("ORD-1", "w1", LEASE)
    await redis_store.complete("ORD-1", "w1", "c", "h")
    assert await raw.pttl(redis_store.order_prefix + "ORD-1") == -1


async def test_the_record_layout(redis_store: RedisStateStore, raw: aioredis.Redis) -> None:
    await redis_store.claim("ORD-1", "w1", LEASE)
    await redis_store.complete("ORD-1", "w1", "contact-1", "href-1")
    record = await raw.hgetall(redis_store.order_prefix + "ORD-1")
    assert record["status"] == "done"
    assert (record["contact_ref"], record["href"]) == ("contact-1", "href-1")
    assert "owner" not in record  # finished: nobody holds it
    assert record["attempts"] == "1"
    assert float(record["updated_at"]) > 0
    assert await raw.zscore(redis_store.finished_key, "ORD-1") == float(record["updated_at"])
    await redis_store.set_checkpoint("file:a.jsonl", "42")
    assert await raw.hget(redis_store.checkpoints_key, "file:a.jsonl") == "42"


async def test_versions_and_fingerprints_are_stored_exactly(
    redis_store: RedisStateStore, raw: aioredis.Redis
) -> None:
    version = Version(NUMBER, 2**53 - 1)
    await redis_store.claim("ORD-1", "w1", LEASE, Want("fp-a", version))
    await redis_store.complete("ORD-1", "w1", "c-1", "h-1", fingerprint="fp-a", version=version)
    record = await raw.hgetall(redis_store.order_prefix + "ORD-1")
    assert (record["fingerprint"], record["version_kind"], record["version"]) == (
        "fp-a",
        "n",
        "9007199254740991",  # not 9.007e15: Lua writes back what it was given
    )
    assert "sending" not in record
    assert "op" not in record


async def test_a_hash_of_the_first_release_is_content_unknown(
    redis_store: RedisStateStore, raw: aioredis.Redis
) -> None:
    await raw.hset(
        redis_store.order_prefix + "ORD-1",
        mapping={"status": "done", "owner": "old", "lease_until": 0, "attempts": 1,
                 "contact_ref": "c-1", "href": "h-1", "updated_at": 1.0},
    )  # fmt: skip
    claim = await redis_store.claim("ORD-1", "w1", LEASE, Want("fp-a"))
    assert (claim.status, claim.contact_ref) == (ClaimStatus.UPDATE, "c-1")


async def test_taking_a_finished_record_removes_its_expiry(
    make_store: StoreFactory, raw: aioredis.Redis
) -> None:
    store = make_store(retention_seconds=3600)
    await store.open()
    await store.claim("ORD-1", "w1", LEASE, Want("fp-a"))
    await store.complete("ORD-1", "w1", "c", "h", fingerprint="fp-a")
    assert await raw.pttl(store.order_prefix + "ORD-1") > 0
    await store.claim("ORD-1", "w2", LEASE, Want("fp-b"))  # an update is in flight
    assert await raw.pttl(store.order_prefix + "ORD-1") == -1


async def test_sweep_tidies_the_index_of_records_redis_expired(
    redis_store: RedisStateStore, raw: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    monkeypatch.setattr("worker.state.base.now", clock)
    for ref in ("expired", "kept"):
        await redis_store.claim(ref, "w1", LEASE)
        await redis_store.complete(ref, "w1", "c", "h")
    await raw.delete(redis_store.order_prefix + "expired")  # as its TTL would
    clock.advance(10 * DAY)
    assert await redis_store.sweep(5 * DAY) == 1  # only the record it deleted itself
    assert await raw.zcard(redis_store.finished_key) == 0


async def test_sweep_keeps_an_order_claimed_again_after_its_record_expired(
    redis_store: RedisStateStore, raw: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    monkeypatch.setattr("worker.state.base.now", clock)
    await redis_store.claim("ORD-1", "w1", LEASE)
    await redis_store.complete("ORD-1", "w1", "c", "h")
    await raw.delete(redis_store.order_prefix + "ORD-1")  # expired
    clock.advance(10 * DAY)
    assert (await redis_store.claim("ORD-1", "w2", LEASE)).status is ClaimStatus.CREATE
    assert await redis_store.sweep(5 * DAY) == 0
    assert (await redis_store.claim("ORD-1", "w3", LEASE)).status is ClaimStatus.BUSY


async def test_sweep_works_in_batches(
    redis_store: RedisStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    monkeypatch.setattr("worker.state.base.now", clock)
    monkeypatch.setattr("worker.state.redis.SWEEP_BATCH", 7)
    refs = [f"ORD-{i}" for i in range(30)]
    await asyncio.gather(*(redis_store.claim(ref, "w1", LEASE) for ref in refs))
    await asyncio.gather(*(redis_store.complete(ref, "w1", "c", "h") for ref in refs))
    clock.advance(10 * DAY)
    assert await redis_store.sweep(5 * DAY) == 30


# -- durability ------------------------------------------------------------------------------


async def test_scripts_are_reloaded_after_a_script_flush(
    redis_store: RedisStateStore, raw: aioredis.Redis
) -> None:
    await redis_store.claim("ORD-1", "w1", LEASE)
    await raw.script_flush()  # as after a Redis restart or failover
    assert (await redis_store.claim("ORD-1", "w2", LEASE)).status is ClaimStatus.BUSY


# -- errors ----------------------------------------------------------------------------------


def _test_server(userinfo: str = "", port: int | None = None) -> str:
    """REDIS_URL's database on `port` (default: REDIS_URL's), with other credentials."""
    parts = urlsplit(REDIS_URL)
    at = f"{userinfo}@" if userinfo else ""
    return f"redis://{at}{parts.hostname}:{port or parts.port or 6379}{parts.path}"


async def test_a_wrong_password_is_a_state_error_without_the_password() -> None:
    require("redis")
    store = open_state_store(_test_server("nobody-here:s3cret"))
    with pytest.raises(StateError) as info:
        await store.open()
    assert "--state / WORKER_STATE" in str(info.value)
    assert "s3cret" not in str(info.value)
    await store.close()


async def test_losing_the_server_is_a_state_error(make_store: StoreFactory) -> None:
    proxy = TcpProxy(REDIS_URL)
    port = await proxy.start()
    store = make_store(_test_server(port=port))
    await store.open()
    assert (await store.claim("ORD-1", "w1", LEASE)).status is ClaimStatus.CREATE
    await proxy.cut()
    started = asyncio.get_running_loop().time()
    with pytest.raises(StateError, match="release failed"):
        await store.release("ORD-1", "w1", sent=False)
    assert asyncio.get_running_loop().time() - started < 3  # a few fast retries, no more


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:s3cret@127.0.0.1:notaport/0", "invalid redis URL"),
        ("redis://:s3cret@127.0.0.1:6379/state", "database number"),
        ("redis://:s3cret@127.0.0.1:6379/0?socket_timeout=soon", "invalid redis URL"),
        ("redis:s3cret", "redis://"),
    ],
)
def test_a_malformed_url_is_a_config_error_without_the_password(url: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        open_state_store(url)
    assert "--state / WORKER_STATE" in str(info.value)
    assert "s3cret" not in str(info.value)


# -- the factory -----------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://:pw@redis:6380/2"])
def test_factory_redis_urls(url: str) -> None:
    store = open_state_store(url, retention_seconds=3600)
    assert isinstance(store, RedisStateStore)
    assert store.order_prefix == "cdp-sync:order:"
    assert store.checkpoints_key == "cdp-sync:checkpoints"


def test_the_class_is_importable_from_the_package() -> None:
    from worker.state import RedisStateStore as exported

    assert exported is RedisStateStore


def test_the_location_names_the_server_and_keys_not_the_password() -> None:
    store = RedisStateStore.from_url("redis://:s3cret@cache:6380/2?prefix=eu:")
    assert store.location == "redis cache:6380/2 keys eu:order:*"
