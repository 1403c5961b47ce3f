"""A finite run explains itself (issue 11): on a terminal, a progress bar and a summary
table on stderr; stdout keeps carrying nothing but the JSON logs; a rerun says what was
already done; Ctrl-C says where the run stopped. `worker publish`, `worker dlq replay`
and `worker demo` draw the same bar.

Each command runs as a real process whose stderr (and, in one test, stdout) is a
pseudo-terminal, as in a person's shell; the CDP emulator runs in the test's loop.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from conftest import SECRET_KEY, SECRET_TOKEN
from harness import worker_env

from worker.demo import generate_events, write_events
from worker.emulator import Emulator

# Escape sequences rich draws with (colours, cursor moves, line erases, cursor hiding).
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
# 40 orders, 4 redeliveries, 4 invalid lines: each outcome at least once.
ORDERS = 40


@pytest.fixture
def cdp(emulator: Emulator) -> Emulator:
    """conftest's emulator, in another process's words: the CDP these runs talk to."""
    return emulator


@pytest.fixture
def events(tmp_path: Path) -> list[bytes]:
    lines = generate_events(ORDERS, duplicate_share=0.1, invalid_rounds=1, seed=5)
    write_events(tmp_path / "events.jsonl", lines)
    return lines


def env_for(cdp: Emulator, tmp_path: Path, **settings: str) -> dict[str, str]:
    return worker_env(
        cdp.url,
        SECRET_KEY,
        SECRET_TOKEN,
        **{
            "source": f"file:{tmp_path / 'events.jsonl'}",
            "state": f"sqlite:///{tmp_path / 'state.db'}",
            "dlq": f"file:{tmp_path / 'dead-letter.jsonl'}",
            "rate_limit": "0",
            "request_timeout": "2",
            **settings,
        },
    )


@dataclass
class Ran:
    code: int
    stdout: bytes  # b"" when stdout was the terminal too
    terminal: bytes  # everything the terminal got, escape sequences included

    @property
    def screen(self) -> str:
        """The terminal's text without escape sequences, one drawn line per line."""
        text = ANSI.sub(b"", self.terminal).decode()
        return "\n".join(line for line in re.split(r"[\r\n]+", text) if line.strip())


def _read_all(fd: int) -> bytes:
    """Everything written to the terminal until its last writer is gone (EIO)."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def on_terminal(
    env: dict[str, str],
    *args: str,
    stdout_too: bool = False,
    meanwhile: Callable[[asyncio.subprocess.Process], Awaitable[None]] | None = None,
    timeout: float = 60,
) -> Ran:
    """`python -m worker ARGS` with stderr (and stdout if `stdout_too`) on a new
    pseudo-terminal of 120 x 40; `meanwhile` runs while it does (it may read stdout)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**env, "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    env.pop("COLUMNS", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", *args, env=env, stdin=subprocess.DEVNULL,
        stdout=slave if stdout_too else asyncio.subprocess.PIPE, stderr=slave,
    )  # fmt: skip
    os.close(slave)
    reading = asyncio.create_task(asyncio.to_thread(_read_all, master))
    try:
        if meanwhile is not None:
            await asyncio.wait_for(meanwhile(process), timeout)
        out = b""
        if process.stdout is not None:
            out = await asyncio.wait_for(process.stdout.read(), timeout)
        code = await asyncio.wait_for(process.wait(), timeout)
        terminal = await asyncio.wait_for(reading, timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        os.close(master)
    return Ran(code, out, terminal)


def json_lines(stdout: bytes) -> list[dict[str, object]]:
    """stdout as JSON log records; fails on any line that is not one (a bar, a table)."""
    assert stdout, "nothing was logged"
    assert b"\x1b" not in stdout
    assert b"\r" not in stdout
    return [orjson.loads(line) for line in stdout.splitlines()]


def outcome_counts(records: list[dict[str, object]]) -> dict[str, object]:
    (finished,) = (r for r in records if r["event"] == "worker.finished")
    return finished


async def test_a_run_on_a_terminal_draws_a_bar_and_a_table_stdout_only_json(
    cdp: Emulator, tmp_path: Path, events: list[bytes]
) -> None:
    ran = await on_terminal(env_for(cdp, tmp_path), "run")
    assert ran.code == 0, ran.screen
    finished = outcome_counts(json_lines(ran.stdout))
    screen, total = ran.screen, len(events)
    assert f"{total}/{total} lines" in screen  # the bar, at its end
    assert "/s" in screen
    assert "4 dead letters" in screen
    assert "━" in screen  # rich's bar itself
    delivered, duplicates = finished["delivered"], finished["duplicate"]
    assert (delivered, duplicates) == (ORDERS, 4)
    summary = next(line for line in screen.splitlines() if line.startswith("worker run: "))
    assert summary.startswith(f"worker run: events.jsonl: {total} lines done; ")
    assert f"{ORDERS} delivered" in summary
    assert "4 already done (known to the state store)" in summary
    assert "4 dead letters (invalid_event 2, invalid_order_ref 1, malformed_json 1)" in summary
    assert f"state store sqlite {tmp_path / 'state.db'}" in summary
    table = screen[screen.index(summary) + len(summary) :]
    for row in (
        rf"delivered\s+{ORDERS}\s+contacts created",
        r"updated\s+0",
        r"duplicates skipped\s+4",
        r"stale\s+0",
        r"dead letters\s+4\s+by reason:",
        r"\s+2\s+invalid_event",
        r"left over\s+0",
        rf"state store\s+sqlite {re.escape(str(tmp_path / 'state.db'))}",
    ):
        assert re.search(row, table), (row, table)
    assert "{" not in table


async def test_a_piped_run_draws_nothing_and_its_stdout_is_json(
    cdp: Emulator, tmp_path: Path, events: list[bytes]
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "run", env=env_for(cdp, tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0
    # No bar, no table: only the summary line, plain text.
    assert err.decode().splitlines() == [err.decode().strip()]
    assert err.startswith(b"worker run: events.jsonl: ")
    assert b"\x1b" not in err  # no colour or cursor codes
    assert outcome_counts(json_lines(out))["delivered"] == ORDERS


async def test_a_run_that_cannot_open_its_file_shows_the_error_and_no_bar(
    cdp: Emulator, tmp_path: Path
) -> None:
    env = env_for(cdp, tmp_path, source=f"file:{tmp_path / 'missing.jsonl'}")
    ran = await on_terminal(env, "run")
    assert ran.code == 2
    missing = str(tmp_path / "missing.jsonl")
    assert ran.screen == f"worker run: --source: cannot open {missing!r}: No such file or directory"


async def test_with_stdout_on_the_same_terminal_log_lines_print_whole_above_the_bar(
    cdp: Emulator, tmp_path: Path, events: list[bytes]
) -> None:
    ran = await on_terminal(env_for(cdp, tmp_path), "run", stdout_too=True)
    assert ran.code == 0, ran.screen
    text = ANSI.sub(b"", ran.terminal).decode()
    logged = [orjson.loads(line) for line in re.split(r"[\r\n]+", text) if line.startswith("{")]
    assert sum(record["event"] == "event.delivered" for record in logged) == ORDERS
    assert outcome_counts(logged)["delivered"] == ORDERS
    assert f"{len(events)}/{len(events)} lines" in ran.screen


async def test_a_rerun_says_the_lines_were_already_done(
    cdp: Emulator, tmp_path: Path, events: list[bytes]
) -> None:
    env, total = env_for(cdp, tmp_path), len(events)
    assert (await on_terminal(env, "run")).code == 0
    requests = dict(cdp.stats()["requests"])

    again = await on_terminal(env, "run")
    assert again.code == 0
    assert f"worker run: events.jsonl: all {total} lines already done (checkpoint); " in (
        again.screen
    )
    assert "nothing sent" in again.screen
    assert cdp.stats()["requests"] == requests

    # The same events in another file: no checkpoint, but the state store knows them.
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes((tmp_path / "events.jsonl").read_bytes())
    other = await on_terminal({**env, "WORKER_SOURCE": f"file:{copy}"}, "run")
    assert other.code == 0
    valid = ORDERS + 4  # the invalid lines are dead-lettered again (the sink skips them)
    assert f"{valid} already done (known to the state store)" in other.screen
    assert cdp.stats()["requests"] == requests


async def test_ctrl_c_says_where_the_run_stopped_and_the_rerun_resumes_there(
    cdp: Emulator, tmp_path: Path
) -> None:
    lines = generate_events(300, duplicate_share=0.0, invalid_rounds=0, seed=8)
    write_events(tmp_path / "events.jsonl", lines)
    env = env_for(cdp, tmp_path, rate_limit="100", concurrency="4")

    async def interrupt_after_some(process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        delivered = 0
        while delivered < 40:
            line = await process.stdout.readline()
            assert line, "the run ended before it was interrupted"
            delivered += b'"event.delivered"' in line
        process.send_signal(signal.SIGINT)

    ran = await on_terminal(env, "run", meanwhile=interrupt_after_some)
    assert ran.code == 0, ran.screen
    stopped = re.search(r"stopped at line (\d+) of 300; the next run resumes there", ran.screen)
    assert stopped, ran.screen
    line = int(stopped[1])
    assert 40 <= line < 300
    assert re.search(r"left over\s+\d+", ran.screen)

    rest = await on_terminal(env, "run")
    assert rest.code == 0
    done_before = re.search(r"(\d+) already done \(checkpoint\)", rest.screen)
    assert done_before, rest.screen
    assert int(done_before[1]) >= line  # the watermark, and lines finished above it
    assert "worker run: events.jsonl: 300 lines done" in rest.screen
    assert cdp.stats()["orders"] == 300
    assert cdp.stats()["duplicate_orders"] == 0


async def test_publish_and_dlq_replay_draw_the_bar(
    cdp: Emulator, tmp_path: Path, events: list[bytes]
) -> None:
    target = tmp_path / "published.jsonl"
    ran = await on_terminal(
        dict(os.environ), "publish", "--to", f"file:{target}", str(tmp_path / "events.jsonl")
    )
    total = len(events)
    assert ran.code == 0, ran.screen
    assert "publish" in ran.screen
    assert f"{total}/{total} messages" in ran.screen
    assert ran.stdout == f"published {total} of {total} messages\n".encode()

    env = env_for(cdp, tmp_path)
    assert (await on_terminal(env, "run")).code == 0
    dead = f"file:{tmp_path / 'dead-letter.jsonl'}"
    state = f"sqlite:///{tmp_path / 'state.db'}"
    replay = await on_terminal(
        env, "dlq", "replay", dead, "--to", f"file:{tmp_path / 'again.jsonl'}", "--state", state
    )
    assert replay.code == 0, replay.screen
    assert "4/4 letters" in replay.screen
    assert replay.stdout.startswith(b"published 4 dead letters")


async def test_the_demo_draws_a_bar_and_sums_up_in_a_table() -> None:
    ran = await on_terminal({**os.environ, "PYTHONUNBUFFERED": "1"}, "demo", "--events", "100",
                            "--rate-limit", "0")  # fmt: skip
    assert ran.code == 0, ran.stdout.decode() + ran.screen
    assert re.search(r"demo .*\d+/\d+ lines", ran.screen), ran.screen
    table = ran.stdout.decode()
    assert "{" not in table  # no dict reprs
    assert re.search(r"CDP answers\s+\d+\s+create: 201 x \d+", table), table
    assert re.search(r"\n\s+\d+\s+list: 200 x \d+", table) or "update:" in table, table
    assert re.search(r"contacts at CDP\s+(\d+) on (\d+) orders, 0 orders with", table), table
    assert re.search(r"converged\s+yes", table), table
    assert not any(line != line.rstrip() for line in table.splitlines())


@pytest.mark.parametrize(
    "data",
    [b"", b"\n", b"{}\n{}\n", b"{}\n\n  \n{}", b"{}\r\n{}\r\n\n", b"{}"],
    ids=["empty", "blank", "two", "no-last-newline", "crlf", "one-unended"],
)
async def test_the_bars_line_count_is_the_file_sources(tmp_path: Path, data: bytes) -> None:
    from worker._console import count_lines
    from worker.sources.file import FileSource

    path = tmp_path / "events.jsonl"
    path.write_bytes(data)
    source = FileSource(str(path))
    await source.open()
    try:
        while await source.fetch(100, 0.1) is not None:
            pass
        assert count_lines(str(path)) == source.lines_read
    finally:
        await source.close()
