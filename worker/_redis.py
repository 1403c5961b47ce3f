"""Redis plumbing shared by the Redis source, state store and shared rate limit.

redis-py is an extra: this module is imported only after `_extras.require(REDIS, ...)`,
when a redis:// URL is used.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from ._urls import safe_url
from .errors import SourceError

# Seconds to wait for a connection; the health check pings idle connections this often.
CONNECT_TIMEOUT = 5.0
HEALTH_CHECK_INTERVAL = 15


def client(url: str) -> aioredis.Redis:
    """A client that connects on first use (and reconnects after a drop)."""
    made: aioredis.Redis = aioredis.Redis.from_url(
        url, socket_connect_timeout=CONNECT_TIMEOUT, health_check_interval=HEALTH_CHECK_INTERVAL
    )
    return made


async def connect(url: str, label: str) -> aioredis.Redis:
    """A client that answered a PING; SourceError naming `label` (no password) if not."""
    made = client(url)
    try:
        await made.ping()
    except Exception as exc:  # noqa: BLE001 - any failure to connect is reported the same way
        await made.aclose()
        raise SourceError(f"{label}: cannot reach {safe_url(url)}: {type(exc).__name__}") from None
    return made
