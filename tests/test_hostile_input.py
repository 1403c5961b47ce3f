"""Any input finishes (DESIGN section 2): whatever the depth, size or bytes of a message,
it ends as a delivery or as one dead letter, and the run goes on.

Letters are unit-tested first (`dead_letter`), then hostile lines go through a whole
worker: file source, SQLite state, file dead letters, the emulator over HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import SECRET_KEY, SECRET_TOKEN

from worker.config import Settings
from worker.demo import contact_event
from worker.emulator import Emulator
from worker.pipeline import Worker
from worker.sources import open_dead_letter_sink
from worker.sources.base import LETTER_RAW_LIMIT, dead_letter

Events = Callable[[int], list[dict[str, Any]]]


def letter(event: dict[str, Any] | None, raw: bytes) -> dict[str, Any]:
    return dead_letter(
        "invalid_event", "why", order_ref=None, event_id="m-1", status=None, attempts=0,
        event=event, raw=raw,
    )  # fmt: skip


def test_a_letter_keeps_the_event_when_it_can() -> None:
    event = {"orderRef": "x", "contact": {}}
    kept = letter(event, orjson.dumps(event))
    assert kept["event"] == event
    assert "raw" not in kept
    orjson.dumps(kept)


@pytest.mark.parametrize("depth", [256, 600, 1000])
def test_an_event_too_deep_to_write_back_is_kept_as_its_text(depth: int) -> None:
    raw = b'{"orderRef": "x", "extra": ' + b"[" * depth + b"1" + b"]" * depth + b"}"
    event = orjson.loads(raw)  # orjson reads it...
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(event)  # ...and refuses to write it back
    kept = letter(event, raw)
    assert "event" not in kept
    assert kept["raw"] == raw.decode()
    orjson.dumps(kept)  # the letter itself can always be written


@pytest.mark.parametrize("filler", ["x", "é", "€", "😀"])  # 1 to 4 bytes a character
def test_a_huge_raw_text_is_cut_with_the_hash_of_the_whole(filler: str) -> None:
    raw = b'{"huge": "' + filler.encode() * (3 * LETTER_RAW_LIMIT) + b'"}'
    kept = letter(None, raw)
    assert len(kept["raw"].encode()) <= LETTER_RAW_LIMIT
    assert raw.decode().startswith(kept["raw"])
    assert kept["truncated"] is True
    assert kept["sha256"] == hashlib.sha256(raw).hexdigest()


def test_a_short_raw_text_is_kept_whole_and_not_marked() -> None:
    kept = letter(None, b"\xff not json")
    assert kept["raw"] == "\ufffd not json"
    assert "truncated" not in kept
    assert "sha256" not in kept


async def test_hostile_lines_each_end_once_and_the_run_ends_by_itself(
    tmp_path: Path, emulator: Emulator, events: Events
) -> None:
    valid = events(20)
    good = contact_event(random.Random(1), 99)
    deep_extra = b'{"orderRef": "' + good["orderRef"].encode() + b'", "deep": '
    deep_extra += b"[" * 700 + b"]" * 700 + b', "contact": {"firstName": ""}}'
    hostile = [
        deep_extra,  # invalid_event, whose event cannot be written back as JSON
        b"[" * 600 + b"]" * 600,  # JSON, not an object: invalid_event
        b'{"pad": "' + b"y" * (2 << 20) + b'"}',  # 2 MiB: invalid_event, cut in the letter
        b"\x00\xff\xfe binary \x80",  # malformed_json
        b"\xef\xbb\xbf" + orjson.dumps(valid[0]),  # a byte-order mark: delivered
        "\u00a0\u3000".encode(),  # blank in Unicode: skipped
        b"\x0b\x0c",  # blank in ASCII: skipped
    ]
    lines = [orjson.dumps(event) for event in valid[1:]] + hostile
    source = tmp_path / "events.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    settings = Settings(
        source=f"file:{source}",
        state=f"sqlite:///{tmp_path / 'state.db'}",
        dlq=f"file:{tmp_path / 'dead-letter.jsonl'}",
        cdp_base_url=emulator.url,
        cdp_client_key=SECRET_KEY,
        cdp_api_token=SECRET_TOKEN,
        rate_limit=0.0,
        http_port=0,
    )
    worker = Worker(settings, backoff_base=0.01)
    try:
        await asyncio.wait_for(worker.run(), 60)
    finally:
        await worker.close()
    assert emulator.stats()["orders"] == 20
    sink = open_dead_letter_sink(settings.dlq or "")
    await sink.open()
    letters = await sink.read_all()
    await sink.close()
    assert sorted(letter["reason"] for letter in letters) == [
        "invalid_event", "invalid_event", "invalid_event", "malformed_json",
    ]  # fmt: skip
    deep = [letter for letter in letters if "deep" in letter.get("raw", "")]
    assert deep[0]["raw"] == deep_extra.decode()  # its text, since it cannot be JSON again
    assert deep[0]["orderRef"] == good["orderRef"]
    cut = [letter for letter in letters if letter.get("truncated")]
    assert len(cut) == 1
    assert len(cut[0]["raw"].encode()) <= LETTER_RAW_LIMIT
    assert worker.summary["failed"] == 0  # nothing was given back to be tried again
