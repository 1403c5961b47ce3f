"""The log writer: whole lines on stdout, one flush per burst inside the event loop."""

from __future__ import annotations

import asyncio
import io

import pytest

from worker.observability import StdoutLogger


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
