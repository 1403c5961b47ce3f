"""Real services for the tests: skip with a message naming the service when it is down,
or fail instead when WORKER_REQUIRE_SERVICES=1 (CI, where `.ci/run` starts them)."""

from __future__ import annotations

import os
import socket

import pytest

# Where each service listens on a developer's machine and in CI; overridable.
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
NATS_URL = os.environ.get("TEST_NATS_URL", "nats://127.0.0.1:4222")

_PORTS = {"redis": 6379, "postgresql": 5432, "rabbitmq": 5672, "nats": 4222}


def require(service: str, host: str = "127.0.0.1", port: int | None = None) -> None:
    """Skip (or, in CI, fail) the calling test unless `service` accepts connections."""
    port = port or _PORTS[service]
    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except OSError as exc:
        message = f"{service} is not reachable on {host}:{port} ({exc.strerror or exc})"
        if os.environ.get("WORKER_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{message}; WORKER_REQUIRE_SERVICES=1 requires it")
        pytest.skip(f"{message}; start it to run this test")


async def delete_redis_keys(prefix: str) -> None:
    """Delete a test's keys (those under `prefix`) from the test database."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def drop_postgres_tables(prefix: str) -> None:
    """Drop a test's state tables and functions (those named `prefix`...)."""
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {prefix}orders, {prefix}checkpoints")
        await conn.execute(
            f"DROP FUNCTION IF EXISTS {prefix}orders_claim, {prefix}orders_release,"
            f" {prefix}orders_finish"
        )
    finally:
        await conn.close()
