"""`worker publish` sends every non-blank line byte for byte (only its terminator cut)."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import services

# Spaces and tabs around and inside, a carriage return and a form feed inside a line, a
# line ending in \r\n, blank lines of every kind, and a last line without a newline.
INPUT = (
    b'  {"a": 1}  \n'
    b'\t{"b": "x  y"}\t\r\n'
    b"\n"
    b"   \t \r\n"
    b'{"c": "one\rtwo"} \n'
    b'{"d": "\x0c"}\n'
    b"\xef\xbb\xbf\n"
    b'  {"e": 5}'
)
SENT = [
    b'  {"a": 1}  ',
    b'\t{"b": "x  y"}\t',
    b'{"c": "one\rtwo"} ',
    b'{"d": "\x0c"}',
    b'  {"e": 5}',
]

ReadBack = Callable[[], Awaitable[list[bytes]]]


async def _publish(to: str, tmp_path: Path) -> None:
    lines = tmp_path / "lines.jsonl"
    lines.write_bytes(INPUT)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "publish", "--to", to, str(lines),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    assert f"published {len(SENT)} of {len(SENT)} messages" in out.decode()


async def test_lines_go_to_a_file_byte_for_byte(tmp_path: Path) -> None:
    target = tmp_path / "events.jsonl"
    await _publish(f"file:{target}", tmp_path)
    assert target.read_bytes() == b"".join(line + b"\n" for line in SENT)


@pytest.fixture
async def redis_stream() -> AsyncIterator[str]:
    services.require("redis")
    import redis.asyncio as aioredis

    stream = f"test-publish-{uuid.uuid4().hex[:12]}"
    yield stream
    client = aioredis.Redis.from_url(services.REDIS_URL)
    await client.delete(stream)
    await client.aclose()


async def test_lines_go_to_a_redis_stream_byte_for_byte(redis_stream: str, tmp_path: Path) -> None:
    import redis.asyncio as aioredis

    await _publish(f"{services.REDIS_URL}?stream={redis_stream}", tmp_path)
    client = aioredis.Redis.from_url(services.REDIS_URL)
    try:
        entries = await client.xrange(redis_stream)
    finally:
        await client.aclose()
    assert [fields[b"event"] for _id, fields in entries] == SENT


async def test_lines_go_to_a_nats_subject_byte_for_byte(tmp_path: Path) -> None:
    services.require("nats")
    import nats

    name = uuid.uuid4().hex[:12]
    stream, subject = f"TEST_PUBLISH_{name}", f"test-publish-{name}"
    await _publish(f"{services.NATS_URL}?stream={stream}&subject={subject}", tmp_path)
    client = await nats.connect(services.NATS_URL)
    js = client.jetstream()
    try:
        got = [(await js.get_msg(stream, seq=n)).data for n in range(1, len(SENT) + 1)]
    finally:
        await js.delete_stream(stream)
        await client.close()
    assert got == SENT
