"""JSONL files: the file source (`file:PATH`, `file:-`) and the file dead-letter sink.

The source reads lines in batches and, like faust commits offsets, checkpoints the highest
line below which every line is finished (the watermark) in the state store, together with
the few lines finished above it. A restart resumes there and skips those, so a rerun over a
finished file sends nothing and an invalid line is dead-lettered once. `ack` returns only
once the checkpoint holding that line is committed; concurrent acks share one write.

The checkpoint names the file it is about, as Vector's file source does: device, inode
and a hash of its first bytes (256, or only the finished ones while the watermark lies
before byte 256, so that appending never changes it). A file replaced or truncated at the
same path is read from its beginning: what was done is skipped by the state store, and
nothing is ever silently skipped. With `--follow`, a file rotated away (or truncated in
place) is finished first, every line of it acked, before the new one is read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import math
import os
import stat
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import orjson

from .._batching import Batcher
from ..contact import is_blank
from ..errors import SourceError, StateError
from ..observability import get_logger
from ..state.base import StateStore
from .base import DeadLetterSink, Message, Publisher, Redeliveries, Source, letter_key

log = get_logger("worker.sources.file")

# The most bytes at the start of a file that identify it in the checkpoint.
HEAD_BYTES = 256
# How much of an existing dead-letter file is indexed at start: the letters a killed run
# may have stored without recording it are among its last ones.
RECENT_BYTES = 4 * 1024 * 1024
# Lines read ahead of the first unfinished one, at most: one line stuck in retries (a 404
# grace period) must not let the set of finished lines above it grow without bound.
MAX_AHEAD = 20_000
# How often --follow looks for new lines at the end of the file.
FOLLOW_POLL_SECONDS = 0.2
# stdin is read this much at a time, and at most this many blocks wait to be fetched.
STDIN_READ_BYTES = 64 * 1024
STDIN_BLOCKS = 64
# Checkpoint writes start at most this often (the acks meanwhile share the next one): an
# ack never waits for the write, and a crash reads at most this much again (and what the
# store holds it back to share a commit: sqlite's CHECKPOINT_RIDE).
CHECKPOINT_INTERVAL = 0.05


class _Checkpoint:
    """Finished lines: everything up to `line` (ending at byte `offset`) plus `above`."""

    def __init__(self, line: int = 0, offset: int = 0, above: set[int] | None = None) -> None:
        self.line = line
        self.offset = offset
        self.above: set[int] = above or set()
        self.ends: dict[int, int] = {}  # line -> byte offset after it, for lines above `line`

    def finish(self, line: int) -> None:
        self.above.add(line)
        self.advance()

    def advance(self) -> None:
        """Move the watermark over finished lines, but only over lines read in this run.

        After a restart, `above` holds lines finished before it that are not read again
        yet: their end offsets are unknown, and passing them would pair `line` with the
        offset of an earlier line (the next read would then renumber and resend them).
        """
        while self.line + 1 in self.above and self.line + 1 in self.ends:
            self.line += 1
            self.above.discard(self.line)
            self.offset = self.ends.pop(self.line)

    def dumps(self, identity: dict[str, Any] | None) -> str:
        position = {"line": self.line, "offset": self.offset, "above": _ranges(self.above)}
        return orjson.dumps({**position, "file": identity}).decode()

    @classmethod
    def loads(cls, text: str) -> tuple[_Checkpoint, dict[str, Any] | None]:
        """The checkpoint and the identity of its file (None if saved without one)."""
        data = orjson.loads(text)
        above = {n for first, last in data["above"] for n in range(first, last + 1)}
        return cls(int(data["line"]), int(data["offset"]), above), data.get("file")


def _identity(fd: int, head_bytes: int) -> dict[str, Any]:
    """What identifies the open file: device, inode, and a hash of its first bytes."""
    stat = os.fstat(fd)
    head = os.pread(fd, head_bytes, 0)
    return {
        "dev": stat.st_dev,
        "ino": stat.st_ino,
        "head_bytes": len(head),
        "head": hashlib.sha256(head).hexdigest(),
    }


def _ranges(numbers: set[int]) -> list[tuple[int, int]]:
    """{3, 4, 5, 9} -> [(3, 5), (9, 9)]: lines finished above a gap are mostly contiguous."""
    runs: list[tuple[int, int]] = []
    for n in sorted(numbers):
        if runs and runs[-1][1] == n - 1:
            runs[-1] = (runs[-1][0], n)
        else:
            runs.append((n, n))
    return runs


class FileSource(Source):
    """JSONL, one event per line. Finite unless `follow`; `-` is standard input."""

    def __init__(self, path: str, *, state: StateStore | None = None, follow: bool = False) -> None:
        self.path = path
        self.follow = follow
        self.finite = not follow
        self._state = state
        self._stdin = path == "-"
        self._key = "file:-" if self._stdin else f"file:{Path(path).resolve()}"
        self._label = "stdin" if self._stdin else Path(path).name
        self._file: IO[bytes] | None = None
        # The stdin reader thread's output: blocks of whole lines, None at the end; and
        # the lines of a block taken but not yet handed out.
        self._lines: asyncio.Queue[list[bytes] | None] | None = None
        self._taken: collections.deque[bytes] = collections.deque()
        self._eof = False
        self._next_line = 1
        self._offset = 0
        self._done = _Checkpoint()
        self._done_before = 0  # lines the checkpoint held finished at open (lines_done_before)
        self._redeliveries = Redeliveries()
        # Checkpoint writes, one at a time, each of the position at the moment it is made.
        self._saves: Batcher[bool, None] = Batcher(self._write_checkpoint, name="checkpoint")
        self._dirty = False  # acked since the last write
        self._last_save = -math.inf  # when the last write started (time.monotonic)
        self._saver: asyncio.Task[None] | None = None
        self._identity_cache: tuple[int, dict[str, Any]] | None = None  # (head_bytes, it)
        # --follow: the file's first bytes as read (to see it rewritten in place), and a
        # change seen ("truncated", "rotated") that waits for every line read to finish.
        self._head = b""
        self._switch: str | None = None
        self._old_drained = False

    @property
    def name(self) -> str:
        return f"file:{self.path}"

    # -- progress: read by the bar and the summary of a run on a terminal (_console.py) --

    @property
    def lines_done(self) -> int:
        """Lines finished (acked, or blank), in this run and before it."""
        return self._done.line + len(self._done.above)

    @property
    def lines_done_before(self) -> int:
        """Lines the checkpoint held finished when the source was opened: a rerun skips them."""
        return self._done_before

    @property
    def watermark(self) -> int:
        """The line up to which every line is finished: the next run resumes after it."""
        return self._done.line

    @property
    def bytes_done(self) -> int:
        """Where the watermark's line ends in the file, in bytes."""
        return self._done.offset

    @property
    def lines_read(self) -> int:
        """The last line read so far: once a finite file is finished, its number of lines."""
        return self._next_line - 1

    @property
    def lines_unfinished(self) -> int:
        """Lines read and handed out but not finished (in flight, or waiting to be sent
        again): what a stop leaves over for the next run."""
        read = self.lines_read
        return read - self._done.line - sum(1 for line in self._done.above if line <= read)

    async def check(self) -> None:
        if self._stdin:
            return
        try:  # non-blocking: a named pipe must not wait here for its writer
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise SourceError(f"--source: cannot open {self.path!r}: {exc.strerror}") from None
        try:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise SourceError(f"--source: {self.path!r} is a directory, not a file")
        finally:
            os.close(fd)

    async def open(self) -> None:
        if self._stdin:
            self._start_stdin_reader()
            return
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115, ASYNC230 - held open until close(); opening is instant
        except OSError as exc:
            raise SourceError(f"--source: cannot open {self.path!r}: {exc.strerror}") from None
        saved = await self._state.get_checkpoint(self._key) if self._state else None
        if saved is None:
            return
        checkpoint, identity = _Checkpoint.loads(saved)
        if not self._is_the_file(identity, checkpoint.offset):
            # Replaced, truncated, or saved without an identity: read it all again; the
            # state store skips what was done. A skipped line would be a lost event.
            log.info("source.file_changed", path=self.path, resumed_from=0)
            return
        self._done = checkpoint
        self._done_before = checkpoint.line + len(checkpoint.above)
        self._head = os.pread(self._file.fileno(), min(HEAD_BYTES, checkpoint.offset), 0)
        self._file.seek(checkpoint.offset)
        self._offset = checkpoint.offset
        self._next_line = checkpoint.line + 1

    def _is_the_file(self, identity: dict[str, Any] | None, offset: int) -> bool:
        assert self._file is not None
        fd = self._file.fileno()
        if os.fstat(fd).st_size < offset:
            return False
        if identity is None:  # saved by a release before identities: trusted as it was then
            return True
        return _identity(fd, int(identity.get("head_bytes", 0))) == identity

    def _changed(self) -> str | None:
        """`--follow`: "truncated" (shorter than what was read, or its first bytes are not
        the ones read: rewritten in place), "rotated" (another file at the path now), or
        None. Called before every read: two syscalls and at most 256 bytes compared."""
        assert self._file is not None
        fd = self._file.fileno()
        ours = os.fstat(fd)
        if ours.st_size < self._offset or os.pread(fd, len(self._head), 0) != self._head:
            return "truncated"
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return None  # renamed away, no new file yet: keep reading the old one
        return "rotated" if (now.st_dev, now.st_ino) != (ours.st_dev, ours.st_ino) else None

    async def _follow_change(self) -> None:
        """Move to the file now at the path, or to the start of a truncated one, once every
        line read from the current one is finished (so no ack can refer to it later)."""
        finished = self._done.line == self._next_line - 1 and not self._redeliveries.pending
        if self._switch is None or not finished:
            return
        assert self._file is not None
        change = self._switch
        if change == "rotated":
            try:
                new = open(self.path, "rb")  # noqa: SIM115, ASYNC230 - held until close(); instant
            except OSError:
                return  # gone again: try at the next empty read
            self._file.close()
            self._file = new
        else:
            self._file.seek(0)
        log.info(f"source.file_{change}", path=self.path, finished_lines=self._done.line)
        self._done, self._next_line, self._offset = _Checkpoint(), 1, 0
        self._head, self._switch, self._old_drained = b"", None, False
        self._identity_cache = None
        try:
            await self._save(urgent=True)
        except StateError as exc:  # the next ack saves again; until then a restart reads it all
            log.warning("source.checkpoint_failed", error=str(exc))

    async def flush(self) -> None:
        """Write the checkpoint of every ack so far now, rather than within the interval
        (close does; raises StateError if the store does not take it)."""
        saver, self._saver = self._saver, None
        interrupted = False
        if saver is not None and not saver.done():
            interrupted = True
            saver.cancel()  # maybe mid-write: that write still lands, but may predate acks
            await asyncio.gather(saver, return_exceptions=True)
        if self._dirty or interrupted:
            self._dirty = False
            await self._save(urgent=True)  # after any earlier write: the Batcher keeps order

    async def close(self) -> None:
        try:
            await self.flush()  # what the last acks finished: a rerun starts after it
        except StateError as exc:
            log.warning("source.checkpoint_failed", error=str(exc))
        if self._file is not None:
            self._file.close()
            self._file = None

    def _start_stdin_reader(self) -> None:
        # A daemon thread: a blocking read of stdin must never hold up the process's exit.
        # It hands over what one read returned, as whole lines: one hop into the loop per
        # block, not per line, and a line is handed over as soon as its newline arrives.
        loop = asyncio.get_running_loop()
        blocks: asyncio.Queue[list[bytes] | None] = asyncio.Queue(maxsize=STDIN_BLOCKS)
        self._lines = blocks

        def hand_over(block: list[bytes] | None) -> None:
            asyncio.run_coroutine_threadsafe(blocks.put(block), loop).result()

        def pump() -> None:
            stdin, partial = sys.stdin.buffer.fileno(), list[bytes]()
            try:
                while chunk := os.read(stdin, STDIN_READ_BYTES):
                    if b"\n" not in chunk:  # a long line: joined once its end is here
                        partial.append(chunk)
                        continue
                    *whole, rest = b"".join([*partial, chunk]).split(b"\n")
                    partial = [rest] if rest else []
                    hand_over([line + b"\n" for line in whole])
                if partial:
                    hand_over([b"".join(partial)])  # a last line without its newline
            except OSError as exc:  # stdin closed under us: what was read is all there is
                log.error("source.stdin_failed", error=str(exc))  # noqa: TRY400 - one line
            finally:
                hand_over(None)

        threading.Thread(target=pump, name="stdin-reader", daemon=True).start()

    def _read_lines(self, limit: int, *, to_the_end: bool = False) -> list[bytes]:
        """Up to `limit` whole lines from the file (runs in a thread). `to_the_end`: a
        last line without its newline is whole too (the file was rotated away)."""
        assert self._file is not None
        out: list[bytes] = []
        while len(out) < limit:
            position = self._file.tell()
            raw = self._file.readline()
            if not raw:
                self._eof = not self.follow
                break
            if not raw.endswith(b"\n") and self.follow and not to_the_end:
                self._file.seek(position)  # a line still being written: wait for the rest
                break
            out.append(raw)
        return out

    async def _next_raw_lines(self, limit: int, timeout: float) -> list[bytes]:
        if self._lines is not None:
            return await self._next_stdin_lines(self._lines, limit, timeout)
        if self.follow and self._switch is None:
            self._switch = self._changed()
        if self._switch == "rotated" and not self._old_drained:
            # Finish the file rotated away first, its last line even without a newline.
            out = await asyncio.to_thread(self._read_lines, limit, to_the_end=True)
            if out:
                return out
            self._old_drained = True
        if self._switch is not None:  # no more reads from it: positions may be wrong
            await self._follow_change()
            await asyncio.sleep(min(timeout, FOLLOW_POLL_SECONDS))
            return []
        out = await asyncio.to_thread(self._read_lines, limit)
        if not out and self.follow:
            await asyncio.sleep(min(timeout, FOLLOW_POLL_SECONDS))
        return out

    async def _next_stdin_lines(
        self, blocks: asyncio.Queue[list[bytes] | None], limit: int, timeout: float
    ) -> list[bytes]:
        """Up to `limit` lines of what the reader thread handed over, waiting up to
        `timeout` for the first block if none is here."""
        taken = self._taken
        if not taken and not self._eof:
            try:
                block = await asyncio.wait_for(blocks.get(), timeout)
            except TimeoutError:
                return []
            while block is not None:
                taken.extend(block)
                if len(taken) >= limit or blocks.empty():
                    break
                block = blocks.get_nowait()
            self._eof = block is None
        return [taken.popleft() for _ in range(min(limit, len(taken)))]

    async def fetch(self, max_messages: int, timeout: float) -> list[Message] | None:
        batch = self._redeliveries.take(max_messages)
        if batch:
            return batch
        if self._next_line - self._done.line > MAX_AHEAD:
            await asyncio.sleep(min(timeout, FOLLOW_POLL_SECONDS))  # wait for the gap to close
            return []
        if self._eof:
            if self._redeliveries.pending:
                await asyncio.sleep(min(timeout, FOLLOW_POLL_SECONDS))
                return []
            return None
        for raw in await self._next_raw_lines(max_messages, timeout):
            if len(self._head) < HEAD_BYTES:
                self._head += raw[: HEAD_BYTES - len(self._head)]
            line = self._next_line
            self._next_line += 1
            self._offset += len(raw)
            self._done.ends[line] = self._offset
            if line in self._done.above:
                self._done.advance()  # finished before a restart: its end is known now
                continue
            if is_blank(raw):
                self._done.finish(line)  # blank lines are nothing to deliver
                continue
            batch.append(Message(id=f"{self._label}:{line}", body=raw.strip(), token=line))
        if not batch and self._eof and not self._redeliveries.pending:
            return None  # the end, reached by this read: say so now, not on the next call
        return batch

    async def ack(self, message: Message) -> None:
        self._done.finish(message.token)
        self._save_soon()

    def _save_soon(self) -> None:
        """Have the checkpoint written, at once if the last write is an interval old, else
        an interval after it; the ack does not wait.

        The outcome was recorded in the state store before the ack: a crash before the
        checkpoint catches up only makes a restart read a few lines again, which the state
        store skips as duplicates. An ack after a quiet spell (paced requests come back a
        slice apart) writes at once rather than after a sleep of its own: the write rides
        the store's next commit instead of costing a wake-up.
        """
        if self._state is None or self._stdin:
            return
        self._dirty = True
        if self._saver is None or self._saver.done():
            self._saver = asyncio.get_running_loop().create_task(
                self._save_later(), name="checkpoint-saver"
            )

    async def _save_later(self) -> None:
        failing = False
        while self._dirty:
            wait = self._last_save + CHECKPOINT_INTERVAL - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._dirty = False
            self._last_save = time.monotonic()
            try:
                await self._save()
            except StateError as exc:  # kept dirty: tried again an interval later
                self._dirty = True
                if not failing:
                    log.warning("source.checkpoint_failed", error=str(exc))
                failing = True
            else:
                failing = False

    async def _save(self, *, urgent: bool = False) -> None:
        """Commit the checkpoint, as it is now or newer; one write serves many acks.

        `urgent`: the caller waits for it (closing, switching files), so the store writes
        it at once rather than with its next commit. A write in flight may be waiting to
        ride with that commit, and this one would queue behind it: an urgent write to the
        store first takes it along, then this one goes (last, so that no older write can
        land after it on a store with several connections).
        """
        if self._state is None or self._stdin:
            return
        if urgent and self._saves.busy:
            await self._state.set_checkpoint(self._key, self._snapshot(), urgent=True)
        await self._saves.submit(urgent)

    async def _write_checkpoint(self, urgent: list[bool]) -> list[None]:
        assert self._state is not None
        # Every ack of the batch is in the snapshot, taken now.
        await self._state.set_checkpoint(self._key, self._snapshot(), urgent=any(urgent))
        return [None] * len(urgent)

    def _snapshot(self) -> str:
        return self._done.dumps(self._identity_now())

    def _identity_now(self) -> dict[str, Any] | None:
        """The open file's identity, its head covering at most the finished bytes."""
        if self._file is None:
            return None
        head_bytes = min(HEAD_BYTES, self._done.offset)
        cached = self._identity_cache
        if cached is None or cached[0] != head_bytes:
            cached = self._identity_cache = (head_bytes, _identity(self._file.fileno(), head_bytes))
        return cached[1]

    async def nack(self, message: Message, *, delay: float = 0.0) -> None:
        self._redeliveries.later(message, delay)


class FilePublisher(Publisher):
    """Appends events to a JSONL file, one per line (`worker publish --to file:PATH`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: IO[bytes] | None = None

    async def open(self) -> None:
        try:
            self._file = open(self.path, "ab")  # noqa: SIM115, ASYNC230 - held open until close(); opening is instant
        except OSError as exc:
            raise SourceError(f"--to: cannot open {self.path!r}: {exc.strerror}") from None

    async def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    async def publish(self, bodies: Sequence[bytes]) -> None:
        if self._file is None:
            raise SourceError(f"{self.path!r} is not open")
        data = b"".join(body.rstrip(b"\n") + b"\n" for body in bodies)
        await asyncio.to_thread(self._write, data)

    def _write(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self._file.flush()


class FileDeadLetterSink(DeadLetterSink):
    """Appends dead letters to a JSONL file; each `put` returns once fsynced.

    Letters that arrive while a write is under way share the next write and fsync (a
    `Batcher`, whose flusher task also finishes the write of a `put` that was cancelled).

    On open, the letters in the file's last `RECENT_BYTES` are indexed: a letter an earlier
    run stored just before it was killed is not stored again. A line torn by a crash in
    the middle of a write is cut off (its letter was never acknowledged: it comes again).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: IO[bytes] | None = None
        self._writes: Batcher[bytes, None] = Batcher(self._write_all, name="dead-letter-writer")
        self._earlier: set[str] = set()

    async def open(self) -> None:
        try:
            self._file = open(self.path, "a+b")  # noqa: SIM115, ASYNC230 - held open until close(); opening is instant
            self._earlier = await asyncio.to_thread(_recent_letters, self._file)
        except OSError as exc:
            raise SourceError(f"--dlq: cannot open {self.path!r}: {exc.strerror}") from None

    async def close(self) -> None:
        await self._writes.wait_idle()  # letters already accepted are written first
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write(self, data: bytes) -> None:
        assert self._file is not None
        start = self._file.seek(0, os.SEEK_END)
        try:
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError:
            # Whatever part got out is cut off again: the letters are written again whole
            # (the recorder retries), never torn or twice.
            with contextlib.suppress(OSError):
                self._file.truncate(start)
            raise

    async def read_all(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._read_all)

    def _read_all(self) -> list[dict[str, Any]]:
        try:
            lines = Path(self.path).read_bytes().splitlines()
        except OSError as exc:
            raise SourceError(f"cannot read {self.path!r}: {exc.strerror}") from None
        letters = []
        for line in lines:
            try:
                letter = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a line torn by a crash: its letter was stored again afterwards
            if isinstance(letter, dict):
                letters.append(letter)
        return letters

    async def put(self, letter: dict[str, Any]) -> None:
        if self._file is None:
            raise SourceError(f"dead-letter file {self.path!r} is not open")
        if self._earlier and letter_key(letter) in self._earlier:
            return  # stored by the run a crash cut short
        await self._writes.submit(orjson.dumps(letter) + b"\n")

    async def _write_all(self, lines: list[bytes]) -> list[None]:
        """The letters queued meanwhile, in one write and one fsync."""
        try:
            await asyncio.to_thread(self._write, b"".join(lines))
        except (OSError, ValueError) as exc:  # ValueError: the file was closed under us
            reason = getattr(exc, "strerror", None) or exc
            raise SourceError(f"dead-letter file {self.path!r}: {reason}") from None
        return [None] * len(lines)


def _recent_letters(file: IO[bytes]) -> set[str]:
    """Keys of the letters in the file's tail, after cutting off a torn last line."""
    size = file.seek(0, os.SEEK_END)
    start = max(0, size - RECENT_BYTES)
    file.seek(start)
    tail = file.read()
    if tail and not tail.endswith(b"\n"):
        kept = tail.rfind(b"\n") + 1
        file.truncate(start + kept)
        tail = tail[:kept]
    lines = tail.split(b"\n")
    if start > 0:
        lines = lines[1:]  # the first line of the window is only the end of one
    keys = set()
    for line in lines:
        try:
            letter = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(letter, dict):
            keys.add(letter_key(letter))
    return keys
