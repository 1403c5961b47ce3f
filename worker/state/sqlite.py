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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from worker._batching import Batcher
from worker.errors import ConfigError, StateError, WorkerError
from worker.state import base
from worker.state.base import DEAD, DONE, IN_FLIGHT, Claim, ClaimStatus, StateStore, not_owner

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]

URL_PREFIX = "sqlite:///"

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
        updated_at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS checkpoints (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        updated_at REAL NOT NULL
    )""",
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
    `busy_timeout`: seconds to wait for another process's write lock.
    `commits` counts committed transactions (observability, and proof of batching).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        retention_seconds: float | None = None,
        max_batch: int = 512,
        busy_timeout: float = 30.0,
    ) -> None:
        self.path = os.fspath(path)
        self.commits = 0
        self._retention = retention_seconds
        self._busy_timeout = busy_timeout
        self._batcher: Batcher[Op, Any] = Batcher(
            self._commit, name="state-sqlite-commits", max_batch=max_batch
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

    async def _submit(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if not self._accepting:
            raise StateError("state store is not open")
        result: T = await self._batcher.submit(fn)
        return result

    # -- the contract --------------------------------------------------------------------

    async def claim(self, order_ref: str, owner: str, lease_seconds: float) -> Claim:
        return await self._submit(lambda conn: _claim(conn, order_ref, owner, lease_seconds))

    async def renew(self, order_ref: str, owner: str, lease_seconds: float) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            t = base.now()
            cur = conn.execute(
                "UPDATE orders SET lease_until = ?, updated_at = ?"
                " WHERE order_ref = ? AND status = ? AND owner = ?",
                (t + lease_seconds, t, order_ref, IN_FLIGHT, owner),
            )
            return cur.rowcount == 1

        return await self._submit(op)

    async def complete(self, order_ref: str, owner: str, contact_ref: str, href: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE orders SET status = ?, contact_ref = ?, href = ?, lease_until = 0,"
                " updated_at = ? WHERE order_ref = ? AND status = ? AND owner = ?",
                (DONE, contact_ref, href, base.now(), order_ref, IN_FLIGHT, owner),
            )
            # Completing a done record again keeps the first contact: the one CDP holds.
            if cur.rowcount == 0 and _status(conn, order_ref) != DONE:
                raise not_owner(order_ref, owner, "complete")

        await self._submit(op)

    async def fail(self, order_ref: str, owner: str, reason: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE orders SET status = ?, reason = ?, lease_until = 0, updated_at = ?"
                " WHERE order_ref = ? AND status = ? AND owner = ?",
                (DEAD, reason, base.now(), order_ref, IN_FLIGHT, owner),
            )
            if cur.rowcount == 0:
                raise not_owner(order_ref, owner, "fail")

        await self._submit(op)

    async def release(self, order_ref: str, owner: str, *, sent: bool) -> None:
        def op(conn: sqlite3.Connection) -> None:
            if sent:
                conn.execute(
                    "UPDATE orders SET lease_until = 0, updated_at = ?"
                    " WHERE order_ref = ? AND status = ? AND owner = ?",
                    (base.now(), order_ref, IN_FLIGHT, owner),
                )
            else:
                conn.execute(
                    "DELETE FROM orders WHERE order_ref = ? AND status = ? AND owner = ?",
                    (order_ref, IN_FLIGHT, owner),
                )

        await self._submit(op)

    async def forget(self, order_ref: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "DELETE FROM orders WHERE order_ref = ? AND status = ?", (order_ref, DEAD)
            )
            return cur.rowcount == 1

        return await self._submit(op)

    async def get_checkpoint(self, key: str) -> str | None:
        def op(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT value FROM checkpoints WHERE key = ?", (key,)).fetchone()
            return None if row is None else str(row[0])

        return await self._submit(op)

    async def set_checkpoint(self, key: str, value: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO checkpoints (key, value, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
                " updated_at = excluded.updated_at",
                (key, value, base.now()),
            )

        await self._submit(op)

    @property
    def location(self) -> str:
        return f"sqlite {os.path.abspath(self.path)}"

    async def is_empty(self) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            return conn.execute("SELECT 1 FROM orders LIMIT 1").fetchone() is None

        return await self._submit(op)

    async def sweep(self, retention_seconds: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "DELETE FROM orders WHERE status IN (?, ?) AND updated_at < ?",
                (DONE, DEAD, base.now() - retention_seconds),
            )
            return cur.rowcount

        return await self._submit(op)


# -- operations: run on the writer thread, inside the batch's transaction --------------------


def _claim(conn: sqlite3.Connection, order_ref: str, owner: str, lease_seconds: float) -> Claim:
    t = base.now()
    row = conn.execute(
        "SELECT status, lease_until, attempts, contact_ref, href, reason"
        " FROM orders WHERE order_ref = ?",
        (order_ref,),
    ).fetchone()
    if row is None:
        conn.execute(
            "INSERT INTO orders (order_ref, status, owner, lease_until, attempts, updated_at)"
            " VALUES (?, ?, ?, ?, 1, ?)",
            (order_ref, IN_FLIGHT, owner, t + lease_seconds, t),
        )
        return Claim(ClaimStatus.CLAIMED, attempts=1)
    status, lease_until, attempts, contact_ref, href, reason = row
    if status == DONE:
        return Claim(ClaimStatus.DONE, contact_ref=contact_ref, href=href)
    if status == DEAD:
        return Claim(ClaimStatus.DEAD, reason=reason)
    if lease_until > t:
        return Claim(ClaimStatus.BUSY)
    # Lease ran out (or was given back after a send): the previous owner may have POSTed,
    # so the new owner must reconcile before sending.
    conn.execute(
        "UPDATE orders SET owner = ?, lease_until = ?, attempts = ?, updated_at = ?"
        " WHERE order_ref = ?",
        (owner, t + lease_seconds, attempts + 1, t, order_ref),
    )
    return Claim(ClaimStatus.IN_DOUBT, attempts=attempts + 1)


def _status(conn: sqlite3.Connection, order_ref: str) -> str | None:
    row = conn.execute("SELECT status FROM orders WHERE order_ref = ?", (order_ref,)).fetchone()
    return None if row is None else str(row[0])


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
