"""`worker dlq list` and `worker dlq replay`: look at dead letters, and send them again.

Every sink can be read back without losing anything: a file, a Redis stream (XRANGE), a
RabbitMQ queue (each letter fetched unacked, then requeued) and a NATS subject (read by
sequence). Replay re-publishes each letter's event (or raw text) to a source and first removes
the order's `dead` record from the state store, so the worker works it again instead of
skipping it as a duplicate. Letters stay where they are: a second replay sends them
again, and the state store turns what was delivered meanwhile into duplicates.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from .errors import ConfigError
from .sources import FileDeadLetterSink, open_dead_letter_sink, open_publisher
from .state import open_state_store

Letter = dict[str, Any]
MISSING = "-"  # what a listing shows for a field a letter does not have


async def read_letters(url: str, *, label: str = "URL") -> list[Letter]:
    """Every dead letter at `url` (any sink: file, stream, queue, subject), oldest first.

    A file that is not there is a ConfigError (naming `label`): opening the sink would
    create it, and "0 dead letters" would hide a typo in the path.
    """
    sink = open_dead_letter_sink(url, label=label)
    if isinstance(sink, FileDeadLetterSink) and not await asyncio.to_thread(_exists, sink.path):
        raise ConfigError(f"{label}: {sink.path} does not exist")
    await sink.open_to_read()
    try:
        return await sink.read_all()
    finally:
        await sink.close()


def _exists(path: str) -> bool:
    return Path(path).exists()


def summary(letters: Sequence[Letter]) -> list[tuple[str, int, str]]:
    """(reason, count, newest deadAt), the reason with the newest letter first; `MISSING`
    for a reason or a time no letter has."""
    counts: Counter[str] = Counter()
    newest: dict[str, str] = {}
    for letter in letters:
        reason = _shown(letter.get("reason")) or MISSING
        counts[reason] += 1
        newest[reason] = max(newest.get(reason, ""), _shown(letter.get("deadAt")))
    rows = [(r, counts[r], newest[r]) for r in counts]
    rows.sort(key=lambda row: row[2], reverse=True)
    return [(reason, count, time or MISSING) for reason, count, time in rows]


def describe(letter: Letter) -> str:
    """One line about a letter, without personal data: no event, no raw text, no detail
    (CDP's messages may quote the contact). Fields the letter does not have are left out."""
    fields = ("deadAt", "reason", "status", "orderRef", "eventId", "attempts")
    shown = ((name, _shown(letter.get(name))) for name in fields)
    return "  ".join(f"{name}={value}" for name, value in shown if value) or "(no fields)"


def _shown(value: object) -> str:
    """A field as listed: "" for one that is missing or null."""
    return "" if value is None else str(value)


def body_of(letter: Letter) -> bytes:
    """The message to publish again: the original event, or the raw text."""
    if letter.get("event") is not None:
        return orjson.dumps(letter["event"])
    return str(letter.get("raw") or "").encode()


async def replay(
    letters: Sequence[Letter],
    *,
    to: str,
    state_url: str,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Forget each letter's dead order, then publish its event to `to`.

    Returns (published, orders reopened). A dry run only counts what it would do.
    """
    orders = sorted({str(letter["orderRef"]) for letter in letters if letter.get("orderRef")})
    if dry_run:
        return len(letters), len(orders)
    store = open_state_store(state_url, retention_seconds=None)
    await store.open()
    try:
        reopened = sum([await store.forget(order_ref) for order_ref in orders])
    finally:
        await store.close()
    publisher = open_publisher(to)
    await publisher.open()
    try:
        for start in range(0, len(letters), 500):
            chunk = letters[start : start + 500]
            await publisher.publish([body_of(letter) for letter in chunk])
            if progress is not None:
                progress(len(chunk))
    finally:
        await publisher.close()
    return len(letters), reopened
