"""What a person at a terminal sees of a command that works through a finite input: a
progress bar on stderr while it runs, and its summary after.

`worker run` over a file without --follow, `worker demo`, `worker publish` and `worker dlq
replay` draw here, with rich. The bar is drawn only when stderr is a terminal, from
counters read REFRESH_SECONDS apart (never per event). Nothing here writes to stdout
(only the demo's table, `print_table`), where `worker run` logs: piped, its JSON lines
stay byte for byte what they were; on the terminal that shows the bar too, its lines are
printed above the bar (`_LinesAbove`).

rich is imported by this module only, and this module only inside the commands that
draw: `worker check` (every container health probe) must start quickly.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from .pipeline import Worker
    from .sources.file import FileSource

# How often a bar is redrawn, at most (the run's bar reads its counters this often).
REFRESH_SECONDS = 0.2
# Files up to this size have their lines counted for the bar's total, in a thread while
# the run starts; a larger one's bar goes by bytes (lines are counted as they are read).
LINE_COUNT_LIMIT = 1 << 30
# Outcomes of worker.summary in the order of a summary, with what each one means.
OUTCOMES = (
    ("delivered", "delivered", "contacts created"),
    ("updated", "updated", "a changed contact replaced"),
    ("reconciled", "reconciled", "fate unknown, found at CDP"),
    ("deleted", "deleted", "erasures"),
    ("duplicate", "duplicates skipped", "the state store knew them"),
    ("stale", "stale", "older than what CDP holds"),
    ("changed_ignored", "changes ignored", "--on-change ignore"),
)
# Those a table shows even at 0 (the others only when they happened).
ALWAYS_SHOWN = {"delivered", "updated", "duplicate", "stale"}
# Outcome keys that count a finished event (dead letters too); not `failed`, given back.
FINISHED = (*(key for key, _, _ in OUTCOMES), "dead_lettered")


def on_terminal() -> bool:
    """Whether stderr, where bars and tables go, is a terminal."""
    return sys.stderr.isatty()


def _stderr() -> Console:
    return Console(stderr=True, highlight=False)


class Bar:
    """One progress bar on stderr ("done/total unit, rate, ETA", dead letters), drawn only
    when `enabled` (default: stderr is a terminal); otherwise it only counts."""

    def __init__(
        self,
        label: str,
        unit: str,
        *,
        total: int | None = None,
        dead_letters: bool = False,
        enabled: bool | None = None,
    ) -> None:
        self.label, self.unit, self.total = label, unit, total
        self.done = 0
        self.enabled = on_terminal() if enabled is None else enabled
        self._dead_letters = dead_letters
        self._started = time.monotonic()
        self._drawn_at = -float("inf")
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    @property
    def console(self) -> Console | None:
        """The console the bar is drawn on while it is (what is printed there goes above it)."""
        return self._progress.console if self._progress is not None else None

    def start(self) -> Bar:
        if not self.enabled or self._progress is not None:
            return self
        # No thread redraws it (auto_refresh off): show() does, from the caller's counters.
        # stdout is left alone, not redirected: the JSON logs go there untouched.
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[count]}"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[eta]}"),
            TextColumn("{task.fields[dead]}"),
            console=_stderr(),
            auto_refresh=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._task = progress.add_task(self.label, total=None, count="", rate="", eta="", dead="")
        progress.start()
        self._progress = progress
        self._started = time.monotonic()
        self.show(self.done, self.total)
        return self

    def advance(self, count: int) -> None:
        """`count` more done (publish, replay: a batch at a time)."""
        self.show(self.done + count, self.total)

    def show(
        self,
        done: int,
        total: int | None,
        *,
        worked: int | None = None,
        dead: int | None = None,
        position: tuple[int, int] | None = None,
        force: bool = False,
    ) -> None:
        """`done` of `total` (None: not known yet; then `position`, (bytes done, bytes
        in all), fills the bar). `worked`: how many of `done` this run did (the rate's);
        all by default. Redrawn at most every REFRESH_SECONDS unless `force`."""
        self.done, self.total = done, total
        progress, now = self._progress, time.monotonic()
        if progress is None or self._task is None:
            return
        rate = (done if worked is None else worked) / max(now - self._started, 1e-9)
        left = None if total is None else max(total - done, 0)
        eta = f"ETA {_duration(left / rate)}" if left and rate > 0 else ""
        fill_done, fill_total = (done, total) if total is not None or position is None else position
        progress.update(
            self._task,
            completed=fill_done,
            total=fill_total,
            count=f"{done}/{total} {self.unit}" if total is not None else f"{done} {self.unit}",
            rate=f"{rate:.0f}/s",
            eta=eta,
            dead=f"{dead} dead letters" if self._dead_letters and dead is not None else "",
        )
        if force or now - self._drawn_at >= REFRESH_SECONDS:  # stop() draws the last one
            self._drawn_at = now
            progress.refresh()

    def stop(self) -> None:
        """Draw the last state and leave the bar where it is, the cursor on the next line."""
        progress, self._progress = self._progress, None
        if progress is not None:
            progress.stop()

    def __enter__(self) -> Bar:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class _LinesAbove:
    """sys.stdout while a bar is drawn on the terminal that shows stdout too: the lines
    written are kept and printed above the bar at its next redraw, instead of through it.
    It has no `buffer`, so the logger's bytes come here as text too."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._partial = ""
        self._lines: list[str] = []

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        self._lines.extend(lines)
        return len(text)

    def flush(self) -> None:
        """Nothing: the lines wait for the bar's next redraw (`print_to`)."""

    def print_to(self, console: Console, *, everything: bool = False) -> None:
        """Print the lines written so far above the bar, colours kept, unwrapped."""
        if everything and self._partial:
            self._lines.append(self._partial)
            self._partial = ""
        lines, self._lines = self._lines, []
        if lines:
            console.print(Text.from_ansi("\n".join(lines)), soft_wrap=True)

    def __getattr__(self, name: str) -> Any:
        if name == "buffer":
            raise AttributeError(name)
        return getattr(self._stream, name)


def _same_terminal(one: IO[Any], other: IO[Any]) -> bool:
    try:
        return one.isatty() and os.path.samestat(os.fstat(one.fileno()), os.fstat(other.fileno()))
    except (OSError, ValueError, AttributeError):
        return False


def count_lines(path: str) -> int | None:
    """The file's lines as the file source numbers them (a last line without its newline
    counts), or None for standard input, a file above LINE_COUNT_LIMIT or an unreadable one."""
    if path == "-":
        return None
    try:
        with open(path, "rb") as file:
            if os.fstat(file.fileno()).st_size > LINE_COUNT_LIMIT:
                return None
            lines, last = 0, b"\n"
            while chunk := file.read(1 << 20):
                lines += chunk.count(b"\n")
                last = chunk[-1:]
    except OSError:
        return None
    return lines + (last != b"\n")


class FileRun:
    """A worker's run over a finite file as a person at a terminal sees it: a bar while
    it runs (from `worker.summary` and the source's counters, REFRESH_SECONDS apart: the
    hot path is not touched), and `report()` after, on stderr. Off a terminal, only the
    summary line is written: no bar, no table.

    `async with FileRun(worker, source, label=...): await worker.run()`; then, once the
    worker is closed (its last checkpoint written), `report(finished=...)`.
    """

    def __init__(self, worker: Worker, source: FileSource, *, label: str) -> None:
        self.worker, self.source = worker, source
        self.total: int | None = None  # the file's lines, once counted
        self._bar = Bar(label, "lines", dead_letters=True)
        self._size = _size(source.path)
        self._counting: asyncio.Task[int | None] | None = None
        self._drawing: asyncio.Task[None] | None = None
        self._above: _LinesAbove | None = None
        self._stdout: Any = None

    async def __aenter__(self) -> FileRun:
        if self._bar.enabled:
            self._counting = asyncio.create_task(asyncio.to_thread(count_lines, self.source.path))
            self._drawing = asyncio.create_task(self._draw_forever(), name="progress-bar")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._drawing is None:
            return
        self._drawing.cancel()
        await asyncio.gather(self._drawing, return_exceptions=True)
        if self._counting is not None:
            self.total = await self._counting
        if self.source.lines_read:  # ended before the first redraw: its last state still
            self._start()
        if self._bar.console is None:
            return  # it never started: the error that stopped it is all there is to say
        self._draw(force=True)
        if self._above is not None:
            sys.stdout = self._stdout
            self._above.print_to(self._bar.console, everything=True)
        self._bar.stop()

    def _start(self) -> None:
        if self._bar.console is not None:
            return
        self._bar.start()
        if _same_terminal(sys.stdout, sys.stderr):
            self._stdout, self._above = sys.stdout, _LinesAbove(sys.stdout)
            sys.stdout = self._above

    async def _draw_forever(self) -> None:
        """Redraw from the counters; from the moment the parts are open (a run that
        cannot open its file or its store shows its error, and no bar above it)."""
        while True:
            if self.total is None and self._counting is not None and self._counting.done():
                self.total = self._counting.result()
            if self.worker.ready() != (False, "starting"):
                self._start()
                self._draw()
            await asyncio.sleep(REFRESH_SECONDS)

    def _draw(self, *, force: bool = False) -> None:
        source = self.source
        done = source.lines_done
        total = None if self.total is None else max(self.total, source.lines_read)
        if self._above is not None and (console := self._bar.console) is not None:
            self._above.print_to(console)
        self._bar.show(
            done,
            total,
            worked=done - source.lines_done_before,
            dead=self.worker.summary["dead_lettered"],
            position=(source.bytes_done, self._size) if self._size else None,
            force=force,
        )

    def lines_in_all(self, *, finished: bool) -> int | None:
        """The file's lines: all were read if the run finished; else counted (if small)."""
        if finished:
            return self.source.lines_read
        if self.total is None:
            self.total = count_lines(self.source.path)
        return None if self.total is None else max(self.total, self.source.lines_read)

    def report(self, *, finished: bool) -> None:
        """The summary line on stderr, and the table under it. `finished`: the run went
        to the end of the file (not stopped, not crashed)."""
        total = self.lines_in_all(finished=finished)
        console = _stderr()
        line = summary_line(self.worker, self.source, total, finished=finished)
        console.print(Text(line), soft_wrap=True)  # one line, however wide the terminal
        if on_terminal():
            console.print(summary_table(run_rows(self.worker, self.source, total)))


def _size(path: str) -> int | None:
    try:
        return None if path == "-" else os.stat(path).st_size
    except OSError:
        return None


def dead_by_reason(summary: Mapping[str, int]) -> dict[str, int]:
    return {k.split(":", 1)[1]: v for k, v in sorted(summary.items()) if k.startswith("dead:")}


def _counted(dead: Mapping[str, int]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in dead.items())


def already_done(source: FileSource, summary: Mapping[str, int]) -> str | None:
    """The summary's "N already done (...)": lines the checkpoint skipped and duplicates
    the state store knew; None if there were none."""
    skipped, duplicates = source.lines_done_before, summary["duplicate"]
    if not skipped and not duplicates:
        return None
    if skipped and duplicates:
        why = f"{skipped} by the checkpoint, {duplicates} known to the state store"
    else:
        why = "checkpoint" if skipped else "known to the state store"
    return f"{skipped + duplicates} already done ({why})"


def summary_line(worker: Worker, source: FileSource, total: int | None, *, finished: bool) -> str:
    """One line for people: where the run ended, what it did, the state store it used."""
    summary: Counter[str] = worker.summary
    worked = sum(summary[key] for key in FINISHED)
    name = "standard input" if source.path == "-" else os.path.basename(source.path)
    if finished and not worked and total and source.lines_done_before >= total:
        parts = [f"all {total} lines already done (checkpoint)", "nothing sent"]
    else:
        parts = [_where(source, total, finished=finished)]
        counts = [f"{summary[key]} {label}" for key, label, _ in OUTCOMES[:4] if summary[key]]
        if (done := already_done(source, summary)) is not None:
            counts.append(done)
        counts += [f"{summary[key]} {key}" for key in ("stale", "changed_ignored") if summary[key]]
        if dead := dead_by_reason(summary):
            counts.append(f"{sum(dead.values())} dead letters ({_counted(dead)})")
        if left := source.lines_unfinished:
            counts.append(f"{left} left over")
        parts.append(", ".join(counts) or "nothing sent")
    parts.append(f"state store {worker.state.location}")
    return f"worker run: {name}: " + "; ".join(parts)


def _where(source: FileSource, total: int | None, *, finished: bool) -> str:
    """How far the run got ("5000 lines done"), or where a stop left the file and so
    where the next run starts."""
    done, of = source.lines_done, "" if total is None else f" of {total}"
    if finished:
        return f"{done} lines done" if done == total else f"{done}{of} lines done"
    if total is not None and source.watermark >= total:
        return f"stopped with all {total} lines done"
    if source.path == "-":
        return f"stopped after line {source.watermark} of standard input (not resumed)"
    return f"stopped at line {source.watermark}{of}; the next run resumes there"


Row = tuple[str, str, str]


def outcome_rows(summary: Mapping[str, int]) -> list[Row]:
    """(label, count, meaning) for each outcome, then the dead letters by reason."""
    rows = [
        (label, str(summary[key]), note)
        for key, label, note in OUTCOMES
        if summary[key] or key in ALWAYS_SHOWN
    ]
    dead = dead_by_reason(summary)
    rows.append(("dead letters", str(sum(dead.values())), "by reason:" if dead else ""))
    rows += [("", str(count), reason) for reason, count in dead.items()]
    return rows


def run_rows(worker: Worker, source: FileSource, total: int | None) -> list[Row]:
    of = "" if total is None else f" of {total}"
    rows: list[Row] = [("lines done", f"{source.lines_done}{of}", "")]
    rows += outcome_rows(worker.summary)
    if source.lines_done_before:
        rows.append(("already done", str(source.lines_done_before), "by the checkpoint"))
    left = source.lines_unfinished
    rows.append(
        ("left over", str(left), "fetched, not finished: the next run works them" if left else "")
    )
    rows.append(("state store", "", worker.state.location))
    return rows


def summary_table(rows: Iterable[Row]) -> Table:
    """Rows of (label, count, note) in three columns, without borders."""
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column()
    for row in rows:
        table.add_row(*row)
    return table


def print_table(rows: Iterable[Row], stream: IO[str]) -> None:
    """The table on `stream`; off a terminal wide enough that no row wraps, and without
    the spaces rich pads the last column with."""
    width = None if stream.isatty() else 200
    console = Console(file=stream, width=width, highlight=False)
    with console.capture() as captured:
        console.print(summary_table(rows))
    stream.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
    stream.flush()
