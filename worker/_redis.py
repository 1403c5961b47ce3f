"""Redis plumbing shared by the Redis source, state store and shared rate limit.

redis-py is an extra: it is imported here only, and only when a redis:// URL is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._urls import safe_url
from .errors import MissingExtraError, SourceError

if TYPE_CHECKING:
    import redis.asyncio as aioredis

# Seconds to wait for a connection; the health check pings idle connections this often.
CONNECT_TIMEOUT = 5.0
HEALTH_CHECK_INTERVAL = 15


def redis_module() -> Any:
    """`redis.asyncio`, or a MissingExtraError naming the extra to install."""
    try:
        import redis.asyncio as module
    except ImportError:  # pragma: no cover - exercised without the extra installed
        raise MissingExtraError("redis", "redis", "redis://") from None
    return module


def client(url: str) -> aioredis.Redis:
    """A client that connects on first use (and reconnects after a drop)."""
    redis: Any = redis_module()
    made: aioredis.Redis = redis.Redis.from_url(
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
