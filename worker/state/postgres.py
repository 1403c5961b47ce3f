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
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import asyncpg

from worker._urls import ParsedUrl, check_server_url
from worker.errors import ConfigError, NotOwner, StateError
from worker.state import base
from worker.state.base import (
    ANY_UPSERT,
    COLUMNS,
    Claim,
    ClaimStatus,
    Finish,
    Record,
    StateStore,
    Want,
)
from worker.versions import Version

OPTION = "--state / WORKER_STATE"
DEFAULT_TABLE_PREFIX = "cdp_sync_"

_PREFIX_RE = re.compile(r"[a-z_][a-z0-9_]{0,40}")
# Failures of the server, the connection or the client library: all become StateError.
T = TypeVar("T")

_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)


class _Pool(Protocol):
    """The part of asyncpg.Pool this store uses (asyncpg ships no type hints)."""

    async def fetch(self, query: str, *args: object) -> list[Mapping[str, Any]]: ...
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
        status text NOT NULL CHECK (status IN ('in_flight', 'done', 'deleted', 'dead')),
        owner text,
        lease_until double precision NOT NULL DEFAULT 0,
        attempts integer NOT NULL DEFAULT 0,
        contact_ref text,
        href text,
        reason text,
        updated_at double precision NOT NULL,
        op text,
        fingerprint text,
        version_kind text,
        version bigint
    );
    -- Tables of the first release: add the columns of convergent sync, once.
    DO $$ BEGIN
        IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                        WHERE table_schema = current_schema()
                          AND table_name = '{orders}' AND column_name = 'version') THEN
            ALTER TABLE {orders}
                ADD COLUMN IF NOT EXISTS op text,
                ADD COLUMN IF NOT EXISTS fingerprint text,
                ADD COLUMN IF NOT EXISTS version_kind text,
                ADD COLUMN IF NOT EXISTS version bigint,
                DROP CONSTRAINT IF EXISTS {orders}_status_check,
                ADD CONSTRAINT {orders}_status_check
                    CHECK (status IN ('in_flight', 'done', 'deleted', 'dead'));
        END IF;
    END $$;
    DROP INDEX IF EXISTS {orders}_finished_idx;
    CREATE INDEX IF NOT EXISTS {orders}_swept_idx
        ON {orders} (updated_at) WHERE status <> 'in_flight';
    CREATE TABLE IF NOT EXISTS {checkpoints} (
        key text PRIMARY KEY,
        value text NOT NULL,
        updated_at double precision NOT NULL
    );
"""

# `rules.claim` in PL/pgSQL: read it first, this follows it line by line. One call is one
# statement, so one round trip and one transaction; the row lock (FOR UPDATE) serialises
# replicas claiming the same order. Two claims of an order nobody has a record of both
# find no row: the INSERT of the second waits for the first's commit, does nothing (ON
# CONFLICT), and answers BUSY, which only means "ask again later". Then `rules.release`:
# back to what the record was before the claim, or in doubt.
_FUNCTIONS = """
    CREATE OR REPLACE FUNCTION {orders}_claim(
        p_ref text, p_owner text, p_now double precision, p_lease_until double precision,
        p_fp text, p_kind text, p_version bigint, p_op text, p_on_change text)
    RETURNS TABLE (answer text, n integer, c_ref text, c_href text, previous text, why text)
    LANGUAGE plpgsql AS $$
    DECLARE
        r {orders}%ROWTYPE;
    BEGIN
        n := 0;
        SELECT * INTO r FROM {orders} WHERE order_ref = p_ref FOR UPDATE;
        IF NOT FOUND THEN
            answer := CASE WHEN p_op = 'delete' THEN 'delete' ELSE 'create' END;
            INSERT INTO {orders} (order_ref, status, owner, lease_until, attempts, op,
                                  updated_at)
                VALUES (p_ref, 'in_flight', p_owner, p_lease_until, 1, answer, p_now)
                ON CONFLICT (order_ref) DO NOTHING;
            IF FOUND THEN
                n := 1;
            ELSE
                answer := 'busy';
                previous := 'in_flight';
            END IF;
            RETURN NEXT;
            RETURN;
        END IF;
        previous := r.status;
        why := r.reason;
        IF r.status = 'in_flight' AND r.lease_until > p_now THEN
            answer := 'busy';
            why := NULL;
        ELSIF p_kind IS NOT NULL AND r.version_kind = p_kind AND p_version < r.version THEN
            answer := 'stale';
        ELSIF r.status = 'in_flight' THEN
            answer := 'in_doubt';
            n := r.attempts + 1;
        ELSIF r.status = 'done' THEN
            IF p_op = 'delete' THEN
                answer := 'delete';
            ELSIF p_fp IS NULL OR p_fp = r.fingerprint THEN
                answer := 'duplicate';
            ELSIF p_on_change = 'ignore' THEN
                answer := CASE WHEN r.fingerprint IS NULL THEN 'duplicate' ELSE 'changed' END;
            ELSE
                answer := 'update';
            END IF;
        ELSIF r.status = 'deleted' THEN
            answer := CASE WHEN p_op = 'delete' THEN 'duplicate' ELSE 'create' END;
        ELSIF p_op <> 'delete'
              AND (r.fingerprint IS NULL OR p_fp IS NULL OR p_fp = r.fingerprint) THEN
            answer := 'duplicate';
        ELSE
            answer := 'in_doubt';  -- dead: an erasure, or other content: worked again
            n := 1;
        END IF;
        IF answer IN ('duplicate', 'changed') THEN
            IF p_kind IS NOT NULL AND (r.version_kind IS DISTINCT FROM p_kind
                                       OR r.version IS DISTINCT FROM p_version) THEN
                UPDATE {orders} SET version_kind = p_kind, version = p_version,
                                    updated_at = p_now
                 WHERE order_ref = p_ref;
            END IF;
        ELSIF answer NOT IN ('busy', 'stale') THEN
            IF answer <> 'in_doubt' THEN
                n := 1;
                why := NULL;
            END IF;
            c_ref := r.contact_ref;
            c_href := r.href;
            UPDATE {orders}
               SET status = 'in_flight', owner = p_owner, lease_until = p_lease_until,
                   attempts = n,
                   op = CASE WHEN answer = 'in_doubt' THEN 'reconcile' ELSE answer END,
                   updated_at = p_now
             WHERE order_ref = p_ref;
        END IF;
        RETURN NEXT;
    END
    $$;
    CREATE OR REPLACE FUNCTION {orders}_finish(
        p_ref text, p_owner text, p_now double precision, p_status text, p_contact text,
        p_href text, p_fp text, p_kind text, p_version bigint, p_reason text)
    RETURNS boolean LANGUAGE plpgsql AS $$
    BEGIN
        -- rules.complete / mark_deleted / fail: done takes the contact and fingerprint,
        -- deleted forgets them, dead keeps the contact; the version moves forward.
        UPDATE {orders}
           SET status = p_status,
               contact_ref = CASE p_status WHEN 'done' THEN p_contact
                                           WHEN 'deleted' THEN NULL ELSE contact_ref END,
               href = CASE p_status WHEN 'done' THEN p_href
                                    WHEN 'deleted' THEN NULL ELSE href END,
               fingerprint = CASE WHEN p_status = 'deleted' THEN NULL ELSE p_fp END,
               reason = CASE WHEN p_status = 'dead' THEN p_reason END,
               owner = NULL, lease_until = 0, op = NULL, updated_at = p_now,
               version = CASE WHEN p_kind IS NULL THEN version ELSE p_version END,
               version_kind = COALESCE(p_kind, version_kind)
         WHERE order_ref = p_ref AND status = 'in_flight' AND owner = p_owner;
        IF FOUND THEN
            RETURN true;
        END IF;
        -- Finished just so already: a retried write that had landed changes nothing.
        IF p_status = 'done' THEN
            RETURN EXISTS (SELECT 1 FROM {orders} WHERE order_ref = p_ref AND status = 'done'
                           AND contact_ref = p_contact AND fingerprint IS NOT DISTINCT FROM p_fp);
        END IF;
        RETURN p_status = 'deleted'
               AND EXISTS (SELECT 1 FROM {orders} WHERE order_ref = p_ref AND status = 'deleted');
    END
    $$;
    CREATE OR REPLACE FUNCTION {orders}_release(
        p_ref text, p_owner text, p_now double precision, p_sent boolean)
    RETURNS void LANGUAGE plpgsql AS $$
    DECLARE
        r {orders}%ROWTYPE;
    BEGIN
        SELECT * INTO r FROM {orders}
         WHERE order_ref = p_ref AND status = 'in_flight' AND owner = p_owner FOR UPDATE;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        IF p_sent OR r.op = 'reconcile' THEN
            UPDATE {orders} SET lease_until = 0, updated_at = p_now WHERE order_ref = p_ref;
        ELSIF (r.op = 'create' AND r.version_kind IS NULL)
              OR (r.op IS DISTINCT FROM 'create' AND r.contact_ref IS NULL) THEN
            DELETE FROM {orders} WHERE order_ref = p_ref;
        ELSE
            UPDATE {orders}
               SET status = CASE WHEN r.op = 'create' THEN 'deleted' ELSE 'done' END,
                   owner = NULL, lease_until = 0, op = NULL, updated_at = p_now
             WHERE order_ref = p_ref;
        END IF;
    END
    $$;
"""

_CLAIM = "SELECT * FROM {orders}_claim($1, $2, $3, $4, $5, $6, $7, $8, $9)"
_RELEASE = "SELECT {orders}_release($1, $2, $3, $4)"
# Many claims in one statement: $1 order_refs, $5..$7 fingerprints, version kinds and
# versions, $8 ops, $9 on_change (arrays, one element per order); $2 owner, $3 now, $4
# lease end. The caller sorts the orders: row locks are then taken in one order by every
# replica, which cannot deadlock. `i` maps the answers back.
_CLAIM_MANY = (
    "SELECT w.i, c.* FROM unnest($1::text[], $5::text[], $6::text[], $7::bigint[],"
    " $8::text[], $9::text[]) WITH ORDINALITY AS w(ref, fp, kind, version, op, on_change, i)"
    " CROSS JOIN LATERAL {orders}_claim(w.ref, $2, $3, $4, w.fp, w.kind, w.version, w.op,"
    " w.on_change) AS c"
)

# $1 order_ref, $2 owner, $3 now, $4 the new lease end; only the in-flight owner matches.
_RENEW = (
    "UPDATE {orders} SET lease_until = $4, updated_at = $3"
    " WHERE order_ref = $1 AND status = 'in_flight' AND owner = $2"
)
# Outcomes in one statement: $1 order_refs, $4..$10 statuses, contact refs, hrefs,
# fingerprints, version kinds, versions and reasons (arrays, one element per order); $2
# owner, $3 now. Sorted by the caller, as claims are. True for each one recorded.
_FINISH_MANY = (
    "SELECT w.i, {orders}_finish(w.ref, $2, $3, w.status, w.contact, w.href, w.fp, w.kind,"
    " w.version, w.reason) AS ok FROM unnest($1::text[], $4::text[], $5::text[], $6::text[],"
    " $7::text[], $8::text[], $9::bigint[], $10::text[]) WITH ORDINALITY"
    " AS w(ref, status, contact, href, fp, kind, version, reason, i)"
)
# $2 now. Reopened in doubt (`rules.forget`): the replayed event lists first.
_FORGET = (
    "UPDATE {orders} SET status = 'in_flight', owner = NULL, lease_until = 0, attempts = 0,"
    " op = 'reconcile', reason = NULL, updated_at = $2 WHERE order_ref = $1 AND status = 'dead'"
)
_LOOKUP = f"SELECT {', '.join(COLUMNS)} FROM {{orders}} WHERE order_ref = $1"  # noqa: S608 - constant names
_ANY_ORDER = "SELECT EXISTS (SELECT 1 FROM {orders})"
_GET_CHECKPOINT = "SELECT value FROM {checkpoints} WHERE key = $1"
_SET_CHECKPOINT = (
    "INSERT INTO {checkpoints} (key, value, updated_at) VALUES ($1, $2, $3)"
    " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at"
)
# $1 cutoff. The partial index on updated_at of finished rows serves it.
_SWEEP = "DELETE FROM {orders} WHERE status <> 'in_flight' AND updated_at < $1"


class _Sql:
    """The statements for one table prefix, rendered once."""

    def __init__(self, prefix: str) -> None:
        names = {
            "orders": f"{prefix}orders",
            "checkpoints": f"{prefix}checkpoints",
        }
        self.schema = _SCHEMA.format_map(names) + _FUNCTIONS.format_map(names)
        self.claim = _CLAIM.format_map(names)
        self.claim_many = _CLAIM_MANY.format_map(names)
        self.lookup = _LOOKUP.format_map(names)
        self.renew = _RENEW.format_map(names)
        self.finish_many = _FINISH_MANY.format_map(names)
        self.release = _RELEASE.format_map(names)
        self.forget = _FORGET.format_map(names)
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

    async def _guarded(self, action: str, pending: Awaitable[T]) -> T:
        """Await one statement; its failures become StateError without the password."""
        try:
            return await pending
        except _DB_ERRORS as exc:
            raise self._error(action, exc) from None

    async def _fetch(self, action: str, query: str, *args: object) -> list[Mapping[str, Any]]:
        return await self._guarded(action, self._live_pool().fetch(query, *args))

    async def _fetchrow(self, action: str, query: str, *args: object) -> Mapping[str, Any] | None:
        return await self._guarded(action, self._live_pool().fetchrow(query, *args))

    async def _fetchval(self, action: str, query: str, *args: object) -> Any:
        return await self._guarded(action, self._live_pool().fetchval(query, *args))

    async def _execute(self, action: str, query: str, *args: object) -> int:
        """Run one statement; the number of rows it touched."""
        return _rowcount(await self._guarded(action, self._live_pool().execute(query, *args)))

    # -- the contract --------------------------------------------------------------------

    async def claim(
        self, order_ref: str, owner: str, lease_seconds: float, want: Want = ANY_UPSERT
    ) -> Claim:
        t = base.now()
        kind, value = _version_args(want.version)
        args = (want.fingerprint, kind, value, want.op, want.on_change)
        row = await self._fetchrow(
            "claim", self._sql.claim, order_ref, owner, t, t + lease_seconds, *args
        )
        if row is None:  # the function always yields one row; this would be a bug
            raise StateError(f"claim of order {order_ref!r} returned nothing")
        return _claim_of(row)

    async def claim_many(
        self, wants: Sequence[tuple[str, Want]], owner: str, lease_seconds: float
    ) -> list[Claim]:
        """One statement (one round trip, one transaction) for the whole batch."""
        base.check_distinct([ref for ref, _ in wants], "claim_many")
        if not wants:
            return []
        ordered = sorted(range(len(wants)), key=lambda i: wants[i][0])  # see _CLAIM_MANY
        versions = [_version_args(wants[i][1].version) for i in ordered]
        t = base.now()
        rows = await self._fetch(
            "claim_many",
            self._sql.claim_many,
            [wants[i][0] for i in ordered],
            owner,
            t,
            t + lease_seconds,
            [wants[i][1].fingerprint for i in ordered],
            [kind for kind, _ in versions],
            [value for _, value in versions],
            [wants[i][1].op for i in ordered],
            [wants[i][1].on_change for i in ordered],
        )
        if len(rows) != len(wants):  # one row per order, always; this would be a bug
            raise StateError(f"claim_many of {len(wants)} orders returned {len(rows)} rows")
        answers: list[Claim | None] = [None] * len(wants)
        for row in rows:
            answers[ordered[int(row["i"]) - 1]] = _claim_of(row)
        return [answer for answer in answers if answer is not None]

    async def renew(self, order_ref: str, owner: str, lease_seconds: float) -> bool:
        t = base.now()
        sql = self._sql.renew
        return await self._execute("renew", sql, order_ref, owner, t, t + lease_seconds) == 1

    async def record_many(self, owner: str, finishes: Sequence[Finish]) -> list[NotOwner | None]:
        """One statement (one round trip, one transaction) for the whole batch."""
        base.check_distinct([finish.order_ref for finish in finishes], "record_many")
        if not finishes:
            return []
        ordered = sorted(finishes, key=lambda finish: finish.order_ref)  # see _CLAIM_MANY
        versions = [_version_args(finish.version) for finish in ordered]
        rows = await self._fetch(
            "record_many",
            self._sql.finish_many,
            [finish.order_ref for finish in ordered],
            owner,
            base.now(),
            [finish.status for finish in ordered],
            [finish.contact_ref for finish in ordered],
            [finish.href for finish in ordered],
            [finish.fingerprint for finish in ordered],
            [kind for kind, _ in versions],
            [value for _, value in versions],
            [finish.reason for finish in ordered],
        )
        recorded = {ordered[int(row["i"]) - 1].order_ref: bool(row["ok"]) for row in rows}
        return [None if recorded.get(f.order_ref) else base.refused(f, owner) for f in finishes]

    async def release(self, order_ref: str, owner: str, *, sent: bool) -> None:
        await self._fetchval("release", self._sql.release, order_ref, owner, base.now(), sent)

    async def forget(self, order_ref: str) -> bool:
        return await self._execute("forget", self._sql.forget, order_ref, base.now()) == 1

    async def lookup(self, order_ref: str) -> Record | None:
        row = await self._fetchrow("lookup", self._sql.lookup, order_ref)
        return None if row is None else Record.from_columns([row[name] for name in COLUMNS])

    async def get_checkpoint(self, key: str) -> str | None:
        value = await self._fetchval("get_checkpoint", self._sql.get_checkpoint, key)
        return None if value is None else str(value)

    async def set_checkpoint(self, key: str, value: str, *, urgent: bool = False) -> None:
        await self._execute("set_checkpoint", self._sql.set_checkpoint, key, value, base.now())

    @property
    def location(self) -> str:
        return f"postgresql {self._where} tables {self.table_prefix}*"

    async def is_empty(self) -> bool:
        return not await self._fetchval("is_empty", self._sql.any_order)

    async def sweep(self, retention_seconds: float) -> int:
        return await self._execute("sweep", self._sql.sweep, base.now() - retention_seconds)


def _claim_of(row: Mapping[str, Any]) -> Claim:
    """A row of the claim function as a Claim."""
    return Claim(
        ClaimStatus(row["answer"]),
        attempts=int(row["n"]),
        contact_ref=row["c_ref"],
        href=row["c_href"],
        previous=row["previous"],
        reason=row["why"],
    )


def _version_args(version: Version | None) -> tuple[str | None, int | None]:
    return (None, None) if version is None else (version.kind, version.value)
