"""A broker restarted mid-run: the worker reconnects and finishes, nothing lost or doubled.

For Redis the test runs a server of its own (append-only file on, so a restart keeps the
stream and the state, as a production Redis would) instead of restarting the shared one;
RabbitMQ's application is stopped and started with rabbitmqctl (durable queue,
persistent messages), with its state in the shared Redis.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import services
from harness import free_port, valid_order_refs

from worker.config import Settings
from worker.demo import generate_events
from worker.emulator import Emulator
from worker.pipeline import Worker
from worker.sources import open_publisher


class PrivateRedis:
    """redis-server on a free port with persistence, restartable."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.folder), "--appendonly", "yes", "--appendfsync", "always",
             "--save", ""],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    services.require("redis")  # the shared one stands for "redis-server is installed"
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    redis = PrivateRedis(tmp_path)
    redis.start()
    yield redis
    redis.stop()


@pytest.mark.slow
async def test_the_worker_rides_out_a_redis_restart(
    private_redis: PrivateRedis, emulator: Emulator, make_settings: Callable[..., Settings]
) -> None:
    lines = generate_events(600, duplicate_share=0.1, invalid_rounds=1, seed=8)
    valid = valid_order_refs(lines)
    source_url = f"{private_redis.url}?stream=orders&group=cdp-sync"
    publisher = open_publisher(source_url)
    await publisher.open()
    await publisher.publish(lines)
    await publisher.close()
    emulator.config.latency = 0.01
    settings = make_settings(
        source=source_url, state=private_redis.url, dlq=None, rate_limit=300.0,
        concurrency=8, request_timeout=1.0, lease_seconds=4.0,
    )  # fmt: skip
    worker = Worker(settings, backoff_base=0.05)
    run = asyncio.create_task(worker.run())
    while emulator.stats()["contacts"] < 150:
        await asyncio.sleep(0.02)
    private_redis.stop()  # everything the worker talks to is gone at once
    await asyncio.sleep(1.5)
    assert worker.ready()[0] is False
    private_redis.start()
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(private_redis.url)
    deadline = time.monotonic() + 60
    while True:
        letters = await client.xlen("orders.dead-letter")
        pending = (await client.xpending("orders", "cdp-sync"))["pending"]
        if (
            len(emulator.stats()["contacts_per_order"]) == len(valid)
            and letters >= 4
            and not pending
        ):
            break
        assert time.monotonic() < deadline, (emulator.stats()["orders"], letters, pending)
        assert not run.done(), run
        await asyncio.sleep(0.1)
    worker.stop()
    await asyncio.wait_for(run, 30)
    await worker.close()
    entries = await client.xrange("orders.dead-letter")
    await client.aclose()

    per_order = emulator.stats()["contacts_per_order"]
    assert set(per_order) == valid
    assert set(per_order.values()) == {1}
    letters = [orjson.loads(fields[b"letter"]) for _, fields in entries]
    assert sorted(letter["reason"] for letter in letters) == [
        "invalid_event", "invalid_event", "invalid_order_ref", "malformed_json",
    ]  # fmt: skip


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


async def rabbit_queue_counts(queue: str) -> tuple[int, int] | None:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "list_queues", "-q", "name", "messages_ready", "messages_unacknowledged",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await process.communicate()
    for line in out.decode().splitlines():
        name, *counts = line.split()
        if name == queue:
            return int(counts[0]), int(counts[1])
    return None


@pytest.mark.slow
async def test_the_worker_rides_out_a_rabbitmq_restart(
    emulator: Emulator, make_settings: Callable[..., Settings]
) -> None:
    services.require("rabbitmq")
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is needed to restart the broker")
    lines = generate_events(600, duplicate_share=0.1, invalid_rounds=1, seed=9)
    valid = valid_order_refs(lines)
    queue = f"restart-{time.monotonic_ns()}"
    source_url = f"{services.AMQP_URL}?queue={queue}&prefetch=32"
    publisher = open_publisher(source_url)
    await publisher.open()
    await publisher.publish(lines)
    await publisher.close()
    emulator.config.latency = 0.01
    settings = make_settings(
        source=source_url, dlq=None, rate_limit=300.0, concurrency=8,
        request_timeout=1.0, lease_seconds=4.0,
    )  # fmt: skip
    worker = Worker(settings, backoff_base=0.05)
    run = asyncio.create_task(worker.run())
    try:
        while emulator.stats()["contacts"] < 150:
            await asyncio.sleep(0.02)
        await asyncio.to_thread(rabbitmqctl, "stop_app")
        try:
            await asyncio.sleep(1.0)
            assert worker.ready() == (False, "source disconnected")
        finally:
            await asyncio.to_thread(rabbitmqctl, "start_app")
        deadline = time.monotonic() + 90
        while True:
            counts = await rabbit_queue_counts(queue)
            letters = await rabbit_queue_counts(queue + ".dead-letter")
            if (
                len(emulator.stats()["contacts_per_order"]) == len(valid)
                and counts == (0, 0)
                and letters is not None
                and letters[0] >= 4
            ):
                break
            assert time.monotonic() < deadline, (emulator.stats()["orders"], counts, letters)
            assert not run.done(), run
            await asyncio.sleep(0.3)
    finally:
        worker.stop()
        await asyncio.wait_for(run, 30)
        await worker.close()
        import aio_pika

        connection = await aio_pika.connect(services.AMQP_URL)
        async with connection:
            channel = await connection.channel()
            dead = await channel.declare_queue(queue + ".dead-letter", passive=True)
            letters_seen = []
            while (message := await dead.get(no_ack=True, fail=False)) is not None:
                letters_seen.append(orjson.loads(message.body)["reason"])
            for name in (queue, queue + ".dead-letter"):
                await channel.queue_delete(name)

    per_order = emulator.stats()["contacts_per_order"]
    assert set(per_order) == valid
    assert set(per_order.values()) == {1}
    assert sorted(letters_seen) == [
        "invalid_event", "invalid_event", "invalid_order_ref", "malformed_json",
    ]  # fmt: skip
