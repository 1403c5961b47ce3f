"""State stores: idempotency by orderRef (DESIGN section 4), chosen by `--state` URL."""

from __future__ import annotations

from worker.errors import ConfigError
from worker.state.base import Claim, ClaimStatus, StateStore
from worker.state.memory import MemoryStateStore
from worker.state.sqlite import SqliteStateStore

__all__ = [
    "DEFAULT_RETENTION_SECONDS",
    "DEFAULT_STATE_URL",
    "Claim",
    "ClaimStatus",
    "MemoryStateStore",
    "SqliteStateStore",
    "StateStore",
    "open_state_store",
]

DEFAULT_STATE_URL = "sqlite:///./worker-state.db"
DEFAULT_RETENTION_SECONDS = 30 * 24 * 3600.0  # WORKER_STATE_RETENTION's default: 30 days

_ACCEPTED = "memory:, sqlite:///RELATIVE/PATH or sqlite:////ABSOLUTE/PATH"
_SCALE_OUT_SCHEMES = {"redis", "rediss", "postgresql", "postgres"}


def open_state_store(
    url: str, *, retention_seconds: float | None = DEFAULT_RETENTION_SECONDS
) -> StateStore:
    """Construct the store a `--state` URL names; the caller awaits `.open()`.

    Messages never repeat the URL itself: redis and postgres URLs carry passwords.
    """
    scheme = url.partition(":")[0].lower()
    if url in ("memory:", "memory://"):
        return MemoryStateStore(retention_seconds=retention_seconds)
    if scheme == "sqlite":
        return SqliteStateStore.from_url(url, retention_seconds=retention_seconds)
    if scheme in _SCALE_OUT_SCHEMES:
        raise ConfigError(
            f"--state / WORKER_STATE: {scheme}:// state stores arrive with the scale-out "
            f"work; use {_ACCEPTED} for now"
        )
    shown = f"{scheme}:" if scheme and scheme != url else "this value"
    raise ConfigError(
        f"--state / WORKER_STATE: {shown} is not a state store URL; accepted: {_ACCEPTED} "
        f"(default {DEFAULT_STATE_URL})"
    )
