"""Logs, metrics and the health server (DESIGN section 7).

Logging is configured once, at start-up, by `configure_logging`: structlog with contextvars,
rendered by orjson as one JSON object per line on stdout (a console renderer on a TTY).
A last-line-of-defence processor drops any key that names personal data or a credential,
so a careless `log.info(..., email=...)` can never leak one; the code itself never passes
them (tests seed PII and scan every captured line).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import IO, Any

import orjson
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# Keys that must never reach a log line, whatever their value. Lower-cased, without
# separators, so `first_name`, `firstName` and `FIRST-NAME` all match.
_FORBIDDEN_KEYS = frozenset(
    {
        "firstname",
        "lastname",
        "name",
        "email",
        "emails",
        "phone",
        "phonenumber",
        "phonenumbers",
        "passport",
        "passportnumber",
        "passportexpiry",
        "dateofbirth",
        "dob",
        "birthdate",
        "contact",
        "body",
        "payload",
        "authorization",
        "password",
        "token",
        "apitoken",
        "clientkey",
        "secret",
        "raw",
    }
)
REDACTED = "[redacted]"


# Keys already judged (the code logs the same few dozen keys over and over): normalising
# every key of every line cost more than rendering it. Bounded, in case keys ever vary.
_JUDGED: dict[str, bool] = {}
_JUDGED_MAX = 4096


def _normalise_key(key: str) -> str:
    return key.lower().replace("_", "").replace("-", "")


def _forbidden(key: str) -> bool:
    judged = _JUDGED.get(key)
    if judged is None:
        judged = _normalise_key(key) in _FORBIDDEN_KEYS
        if len(_JUDGED) < _JUDGED_MAX:
            _JUDGED[key] = judged
    return judged


def redact_sensitive(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: replace values of keys that name PII or credentials."""
    for key in event_dict:  # values replaced in place: the dict keeps its size
        if _forbidden(key):
            event_dict[key] = REDACTED
    return event_dict


# structlog's add_log_level names: its methods' names, but for these two.
_LEVEL_OF_METHOD = {"warn": "warning", "exception": "error"}


class _UtcStamp:
    """`level` and `timestamp` (ISO 8601, UTC, "Z") in one processor, as structlog's
    add_log_level and TimeStamper(fmt="iso", utc=True) write them, with the date and time
    to the second formatted once per second instead of once per line."""

    def __init__(self) -> None:
        # (second, its text) in one attribute: a thread that logs meanwhile reads both or
        # neither of a new pair, never one second's text under another's number.
        self._second: tuple[int, str] = (-1, "")

    def __call__(
        self, _logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event_dict["level"] = _LEVEL_OF_METHOD.get(method, method)
        now = time.time()
        second, prefix = self._second
        if int(now) != second:
            second = int(now)
            prefix = datetime.datetime.fromtimestamp(second, datetime.UTC).isoformat()[:19]
            self._second = (second, prefix)
        micro = int((now - second) * 1_000_000)
        # isoformat's own rule: no fraction when there is none.
        event_dict["timestamp"] = f"{prefix}.{micro:06d}Z" if micro else f"{prefix}Z"
        return event_dict


class StdoutLogger:
    """Writes each rendered line to whatever `sys.stdout` is at that moment.

    Looking stdout up per line (instead of holding the stream, as structlog's own loggers
    do) lets loggers be cached after first use, the fast path, and still follow a stream
    swapped later (test capture, the demo). One write per line keeps lines whole.

    The flush is not per line: inside the event loop, every line written during one
    iteration of it goes out with one flush at the start of the next (a write syscall
    per burst, not per line, and no line waits longer than that iteration). Outside a
    loop (start-up, threads), a line is flushed at once.
    """

    def __init__(self) -> None:
        self._unflushed: list[IO[Any]] = []  # streams written to since the last flush

    def msg(self, message: str | bytes) -> None:
        stream: IO[Any] = sys.stdout
        if isinstance(message, bytes):
            buffer = getattr(stream, "buffer", None)
            if buffer is not None:
                buffer.write(message + b"\n")
                self._flush_soon(buffer)
                return
            message = message.decode()
        stream.write(message + "\n")
        self._flush_soon(stream)

    def _flush_soon(self, stream: IO[Any]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread: nothing would flush it later
            stream.flush()
            return
        if stream in self._unflushed:
            return
        if not self._unflushed:
            loop.call_soon(self._flush)
        self._unflushed.append(stream)

    def _flush(self) -> None:
        streams, self._unflushed = self._unflushed, []
        for stream in streams:
            with contextlib.suppress(ValueError, OSError):  # closed meanwhile (a test's)
                stream.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def _stdout_logger(*_args: Any) -> StdoutLogger:
    return _STDOUT_LOGGER


_STDOUT_LOGGER = StdoutLogger()


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    """Configure structlog once for the process. `log_format`: json, console or auto.

    JSON lines are rendered by orjson straight to bytes. Loggers are cached on first use,
    so this must run before anything logs (as `worker run` and the demo do).
    """
    if log_format == "auto":
        log_format = "console" if sys.stdout.isatty() else "json"
    renderer: Any
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_bytes)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _UtcStamp(),
            structlog.processors.format_exc_info,
            redact_sensitive,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=_stdout_logger,
        cache_logger_on_first_use=True,
    )


def _orjson_bytes(obj: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    # default=str: a stray object (an exception, a path) is logged as text, never crashes.
    return orjson.dumps(obj, default=default or str)


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(component=name)
    return logger


# Request latency buckets: CDP answers in tens to hundreds of ms; timeouts at 10 s.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


# Every value of events_total's `outcome` label (DESIGN section 7).
OUTCOMES = (
    "delivered", "updated", "deleted", "duplicate", "stale", "changed_ignored",
    "dead_lettered", "reconciled",
)  # fmt: skip


class ByLabel:
    """The children of a metric with one label, each looked up once (`labels()` hashes
    and locks on every call: the hot path asks the same few values again and again)."""

    def __init__(self, metric: Counter) -> None:
        self._metric = metric
        self._children: dict[str, Counter] = {}

    def __getitem__(self, value: str) -> Counter:
        child = self._children.get(value)
        if child is None:
            child = self._children[value] = self._metric.labels(value)
        return child


class Metrics:
    """The Prometheus metrics of DESIGN section 7, in a registry of their own.

    A registry per worker (not the global one) keeps tests and embedded runs (the demo)
    independent. No label ever carries an orderRef or other high-cardinality value.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        p = "cdp_sync_"
        self.events_received = Counter(
            p + "events_received", "Messages taken from the source", registry=r
        )
        self.events = Counter(p + "events", "Events finished, by outcome", ["outcome"], registry=r)
        self.requests = Counter(
            p + "requests", "CDP requests, by HTTP status or error", ["status"], registry=r
        )
        self.request_duration = Histogram(
            p + "request_duration_seconds",
            "CDP request latency per attempt",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            p + "retries", "Retries scheduled, by reason", ["reason"], registry=r
        )
        self.in_flight = Gauge(p + "in_flight", "CDP requests in flight", registry=r)
        self.concurrency_limit = Gauge(
            p + "concurrency_limit", "Most CDP requests in flight", registry=r
        )
        self.rate_limit_wait = Counter(
            p + "rate_limit_wait_seconds", "Time spent waiting for the rate limit", registry=r
        )
        self.throttled = Counter(p + "throttled", "429 answers from CDP", registry=r)
        self.last_success = Gauge(
            p + "last_success_timestamp_seconds",
            "Unix time of the last created contact",
            registry=r,
        )
        self.auth_paused = Gauge(p + "auth_paused", "1 while paused on 401/403", registry=r)
        self.paused = Gauge(
            p + "paused",
            "1 while every CDP request is paused, by reason (auth, outage, rate_limit_backend)",
            ["reason"],
            registry=r,
        )
        self.source_lag = Gauge(
            p + "source_lag", "Messages waiting in the source (where it can tell)", registry=r
        )
        self.events_by_outcome = ByLabel(self.events)
        self.requests_by_status = ByLabel(self.requests)
        for outcome in OUTCOMES:
            self.events_by_outcome[outcome]  # export zeroes so rate() works from the start

    def mark_success(self) -> None:
        self.last_success.set(time.time())


class HealthServer:
    """`/metrics`, `/healthz` (alive) and `/readyz` (consuming) on an aiohttp server."""

    def __init__(
        self,
        metrics: Metrics,
        ready: Callable[[], tuple[bool, str]],
        port: int,
        host: str = "0.0.0.0",
    ) -> None:
        self._metrics = metrics
        self._ready = ready
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._serve_metrics)
        app.router.add_get("/healthz", self._serve_health)
        app.router.add_get("/readyz", self._serve_ready)
        return app

    async def _serve_metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _serve_health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _serve_ready(self, _request: web.Request) -> web.Response:
        ready, why = self._ready()
        return web.json_response(
            {"status": "ready" if ready else "not ready", "reason": why},
            status=200 if ready else 503,
        )

    async def open(self) -> None:
        self._runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        self.port = int(self._runner.addresses[0][1])  # the bound port when 0 was asked for

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
