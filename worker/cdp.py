"""The Sitecore CDP client: create and list an order's contacts, and classify every answer.

One `aiohttp.ClientSession` per process, its connector sized to the concurrency, the Basic
`Authorization` header built once. `classify` turns an HTTP answer (or the lack of one)
into a `Verdict` the pipeline acts on, following DESIGN section 3; it is the one place
where "what does this status mean" is decided.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import enum
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson

from .contact import order_ref_path

# A server may ask us to wait, but not forever (Redpanda Connect caps it for the same reason).
RETRY_AFTER_CAP = 300.0
# Connecting is quick or broken: do not spend the whole request timeout on it.
CONNECT_TIMEOUT_CAP = 5.0
# Bytes of an error body kept for the dead letter's detail; CDP's messages are short.
ERROR_DETAIL_LIMIT = 500


class Verdict(enum.StrEnum):
    OK = "ok"  # 2xx: done as asked (created, updated, deleted, listed, read)
    REJECTED = "rejected"  # 4xx that will never succeed: dead-letter cdp_rejected
    NOT_FOUND = "not_found"  # 404: the order may not exist yet; retry within the grace period
    AUTH = "auth"  # 401/403: wrong credentials for every event; pause the whole worker
    CONFLICT = "conflict"  # 409: reconcile
    RETRY = "retry"  # 408/429/5xx/connection refused: nothing was created, try again
    IN_DOUBT = "in_doubt"  # sent, fate unknown (timeout, connection lost): reconcile first


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one CDP request came to.

    `status` is the HTTP status, or None when no answer came; `label` is the status as a
    metric label ("201", "429", "timeout", "connection"); `message` is CDP's error message
    (never a request body); `contacts` holds the refs a list call found.
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


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """`Retry-After` as seconds (delta-seconds or an HTTP date), capped; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    seconds: float
    if value.isascii() and value.isdigit():  # str.isdigit() also takes "²", which float() refuses
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


def classify(status: int, headers: Mapping[str, str], body: bytes) -> Outcome:
    """Classify an HTTP answer to a POST of a contact (DESIGN section 3)."""
    label = str(status)
    retry_after = parse_retry_after(headers.get("Retry-After"))
    if status in (200, 201):
        try:
            created = orjson.loads(body)
            ref, href = str(created["ref"]), str(created["href"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            # Created, but we cannot tell which contact: ask CDP rather than guess.
            return Outcome(Verdict.IN_DOUBT, label, status, message="unreadable success body")
        return Outcome(Verdict.OK, label, status, contact_ref=ref, href=href)
    message = _error_message(body)
    if status in (401, 403):
        verdict = Verdict.AUTH
    elif status == 404:
        verdict = Verdict.NOT_FOUND
    elif status == 409:
        verdict = Verdict.CONFLICT
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
    may have left (a timeout, a dropped connection) is in doubt when the request was a POST.
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
    """Creates and lists order contacts. `open()` once, `close()` at the end."""

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
        self._ca_file = ca_file
        self.api_version = api_version
        self._timeout = aiohttp.ClientTimeout(
            total=timeout, sock_connect=min(timeout, CONNECT_TIMEOUT_CAP)
        )
        self._concurrency = concurrency
        # Built once: the header is a credential and must not be rebuilt (or logged) per call.
        self._headers = {
            "Authorization": basic_authorization(client_key, api_token),
            "Accept": "application/json",
            "Content-Type": "application/json",
        }
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
        # order_ref_path raises unless order_ref is a UUID: nothing unvalidated reaches a URL.
        return f"{self.base_url}/{self.api_version}/orders/{order_ref_path(order_ref)}/contacts"

    async def create_contact(self, order_ref: str, body: Mapping[str, Any]) -> Outcome:
        """POST the contact. Never raises for HTTP or network trouble: see the Outcome."""
        url = self.contacts_url(order_ref)
        data = orjson.dumps(body)
        started = time.perf_counter()
        try:
            async with self.session.post(url, data=data) as response:
                payload = await response.read()
                outcome = classify(response.status, response.headers, payload)
        except (TimeoutError, aiohttp.ClientError) as exc:
            outcome = classify_error(exc, sent_possible=True)
        return _timed(outcome, started)

    async def list_contacts(self, order_ref: str) -> Outcome:
        """GET the order's contacts. CREATED with `contacts` on success; otherwise as classify."""
        url = self.contacts_url(order_ref)
        started = time.perf_counter()
        try:
            async with self.session.get(url) as response:
                payload = await response.read()
                status = response.status
                if status != 200:
                    outcome = classify(status, response.headers, payload)
                    if outcome.verdict is Verdict.NOT_FOUND:
                        # An unknown order has no contacts; some proxies say so with a 404.
                        outcome = Outcome(Verdict.OK, "404", status)
                    elif outcome.verdict in (Verdict.CONFLICT, Verdict.IN_DOUBT):
                        outcome = Outcome(Verdict.RETRY, outcome.label, status)
                else:
                    outcome = _listed(payload)
        except (TimeoutError, aiohttp.ClientError) as exc:
            outcome = classify_error(exc, sent_possible=False)
        return _timed(outcome, started)


def _listed(payload: bytes) -> Outcome:
    try:
        items = orjson.loads(payload)["items"]
        contacts = tuple(
            (str(item.get("ref") or _ref_from_href(item["href"])), str(item["href"]))
            for item in items
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return Outcome(Verdict.RETRY, "200", 200, message="unreadable contact list")
    return Outcome(Verdict.OK, "200", 200, contacts=contacts)


def _timed(outcome: Outcome, started: float) -> Outcome:
    return dataclasses.replace(outcome, duration=time.perf_counter() - started)
