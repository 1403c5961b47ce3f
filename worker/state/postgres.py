"""`postgresql://` / `postgres://` state store: one database shared by every replica.

Two tables (names prefixed by `table_prefix`, default `cdp_sync_`): `cdp_sync_orders`,
the sqlite `orders` columns, and `cdp_sync_checkpoints`. `open()` creates them if missing.

Why single statements: each operation is one statement on a pooled connection, so it is
atomic on its own (no transaction to hold open across round trips) and costs one round
trip (asyncpg prepares and caches it per connection). The claim is one
`INSERT ... ON CONFLICT DO UPDATE ... WHERE <lease ran out>`: the row lock it takes makes
two replicas' claims serialise on the server, never check-then-insert in the client.

Why epoch seconds from the client (`base.now()`) rather than `now()` in SQL: leases are
compared on the same clock in every backend (and the contract's fake clock works); the
replicas' clocks must agree (NTP), as DESIGN section 4 already assumes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Protocol

import asyncpg

from worker._urls import ParsedUrl, check_server_url
from worker.errors import ConfigError, StateError
from worker.state import base
from worker.state.base import DEAD, DONE, Claim, ClaimStatus, StateStore, not_owner

OPTION = "--state / WORKER_STATE"
DEFAULT_TABLE_PREFIX = "cdp_sync_"

_PREFIX_RE = re.compile(r"[a-z_][a-z0-9_]{0,40}")
# Failures of the server, the connection or the client library: all become StateError.
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)


class _Pool(Protocol):
    """The part of asyncpg.Pool this store uses (asyncpg ships no type hints)."""

    async def fetchrow(self, query: str, *args: object) -> Mapping[str, Any] | None: ...
    async def fetchval(self, query: str, *args: object) -> Any: ...
    async def execute(self, query: str, *args: object) -> str: ...
    async def close(self) -> None: ...


# The statements, with `{orders}` / `{checkpoints}` standing for the prefixed table names.
# Identifiers cannot be bound parameters, so they are filled in once by `_Sql`; the prefix
# is checked against _PREFIX_RE first. Every value is a bound parameter ($1...).

# One simple-protocol query: its statements run as one implicit transaction. The advisory
# lock keeps replicas starting together from racing on CREATE TABLE (IF NOT EXISTS alone
# can still fail on the catalog's unique indexes).
_SCHEMA = """
    SELECT pg_advisory_xact_lock(hashtext('cdp-sync schema {orders}'));
    CREATE TABLE IF NOT EXISTS {orders} (
        order_ref text PRIMARY KEY,
        status text NOT NULL CHECK (status IN ('in_flight', 'done', 'dead')),
        owner text,
        lease_until double precision NOT NULL DEFAULT 0,
        attempts integer NOT NULL DEFAULT 0,
        contact_ref text,
        href text,
        reason text,
        updated_at double precision NOT NULL
    );
    CREATE INDEX IF NOT EXISTS {orders}_finished_idx
        ON {orders} (updated_at) WHERE status IN ('done', 'dead');
    CREATE TABLE IF NOT EXISTS {checkpoints} (
        key text PRIMARY KEY,
        value text NOT NULL,
        updated_at double precision NOT NULL
    );
"""

# $1 order_ref, $2 owner, $3 now, $4 lease_until. ON CONFLICT locks the existing row, and
# its WHERE sees the latest committed version: of two racing takeovers only one matches,
# the other waits for the lock and then finds a live lease. Inserted rows have attempts = 1
# and taken-over ones >= 2, which tells CLAIMED from IN_DOUBT.
# When nothing was written, the second SELECT reports the row (BUSY, DONE or DEAD) as the
# statement's snapshot shows it. A row another claimer committed after that snapshot is
# invisible, hence the LEFT JOIN: no row there still means "someone else holds it" (BUSY),
# in the same round trip. BUSY only ever makes the caller ask again later, so it is also a
# safe answer when the holder has finished meanwhile.
_CLAIM = """
    WITH taken AS (
        INSERT INTO {orders} AS o
            (order_ref, status, owner, lease_until, attempts, updated_at)
        VALUES ($1, 'in_flight', $2, $4, 1, $3)
        ON CONFLICT (order_ref) DO UPDATE
            SET owner = EXCLUDED.owner, lease_until = EXCLUDED.lease_until,
                attempts = o.attempts + 1, updated_at = EXCLUDED.updated_at
            WHERE o.status = 'in_flight' AND o.lease_until <= EXCLUDED.updated_at
        RETURNING o.attempts
    )
    SELECT TRUE AS taken, attempts, NULL::text AS status,
           NULL::text AS contact_ref, NULL::text AS href, NULL::text AS reason
      FROM taken
    UNION ALL
    SELECT FALSE, 0, r.status, r.contact_ref, r.href, r.reason
      FROM (SELECT 1) AS one
      LEFT JOIN {orders} AS r ON r.order_ref = $1
     WHERE NOT EXISTS (SELECT 1 FROM taken)
"""

# The rest: $1 order_ref, $2 owner, then as listed. Only the in-flight owner matches.
_OWNED = "order_ref = $1 AND status = 'in_flight' AND owner = $2"
_RENEW = "UPDATE {orders} SET lease_until = $4, updated_at = $3 WHERE {owned}"
_COMPLETE = (
    "UPDATE {orders} SET status = 'done', contact_ref = $3, href = $4, lease_until = 0,"
    " updated_at = $5 WHERE {owned}"
)
_FAIL = (
    "UPDATE {orders} SET status = 'dead', reason = $3, lease_until = 0, updated_at = $4"
    " WHERE {owned}"
)
_RELEASE_SENT = "UPDATE {orders} SET lease_until = 0, updated_at = $3 WHERE {owned}"
_RELEASE_UNSENT = "DELETE FROM {orders} WHERE {owned}"
_FORGET = "DELETE FROM {orders} WHERE order_ref = $1 AND status = 'dead'"
_STATUS = "SELECT status FROM {orders} WHERE order_ref = $1"
_ANY_ORDER = "SELECT EXISTS (SELECT 1 FROM {orders})"
_GET_CHECKPOINT = "SELECT value FROM {checkpoints} WHERE key = $1"
_SET_CHECKPOINT = (
    "INSERT INTO {checkpoints} (key, value, updated_at) VALUES ($1, $2, $3)"
    " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at"
)
# $1 cutoff. The partial index on updated_at of finished rows serves it.
_SWEEP = "DELETE FROM {orders} WHERE status IN ('done', 'dead') AND updated_at < $1"


class _Sql:
    """The statements for one table prefix, rendered once."""

    def __init__(self, prefix: str) -> None:
        names = {
            "orders": f"{prefix}orders",
            "checkpoints": f"{prefix}checkpoints",
            "owned": _OWNED,
        }
        self.schema = _SCHEMA.format_map(names)
        self.claim = _CLAIM.format_map(names)
        self.renew = _RENEW.format_map(names)
        self.complete = _COMPLETE.format_map(names)
        self.fail = _FAIL.format_map(names)
        self.release_sent = _RELEASE_SENT.format_map(names)
        self.release_unsent = _RELEASE_UNSENT.format_map(names)
        self.forget = _FORGET.format_map(names)
        self.status = _STATUS.format_map(names)
        self.get_checkpoint = _GET_CHECKPOINT.format_map(names)
        self.set_checkpoint = _SET_CHECKPOINT.format_map(names)
        self.sweep = _SWEEP.format_map(names)
        self.any_order = _ANY_ORDER.format_map(names)


def _check_url(url: str) -> str:
    """Where the database is, for messages; ConfigError for a URL that is not one."""
    parts = check_server_url(
        url,
        OPTION,
        kind="postgresql",
        schemes=("postgresql", "postgres"),
        usage="a postgres state URL is postgresql://USER[:PASSWORD]@HOST:5432/DATABASE",
    )
    where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or '/'}"
    return where


def _rowcount(status: str) -> int:
    """asyncpg's command tag, e.g. `UPDATE 1` -> 1."""
    return int(status.rpartition(" ")[2] or 0)


class PostgresStateStore(StateStore):
    """State in PostgreSQL through an asyncpg pool; every operation is one statement.

    `retention_seconds`: done/dead records older than this are swept by `open()`; None
    sweeps nothing there. `table_prefix` names the tables (lowercase letters, digits and
    `_`), so deployments or test runs can share a database. `min_size`/`max_size` bound
    the pool; `command_timeout` bounds every statement, `connect_timeout` each connect.
    """

    def __init__(
        self,
        url: str,
        *,
        retention_seconds: float | None = None,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        min_size: int = 1,
        max_size: int = 10,
        command_timeout: float = 10.0,
        connect_timeout: float = 10.0,
    ) -> None:
        if not _PREFIX_RE.fullmatch(table_prefix):
            raise ValueError(f"table_prefix {table_prefix!r}: use [a-z_][a-z0-9_]*")
        self._where = _check_url(url)
        self._parsed = ParsedUrl.split(url, OPTION)  # its secrets, scrubbed from messages
        self._url = url
        self._retention = retention_seconds
        self._pool_options: dict[str, Any] = {
            "min_size": min_size,
            "max_size": max_size,
            "command_timeout": command_timeout,
            "timeout": connect_timeout,
        }
        self.table_prefix = table_prefix
        self._sql = _Sql(table_prefix)
        self._pool: _Pool | None = None
        self._opened = False

    @classmethod
    def from_url(cls, url: str, *, retention_seconds: float | None = None) -> PostgresStateStore:
        return cls(url, retention_seconds=retention_seconds)

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        if self._opened:
            raise StateError("state store opened twice")
        self._opened = True
        try:
            pool: _Pool = await asyncpg.create_pool(self._url, **self._pool_options)
        except asyncpg.ClientConfigurationError as exc:
            raise ConfigError(f"{OPTION}: invalid postgresql URL: {self._scrub(exc)}") from None
        except _DB_ERRORS as exc:
            # create_pool closes whatever it had opened before it raises.
            raise StateError(
                f"{OPTION}: cannot reach postgresql at {self._where}: {self._scrub(exc)}"
            ) from None
        try:
            await pool.execute(self._sql.schema)
        except _DB_ERRORS as exc:
            await pool.close()
            raise StateError(
                f"cannot create the state tables in postgresql at {self._where}: {self._scrub(exc)}"
            ) from None
        self._pool = pool
        if self._retention is not None:
            await self.sweep(self._retention)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()  # waits for statements in progress, then disconnects

    # -- plumbing ------------------------------------------------------------------------

    def _scrub(self, exc: BaseException) -> str:
        return self._parsed.quote(exc)

    def _live_pool(self) -> _Pool:
        if self._pool is None:
            raise StateError("state store is not open")
        return self._pool

    def _error(self, action: str, exc: BaseException) -> StateError:
        return StateError(
            f"postgresql state store at {self._where}: {action} failed: {self._scrub(exc)}"
        )

    async def _fetchrow(self, action: str, query: str, *args: object) -> Mapping[str, Any] | None:
        pool = self._live_pool()
        try:
            return await pool.fetchrow(query, *args)
        except _DB_ERRORS as exc:
            raise self._error(action, exc) from None

    async def _fetchval(self, action: str, query: str, *args: object) -> Any:
        pool = self._live_pool()
        try:
            return await pool.fetchval(query, *args)
        except _DB_ERRORS as exc:
            raise self._error(action, exc) from None

    async def _execute(self, action: str, query: str, *args: object) -> int:
        """Run one statement; the number of rows it touched."""
        pool = self._live_pool()
        try:
            return _rowcount(await pool.execute(query, *args))
        except _DB_ERRORS as exc:
            raise self._error(action, exc) from None

    # -- the contract --------------------------------------------------------------------

    async def claim(self, order_ref: str, owner: str, lease_seconds: float) -> Claim:
        t = base.now()
        sql = self._sql.claim
        row = await self._fetchrow("claim", sql, order_ref, owner, t, t + lease_seconds)
        if row is None:  # the statement always yields one row; this would be a bug
            raise StateError(f"claim of order {order_ref!r} returned nothing")
        return _to_claim(row)

    async def renew(self, order_ref: str, owner: str, lease_seconds: float) -> bool:
        t = base.now()
        sql = self._sql.renew
        return await self._execute("renew", sql, order_ref, owner, t, t + lease_seconds) == 1

    async def complete(self, order_ref: str, owner: str, contact_ref: str, href: str) -> None:
        sql = self._sql.complete
        if await self._execute("complete", sql, order_ref, owner, contact_ref, href, base.now()):
            return
        # Not ours to complete, unless it is done already: then the first contact stays.
        # (A second statement only on this rare path; it sees what the UPDATE skipped.)
        if await self._fetchval("complete", self._sql.status, order_ref) != DONE:
            raise not_owner(order_ref, owner, "complete")

    async def fail(self, order_ref: str, owner: str, reason: str) -> None:
        if not await self._execute("fail", self._sql.fail, order_ref, owner, reason, base.now()):
            raise not_owner(order_ref, owner, "fail")

    async def release(self, order_ref: str, owner: str, *, sent: bool) -> None:
        if sent:
            await self._execute("release", self._sql.release_sent, order_ref, owner, base.now())
        else:
            await self._execute("release", self._sql.release_unsent, order_ref, owner)

    async def forget(self, order_ref: str) -> bool:
        return await self._execute("forget", self._sql.forget, order_ref) == 1

    async def get_checkpoint(self, key: str) -> str | None:
        value = await self._fetchval("get_checkpoint", self._sql.get_checkpoint, key)
        return None if value is None else str(value)

    async def set_checkpoint(self, key: str, value: str) -> None:
        await self._execute("set_checkpoint", self._sql.set_checkpoint, key, value, base.now())

    @property
    def location(self) -> str:
        return f"postgresql {self._where} tables {self.table_prefix}*"

    async def is_empty(self) -> bool:
        return not await self._fetchval("is_empty", self._sql.any_order)

    async def sweep(self, retention_seconds: float) -> int:
        return await self._execute("sweep", self._sql.sweep, base.now() - retention_seconds)


def _to_claim(row: Mapping[str, Any]) -> Claim:
    if row["taken"]:
        attempts = int(row["attempts"])
        status = ClaimStatus.CLAIMED if attempts == 1 else ClaimStatus.IN_DOUBT
        return Claim(status, attempts=attempts)
    if row["status"] == DONE:
        return Claim(ClaimStatus.DONE, contact_ref=row["contact_ref"], href=row["href"])
    if row["status"] == DEAD:
        return Claim(ClaimStatus.DEAD, reason=row["reason"])
    # In flight and not taken over, or committed by another claimer after this statement's
    # snapshot (status NULL): someone holds it. If they have finished meanwhile, asking
    # again later gives the outcome.
    return Claim(ClaimStatus.BUSY)
