"""The JSONL file source and the file dead-letter sink, on real files and a real SQLite store.

What is pinned down here is what `worker run` over a file relies on (DESIGN section 5): line
ids, batches, the acked-line checkpoint that survives a restart (and skips lines finished
above a gap), acks that are durable on return and share commits, truncation, nack
redelivery, `--follow`, stdin, and dead letters that are fsynced, whole and shared.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest

import worker.sources.file as file_module
from worker.errors import ConfigError, SourceError
from worker.sources import (
    FileDeadLetterSink,
    FileSource,
    MemoryDeadLetterSink,
    Message,
    Source,
    open_dead_letter_sink,
    open_source,
)
from worker.state import SqliteStateStore

REPO = Path(__file__).resolve().parent.parent


# -- helpers ---------------------------------------------------------------------------------


def body(n: int) -> bytes:
    return orjson.dumps({"n": n})


def write_events(path: Path, count: int, *, final_newline: bool = True) -> None:
    text = b"\n".join(body(n) for n in range(1, count + 1))
    path.write_bytes(text + (b"\n" if final_newline else b""))


def checkpoint_key(path: Path) -> str:
    return f"file:{path.resolve()}"


async def read_checkpoint(db: Path, path: Path) -> dict[str, Any] | None:
    """Where the checkpoint says the file is done, as a *second* store on the same
    database file sees it (what identifies the file: `read_identity`)."""
    saved = await read_identity(db, path)
    return None if saved is None else {k: v for k, v in saved.items() if k != "file"}


async def read_identity(db: Path, path: Path) -> dict[str, Any] | None:
    """The whole checkpoint, with the identity of the file it is about."""
    other = SqliteStateStore(db)
    await other.open()
    try:
        saved = await other.get_checkpoint(checkpoint_key(path))
    finally:
        await other.close()
    return None if saved is None else orjson.loads(saved)


async def drain(source: Source, *, batch: int = 100, ack: bool = False) -> list[Message]:
    """Fetch until the finite source ends; optionally ack each batch as it comes."""
    out: list[Message] = []
    for _ in range(10_000):
        fetched = await source.fetch(batch, 0.05)
        if fetched is None:
            return out
        assert len(fetched) <= batch
        out.extend(fetched)
        if ack:
            for message in fetched:
                await source.ack(message)
    raise AssertionError("a finite source never ended")


def ids(messages: Iterable[Message]) -> list[str]:
    return [m.id for m in messages]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
async def store(db: Path) -> AsyncIterator[SqliteStateStore]:
    opened = SqliteStateStore(db)
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
def events_file(tmp_path: Path) -> Path:
    return tmp_path / "events.jsonl"


Opener = Callable[..., Awaitable[Source]]
StoreOpener = Callable[[], Awaitable[SqliteStateStore]]


@pytest.fixture
async def new_store(db: Path) -> AsyncIterator[StoreOpener]:
    """`await new_store()`: a fresh store on the test's database file (a "new process")."""
    stores: list[SqliteStateStore] = []

    async def open_store() -> SqliteStateStore:
        store = SqliteStateStore(db)
        stores.append(store)
        await store.open()
        return store

    yield open_store
    for store in stores:
        await store.close()


@pytest.fixture
async def opened() -> AsyncIterator[Opener]:
    """`await opened(path, store, follow=...)`: an open file source, closed at teardown."""
    sources: list[Source] = []

    async def open_file(
        path: Path, store: SqliteStateStore | None, *, follow: bool = False
    ) -> Source:
        source = open_source(f"file:{path}", state=store, follow=follow)
        sources.append(source)
        await source.open()
        return source

    yield open_file
    for source in sources:
        await source.close()


# -- reading ---------------------------------------------------------------------------------


async def test_reads_batches_with_line_ids_skipping_blank_lines(
    events_file: Path, store: SqliteStateStore, opened: Opener
) -> None:
    # Line 2 is empty, line 4 only whitespace (and CRLF), the last line has no newline.
    events_file.write_bytes(body(1) + b"\n\n" + body(3) + b"\n  \t \r\n" + body(5))
    source = await opened(events_file, store)
    assert source.finite
    batches: list[list[Message]] = []
    while (fetched := await source.fetch(2, 0.05)) is not None:
        assert len(fetched) <= 2
        batches.append(fetched)
    messages = [m for batch in batches for m in batch]
    assert ids(messages) == ["events.jsonl:1", "events.jsonl:3", "events.jsonl:5"]
    assert [m.body for m in messages] == [body(1), body(3), body(5)]  # no newline, stripped
    assert [m.delivery_count for m in messages] == [1, 1, 1]
    assert len(batches) >= 2  # batched, not all at once
    assert await source.fetch(2, 0.05) is None  # and it stays ended
    await source.close()
    await source.close()  # idempotent


async def test_a_large_file_is_delivered_in_full_and_in_order(
    events_file: Path, store: SqliteStateStore, opened: Opener
) -> None:
    write_events(events_file, 1000)
    source = await opened(events_file, store)
    messages = await drain(source, batch=64)
    assert ids(messages) == [f"events.jsonl:{n}" for n in range(1, 1001)]
    assert [orjson.loads(m.body)["n"] for m in messages] == list(range(1, 1001))
    await source.close()


async def test_an_empty_file_ends_at_once(
    events_file: Path, store: SqliteStateStore, opened: Opener
) -> None:
    events_file.write_bytes(b"")
    source = await opened(events_file, store)
    assert await source.fetch(10, 0.05) is None
    await source.close()


async def test_check_refuses_a_missing_file_or_a_directory_before_anything_opens(
    tmp_path: Path,
) -> None:
    with pytest.raises(SourceError, match=r"--source.*nope\.jsonl"):
        await open_source(f"file:{tmp_path / 'nope.jsonl'}").check()
    with pytest.raises(SourceError, match="is a directory"):
        await open_source(f"file:{tmp_path}").check()
    (tmp_path / "events.jsonl").write_bytes(b"")
    await open_source(f"file:{tmp_path / 'events.jsonl'}").check()  # fine: no error


async def test_a_missing_file_is_a_source_error_naming_the_option(tmp_path: Path) -> None:
    source = open_source(f"file:{tmp_path / 'nope.jsonl'}")
    with pytest.raises(SourceError, match="--source"):
        await source.open()


# -- the acked-line checkpoint ---------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2, 100])
async def test_restart_resumes_at_the_gap_and_skips_lines_acked_above_it(
    events_file: Path, db: Path, batch: int, opened: Opener, new_store: StoreOpener
) -> None:
    write_events(events_file, 8)
    store = await new_store()
    source = await opened(events_file, store)
    first = {m.token: m for m in await drain(source, batch=batch)}
    for line in (5, 1, 4, 2):  # out of order; line 3 (and 6..8) never finished
        await source.ack(first[line])
    await source.close()
    await store.close()

    assert await read_checkpoint(db, events_file) == {
        "line": 2,
        "offset": 2 * len(body(1) + b"\n"),
        "above": [[4, 5]],  # ranges of lines
    }

    # A new process: a new store on the same file, a new source. Acks as it goes, in
    # batches of `batch`, which is how the worker interleaves fetches and acks.
    store = await new_store()
    source = await opened(events_file, store)
    second = await drain(source, batch=batch, ack=True)
    assert ids(second) == [f"events.jsonl:{n}" for n in (3, 6, 7, 8)]
    assert [m.body for m in second] == [body(n) for n in (3, 6, 7, 8)]
    await source.close()
    await store.close()

    assert await read_checkpoint(db, events_file) == {
        "line": 8,
        "offset": events_file.stat().st_size,
        "above": [],
    }

    # A rerun over the finished file sends nothing: the very first fetch says "the end".
    store = await new_store()
    source = await opened(events_file, store)
    assert await source.fetch(batch, 0.05) is None
    await source.close()
    await store.close()


async def test_restart_after_a_long_gap_keeps_line_numbers_and_offsets_right(
    events_file: Path, db: Path, opened: Opener, new_store: StoreOpener
) -> None:
    """Line 1 stuck in retries while 2..300 finished: a restart must redo line 1 only."""
    write_events(events_file, 300)
    store = await new_store()
    source = await opened(events_file, store)
    messages = await drain(source)
    for message in messages[1:]:
        await source.ack(message)
    await source.close()
    await store.close()

    store = await new_store()
    source = await opened(events_file, store)
    again = await drain(source, batch=10, ack=True)
    assert ids(again) == ["events.jsonl:1"]
    await source.close()
    await store.close()
    # Whatever the watermark, it must pair a line with that line's end and, with the lines
    # above it, cover the whole file.
    saved = await read_checkpoint(db, events_file)
    assert saved is not None
    lines = events_file.read_bytes().splitlines(keepends=True)
    assert saved["offset"] == sum(len(line) for line in lines[: saved["line"]])
    assert set(range(1, saved["line"] + 1)) | above(saved) == set(range(1, 301))

    store = await new_store()
    source = await opened(events_file, store)
    assert await drain(source, batch=10) == []
    await store.close()


async def three_lines_read(
    events_file: Path, store: SqliteStateStore, opened: Opener
) -> tuple[Source, dict[int, Message]]:
    """A source over a file of three events, all read and none acked: by line number."""
    write_events(events_file, 3)
    source = await opened(events_file, store)
    return source, {m.token: m for m in await drain(source)}


async def test_the_checkpoint_follows_the_acks_without_holding_them_up(
    events_file: Path, db: Path, store: SqliteStateStore, opened: Opener
) -> None:
    source, messages = await three_lines_read(events_file, store, opened)
    assert await read_checkpoint(db, events_file) is None

    before = store.commits
    await source.ack(messages[1])
    assert store.commits == before  # the ack did not wait for a write
    seen = await checkpoint_soon(db, events_file, line=1)  # written by itself, soon
    assert (seen["line"], seen["above"]) == (1, [])

    await source.ack(messages[3])
    await source.flush()  # or at once, when asked (close does)
    seen = await read_checkpoint(db, events_file)
    assert seen is not None
    assert (seen["line"], seen["above"]) == (1, [[3, 3]])
    await source.close()


async def test_an_ack_after_a_quiet_spell_starts_the_write_at_once_and_the_next_waits(
    events_file: Path,
    db: Path,
    store: SqliteStateStore,
    opened: Opener,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # At a paced rate acks come a slice apart: a write that waited the interval first
    # would be a wake-up of its own, where one that starts at once rides the store's next
    # commit. Acks closer together than the interval still share one write.
    monkeypatch.setattr("worker.sources.file.CHECKPOINT_INTERVAL", 30.0)
    source, messages = await three_lines_read(events_file, store, opened)
    written: list[str] = []
    original = store.set_checkpoint

    async def recording(key: str, value: str, *, urgent: bool = False) -> None:
        written.append(value)
        await original(key, value, urgent=urgent)

    monkeypatch.setattr(store, "set_checkpoint", recording)
    await source.ack(messages[1])
    for _ in range(100):
        if written:
            break
        await asyncio.sleep(0.01)
    assert len(written) == 1  # not 30 s later
    await checkpoint_soon(db, events_file, line=1)  # landed (with the store's next commit)
    await source.ack(messages[2])
    await asyncio.sleep(0.2)
    assert len(written) == 1  # within the interval of the last write: it waits
    await source.flush()
    assert len(written) == 2
    await source.close()


async def test_closing_does_not_wait_for_the_checkpoint_to_ride_with_a_commit(
    events_file: Path, db: Path, store: SqliteStateStore, opened: Opener,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr("worker.state.sqlite.CHECKPOINT_RIDE", 30.0)
    source, messages = await three_lines_read(events_file, store, opened)
    for message in messages.values():
        await source.ack(message)
    await asyncio.wait_for(source.close(), 5)  # not 30 s
    seen = await read_checkpoint(db, events_file)
    assert seen is not None
    assert seen["line"] == 3


async def checkpoint_soon(db: Path, path: Path, *, line: int) -> dict[str, Any]:
    """The checkpoint once it has reached `line`: written CHECKPOINT_INTERVAL after the
    ack, so give it up to a few seconds on a loaded machine."""
    for _ in range(100):
        seen = await read_checkpoint(db, path)
        if seen is not None and seen["line"] >= line:
            return seen
        await asyncio.sleep(0.05)
    raise AssertionError(f"the checkpoint did not reach line {line}")


async def test_concurrent_acks_share_one_write_and_none_waits_for_it(
    events_file: Path, db: Path, store: SqliteStateStore, opened: Opener
) -> None:
    write_events(events_file, 500)
    source = await opened(events_file, store)
    messages = await drain(source, batch=1000)
    assert len(messages) == 500
    random.Random(7).shuffle(messages)
    before = store.commits
    await asyncio.gather(*(source.ack(m) for m in messages))
    assert store.commits == before  # 500 acks returned without a write
    seen = await checkpoint_soon(db, events_file, line=500)
    commits = store.commits - before
    assert 1 <= commits <= 3, commits  # 500 acks, one or two writes
    assert seen == {"line": 500, "offset": events_file.stat().st_size, "above": []}
    await source.close()


async def test_close_writes_what_the_last_acks_finished(
    events_file: Path, db: Path, store: SqliteStateStore, opened: Opener
) -> None:
    write_events(events_file, 5)
    source = await opened(events_file, store)
    for message in await drain(source):
        await source.ack(message)
    await source.close()  # at once, not an interval later
    saved = await read_checkpoint(db, events_file)
    assert saved == {"line": 5, "offset": events_file.stat().st_size, "above": []}


async def test_a_truncated_file_is_read_again_from_the_start(
    events_file: Path, db: Path, opened: Opener, new_store: StoreOpener
) -> None:
    write_events(events_file, 5)
    store = await new_store()
    source = await opened(events_file, store)
    await drain(source, ack=True)
    await source.close()
    await store.close()

    # Replaced by a shorter file: the saved offset lies past its end.
    events_file.write_bytes(b'{"new": 1}\n{"new": 2}\n')
    store = await new_store()
    source = await opened(events_file, store)
    again = await drain(source, ack=True)
    assert ids(again) == ["events.jsonl:1", "events.jsonl:2"]
    assert [m.body for m in again] == [b'{"new": 1}', b'{"new": 2}']
    await source.close()
    await store.close()
    saved = await read_checkpoint(db, events_file)
    assert saved == {"line": 2, "offset": events_file.stat().st_size, "above": []}


async def test_without_a_state_store_nothing_is_checkpointed(
    events_file: Path, opened: Opener
) -> None:
    write_events(events_file, 2)
    for _ in range(2):  # both runs deliver everything
        source = await opened(events_file, None)
        assert ids(await drain(source, ack=True)) == ["events.jsonl:1", "events.jsonl:2"]
        await source.close()


async def test_a_blank_line_alone_finishes_without_an_ack(
    events_file: Path, db: Path, store: SqliteStateStore, opened: Opener
) -> None:
    events_file.write_bytes(b"\n\n" + body(3) + b"\n\n")
    source = await opened(events_file, store)
    messages = await drain(source)
    assert ids(messages) == ["events.jsonl:3"]
    await source.ack(messages[0])
    await source.flush()
    saved = await read_checkpoint(db, events_file)
    assert saved is not None
    assert saved["line"] >= 3
    assert saved["above"] == []
    await source.close()


# -- nack ------------------------------------------------------------------------------------


async def test_nack_redelivers_later_and_the_end_waits_for_it(
    events_file: Path, db: Path, store: SqliteStateStore, opened: Opener
) -> None:
    write_events(events_file, 2)
    source = await opened(events_file, store)
    first, second = await drain_until_quiet(source)
    await source.ack(second)
    started = time.monotonic()
    await source.nack(first, delay=0.3)

    again: list[Message] = []
    empty_polls = 0
    while not again:
        fetched = await source.fetch(10, 0.05)
        assert fetched is not None, "ended while a redelivery was pending"
        again = fetched
        empty_polls += not fetched
        assert time.monotonic() - started < 5
    elapsed = time.monotonic() - started
    assert elapsed >= 0.28
    assert empty_polls >= 1
    (redelivered,) = again
    assert (redelivered.id, redelivered.body) == (first.id, first.body)
    # A nack is not a failed delivery: only the transport's redeliveries count.
    assert redelivered.delivery_count == 1

    await source.nack(redelivered)  # delay 0: right away
    (third,) = await fetch_one(source)
    assert third.delivery_count == 1
    await source.ack(third)
    assert await source.fetch(10, 0.05) is None
    await source.close()
    saved = await read_checkpoint(db, events_file)
    assert saved is not None
    assert (saved["line"], saved["above"]) == (2, [])


async def drain_until_quiet(source: Source) -> list[Message]:
    """Everything a finite source has now, up to (not including) its end."""
    out: list[Message] = []
    while True:
        fetched = await source.fetch(100, 0.05)
        if not fetched:
            return out
        out.extend(fetched)


async def fetch_one(source: Source) -> list[Message]:
    for _ in range(100):
        fetched = await source.fetch(10, 0.05)
        assert fetched is not None
        if fetched:
            return fetched
    raise AssertionError("nothing came")


# -- --follow --------------------------------------------------------------------------------


async def test_follow_picks_up_appended_lines_but_not_half_written_ones(
    events_file: Path, store: SqliteStateStore, opened: Opener
) -> None:
    write_events(events_file, 1)
    source = await opened(events_file, store, follow=True)
    assert not source.finite
    assert ids(await fetch_one(source)) == ["events.jsonl:1"]
    for _ in range(3):
        assert await source.fetch(10, 0.02) == []  # the end of the file is not the end

    async def append_later() -> None:
        await asyncio.sleep(0.1)
        with events_file.open("ab") as out:
            out.write(body(2) + b"\n" + b'{"n": 3, ')  # line 3 only half written
            out.flush()

    writer = asyncio.create_task(append_later())
    assert ids(await fetch_one(source)) == ["events.jsonl:2"]
    await writer
    for _ in range(5):
        assert await source.fetch(10, 0.02) == [], "a line without its newline was delivered"

    with events_file.open("ab") as out:
        out.write(b'"tail": true}\n')
    (third,) = await fetch_one(source)
    assert third.id == "events.jsonl:3"
    assert third.body == b'{"n": 3, "tail": true}'
    await source.close()


async def test_follow_resumes_from_its_checkpoint(
    events_file: Path, db: Path, store: SqliteStateStore, opened: Opener
) -> None:
    source = await following_finished(events_file, store, opened)
    await source.close()
    with events_file.open("ab") as out:
        out.write(body(4) + b"\n")
    source = await opened(events_file, store, follow=True)
    assert ids(await fetch_one(source)) == ["events.jsonl:4"]
    assert await source.fetch(10, 0.02) == []
    await source.close()


# -- the file's identity (DESIGN section 5) ---------------------------------------------------


async def test_the_checkpoint_names_the_file_it_is_about(
    events_file: Path, db: Path, store: SqliteStateStore, opened: Opener
) -> None:
    write_events(events_file, 30)  # well past 256 bytes
    source = await opened(events_file, store)
    messages = await drain(source)
    await source.ack(messages[0])  # the checkpoint lies before byte 256
    await source.flush()
    early = await read_identity(db, events_file)
    assert early is not None
    head = events_file.read_bytes()
    stat = events_file.stat()
    offset = len(body(1)) + 1
    assert (
        early["file"]
        == {
            "dev": stat.st_dev,
            "ino": stat.st_ino,
            "head_bytes": offset,  # only what is finished: appending never changes it
            "head": hashlib.sha256(head[:offset]).hexdigest(),
        }
    )
    for message in messages[1:]:
        await source.ack(message)
    await source.flush()
    late = await read_identity(db, events_file)
    assert late is not None
    assert late["file"]["head_bytes"] == 256
    assert late["file"]["head"] == hashlib.sha256(head[:256]).hexdigest()
    await source.close()


async def finish_file(path: Path, opened: Opener, new_store: StoreOpener) -> None:
    """One run over `path` that acks every line, in a process of its own."""
    store = await new_store()
    source = await opened(path, store)
    await drain(source, ack=True)
    await source.close()
    await store.close()


async def rerun(path: Path, opened: Opener, new_store: StoreOpener) -> list[Message]:
    store = await new_store()
    source = await opened(path, store)
    again = await drain(source, ack=True)
    await source.close()
    await store.close()
    return again


async def test_a_file_replaced_by_a_longer_one_is_read_from_its_beginning(
    events_file: Path, tmp_path: Path, opened: Opener, new_store: StoreOpener
) -> None:
    write_events(events_file, 6)
    await finish_file(events_file, opened, new_store)
    # A new file (a new inode) at the same path, longer than the old offset.
    new = tmp_path / "new.jsonl"
    new.write_bytes(b"".join(orjson.dumps({"new": n, "pad": "x" * 40}) + b"\n" for n in range(6)))
    os.replace(new, events_file)
    again = await rerun(events_file, opened, new_store)
    assert ids(again) == [f"events.jsonl:{n}" for n in range(1, 7)]  # nothing skipped


async def test_a_file_rewritten_in_place_is_read_from_its_beginning(
    events_file: Path, opened: Opener, new_store: StoreOpener
) -> None:
    write_events(events_file, 6)
    await finish_file(events_file, opened, new_store)
    inode = events_file.stat().st_ino
    with events_file.open("r+b") as out:  # the same inode, other bytes at its start
        out.write(b'{"n":9}')  # as long as what it replaces: still six lines
    assert events_file.stat().st_ino == inode
    again = await rerun(events_file, opened, new_store)
    assert ids(again)[0] == "events.jsonl:1"
    assert len(again) == 6


async def test_appending_to_a_finished_file_resumes_after_it(
    events_file: Path, opened: Opener, new_store: StoreOpener
) -> None:
    write_events(events_file, 3)  # under 256 bytes: the head covers only what is done
    await finish_file(events_file, opened, new_store)
    with events_file.open("ab") as out:
        out.write(body(4) + b"\n" + body(5) + b"\n")
    again = await rerun(events_file, opened, new_store)
    assert ids(again) == ["events.jsonl:4", "events.jsonl:5"]


async def test_follow_finishes_a_rotated_file_before_reading_the_new_one(
    events_file: Path, tmp_path: Path, store: SqliteStateStore, opened: Opener
) -> None:
    write_events(events_file, 2)
    source = await opened(events_file, store, follow=True)
    first = await fetch_one(source)
    assert ids(first) == ["events.jsonl:1", "events.jsonl:2"]
    # The writer rotates: renames the file away, writes a last line into it (its handle
    # is still open), and starts a new file at the path.
    rotated = tmp_path / "events.jsonl.1"
    os.rename(events_file, rotated)
    with rotated.open("ab") as out:
        out.write(body(3) + b"\n")
    events_file.write_bytes(b'{"new": 1}\n{"new": 2}\n')
    third = await fetch_one(source)
    assert [m.body for m in third] == [body(3)]  # the old file's last line first
    for _ in range(3):  # the new file waits until the old one is finished
        assert await source.fetch(10, 0.02) == []
    for message in first + third:
        await source.ack(message)
    new = await fetch_one(source)
    assert [m.body for m in new] == [b'{"new": 1}', b'{"new": 2}']
    assert ids(new) == ["events.jsonl:1", "events.jsonl:2"]
    for message in new:
        await source.ack(message)
    await source.close()


async def following_finished(path: Path, store: SqliteStateStore, opened: Opener) -> Source:
    """A --follow source on a file of 3 events, each of them fetched and acked."""
    write_events(path, 3)
    source = await opened(path, store, follow=True)
    for message in await fetch_one(source):
        await source.ack(message)
    return source


async def test_follow_reads_a_file_truncated_in_place_from_its_beginning(
    events_file: Path, store: SqliteStateStore, opened: Opener
) -> None:
    source = await following_finished(events_file, store, opened)
    events_file.write_bytes(b'{"again": 1}\n')  # copytruncate: same inode, shorter
    (again,) = await fetch_one(source)
    assert again.body == b'{"again": 1}'
    assert again.id == "events.jsonl:1"
    await source.ack(again)
    await source.close()


async def test_follow_delivers_a_rotated_files_last_line_without_its_newline(
    events_file: Path, tmp_path: Path, store: SqliteStateStore, opened: Opener
) -> None:
    events_file.write_bytes(body(1) + b"\n" + body(2))  # the writer never ended line 2
    source = await opened(events_file, store, follow=True)
    (first,) = await fetch_one(source)
    await source.ack(first)
    os.rename(events_file, tmp_path / "events.jsonl.1")
    events_file.write_bytes(b'{"new": 1}\n')
    (second,) = await fetch_one(source)  # rotated away: its unended line is complete
    assert second.body == body(2)
    await source.ack(second)
    (third,) = await fetch_one(source)
    assert third.body == b'{"new": 1}'
    await source.close()


async def test_follow_remembers_a_truncation_while_lines_are_still_in_flight(
    events_file: Path, store: SqliteStateStore, opened: Opener
) -> None:
    write_events(events_file, 3)
    source = await opened(events_file, store, follow=True)
    first = await fetch_one(source)
    for message in first[1:]:
        await source.ack(message)  # line 1 is still being worked (a 404 grace, say)
    events_file.write_bytes(b'{"y": 1}\n')  # truncated and rewritten...
    assert await source.fetch(10, 0.02) == []
    with events_file.open("ab") as out:  # ...and grown past the old end meanwhile
        out.write(b'{"y": 2}\n{"y": 3}\n{"y": 4}\n')
    assert await source.fetch(10, 0.02) == []  # nothing until line 1 is finished
    await source.ack(first[0])
    got: list[bytes] = []
    while len(got) < 4:
        for message in await fetch_one(source):
            got.append(message.body)
            await source.ack(message)
    assert got == [b'{"y": 1}', b'{"y": 2}', b'{"y": 3}', b'{"y": 4}']
    await source.close()


async def test_follow_sees_a_file_rewritten_in_place_between_two_reads(
    events_file: Path, store: SqliteStateStore, opened: Opener
) -> None:
    source = await following_finished(events_file, store, opened)
    # Truncated and regrown past the old end before the source looked again.
    events_file.write_bytes(b"".join(orjson.dumps({"z": n}) + b"\n" for n in range(5)))
    got = [m.body for m in await fetch_one(source)]
    assert got[0] == b'{"z":0}'
    await source.close()


# -- stdin -----------------------------------------------------------------------------------

STDIN_READER = textwrap.dedent(
    """
    import asyncio
    from worker.sources import open_source

    async def main() -> None:
        source = open_source("file:-")
        await source.open()
        while (batch := await source.fetch(10, 0.5)) is not None:
            for message in batch:
                print(message.id, message.body.decode(), message.delivery_count, flush=True)
                await source.ack(message)
        await source.close()
        print("END", flush=True)

    asyncio.run(main())
    """
)


async def test_stdin_streams_lines_and_ends_at_eof() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        STDIN_READER,
        cwd=REPO,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        process.stdin.write(body(1) + b"\n")
        await process.stdin.drain()
        # Delivered while stdin is still open: a pipe is read as it flows.
        line = await asyncio.wait_for(process.stdout.readline(), 10)
        assert line == b'stdin:1 {"n":1} 1\n'
        process.stdin.write(b"\n   \n" + body(4) + b"\n" + body(5))  # no final newline
        await process.stdin.drain()
        process.stdin.close()
        rest, errors = await asyncio.wait_for(process.communicate(), 10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert errors == b""
    assert process.returncode == 0
    assert rest.decode().splitlines() == ['stdin:4 {"n":4} 1', 'stdin:5 {"n":5} 1', "END"]


async def test_stdin_read_in_blocks_keeps_every_line_once_in_order() -> None:
    # 60,000 lines, several reads' worth, each block ending mid-line: lines split across
    # two reads come out whole, none lost or doubled, numbered as in the input.
    lines = [body(n) for n in range(1, 60_001)]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", STDIN_READER, cwd=REPO,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, errors = await asyncio.wait_for(process.communicate(b"\n".join(lines)), 120)
    assert errors == b""
    printed = out.decode().splitlines()
    assert printed[-1] == "END"
    expected = [f'stdin:{n} {{"n":{n}}} 1' for n in range(1, 60_001)]
    assert printed[:-1] == expected


def test_the_stdin_url_gives_a_finite_stdin_source() -> None:
    source = open_source("file:-", state=None)
    assert isinstance(source, FileSource)
    assert source.name == "file:-"
    assert source.finite


# -- the dead-letter sink --------------------------------------------------------------------


class FsyncCounter:
    """Wraps the real os.fsync: counts calls that *completed*, optionally slows or fails."""

    def __init__(self) -> None:
        self.real = os.fsync
        self.completed = 0
        self.started = 0
        self.delay = 0.0
        self.error: OSError | None = None
        self.second_started = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, fd: int) -> None:
        with self._lock:
            self.started += 1
            if self.started == 2:
                self.second_started.set()
        if self.delay:
            time.sleep(self.delay)
        if self.error is not None:
            raise self.error
        self.real(fd)
        with self._lock:
            self.completed += 1


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> FsyncCounter:
    counter = FsyncCounter()
    monkeypatch.setattr(file_module.os, "fsync", counter)
    return counter


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[FileDeadLetterSink]:
    opened_sink = open_dead_letter_sink(f"file:{tmp_path / 'dead-letter.jsonl'}")
    assert isinstance(opened_sink, FileDeadLetterSink)
    await opened_sink.open()
    yield opened_sink
    await opened_sink.close()


async def test_reading_ahead_of_a_stuck_line_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_module, "MAX_AHEAD", 5)
    monkeypatch.setattr(file_module, "FOLLOW_POLL_SECONDS", 0.01)
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(b'{"n": %d}\n' % n for n in range(1, 21)))
    source = FileSource(str(path))
    await source.open()
    handed: list[Message] = []
    for _ in range(10):
        batch = await source.fetch(2, 0.01)
        assert batch is not None
        for message in batch:
            handed.append(message)
            if message.token != 1:  # line 1 is stuck in retries
                await source.ack(message)
    assert [m.token for m in handed] == [1, 2, 3, 4, 5, 6]
    await source.ack(handed[0])
    batch = await source.fetch(2, 0.01)
    assert batch is not None
    assert [m.token for m in batch] == [7, 8]
    await source.close()


def above(checkpoint: dict[str, Any]) -> set[int]:
    """The lines a checkpoint's ranges cover."""
    return {n for first, last in checkpoint["above"] for n in range(first, last + 1)}


def letter(n: int) -> dict[str, Any]:
    return {
        "reason": "cdp_rejected",
        "detail": "firstName: is required",
        "orderRef": f"00000000-0000-4000-8000-{n:012d}",
        "eventId": f"e-{n}",
        "status": 400,
        "attempts": 1,
        "deadAt": "2026-11-26T10:00:00.000Z",
        "event": {"n": n, "text": "x" * (n % 50) * 100},  # some long enough to split writes
    }


def read_letters(path: Path) -> list[dict[str, Any]]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    return [orjson.loads(line) for line in raw.splitlines()]


async def test_put_appends_one_json_object_per_line_fsynced_on_return(
    sink: FileDeadLetterSink, fsyncs: FsyncCounter
) -> None:
    path = Path(sink.path)
    await sink.put(letter(1))
    assert fsyncs.completed == 1
    assert read_letters(path) == [letter(1)]
    await sink.put(letter(2))
    assert fsyncs.completed == 2
    assert read_letters(path) == [letter(1), letter(2)]


async def test_put_appends_to_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "dl.jsonl"
    path.write_bytes(orjson.dumps(letter(0)) + b"\n")
    appended = FileDeadLetterSink(str(path))
    await appended.open()
    await appended.put(letter(1))
    await appended.close()
    assert read_letters(path) == [letter(0), letter(1)]


async def test_a_letter_stored_by_a_killed_run_is_not_stored_again(tmp_path: Path) -> None:
    path = tmp_path / "dl.jsonl"
    first = FileDeadLetterSink(str(path))
    await first.open()
    await first.put(letter(1))
    await first.put(letter(1))  # within one run, each put is a message of its own
    await first.close()
    rerun = FileDeadLetterSink(str(path))
    await rerun.open()
    # The same message, dead-lettered again later and after more attempts.
    await rerun.put({**letter(1), "deadAt": "2026-11-27T00:00:00.000Z", "attempts": 3})
    await rerun.put({**letter(1), "eventId": "another-event"})
    await rerun.put(letter(2))
    await rerun.close()
    assert [(d["eventId"], d["event"]["n"]) for d in read_letters(path)] == [
        ("e-1", 1),
        ("e-1", 1),
        ("another-event", 1),
        ("e-2", 2),
    ]


async def test_a_line_torn_by_a_crash_is_cut_off_on_open(tmp_path: Path) -> None:
    path = tmp_path / "dl.jsonl"
    whole = orjson.dumps(letter(1)) + b"\n"
    path.write_bytes(whole + orjson.dumps(letter(2))[:25])
    sink = FileDeadLetterSink(str(path))
    await sink.open()
    await sink.put(letter(2))  # the torn letter was never acknowledged: it comes again
    await sink.close()
    assert read_letters(path) == [letter(1), letter(2)]


async def test_only_the_recent_tail_is_indexed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_module, "RECENT_BYTES", 600)  # letter 3 and part of 2
    path = tmp_path / "dl.jsonl"
    path.write_bytes(b"".join(orjson.dumps(letter(n)) + b"\n" for n in (1, 2, 3)))
    sink = FileDeadLetterSink(str(path))
    await sink.open()
    await sink.put(letter(1))  # too old to be a crash's leftover: stored
    await sink.put(letter(3))  # the last one: skipped
    await sink.close()
    assert [d["event"]["n"] for d in read_letters(path)] == [1, 2, 3, 1]


async def test_concurrent_puts_are_whole_lines_and_share_writes(
    sink: FileDeadLetterSink, fsyncs: FsyncCounter
) -> None:
    await asyncio.gather(*(sink.put(letter(n)) for n in range(200)))
    letters = read_letters(Path(sink.path))
    assert len(letters) == 200
    assert sorted(item["eventId"] for item in letters) == sorted(f"e-{n}" for n in range(200))
    assert all(item == letter(int(item["eventId"][2:])) for item in letters)
    assert 1 <= fsyncs.completed < 200
    assert fsyncs.completed <= 5, fsyncs.completed


async def test_a_failed_write_fails_every_letter_that_rode_on_it(
    sink: FileDeadLetterSink, fsyncs: FsyncCounter
) -> None:
    fsyncs.error = OSError(5, "Input/output error")
    results = await asyncio.gather(
        *(sink.put(letter(n)) for n in range(20)), return_exceptions=True
    )
    assert all(isinstance(result, SourceError) for result in results), results
    fsyncs.error = None
    await sink.put(letter(99))  # the sink still works afterwards


async def test_a_cancelled_put_does_not_strand_the_letters_sharing_its_write(
    sink: FileDeadLetterSink, fsyncs: FsyncCounter
) -> None:
    fsyncs.delay = 0.2
    first = asyncio.create_task(sink.put(letter(1)))
    await asyncio.sleep(0.05)  # the first write is under way: the next two share one write
    second = asyncio.create_task(sink.put(letter(2)))
    third = asyncio.create_task(sink.put(letter(3)))
    assert await asyncio.to_thread(fsyncs.second_started.wait, 5)
    # The write carrying letters 2 and 3 is in progress. Whoever started it is cancelled;
    # the letter of the other must still be written and its put must return.
    second.cancel()
    done, _ = await asyncio.wait({first, second, third}, timeout=3)
    assert first in done
    assert third in done, "a put waits forever for a write abandoned by a cancelled put"
    await first
    await third
    assert [item["eventId"] for item in read_letters(Path(sink.path))] == ["e-1", "e-2", "e-3"]


async def test_an_unwritable_dead_letter_path_fails_on_open(tmp_path: Path) -> None:
    for path in (tmp_path / "missing-dir" / "dl.jsonl", tmp_path):
        unwritable = FileDeadLetterSink(str(path))
        with pytest.raises(SourceError, match="--dlq"):
            await unwritable.open()
        await unwritable.close()


# -- URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("file:./events.jsonl", "./events.jsonl"),
        ("file:events.jsonl", "events.jsonl"),
        ("file:///abs/dir/events.jsonl", "/abs/dir/events.jsonl"),
        ("file:/abs/events.jsonl", "/abs/events.jsonl"),
        ("file:-", "-"),
    ],
)
@pytest.mark.parametrize("follow", [False, True])
def test_open_source_file_urls(url: str, path: str, follow: bool) -> None:
    source = open_source(url, follow=follow)
    assert isinstance(source, FileSource)
    assert source.path == path
    assert source.follow is follow
    assert source.finite is not follow


@pytest.mark.parametrize(
    "url",
    [
        "kafka://broker:9092/topic",
        "events.jsonl",
        "./events.jsonl",
        "http://example.com/events.jsonl",
        "memory:",
        "",
    ],
)
def test_open_source_rejects_unsupported_urls_naming_the_option(url: str) -> None:
    with pytest.raises(ConfigError, match="--source / WORKER_SOURCE"):
        open_source(url)


@pytest.mark.parametrize(
    "url",
    [
        "rediss://:pass@localhost:6380/0",  # no ?stream=
        "amqp://user:pass@localhost:5672/vhost",  # no ?queue=
        "amqps://localhost",
        "nats://localhost:4222?stream=ORDER_CONTACTS",
    ],
)
def test_open_source_unusable_broker_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError, match="--source / WORKER_SOURCE") as raised:
        open_source(url)
    assert "pass" not in str(raised.value)  # the URL's password is not repeated


def test_open_source_file_without_a_path() -> None:
    with pytest.raises(ConfigError, match="--source"):
        open_source("file:")


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("file:./dead-letter.jsonl", "./dead-letter.jsonl"),
        ("file:///abs/dead-letter.jsonl", "/abs/dead-letter.jsonl"),
    ],
)
def test_open_dead_letter_sink_file_urls(url: str, path: str) -> None:
    sink_for_url = open_dead_letter_sink(url)
    assert isinstance(sink_for_url, FileDeadLetterSink)
    assert sink_for_url.path == path


def test_open_dead_letter_sink_memory() -> None:
    assert isinstance(open_dead_letter_sink("memory:"), MemoryDeadLetterSink)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("file:-", "not stdout"),
        ("file:", "needs a path"),
        ("kafka://broker/dlq", "unsupported"),
        ("dead-letter.jsonl", "unsupported"),
    ],
)
def test_open_dead_letter_sink_rejects_naming_the_option(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match="--dlq / WORKER_DLQ") as raised:
        open_dead_letter_sink(url)
    assert why in str(raised.value)
