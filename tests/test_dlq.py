"""`worker dlq list` / `replay`: the runbook's way back for dead-lettered orders."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import services

from worker import dlq
from worker.config import Settings
from worker.demo import generate_events, write_events
from worker.emulator import Emulator
from worker.pipeline import Worker
from worker.sources import open_dead_letter_sink


async def run_worker(settings: Settings) -> Worker:
    worker = Worker(settings, backoff_base=0.01)
    try:
        await worker.run()
    finally:
        await worker.close()
    return worker


async def test_replay_reopens_dead_orders_and_the_next_run_delivers_them(
    tmp_path: Path, emulator: Emulator, make_settings: Callable[..., Settings]
) -> None:
    lines = generate_events(5, duplicate_share=0.0, invalid_rounds=1, seed=3)
    events = write_events(tmp_path / "events.jsonl", lines)
    state = f"sqlite:///{tmp_path / 'state.db'}"
    letters_url = f"file:{tmp_path / 'dead-letter.jsonl'}"
    emulator.config.not_found_for = 60.0  # the orders do not exist yet at CDP
    first = await run_worker(
        make_settings(source=f"file:{events}", state=state, dlq=letters_url, not_found_grace=0.1)
    )
    assert first.summary["dead:order_not_found"] == 5
    letters = await dlq.read_letters(letters_url)
    assert {reason: count for reason, count, _ in dlq.summary(letters)} == {
        "order_not_found": 5, "invalid_event": 2, "invalid_order_ref": 1, "malformed_json": 1,
    }  # fmt: skip

    emulator.config.not_found_for = 0.0  # the orders exist now
    again = tmp_path / "again.jsonl"
    not_found = [letter for letter in letters if letter["reason"] == "order_not_found"]
    assert await dlq.replay(not_found, to=f"file:{again}", state_url=state) == (5, 5)
    second = await run_worker(make_settings(source=f"file:{again}", state=state, dlq=letters_url))
    assert second.summary["delivered"] == 5
    assert emulator.stats()["orders"] == 5
    assert emulator.stats()["duplicate_orders"] == 0
    # Replaying again publishes again, and the state store makes them duplicates.
    assert await dlq.replay(not_found, to=f"file:{again}", state_url=state) == (5, 0)


async def test_list_shows_no_personal_data_unless_asked(tmp_path: Path) -> None:
    email = "leak-me@pii.example"
    letter = {
        "reason": "cdp_rejected", "detail": f"bad email {email}", "orderRef": str(uuid.uuid4()),
        "eventId": "e1", "status": 400, "attempts": 1, "deadAt": "2026-11-27T10:00:00.000Z",
        "event": {"contact": {"emails": [email]}},
    }  # fmt: skip
    path = tmp_path / "dead-letter.jsonl"
    path.write_bytes(orjson.dumps(letter) + b"\n" + b'{"torn')

    async def listing(*flags: str) -> str:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker", "dlq", "list", f"file:{path}", *flags,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await process.communicate()
        assert process.returncode == 0
        return out.decode()

    plain = await listing()
    assert "cdp_rejected" in plain
    assert "1 dead letters" in plain
    assert email not in plain
    assert email in await listing("--show-events")


async def test_letters_are_read_back_from_a_redis_stream() -> None:
    services.require("redis")
    import redis.asyncio as aioredis

    stream = f"dlq-{uuid.uuid4().hex[:10]}"
    client = aioredis.Redis.from_url(services.REDIS_URL)
    for n in range(3):
        await client.xadd(stream, {"letter": orjson.dumps({"reason": "invalid_event", "n": n})})
    try:
        letters = await dlq.read_letters(f"{services.REDIS_URL}?stream={stream}")
    finally:
        await client.delete(stream)
        await client.aclose()
    assert [letter["n"] for letter in letters] == [0, 1, 2]


@pytest.mark.parametrize("broker", ["rabbitmq", "nats"])
async def test_letters_are_read_back_from_a_queue_or_subject_and_stay(broker: str) -> None:
    services.require(broker)
    run = uuid.uuid4().hex[:10]
    if broker == "rabbitmq":
        url = f"{services.AMQP_URL}?queue=dlq-{run}.dead-letter"
    else:
        url = f"{services.NATS_URL}?stream=DLQ_{run}&subject=dlq-{run}.dead-letter"
    sink = open_dead_letter_sink(url)
    await sink.open()
    try:
        for n in range(3):
            await sink.put({"reason": "invalid_event", "eventId": f"e{n}", "n": n})
    finally:
        await sink.close()
    try:
        first = await dlq.read_letters(url)
        again = await dlq.read_letters(url)  # reading takes nothing away
        assert [letter["n"] for letter in first] == [0, 1, 2]
        assert again == first
    finally:
        await _remove(broker, url, run)


async def _remove(broker: str, url: str, run: str) -> None:
    if broker == "rabbitmq":
        import aio_pika

        connection = await aio_pika.connect(services.AMQP_URL)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(f"dlq-{run}.dead-letter")
    else:
        import nats

        client = await nats.connect(services.NATS_URL)
        try:  # the letters' own stream; the sink makes no other
            await client.jetstream().delete_stream(f"DLQ_{run}_DEAD_LETTER")
        finally:
            await client.close()


async def test_an_unknown_sink_is_a_config_error() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "dlq", "list", "kafka://user:pw@x/t",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await process.communicate()
    assert process.returncode == 2
    assert "worker dlq list: URL: unsupported URL scheme 'kafka'" in err.decode()
    assert "user:pw" not in err.decode()
