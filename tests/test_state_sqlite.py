"""The sqlite state store: the contract, plus durability, group commits and two processes."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sqlite3
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("state_contract")

from state_contract import LEASE, StateStoreContract, closing  # noqa: E402

from worker.errors import ConfigError, StateError  # noqa: E402
from worker.state import (  # noqa: E402
    ClaimStatus,
    SqliteStateStore,
    StateStore,
    rules,
)
from worker.state.base import DEAD, DELETED, DONE, Finish, Want  # noqa: E402
from worker.versions import Version  # noqa: E402


class TestSqliteState(StateStoreContract):
    @pytest.fixture
    async def make_store(self, tmp_path: Path) -> AsyncIterator[Callable[..., StateStore]]:
        def build(**options: Any) -> SqliteStateStore:
            return SqliteStateStore(tmp_path / "state.db", **options)  # its own connection

        async with closing(build) as make:
            yield make


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStateStore]:
    store = SqliteStateStore(tmp_path / "state.db")
    await store.open()
    yield store
    await store.close()


async def test_the_file_is_in_wal_mode_with_full_sync(
    tmp_path: Path, sqlite_store: SqliteStateStore
) -> None:
    synchronous = await sqlite_store._submit(
        lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0]
    )
    assert synchronous == 2  # FULL
    with sqlite3.connect(tmp_path / "state.db") as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other.close()


async def test_claim_many_is_one_commit(sqlite_store: SqliteStateStore) -> None:
    before = sqlite_store.commits
    answers = await sqlite_store.claim_many([(f"ORD-{i}", Want()) for i in range(300)], "w", LEASE)
    assert [a.status for a in answers] == [ClaimStatus.CREATE] * 300
    assert sqlite_store.commits - before == 1


async def test_record_many_is_one_commit(sqlite_store: SqliteStateStore) -> None:
    refs = [f"ORD-{i}" for i in range(300)]
    await sqlite_store.claim_many([(ref, Want()) for ref in refs], "w", LEASE)
    before = sqlite_store.commits
    answers = await sqlite_store.record_many("w", [Finish(ref, DELETED) for ref in refs])
    assert answers == [None] * 300
    assert sqlite_store.commits - before == 1


@pytest.mark.parametrize(
    "finish",
    [
        Finish("ORD-1", DONE, "c-2", "h-2", "fp-2", Version("n", 2)),
        Finish("ORD-1", DONE, "c-2", "h-2", None, None),
        Finish("ORD-1", DELETED, version=Version("t", 1_795_689_000_000_000)),
        Finish("ORD-1", DEAD, fingerprint="fp-2", reason="cdp_rejected"),
        Finish("ORD-1", DEAD, version=Version("n", 3), reason=None),
    ],
    ids=["done", "done-unversioned", "deleted", "dead", "dead-no-reason"],
)
async def test_an_outcome_of_a_held_claim_is_what_the_rules_make_of_it(
    sqlite_store: SqliteStateStore, finish: Finish
) -> None:
    # record_many writes a held claim's outcome in one UPDATE, a translation of
    # rules.finish: the row it leaves is the rules' own, field for field (but the time).
    await sqlite_store.claim_many([("ORD-1", Want("fp-1", Version("n", 1)))], "w", LEASE)
    await sqlite_store.record_one("w", Finish("ORD-1", DONE, "c-1", "h-1", "fp-1", Version("n", 1)))
    await sqlite_store.claim_many([("ORD-1", Want("fp-2", Version("n", 2)))], "w", LEASE)
    held = await sqlite_store.lookup("ORD-1")
    expected = rules.finish(held, "w", 0.0, finish)
    expected = dataclasses.replace(expected, reason=expected.reason or None)  # "" reads as None
    commits = sqlite_store.commits
    assert await sqlite_store.record_many("w", [finish]) == [None]
    assert sqlite_store.commits == commits + 1
    stored = await sqlite_store.lookup("ORD-1")
    assert stored is not None
    assert dataclasses.replace(stored, updated_at=0.0) == expected


async def test_a_claim_many_that_fails_half_way_writes_none_of_it(
    sqlite_store: SqliteStateStore,
) -> None:
    # An orderRef sqlite cannot bind (a str with a lone surrogate cannot be encoded):
    # the claims before it in the batch are undone with it, the others' are not.
    other = asyncio.ensure_future(sqlite_store.claim("ORD-other", "w", LEASE))
    with pytest.raises(StateError):
        await sqlite_store.claim_many([("ORD-1", Want()), ("ORD-\udc80", Want())], "w", LEASE)
    assert (await other).status is ClaimStatus.CREATE
    assert (await sqlite_store.claim("ORD-1", "w2", LEASE)).status is ClaimStatus.CREATE


async def test_concurrent_completes_share_commits(sqlite_store: SqliteStateStore) -> None:
    refs = [f"ORD-{i}" for i in range(200)]
    await asyncio.gather(*(sqlite_store.claim(ref, "w1", LEASE) for ref in refs))
    before = sqlite_store.commits
    await asyncio.gather(*(sqlite_store.complete(ref, "w1", f"c-{ref}", "h") for ref in refs))
    commits = sqlite_store.commits - before
    assert 1 <= commits <= 20, f"{commits} commits for 200 completes: no group commit"
    claims = await asyncio.gather(*(sqlite_store.claim(ref, "w2", LEASE) for ref in refs))
    assert all(c.status is ClaimStatus.DUPLICATE for c in claims)


async def test_outcomes_that_trickle_in_share_a_commit_and_a_claim_does_not_wait(
    tmp_path: Path,
) -> None:
    # A window long enough to see: the outcomes of answers that come one loop
    # iteration after the other wait for each other; a claim (work waits for it) goes
    # at once and takes them along.
    store = SqliteStateStore(tmp_path / "state.db", commit_window=30.0)
    await store.open()
    try:
        refs = [f"ORD-{i}" for i in range(6)]
        await store.claim_many([(ref, Want()) for ref in refs], "w", LEASE)
        before = store.commits
        outcomes = []
        for ref in refs:
            outcomes.append(asyncio.create_task(store.complete(ref, "w", f"c-{ref}", "h")))
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        assert not any(outcome.done() for outcome in outcomes)  # waiting for company
        claim = await asyncio.wait_for(store.claim("ORD-new", "w", LEASE), 5)
        assert claim.status is ClaimStatus.CREATE
        await asyncio.gather(*outcomes)
        assert store.commits - before == 1  # the outcomes and the claim together
    finally:
        await store.close()


async def test_a_checkpoint_rides_with_an_outcomes_commit(sqlite_store: SqliteStateStore) -> None:
    await sqlite_store.claim("ORD-1", "w", LEASE)
    before = sqlite_store.commits
    checkpoint = asyncio.create_task(sqlite_store.set_checkpoint("file", "7"))
    await asyncio.sleep(0)  # queued, and in no hurry
    await sqlite_store.complete("ORD-1", "w", "c-1", "h")
    await checkpoint
    assert sqlite_store.commits - before == 1  # one commit for both
    assert await sqlite_store.get_checkpoint("file") == "7"
    before = sqlite_store.commits
    await asyncio.wait_for(sqlite_store.set_checkpoint("file", "8"), 5)  # alone: its own
    assert sqlite_store.commits - before == 1


async def test_an_urgent_checkpoint_does_not_wait_for_a_commit_to_ride_with(
    sqlite_store: SqliteStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A source that closes (or switches files) waits for its checkpoint: it goes at once.
    monkeypatch.setattr("worker.state.sqlite.CHECKPOINT_RIDE", 30.0)
    await asyncio.wait_for(sqlite_store.set_checkpoint("file", "9", urgent=True), 5)
    assert await sqlite_store.get_checkpoint("file") == "9"


async def test_a_failing_op_fails_only_itself(sqlite_store: SqliteStateStore) -> None:
    refs = [f"ORD-{i}" for i in range(20)]
    await asyncio.gather(*(sqlite_store.claim(ref, "w1", LEASE) for ref in refs))
    # Odd ones are completed by the wrong owner; all go into the same batches.
    results = await asyncio.gather(
        *(
            sqlite_store.complete(ref, "w1" if i % 2 == 0 else "intruder", "c", "h")
            for i, ref in enumerate(refs)
        ),
        return_exceptions=True,
    )
    assert [isinstance(r, StateError) for r in results] == [i % 2 == 1 for i in range(20)]
    claims = await asyncio.gather(*(sqlite_store.claim(ref, "w2", LEASE) for ref in refs))
    assert [c.status for c in claims] == [
        ClaimStatus.DUPLICATE if i % 2 == 0 else ClaimStatus.BUSY for i in range(20)
    ]


async def test_close_commits_everything_queued(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStateStore(path)
    await store.open()
    tasks = [asyncio.create_task(store.set_checkpoint(f"k{i}", str(i))) for i in range(100)]
    await asyncio.sleep(0)  # let every task queue its op
    await store.close()
    assert all(t.done() and t.exception() is None for t in tasks)

    reopened = SqliteStateStore(path)
    await reopened.open()
    assert await reopened.get_checkpoint("k99") == "99"
    await reopened.close()


async def test_waits_for_another_process_holding_the_write_lock(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStateStore(path, busy_timeout=5.0)
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    claim = asyncio.create_task(store.claim("ORD-1", "w1", LEASE))
    await asyncio.sleep(0.2)
    assert not claim.done()
    other.execute("COMMIT")
    other.close()
    assert (await claim).status is ClaimStatus.CREATE
    await store.close()


async def test_a_lock_held_too_long_fails_the_batch_not_the_store(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStateStore(path, busy_timeout=0.1)
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    results = await asyncio.gather(
        store.claim("ORD-1", "w1", LEASE),
        store.set_checkpoint("k", "v"),
        return_exceptions=True,
    )
    assert all(isinstance(r, StateError) for r in results)
    other.execute("ROLLBACK")
    other.close()
    assert (await store.claim("ORD-1", "w1", LEASE)).status is ClaimStatus.CREATE
    await store.close()


async def test_an_unopenable_path_is_a_config_error(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path / "missing-dir" / "state.db")
    with pytest.raises(ConfigError, match="--state / WORKER_STATE"):
        await store.open()
    await store.close()
    with pytest.raises(StateError):
        await store.claim("ORD-1", "w1", LEASE)


_KILLED_AFTER_COMPLETE = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from worker.state import SqliteStateStore

    async def main():
        store = SqliteStateStore(sys.argv[1])
        await store.open()
        await store.claim("ORD-1", "w1", 60)
        await store.complete("ORD-1", "w1", "contact-1", "href-1")
        os.kill(os.getpid(), signal.SIGKILL)  # no close(), no flush: only what is durable

    asyncio.run(main())
    """
)


@pytest.mark.slow
async def test_complete_is_durable_when_it_returns(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _KILLED_AFTER_COMPLETE, str(path)
    )
    assert await proc.wait() == -signal.SIGKILL
    store = SqliteStateStore(path)
    await store.open()
    claim = await store.claim("ORD-1", "w2", LEASE, Want("changed"))
    assert (claim.status, claim.contact_ref) == (ClaimStatus.UPDATE, "contact-1")
    await store.close()


async def test_a_file_of_the_first_release_is_migrated(tmp_path: Path) -> None:
    """Its done records have no fingerprint: content unknown, updated once."""
    path = tmp_path / "state.db"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE orders (order_ref TEXT PRIMARY KEY, status TEXT NOT NULL, owner TEXT,"
        " lease_until REAL, attempts INTEGER NOT NULL DEFAULT 0, contact_ref TEXT,"
        " href TEXT, reason TEXT, updated_at REAL NOT NULL)"
    )
    old.execute(
        "INSERT INTO orders VALUES ('ORD-1', 'done', NULL, 0, 1, 'c-1', 'h-1', NULL, ?)",
        (time.time(),),
    )
    old.commit()
    old.close()
    store = SqliteStateStore(path)
    await store.open()
    claim = await store.claim("ORD-1", "w1", LEASE, Want("fp-a"))
    assert (claim.status, claim.contact_ref) == (ClaimStatus.UPDATE, "c-1")
    await store.complete("ORD-1", "w1", "c-1", "h-1", fingerprint="fp-a")
    assert (await store.claim("ORD-1", "w2", LEASE, Want("fp-a"))).status is ClaimStatus.DUPLICATE
    await store.close()


def test_the_location_is_the_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert SqliteStateStore("./worker-state.db").location == f"sqlite {tmp_path}/worker-state.db"
