"""`redis://` / `rediss://` state store: one Redis shared by every replica.

Layout (`key_prefix` defaults to `cdp-sync:`):

- `cdp-sync:order:<orderRef>`: a hash per orderRef with the fields status, owner,
  lease_until, attempts, contact_ref, href, reason, updated_at (the sqlite columns).
- `cdp-sync:finished`: a sorted set of the done/dead orderRefs scored by updated_at, so a
  sweep finds old records without scanning the keyspace.
- `cdp-sync:checkpoints`: a hash of source positions.

Why Lua: every transition reads the record and writes it depending on what it read; a
script runs atomically on the server, so two replicas can never both win a claim, and it
costs one round trip (EVALSHA; redis-py loads the script again after a server restart).

Why the client's clock: leases are compared with `base.now()` passed in ARGV, as in every
other backend (and so the contract's fake clock works). Lease expiry therefore relies on
the replicas' clocks agreeing (NTP), which DESIGN section 4 already assumes.

Retention: done/dead hashes get a TTL of `retention_seconds` when recorded, so Redis drops
them by itself; `sweep` removes what is older than its argument through the sorted set
(and trims index entries whose hash already expired). In-flight hashes never get a TTL:
an abandoned claim whose POST may have happened must stay in doubt, not vanish.

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
from redis.exceptions import RedisError

from worker._urls import ParsedUrl, check_server_url, scrub_password
from worker.errors import ConfigError, StateError
from worker.state import base
from worker.state.base import Claim, ClaimStatus, StateStore, not_owner

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

# Claim: KEYS[1] = order hash; ARGV = owner, now, lease_until.
# Replies {status, attempts, contact_ref, href, reason}; false becomes nil.
_CLAIM = """
local rec = redis.call('HMGET', KEYS[1], 'status', 'lease_until', 'contact_ref', 'href', 'reason')
local status = rec[1]
if not status then
  redis.call('HSET', KEYS[1], 'status', 'in_flight', 'owner', ARGV[1], 'lease_until', ARGV[3],
             'attempts', 1, 'updated_at', ARGV[2])
  return {'claimed', 1, false, false, false}
end
if status == 'done' then return {'done', 0, rec[3], rec[4], false} end
if status == 'dead' then return {'dead', 0, false, false, rec[5]} end
if tonumber(rec[2]) > tonumber(ARGV[2]) then return {'busy', 0, false, false, false} end
-- The lease ran out or was given back after a send: the previous owner may have POSTed.
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'lease_until', ARGV[3], 'updated_at', ARGV[2])
return {'in_doubt', attempts, false, false, false}
"""

# Renew: KEYS[1] = order hash; ARGV = owner, now, lease_until. Replies 1 if renewed.
_RENEW = """
local rec = redis.call('HMGET', KEYS[1], 'status', 'owner')
if rec[1] ~= 'in_flight' or rec[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', ARGV[3], 'updated_at', ARGV[2])
return 1
"""

# Complete: KEYS[1] = order hash, KEYS[2] = finished index;
# ARGV = owner, now, orderRef, contact_ref, href, ttl_ms (0: none). Replies 0 if not owned.
_COMPLETE = """
local rec = redis.call('HMGET', KEYS[1], 'status', 'owner')
if rec[1] == 'done' then return 1 end  -- the first contact stays: it is the one CDP holds
if rec[1] ~= 'in_flight' or rec[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'done', 'contact_ref', ARGV[4], 'href', ARGV[5],
           'lease_until', 0, 'updated_at', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
if tonumber(ARGV[6]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[6]) end
return 1
"""

# Fail: KEYS[1] = order hash, KEYS[2] = finished index;
# ARGV = owner, now, orderRef, reason, ttl_ms (0: none). Replies 0 if not owned.
_FAIL = """
local rec = redis.call('HMGET', KEYS[1], 'status', 'owner')
if rec[1] ~= 'in_flight' or rec[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'dead', 'reason', ARGV[4], 'lease_until', 0,
           'updated_at', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
if tonumber(ARGV[5]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[5]) end
return 1
"""

# Release: KEYS[1] = order hash; ARGV = owner, now, sent ('1' or '0').
_RELEASE = """
local rec = redis.call('HMGET', KEYS[1], 'status', 'owner')
if rec[1] ~= 'in_flight' or rec[2] ~= ARGV[1] then return 0 end
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'lease_until', 0, 'updated_at', ARGV[2])
else
  redis.call('DEL', KEYS[1])
end
return 1
"""

# Forget a dead record: KEYS[1] = order hash, KEYS[2] = finished index; ARGV = orderRef.
# Replies 1 if it was dead and is gone, 0 otherwise (done or in flight stay).
_FORGET = """
if redis.call('HGET', KEYS[1], 'status') ~= 'dead' then return 0 end
redis.call('DEL', KEYS[1])
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
  local finished = rec[1] == 'done' or rec[1] == 'dead'
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

    async def claim(self, order_ref: str, owner: str, lease_seconds: float) -> Claim:
        t = base.now()
        reply = await self._script("claim", [self._key(order_ref)], [owner, t, t + lease_seconds])
        status, attempts, contact_ref, href, reason = reply
        return Claim(
            ClaimStatus(status),
            attempts=int(attempts),
            contact_ref=contact_ref,
            href=href,
            reason=reason,
        )

    async def renew(self, order_ref: str, owner: str, lease_seconds: float) -> bool:
        t = base.now()
        renewed = await self._script("renew", [self._key(order_ref)], [owner, t, t + lease_seconds])
        return bool(renewed)

    async def complete(self, order_ref: str, owner: str, contact_ref: str, href: str) -> None:
        keys = [self._key(order_ref), self.finished_key]
        args = [owner, base.now(), order_ref, contact_ref, href, self._ttl_ms]
        if not await self._script("complete", keys, args):
            raise not_owner(order_ref, owner, "complete")

    async def fail(self, order_ref: str, owner: str, reason: str) -> None:
        keys = [self._key(order_ref), self.finished_key]
        args = [owner, base.now(), order_ref, reason, self._ttl_ms]
        if not await self._script("fail", keys, args):
            raise not_owner(order_ref, owner, "fail")

    async def release(self, order_ref: str, owner: str, *, sent: bool) -> None:
        args = [owner, base.now(), "1" if sent else "0"]
        await self._script("release", [self._key(order_ref)], args)

    async def forget(self, order_ref: str) -> bool:
        keys = [self._key(order_ref), self.finished_key]
        return bool(await self._script("forget", keys, [order_ref]))

    async def get_checkpoint(self, key: str) -> str | None:
        client = self._live_client()
        value = await self._call("get_checkpoint", client.hget(self.checkpoints_key, key))
        return None if value is None else str(value)  # str already: decode_responses

    async def set_checkpoint(self, key: str, value: str) -> None:
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
