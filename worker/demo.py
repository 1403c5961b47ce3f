"""`worker demo`: the emulator, generated events and a worker in one process, then a summary.

While it runs, a terminal shows a progress bar on stderr; the summary is a table on stdout.

The worker runs on the embedded defaults a user would start with: a JSONL file source,
SQLite state and a file of dead letters, against the CDP emulator over real HTTP with a
little latency and a few injected faults (5xx, timeouts and dropped connections after
contacts were created or updated), so the summary shows retries and reconciliation at
work. The events are what booking systems send: orders whose contact changes (a second
version), erasures, identical redeliveries, all shuffled so that older versions often
arrive after newer ones; at the end CDP must hold each order's latest version, and none
for an erased order (`expected_bodies`, `convergence_problems`, which the tests use too).
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from .config import Settings
from .contact import build_body, parse_event
from .emulator import Emulator, EmulatorConfig
from .errors import InvalidEvent
from .observability import configure_logging
from .pipeline import Worker
from .sources.file import FileSource
from .versions import Version, older

_FIRST = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Leslie")
_LAST = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson")
_TITLES = ("Mr", "Mrs", "Ms", "Dr", "Prof")


def contact_event(rng: random.Random, number: int, order_ref: str | None = None) -> dict[str, Any]:
    """A valid order-contact event with made-up personal data."""
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    return {
        "eventId": f"demo-{number}",
        "orderRef": order_ref or str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "occurredAt": "2026-11-26T10:00:00Z",
        "contact": {
            "title": rng.choice(_TITLES),
            "firstName": first,
            "lastName": last,
            "gender": rng.choice(("male", "female", "unknown")),
            "dateOfBirth": f"19{rng.randint(50, 99)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}",
            "emails": [f"{first}.{last}{number}@example.com".lower()],
            "phoneNumbers": [f"+3531{rng.randint(1000000, 9999999)}"],
            "nationality": "Irish",
            "country": "IE",
            "passportNumber": f"PZ{rng.randint(100000, 999999)}",
            "passportExpiry": "2031-01-01",
            "identifiers": [{"provider": "BookingSystem", "id": f"C-{number}"}],
            "guestRef": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        },
    }


def invalid_events(rng: random.Random) -> Iterator[bytes]:
    """One of each kind of bad input, with its reason code: the dead letters to expect."""
    good = contact_event(rng, 0)
    yield b'{"orderRef": "not json'  # malformed_json
    yield orjson.dumps({**good, "orderRef": "../../admin"})  # invalid_order_ref
    yield orjson.dumps({**good, "contact": {**good["contact"], "lastName": " "}})  # invalid_event
    yield orjson.dumps({**good, "contact": {**good["contact"], "shoeSize": 44}})  # invalid_event


def changed(rng: random.Random, event: dict[str, Any], number: int) -> dict[str, Any]:
    """The same order's contact, changed the way bookings change: a new email and phone."""
    contact = {**event["contact"], "phoneNumbers": [f"+3538{rng.randint(1000000, 9999999)}"]}
    contact["emails"] = [f"changed{number}.{rng.randint(0, 999)}@example.com"]
    return {**event, "contact": contact}


def versions_of(
    rng: random.Random, number: int, *, change_share: float, erase_share: float
) -> list[dict[str, Any]]:
    """One order's history: a first version, maybe a change, maybe an erasure and maybe a
    re-creation. Even orders carry `version`, odd ones only `occurredAt` (both producers
    exist)."""
    first = contact_event(rng, number)
    history = [first]
    if rng.random() < change_share:
        history.append(changed(rng, first, number))
    if rng.random() < erase_share:
        history.append({"orderRef": first["orderRef"], "op": "delete"})
        if rng.random() < 0.5:
            history.append(changed(rng, first, number + 1_000_000))  # created again
    stamped = []
    for revision, event in enumerate(history, start=1):
        event = {**event, "eventId": f"demo-{number}-v{revision}"}
        if number % 2 == 0:
            event["version"] = revision
            event.pop("occurredAt", None)
        else:
            event["occurredAt"] = f"2026-11-26T{9 + revision:02d}:00:00Z"
        stamped.append(event)
    return stamped


def generate_events(
    count: int,
    *,
    duplicate_share: float = 0.1,
    change_share: float = 0.0,
    erase_share: float = 0.0,
    invalid_rounds: int = 5,
    seed: int = 7,
) -> list[bytes]:
    """`count` orders' histories, identical redeliveries and rounds of invalid events,
    shuffled. `change_share` of the orders get a second version, `erase_share` an erasure
    (and half of those a re-creation); by default each order has one event."""
    rng = random.Random(seed)
    valid = [
        event
        for n in range(1, count + 1)
        for event in versions_of(rng, n, change_share=change_share, erase_share=erase_share)
    ]
    lines = [orjson.dumps(event) for event in valid]
    lines.extend(orjson.dumps(event) for event in rng.sample(valid, int(count * duplicate_share)))
    for _ in range(invalid_rounds):
        lines.extend(invalid_events(rng))
    rng.shuffle(lines)
    return lines


def expected_bodies(
    lines: list[bytes], *, base_url: str, api_version: str = "v2"
) -> dict[str, dict[str, Any] | None]:
    """The model: what CDP must hold per order once `lines` are worked, in any order.

    The body of the order's latest version (its highest `version`, else `occurredAt`),
    or None when that is an erasure. Versions of one order are assumed distinct, or
    equal only for identical events: then the order worked cannot matter.
    """
    latest: dict[str, tuple[Version | None, int, dict[str, Any] | None]] = {}
    for number, line in enumerate(lines):
        try:
            event = parse_event(line, default_event_id=f"line-{number}", api_version=api_version)
        except InvalidEvent:
            continue
        seen = latest.get(event.order_ref)
        if seen is not None and (event.version is None or seen[0] is None):
            raise ValueError("the model needs a version on every event of an order")
        if seen is not None and not older(seen[0], event.version):
            continue  # not newer than what the order already holds
        body = None
        if not event.erasure:
            body = build_body(event, base_url=base_url, api_version=api_version)
        latest[event.order_ref] = (event.version, number, body)
    return {order_ref: body for order_ref, (_, _, body) in latest.items()}


def convergence_problems(
    emulator: Emulator, expected: dict[str, dict[str, Any] | None]
) -> list[str]:
    """How CDP's final state differs from the model (empty: it converged). Names orders
    and counts only, never a contact's fields."""
    problems = []
    for order_ref, body in expected.items():
        live = emulator.bodies_for(order_ref)
        if body is None and live:
            problems.append(f"{order_ref}: erased, but {len(live)} contact(s) at CDP")
        elif body is not None and len(live) != 1:
            problems.append(f"{order_ref}: {len(live)} contacts at CDP, expected 1")
        elif body is not None and live[0] != body:
            problems.append(f"{order_ref}: CDP holds another version of the contact")
    return problems


def write_events(path: Path, lines: list[bytes]) -> Path:
    """A JSONL file of `lines` (its folder created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def _left_over(worker: Worker) -> int:
    source = worker.source
    return source.lines_unfinished if isinstance(source, FileSource) else 0


def _answer_rows(stats: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The rows of CDP's answers by request kind: how many requests of the kind, then
    its answers by status ("create: 201 x 1980, 500 x 3"); kinds not asked left out."""
    rows = []
    for kind, by_status in stats["responses_by_kind"].items():
        if not by_status:
            continue
        answers = ", ".join(f"{status} x {n}" for status, n in sorted(by_status.items()))
        rows.append(("", str(sum(by_status.values())), f"{kind}: {answers}"))
    if rows:
        rows[0] = ("CDP answers", *rows[0][1:])
    return rows


def _percentile(samples: list[float], share: float) -> float:
    if len(samples) < 2:
        return samples[0] if samples else 0.0
    return statistics.quantiles(samples, n=100, method="inclusive")[round(share * 100) - 1]


async def run_demo(
    *, events: int = 2000, rate_limit: float = 500.0, workdir: str | None = None
) -> int:
    configure_logging("console", "error")  # the summary tells the story
    with tempfile.TemporaryDirectory(prefix="cdp-sync-demo-") as scratch:
        folder = Path(workdir or scratch)
        lines = generate_events(events, change_share=0.3, erase_share=0.03)
        source = write_events(folder / "events.jsonl", lines)
        faults = EmulatorConfig(
            latency=0.02, latency_jitter=0.01, error_rate=0.02,
            timeout_after_create_rate=0.005, reset_after_create_rate=0.005,
            timeout_after_update_rate=0.005, reset_after_update_rate=0.005, hang_seconds=3.0,
        )  # fmt: skip
        async with Emulator(faults) as emulator:
            settings = Settings(
                source=f"file:{source}",
                state=f"sqlite:///{folder / 'state.db'}",
                dlq=f"file:{folder / 'dead-letter.jsonl'}",
                cdp_base_url=emulator.url,
                cdp_client_key=faults.client_key,
                cdp_api_token=faults.api_token,
                rate_limit=rate_limit,
                request_timeout=1.0,
                lease_seconds=30.0,
                http_port=0,
            )
            print(
                f"cdp-sync demo: {source.name} ({events} orders, changes, erasures, "
                "redeliveries, bad input) "
                f"-> CDP emulator at {emulator.url}, {rate_limit:g} requests/s"
            )
            worker = Worker(settings)
            started = time.perf_counter()
            try:
                await _run_with_a_bar(worker)
            finally:
                await worker.close()
            elapsed = time.perf_counter() - started
            stats = emulator.stats()
            problems = convergence_problems(emulator, expected_bodies(lines, base_url=emulator.url))
        return _report(worker, stats, elapsed, folder if workdir else None, problems)


async def _run_with_a_bar(worker: Worker) -> None:
    """worker.run(), with a progress bar on stderr if it is a terminal."""
    from ._console import FileRun

    source = worker.source
    assert isinstance(source, FileSource)  # the demo's is always a file
    async with FileRun(worker, source, label="demo"):
        await worker.run()


def _report(
    worker: Worker, stats: dict[str, Any], elapsed: float, kept: Path | None, problems: list[str]
) -> int:
    from ._console import outcome_rows, print_table

    summary, latencies = worker.summary, sorted(worker.latencies)
    finished = sum(summary[k] for k in ("delivered", "updated", "reconciled", "deleted"))
    latency = (
        f"p50 {_percentile(latencies, 0.5) * 1000:.1f} ms, "
        f"p99 {_percentile(latencies, 0.99) * 1000:.1f} ms"
    )
    rows = [
        *outcome_rows(summary),
        ("left over", str(_left_over(worker)), "fetched, not finished"),
        ("throughput", f"{finished / elapsed:.0f}", f"events/s over {elapsed:.2f} s"),
        ("request latency", "", latency),
        *_answer_rows(stats),
        ("contacts at CDP", "", f"{stats['contacts']} on {stats['orders']} orders, "
         f"{stats['duplicate_orders']} orders with more than one"),
        ("converged", "yes" if not problems else "NO",
         "every order holds its latest version, erased ones none"),
        ("state store", "", worker.state.location),
    ]  # fmt: skip
    if kept:
        rows.append(("files kept in", "", str(kept)))
    rows += [("", "", problem) for problem in problems[:10]]
    print_table(rows, sys.stdout)
    if problems or stats["duplicate_orders"]:
        print("demo: FAILED: CDP does not hold what the events say")
        return 1
    return 0
