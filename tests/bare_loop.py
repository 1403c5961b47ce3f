"""The benchmark's ceiling: a bare aiohttp loop POSTing prepared bodies, in a process of
its own so that the kernel accounts for its CPU alone (`tests/bench.py`).

`python -m tests.bare_loop URL FILE CONCURRENCY`: FILE holds `orderRef<TAB>body` lines;
prints `{"rate": requests_per_second}`. Runs on the loop `worker run` uses by default.
"""

from __future__ import annotations

import asyncio
import sys
import time

import aiohttp
import orjson

from worker import _loops
from worker.cdp import basic_authorization

KEY, TOKEN = "bench-key", "bench-token"


async def post_all(url: str, bodies: list[tuple[str, bytes]], concurrency: int) -> float:
    """POST every body with `concurrency` requests in flight; return requests/s."""
    headers = {
        "Authorization": basic_authorization(KEY, TOKEN),
        "Accept": "application/json",
        "Content-Type": "application/json",
    }
    queue = iter(bodies)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:

        async def lane() -> None:
            for order_ref, body in queue:
                async with http.post(f"{url}/v2/orders/{order_ref}/contacts", data=body) as r:
                    await r.read()
                    if r.status != 201:
                        raise RuntimeError(f"bare loop got {r.status}")

        started = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        return len(bodies) / max(time.perf_counter() - started, 1e-9)


def main() -> None:
    url, path, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(path, "rb") as file:
        bodies = [(ref.decode(), body) for ref, _, body in (line.partition(b"\t") for line in file)]
    rate = _loops.run(post_all(url, [(r, b.rstrip(b"\n")) for r, b in bodies], concurrency))
    print(orjson.dumps({"rate": rate}).decode())


if __name__ == "__main__":
    main()
