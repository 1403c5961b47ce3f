"""What the emulator does to requests besides answering them: the faults a worker must
survive (DESIGN section 3), each switched by a knob of `EmulatorConfig`.

Every API request passes `Faults.refusal` first: authentication (401/403), the rate limit
(429, over a sliding second), injected 5xx and latency. A write (create, update or
delete) that was applied may then be answered by `after_write` with a dropped connection
or a hang: the change is made, the client cannot know. Writes to the orders of
`error_orders` always fail (`fails_always`), and orders can 404 to creating POSTs for a
while after their first POST ("the booking is not in CDP yet"). The random choices come
from one seeded generator, so a run with a `seed` is repeatable.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import random
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import orjson
from aiohttp import web

from .config import EmulatorConfig

WriteKind = Literal["create", "update", "delete"]

MORE_INFO_URL = "https://doc.sitecore.com/cdp"
INJECTED_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
INJECTED_CODES = tuple(INJECTED_REASONS)


def json_response(payload: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


def error_response(
    status: int,
    message: str,
    developer_message: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """A CDP-shaped error body."""
    body = {
        "status": status,
        "code": status,
        "message": message,
        "developerMessage": developer_message or message,
        "moreInfoUrl": MORE_INFO_URL,
    }
    response = json_response(body, status)
    if headers:
        response.headers.update(headers)
    return response


class Dropped(web.Response):
    """Returned after aborting the connection on purpose: aiohttp's write to the closed
    transport fails quietly, and the middleware does not count it as an answer."""


def peak_in_window(times: Sequence[float], window: float = 1.0) -> int:
    """Most timestamps in any half-open window of `window` seconds (times sorted ascending).

    Matches the limiter, which admits a request at `t` when fewer than the limit were
    admitted in (t - window, t]: for each timestamp, count those within that span.
    """
    best = 0
    start = 0
    for end, moment in enumerate(times):
        while moment - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


class Faults:
    """The faults of one emulator app, and what they did (`stats`)."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.stopping = asyncio.Event()  # set on shutdown: wakes handlers that hang
        self._rng = random.Random(config.seed)
        self._rng_seed = config.seed
        self._auth_for: tuple[str, str] | None = None
        self._auth_expected = b""
        self.reset()

    def reset(self) -> None:
        self.injected: Counter[str] = Counter()
        self.first_post_at: dict[str, float] = {}
        # Arrival times of every request that reached the limiter, and of those it admitted;
        # appended in event-loop order, so already sorted for the sweep in `stats`.
        self.arrivals: list[float] = []
        self.admitted: list[float] = []
        self.window: deque[float] = deque()

    def stats(self) -> dict[str, Any]:
        return {
            "faults": dict(self.injected),
            "max_posts_in_any_second": peak_in_window(self.arrivals),
            "accepted_per_second_peak": peak_in_window(self.admitted),
        }

    @property
    def rng(self) -> random.Random:
        """The random source, reseeded whenever the `seed` knob changes."""
        if self.config.seed != self._rng_seed:
            self._rng_seed = self.config.seed
            self._rng = random.Random(self._rng_seed)
        return self._rng

    def chance(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the app shuts down (so tests never wait for a hang)."""
        if seconds <= 0 or self.stopping.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.stopping.wait()

    # -- every API request -----------------------------------------------------------------

    async def refusal(self, request: web.Request, now: float) -> web.Response | None:
        """Auth, rate limit, latency and injected 5xx: the answer refusing the request, or
        None to let it through (after the latency either way)."""
        config = self.config
        refusal: web.Response | None = None
        status = self.auth_status(request.headers.get("Authorization"))
        if status == 401:
            refusal = error_response(
                401,
                "Unauthorized",
                "HTTP Basic authentication with a valid client key and API token is required",
                {"WWW-Authenticate": 'Basic realm="Sitecore CDP"'},
            )
        elif status == 403:
            refusal = error_response(403, "Forbidden", "These credentials may not use this API")
        elif not self.admit(now):
            # When the window frees a slot, to the millisecond: a server that knows it.
            wait = self.window[0] + 1.0 - now if self.window else 1.0
            retry_after = {"Retry-After": f"{max(wait, 0.001):.3f}"}
            refusal = error_response(
                429, "Too Many Requests", "Rate limit exceeded; retry later", retry_after
            )
        elif self.chance(config.error_rate):
            self.injected["error"] += 1
            code = self.rng.choice(INJECTED_CODES)
            refusal = error_response(code, INJECTED_REASONS[code], "Injected fault: try again")
        delay = config.latency
        if config.latency_jitter > 0:
            delay += self.rng.uniform(-config.latency_jitter, config.latency_jitter)
        await self.pause(delay)
        return refusal

    def auth_status(self, header: str | None) -> int | None:
        """401/403 as CDP would answer these credentials, or None when they pass."""
        config = self.config
        if config.auth_failure or header is None:
            return 401
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "basic":
            return 401
        if not hmac.compare_digest(credentials.strip().encode(), self._expected_credentials()):
            return 401
        return 403 if config.forbidden else None

    def _expected_credentials(self) -> bytes:
        pair = (self.config.client_key, self.config.api_token)
        if pair != self._auth_for:
            self._auth_for = pair
            self._auth_expected = base64.b64encode(f"{pair[0]}:{pair[1]}".encode())
        return self._auth_expected

    def admit(self, now: float) -> bool:
        """Sliding one-second window over admitted requests; False means answer 429."""
        self.arrivals.append(now)
        limit = self.config.rate_limit
        window = self.window
        # Trimmed and filled even while the limiter is off, so switching it on at runtime
        # already knows the past second.
        while window and window[0] <= now - 1.0:
            window.popleft()
        if limit > 0 and len(window) >= max(1, int(limit)):
            return False
        window.append(now)
        self.admitted.append(now)
        return True

    # -- writes ---------------------------------------------------------------------------

    def order_not_found_yet(self, order_key: str, now: float) -> bool:
        """True while the order 404s to creating POSTs: `not_found_for` seconds after its
        first POST."""
        first = self.first_post_at.setdefault(order_key, now)
        grace = self.config.not_found_for
        if grace > 0 and now - first < grace:
            self.injected["not_found"] += 1
            return True
        return False

    def fails_always(self, order_key: str) -> bool:
        """True for an order of `error_orders`: its writes (creates, and updates and deletes
        of its contacts) fail, whatever the others do."""
        if any(order_key == ref.lower() for ref in self.config.error_orders):
            self.injected["error_order"] += 1
            return True
        return False

    async def after_write(
        self, request: web.Request, kind: WriteKind, answer: web.Response
    ) -> web.StreamResponse:
        """`answer` to a write already applied, unless a knob drops the connection or hangs
        first (`reset_after_<kind>_rate`, `timeout_after_<kind>_rate`)."""
        reset_rate, timeout_rate = self._after_write_rates(kind)
        if self.chance(reset_rate):
            self.injected[f"reset_after_{kind}"] += 1
            if request.transport is not None:
                request.transport.abort()
            return Dropped(status=answer.status)
        if self.chance(timeout_rate):
            self.injected[f"timeout_after_{kind}"] += 1
            await self.pause(self.config.hang_seconds)
        return answer

    def _after_write_rates(self, kind: WriteKind) -> tuple[float, float]:
        config = self.config
        if kind == "create":
            return config.reset_after_create_rate, config.timeout_after_create_rate
        if kind == "update":
            return config.reset_after_update_rate, config.timeout_after_update_rate
        return config.reset_after_delete_rate, config.timeout_after_delete_rate
