"""`make bench`: throughput and rate precision, as ratios against a baseline in the same run.

1. Throughput: the worker, unthrottled (file source, SQLite state, JSON logs at info to a
   file), delivers N events to the emulator running in another process; a bare aiohttp
   loop POSTs the same bodies at the same concurrency, in a process of its own. Both run
   on uvloop. Printed: both rates, the ratio worker / bare loop (target >= 0.70 when the
   emulator answers at once), and the CPU per event of each process, user + system as
   the kernel accounted it (less what the process costs for no event at all), with
   their ratio (target <= 2 at 40 ms). The floor loop (`tests/floor_loop.py`) runs the
   job's own steps with the worker's parts and no pipeline (parse, body, a durable claim,
   the POST, a durable record, the log line, the metrics): floor / bare bounds what any
   worker doing those steps could reach, worker / floor is what the pipeline costs.
   Each side runs twice, the better run counts. Run
   with an emulator that answers at once (a race of CPU per request, the emulator
   sharing the machine) and with 40 ms of latency (CDP's order of magnitude).
1b. CPU per event at the default --rate-limit 50 against 40 ms (target <= 1,000 us).
2. Scale-out: 1 and then 3 worker processes on one Redis stream with Redis state,
   unthrottled, against a bare loop in the same run (target >= 0.80 for one replica).
3. Rate precision: the worker at --rate-limit 100 against an emulator limited to 110/s
   with 40 ms latency: achieved rate (target >= 95/s), 429s (target 0), and the most
   requests the emulator saw in any one-second window.
4. The unknown limit: CDP allowing 200/s (429 above, 40 ms), the worker at --rate-limit 0
   and 1000: the share of the limit reached (target >= 93%) and of 429s (<= 1%).
5. The shared limit: three replicas sharing --rate-limit 150 through Redis against a CDP
   allowing 165/s: the share reached (>= 97%), the busiest second (<= 153), 429s (0).
6. RSS over a backlog: the worker's peak resident memory over a file of 1M events (< 100 MB).
7. What convergence costs: CDP requests per event, by kind, for creates only and for a
   mix where 30% of the orders change their contact in a second version (shuffled, so
   some older versions arrive after newer ones and are skipped as stale).

Not a test: nothing here asserts on time. It prints figures for the README.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.harness import free_port, worker_env
from worker.contact import build_body, parse_event
from worker.demo import generate_events, write_events
from worker.sources import open_publisher

KEY, TOKEN = "bench-key", "bench-token"
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")


class EmulatorProcess:
    """`worker emulator` in a process of its own, as CDP would be."""

    def __init__(self, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process = subprocess.Popen(
            [sys.executable, "-m", "worker", "emulator", "--port", str(self.port),
             "--client-key", KEY, "--api-token", TOKEN, *flags],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the emulator did not start") from None
                time.sleep(0.05)

    async def admin(self, method: str, path: str) -> Any:
        async with aiohttp.ClientSession() as http, http.request(method, self.url + path) as r:
            return await r.json()

    def close(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:  # a million contacts take a while to let go of
            self._process.kill()
            self._process.wait(10)


def child_cpu(
    command: list[str], **options: Any
) -> tuple[subprocess.CompletedProcess[bytes], float]:
    """Run `command` to its end; its CPU seconds (user + system) as the kernel counted
    them (`RUSAGE_CHILDREN`: the only child waited for meanwhile is this one)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, check=True, **options)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done, cpu


def write_bodies(path: Path, url: str, lines: list[bytes]) -> Path:
    """The bare loop's input: `orderRef<TAB>body` per event, built here, not timed there."""
    with path.open("wb") as file:
        for line in lines:
            event = parse_event(line, default_event_id="-")
            body = orjson.dumps(build_body(event, base_url=url))
            file.write(event.order_ref.encode() + b"\t" + body + b"\n")
    return path


def bare_loop(url: str, bodies: Path, concurrency: int) -> tuple[float, float]:
    """The bare loop in its own process: (requests/s, CPU seconds of the process)."""
    done, cpu = child_cpu(
        [sys.executable, "-m", "tests.bare_loop", url, str(bodies), str(concurrency)],
        stdout=subprocess.PIPE,
    )
    return float(orjson.loads(done.stdout)["rate"]), cpu


def floor_loop(url: str, events: Path, folder: Path, concurrency: int) -> tuple[float, float]:
    """The floor loop in its own process, its log lines to a file as the worker's:
    (events/s, CPU seconds of the process)."""
    for stale in folder.glob("floor.db*"):
        stale.unlink()
    with (folder / "floor.log").open("wb") as log:
        done, cpu = child_cpu(
            [sys.executable, "-m", "tests.floor_loop", url, str(events),
             str(folder / "floor.db"), str(concurrency)],
            stdout=log, stderr=subprocess.PIPE,
        )  # fmt: skip
    return float(orjson.loads(done.stderr)["rate"]), cpu


def run_worker(url: str, folder: Path, events: Path, **settings: str) -> dict[str, Any]:
    """`worker run` over `events`; its rate from its own started/finished log lines."""
    for stale in folder.glob("state.db*"):
        stale.unlink()
    env = worker_env(
        url,
        KEY,
        TOKEN,
        source=f"file:{events}",
        state=f"sqlite:///{folder / 'state.db'}",
        dlq=f"file:{folder / 'dead-letter.jsonl'}",
        log_level="info",
        **settings,
    )
    log_path = folder / "worker.log"
    with log_path.open("wb") as log:
        _, cpu = child_cpu(
            [sys.executable, "-m", "worker", "run"], env=env, stdout=log, stderr=subprocess.DEVNULL
        )
    times: dict[str, datetime] = {}
    delivered = finished = 0
    for line in log_path.read_bytes().splitlines():
        record = orjson.loads(line)
        if record["event"] in ("worker.started", "worker.finished"):
            times[record["event"]] = datetime.fromisoformat(record["timestamp"])
        delivered += record["event"] in ("event.delivered", "event.reconciled")
        finished += record["event"] in FINISHED
    seconds = (times["worker.finished"] - times["worker.started"]).total_seconds()
    return {
        "delivered": delivered, "finished": finished, "seconds": seconds,
        "rate": delivered / seconds, "cpu": cpu,
    }  # fmt: skip


# The log lines of an event's outcome (one per event).
FINISHED = {
    f"event.{outcome}"
    for outcome in ("delivered", "reconciled", "updated", "deleted", "duplicate", "stale")
}


# The throughput runs' sides: (key, printed name, unit of its rate).
SIDES = (
    ("bare", "bare aiohttp loop", "requests/s"),
    ("floor", "floor loop", "events/s"),
    ("worker", "worker", "events/s"),
)


async def throughput(count: int, concurrency: int, latency: float, folder: Path) -> None:
    """Rate and CPU per event of the worker against the bare loop and the floor loop
    (`tests/floor_loop.py`: the job's own steps without the pipeline), all on uvloop.

    CPU per event is the process's CPU for N events less its CPU for none (start-up and
    shut-down), over N: what an event costs, not what starting Python costs.
    """
    lines = generate_events(count, duplicate_share=0.0, invalid_rounds=0, seed=1)
    events = write_events(folder / "events.jsonl", lines)
    nothing = write_events(folder / "no-events.jsonl", [])
    emulator = EmulatorProcess("--latency", str(latency))
    rates: dict[str, list[float]] = {"bare": [], "floor": [], "worker": []}
    cpus: dict[str, list[float]] = {"bare": [], "floor": [], "worker": []}
    try:
        bodies = write_bodies(folder / "bodies.tsv", emulator.url, lines)
        no_bodies = write_bodies(folder / "no-bodies.tsv", emulator.url, [])
        settings = {"rate_limit": "0", "concurrency": str(concurrency)}
        idle = {
            "bare": bare_loop(emulator.url, no_bodies, concurrency)[1],
            "floor": floor_loop(emulator.url, nothing, folder, concurrency)[1],
            "worker": run_worker(emulator.url, folder, nothing, **settings)["cpu"],
        }
        for _ in range(2):
            for side in ("bare", "floor", "worker"):
                await emulator.admin("POST", "/_emulator/reset")
                if side == "bare":
                    rate, cpu = bare_loop(emulator.url, bodies, concurrency)
                elif side == "floor":
                    rate, cpu = floor_loop(emulator.url, events, folder, concurrency)
                else:
                    result = run_worker(emulator.url, folder, events, **settings)
                    if result["delivered"] != count:
                        raise RuntimeError(f"worker run incomplete: {result}")
                    rate, cpu = result["rate"], result["cpu"]
                stats = await emulator.admin("GET", "/_emulator/stats")
                if stats["contacts"] != count or stats["duplicate_orders"]:
                    raise RuntimeError(f"{side} run incomplete: {stats['contacts']} contacts")
                rates[side].append(rate)
                cpus[side].append((cpu - idle[side]) / count)
    finally:
        emulator.close()
    best = {side: max(values) for side, values in rates.items()}
    us = {side: min(values) * 1e6 for side, values in cpus.items()}
    print(
        f"throughput: {count} events, concurrency {concurrency}, "
        f"emulator in another process answering after {latency * 1000:g} ms, uvloop"
    )
    for side, label, unit in SIDES:
        runs = _fmt(rates[side])
        print(f"  {label:19} {best[side]:8.0f} {unit:12}(runs: {runs})")
    target = ">= 0.70" if latency == 0 else "-"
    print(f"  ratio worker/bare   {best['worker'] / best['bare']:8.2f}   (target {target})")
    floor_rate = best["floor"] / best["bare"]
    print(f"  ratio floor/bare    {floor_rate:8.2f}   (the most a worker doing these steps could)")
    print(f"  CPU per request     {us['bare']:8.0f} us bare loop")
    print(f"  CPU per event       {us['floor']:8.0f} us floor loop")
    print(f"  CPU per event       {us['worker']:8.0f} us worker")
    cpu_target = "<= 2" if latency > 0 else "-"
    print(f"  CPU ratio           {us['worker'] / us['bare']:8.2f}   (target {cpu_target})")
    print(f"  CPU ratio floor     {us['floor'] / us['bare']:8.2f}   (floor/bare: the job's own)")
    print(f"  CPU ratio pipeline  {us['worker'] / us['floor']:8.2f}   (worker/floor)")


async def default_rate_cpu(count: int, folder: Path) -> None:
    """CPU per event of a worker at the default --rate-limit (50/s), CDP at 40 ms."""
    lines = generate_events(count, duplicate_share=0.0, invalid_rounds=0, seed=4)
    events = write_events(folder / "rate50-events.jsonl", lines)
    nothing = write_events(folder / "no-events.jsonl", [])
    emulator = EmulatorProcess("--latency", "0.04")
    try:
        idle = run_worker(emulator.url, folder, nothing, rate_limit="50")["cpu"]
        result = run_worker(emulator.url, folder, events, rate_limit="50")
    finally:
        emulator.close()
    per_event = (result["cpu"] - idle) / count * 1e6
    print(f"default rate: {count} events at --rate-limit 50, emulator at 40 ms")
    print(f"  achieved            {result['rate']:8.1f} events/s")
    print(f"  CPU per event       {per_event:8.0f} us   (target <= 1000)")


async def redis_replicas(
    emulator: EmulatorProcess,
    lines: list[bytes],
    replicas: int,
    concurrency: int,
    folder: Path,
    **settings: str,
) -> float:
    """`replicas` worker processes on one Redis stream with Redis state; contacts/s.
    `settings` override theirs (by option name; unthrottled unless they say)."""
    import redis.asyncio as aioredis

    run = uuid.uuid4().hex[:8]
    source = f"{REDIS_URL}?stream=bench-{run}&group=bench"
    publisher = open_publisher(source)
    await publisher.open()
    await publisher.publish(lines)
    await publisher.close()
    env = worker_env(
        emulator.url,
        KEY,
        TOKEN,
        source=source,
        state=f"{REDIS_URL}?prefix=bench-{run}:",
        concurrency=str(concurrency),
        log_level="info",
        **{"rate_limit": "0", **settings},
    )
    logs = [(folder / f"replica-{n}.log").open("wb") for n in range(replicas)]
    processes = [
        subprocess.Popen([sys.executable, "-m", "worker", "run"], env=env, stdout=log)
        for log in logs
    ]
    try:
        deadline = time.monotonic() + 600
        # Polled with the progress counts: the whole stats, built every 200 ms, paused
        # the emulator and bunched the requests arriving meanwhile.
        while (done := await emulator.admin("GET", "/_emulator/progress"))["orders"] < len(lines):
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                raise RuntimeError(f"replicas stalled at {done['orders']} orders")
            await asyncio.sleep(0.2)
        stats = await emulator.admin("GET", "/_emulator/stats")
    finally:
        for process in processes:
            process.terminate()
        for process, log in zip(processes, logs, strict=True):
            process.wait(60)
            log.close()
        client = aioredis.Redis.from_url(REDIS_URL)
        keys = [key async for key in client.scan_iter(f"bench-{run}*")]
        await client.delete(*keys)
        await client.aclose()
    if stats["duplicate_orders"]:
        raise RuntimeError("an order got two contacts")
    rate: float = len(lines) / stats["duration_seconds"]
    return rate


async def scale_out(count: int, concurrency: int, latency: float, folder: Path) -> None:
    lines = generate_events(count, duplicate_share=0.0, invalid_rounds=0, seed=3)
    emulator = EmulatorProcess("--latency", str(latency))
    try:
        bodies = write_bodies(folder / "bodies.tsv", emulator.url, lines)
        await emulator.admin("POST", "/_emulator/reset")
        bare, _ = bare_loop(emulator.url, bodies, concurrency)
        results = {}
        for replicas in (1, 3):
            await emulator.admin("POST", "/_emulator/reset")
            results[replicas] = await redis_replicas(emulator, lines, replicas, concurrency, folder)
    finally:
        emulator.close()
    print(
        f"scale-out: {count} events on one Redis stream, Redis state, unthrottled, "
        f"emulator answering after {latency * 1000:g} ms"
    )
    print(f"  bare aiohttp loop   {bare:8.0f} requests/s")
    ratio = results[1] / bare
    print(f"  1 replica           {results[1]:8.0f} events/s    ratio {ratio:.2f} (target >= 0.80)")
    print(f"  3 replicas          {results[3]:8.0f} events/s    (together)")


async def rate_precision(count: int, folder: Path) -> None:
    lines = generate_events(count, duplicate_share=0.0, invalid_rounds=0, seed=2)
    events = write_events(folder / "rate-events.jsonl", lines)
    emulator = EmulatorProcess("--rate-limit", "110", "--latency", "0.04")
    try:
        result = run_worker(emulator.url, folder, events, rate_limit="100", concurrency="32")
        stats = await emulator.admin("GET", "/_emulator/stats")
    finally:
        emulator.close()
    throttled = stats["responses"].get("429", 0)
    print(f"rate precision: {count} events at --rate-limit 100, emulator limit 110/s, 40 ms")
    print(f"  achieved            {result['rate']:8.1f} requests/s  (target >= 95)")
    print(f"  429 answers         {throttled:8d}   (target 0)")
    print(f"  busiest second      {stats['max_posts_in_any_second']:8d} requests at the emulator")


async def sync_cost(count: int, concurrency: int, folder: Path) -> None:
    emulator = EmulatorProcess("--latency", "0.005")
    print(f"convergence cost: {count} orders, concurrency {concurrency}, fresh SQLite state")
    try:
        for label, share in (("creates only", 0.0), ("30% changed", 0.3)):
            lines = generate_events(
                count, duplicate_share=0.0, change_share=share, invalid_rounds=0, seed=5
            )
            events = write_events(folder / "sync-events.jsonl", lines)
            await emulator.admin("POST", "/_emulator/reset")
            result = run_worker(
                emulator.url, folder, events, rate_limit="0", concurrency=str(concurrency)
            )
            stats = await emulator.admin("GET", "/_emulator/stats")
            if result["finished"] != len(lines) or stats["duplicate_orders"]:
                raise RuntimeError(f"worker run incomplete: {result}")
            kinds = {k: v for k, v in stats["requests_by_kind"].items() if v}
            total = sum(kinds.values())
            print(
                f"  {label:13s} {len(lines):6d} events  {total / len(lines):5.3f} requests/event"
                f"  {kinds}"
            )
    finally:
        emulator.close()


async def unknown_limit(count: int, folder: Path) -> None:
    """CDP allows 200/s and says so only with 429s: how close does the worker get?"""
    lines = generate_events(count, duplicate_share=0.0, invalid_rounds=0, seed=6)
    events = write_events(folder / "limit-events.jsonl", lines)
    emulator = EmulatorProcess("--rate-limit", "200", "--latency", "0.04")
    print(f"unknown limit: {count} events, emulator allowing 200/s (429 above), 40 ms")
    try:
        for configured in ("0", "1000"):
            await emulator.admin("POST", "/_emulator/reset")
            result = run_worker(
                emulator.url, folder, events, rate_limit=configured, concurrency="32"
            )
            stats = await emulator.admin("GET", "/_emulator/stats")
            answered = sum(stats["responses"].values())
            throttled = stats["responses"].get("429", 0)
            print(
                f"  --rate-limit {configured:4s}  {result['rate']:6.1f} events/s = "
                f"{result['rate'] / 200:5.1%} of the limit (target >= 93%), "
                f"429s {throttled / answered:5.2%} of answers (target <= 1%)"
            )
    finally:
        emulator.close()


async def shared_limit(count: int, concurrency: int, folder: Path) -> None:
    """Three replicas sharing --rate-limit 150 through Redis, CDP allowing 165/s."""
    lines = generate_events(count, duplicate_share=0.0, invalid_rounds=0, seed=7)
    emulator = EmulatorProcess("--rate-limit", "165", "--latency", "0.04")
    key = f"bench-rate-{uuid.uuid4().hex[:8]}"
    try:
        rate = await redis_replicas(
            emulator, lines, 3, concurrency, folder,
            rate_limit="150", rate_limit_backend=f"{REDIS_URL}?key={key}",
        )  # fmt: skip
        stats = await emulator.admin("GET", "/_emulator/stats")
    finally:
        emulator.close()
    print(f"shared limit: {count} events, 3 replicas sharing --rate-limit 150 via Redis")
    print(f"  achieved            {rate:8.1f} events/s = {rate / 150:.1%} (target >= 97%)")
    print(
        f"  busiest second      {stats['max_posts_in_any_second']:8d} requests at the emulator"
        "  (target <= 153)"
    )
    print(f"  429 answers         {stats['responses'].get('429', 0):8d}   (target 0 at 165/s)")


async def backlog_rss(count: int, folder: Path) -> None:
    """The worker's peak RSS over a file of `count` events (a backlog it reads as fast as
    CDP allows): flat, not growing with the file (target < 100 MB at 1M)."""
    path = folder / "backlog.jsonl"
    with path.open("wb") as file:  # written in chunks: a million events do not fit twice
        for start in range(0, count, 50_000):
            lines = generate_events(
                min(50_000, count - start), duplicate_share=0.0, invalid_rounds=0, seed=start
            )
            file.write(b"".join(line + b"\n" for line in lines))
    emulator = EmulatorProcess()
    env = worker_env(
        emulator.url, KEY, TOKEN, source=f"file:{path}",
        state=f"sqlite:///{folder / 'state.db'}", dlq=f"file:{folder / 'dead-letter.jsonl'}",
        rate_limit="0", concurrency="32",
    )  # fmt: skip
    try:
        started = time.monotonic()
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # The worker's own high-water mark (VmHWM), read while it runs: the kernel's
        # RUSAGE_CHILDREN maxrss would also count the memory of this process at the fork.
        peak_kib = 0
        while worker.poll() is None:
            peak_kib = max(peak_kib, _high_water_kib(worker.pid))
            await asyncio.sleep(0.5)
        seconds = time.monotonic() - started
        stats = await emulator.admin("GET", "/_emulator/stats")
    finally:
        emulator.close()
    print(f"backlog: {count} events in one file, unthrottled")
    print(f"  delivered           {stats['contacts']:8d} in {seconds:.0f} s")
    print(f"  peak RSS            {peak_kib / 1024:8.1f} MB of the worker   (target < 100 MB)")


def _high_water_kib(pid: int) -> int:
    """A process's peak resident memory so far, in KiB (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{value:.0f}" for value in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rate-events", type=int, default=1_500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--scale-events", type=int, default=10_000)
    parser.add_argument("--sync-events", type=int, default=5_000)
    # 20 s at 50/s: with 500 (10 s) the figure moved by 15% from one run to the next.
    parser.add_argument("--default-rate-events", type=int, default=1_000)
    parser.add_argument("--limit-events", type=int, default=6_000)
    parser.add_argument("--shared-events", type=int, default=4_500)
    parser.add_argument("--backlog-events", type=int, default=1_000_000)
    parser.add_argument(
        "--only",
        choices=["throughput", "cpu", "rate", "limit", "shared", "scale", "sync", "rss"],
        action="append",
    )
    parser.add_argument(
        "--latency",
        type=float,
        action="append",
        help="emulator latency (s) for throughput and scale-out runs (repeatable; default 0, 0.04)",
    )
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {platform.platform()}"
    )
    only = set(
        args.only or ["throughput", "cpu", "rate", "limit", "shared", "scale", "sync", "rss"]
    )
    with tempfile.TemporaryDirectory(prefix="cdp-sync-bench-") as scratch:
        if "throughput" in only:
            for latency in args.latency or [0.0, 0.04]:
                asyncio.run(throughput(args.events, args.concurrency, latency, Path(scratch)))
        if "cpu" in only:
            asyncio.run(default_rate_cpu(args.default_rate_events, Path(scratch)))
        if "rate" in only:
            asyncio.run(rate_precision(args.rate_events, Path(scratch)))
        if "limit" in only:
            asyncio.run(unknown_limit(args.limit_events, Path(scratch)))
        if "shared" in only:
            asyncio.run(shared_limit(args.shared_events, args.concurrency, Path(scratch)))
        if "rss" in only:
            asyncio.run(backlog_rss(args.backlog_events, Path(scratch)))
        if "sync" in only:
            asyncio.run(sync_cost(args.sync_events, args.concurrency, Path(scratch)))
        if "scale" in only:
            for latency in args.latency or [0.0, 0.04]:
                asyncio.run(scale_out(args.scale_events, args.concurrency, latency, Path(scratch)))


if __name__ == "__main__":
    main()
