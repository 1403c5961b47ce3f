"""A local, strict emulator of Sitecore CDP's order-contact REST API (DESIGN section 1).

Tests, `worker demo` and the benchmark talk to it over real HTTP, so it behaves like the
real service where the worker can tell the difference: HTTP Basic auth on every request,
strict validation of the documented body fields, CDP-shaped error bodies, and no
deduplication (a second POST for an order creates a second contact, exactly like CDP).
On top of that it has knobs for the faults the worker must survive (rate limit, latency,
5xx, a timeout or a dropped connection *after* the contact was created, 401/403, orders
that do not exist yet) and statistics that let a test prove "one contact per order" and
"never more than N requests in any second".

Knobs live in one mutable `EmulatorConfig`; every request reads it afresh, so changing an
attribute (or `PATCH /_emulator/config`) changes behaviour at once. The hot path is kept
small because the benchmark pushes thousands of requests per second through one process:
orjson for JSON, precompiled patterns, no access log, and statistics that are only
appended to per request and summarised when asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hmac
import os
import random
import re
import signal
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

__all__ = [
    "Emulator",
    "EmulatorConfig",
    "add_cli_arguments",
    "build_app",
    "run_from_args",
]

MAX_BODY_BYTES = 64 * 1024
MORE_INFO_URL = "https://doc.sitecore.com/cdp"
ADMIN_PREFIX = "/_emulator/"
# Seconds the runner waits for in-flight handlers on shutdown. Hanging handlers are woken
# by the `stopping` event first, so this only bounds pathological cases.
SHUTDOWN_TIMEOUT = 5.0

_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
UUID_RE = re.compile(_UUID)
# CDP's documented wire format for dates: milliseconds and a literal Z, nothing else
# ([0-9], not \d, which would also take non-ASCII digits).
DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")
COUNTRY_RE = re.compile(r"[A-Z]{2}")
GUEST_HREF_RE = re.compile(rf"https?://.+/guests/{_UUID}")

TITLES = frozenset(
    {
        "Br", "Brigadier", "Capt", "Colonel", "Dame", "Dr", "Elder", "Fr", "General", "Hon",
        "Judge", "Lord", "Master", "Miss", "Mr", "Mrs", "Ms", "Mstr", "Prof", "Rabbi", "Rev",
        "Shaikha", "Sheikh", "Sir", "Sister", "Sr",
    }
)  # fmt: skip
GENDERS = frozenset({"male", "female", "unknown"})
INJECTED_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
INJECTED_CODES = tuple(INJECTED_REASONS)


# --------------------------------------------------------------------------- config


@dataclass
class EmulatorConfig:
    """Every knob of the emulator. Mutable on purpose: it is read afresh on each request."""

    client_key: str = "emulator-key"
    api_token: str = "emulator-token"  # noqa: S105 (a public, documented test default)
    rate_limit: float = 0.0  # accepted API requests per sliding second; 0 = off
    latency: float = 0.0  # seconds added to every API answer
    latency_jitter: float = 0.0  # uniform +- seconds around `latency`
    error_rate: float = 0.0  # fraction of API requests answered 500/502/503
    timeout_after_create_rate: float = 0.0  # fraction of creating POSTs that then hang
    reset_after_create_rate: float = 0.0  # fraction of creating POSTs whose connection drops
    hang_seconds: float = 30.0  # how long a "timeout after create" POST hangs
    forbidden: bool = False  # valid credentials are answered 403
    auth_failure: bool = False  # every API request is answered 401
    not_found_for: float = 0.0  # an order 404s to POST this long after its first POST
    seed: int | None = None  # seed of the random choices (faults, jitter)

    def __post_init__(self) -> None:
        _check_config_values(dataclasses.asdict(self))

    def update(self, changes: Mapping[str, object]) -> None:
        """Apply several knobs at once, all or nothing (ValueError names the bad one)."""
        _check_config_values(changes)
        for name, value in changes.items():
            # JSON has no float/int distinction; keep the dataclass's declared kinds.
            setattr(self, name, float(value) if name in _FLOAT_KNOBS else value)  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_STR_KNOBS = frozenset({"client_key", "api_token"})
_BOOL_KNOBS = frozenset({"forbidden", "auth_failure"})
_RATE_KNOBS = frozenset({"error_rate", "timeout_after_create_rate", "reset_after_create_rate"})
_FLOAT_KNOBS = frozenset(
    {"rate_limit", "latency", "latency_jitter", "hang_seconds", "not_found_for"} | _RATE_KNOBS
)
_KNOBS = frozenset(f.name for f in fields(EmulatorConfig))


def _check_config_values(values: Mapping[str, object]) -> None:
    """Reject unknown knobs and wrong kinds up front, so a typo in a PATCH is loud."""
    for name, value in values.items():
        if name not in _KNOBS:
            raise ValueError(f"unknown emulator setting {name!r}")
        if name in _STR_KNOBS and not isinstance(value, str):
            raise ValueError(f"{name} must be a string")
        if name in _BOOL_KNOBS and not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false")
        if name == "seed" and not (value is None or _is_int(value)):
            raise ValueError("seed must be an integer or null")
        if name in _FLOAT_KNOBS:
            _check_number(name, value)


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0")  # `not >=` also catches NaN
    if name in _RATE_KNOBS and value > 1:
        raise ValueError(f"{name} must be a fraction between 0 and 1")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------- validation

Validator = Callable[[Any], str | None]


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) else "must be a string"


def _non_empty_string(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return "must be a non-empty string"
    return None


def _string_array(value: Any) -> str | None:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        return "must be an array of strings"
    return None


def _title(value: Any) -> str | None:
    if not isinstance(value, str) or value not in TITLES:
        return "must be one of " + ", ".join(sorted(TITLES))
    return None


def _gender(value: Any) -> str | None:
    if not isinstance(value, str) or value not in GENDERS:
        return "must be one of male, female, unknown"
    return None


def _date(value: Any) -> str | None:
    problem = "must be an ISO 8601 UTC date-time formatted YYYY-MM-DDTHH:MM:SS.sssZ"
    if not isinstance(value, str) or not DATE_RE.fullmatch(value):
        return problem
    try:
        datetime.fromisoformat(value[:-1])  # the pattern passes 2026-13-45; the calendar not
    except ValueError:
        return problem
    return None


def _country(value: Any) -> str | None:
    if not isinstance(value, str) or not COUNTRY_RE.fullmatch(value):
        return "must be an ISO 3166-1 alpha-2 code in upper case"
    return None


def _identifiers(value: Any) -> str | None:
    if not isinstance(value, list):
        return "must be an array of {provider, id, expiryDate} objects"
    for index, item in enumerate(value):
        problem = _identifier(item)
        if problem is not None:
            return f"[{index}].{problem}"
    return None


def _identifier(item: Any) -> str | None:
    if not isinstance(item, dict):
        return " must be an object"
    for name in item:
        if name not in ("provider", "id", "expiryDate"):
            return f"{name}: unknown field"
    for name in ("provider", "id"):
        if name not in item:
            return f"{name}: is required"
        problem = _non_empty_string(item[name])
        if problem is not None:
            return f"{name}: {problem}"
    if "expiryDate" in item:
        problem = _date(item["expiryDate"])
        if problem is not None:
            return f"expiryDate: {problem}"
    return None


def _guest(value: Any) -> str | None:
    if not isinstance(value, dict) or set(value) != {"href"}:
        return 'must be an object with exactly one field, "href"'
    href = value["href"]
    if not isinstance(href, str) or not GUEST_HREF_RE.fullmatch(href):
        return "href must be a URL ending in /guests/{guestRef UUID}"
    return None


V2_FIELDS: dict[str, Validator] = {
    "title": _title,
    "firstName": _non_empty_string,
    "lastName": _non_empty_string,
    "gender": _gender,
    "dateOfBirth": _date,
    "emails": _string_array,
    "phoneNumbers": _string_array,
    "nationality": _string,
    "country": _country,
    "passportNumber": _string,
    "passportExpiry": _date,
    "identifiers": _identifiers,
    "guest": _guest,
}
V21_FIELDS: dict[str, Validator] = {
    **V2_FIELDS,
    "street": _string_array,
    "city": _string,
    "state": _string,
}
FIELDS_BY_VERSION = {"v2": V2_FIELDS, "v2.1": V21_FIELDS}
REQUIRED_FIELDS = ("firstName", "lastName")


def validate_contact(body: dict[str, Any], version: str) -> str | None:
    """Return why `body` is not a valid contact for `version`, or None if it is.

    The message names the field but never quotes its value: values are personal data and
    the worker keeps CDP's message in its dead letters.
    """
    validators = FIELDS_BY_VERSION[version]
    for name, value in body.items():
        validator = validators.get(name)
        if validator is None:
            return f"{name}: unknown field for the {version} order contact"
        problem = validator(value)
        if problem is not None:
            return f"{name}: {problem}"
    for name in REQUIRED_FIELDS:
        if name not in body:
            return f"{name}: is required"
    return None


# --------------------------------------------------------------------------- state


def _peak_in_window(times: Sequence[float], window: float = 1.0) -> int:
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


def _iso_now() -> str:
    """Now as CDP writes timestamps: UTC, milliseconds, Z."""
    now = time.time()
    millis = int(now * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{millis:03d}Z"


class _State:
    """Contacts, statistics and the rate-limit window of one emulator app."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.stopping = asyncio.Event()  # set on shutdown: wakes handlers that hang
        self._rng = random.Random(config.seed)
        self._rng_seed = config.seed
        self._auth_for: tuple[str, str] | None = None
        self._auth_expected = b""
        self.reset()

    def reset(self) -> None:
        self.contacts: dict[str, dict[str, Any]] = {}
        self.by_order: dict[str, list[str]] = {}
        self.first_post_at: dict[str, float] = {}
        self.requests: Counter[str] = Counter()
        self.responses: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        # Arrival times of every request that reached the limiter, and of those it admitted;
        # appended in event-loop order, so already sorted for the sweep in `stats`.
        self.arrivals: list[float] = []
        self.admitted: list[float] = []
        self.window: deque[float] = deque()
        self.first_request_at: float | None = None
        self.last_request_at: float | None = None

    @property
    def rng(self) -> random.Random:
        """The random source, reseeded whenever the `seed` knob changes."""
        if self.config.seed != self._rng_seed:
            self._rng_seed = self.config.seed
            self._rng = random.Random(self._rng_seed)
        return self._rng

    def chance(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    def note_request(self, method: str, now: float) -> None:
        self.requests[method] += 1
        if self.first_request_at is None:
            self.first_request_at = now
        self.last_request_at = now

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

    def order_not_found_yet(self, order_key: str, now: float) -> bool:
        first = self.first_post_at.setdefault(order_key, now)
        grace = self.config.not_found_for
        return grace > 0 and now - first < grace

    def create(self, order_key: str, contact: dict[str, Any]) -> None:
        self.contacts[contact["ref"]] = contact
        self.by_order.setdefault(order_key, []).append(contact["ref"])

    def contacts_of(self, order_key: str) -> list[dict[str, Any]]:
        return [self.contacts[ref] for ref in self.by_order.get(order_key, ())]

    def stats(self) -> dict[str, Any]:
        per_order = {order: len(refs) for order, refs in self.by_order.items()}
        first, last = self.first_request_at, self.last_request_at
        return {
            "requests": dict(self.requests),
            "responses": dict(self.responses),
            "faults": dict(self.faults),
            "contacts": len(self.contacts),
            "orders": len(per_order),
            "duplicate_orders": sum(1 for count in per_order.values() if count > 1),
            "contacts_per_order": per_order,
            "max_posts_in_any_second": _peak_in_window(self.arrivals),
            "accepted_per_second_peak": _peak_in_window(self.admitted),
            "first_request_at": first,
            "last_request_at": last,
            "duration_seconds": last - first if first is not None and last is not None else 0.0,
        }


STATE_KEY = web.AppKey("cdp_emulator_state", _State)


class _Dropped(web.Response):
    """Returned after aborting the connection on purpose: aiohttp's write to the closed
    transport fails quietly, and the middleware does not count it as an answer."""


# --------------------------------------------------------------------------- responses


def _json(payload: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


def _error(
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
    response = _json(body, status)
    if headers:
        response.headers.update(headers)
    return response


def _base(request: web.Request) -> str:
    """scheme://host:port as the client addressed us, so hrefs point back here."""
    return f"{request.scheme}://{request.host}"


def _contact_href(base: str, version: str, ref: str) -> str:
    return f"{base}/{version}/orderContacts/{ref}"


def _order_href(base: str, version: str, order_ref: str) -> str:
    return f"{base}/{version}/orders/{order_ref}"


# --------------------------------------------------------------------------- API


async def _pause(state: _State, seconds: float) -> None:
    """Sleep, but wake at once when the app shuts down (so tests never wait for a hang)."""
    if seconds <= 0 or state.stopping.is_set():
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await state.stopping.wait()


async def _gate(request: web.Request, state: _State) -> web.Response | None:
    """Auth, rate limit, latency and injected 5xx: what every API request goes through."""
    now = time.monotonic()
    state.note_request(request.method, now)
    config = state.config
    refusal: web.Response | None = None
    status = state.auth_status(request.headers.get("Authorization"))
    if status == 401:
        refusal = _error(
            401,
            "Unauthorized",
            "HTTP Basic authentication with a valid client key and API token is required",
            {"WWW-Authenticate": 'Basic realm="Sitecore CDP"'},
        )
    elif status == 403:
        refusal = _error(403, "Forbidden", "These credentials may not use this API")
    elif not state.admit(now):
        refusal = _error(
            429, "Too Many Requests", "Rate limit exceeded; retry later", {"Retry-After": "1"}
        )
    elif state.chance(config.error_rate):
        state.faults["error"] += 1
        code = state.rng.choice(INJECTED_CODES)
        refusal = _error(code, INJECTED_REASONS[code], "Injected fault: try again")
    delay = config.latency
    if config.latency_jitter > 0:
        delay += state.rng.uniform(-config.latency_jitter, config.latency_jitter)
    await _pause(state, delay)
    return refusal


@web.middleware
async def _api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Gate API requests, turn aiohttp's own errors into CDP bodies, count statuses."""
    if request.path.startswith(ADMIN_PREFIX):
        return await _admin_errors(request, handler)
    state = request.app[STATE_KEY]
    response: web.StreamResponse | None = await _gate(request, state)
    if response is None:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            # Unknown paths or versions (404), wrong methods (405), bodies over the limit.
            extra = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            response = _error(exc.status, exc.reason, exc.text or exc.reason, extra)
    if not isinstance(response, _Dropped):
        state.responses[str(response.status)] += 1
    return response


async def _admin_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        return _error(exc.status, exc.reason, exc.text or exc.reason)


def _checked_order_ref(request: web.Request) -> tuple[str, str, web.Response | None]:
    """(version, orderRef, error): orderRef must be a hyphenated UUID, any case."""
    version = request.match_info["version"]
    order_ref = request.match_info["orderRef"]
    if not UUID_RE.fullmatch(order_ref):
        return version, order_ref, _error(400, "orderRef: must be a UUID")
    return version, order_ref, None


async def _read_contact(request: web.Request, version: str) -> dict[str, Any] | web.Response:
    """The validated body, or the CDP error answering it (415, 413 or 400)."""
    if request.content_type != "application/json":
        return _error(415, "Content-Type must be application/json")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        return _error(413, f"The body may not exceed {MAX_BODY_BYTES} bytes")
    raw = await request.read()  # raises 413 (client_max_size) for chunked bodies too
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _error(400, "The body is not valid JSON")
    if not isinstance(body, dict):
        return _error(400, "The body must be a JSON object")
    problem = validate_contact(body, version)
    if problem is not None:
        # The message carries the field: the worker keeps CDP's message in dead letters.
        return _error(400, problem, f"Invalid {version} order contact: {problem}")
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
    if state.order_not_found_yet(order_key, now):
        state.faults["not_found"] += 1
        return _error(404, "Not Found", "No order with this orderRef")
    contact = _new_contact(_base(request), version, order_ref, body)
    state.create(order_key, contact)
    return await _answer_created(request, state, contact)


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


async def _answer_created(
    request: web.Request, state: _State, contact: dict[str, Any]
) -> web.StreamResponse:
    """201, unless a fault knob drops the connection or hangs *after* the contact exists."""
    config = state.config
    if state.chance(config.reset_after_create_rate):
        state.faults["reset_after_create"] += 1
        if request.transport is not None:
            request.transport.abort()
        return _Dropped(status=201)
    if state.chance(config.timeout_after_create_rate):
        state.faults["timeout_after_create"] += 1
        await _pause(state, config.hang_seconds)
    return _json(contact, 201)


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
    return _json({"href": href, "offset": 0, "limit": 10, "items": items})


async def _get_contact(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    version = request.match_info["version"]
    contact = state.contacts.get(request.match_info["contactRef"].lower())
    if contact is None:
        return _error(404, "Not Found", "No order contact with this ref")
    base = _base(request)
    # Rendered for the asking request: same base and version as it used.
    order_ref = contact["order"]["href"].rsplit("/", 1)[-1]
    shown = {
        **contact,
        "href": _contact_href(base, version, contact["ref"]),
        "order": {"href": _order_href(base, version, order_ref)},
    }
    return _json(shown)


# --------------------------------------------------------------------------- admin


async def _admin_stats(request: web.Request) -> web.StreamResponse:
    return _json(request.app[STATE_KEY].stats())


async def _admin_reset(request: web.Request) -> web.StreamResponse:
    request.app[STATE_KEY].reset()
    return _json({"reset": True})


async def _admin_get_config(request: web.Request) -> web.StreamResponse:
    return _json(request.app[STATE_KEY].config.as_dict())


async def _admin_patch_config(request: web.Request) -> web.StreamResponse:
    config = request.app[STATE_KEY].config
    try:
        changes = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "The body is not valid JSON")
    if not isinstance(changes, dict):
        return _error(400, "The body must be a JSON object of settings")
    try:
        config.update(changes)
    except ValueError as exc:
        return _error(400, str(exc))
    return _json(config.as_dict())


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
        state.stopping.set()

    app.on_shutdown.append(wake_hanging_handlers)
    return app


# --------------------------------------------------------------------------- server


class Emulator:
    """Runs the emulator on a free local port for the duration of an `async with`."""

    def __init__(
        self, config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.host = host
        self.port = port
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
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self._url = f"http://{_url_host(self.host)}:{self.port}"

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


# --------------------------------------------------------------------------- CLI


def _fraction(text: str) -> float:
    value = _non_negative(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction between 0 and 1")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return value


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `worker emulator`; each defaults to its EMULATOR_<NAME> environment variable.

    String defaults go through argparse's `type`, so a bad environment value is reported
    like a bad flag, and only when the emulator command is the one being parsed.
    """

    def option(flag: str, kind: Callable[[str], Any], default: str | None, text: str) -> None:
        env = "EMULATOR_" + flag.removeprefix("--").replace("-", "_").upper()
        parser.add_argument(
            flag, type=kind, default=os.environ.get(env, default), help=f"{text} (env {env})"
        )

    option("--host", str, "127.0.0.1", "interface to listen on")
    option("--port", _port, "8080", "port to listen on; 0 picks a free one")
    option("--rate-limit", _non_negative, "0", "accepted requests per second; 0 = no limit")
    option("--latency", _non_negative, "0", "seconds added to every answer")
    option("--latency-jitter", _non_negative, "0", "uniform +- seconds around --latency")
    option("--error-rate", _fraction, "0", "fraction of requests answered 500/502/503")
    option("--timeout-after-create", _fraction, "0", "fraction of POSTs that hang after creating")
    option("--reset-after-create", _fraction, "0", "fraction of POSTs dropped after creating")
    option("--hang-seconds", _non_negative, "30", "how long a hanging POST hangs")
    option("--not-found-for", _non_negative, "0", "seconds an order 404s after its first POST")
    option("--client-key", str, "emulator-key", "HTTP Basic user (client key)")
    option("--api-token", str, "emulator-token", "HTTP Basic password (API token)")
    option("--seed", _seed, None, "seed of the random fault choices")
    for flag, text in (
        ("--forbidden", "answer 403 to valid credentials"),
        ("--auth-failure", "answer 401 to every API request"),
    ):
        env = "EMULATOR_" + flag.removeprefix("--").replace("-", "_").upper()
        parser.add_argument(
            flag,
            type=_boolean,
            nargs="?",
            const=True,
            default=os.environ.get(env, "false"),
            help=f"{text} (env {env})",
        )


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """The EmulatorConfig described by parsed `add_cli_arguments` flags."""
    return EmulatorConfig(
        client_key=args.client_key,
        api_token=args.api_token,
        rate_limit=args.rate_limit,
        latency=args.latency,
        latency_jitter=args.latency_jitter,
        error_rate=args.error_rate,
        timeout_after_create_rate=args.timeout_after_create,
        reset_after_create_rate=args.reset_after_create,
        hang_seconds=args.hang_seconds,
        forbidden=args.forbidden,
        auth_failure=args.auth_failure,
        not_found_for=args.not_found_for,
        seed=args.seed,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT. Prints one JSON line with the URL once listening."""
    config = config_from_args(args)
    try:
        asyncio.run(_serve(config, args.host, args.port))
    except OSError as exc:  # typically the port is taken
        message = {"event": "emulator.failed", "error": f"{type(exc).__name__}: {exc}"}
        sys.stderr.write(orjson.dumps(message).decode() + "\n")
        return 1
    return 0


async def _serve(config: EmulatorConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        async with Emulator(config, host, port) as emulator:
            started = {
                "event": "emulator.started",
                "url": emulator.url,
                "host": host,
                "port": emulator.port,
            }
            sys.stdout.write(orjson.dumps(started).decode() + "\n")
            sys.stdout.flush()
            await stop.wait()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
