"""The Sitecore CDP client: an order's contacts (create, list, read, update, delete), and
what every answer means.

One `aiohttp.ClientSession` per process, its connector sized to the concurrency, the Basic
`Authorization` header built once. `classify` turns an HTTP answer (or the lack of one)
into a `Verdict` the pipeline acts on, following DESIGN section 3; it is the one place
where "what does this status mean" is decided. The status table is the same for every
kind of request; only what a success (2xx) carries, and whether a 409 can mean anything,
depend on the kind.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import aiohttp
import orjson
from yarl import URL

from .contact import order_ref_path

# A server may ask us to wait, but not forever (Redpanda Connect caps it for the same reason).
RETRY_AFTER_CAP = 300.0
# Connecting is quick or broken: do not spend the whole request timeout on it.
CONNECT_TIMEOUT_CAP = 5.0
# A gateway in front of CDP answered for it (bad gateway, gateway timeout): the write may
# have reached CDP and been applied. Retried like any 5xx, but a create lists first.
GATEWAY_GAVE_UP = (502, 504)
# Bytes of an error body kept for the dead letter's detail; CDP's messages are short.
ERROR_DETAIL_LIMIT = 500

# What a request does, for `classify`: "read" covers a listing and a single contact.
Kind = Literal["create", "update", "delete", "read"]

# A contact ref comes from CDP's answers (a listing's hrefs, a 201 body), not from us: it
# is put in a URL path only if it is one plain path segment (no "/", "%", "?", "#", no
# dot segment), so a strange answer can never point a PUT or a DELETE somewhere else.
_CONTACT_REF = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class Verdict(enum.StrEnum):
    OK = "ok"  # 2xx: done as asked (created, updated, deleted, listed, read)
    REJECTED = "rejected"  # 4xx that will never succeed: dead-letter cdp_rejected
    # 404. Create: the order may not exist yet (retry within the grace period). Update:
    # the contact was deleted at CDP. Delete: already gone. Read: no such contact.
    NOT_FOUND = "not_found"
    AUTH = "auth"  # 401/403: wrong credentials for every event; pause the whole worker
    CONFLICT = "conflict"  # 409: reconcile
    RETRY = "retry"  # 408/429/5xx/connection refused: nothing was changed, try again
    # Sent, fate unknown (timeout, connection lost). Create: reconcile first; update and
    # delete are idempotent: send them again.
    IN_DOUBT = "in_doubt"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one CDP request came to.

    `status` is the HTTP status, or None when no answer came; `label` is the status as a
    metric label ("201", "429", "timeout", "connection", "bad_ref"); `message` is CDP's
    error message (never a request body); `contact_ref`/`href` name the contact created,
    read, updated or deleted; `contacts` holds the refs a list call found.
    """

    verdict: Verdict
    label: str
    status: int | None = None
    retry_after: float | None = None
    message: str | None = None
    contact_ref: str | None = None
    href: str | None = None
    contacts: tuple[tuple[str, str], ...] = field(default=())  # (ref, href) pairs
    duration: float = 0.0


# What a request for an unusable contact ref comes to, without sending anything.
BAD_REF = Outcome(Verdict.REJECTED, "bad_ref", message="contact ref is not usable in a URL")


def contact_ref_path(contact_ref: str) -> str:
    """The contact ref for a URL path; ValueError unless it is one plain path segment."""
    if contact_ref in (".", "..") or not _CONTACT_REF.fullmatch(contact_ref):
        raise ValueError("contact ref is not usable in a URL")
    return contact_ref


# Delta-seconds, with a fraction allowed; explicit ASCII digits (`\d` also takes "²").
_SECONDS_RE = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """`Retry-After` as seconds (delta-seconds, fractional ones too, or an HTTP date),
    capped; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    seconds: float
    if _SECONDS_RE.fullmatch(value):  # "7", or "0.25": a server that knows its next slot
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


def _error_message(body: bytes) -> str | None:
    """CDP's `message` (and `developerMessage`) from an error body, or a short prefix."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body[:ERROR_DETAIL_LIMIT].decode("utf-8", "replace").strip()
        return text or None
    if isinstance(parsed, dict):
        parts = [str(parsed[k]) for k in ("message", "developerMessage") if parsed.get(k)]
        if parts:
            return " / ".join(dict.fromkeys(parts))[:ERROR_DETAIL_LIMIT]
    return None


def _ref_from_href(href: str) -> str:
    return href.rstrip("/").rsplit("/", 1)[-1]


def _contact_in(body: bytes) -> tuple[str, str] | None:
    """(ref, href) of a contact body (a 201's, a GET's), or None when it has neither."""
    try:
        contact = orjson.loads(body)
        return str(contact["ref"]), str(contact["href"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


def _succeeded(status: int, body: bytes, kind: Kind, ref: str | None, href: str | None) -> Outcome:
    """A 2xx: what it tells us depends on what was asked."""
    label = str(status)
    if kind == "delete":
        # v2.1 answers 204, v2 200 with or without a body: we know which contact is gone.
        return Outcome(Verdict.OK, label, status, contact_ref=ref, href=href)
    contact = _contact_in(body)
    if contact is not None:
        return Outcome(Verdict.OK, label, status, contact_ref=contact[0], href=contact[1])
    if kind == "update":
        # Replaced; the body is just an echo, and we know which contact we addressed.
        return Outcome(Verdict.OK, label, status, contact_ref=ref, href=href)
    if kind == "read":
        # Nothing was changed, so asking again is safe (a proxy's page, a cut body).
        return Outcome(Verdict.RETRY, label, status, message="unreadable contact")
    # Created, but we cannot tell which contact: ask CDP rather than guess.
    return Outcome(Verdict.IN_DOUBT, label, status, message="unreadable success body")


def classify(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    kind: Kind = "create",
    ref: str | None = None,
    href: str | None = None,
) -> Outcome:
    """Classify an HTTP answer to a request of `kind` (DESIGN section 3).

    `ref`/`href` name the contact an update or a delete addressed: the outcome carries
    them when the answer does not say (a 204, an unreadable echo). A listing's 2xx body
    is not a contact: `CdpClient.list_contacts` reads it itself.
    """
    if 200 <= status < 300:
        return _succeeded(status, body, kind, ref, href)
    label = str(status)
    retry_after = parse_retry_after(headers.get("Retry-After"))
    message = _error_message(body)
    if status in (401, 403):
        verdict = Verdict.AUTH
    elif status == 404:
        verdict = Verdict.NOT_FOUND
    elif status == 409:
        # A read changes nothing, so it cannot conflict: a proxy's oddity, ask again.
        verdict = Verdict.RETRY if kind == "read" else Verdict.CONFLICT
    elif status in GATEWAY_GAVE_UP and kind != "read":
        verdict = Verdict.IN_DOUBT
    elif status in (408, 429) or status >= 500:
        verdict = Verdict.RETRY
    elif 400 <= status < 500:
        verdict = Verdict.REJECTED
    else:  # 1xx/3xx: not an answer this API gives; treat as transient rather than final
        verdict = Verdict.RETRY
    return Outcome(verdict, label, status, retry_after=retry_after, message=message)


def classify_error(exc: BaseException, *, sent_possible: bool) -> Outcome:
    """Classify a request that got no answer.

    A failure to connect means nothing was sent: plain retry. Anything after the request
    may have left (a timeout, a dropped connection) is in doubt when the request changes
    something (`sent_possible`: create, update, delete), a plain retry for a read.
    A TLS failure (`label` "tls") is a failure to connect too; `message` is then the
    certificate's verification error, for the `cdp.tls_failed` line.
    """
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        verify = getattr(exc.certificate_error, "verify_message", None)
        return Outcome(Verdict.RETRY, "tls", message=str(verify or exc.certificate_error))
    if isinstance(exc, aiohttp.ClientSSLError):
        return Outcome(Verdict.RETRY, "tls", message=type(exc).__name__)
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return Outcome(Verdict.RETRY, "connection", message=type(exc).__name__)
    label = "timeout" if isinstance(exc, asyncio.TimeoutError) else "connection"
    verdict = Verdict.IN_DOUBT if sent_possible else Verdict.RETRY
    return Outcome(verdict, label, message=type(exc).__name__)


def basic_authorization(client_key: str, api_token: str) -> str:
    token = base64.b64encode(f"{client_key}:{api_token}".encode()).decode("ascii")
    return f"Basic {token}"


class CdpClient:
    """Creates, lists, reads, updates and deletes order contacts.

    `open()` once, `close()` at the end. No method raises for HTTP or network trouble
    (see the `Outcome`); only an orderRef that is not a UUID raises ValueError.
    """

    def __init__(
        self,
        base_url: str,
        client_key: str,
        api_token: str,
        *,
        api_version: str = "v2",
        timeout: float = 10.0,
        concurrency: int = 32,
        ca_file: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._base = URL(self.base_url)
        self._base_path = self._base.raw_path.rstrip("/")
        self._ca_file = ca_file
        self.api_version = api_version
        self._timeout = aiohttp.ClientTimeout(
            total=timeout, sock_connect=min(timeout, CONNECT_TIMEOUT_CAP)
        )
        self._concurrency = concurrency
        # Built once: the header is a credential and must not be rebuilt (or logged) per call.
        authorization = basic_authorization(client_key, api_token)
        self._headers = {
            "Authorization": authorization,
            "Accept": "application/json",
            "Content-Type": "application/json",
        }
        # An error body that echoes them (a proxy's debug page) must not carry them into an
        # outcome's message, and from there into a dead letter or a log line.
        secrets = (authorization, authorization.split()[-1], api_token, client_key)
        self._secrets = tuple(secret for secret in secrets if secret)
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"CdpClient(base_url={self.base_url!r}, api_version={self.api_version!r})"

    async def open(self) -> None:
        tls: ssl.SSLContext | bool = True  # the system's CAs
        if self._ca_file:
            # CDP_CA_FILE adds CAs to the system's (a proxy's, a test CDP's).
            tls = ssl.create_default_context()
            tls.load_verify_locations(cafile=self._ca_file)
        connector = aiohttp.TCPConnector(
            limit=self._concurrency,
            limit_per_host=self._concurrency,
            ttl_dns_cache=300,
            ssl=tls,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            headers=self._headers,
            json_serialize=lambda obj: orjson.dumps(obj).decode(),
            raise_for_status=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("CdpClient.open() was not called")
        return self._session

    def contacts_url(self, order_ref: str) -> str:
        return str(self._contacts_address(order_ref))

    def contact_url(self, contact_ref: str) -> str:
        # contact_ref_path raises unless the ref is one plain path segment.
        return str(self._address(f"orderContacts/{contact_ref_path(contact_ref)}"))

    def _contacts_address(self, order_ref: str) -> URL:
        # order_ref_path raises unless order_ref is a UUID: nothing unvalidated reaches a URL.
        return self._address(f"orders/{order_ref_path(order_ref)}/contacts")

    def _address(self, path: str) -> URL:
        """The API's URL for `path`, as aiohttp takes it, built from parts already encoded
        (the base's, and validated refs: hex digits, letters, `_.-`): no parsing or
        quoting per request."""
        base = self._base
        path = f"{self._base_path}/{self.api_version}/{path}"
        return URL.build(scheme=base.scheme, authority=base.raw_authority, path=path, encoded=True)

    async def create_contact(self, order_ref: str, body: Mapping[str, Any]) -> Outcome:
        """POST the contact. OK with its ref and href; otherwise see `classify`."""
        address = self._contacts_address(order_ref)
        return await self._send("POST", address, orjson.dumps(body), "create")

    async def list_contacts(self, order_ref: str) -> Outcome:
        """GET the order's contacts. OK with `contacts` on success; otherwise as classify."""
        outcome = await self._send(
            "GET", self._contacts_address(order_ref), None, "read", read_success=_listed
        )
        if outcome.verdict is Verdict.NOT_FOUND:
            # An unknown order has no contacts; some proxies say so with a 404.
            return Outcome(Verdict.OK, outcome.label, outcome.status, duration=outcome.duration)
        return outcome

    async def get_contact(self, contact_ref: str) -> Outcome:
        """GET one contact: OK with its ref and href, NOT_FOUND when there is none."""
        return await self._send_to_contact("GET", contact_ref, None, "read")

    async def contact_fields(self, contact_ref: str) -> tuple[Outcome, dict[str, Any] | None]:
        """GET one contact with its fields (`worker inspect`): personal data, which the
        Outcome never holds, so that no log line or letter can carry it."""
        read: list[dict[str, Any]] = []

        def keep(status: int, payload: bytes) -> Outcome:
            try:
                fields = orjson.loads(payload)
            except orjson.JSONDecodeError:
                fields = None
            if not isinstance(fields, dict):
                return Outcome(Verdict.RETRY, str(status), status, message="unreadable contact")
            read.append(fields)
            return Outcome(Verdict.OK, str(status), status, contact_ref=contact_ref)

        try:
            url = self.contact_url(contact_ref)
        except ValueError:
            return BAD_REF, None
        outcome = await self._send("GET", url, None, "read", ref=contact_ref, read_success=keep)
        return outcome, read[0] if read else None

    async def update_contact(self, contact_ref: str, body: Mapping[str, Any]) -> Outcome:
        """Replace the whole contact with `body`: OK with its ref and href, NOT_FOUND when
        it was deleted at CDP, IN_DOUBT when no answer came (send it again: a replace is
        idempotent)."""
        # v2 updates with a POST to the contact; v2.1 with PUT (its PATCH is partial, and
        # we always send the whole resource).
        method = "POST" if self.api_version == "v2" else "PUT"
        return await self._send_to_contact(method, contact_ref, orjson.dumps(body), "update")

    async def delete_contact(self, contact_ref: str) -> Outcome:
        """DELETE the contact: OK with its ref, NOT_FOUND when it is already gone."""
        return await self._send_to_contact("DELETE", contact_ref, None, "delete")

    async def _send_to_contact(
        self, method: str, contact_ref: str, data: bytes | None, kind: Kind
    ) -> Outcome:
        """A request to one contact, or BAD_REF (nothing sent) for a ref unfit for a URL."""
        try:
            url = self.contact_url(contact_ref)
        except ValueError:
            return BAD_REF
        return await self._send(method, url, data, kind, ref=contact_ref)

    async def _send(
        self,
        method: str,
        url: str | URL,
        data: bytes | None,
        kind: Kind,
        *,
        ref: str | None = None,
        read_success: Callable[[int, bytes], Outcome] | None = None,
    ) -> Outcome:
        """Send one request and classify what came of it, timed; never raises for HTTP or
        network trouble.

        `ref` is the contact `url` addresses (for `classify`); `read_success` reads a 2xx
        body that is not a contact (a listing).
        """
        started = time.perf_counter()
        try:
            async with self.session.request(method, url, data=data) as response:
                payload = await response.read()
                status = response.status
                if read_success is not None and 200 <= status < 300:
                    outcome = read_success(status, payload)
                else:
                    href = str(url) if ref is not None else None
                    outcome = classify(
                        status, response.headers, payload, kind=kind, ref=ref, href=href
                    )
        except (TimeoutError, aiohttp.ClientError) as exc:
            # A read changes nothing: with no answer it is simply asked again.
            outcome = classify_error(exc, sent_possible=kind != "read")
        # The outcome was made just now for this request alone (never a shared constant):
        # its duration and redacted message are set in place, as a frozen dataclass's own
        # __post_init__ would, instead of a copy per request (dataclasses.replace).
        object.__setattr__(outcome, "duration", time.perf_counter() - started)
        if outcome.message is not None:
            object.__setattr__(outcome, "message", self._redact(outcome.message))
        return outcome

    def _redact(self, message: str | None) -> str | None:
        if message is None:
            return None
        for secret in self._secrets:
            message = message.replace(secret, "[redacted]")
        return message


def _listed(status: int, payload: bytes) -> Outcome:
    label = str(status)
    try:
        items = orjson.loads(payload)["items"]
        contacts = tuple(
            (str(item.get("ref") or _ref_from_href(item["href"])), str(item["href"]))
            for item in items
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return Outcome(Verdict.RETRY, label, status, message="unreadable contact list")
    return Outcome(Verdict.OK, label, status, contacts=contacts)
