"""`sqlite:///PATH` state store: the default, durable on one host, with group commits.

Why a writer thread: sqlite3 blocks, and durability (`synchronous=FULL`) costs an fsync per
commit. One thread (a one-worker executor) owns the only connection; coroutines submit
operations to a `Batcher`, which hands everything queued meanwhile (up to `max_batch`)
to that thread as one list. The thread runs it in ONE `BEGIN IMMEDIATE` transaction and
commits once; only then do the callers get their results, so "`complete()` returned"
means "on disk" while a burst of events shares one fsync (and one thread hop).

`BEGIN IMMEDIATE` takes the file's write lock before the first read, so a claim's
read-then-write is atomic even against other processes using the same file; they wait
on `busy_timeout` instead of failing with "database is locked".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from worker._batching import Batcher
from worker.errors import ConfigError, NotOwner, StateError, WorkerError
from worker.state import base, rules
from worker.state.base import (
    ANY_UPSERT,
    DELETED,
    DONE,
    FINISHED,
    Claim,
    Finish,
    Record,
    StateStore,
    Want,
)

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]

URL_PREFIX = "sqlite:///"
# How long a commit may wait for more operations (see `Batcher`): outcomes of events
# whose requests end within the window share one transaction, one fsync and one hop into
# the writer thread. A commit costs about 225 us of CPU, an operation in it 40, and at a
# paced rate the wake-ups around it (the writer's, the loop's when it is done) cost as
# much again. At 40 ms per request a commit carried 5 outcomes with a fixed 2 ms window,
# 15 with this one. Claims and reads never wait (urgent): the window holds up acks, not
# work.
COMMIT_WINDOW = 0.05
# The window of a commit whose first outcome came after a gap stretches up to this (see
# STRETCH in `Batcher`): at a paced rate the answers of one slice come back 100 ms after
# the last's, and two slices share a commit (with 50 ms, none did); gaps over 120 ms
# (rates under 8/s) commit at once. Without a gap the window stays short: the last
# outcomes of a run do not wait this long for company.
COMMIT_LONGEST = 0.3
# A commit with this many operations goes at once: more would save little, and the
# events it holds up are pending for longer.
COMMIT_ENOUGH = 32
# Longest a checkpoint waits for a commit to ride with before it has one of its own: longer
# than a rate limit's slice (paced answers come back a slice apart, and the checkpoint of
# one group's acks rides with the next group's outcomes). A crash reads again at most what
# was acked this long, and the file source's CHECKPOINT_INTERVAL, before it.
CHECKPOINT_RIDE = 0.25

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS orders (
        order_ref TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        owner TEXT,
        lease_until REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        contact_ref TEXT,
        href TEXT,
        reason TEXT,
        updated_at REAL NOT NULL,
        op TEXT,
        fingerprint TEXT,
        version_kind TEXT,
        version INTEGER
    )""",
    """CREATE TABLE IF NOT EXISTS checkpoints (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        updated_at REAL NOT NULL
    )""",
)


# Columns added since the first release, for files written by it (ALTER TABLE at open).
_ADDED_COLUMNS = (
    ("op", "TEXT"),
    ("fingerprint", "TEXT"),
    ("version_kind", "TEXT"),
    ("version", "INTEGER"),
)
# One row, in Record.from_columns' order.
_SELECT = f"SELECT {', '.join(base.COLUMNS)} FROM orders WHERE order_ref = ?"  # noqa: S608 - constant names
# Many rows at once, by IN lists of these sizes (see _read_many), order_ref first.
_IN_SIZES = (1, 4, 16, 64, 256)
_SELECT_IN = {
    size: f"SELECT order_ref, {', '.join(base.COLUMNS)} FROM orders"  # noqa: S608 - constant names
    f" WHERE order_ref IN ({', '.join('?' * size)})"
    for size in _IN_SIZES
}
_REPLACE = (
    "INSERT OR REPLACE INTO orders (order_ref, status, updated_at, owner, lease_until,"
    " attempts, op, contact_ref, href, fingerprint, version_kind, version, reason)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

# The outcome of a claim we hold, in one statement (nearly every outcome): `rules.finish`
# translated (`_finished`: the lease and op cleared, the version moved forward; done
# and deleted set the contact, None for deleted; dead keeps it). ?1 status, ?2 now, ?3
# contact ref, ?4 href, ?5 fingerprint, ?6 reason, ?7 version kind, ?8 version, ?9
# order_ref, ?10 owner. No row matched: the store reads the record and `rules.finish`
# answers (a retried write that had landed, or NotOwner).
_FINISH_HELD = (
    "UPDATE orders SET status = ?1, updated_at = ?2, owner = NULL, lease_until = 0,"
    " op = NULL, contact_ref = CASE WHEN ?1 = 'dead' THEN contact_ref ELSE ?3 END,"
    " href = CASE WHEN ?1 = 'dead' THEN href ELSE ?4 END, fingerprint = ?5, reason = ?6,"
    " version_kind = COALESCE(?7, version_kind),"
    " version = CASE WHEN ?7 IS NULL THEN version ELSE ?8 END"
    " WHERE order_ref = ?9 AND status = 'in_flight' AND owner = ?10"
)


def path_from_url(url: str) -> str:
    """`sqlite:///./rel.db` -> `./rel.db`, `sqlite:////abs/x.db` -> `/abs/x.db`."""
    if not url.startswith(URL_PREFIX) or len(url) == len(URL_PREFIX):
        raise ConfigError(
            "--state / WORKER_STATE: a sqlite URL is sqlite:///RELATIVE/PATH or "
            "sqlite:////ABSOLUTE/PATH (e.g. sqlite:///./worker-state.db)"
        )
    return url[len(URL_PREFIX) :]


class SqliteStateStore(StateStore):
    """State in one sqlite file (WAL, synchronous=FULL), written by one thread.

    `retention_seconds`: done/dead records older than this are swept by `open()`; None
    sweeps nothing there. `max_batch`: most operations per transaction.
    `busy_timeout`: seconds to wait for another process's write lock. `commit_window`:
    seconds a commit waits for more operations (COMMIT_WINDOW; after a gap, up to
    COMMIT_LONGEST).
    `commits` counts committed transactions (observability, and proof of batching).
    """

    groups_writes = True  # the writer thread commits whatever queued meanwhile at once

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        retention_seconds: float | None = None,
        max_batch: int = 512,
        busy_timeout: float = 30.0,
        commit_window: float = COMMIT_WINDOW,
    ) -> None:
        self.path = os.fspath(path)
        self.commits = 0
        self._retention = retention_seconds
        self._busy_timeout = busy_timeout
        self._batcher: Batcher[Op, Any] = Batcher(
            self._commit,
            name="state-sqlite-commits",
            max_batch=max_batch,
            window=commit_window,
            longest=COMMIT_LONGEST,
            enough=COMMIT_ENOUGH,
        )
        self._writer: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._accepting = False

    @classmethod
    def from_url(cls, url: str, *, retention_seconds: float | None = None) -> SqliteStateStore:
        return cls(path_from_url(url), retention_seconds=retention_seconds)

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        if self._writer is not None:
            raise StateError("state store opened twice")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="state-sqlite-writer")
        connecting = asyncio.get_running_loop().run_in_executor(self._writer, self._connect)
        try:
            self._conn = await asyncio.shield(connecting)
        except BaseException:  # ConfigError or StateError from _connect, or a cancellation
            # A cancelled open still gets its connection: close it once it is there.
            connecting.add_done_callback(_close_connection)
            self._writer.shutdown(wait=False)
            raise
        self._accepting = True
        if self._retention is not None:
            await self.sweep(self._retention)

    async def close(self) -> None:
        if self._writer is None or self._conn is None:
            return
        self._accepting = False
        try:
            await self._batcher.wait_idle()  # every operation accepted is committed first
            conn, self._conn = self._conn, None
            if conn is not None:  # not closed meanwhile by a second close()
                await self._on_writer(conn.close)
        finally:
            self._writer.shutdown(wait=False)  # idle by now, or its thread ends after the op

    # -- the writer thread ---------------------------------------------------------------

    async def _on_writer(self, fn: Callable[[], T]) -> T:
        assert self._writer is not None
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn)

    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, one per batch.
            # timeout= is sqlite's busy_timeout: wait for another process's write lock.
            # check_same_thread=False: made here, used here, closed here (one thread),
            # but that thread is the executor's, not the one sqlite3 saw first.
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise ConfigError(
                f"--state / WORKER_STATE: cannot open sqlite database {self.path!r}: {exc}"
            ) from exc
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            have = {row[1] for row in conn.execute("PRAGMA table_info(orders)")}
            for name, kind in _ADDED_COLUMNS:
                if name not in have:
                    conn.execute(f"ALTER TABLE orders ADD COLUMN {name} {kind}")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.close()
            raise StateError(f"cannot initialise sqlite database {self.path!r}: {exc}") from exc
        return conn

    async def _commit(self, ops: list[Op]) -> list[Any]:
        conn = self._conn
        if conn is None:
            raise StateError("state store closed")
        return await self._on_writer(lambda: self._run_batch(conn, ops))

    def _run_batch(self, conn: sqlite3.Connection, batch: list[Op]) -> list[Any]:
        """One transaction for the whole batch: each op's result or exception, in order."""
        outcomes: list[Any] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                # Every op checks before it writes, so one that raises has written nothing
                # and fails only its own caller (no savepoint needed).
                try:
                    outcomes.append(op(conn))
                except Exception as exc:  # noqa: BLE001 - it fails its own caller only
                    outcomes.append(_as_state_error(exc))
            conn.execute("COMMIT")
        except Exception as exc:  # noqa: BLE001 - every caller of the batch must learn of it
            # BEGIN, an op's statement or the commit failed: nothing of this batch is durable.
            if conn.in_transaction:
                # It may fail too if sqlite already rolled back or the connection is gone.
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            failures: list[Any] = []
            for _ in batch:  # one exception object per caller: each gets its own traceback
                error = StateError(f"sqlite transaction failed: {exc}")
                error.__cause__ = exc
                failures.append(error)
            return failures
        self.commits += 1
        return outcomes

    # -- submitting ----------------------------------------------------------------------

    async def _submit(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        within: float | None = None,
        urgent: bool = False,
    ) -> T:
        """`fn` in the next transaction (`within`, `urgent`: see `Batcher.submit`)."""
        if not self._accepting:
            raise StateError("state store is not open")
        result: T = await self._batcher.submit(fn, within=within, urgent=urgent)
        return result

    # -- the contract --------------------------------------------------------------------

    async def claim(
        self, order_ref: str, owner: str, lease_seconds: float, want: Want = ANY_UPSERT
    ) -> Claim:
        claims = await self._submit(
            lambda conn: _claim_all(conn, [(order_ref, want)], owner, lease_seconds), urgent=True
        )
        return claims[0]

    async def claim_many(
        self, wants: Sequence[tuple[str, Want]], owner: str, lease_seconds: float
    ) -> list[Claim]:
        """One op of the batch's transaction for all of them: one hop into the writer
        thread, and all or none of them written (`_all_or_none`)."""
        base.check_distinct([ref for ref, _ in wants], "claim_many")

        def op(conn: sqlite3.Connection) -> list[Claim]:
            return _claim_all(conn, wants, owner, lease_seconds)

        # Urgent: the pipeline starts the batch's work when it has the claims.
        return await self._submit(_all_or_none(op), urgent=True) if wants else []

    async def renew(self, order_ref: str, owner: str, lease_seconds: float) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            rec = rules.renew(_read(conn, order_ref), owner, base.now(), lease_seconds)
            if rec is None:
                return False
            _write(conn, order_ref, rec)
            return True

        # Urgent: a request may wait for it (`Leases.ensure`).
        return await self._submit(op, urgent=True)

    async def _change(
        self, order_ref: str, change: Callable[[Record | None, float], Record | None]
    ) -> None:
        """Apply one of `rules`' transitions to the order's row, in the batch's transaction."""

        def op(conn: sqlite3.Connection) -> None:
            found = _read(conn, order_ref)
            _write(conn, order_ref, change(found, base.now()), found)

        await self._submit(op)

    async def record_many(self, owner: str, finishes: Sequence[Finish]) -> list[NotOwner | None]:
        """One op of the batch's transaction for all of them (each rule checks before it
        writes: a refused one writes nothing, and refuses only itself)."""
        base.check_distinct([finish.order_ref for finish in finishes], "record_many")

        @_all_or_none
        def op(conn: sqlite3.Connection) -> list[NotOwner | None]:
            t = base.now()
            answers: list[NotOwner | None] = []
            for finish in finishes:
                if _finish_held(conn, owner, t, finish):
                    answers.append(None)
                    continue
                found = _read(conn, finish.order_ref)
                try:
                    _write(conn, finish.order_ref, rules.finish(found, owner, t, finish), found)
                except NotOwner as refused:
                    answers.append(refused)
                else:
                    answers.append(None)
            return answers

        return await self._submit(op) if finishes else []

    async def release(self, order_ref: str, owner: str, *, sent: bool) -> None:
        await self._change(order_ref, lambda rec, now: rules.release(rec, owner, now, sent=sent))

    async def forget(self, order_ref: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            reopened = rules.forget(_read(conn, order_ref), base.now())
            if reopened is None:
                return False
            _write(conn, order_ref, reopened)
            return True

        return await self._submit(op)

    async def lookup(self, order_ref: str) -> Record | None:
        return await self._submit(lambda conn: _read(conn, order_ref), urgent=True)

    async def get_checkpoint(self, key: str) -> str | None:
        def op(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT value FROM checkpoints WHERE key = ?", (key,)).fetchone()
            return None if row is None else str(row[0])

        return await self._submit(op, urgent=True)

    async def set_checkpoint(self, key: str, value: str, *, urgent: bool = False) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO checkpoints (key, value, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
                " updated_at = excluded.updated_at",
                (key, value, base.now()),
            )

        # An older checkpoint only makes a restart skip fewer lines: unless the caller waits
        # for it, it rides with the outcomes' next commit rather than paying for its own.
        await self._submit(op, within=None if urgent else CHECKPOINT_RIDE, urgent=urgent)

    @property
    def location(self) -> str:
        return f"sqlite {os.path.abspath(self.path)}"

    async def is_empty(self) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            return conn.execute("SELECT 1 FROM orders LIMIT 1").fetchone() is None

        return await self._submit(op, urgent=True)

    async def sweep(self, retention_seconds: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "DELETE FROM orders WHERE status IN (?, ?, ?) AND updated_at < ?",
                (*FINISHED, base.now() - retention_seconds),
            )
            return cur.rowcount

        return await self._submit(op)


# -- operations: run on the writer thread, inside the batch's transaction --------------------


def _all_or_none(op: Callable[[sqlite3.Connection], T]) -> Callable[[sqlite3.Connection], T]:
    """`op` of many orders, undone whole if it fails part-way (a savepoint): it fails
    its own caller only, as an op of one order does, and writes nothing."""

    def whole(conn: sqlite3.Connection) -> T:
        conn.execute("SAVEPOINT many")
        try:
            return op(conn)
        except BaseException:
            conn.execute("ROLLBACK TO many")
            raise
        finally:
            conn.execute("RELEASE many")

    return whole


def _claim_all(
    conn: sqlite3.Connection,
    wants: Sequence[tuple[str, Want]],
    owner: str,
    lease_seconds: float,
) -> list[Claim]:
    """`rules.claim` for each order: the rows read in a few statements (`_read_many`),
    those it changes written in one executemany (a third of the statements of one claim
    after the other)."""
    t = base.now()
    found = _read_many(conn, [ref for ref, _ in wants])
    answers: list[Claim] = []
    rows: list[tuple[Any, ...]] = []
    for ref, want in wants:
        was = found.get(ref)
        answer, rec = rules.claim(was, owner, t, lease_seconds, want)
        answers.append(answer)
        if rec is not was and rec is not None:  # rules.claim never deletes a record
            rows.append(_row(ref, rec))
    conn.executemany(_REPLACE, rows)
    return answers


def _finish_held(conn: sqlite3.Connection, owner: str, now: float, finish: Finish) -> bool:
    """Record `finish` if `owner` holds the order (`_FINISH_HELD`); False if not."""
    status = finish.status
    fields: tuple[str | None, str | None, str | None, str | None]
    if status == DONE:
        fields = (finish.contact_ref or "", finish.href or "", finish.fingerprint, None)
    elif status == DELETED:
        fields = (None, None, None, None)
    else:  # dead
        fields = (None, None, finish.fingerprint, finish.reason or "")
    kind, version = finish.version if finish.version is not None else (None, None)
    values = (status, now, *fields, kind, version, finish.order_ref, owner)
    return bool(conn.execute(_FINISH_HELD, values).rowcount)


def _read(conn: sqlite3.Connection, order_ref: str) -> Record | None:
    row = conn.execute(_SELECT, (order_ref,)).fetchone()
    return None if row is None else Record.from_columns(row)


def _read_many(conn: sqlite3.Connection, order_refs: list[str]) -> dict[str, Record]:
    """The records of those orders that have one. IN lists of a few sizes only (the last
    ref repeated up to the size): sqlite3 keeps one prepared statement per size."""
    found: dict[str, Record] = {}
    for start in range(0, len(order_refs), _IN_SIZES[-1]):
        chunk = order_refs[start : start + _IN_SIZES[-1]]
        size = next(size for size in _IN_SIZES if size >= len(chunk))
        chunk += [chunk[-1]] * (size - len(chunk))
        for row in conn.execute(_SELECT_IN[size], chunk):
            found[row[0]] = Record.from_columns(row[1:])
    return found


def _write(
    conn: sqlite3.Connection, order_ref: str, rec: Record | None, was: Record | None = None
) -> None:
    """Store `rec` (None: delete the row); `was`, if given, is what was read: unchanged,
    nothing is written."""
    if rec is was:
        return
    if rec is None:
        conn.execute("DELETE FROM orders WHERE order_ref = ?", (order_ref,))
        return
    conn.execute(_REPLACE, _row(order_ref, rec))


def _row(order_ref: str, rec: Record) -> tuple[Any, ...]:
    """`rec` as `_REPLACE`'s values."""
    kind, version = rec.version if rec.version is not None else (None, None)
    return (
        order_ref, rec.status, rec.updated_at, rec.owner, rec.lease_until, rec.attempts,
        rec.op, rec.contact_ref, rec.href, rec.fingerprint, kind, version, rec.reason,
    )  # fmt: skip


def _close_connection(connecting: asyncio.Future[sqlite3.Connection]) -> None:
    if not connecting.cancelled() and connecting.exception() is None:
        connecting.result().close()


def _as_state_error(exc: Exception) -> BaseException:
    """Callers catch StateError; our own errors pass through, sqlite's get wrapped."""
    if isinstance(exc, WorkerError):
        return exc
    error = StateError(f"state operation failed: {exc}")
    error.__cause__ = exc
    return error
