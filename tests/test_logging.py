"""The log writer: whole lines on stdout, one flush per burst inside the event loop."""

from __future__ import annotations

import asyncio
import io
import re
from datetime import datetime

import pytest
import structlog

from worker.observability import REDACTED, StdoutLogger, _UtcStamp, redact_sensitive


class CountingStdout(io.TextIOWrapper):
    """A stdout whose buffer counts its flushes (one write syscall each, for real)."""

    def __init__(self) -> None:
        self.flushes = 0
        super().__init__(io.BytesIO(), encoding="utf-8")

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


class CountingBuffer(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


class Stdout:
    """What `sys.stdout` looks like to the logger: a `buffer` for bytes."""

    def __init__(self) -> None:
        self.buffer = CountingBuffer()


async def test_lines_written_in_one_loop_iteration_share_one_flush(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stdout = Stdout()
    monkeypatch.setattr("sys.stdout", stdout)
    logger = StdoutLogger()
    for number in range(100):
        logger.msg(b'{"event": "line %d"}' % number)
    assert stdout.buffer.flushes == 0  # not one per line
    await asyncio.sleep(0)  # the next iteration of the loop
    assert stdout.buffer.flushes == 1
    lines = stdout.buffer.getvalue().splitlines()
    assert lines == [b'{"event": "line %d"}' % number for number in range(100)]  # whole, in order
    logger.msg(b'{"event": "later"}')
    await asyncio.sleep(0)
    assert stdout.buffer.flushes == 2


def test_outside_a_loop_each_line_is_flushed_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    stdout = Stdout()
    monkeypatch.setattr("sys.stdout", stdout)
    logger = StdoutLogger()
    logger.msg(b'{"event": "starting"}')
    assert stdout.buffer.flushes == 1
    text = CountingStdout()
    monkeypatch.setattr("sys.stdout", text)
    logger.msg("a console line")  # the console renderer writes str
    assert text.flushes == 1


# -- level and timestamp: as structlog's own processors write them ----------------------------


@pytest.mark.parametrize("method", ["debug", "info", "warning", "warn", "error", "exception"])
def test_level_and_timestamp_are_structlogs(method: str) -> None:
    ours = _UtcStamp()(None, method, {})
    theirs = structlog.processors.TimeStamper(fmt="iso", utc=True)(
        None, method, structlog.processors.add_log_level(None, method, {})
    )
    assert list(ours) == list(theirs) == ["level", "timestamp"]
    assert ours["level"] == theirs["level"]
    # The same form (ISO 8601 in UTC with a Z), and the same instant within the test's time.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", ours["timestamp"])
    mine, structlogs = (
        datetime.fromisoformat(stamp["timestamp"]).timestamp() for stamp in (ours, theirs)
    )
    assert abs(mine - structlogs) < 1.0


def test_timestamp_of_each_second_and_a_whole_second(monkeypatch: pytest.MonkeyPatch) -> None:
    stamp = _UtcStamp()
    clock = iter([1_700_000_000.25, 1_700_000_000.5, 1_700_000_001.0, 1_699_999_999.75])
    monkeypatch.setattr("worker.observability.time.time", lambda: next(clock))
    stamps = [stamp(None, "info", {})["timestamp"] for _ in range(4)]
    assert stamps == [
        "2023-11-14T22:13:20.250000Z",
        "2023-11-14T22:13:20.500000Z",
        "2023-11-14T22:13:21Z",  # no fraction when there is none, as isoformat writes it
        "2023-11-14T22:13:19.750000Z",  # a clock set back: that second's own text
    ]


def test_redaction_judges_each_key_however_often_it_comes() -> None:
    for _ in range(3):  # judged once, then remembered: the same verdict every time
        line = redact_sensitive(None, "info", {"first_name": "x", "order_ref": "y", "Token": "z"})
        assert line == {"first_name": REDACTED, "order_ref": "y", "Token": REDACTED}
