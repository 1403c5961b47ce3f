"""`worker demo`: the emulator, generated events and a worker in one process, then a summary.

The worker runs on the embedded defaults a user would start with: a JSONL file source,
SQLite state and a file of dead letters, against the CDP emulator over real HTTP with a
little latency and a few injected faults (5xx, timeouts and dropped connections after
the contact was created), so the summary shows retries and reconciliation at work.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from .config import Settings
from .emulator import Emulator, EmulatorConfig
from .observability import configure_logging
from .pipeline import Worker

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


def generate_events(
    count: int, *, duplicate_share: float = 0.1, invalid_rounds: int = 5, seed: int = 7
) -> list[bytes]:
    """`count` valid orders, re-sent duplicates, and rounds of invalid events, shuffled."""
    rng = random.Random(seed)
    valid = [contact_event(rng, n) for n in range(1, count + 1)]
    lines = [orjson.dumps(event) for event in valid]
    for event in rng.sample(valid, int(count * duplicate_share)):
        lines.append(orjson.dumps({**event, "eventId": event["eventId"] + "-again"}))
    for _ in range(invalid_rounds):
        lines.extend(invalid_events(rng))
    rng.shuffle(lines)
    return lines


def write_events(path: Path, lines: list[bytes]) -> Path:
    """A JSONL file of `lines` (its folder created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


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
        source = write_events(folder / "events.jsonl", generate_events(events))
        faults = EmulatorConfig(
            latency=0.02, latency_jitter=0.01, error_rate=0.02,
            timeout_after_create_rate=0.005, reset_after_create_rate=0.005, hang_seconds=3.0,
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
                f"cdp-sync demo: {source.name} ({events} orders, duplicates, bad input) "
                f"-> CDP emulator at {emulator.url}, {rate_limit:g} requests/s"
            )
            worker = Worker(settings)
            started = time.perf_counter()
            try:
                await worker.run()
            finally:
                await worker.close()
            elapsed = time.perf_counter() - started
            stats = emulator.stats()
        return _report(worker, stats, elapsed, folder if workdir else None)


def _report(worker: Worker, stats: dict[str, Any], elapsed: float, kept: Path | None) -> int:
    summary, latencies = worker.summary, sorted(worker.latencies)
    finished = summary["delivered"] + summary["reconciled"]
    dead = {k.split(":", 1)[1]: v for k, v in sorted(summary.items()) if k.startswith("dead:")}
    print(f"  delivered            {summary['delivered']}")
    print(f"  reconciled           {summary['reconciled']}  (fate unknown, found at CDP)")
    print(f"  duplicates skipped   {summary['duplicate']}")
    print(f"  dead letters         {sum(dead.values())}  {dead}")
    print(f"  throughput           {finished / elapsed:.0f} contacts/s over {elapsed:.2f} s")
    print(
        f"  request latency      p50 {_percentile(latencies, 0.5) * 1000:.1f} ms, "
        f"p99 {_percentile(latencies, 0.99) * 1000:.1f} ms"
    )
    print(f"  CDP answers          {dict(sorted(stats['responses'].items()))}")
    print(
        f"  contacts at CDP      {stats['contacts']} on {stats['orders']} orders, "
        f"{stats['duplicate_orders']} orders with more than one"
    )
    if kept:
        print(f"  files kept in        {kept}")
    if stats["duplicate_orders"] or stats["orders"] != finished:
        print("demo: FAILED: the contacts at CDP do not match the deliveries")
        return 1
    return 0
