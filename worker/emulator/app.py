"""The emulator's HTTP application: CDP's order-contact routes, the admin routes, and
`Emulator`, which serves it on a local port for tests, the demo and the benchmark.

Routes (DESIGN section 1), under both `/v2/` and `/v2.1/` unless said otherwise:

- `POST /{v}/orders/{orderRef}/contacts` creates a contact (201);
- `GET /{v}/orders/{orderRef}/contacts` lists the order's live contacts;
- `GET /{v}/orderContacts/{ref}` returns one (404 once deleted);
- `POST /v2/orderContacts/{ref}`, `PUT /v2.1/orderContacts/{ref}` replace it with the body
  (200), `PATCH /v2.1/orderContacts/{ref}` replaces only the fields given; the other
  version's method is 405;
- `DELETE /{v}/orderContacts/{ref}` removes it (204, then 404).

What it stores is what CDP would: live contacts by ref and by order, with no
deduplication (a second POST for an order creates a second contact, exactly like CDP).
Statistics are only appended to per request and summarised when asked for
(`GET /_emulator/stats`), since the benchmark pushes thousands of requests per second
through one process.
"""

from __future__ import annotations

import re
import ssl
import time
import uuid
from collections import Counter
from dataclasses import dataclass
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


# What the middleware counts requests and answers by (`requests_by_kind`); "other" is a
# request no route takes (unknown path or version, or a method the version lacks: 404/405).
REQUEST_KINDS = ("create", "update", "delete", "list", "get")
# Fields of a stored contact that are CDP's, not the body's: a write never takes them
# from the client, and a PATCH keeps the body's other fields.
RESOURCE_FIELDS = frozenset({"href", "ref", "createdAt", "modifiedAt", "order"})


@dataclass(slots=True)
class _OrderWrites:
    """How often each kind of write succeeded for one order (answered or not)."""

    creates: int = 0
    updates: int = 0
    deletes: int = 0


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
        # Live contacts only: a delete removes a contact from all three.
        self.contacts: dict[str, dict[str, Any]] = {}
        self.order_of: dict[str, str] = {}  # contactRef -> order key (orderRef, lower case)
        # order key -> its live contactRefs, oldest first (a dict as an ordered set, so a
        # delete is O(1)); an order whose last contact is deleted leaves it.
        self.by_order: dict[str, dict[str, None]] = {}
        self.writes: dict[str, _OrderWrites] = {}  # every order ever written to
        self.requests: Counter[str] = Counter()
        self.responses: Counter[str] = Counter()
        self.requests_by_kind: Counter[str] = Counter()
        self.responses_by_kind: dict[str, Counter[str]] = {}
        self.first_request_at: float | None = None
        self.last_request_at: float | None = None
        self.faults.reset()

    def note_request(self, method: str, kind: str, now: float) -> None:
        self.requests[method] += 1
        self.requests_by_kind[kind] += 1
        if self.first_request_at is None:
            self.first_request_at = now
        self.last_request_at = now

    def note_response(self, kind: str, status: int) -> None:
        code = str(status)
        self.responses[code] += 1
        by_status = self.responses_by_kind.get(kind)
        if by_status is None:
            by_status = self.responses_by_kind[kind] = Counter()
        by_status[code] += 1

    def _writes_of(self, order_key: str) -> _OrderWrites:
        writes = self.writes.get(order_key)
        if writes is None:
            writes = self.writes[order_key] = _OrderWrites()
        return writes

    def create(self, order_key: str, contact: dict[str, Any]) -> None:
        ref = contact["ref"]
        self.contacts[ref] = contact
        self.order_of[ref] = order_key
        self.by_order.setdefault(order_key, {})[ref] = None
        self._writes_of(order_key).creates += 1

    def replace(self, contact: dict[str, Any]) -> None:
        """Store the updated `contact` in place of the live one with its ref."""
        ref = contact["ref"]
        self.contacts[ref] = contact
        self._writes_of(self.order_of[ref]).updates += 1

    def delete(self, ref: str) -> None:
        """Remove a live contact: from GETs, updates and its order's listing."""
        del self.contacts[ref]
        order_key = self.order_of.pop(ref)
        live = self.by_order[order_key]
        del live[ref]
        if not live:
            del self.by_order[order_key]
        self._writes_of(order_key).deletes += 1

    def contacts_of(self, order_key: str) -> list[dict[str, Any]]:
        """The order's live contacts, oldest first (the stored dicts themselves)."""
        contacts = self.contacts
        return [contacts[ref] for ref in self.by_order.get(order_key, ())]

    def progress(self) -> dict[str, Any]:
        """What `GET /_emulator/progress` answers: the counts of `stats` that cost nothing
        to read (`contacts`, `orders`, `requests`, `responses`, the first and last
        request's times and `duration_seconds`), for a poller waiting for a run to end.
        `stats` builds per-order tables as large as the run: asked every 200 ms during a
        benchmark, it paused the emulator for 20-30 ms each time."""
        first, last = self.first_request_at, self.last_request_at
        return {
            "contacts": len(self.contacts),
            "orders": len(self.by_order),  # an order leaves it with its last live contact
            "requests": dict(self.requests),
            "responses": dict(self.responses),
            "first_request_at": first,
            "last_request_at": last,
            "duration_seconds": last - first if first is not None and last is not None else 0.0,
        }

    def stats(self) -> dict[str, Any]:
        """The summary `GET /_emulator/stats` answers. Contacts are counted live (deleted
        ones are gone): `contacts`, `orders` (orders holding a live contact),
        `contacts_per_order` ({order: live count}, orders without one left out),
        `duplicate_orders` (more than one live). `per_order` is every order ever written
        to: {order: {"live": [contactRef, ...], "creates", "updates", "deletes"}}, with
        totals `creates`, `updates`, `deletes` (writes applied, answered or not).
        `requests` counts API requests by method, `requests_by_kind` by kind
        (create/update/delete/list/get, and "other" for those no route takes);
        `responses` counts answers by status, `responses_by_kind` {kind: {status: n}}."""
        by_order = self.by_order
        live = {order: len(refs) for order, refs in by_order.items()}
        per_order: dict[str, dict[str, Any]] = {}
        creates = updates = deletes = 0
        for order, writes in self.writes.items():
            per_order[order] = {
                "live": list(by_order.get(order, ())),
                "creates": writes.creates,
                "updates": writes.updates,
                "deletes": writes.deletes,
            }
            creates += writes.creates
            updates += writes.updates
            deletes += writes.deletes
        counts = self.progress()
        faults = self.faults.stats()
        by_kind = self.requests_by_kind
        responses_by_kind = self.responses_by_kind
        kinds = REQUEST_KINDS + tuple(kind for kind in by_kind if kind not in REQUEST_KINDS)
        return {
            "requests": counts["requests"],
            "requests_by_kind": {kind: by_kind[kind] for kind in kinds},
            "responses": counts["responses"],
            "responses_by_kind": {kind: dict(responses_by_kind.get(kind, ())) for kind in kinds},
            "faults": faults["faults"],
            "contacts": counts["contacts"],
            "orders": counts["orders"],
            "duplicate_orders": sum(1 for count in live.values() if count > 1),
            "contacts_per_order": live,
            "per_order": per_order,
            "creates": creates,
            "updates": updates,
            "deletes": deletes,
            "max_posts_in_any_second": faults["max_posts_in_any_second"],
            "accepted_per_second_peak": faults["accepted_per_second_peak"],
            "first_request_at": counts["first_request_at"],
            "last_request_at": counts["last_request_at"],
            "duration_seconds": counts["duration_seconds"],
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
    kind = _KIND_OF_HANDLER.get(request.match_info.handler, "other")
    state.note_request(request.method, kind, now)
    response: web.StreamResponse | None = await state.faults.refusal(request, now)
    if response is None:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            # Unknown paths or versions (404), wrong methods (405), bodies over the limit.
            extra = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            response = error_response(exc.status, exc.reason, exc.text or exc.reason, extra)
    if not isinstance(response, Dropped):
        state.note_response(kind, response.status)
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


async def _read_contact(
    request: web.Request, version: str, *, partial: bool = False
) -> dict[str, Any] | web.Response:
    """The validated body, or the CDP error answering it (415, 413 or 400); `partial` for
    a PATCH, whose fields are each checked but none is required."""
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
    problem = validate_contact(body, version, partial=partial)
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
    stamp = _iso_now()
    contact = _contact(_base(request), version, str(uuid.uuid4()), stamp, stamp, order_ref, body)
    state.create(order_key, contact)
    return await state.faults.after_write(request, "create", json_response(contact, 201))


def _contact(
    base: str,
    version: str,
    ref: str,
    created_at: str,
    modified_at: str,
    order_ref: str,
    body: dict[str, Any],
) -> dict[str, Any]:
    """The resource as CDP answers it: its links and timestamps around the body's fields
    (the body's `guest` is kept as sent; validation let no other link in)."""
    return {
        "href": _contact_href(base, version, ref),
        "ref": ref,
        "createdAt": created_at,
        "modifiedAt": modified_at,
        **body,
        "order": {"href": _order_href(base, version, order_ref)},
    }


def _order_ref_of(contact: dict[str, Any]) -> str:
    """The orderRef as its creating POST spelled it (the end of the order's href)."""
    href: str = contact["order"]["href"]
    return href.rsplit("/", 1)[-1]


def _live_contact(request: web.Request) -> dict[str, Any] | None:
    """The live contact the path's `{contactRef}` names (any case), or None."""
    return request.app[STATE_KEY].contacts.get(request.match_info["contactRef"].lower())


def _contact_not_found() -> web.Response:
    return error_response(404, "Not Found", "No order contact with this ref")


async def _update_contact(request: web.Request) -> web.StreamResponse:
    """v2 `POST`, v2.1 `PUT /orderContacts/{ref}`: the body replaces the whole resource."""
    return await _write_contact(request, partial=False)


async def _patch_contact(request: web.Request) -> web.StreamResponse:
    """v2.1 `PATCH /orderContacts/{ref}`: only the fields given are replaced."""
    return await _write_contact(request, partial=True)


async def _write_contact(request: web.Request, *, partial: bool) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    version = request.match_info["version"]
    if _live_contact(request) is None:
        return _contact_not_found()
    body = await _read_contact(request, version, partial=partial)
    if isinstance(body, web.Response):
        return body
    current = _live_contact(request)  # again: a DELETE may have won while the body came
    if current is None:
        return _contact_not_found()
    ref = current["ref"]
    if state.faults.fails_always(state.order_of[ref]):
        return error_response(500, "Internal Server Error", "Injected fault for this order")
    if partial:
        kept = {name: value for name, value in current.items() if name not in RESOURCE_FIELDS}
        body = {**kept, **body}
    contact = _contact(
        _base(request),
        version,
        ref,
        current["createdAt"],
        _iso_now(),
        _order_ref_of(current),
        body,
    )
    state.replace(contact)
    return await state.faults.after_write(request, "update", json_response(contact))


async def _delete_contact(request: web.Request) -> web.StreamResponse:
    """`DELETE /orderContacts/{ref}`: 204 with no body, then 404 (it is gone)."""
    state = request.app[STATE_KEY]
    current = _live_contact(request)
    if current is None:
        return _contact_not_found()
    ref = current["ref"]
    if state.faults.fails_always(state.order_of[ref]):
        return error_response(500, "Internal Server Error", "Injected fault for this order")
    state.delete(ref)
    return await state.faults.after_write(request, "delete", web.Response(status=204))


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
    version = request.match_info["version"]
    contact = _live_contact(request)
    if contact is None:
        return _contact_not_found()
    base = _base(request)
    # Rendered for the asking request: same base and version as it used.
    shown = {
        **contact,
        "href": _contact_href(base, version, contact["ref"]),
        "order": {"href": _order_href(base, version, _order_ref_of(contact))},
    }
    return json_response(shown)


# Kinds of API request by the handler that serves them, for `requests_by_kind`.
_KIND_OF_HANDLER: dict[Any, str] = {
    _post_contacts: "create",
    _update_contact: "update",
    _patch_contact: "update",
    _delete_contact: "delete",
    _list_contacts: "list",
    _get_contact: "get",
}
# The methods of `/{version}/orderContacts/{ref}`: an update is a POST in v2 and a PUT
# (or a partial PATCH) in v2.1; the other version's update method is 405.
_CONTACT_METHODS: dict[str, tuple[tuple[str, Handler], ...]] = {
    "v2": (("POST", _update_contact),),
    "v2.1": (("PUT", _update_contact), ("PATCH", _patch_contact)),
}


# --------------------------------------------------------------------------- admin


async def _admin_stats(request: web.Request) -> web.StreamResponse:
    return json_response(request.app[STATE_KEY].stats())


async def _admin_progress(request: web.Request) -> web.StreamResponse:
    return json_response(request.app[STATE_KEY].progress())


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
    for name, updates in _CONTACT_METHODS.items():
        resource = app.router.add_resource(
            f"/{{version:{re.escape(name)}}}/orderContacts/{{contactRef}}"
        )
        resource.add_route("GET", _get_contact)
        resource.add_route("HEAD", _get_contact)
        for method, handler in updates:
            resource.add_route(method, handler)
        resource.add_route("DELETE", _delete_contact)
    app.router.add_get(ADMIN_PREFIX + "stats", _admin_stats)
    app.router.add_get(ADMIN_PREFIX + "progress", _admin_progress)
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

    def progress(self) -> dict[str, Any]:
        """Same as GET /_emulator/progress, without HTTP: what to poll during a run."""
        return self._state.progress()

    def contacts_for(self, order_ref: str) -> list[dict[str, Any]]:
        """Copies of the order's live contacts (full resources, as last written), oldest
        first; deleted ones are gone. Shallow copies: cheap, with the nested lists shared."""
        return [dict(contact) for contact in self._state.contacts_of(order_ref.lower())]

    def bodies_for(self, order_ref: str) -> list[dict[str, Any]]:
        """What each live contact of the order holds as a request body: its documented
        fields, without the resource's own (ref, href, createdAt, modifiedAt, order)."""
        return [
            {k: v for k, v in contact.items() if k not in RESOURCE_FIELDS}
            for contact in self._state.contacts_of(order_ref.lower())
        ]

    def reset(self) -> None:
        """Same as POST /_emulator/reset: forget contacts and statistics, keep the config."""
        self._state.reset()


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
