"""Redis plumbing shared by the Redis source, state store and shared rate limit.

redis-py is an extra: it is imported here only, and only when a redis:// URL is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

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


def split_url_params(url: str, own: set[str]) -> tuple[str, dict[str, str]]:
    """(the URL for redis-py, our own query parameters); redis-py's own ones stay."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    ours = {k: v for k, v in query.items() if k in own}
    rest = urlencode({k: v for k, v in query.items() if k not in own})
    return urlunsplit((parts.scheme, parts.netloc, parts.path, rest, "")), ours


def safe_url(url: str) -> str:
    """The URL without user and password, for logs and messages."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


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
