"""The NATS JetStream source against the contract, plus what is its own (DESIGN section 5)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
import services
from nats.js.errors import NotFoundError
from source_contract import MakeSource, Publish, SourceContract, bodies, collect, nothing_more

from worker.errors import ConfigError, SourceError
from worker.sources import (
    Source,
    default_dead_letter_url,
    letter_key,
    open_dead_letter_sink,
    open_publisher,
    open_source,
)

MakeNats = Callable[..., Awaitable[Source]]


@contextlib.asynccontextmanager
async def jetstream() -> AsyncIterator[Any]:
    """A JetStream context of a connection of the test's own, closed at the end."""
    from nats.aio.client import Client

    client = Client()
    await client.connect(services.NATS_URL, allow_reconnect=False)
    try:
        yield client.jetstream()
    finally:
        await client.close()


def _param(url: str, key: str) -> str:
    return url.split(f"{key}=")[1].split("&")[0]


async def letters_on(url: str) -> list[dict[str, Any]]:
    """Every dead letter stored on the source URL's `<subject>.dead-letter`, in the stream
    of the letters' own, `<stream>_DEAD_LETTER`, oldest first."""
    import nats.errors

    letters: list[dict[str, Any]] = []
    async with jetstream() as js:
        sub = await js.pull_subscribe(
            _param(url, "subject") + ".dead-letter", stream=_param(url, "stream") + "_DEAD_LETTER"
        )
        with contextlib.suppress(nats.errors.TimeoutError):
            while True:
                for msg in await sub.fetch(100, timeout=0.5):
                    letters.append(orjson.loads(msg.data))
                    await msg.ack()
        await sub.unsubscribe()
    return letters


@pytest.fixture
async def nats_url() -> AsyncIterator[str]:
    """A stream and subject of the test's own, deleted afterwards."""
    services.require("nats")
    name = uuid.uuid4().hex[:12]
    stream = f"TEST_{name}"
    yield f"{services.NATS_URL}?stream={stream}&subject=test-{name}&durable=cdp-sync"
    async with jetstream() as js:
        for each in (stream, stream + "_DEAD_LETTER"):
            with contextlib.suppress(Exception):
                await js.delete_stream(each)


@pytest.fixture
async def make_nats(nats_url: str) -> AsyncIterator[MakeNats]:
    """Opens sources on the test's stream (extra query parameters appended), all closed
    at the end: the same durable consumer for every one, as replicas share it."""
    sources: list[Source] = []

    async def make(extra: str = "") -> Source:
        source = open_source(nats_url + extra)
        await source.open()
        sources.append(source)
        return source

    yield make
    for source in sources:
        await source.close()


@pytest.fixture
def publish(nats_url: str) -> Publish:
    async def publish(lines: list[bytes]) -> None:
        publisher = open_publisher(nats_url)
        await publisher.open()
        await publisher.publish(lines)
        await publisher.close()

    return publish


class TestNatsSource(SourceContract):
    @pytest.fixture
    def make_source(self, make_nats: MakeNats) -> MakeSource:
        async def make() -> Source:
            return await make_nats()

        return make

    async def test_close_naks_unfinished_messages_so_a_successor_gets_them_at_once(
        self, publish: Publish, make_nats: MakeNats
    ) -> None:
        await publish(bodies(3))
        source = await make_nats()  # ack_wait 60 s: only the nak can bring them back soon
        messages = await collect(source, 3)
        await source.ack(messages[0])
        await source.close()
        closed_at = time.monotonic()
        successor = await make_nats()
        again = await collect(successor, 2, within=5)
        assert time.monotonic() - closed_at < 3
        assert sorted(m.body for m in again) == sorted(m.body for m in messages[1:])
        assert {m.delivery_count for m in again} == {2}  # a nak counts as a delivery
        for message in again:
            await successor.ack(message)
        assert await nothing_more(successor)

    async def test_a_fetch_cancelled_by_a_stop_loses_nothing(
        self, publish: Publish, make_nats: MakeNats
    ) -> None:
        source = await make_nats()
        fetching = asyncio.create_task(source.fetch(10, 2.0))
        await asyncio.sleep(0.2)
        fetching.cancel()  # what the pipeline does on stop, while the pull is under way
        with contextlib.suppress(asyncio.CancelledError):
            await fetching
        await publish(bodies(1))
        (message,) = await collect(source, 1)  # the pull went on and kept what it brought
        assert message.delivery_count == 1
        await source.ack(message)

    async def test_hold_keeps_a_message_from_being_redelivered_past_ack_wait(
        self, publish: Publish, make_nats: MakeNats
    ) -> None:
        await publish(bodies(1))
        worker = await make_nats("&ack_wait=1")
        (message,) = await collect(worker, 1)
        other = await make_nats("&ack_wait=1")

        async def keep_holding() -> None:
            while True:
                await asyncio.sleep(0.3)
                await worker.hold(message)

        holding = asyncio.create_task(keep_holding())
        try:
            assert await nothing_more(other, wait=2.5)  # 2.5 x ack_wait
            assert await nothing_more(worker, wait=0.1)
        finally:
            holding.cancel()
        await worker.ack(message)
        assert await nothing_more(other, wait=1.5)

    async def test_a_message_not_acked_within_ack_wait_comes_again_with_its_count(
        self, publish: Publish, make_nats: MakeNats
    ) -> None:
        await publish(bodies(1))
        source = await make_nats("&ack_wait=1")
        (first,) = await collect(source, 1)
        assert first.delivery_count == 1
        (again,) = await collect(source, 1, within=5)  # its consumer looked dead: redelivered
        assert (again.id, again.body, again.delivery_count) == (first.id, first.body, 2)
        await source.ack(again)
        assert await nothing_more(source)

    async def test_a_nack_is_local_and_outlasts_ack_wait_without_counting_a_delivery(
        self, publish: Publish, make_nats: MakeNats
    ) -> None:
        await publish(bodies(1))
        source = await make_nats("&ack_wait=1")
        other = await make_nats("&ack_wait=1")
        (message,) = await collect(source, 1)
        await source.nack(message, delay=2.0)  # longer than ack_wait: in_progress meanwhile
        assert await nothing_more(other, wait=2.5)
        (again,) = await collect(source, 1)
        assert (again.id, again.delivery_count) == (message.id, 1)
        await source.ack(again)

    async def test_lag_counts_waiting_and_unacked_messages(
        self, publish: Publish, make_nats: MakeNats
    ) -> None:
        await publish(bodies(7))
        source = await make_nats()
        assert await source.lag() == 7
        messages = await collect(source, 3, batch=3)
        assert await source.lag() == 7  # 4 waiting, 3 unacked
        for message in messages:
            await source.ack(message)
        assert await source.lag() == 4

    async def test_dead_letters_go_to_the_subject_beside_and_once_across_a_crash(
        self, nats_url: str, make_nats: MakeNats
    ) -> None:
        beside = default_dead_letter_url(nats_url)
        assert _param(beside, "subject") == _param(nats_url, "subject") + (".dead-letter")
        letter = {"reason": "invalid_event", "eventId": "e1", "orderRef": None, "event": {"a": 1}}
        sink = open_dead_letter_sink(beside)
        await sink.open()  # before any source: it creates the stream
        await sink.put(letter)
        await sink.close()
        rerun = open_dead_letter_sink(beside)
        await rerun.open()
        await rerun.put({**letter, "deadAt": "later", "attempts": 3})  # the same, after a crash
        await rerun.put({**letter, "eventId": "e2"})
        await rerun.close()
        assert [found["eventId"] for found in await letters_on(nats_url)] == ["e1", "e2"]
        source = await make_nats()
        assert await nothing_more(source)  # letters are not events
        async with jetstream() as js:
            info = await js.stream_info(_param(nats_url, "stream"))
        assert info.config.subjects == [_param(nats_url, "subject")]  # not extended
        assert info.state.messages == 0

    async def test_letters_never_enter_the_operators_stream_and_are_read_from_their_own(
        self, nats_url: str, make_nats: MakeNats, publish: Publish
    ) -> None:
        from worker import dlq

        await make_nats()  # the operator's stream exists first, as in production
        await publish(bodies(1))
        beside = default_dead_letter_url(nats_url)
        sink = open_dead_letter_sink(beside)
        await sink.open()
        await sink.put({"reason": "invalid_event", "eventId": "e1", "event": {"a": 1}})
        await sink.close()
        async with jetstream() as js:
            operators = await js.stream_info(_param(nats_url, "stream"))
            own = await js.stream_info(_param(nats_url, "stream") + "_DEAD_LETTER")
        assert operators.config.subjects == [_param(nats_url, "subject")]
        assert operators.state.messages == 1  # the event only
        assert own.config.subjects == [_param(beside, "subject")]
        assert own.state.messages == 1
        assert [found["eventId"] for found in await dlq.read_letters(beside)] == ["e1"]

    async def test_letters_an_earlier_version_put_in_the_operators_stream_move_out(
        self, nats_url: str, make_nats: MakeNats
    ) -> None:
        from nats.js.api import StreamConfig

        from worker import dlq

        stream, subject = _param(nats_url, "stream"), _param(nats_url, "subject")
        letters = [{"reason": "invalid_event", "eventId": f"e{n}"} for n in range(2)]
        async with jetstream() as js:  # as the worker left it before: one stream for both
            config = StreamConfig(name=stream, subjects=[subject, subject + ".dead-letter"])
            await js.add_stream(config)
            await js.publish(subject, b'{"n": 0}', stream=stream)
            for letter in letters:
                msg_id = {"Nats-Msg-Id": letter_key(letter)}
                await js.publish(subject + ".dead-letter", orjson.dumps(letter), headers=msg_id)
        beside = default_dead_letter_url(nats_url)
        for _run in range(2):  # a second open (another replica) moves nothing twice
            sink = open_dead_letter_sink(beside)
            await sink.open()
            await sink.put(letters[1])  # stored before: a duplicate
            await sink.close()
        assert [found["eventId"] for found in await dlq.read_letters(beside)] == ["e0", "e1"]
        async with jetstream() as js:
            operators = await js.stream_info(stream)
        assert operators.config.subjects == [subject]
        assert operators.state.messages == 1  # the event stays
        source = await make_nats()
        (event,) = await collect(source, 1)
        await source.ack(event)

    async def test_reading_letters_changes_no_stream(self, nats_url: str) -> None:
        from nats.js.api import StreamConfig

        from worker import dlq

        stream, subject = _param(nats_url, "stream"), _param(nats_url, "subject")
        letter = {"reason": "invalid_event", "eventId": "e0"}
        async with jetstream() as js:  # an earlier version's layout, not moved yet
            config = StreamConfig(name=stream, subjects=[subject, subject + ".dead-letter"])
            await js.add_stream(config)
            await js.publish(subject + ".dead-letter", orjson.dumps(letter))
        beside = default_dead_letter_url(nats_url)
        assert [found["eventId"] for found in await dlq.read_letters(beside)] == ["e0"]
        async with jetstream() as js:
            info = await js.stream_info(stream)
            assert info.config.subjects == [subject, subject + ".dead-letter"]  # untouched
            assert info.state.messages == 1
            with pytest.raises(NotFoundError):  # no stream made by looking
                await js.stream_info(stream + "_DEAD_LETTER")

    async def test_a_dead_letter_subject_the_operators_stream_captures_is_refused(
        self, nats_url: str
    ) -> None:
        from nats.js.api import StreamConfig

        stream, subject = _param(nats_url, "stream"), _param(nats_url, "subject")
        async with jetstream() as js:  # `<subject>.>` captures `<subject>.dead-letter`
            await js.add_stream(StreamConfig(name=stream, subjects=[subject, subject + ".>"]))
        sink = open_dead_letter_sink(default_dead_letter_url(nats_url))
        with pytest.raises(SourceError) as caught:
            await sink.open()
        await sink.close()
        assert stream in str(caught.value)
        assert subject + ".dead-letter" in str(caught.value)
        async with jetstream() as js:
            info = await js.stream_info(stream)
        assert info.config.subjects == [subject, subject + ".>"]  # left as the operator made it

    async def test_a_letter_over_the_servers_max_payload_is_stored_cut_not_refused(
        self, nats_url: str
    ) -> None:
        big = {"orderRef": "x", "pad": "p" * (1 << 20)}  # over NATS's 1 MiB default
        letter = {"reason": "cdp_rejected", "eventId": "e1", "orderRef": "x", "event": big}
        sink = open_dead_letter_sink(default_dead_letter_url(nats_url))
        await sink.open()
        await sink.put(letter)  # refused for ever before: the letter held, readiness off
        await sink.close()
        (stored,) = await letters_on(nats_url)
        assert stored["truncated"] is True
        assert stored["sha256"] == hashlib.sha256(orjson.dumps(big)).hexdigest()
        assert "event" not in stored
        assert stored["raw"].startswith('{"orderRef":"x"')


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("nats://127.0.0.1:4222?subject=s", "?stream=NAME&subject=NAME"),
        ("nats://127.0.0.1:4222?stream=S", "?stream=NAME&subject=NAME"),
        ("nats://127.0.0.1:4222?stream=S&subject=s&durabel=x", "durabel"),
        ("nats://127.0.0.1:4222?stream=S.X&subject=s", "valid JetStream name"),
        ("nats://127.0.0.1:4222?stream=S&subject=s.*", "literal subject"),
        ("nats://127.0.0.1:4222?stream=S&subject=s&ack_wait=soon", "ack_wait"),
        ("nats://127.0.0.1:4222?stream=S&subject=s&max_deliver=0", "max_deliver"),
    ],
)
def test_a_bad_url_is_a_config_error_naming_the_option(url: str, complaint: str) -> None:
    secret = url.replace("nats://", "nats://cdp:hunter2@")
    with pytest.raises(ConfigError) as caught:
        open_source(secret)
    assert complaint in str(caught.value)
    assert "--source" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_urls_for_logs_and_dead_letters() -> None:
    from worker._urls import safe_url
    from worker.sources.nats import NatsSource, dead_letter_url

    url = "nats://cdp:hunter2@n1:4222,n2:4222?stream=S&subject=order-contacts&max_deliver=9"
    assert safe_url(url) == "nats://n1:4222,n2:4222?stream=S&subject=order-contacts&max_deliver=9"
    assert "s3cr3t" not in safe_url("tls://s3cr3t@nats.example:4222?stream=S&subject=s")
    assert dead_letter_url(url) == (
        "nats://cdp:hunter2@n1:4222,n2:4222?stream=S&subject=order-contacts.dead-letter"
    )
    source = NatsSource(url)
    assert "hunter2" not in source.name
    assert (source.durable, source.max_deliver, source.ack_wait) == ("cdp-sync", 9, 60.0)


async def test_an_unreachable_server_fails_at_open_without_the_password() -> None:
    source = open_source("nats://cdp:hunter2@127.0.0.1:1?stream=S&subject=s")
    started = time.monotonic()
    with pytest.raises(SourceError) as caught:
        await source.open()
    assert time.monotonic() - started < 5
    assert "127.0.0.1:1" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    await source.close()


async def test_the_publisher_keeps_the_order_and_a_closed_source_refuses_to_fetch(
    publish: Publish, make_nats: MakeNats
) -> None:
    await publish(bodies(600, "order"))
    source = await make_nats()
    messages = await collect(source, 600)
    assert [m.body for m in sorted(messages, key=lambda m: int(m.id))] == bodies(600, "order")
    for message in messages:
        await source.ack(message)
    await source.close()
    with pytest.raises(SourceError, match="not open"):
        await source.fetch(1, 0.1)
