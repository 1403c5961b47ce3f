"""The benchmark's floor: what the job itself costs per event, with none of the pipeline.

`python -m tests.floor_loop URL EVENTS STATE_DB CONCURRENCY`: the worker's own parts, each
event through the steps no design can leave out, and nothing else: parse and validate it
(`parse_event`), build its body and fingerprint, claim it in SQLite before the request,
POST it with the worker's `CdpClient`, count the request in the worker's metrics, record
its outcome in SQLite and write the worker's `event.delivered` JSON line; claims and
records a chunk at a time (one store operation each, group commits as the worker's).
No file source, acks or checkpoint, no leases, rate limit, pauses or retries.
`tests/bench.py` runs it beside the bare loop and the worker: worker / floor is what the
pipeline costs, floor / bare what the job's own steps cost over a bare POST.

Its log lines go to stdout; it prints `{"rate": events_per_second}` on stderr. Runs on
the loop `worker run` uses by default.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator

import orjson
import structlog

from tests.bare_loop import KEY, TOKEN
from worker import _loops
from worker.cdp import CdpClient
from worker.cli import WORKER_GC_THRESHOLDS
from worker.contact import Event, build_body, fingerprint, parse_event
from worker.observability import Metrics, configure_logging, get_logger
from worker.state.base import DONE, Finish, Want
from worker.state.sqlite import SqliteStateStore

# Events a lane parses and claims in one store operation (as the worker claims a fetch),
# sends one after the other, then records in one.
CHUNK = 32
OWNER = "floor"
LEASE_SECONDS = 60.0

log = get_logger("worker.floor")


def chunks(lines: list[bytes]) -> Iterator[list[bytes]]:
    for start in range(0, len(lines), CHUNK):
        yield lines[start : start + CHUNK]


async def deliver_all(url: str, lines: list[bytes], state_db: str, concurrency: int) -> float:
    """Every event claimed, POSTed and recorded by `concurrency` lanes; return events/s."""
    metrics = Metrics()
    state = SqliteStateStore(state_db)
    client = CdpClient(url, KEY, TOKEN, concurrency=concurrency)
    await state.open()
    await client.open()
    work = chunks(lines)

    recording: set[asyncio.Task[None]] = set()

    async def record(delivered: list[tuple[Event, Finish]]) -> None:
        """The chunk's outcomes in one store operation, then each one's log line."""
        await state.record_many(OWNER, [finish for _, finish in delivered])
        for event, finish in delivered:
            structlog.contextvars.bind_contextvars(
                order_ref=event.order_ref, event_id=event.event_id
            )
            log.info("event.delivered", contact_ref=finish.contact_ref, status=201)

    async def lane() -> None:
        for chunk in work:
            ready = []
            for line in chunk:
                event = parse_event(line, default_event_id="-")
                body = build_body(event, base_url=url)
                ready.append((event, body, fingerprint(body)))
            wants = [(e.order_ref, Want(p, e.version, e.op, "update")) for e, _, p in ready]
            await state.claim_many(wants, OWNER, LEASE_SECONDS)
            delivered = []
            for event, body, print_ in ready:
                outcome = await client.create_contact(event.order_ref, body)
                metrics.requests_by_status[outcome.label].inc()
                metrics.request_duration.observe(outcome.duration)
                if outcome.status != 201:
                    raise RuntimeError(f"floor loop got {outcome.status}")
                finish = Finish(
                    event.order_ref, DONE, outcome.contact_ref, outcome.href, print_, event.version
                )
                delivered.append((event, finish))
            # The next chunk's requests need not wait for these outcomes' commit.
            task = asyncio.create_task(record(delivered))
            recording.add(task)
            task.add_done_callback(recording.discard)

    try:
        started = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        await asyncio.gather(*recording)
        return len(lines) / max(time.perf_counter() - started, 1e-9)
    finally:
        await client.close()
        await state.close()


def main() -> None:
    url, path, state_db, concurrency = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    configure_logging("json", "info")
    _loops.collect_rarely(WORKER_GC_THRESHOLDS)  # as `worker run` does: it costs less
    with open(path, "rb") as file:
        lines = file.read().splitlines()
    rate = _loops.run(deliver_all(url, lines, state_db, concurrency))
    sys.stderr.write(orjson.dumps({"rate": rate}).decode() + "\n")


if __name__ == "__main__":
    main()
