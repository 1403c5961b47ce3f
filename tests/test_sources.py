"""Every source against the one contract (tests/source_contract.py), plus what is its own."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import services
from harness import OpenedSources
from source_contract import MakeSource, Publish, SourceContract, bodies, collect, nothing_more

from worker.sources import Message, Source, open_dead_letter_sink, open_publisher, open_source
from worker.sources.base import Redeliveries
from worker.state import SqliteStateStore


class TestFileSource(SourceContract):
    @pytest.fixture
    async def state(self, tmp_path: Path) -> AsyncIterator[SqliteStateStore]:
        store = SqliteStateStore(tmp_path / "state.db")
        await store.open()
        yield store
        await store.close()

    @pytest.fixture
    def publish(self, tmp_path: Path) -> Publish:
        async def publish(lines: list[bytes]) -> None:
            publisher = open_publisher(f"file:{tmp_path / 'events.jsonl'}")
            await publisher.open()
            await publisher.publish(lines)
            await publisher.close()

        return publish

    @pytest.fixture
    def make_source(
        self, tmp_path: Path, state: SqliteStateStore, opened: OpenedSources
    ) -> MakeSource:
        async def make() -> Source:
            source = open_source(f"file:{tmp_path / 'events.jsonl'}", state=state)
            await source.open()
            opened.sources.append(source)
            return source

        return make


class TestRedisStreamSource(SourceContract):
    @pytest.fixture
    async def stream_url(self) -> AsyncIterator[str]:
        services.require("redis")
        import redis.asyncio as aioredis

        stream = f"test-{uuid.uuid4().hex[:12]}"
        yield f"{services.REDIS_URL}?stream={stream}&group=cdp-sync"
        client = aioredis.Redis.from_url(services.REDIS_URL)
        await client.delete(stream, stream + ".dead-letter")
        await client.aclose()

    @pytest.fixture
    def publish(self, stream_url: str) -> Publish:
        async def publish(lines: list[bytes]) -> None:
            publisher = open_publisher(stream_url)
            await publisher.open()
            await publisher.publish(lines)
            await publisher.close()

        return publish

    @pytest.fixture
    def make_source(self, stream_url: str, opened: OpenedSources) -> MakeSource:
        names = itertools.count(1)

        async def make() -> Source:
            # One consumer name per instance, as replicas (hostname-pid) have.
            source = open_source(f"{stream_url}&consumer=c{next(names)}")
            await source.open()
            opened.sources.append(source)
            return source

        return make

    async def test_an_entry_of_a_dead_consumer_is_taken_over_with_its_count(
        self, stream_url: str, publish: Publish, opened: OpenedSources
    ) -> None:
        await publish(bodies(1))
        dead = open_source(f"{stream_url}&consumer=dead&claim_idle=100")
        await dead.open()
        opened.sources.append(dead)
        (first,) = await collect(dead, 1)  # delivered, then its consumer dies (no close)
        survivor = open_source(f"{stream_url}&consumer=alive&claim_idle=100")
        await survivor.open()
        opened.sources.append(survivor)
        (taken,) = await collect(survivor, 1, within=10)
        assert (taken.id, taken.body) == (first.id, first.body)
        assert taken.delivery_count == 2
        await survivor.ack(taken)

    async def test_an_entry_without_the_event_field_is_delivered_empty(
        self, stream_url: str, make_source: MakeSource
    ) -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(services.REDIS_URL)
        stream = stream_url.split("stream=")[1].split("&")[0]
        await client.xadd(stream, {"something": "else"})
        await client.aclose()
        source = await make_source()
        (message,) = await collect(source, 1)
        assert message.body == b""  # the pipeline dead-letters it as malformed_json

    async def test_lag_counts_waiting_and_pending_entries(
        self, publish: Publish, make_source: MakeSource
    ) -> None:
        await publish(bodies(7))
        source = await make_source()
        assert await source.lag() == 7
        messages = await collect(source, 3, batch=3)
        assert await source.lag() == 7  # 4 waiting, 3 pending
        for message in messages:
            await source.ack(message)
        assert await source.lag() == 4

    async def test_a_clean_close_removes_the_consumer_from_its_group(
        self, stream_url: str, publish: Publish
    ) -> None:
        await publish(bodies(3))
        source = open_source(stream_url)  # the default consumer name: hostname-pid
        await source.open()
        for message in await collect(source, 3):
            await source.ack(message)
        await source.close()
        assert await _consumers(stream_url) == {}  # every restart used to leave one behind
        idle = open_source(stream_url)
        await idle.open()
        assert await nothing_more(idle)  # XREADGROUP made the consumer again
        await idle.close()
        assert await _consumers(stream_url) == {}

    async def test_a_consumer_with_entries_pending_is_kept_at_close_and_says_so(
        self,
        stream_url: str,
        publish: Publish,
        make_source: MakeSource,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        await publish([b'{"secret": "kept-body"}', b'{"n": 2}'])
        source = await make_source()
        first, _unfinished = sorted(await collect(source, 2), key=lambda m: m.body)
        await source.ack(first)
        capsys.readouterr()
        await source.close()
        assert await _consumers(stream_url) == {"c1": 1}  # for XAUTOCLAIM by the others
        records = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
        (kept,) = [r for r in records if r.get("event") == "source.consumer_kept"]
        assert (kept["level"], kept["consumer"], kept["pending"]) == ("info", "c1", 1)
        assert "kept-body" not in str(records)
        successor = await make_source()
        assert len(await collect(successor, 1)) == 1  # given back at close: taken over at once

    async def test_dead_letters_go_to_the_stream_beside_and_once_across_a_crash(
        self, stream_url: str
    ) -> None:
        from worker.sources import default_dead_letter_url

        beside = default_dead_letter_url(stream_url)
        assert "stream=test-" in beside
        assert ".dead-letter" in beside
        letter = {"reason": "invalid_event", "eventId": "e1", "orderRef": None, "event": {"a": 1}}
        sink = open_dead_letter_sink(beside)
        await sink.open()
        await sink.put(letter)
        await sink.close()
        rerun = open_dead_letter_sink(beside)
        await rerun.open()
        await rerun.put({**letter, "deadAt": "later"})  # the same letter after a crash
        await rerun.put({**letter, "eventId": "e2"})
        await rerun.close()

        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(services.REDIS_URL)
        stream = beside.split("stream=")[1]
        entries = await client.xrange(stream.replace("%2E", "."))
        await client.aclose()
        assert [orjson.loads(fields[b"letter"])["eventId"] for _, fields in entries] == [
            "e1",
            "e2",
        ]


async def _consumers(stream_url: str) -> dict[str, int]:
    """The group's consumers (XINFO CONSUMERS) and how many entries each has pending."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(services.REDIS_URL, decode_responses=True)
    stream = stream_url.split("stream=")[1].split("&")[0]
    try:
        found = await client.xinfo_consumers(stream, "cdp-sync")
    finally:
        await client.aclose()
    return {consumer["name"]: int(consumer["pending"]) for consumer in found}


async def test_redeliveries_come_back_after_their_delay_and_can_be_taken_in_parts() -> None:
    redeliveries = Redeliveries()
    messages = [Message(id=str(n), body=b"{}") for n in range(5)]
    for message in messages[:3]:
        redeliveries.later(message, 0.0)
    redeliveries.later(messages[3], 0.2)
    assert redeliveries.waiting == 4
    await asyncio.sleep(0.05)
    assert redeliveries.take(2) == messages[:2]
    redeliveries.later(messages[4], 0.0)  # due after a take replaced the list of due ones
    await asyncio.sleep(0.05)
    assert redeliveries.take(10) == [messages[2], messages[4]]
    assert redeliveries.pending  # the one still waiting
    await asyncio.sleep(0.25)
    assert redeliveries.take(10) == [messages[3]]
    assert not redeliveries.pending


async def test_a_waiting_redelivery_is_kept_alive_and_cancelled_at_close() -> None:
    kept: list[str] = []

    async def keep(message: Message) -> None:
        kept.append(message.id)

    delivered: list[Message] = []
    redeliveries = Redeliveries(delivered.append, keep=keep, keep_every=0.05)
    redeliveries.later(Message(id="a", body=b""), 0.18)
    redeliveries.later(Message(id="b", body=b""), 10.0)
    await asyncio.sleep(0.25)
    assert [m.id for m in delivered] == ["a"]
    assert kept.count("a") == 3  # at 0.05, 0.10 and 0.15 s
    await redeliveries.cancel()
    assert redeliveries.waiting == 0
    assert not redeliveries.pending


async def test_a_message_given_back_twice_comes_back_once() -> None:
    errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(context))
    redeliveries = Redeliveries()
    message = Message(id="a", body=b"")
    redeliveries.later(message, 0.05)
    redeliveries.later(message, 0.0)  # the later call wins
    await asyncio.sleep(0.1)
    assert redeliveries.take(10) == [message]
    assert not redeliveries.pending
    assert errors == []  # no timer of the first call fired into a missing entry
