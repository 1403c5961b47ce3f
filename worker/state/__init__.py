"""State stores: idempotency by orderRef (DESIGN section 4), chosen by `--state` URL.

The redis and postgres stores are imported only when their URL is used: their client
libraries are extras, and a missing one matters only to whoever asks for that backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker import _extras
from worker.config import default
from worker.errors import ConfigError
from worker.state.base import Claim, ClaimStatus, Finish, Record, StateStore, Want
from worker.state.memory import MemoryStateStore
from worker.state.sqlite import SqliteStateStore

if TYPE_CHECKING:  # imported lazily at run time: see open_state_store
    from worker.state.postgres import PostgresStateStore
    from worker.state.redis import RedisStateStore

__all__ = [
    "Claim",
    "ClaimStatus",
    "Finish",
    "MemoryStateStore",
    "PostgresStateStore",
    "Record",
    "RedisStateStore",
    "SqliteStateStore",
    "StateStore",
    "Want",
    "open_state_store",
]


_OPTION = "--state / WORKER_STATE"
_ACCEPTED = (
    "memory:, sqlite:///RELATIVE/PATH, sqlite:////ABSOLUTE/PATH, "
    "redis://[:PASSWORD@]HOST:6379/DB or postgresql://USER[:PASSWORD]@HOST:5432/DATABASE"
)
_REDIS_SCHEMES = {"redis", "rediss"}
_POSTGRES_SCHEMES = {"postgresql", "postgres"}


def __getattr__(name: str) -> object:
    """`from worker.state import RedisStateStore` works, importing the extra only then."""
    if name == "RedisStateStore":
        from worker.state.redis import RedisStateStore

        return RedisStateStore
    if name == "PostgresStateStore":
        from worker.state.postgres import PostgresStateStore

        return PostgresStateStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_state_store(
    url: str, *, retention_seconds: float | None = default("state_retention")
) -> StateStore:
    """Construct the store a `--state` URL names; the caller awaits `.open()`.

    `retention_seconds`: done/dead records older than this are swept by `open()`
    (`--state-retention`'s default unless given); None sweeps nothing.

    Messages never repeat the URL itself: redis and postgres URLs carry passwords.
    """
    scheme = url.partition(":")[0].lower()
    if url in ("memory:", "memory://"):
        return MemoryStateStore(retention_seconds=retention_seconds)
    if scheme == "sqlite":
        return SqliteStateStore.from_url(url, retention_seconds=retention_seconds)
    if scheme in _REDIS_SCHEMES:
        _extras.require(_extras.REDIS, _OPTION)
        from worker.state.redis import RedisStateStore

        return RedisStateStore.from_url(url, retention_seconds=retention_seconds)
    if scheme in _POSTGRES_SCHEMES:
        _extras.require(_extras.POSTGRES, _OPTION)
        from worker.state.postgres import PostgresStateStore

        return PostgresStateStore.from_url(url, retention_seconds=retention_seconds)
    shown = f"{scheme}:" if scheme and scheme != url else "this value"
    raise ConfigError(
        f"{_OPTION}: {shown} is not a state store URL; accepted: {_ACCEPTED} "
        f"(default {default('state')})"
    )
