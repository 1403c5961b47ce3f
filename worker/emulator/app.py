"""The emulator's HTTP application: CDP's order-contact routes, the admin routes, and
`Emulator`, which serves it on a local port for tests, the demo and the benchmark.

What it stores is what CDP would: contacts by ref and by order, with no deduplication
(a second POST for an order creates a second contact, exactly like CDP). Statistics are
only appended to per request and summarised when asked for (`GET /_emulator/stats`),
since the benchmark pushes thousands of requests per second through one process.
"""

from __future__ import annotations

import ssl
import time
import uuid
from collections import Counter
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from .config import EmulatorConfig
from .faults import Dropped, Faults, error_response, json_response
from .validation import UUID_RE, validate_contact

MAX_BODY_BYTES = 64 * 1024
ADMIN_PREFIX = "/_emulator/"
# Seconds the runner waits for in-flight handlers on shutdown. Hanging handlers are woken
# by the `stopping` event first, so this only bounds pathological cases.
SHUTDOWN_TIMEOUT = 5.0


def _iso_now() -> str:
    """Now as CDP writes timestamps: UTC, milliseconds, Z."""
    now = time.time()
    millis = int(now * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{millis:03d}Z"


class _State:
    """Contacts and statistics of one emulator app, and its faults."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.faults = Faults(config)
        self.reset()

    @property
    def config(self) -> EmulatorConfig:
        return self.faults.config

    @config.setter
    def config(self, config: EmulatorConfig) -> None:
        self.faults.config = config

    def reset(self) -> None:
        self.contacts: dict[str, dict[str, Any]] = {}
        self.by_order: dict[str, list[str]] = {}
        self.requests: Counter[str] = Counter()
        self.responses: Counter[str] = Counter()
        self.first_request_at: float | None = None
        self.last_request_at: float | None = None
        self.faults.reset()

    def note_request(self, method: str, now: float) -> None:
        self.requests[method] += 1
        if self.first_request_at is None:
            self.first_request_at = now
        self.last_request_at = now

    def create(self, order_key: str, contact: dict[str, Any]) -> None:
        self.contacts[contact["ref"]] = contact
        self.by_order.setdefault(order_key, []).append(contact["ref"])

    def contacts_of(self, order_key: str) -> list[dict[str, Any]]:
        return [self.contacts[ref] for ref in self.by_order.get(order_key, ())]

    def stats(self) -> dict[str, Any]:
        per_order = {order: len(refs) for order, refs in self.by_order.items()}
        first, last = self.first_request_at, self.last_request_at
        faults = self.faults.stats()
        return {
            "requests": dict(self.requests),
            "responses": dict(self.responses),
            "faults": faults["faults"],
            "contacts": len(self.contacts),
            "orders": len(per_order),
            "duplicate_orders": sum(1 for count in per_order.values() if count > 1),
            "contacts_per_order": per_order,
            "max_posts_in_any_second": faults["max_posts_in_any_second"],
            "accepted_per_second_peak": faults["accepted_per_second_peak"],
            "first_request_at": first,
            "last_request_at": last,
            "duration_seconds": last - first if first is not None and last is not None else 0.0,
        }


STATE_KEY = web.AppKey("cdp_emulator_state", _State)


def _base(request: web.Request) -> str:
    """scheme://host:port as the client addressed us, so hrefs point back here."""
    return f"{request.scheme}://{request.host}"


def _contact_href(base: str, version: str, ref: str) -> str:
    return f"{base}/{version}/orderContacts/{ref}"


def _order_href(base: str, version: str, order_ref: str) -> str:
    return f"{base}/{version}/orders/{order_ref}"


# --------------------------------------------------------------------------- API


@web.middleware
async def _api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Pass API requests through the faults, turn aiohttp's own errors into CDP bodies,
    count statuses."""
    if request.path.startswith(ADMIN_PREFIX):
        return await _admin_errors(request, handler)
    state = request.app[STATE_KEY]
    now = time.monotonic()
    state.note_request(request.method, now)
    response: web.StreamResponse | None = await state.faults.refusal(request, now)
    if response is None:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            # Unknown paths or versions (404), wrong methods (405), bodies over the limit.
            extra = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            response = error_response(exc.status, exc.reason, exc.text or exc.reason, extra)
    if not isinstance(response, Dropped):
        state.responses[str(response.status)] += 1
    return response


async def _admin_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        return error_response(exc.status, exc.reason, exc.text or exc.reason)


def _checked_order_ref(request: web.Request) -> tuple[str, str, web.Response | None]:
    """(version, orderRef, error): orderRef must be a hyphenated UUID, any case."""
    version = request.match_info["version"]
    order_ref = request.match_info["orderRef"]
    if not UUID_RE.fullmatch(order_ref):
        return version, order_ref, error_response(400, "orderRef: must be a UUID")
    return version, order_ref, None


async def _read_contact(request: web.Request, version: str) -> dict[str, Any] | web.Response:
    """The validated body, or the CDP error answering it (415, 413 or 400)."""
    if request.content_type != "application/json":
        return error_response(415, "Content-Type must be application/json")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        return error_response(413, f"The body may not exceed {MAX_BODY_BYTES} bytes")
    raw = await request.read()  # raises 413 (client_max_size) for chunked bodies too
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return error_response(400, "The body is not valid JSON")
    if not isinstance(body, dict):
        return error_response(400, "The body must be a JSON object")
    problem = validate_contact(body, version)
    if problem is not None:
        # The message carries the field: the worker keeps CDP's message in dead letters.
        return error_response(400, problem, f"Invalid {version} order contact: {problem}")
    return body


async def _post_contacts(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    version, order_ref, error = _checked_order_ref(request)
    if error is not None:
        return error
    order_key = order_ref.lower()
    now = time.monotonic()
    body = await _read_contact(request, version)
    if isinstance(body, web.Response):
        return body
    if state.faults.order_not_found_yet(order_key, now):
        return error_response(404, "Not Found", "No order with this orderRef")
    if state.faults.fails_always(order_key):
        return error_response(500, "Internal Server Error", "Injected fault for this order")
    contact = _new_contact(_base(request), version, order_ref, body)
    state.create(order_key, contact)
    return await state.faults.after_create(request, contact)


def _new_contact(base: str, version: str, order_ref: str, body: dict[str, Any]) -> dict[str, Any]:
    ref = str(uuid.uuid4())
    stamp = _iso_now()
    return {
        "href": _contact_href(base, version, ref),
        "ref": ref,
        "createdAt": stamp,
        "modifiedAt": stamp,
        **body,
        "order": {"href": _order_href(base, version, order_ref)},
    }


async def _list_contacts(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    version, order_ref, error = _checked_order_ref(request)
    if error is not None:
        return error
    base = _base(request)
    items: list[dict[str, str]] = []
    for contact in state.contacts_of(order_ref.lower()):
        item = {"href": _contact_href(base, version, contact["ref"])}
        if version == "v2.1":
            item["ref"] = contact["ref"]
        items.append(item)
    href = _order_href(base, version, order_ref) + "/contacts"
    return json_response({"href": href, "offset": 0, "limit": 10, "items": items})


async def _get_contact(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    version = request.match_info["version"]
    contact = state.contacts.get(request.match_info["contactRef"].lower())
    if contact is None:
        return error_response(404, "Not Found", "No order contact with this ref")
    base = _base(request)
    # Rendered for the asking request: same base and version as it used.
    order_ref = contact["order"]["href"].rsplit("/", 1)[-1]
    shown = {
        **contact,
        "href": _contact_href(base, version, contact["ref"]),
        "order": {"href": _order_href(base, version, order_ref)},
    }
    return json_response(shown)


# --------------------------------------------------------------------------- admin


async def _admin_stats(request: web.Request) -> web.StreamResponse:
    return json_response(request.app[STATE_KEY].stats())


async def _admin_reset(request: web.Request) -> web.StreamResponse:
    request.app[STATE_KEY].reset()
    return json_response({"reset": True})


async def _admin_get_config(request: web.Request) -> web.StreamResponse:
    return json_response(request.app[STATE_KEY].config.as_dict())


async def _admin_patch_config(request: web.Request) -> web.StreamResponse:
    config = request.app[STATE_KEY].config
    try:
        changes = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return error_response(400, "The body is not valid JSON")
    if not isinstance(changes, dict):
        return error_response(400, "The body must be a JSON object of settings")
    try:
        config.update(changes)
    except ValueError as exc:
        return error_response(400, str(exc))
    return json_response(config.as_dict())


def build_app(config: EmulatorConfig | None = None) -> web.Application:
    """The emulator as an aiohttp application; `config` stays live (shared, not copied)."""
    state = _State(config if config is not None else EmulatorConfig())
    # One byte over the limit so our own 413 (with a CDP body) answers before aiohttp's.
    app = web.Application(middlewares=[_api_middleware], client_max_size=MAX_BODY_BYTES + 1)
    app[STATE_KEY] = state
    version = r"{version:v2(?:\.1)?}"
    app.router.add_post(f"/{version}/orders/{{orderRef}}/contacts", _post_contacts)
    app.router.add_get(f"/{version}/orders/{{orderRef}}/contacts", _list_contacts)
    app.router.add_get(f"/{version}/orderContacts/{{contactRef}}", _get_contact)
    app.router.add_get(ADMIN_PREFIX + "stats", _admin_stats)
    app.router.add_post(ADMIN_PREFIX + "reset", _admin_reset)
    app.router.add_get(ADMIN_PREFIX + "config", _admin_get_config)
    app.router.add_patch(ADMIN_PREFIX + "config", _admin_patch_config)

    async def wake_hanging_handlers(_app: web.Application) -> None:
        state.faults.stopping.set()

    app.on_shutdown.append(wake_hanging_handlers)
    return app


# --------------------------------------------------------------------------- server


class Emulator:
    """Runs the emulator on a free local port for the duration of an `async with`.

    With `tls` (an SSL context holding a certificate) it serves HTTPS, as CDP does.
    """

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._tls = tls
        self._app = build_app(config if config is not None else EmulatorConfig())
        self._state = self._app[STATE_KEY]
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port, ssl_context=self._tls).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        scheme = "https" if self._tls else "http"
        self._url = f"{scheme}://{_url_host(self.host)}:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    @property
    def config(self) -> EmulatorConfig:
        """The live knobs: changing an attribute changes the very next request's fate."""
        return self._state.config

    @config.setter
    def config(self, config: EmulatorConfig) -> None:
        self._state.config = config

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:54321 (no trailing slash)."""
        if self._url is None:
            raise RuntimeError("the emulator is not running")
        return self._url

    def stats(self) -> dict[str, Any]:
        """Same as GET /_emulator/stats, without HTTP."""
        return self._state.stats()

    def contacts_for(self, order_ref: str) -> list[dict[str, Any]]:
        """Copies of the contacts created for an order, oldest first."""
        return [dict(contact) for contact in self._state.contacts_of(order_ref.lower())]

    def reset(self) -> None:
        """Same as POST /_emulator/reset: forget contacts and statistics, keep the config."""
        self._state.reset()


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
