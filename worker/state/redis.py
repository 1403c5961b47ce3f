"""`redis://` / `rediss://` state store: one Redis shared by every replica.

Layout (`key_prefix` defaults to `cdp-sync:`):

- `cdp-sync:order:<orderRef>`: a hash per orderRef with the fields of `base.Record`
  (status, owner, lease_until, attempts, op, contact_ref, href, fingerprint, version_kind,
  version, reason, updated_at); absent fields are None.
- `cdp-sync:finished`: a sorted set of the finished orderRefs scored by updated_at, so a
  sweep finds old records without scanning the keyspace.
- `cdp-sync:checkpoints`: a hash of source positions.

Why Lua: every transition reads the record and writes it depending on what it read; a
script runs atomically on the server, so two replicas can never both win a claim, and it
costs one round trip (EVALSHA; redis-py loads the script again after a server restart).

Why the client's clock: leases are compared with `base.now()` passed in ARGV, as in every
other backend (and so the contract's fake clock works). Lease expiry therefore relies on
the replicas' clocks agreeing (NTP), which DESIGN section 4 already assumes.

Retention: finished (done, deleted, dead) hashes get a TTL of `retention_seconds` when
recorded, so Redis drops them by itself; `sweep` removes what is older than its argument
through the sorted set (and trims index entries whose hash already expired). In-flight
hashes never get a TTL: an abandoned claim whose request may have happened must stay in
doubt, not vanish.

Scripts touch keys derived from their arguments (the sweep deletes order hashes it finds
in the index), so this store targets a standalone Redis or a primary with replicas
(Sentinel), not Redis Cluster.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from worker._urls import ParsedUrl, check_server_url, scrub_password
from worker.errors import ConfigError, NotOwner, StateError
from worker.state import base
from worker.state.base import (
    ANY_UPSERT,
    COLUMNS,
    DELETED,
    DONE,
    Claim,
    ClaimStatus,
    Finish,
    Record,
    StateStore,
    Want,
)
from worker.versions import Version

T = TypeVar("T")

OPTION = "--state / WORKER_STATE"
DEFAULT_KEY_PREFIX = "cdp-sync:"
# Index entries examined per sweep script: bounds how long one script blocks Redis.
SWEEP_BATCH = 500
# Connection errors only (a pooled connection that died with a Redis restart), twice, fast:
# a Redis that is really gone gives StateError within a second, not after redis-py's
# default ten retries. Timeouts are not retried: the script may have run, and a repeated
# claim by the same owner would answer BUSY.
RETRIES = 2

# The scripts below are `rules.py` translated: read it first, they follow it line by line.
# Every script that finishes a record (done, deleted, dead) indexes it in the finished
# set and gives it the retention's TTL; one that takes a record in flight removes the
# TTL (PERSIST): an abandoned claim must stay in doubt, not vanish.
_FINISH = """
local function finish(key, index, now, ref, ttl)
  redis.call('HDEL', key, 'owner', 'op')
  redis.call('HSET', key, 'lease_until', 0, 'updated_at', now)
  redis.call('ZADD', index, now, ref)
  if tonumber(ttl) > 0 then redis.call('PEXPIRE', key, ttl) end
end
local function set_or_delete(key, field, value)
  if value == '' then redis.call('HDEL', key, field) else redis.call('HSET', key, field, value) end
end
local function forward(key, kind, version)
  if kind ~= '' then redis.call('HSET', key, 'version_kind', kind, 'version', version) end
end
"""

# Claim: KEYS[1] = order hash, KEYS[2] = finished index; ARGV = owner, now, lease_until,
# fingerprint, version kind, version ('' for none), op, on_change, orderRef, ttl_ms.
# Replies {answer, attempts, contact_ref, href, previous, reason}.
_CLAIM = (
    _FINISH
    + """
local key, now = KEYS[1], ARGV[2]
local r = redis.call('HMGET', key, 'status', 'lease_until', 'attempts', 'contact_ref', 'href',
                     'fingerprint', 'version_kind', 'version', 'reason')
local status, lease, attempts, ref, href, fp, kind, version, reason = unpack(r)
local want_fp, want_kind, want_version, want_op = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local function take(new_op, n)
  redis.call('HSET', key, 'status', 'in_flight', 'owner', ARGV[1], 'lease_until', ARGV[3],
             'attempts', n, 'op', new_op, 'updated_at', now)
  redis.call('PERSIST', key)
end
local function skip(answer)
  if want_kind ~= '' and (kind ~= want_kind or version ~= want_version) then
    forward(key, want_kind, want_version)
    finish(key, KEYS[2], now, ARGV[9], ARGV[10])
  end
  return {answer, 0, false, false, status, reason}
end
local function in_doubt(n)
  take('reconcile', n)
  return {'in_doubt', n, ref, href, status, reason}
end
if not status then
  local new_op = 'create'
  if want_op == 'delete' then new_op = 'delete' end
  take(new_op, 1)
  return {new_op, 1, false, false, false, false}
end
if status == 'in_flight' and tonumber(lease) > tonumber(now) then
  return {'busy', 0, false, false, status, false}
end
if want_kind ~= '' and kind == want_kind and tonumber(want_version) < tonumber(version) then
  return {'stale', 0, false, false, status, reason}
end
if status == 'in_flight' then return in_doubt(tonumber(attempts) + 1) end
if status == 'done' then
  if want_op == 'delete' then
    take('delete', 1)
    return {'delete', 1, ref, href, status, false}
  end
  if want_fp == '' or want_fp == fp then return skip('duplicate') end
  if ARGV[8] == 'ignore' then
    if not fp then return skip('duplicate') end
    return skip('changed')
  end
  take('update', 1)
  return {'update', 1, ref, href, status, false}
end
if status == 'deleted' then
  if want_op == 'delete' then return skip('duplicate') end
  take('create', 1)
  return {'create', 1, false, false, status, false}
end
-- dead: an erasure is always carried out; other content (the producer fixed it) too
if want_op ~= 'delete' and (not fp or want_fp == '' or want_fp == fp) then
  return skip('duplicate')
end
return in_doubt(1)
"""
)

# Renew: KEYS[1] = order hash; ARGV = owner, now, lease_until. Replies 1 if renewed.
_RENEW = """
local rec = redis.call('HMGET', KEYS[1], 'status', 'owner')
if rec[1] ~= 'in_flight' or rec[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', ARGV[3], 'updated_at', ARGV[2])
return 1
"""

# Complete: KEYS[1] = order hash, KEYS[2] = finished index; ARGV = owner, now, orderRef,
# ttl_ms, contact_ref, href, fingerprint, version kind, version. Replies 0 if not owned.
_COMPLETE = (
    _FINISH
    + """
local rec = redis.call('HMGET', KEYS[1], 'status', 'owner', 'contact_ref', 'fingerprint')
if rec[1] == 'done' and rec[3] == ARGV[5] and (rec[4] or '') == ARGV[7] then return 1 end
if rec[1] ~= 'in_flight' or rec[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'done', 'contact_ref', ARGV[5], 'href', ARGV[6])
redis.call('HDEL', KEYS[1], 'reason')
set_or_delete(KEYS[1], 'fingerprint', ARGV[7])
forward(KEYS[1], ARGV[8], ARGV[9])
finish(KEYS[1], KEYS[2], ARGV[2], ARGV[3], ARGV[4])
return 1
"""
)

# Mark deleted: KEYS as complete; ARGV = owner, now, orderRef, ttl_ms, version kind,
# version. Replies 0 if not owned.
_MARK_DELETED = (
    _FINISH
    + """
local rec = redis.call('HMGET', KEYS[1], 'status', 'owner')
if rec[1] == 'deleted' then return 1 end
if rec[1] ~= 'in_flight' or rec[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'deleted')
redis.call('HDEL', KEYS[1], 'contact_ref', 'href', 'fingerprint', 'reason')
forward(KEYS[1], ARGV[5], ARGV[6])
finish(KEYS[1], KEYS[2], ARGV[2], ARGV[3], ARGV[4])
return 1
"""
)

# Fail: KEYS as complete; ARGV = owner, now, orderRef, ttl_ms, reason, fingerprint,
# version kind, version. Replies 0 if not owned.
_FAIL = (
    _FINISH
    + """
local rec = redis.call('HMGET', KEYS[1], 'status', 'owner')
if rec[1] ~= 'in_flight' or rec[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'dead', 'reason', ARGV[5])
set_or_delete(KEYS[1], 'fingerprint', ARGV[6])
forward(KEYS[1], ARGV[7], ARGV[8])
finish(KEYS[1], KEYS[2], ARGV[2], ARGV[3], ARGV[4])
return 1
"""
)

# Release: KEYS as complete; ARGV = owner, now, orderRef, ttl_ms, sent ('1' or '0').
_RELEASE = (
    _FINISH
    + """
local rec = redis.call('HMGET', KEYS[1], 'status', 'owner', 'op', 'version_kind',
                       'contact_ref')
if rec[1] ~= 'in_flight' or rec[2] ~= ARGV[1] then return 0 end
local op = rec[3]
if ARGV[5] == '1' or op == 'reconcile' then
  redis.call('HSET', KEYS[1], 'lease_until', 0, 'updated_at', ARGV[2])
elseif (op == 'create' and not rec[4]) or (op ~= 'create' and not rec[5]) then
  redis.call('DEL', KEYS[1])
else
  local before = 'done'
  if op == 'create' then before = 'deleted' end
  redis.call('HSET', KEYS[1], 'status', before)
  finish(KEYS[1], KEYS[2], ARGV[2], ARGV[3], ARGV[4])
end
return 1
"""
)

# Forget a dead record: KEYS[1] = order hash, KEYS[2] = finished index; ARGV = orderRef.
# Replies 1 if it was dead and is gone, 0 otherwise (done or in flight stay).
_FORGET = """
if redis.call('HGET', KEYS[1], 'status') ~= 'dead' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'in_flight', 'lease_until', 0, 'attempts', 0,
           'op', 'reconcile', 'updated_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'owner', 'reason')
redis.call('PERSIST', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# Sweep one batch: KEYS[1] = finished index; ARGV = order key prefix, cutoff, batch size.
# Each index entry older than the cutoff is checked against its hash before the hash goes:
# the hash may have expired already, or the orderRef may be in flight again since.
# Replies {deleted, examined}.
_SWEEP = """
local refs = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2], 'LIMIT', 0, ARGV[3])
local deleted = 0
for _, ref in ipairs(refs) do
  local key = ARGV[1] .. ref
  local rec = redis.call('HMGET', key, 'status', 'updated_at')
  local finished = rec[1] == 'done' or rec[1] == 'deleted' or rec[1] == 'dead'
  if finished and tonumber(rec[2]) < tonumber(ARGV[2]) then
    deleted = deleted + redis.call('DEL', key)
    redis.call('ZREM', KEYS[1], ref)
  elseif finished then
    redis.call('ZADD', KEYS[1], rec[2], ref)  -- index behind its record: catch it up
  else
    redis.call('ZREM', KEYS[1], ref)
  end
end
return {deleted, #refs}
"""


def _check_url(url: str) -> str:
    """Where the store lives, for messages.

    Raises ConfigError for a URL redis-py would misread; never echoes the URL.
    """
    parts = check_server_url(
        url,
        OPTION,
        kind="redis",
        schemes=("redis", "rediss"),
        usage="a redis state URL is redis://[:PASSWORD@]HOST:6379/DB",
    )
    try:
        parse_url(url)
    except ValueError as exc:
        raise ConfigError(
            f"{OPTION}: invalid redis URL: {scrub_password(str(exc), parts.password)}"
        ) from None
    db = parts.path.strip("/") or "0"
    if not db.isdigit():
        # redis-py would silently use DB 0 for `redis://host/name`: say so instead.
        raise ConfigError(f"{OPTION}: the redis URL's path is a database number, e.g. /0")
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}/{db}"


def _claim_of(row: Sequence[Any]) -> Claim:
    """The claim script's answer as a Claim."""
    answer, attempts, contact_ref, href, previous, reason = row
    return Claim(
        ClaimStatus(answer),
        attempts=int(attempts),
        contact_ref=contact_ref,
        href=href,
        previous=previous,
        reason=reason,
    )


def _version_args(version: Version | None) -> tuple[str, str]:
    """A version as two script arguments (kind, integer as text), or two empty ones."""
    return ("", "") if version is None else (version.kind, str(version.value))


def _ttl_ms(retention_seconds: float | None) -> int:
    return 0 if retention_seconds is None else max(1, math.ceil(retention_seconds * 1000))


class RedisStateStore(StateStore):
    """State in Redis; every transition is one Lua script, so replicas can share it.

    `retention_seconds`: done/dead records expire after this long (a TTL) and `open()`
    sweeps older ones; None keeps them until `sweep` is called. `key_prefix` namespaces
    every key (one deployment per prefix). Operations share a pool of at most
    `max_connections` connections, waiting up to `socket_timeout` for a free one. URL query
    parameters (socket_timeout=..., max_connections=...) override these defaults.
    """

    def __init__(
        self,
        url: str,
        *,
        retention_seconds: float | None = None,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        socket_timeout: float = 10.0,
        socket_connect_timeout: float = 5.0,
        max_connections: int = 32,
    ) -> None:
        self._where = _check_url(url)
        self._parsed = ParsedUrl.split(url, OPTION)  # its secrets, scrubbed from messages
        self._url = url
        self._retention = retention_seconds
        self._ttl_ms = _ttl_ms(retention_seconds)
        self._socket_timeout = socket_timeout
        self._socket_connect_timeout = socket_connect_timeout
        self._max_connections = max_connections
        self.order_prefix = f"{key_prefix}order:"
        self.finished_key = f"{key_prefix}finished"
        self.checkpoints_key = f"{key_prefix}checkpoints"
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._opened = False

    @classmethod
    def from_url(cls, url: str, *, retention_seconds: float | None = None) -> RedisStateStore:
        """`redis://HOST:6379/DB[?prefix=NAME:]`: the prefix keeps deployments apart."""
        parsed = ParsedUrl.split(url, OPTION, {"prefix"})
        prefix = parsed.params.get("prefix") or DEFAULT_KEY_PREFIX
        return cls(parsed.client_url, retention_seconds=retention_seconds, key_prefix=prefix)

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        if self._opened:
            raise StateError("state store opened twice")
        self._opened = True
        # A blocking pool: a burst of operations waits for one of `max_connections`
        # instead of failing with "Too many connections" (the default pool's answer).
        pool = aioredis.BlockingConnectionPool.from_url(
            self._url,
            decode_responses=True,
            max_connections=self._max_connections,
            timeout=self._socket_timeout,
            socket_timeout=self._socket_timeout,
            socket_connect_timeout=self._socket_connect_timeout,
            retry=Retry(
                ExponentialWithJitterBackoff(base=0.05, cap=0.5),
                RETRIES,
                supported_errors=(RedisConnectionError,),
            ),
        )
        client = aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() ends it
        try:
            await client.ping()  # fail here, naming the option, not at the first event
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise StateError(
                f"{OPTION}: cannot reach redis at {self._where}: {self._scrub(exc)}"
            ) from None
        self._client = client
        self._scripts = {
            name: client.register_script(source)
            for name, source in (
                ("claim", _CLAIM),
                ("renew", _RENEW),
                ("complete", _COMPLETE),
                ("mark_deleted", _MARK_DELETED),
                ("fail", _FAIL),
                ("release", _RELEASE),
                ("forget", _FORGET),
                ("sweep", _SWEEP),
            )
        }
        if self._retention is not None:
            await self.sweep(self._retention)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # -- plumbing ------------------------------------------------------------------------

    def _scrub(self, exc: BaseException) -> str:
        return self._parsed.quote(exc)

    def _live_client(self) -> aioredis.Redis:
        if self._client is None:
            raise StateError("state store is not open")
        return self._client

    async def _call(self, action: str, pending: Awaitable[T]) -> T:
        """Await one Redis call; its failures become StateError without the password."""
        try:
            return await pending
        except (RedisError, OSError) as exc:
            raise StateError(
                f"redis state store at {self._where}: {action} failed: {self._scrub(exc)}"
            ) from None

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        self._live_client()
        return await self._call(name, self._scripts[name](keys=keys, args=args))

    def _key(self, order_ref: str) -> str:
        return self.order_prefix + order_ref

    # -- the contract --------------------------------------------------------------------

    async def claim(
        self, order_ref: str, owner: str, lease_seconds: float, want: Want = ANY_UPSERT
    ) -> Claim:
        t = base.now()
        keys, args = self._claim_call(order_ref, owner, t, lease_seconds, want)
        return _claim_of(await self._script("claim", keys, args))

    async def claim_many(
        self, wants: Sequence[tuple[str, Want]], owner: str, lease_seconds: float
    ) -> list[Claim]:
        """The claim script once per order, all in one pipeline: one round trip. Not a
        transaction: a failure may leave some claimed (the pipeline gives them back)."""
        base.check_distinct([ref for ref, _ in wants], "claim_many")
        if not wants:
            return []
        t = base.now()
        calls = [
            ("claim", *self._claim_call(ref, owner, t, lease_seconds, want)) for ref, want in wants
        ]
        return [_claim_of(row) for row in await self._pipelined("claim_many", calls)]

    async def _pipelined(
        self, action: str, calls: Sequence[tuple[str, list[str], Sequence[Any]]]
    ) -> list[Any]:
        """Run each (script, keys, args) in one pipeline, one round trip; their answers."""
        pipe = self._live_client().pipeline(transaction=False)
        for name, keys, args in calls:
            # EVALSHA itself: redis-py's pipelined scripts ask SCRIPT EXISTS first, a
            # second round trip per batch.
            pipe.evalsha(self._scripts[name].sha, len(keys), *keys, *args)
        answers: list[Any] = await self._call(action, pipe.execute(raise_on_error=False))
        for i, answer in enumerate(answers):
            if isinstance(answer, NoScriptError):  # the server lost its scripts (a restart):
                answers[i] = await self._script(*calls[i])  # this one did not run: send it
            elif isinstance(answer, Exception):
                raise StateError(
                    f"redis state store at {self._where}: {action} failed: {self._scrub(answer)}"
                )
        return answers

    def _claim_call(
        self, order_ref: str, owner: str, t: float, lease_seconds: float, want: Want
    ) -> tuple[list[str], list[Any]]:
        """The claim script's keys and arguments."""
        keys = [self._key(order_ref), self.finished_key]
        args = [
            owner, t, t + lease_seconds, want.fingerprint or "", *_version_args(want.version),
            want.op, want.on_change, order_ref, self._ttl_ms,
        ]  # fmt: skip
        return keys, args

    async def renew(self, order_ref: str, owner: str, lease_seconds: float) -> bool:
        t = base.now()
        renewed = await self._script("renew", [self._key(order_ref)], [owner, t, t + lease_seconds])
        return bool(renewed)

    async def record_many(self, owner: str, finishes: Sequence[Finish]) -> list[NotOwner | None]:
        """Each outcome's script (complete, mark_deleted, fail); several in one pipeline:
        one round trip."""
        base.check_distinct([finish.order_ref for finish in finishes], "record_many")
        t = base.now()
        calls = [self._finish_call(owner, t, finish) for finish in finishes]
        if len(calls) == 1:  # one script call is a round trip already
            action, keys, args = calls[0]
            done = [await self._script(action, keys, args)]
        else:
            done = await self._pipelined("record_many", calls)
        return [
            None if ok else base.refused(f, owner) for f, ok in zip(finishes, done, strict=True)
        ]

    def _finish_call(
        self, owner: str, t: float, finish: Finish
    ) -> tuple[str, list[str], tuple[Any, ...]]:
        """The script that records `finish`, its keys and arguments."""
        versions = _version_args(finish.version)
        fields: tuple[Any, ...]
        if finish.status == DONE:
            action = "complete"
            fields = (finish.contact_ref, finish.href, finish.fingerprint or "", *versions)
        elif finish.status == DELETED:
            action, fields = "mark_deleted", versions
        else:
            action = "fail"
            fields = (finish.reason, finish.fingerprint or "", *versions)
        keys = [self._key(finish.order_ref), self.finished_key]
        return action, keys, (owner, t, finish.order_ref, self._ttl_ms, *fields)

    async def release(self, order_ref: str, owner: str, *, sent: bool) -> None:
        keys = [self._key(order_ref), self.finished_key]
        args = [owner, base.now(), order_ref, self._ttl_ms, "1" if sent else "0"]
        await self._script("release", keys, args)

    async def forget(self, order_ref: str) -> bool:
        keys = [self._key(order_ref), self.finished_key]
        return bool(await self._script("forget", keys, [order_ref, base.now()]))

    async def lookup(self, order_ref: str) -> Record | None:
        pending = self._live_client().hmget(self._key(order_ref), list(COLUMNS))
        row = await self._call("lookup", pending)
        return None if row[0] is None else Record.from_columns(row)

    async def get_checkpoint(self, key: str) -> str | None:
        client = self._live_client()
        value = await self._call("get_checkpoint", client.hget(self.checkpoints_key, key))
        return None if value is None else str(value)  # str already: decode_responses

    async def set_checkpoint(self, key: str, value: str, *, urgent: bool = False) -> None:
        client = self._live_client()
        await self._call("set_checkpoint", client.hset(self.checkpoints_key, key, value))

    @property
    def location(self) -> str:
        return f"redis {self._where} keys {self.order_prefix}*"

    async def is_empty(self) -> bool:
        """No order hash under our prefix: SCAN until one is found (at start only)."""
        client = self._live_client()
        cursor: int = 0
        while True:
            cursor, keys = await self._call(
                "is_empty", client.scan(cursor, match=self.order_prefix + "*", count=1000)
            )
            if keys:
                return False
            if not cursor:
                return True

    async def sweep(self, retention_seconds: float) -> int:
        """Batches of SWEEP_BATCH index entries, each one atomic script.

        The whole sweep is not one transaction, and need not be: every deletion re-checks
        its record inside the script, so a batch never removes anything live.
        """
        cutoff = base.now() - retention_seconds
        total = 0
        while True:
            args = [self.order_prefix, cutoff, SWEEP_BATCH]
            deleted, examined = await self._script("sweep", [self.finished_key], args)
            total += int(deleted)
            if int(examined) < SWEEP_BATCH:
                return total
