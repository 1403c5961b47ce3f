"""The CDP client: what every answer means (DESIGN sections 1 and 3) and what goes on the wire.

`classify`/`classify_error` are tested as a table; the client's requests with aioresponses
(headers, URLs, bodies, no request for a bad orderRef or contact ref, one status table per
kind of request); and a few round trips against the real emulator, where timeouts and
dropped connections after a create are real.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import orjson
import pytest
from aioresponses import aioresponses
from harness import free_port
from multidict import CIMultiDict
from yarl import URL

from worker.cdp import (
    ERROR_DETAIL_LIMIT,
    RETRY_AFTER_CAP,
    CdpClient,
    Outcome,
    Verdict,
    classify,
    classify_error,
    contact_ref_path,
    parse_retry_after,
)
from worker.emulator import Emulator, EmulatorConfig

BASE = "https://api-engage-eu.sitecorecloud.io"
KEY = "ck-unit-client-key"
TOKEN = "tok-unit-api-token"
BASIC = "Basic " + base64.b64encode(f"{KEY}:{TOKEN}".encode()).decode()
ORDER = "d680c9be-4c07-4731-857e-9602034b15f2"
CONTACT_REF = "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"
BODY = {
    "title": "Mr",
    "firstName": "John",
    "lastName": "Doe",
    "emails": ["john@example.com"],
    "identifiers": [{"provider": "BookingSystem", "id": "C-991"}],
}


def cdp_error(status: int, message: str, developer: str | None = None) -> bytes:
    return orjson.dumps(
        {
            "status": status,
            "code": status,
            "message": message,
            "developerMessage": developer or message,
            "moreInfoUrl": "https://doc.sitecore.com/cdp",
        }
    )


def created(ref: str = CONTACT_REF, version: str = "v2") -> dict[str, Any]:
    return {
        "href": f"{BASE}/{version}/orderContacts/{ref}",
        "ref": ref,
        "createdAt": "2026-11-26T10:00:00.000Z",
        "modifiedAt": "2026-11-26T10:00:00.000Z",
        "firstName": "John",
        "order": {"href": f"{BASE}/{version}/orders/{ORDER}"},
    }


# -- classify --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201])
def test_success_with_a_body_is_created_with_ref_and_href(status: int) -> None:
    outcome = classify(status, CIMultiDict(), orjson.dumps(created()))
    assert outcome.verdict is Verdict.OK
    assert outcome.contact_ref == CONTACT_REF
    assert outcome.href == f"{BASE}/v2/orderContacts/{CONTACT_REF}"
    assert (outcome.status, outcome.label) == (status, str(status))


@pytest.mark.parametrize(
    "payload",
    [b"", b"<html>ok</html>", b"[]", b'"created"', b"null", b'{"ref": "x"}', b'{"href": "x"}'],
)
def test_success_with_an_unreadable_body_is_in_doubt(payload: bytes) -> None:
    outcome = classify(201, CIMultiDict(), payload)
    assert outcome.verdict is Verdict.IN_DOUBT  # created, but which contact? ask CDP
    assert outcome.contact_ref is None
    assert outcome.status == 201


@pytest.mark.parametrize("status", [400, 413, 415, 422, 418, 405, 410, 451])
def test_final_client_errors_are_rejected_with_cdps_message(status: int) -> None:
    outcome = classify(status, CIMultiDict(), cdp_error(status, "lastName: is required", "Dev"))
    assert outcome.verdict is Verdict.REJECTED
    assert outcome.message == "lastName: is required / Dev"
    assert (outcome.status, outcome.label) == (status, str(status))


def test_rejection_messages_are_deduplicated_or_a_short_prefix_of_a_foreign_body() -> None:
    same = classify(400, CIMultiDict(), cdp_error(400, "Bad", "Bad"))
    assert same.message == "Bad"
    html = classify(400, CIMultiDict(), b"  <h1>Bad Request</h1>  " + b"x" * 2000)
    assert html.message is not None
    assert html.message.startswith("<h1>Bad Request</h1>")
    assert len(html.message) <= ERROR_DETAIL_LIMIT
    huge = classify(422, CIMultiDict(), cdp_error(422, "m" * 5000))
    assert huge.message is not None
    assert len(huge.message) <= ERROR_DETAIL_LIMIT
    assert classify(400, CIMultiDict(), b"").message is None
    assert classify(400, CIMultiDict(), b'{"status": 400}').message is None


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (404, Verdict.NOT_FOUND),
        (401, Verdict.AUTH),
        (403, Verdict.AUTH),
        (409, Verdict.CONFLICT),
        (408, Verdict.RETRY),
        (429, Verdict.RETRY),
        (500, Verdict.RETRY),
        (502, Verdict.IN_DOUBT),
        (503, Verdict.RETRY),
        (504, Verdict.IN_DOUBT),
    ],
)
def test_status_table(status: int, verdict: Verdict) -> None:
    outcome = classify(status, CIMultiDict(), cdp_error(status, "Some reason"))
    assert outcome.verdict is verdict
    assert (outcome.status, outcome.label) == (status, str(status))
    assert outcome.message == "Some reason"
    assert outcome.contact_ref is None


def http_date(seconds_from_now: float) -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds_from_now), usegmt=True)


def test_retry_after_in_seconds_is_read_case_insensitively_and_capped() -> None:
    assert classify(429, CIMultiDict({"retry-after": "7"}), b"").retry_after == 7.0
    assert classify(503, CIMultiDict({"Retry-After": " 120 "}), b"").retry_after == 120.0
    assert classify(503, CIMultiDict({"Retry-After": "0"}), b"").retry_after == 0.0
    assert classify(429, CIMultiDict({"Retry-After": "86400"}), b"").retry_after == RETRY_AFTER_CAP
    assert RETRY_AFTER_CAP == 300.0
    assert classify(429, CIMultiDict(), b"").retry_after is None


def test_a_fractional_retry_after_is_honoured() -> None:
    assert parse_retry_after("0.25") == 0.25
    assert parse_retry_after(" 1.500 ") == 1.5


def test_retry_after_as_an_http_date() -> None:
    outcome = classify(503, CIMultiDict({"Retry-After": http_date(60)}), b"")
    assert outcome.retry_after is not None
    assert 57.0 <= outcome.retry_after <= 61.0  # HTTP dates have whole seconds
    assert classify(429, CIMultiDict({"Retry-After": http_date(3600)}), b"").retry_after == 300.0
    assert classify(429, CIMultiDict({"Retry-After": http_date(-3600)}), b"").retry_after == 0.0
    fixed = "Wed, 21 Oct 2026 07:28:00 GMT"
    now = datetime(2026, 10, 21, 7, 27, 30, tzinfo=UTC).timestamp()
    assert parse_retry_after(fixed, now=now) == 30.0


@pytest.mark.parametrize(
    "value", ["soon", "1.", ".5", "-5", "1e3", "12abc", "Wed, 99 Foo 2020", "²", "1.²", "", "  "]
)
def test_garbage_retry_after_is_ignored(value: str) -> None:
    assert parse_retry_after(value) is None
    assert classify(503, CIMultiDict({"Retry-After": value}), b"").retry_after is None


# -- classify_error --------------------------------------------------------------------------


def connector_error() -> aiohttp.ClientConnectorError:
    key = aiohttp.client_reqrep.ConnectionKey("cdp.test", 443, True, True, None, None, None)
    return aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "Connection refused"))


@pytest.mark.parametrize("sent_possible", [True, False])
@pytest.mark.parametrize(
    "make", [connector_error, lambda: aiohttp.ConnectionTimeoutError("connect")]
)
def test_nothing_sent_is_a_plain_retry(make: Any, sent_possible: bool) -> None:
    outcome = classify_error(make(), sent_possible=sent_possible)
    assert outcome.verdict is Verdict.RETRY
    assert outcome.label == "connection"
    assert outcome.status is None


@pytest.mark.parametrize(
    ("exc", "label"),
    [
        (TimeoutError(), "timeout"),
        (aiohttp.SocketTimeoutError("read"), "timeout"),
        (aiohttp.ServerDisconnectedError(), "connection"),
        (aiohttp.ClientOSError(104, "Connection reset by peer"), "connection"),
        (aiohttp.ClientPayloadError("truncated"), "connection"),
    ],
)
def test_a_request_that_may_have_left_is_in_doubt_only_if_it_was_sent(
    exc: BaseException, label: str
) -> None:
    sent = classify_error(exc, sent_possible=True)
    assert (sent.verdict, sent.label, sent.status) == (Verdict.IN_DOUBT, label, None)
    unsent = classify_error(exc, sent_possible=False)
    assert (unsent.verdict, unsent.label) == (Verdict.RETRY, label)


# -- the client, with aioresponses -----------------------------------------------------------


@pytest.fixture
async def client() -> AsyncIterator[CdpClient]:
    opened = CdpClient(BASE + "/", KEY, TOKEN, timeout=2.0)
    await opened.open()
    yield opened
    await opened.close()


def contacts_url(version: str = "v2", order: str = ORDER) -> str:
    return f"{BASE}/{version}/orders/{order}/contacts"


def only_request(mock: aioresponses, method: str, url: str) -> Any:
    assert list(mock.requests) == [(method, URL(url))]
    (call,) = mock.requests[(method, URL(url))]
    return call


def assert_cdp_headers(call: Any) -> None:
    headers = call.kwargs["headers"]
    assert headers["Authorization"] == BASIC
    assert headers["Accept"] == "application/json"
    assert headers["Content-Type"] == "application/json"


@pytest.mark.parametrize("version", ["v2", "v2.1"])
async def test_create_posts_the_body_with_auth_and_json_headers(
    mocked: aioresponses, version: str
) -> None:
    client = CdpClient(BASE, KEY, TOKEN, api_version=version)
    await client.open()
    try:
        mocked.post(contacts_url(version), status=201, payload=created(version=version))
        outcome = await client.create_contact(ORDER.upper(), BODY)  # any case; sent canonical
    finally:
        await client.close()
    assert outcome.verdict is Verdict.OK
    assert outcome.contact_ref == CONTACT_REF
    assert outcome.href == f"{BASE}/{version}/orderContacts/{CONTACT_REF}"
    assert outcome.duration > 0
    call = only_request(mocked, "POST", contacts_url(version))
    assert_cdp_headers(call)
    assert orjson.loads(call.kwargs["data"]) == BODY


@pytest.mark.parametrize("version", ["v2", "v2.1"])
async def test_list_sends_auth_and_json_headers(mocked: aioresponses, version: str) -> None:
    client = CdpClient(BASE, KEY, TOKEN, api_version=version)
    await client.open()
    try:
        mocked.get(contacts_url(version), payload={"href": "x", "items": []})
        outcome = await client.list_contacts(ORDER)
    finally:
        await client.close()
    assert (outcome.verdict, outcome.contacts) == (Verdict.OK, ())
    assert outcome.duration > 0
    assert_cdp_headers(only_request(mocked, "GET", contacts_url(version)))


@pytest.mark.parametrize(
    "order_ref",
    [
        "not-a-uuid",
        "",
        "../../admin",
        f"{ORDER}/../../{ORDER}",
        f"{ORDER}?x=1",
        f" {ORDER}",
        ORDER.replace("-", ""),
        ORDER[:-1] + "g",
    ],
)
async def test_a_non_uuid_order_ref_raises_before_any_request(
    mocked: aioresponses, client: CdpClient, order_ref: str
) -> None:
    with pytest.raises(ValueError, match="UUID"):
        await client.create_contact(order_ref, BODY)
    with pytest.raises(ValueError, match="UUID"):
        await client.list_contacts(order_ref)
    assert mocked.requests == {}


async def test_list_reads_refs_from_v2_hrefs(mocked: aioresponses, client: CdpClient) -> None:
    first, second = f"{BASE}/v2/orderContacts/c-1", f"{BASE}/v2/orderContacts/c-2/"
    mocked.get(contacts_url(), payload={"offset": 0, "items": [{"href": first}, {"href": second}]})
    outcome = await client.list_contacts(ORDER)
    assert outcome.verdict is Verdict.OK
    assert outcome.contacts == (("c-1", first), ("c-2", second))


async def test_list_reads_v21_refs(mocked: aioresponses) -> None:
    client = CdpClient(BASE, KEY, TOKEN, api_version="v2.1")
    await client.open()
    href = f"{BASE}/v2.1/orderContacts/{CONTACT_REF}"
    mocked.get(contacts_url("v2.1"), payload={"items": [{"href": href, "ref": CONTACT_REF}]})
    try:
        outcome = await client.list_contacts(ORDER)
    finally:
        await client.close()
    assert outcome.contacts == ((CONTACT_REF, href),)


@pytest.mark.parametrize(
    ("status", "payload", "verdict"),
    [
        (404, cdp_error(404, "Not Found"), Verdict.OK),  # no order: no contacts
        (401, cdp_error(401, "Unauthorized"), Verdict.AUTH),
        (403, cdp_error(403, "Forbidden"), Verdict.AUTH),
        (409, cdp_error(409, "Conflict"), Verdict.RETRY),
        (429, cdp_error(429, "Too Many Requests"), Verdict.RETRY),
        (503, cdp_error(503, "Unavailable"), Verdict.RETRY),
        (400, cdp_error(400, "Bad"), Verdict.REJECTED),
        (200, b"not json", Verdict.RETRY),
        (200, b'{"items": [{"nohref": 1}]}', Verdict.RETRY),
        (200, b'{"items": "x"}', Verdict.RETRY),
        (200, b"{}", Verdict.RETRY),
    ],
)
async def test_list_answers(
    mocked: aioresponses, client: CdpClient, status: int, payload: bytes, verdict: Verdict
) -> None:
    mocked.get(contacts_url(), status=status, body=payload, headers={"Retry-After": "3"})
    outcome = await client.list_contacts(ORDER)
    assert outcome.verdict is verdict
    assert outcome.contacts == ()
    assert outcome.status == status


async def test_post_answers_are_classified(mocked: aioresponses, client: CdpClient) -> None:
    mocked.post(contacts_url(), status=400, body=cdp_error(400, "firstName: is required"))
    mocked.post(contacts_url(), status=429, body=b"", headers={"Retry-After": "2"})
    mocked.post(contacts_url(), status=503, body=b"", headers={"Retry-After": "²"})
    mocked.post(contacts_url(), status=201, body=b"<html/>")
    rejected = await client.create_contact(ORDER, BODY)
    assert (rejected.verdict, rejected.message) == (Verdict.REJECTED, "firstName: is required")
    throttled = await client.create_contact(ORDER, BODY)
    assert (throttled.verdict, throttled.retry_after) == (Verdict.RETRY, 2.0)
    garbage = await client.create_contact(ORDER, BODY)
    assert (garbage.verdict, garbage.retry_after) == (Verdict.RETRY, None)
    doubt = await client.create_contact(ORDER, BODY)
    assert doubt.verdict is Verdict.IN_DOUBT


@pytest.mark.parametrize(
    ("exc", "post_verdict", "label"),
    [
        (TimeoutError(), Verdict.IN_DOUBT, "timeout"),
        (aiohttp.ServerDisconnectedError(), Verdict.IN_DOUBT, "connection"),
        (aiohttp.ClientOSError(104, "reset"), Verdict.IN_DOUBT, "connection"),
        (connector_error(), Verdict.RETRY, "connection"),
        (aiohttp.ConnectionTimeoutError(), Verdict.RETRY, "connection"),
    ],
)
async def test_no_answer_is_in_doubt_for_a_post_and_a_retry_for_a_get(
    mocked: aioresponses,
    client: CdpClient,
    exc: BaseException,
    post_verdict: Verdict,
    label: str,
) -> None:
    mocked.post(contacts_url(), exception=exc)
    mocked.get(contacts_url(), exception=exc)
    posted = await client.create_contact(ORDER, BODY)
    assert (posted.verdict, posted.label, posted.status) == (post_verdict, label, None)
    assert posted.duration > 0
    listed = await client.list_contacts(ORDER)
    assert (listed.verdict, listed.label, listed.status) == (Verdict.RETRY, label, None)


async def test_the_client_keeps_credentials_out_of_its_repr(client: CdpClient) -> None:
    shown = repr(client)
    assert BASE in shown
    for secret in (KEY, TOKEN, BASIC, BASIC.split()[1]):
        assert secret not in shown
    assert client.base_url == BASE  # the trailing slash is gone


async def test_the_client_must_be_opened_and_closes_twice() -> None:
    unopened = CdpClient(BASE, KEY, TOKEN)
    with pytest.raises(RuntimeError, match="open"):
        await unopened.create_contact(ORDER, BODY)
    await unopened.open()
    await unopened.close()
    await unopened.close()


# -- reading, updating and deleting one contact ----------------------------------------------


def contact_url(version: str = "v2", ref: str = CONTACT_REF) -> str:
    return f"{BASE}/{version}/orderContacts/{ref}"


def listing() -> dict[str, Any]:
    return {"href": contacts_url(), "items": [{"href": contact_url()}]}


# (HTTP method, URL) each operation sends under v2, and how to call it.
OPERATIONS: dict[str, tuple[str, str, Any]] = {
    "create": ("POST", contacts_url(), lambda c: c.create_contact(ORDER, BODY)),
    "list": ("GET", contacts_url(), lambda c: c.list_contacts(ORDER)),
    "get": ("GET", contact_url(), lambda c: c.get_contact(CONTACT_REF)),
    "update": ("POST", contact_url(), lambda c: c.update_contact(CONTACT_REF, BODY)),
    "delete": ("DELETE", contact_url(), lambda c: c.delete_contact(CONTACT_REF)),
}
OK, REJ, NF, AUTH, CONF, RETRY, DOUBT = (
    Verdict.OK,
    Verdict.REJECTED,
    Verdict.NOT_FOUND,
    Verdict.AUTH,
    Verdict.CONFLICT,
    Verdict.RETRY,
    Verdict.IN_DOUBT,
)
# One row per status: the verdict of create, list, get, update, delete. 2xx answers carry a
# contact (a listing for list), 204 nothing, errors CDP's error body.
STATUS_TABLE: dict[int, tuple[Verdict, Verdict, Verdict, Verdict, Verdict]] = {
    # status  create list   get    update delete
    200: (OK, OK, OK, OK, OK),
    201: (OK, OK, OK, OK, OK),
    204: (DOUBT, RETRY, RETRY, OK, OK),  # created, but which? / nothing read / done
    400: (REJ, REJ, REJ, REJ, REJ),
    401: (AUTH, AUTH, AUTH, AUTH, AUTH),
    403: (AUTH, AUTH, AUTH, AUTH, AUTH),
    404: (NF, OK, NF, NF, NF),  # list: an unknown order has no contacts
    408: (RETRY, RETRY, RETRY, RETRY, RETRY),
    409: (CONF, RETRY, RETRY, CONF, CONF),  # a read cannot conflict
    413: (REJ, REJ, REJ, REJ, REJ),
    422: (REJ, REJ, REJ, REJ, REJ),
    429: (RETRY, RETRY, RETRY, RETRY, RETRY),
    500: (RETRY, RETRY, RETRY, RETRY, RETRY),
    502: (DOUBT, RETRY, RETRY, DOUBT, DOUBT),  # a gateway's: the write may have landed
    503: (RETRY, RETRY, RETRY, RETRY, RETRY),
    504: (DOUBT, RETRY, RETRY, DOUBT, DOUBT),
}


@pytest.mark.parametrize(
    ("operation", "status", "verdict"),
    [
        (operation, status, row[column])
        for status, row in STATUS_TABLE.items()
        for column, operation in enumerate(OPERATIONS)
    ],
)
async def test_status_table_per_kind_of_request(
    mocked: aioresponses, client: CdpClient, operation: str, status: int, verdict: Verdict
) -> None:
    method, url, call = OPERATIONS[operation]
    if status == 204:
        payload = b""
    elif status < 300:
        payload = orjson.dumps(listing() if operation == "list" else created())
    else:
        payload = cdp_error(status, "Some reason")
    mocked.add(url, method, status=status, body=payload, headers={"Retry-After": "3"})
    outcome = await call(client)
    assert outcome.verdict is verdict
    assert (outcome.status, outcome.label) == (status, str(status))
    assert outcome.duration > 0
    only_request(mocked, method, url)
    if status >= 400 and verdict is not OK:
        assert outcome.message == "Some reason"
        assert outcome.contact_ref is None
        assert outcome.retry_after == 3.0
    if verdict is OK and operation in ("get", "update", "delete", "create"):
        assert (outcome.contact_ref, outcome.href) == (CONTACT_REF, contact_url())


def test_classify_kind_keeps_one_status_table() -> None:
    headers: CIMultiDict[str] = CIMultiDict({"Retry-After": "4"})
    ref, href = CONTACT_REF, contact_url()
    # The positional three-argument form is a create.
    assert classify(204, headers, b"").verdict is Verdict.IN_DOUBT
    assert classify(204, headers, b"", kind="create").verdict is Verdict.IN_DOUBT
    updated = classify(200, headers, b"<html/>", kind="update", ref=ref, href=href)
    assert (updated.verdict, updated.contact_ref, updated.href) == (Verdict.OK, ref, href)
    deleted = classify(200, headers, orjson.dumps(created("other")), kind="delete", ref=ref)
    assert (deleted.verdict, deleted.contact_ref) == (Verdict.OK, ref)  # not the body's ref
    read = classify(200, headers, b"", kind="read")
    assert (read.verdict, read.message) == (Verdict.RETRY, "unreadable contact")
    assert classify(409, headers, b"").verdict is Verdict.CONFLICT
    assert classify(409, headers, b"", kind="update").verdict is Verdict.CONFLICT
    assert classify(409, headers, b"", kind="delete").verdict is Verdict.CONFLICT
    assert classify(409, headers, b"", kind="read").verdict is Verdict.RETRY
    assert classify(409, headers, b"", kind="read").retry_after == 4.0


@pytest.mark.parametrize("version", ["v2", "v2.1"])
async def test_contact_urls_per_version(version: str) -> None:
    client = CdpClient(BASE + "/", KEY, TOKEN, api_version=version)
    assert client.contact_url(CONTACT_REF) == contact_url(version)


@pytest.mark.parametrize(
    "ref", [CONTACT_REF, CONTACT_REF.upper(), "c-1", "a.b_c", "...", "x" * 128, "_", "0"]
)
def test_usable_contact_refs_pass_unchanged(ref: str) -> None:
    assert contact_ref_path(ref) == ref


BAD_REFS = [
    "../x",
    "a/b",
    "",
    "x" * 129,
    "%2e",
    ".",
    "..",
    "a b",
    "x\n",
    "c?x=1",
    "c#f",
    "é",
    "c\\d",
    f"{BASE}/v2/orderContacts/{CONTACT_REF}",
]


@pytest.mark.parametrize("ref", BAD_REFS)
async def test_a_bad_contact_ref_is_rejected_without_any_request(
    mocked: aioresponses, client: CdpClient, ref: str
) -> None:
    with pytest.raises(ValueError, match="URL"):
        contact_ref_path(ref)
    with pytest.raises(ValueError, match="URL"):
        client.contact_url(ref)
    expected = Outcome(Verdict.REJECTED, "bad_ref", message="contact ref is not usable in a URL")
    assert await client.get_contact(ref) == expected
    assert await client.update_contact(ref, BODY) == expected
    assert await client.delete_contact(ref) == expected
    assert mocked.requests == {}


@pytest.mark.parametrize(("version", "method"), [("v2", "POST"), ("v2.1", "PUT")])
async def test_update_replaces_the_contact_with_the_body_given(
    mocked: aioresponses, version: str, method: str
) -> None:
    client = CdpClient(BASE, KEY, TOKEN, api_version=version)
    await client.open()
    body = {**BODY, "street": ["1 Main St", "Apt 2"], "city": "Dublin"} if method == "PUT" else BODY
    try:
        mocked.add(contact_url(version), method, status=200, payload=created(version=version))
        outcome = await client.update_contact(CONTACT_REF, body)
    finally:
        await client.close()
    assert (outcome.verdict, outcome.status) == (Verdict.OK, 200)
    assert (outcome.contact_ref, outcome.href) == (CONTACT_REF, contact_url(version))
    call = only_request(mocked, method, contact_url(version))  # one request, nothing else
    assert_cdp_headers(call)
    assert call.kwargs["data"] == orjson.dumps(body)
    assert orjson.loads(call.kwargs["data"]) == body


@pytest.mark.parametrize("version", ["v2", "v2.1"])
async def test_get_and_delete_address_the_contact_without_a_body(
    mocked: aioresponses, version: str
) -> None:
    client = CdpClient(BASE, KEY, TOKEN, api_version=version)
    await client.open()
    try:
        mocked.get(contact_url(version), payload=created(version=version))
        mocked.delete(contact_url(version), status=204 if version == "v2.1" else 200)
        read = await client.get_contact(CONTACT_REF)
        deleted = await client.delete_contact(CONTACT_REF)
    finally:
        await client.close()
    assert (read.verdict, read.contact_ref, read.href) == (
        Verdict.OK,
        CONTACT_REF,
        contact_url(version),
    )
    assert (deleted.verdict, deleted.contact_ref) == (Verdict.OK, CONTACT_REF)
    for method in ("GET", "DELETE"):
        (call,) = mocked.requests[(method, URL(contact_url(version)))]
        assert_cdp_headers(call)
        assert call.kwargs["data"] is None


@pytest.mark.parametrize(
    "payload",
    [b"", b"<html>ok</html>", b"[]", b'"updated"', b"null", b'{"ref": "x"}', b'{"href": "x"}'],
)
async def test_an_unreadable_update_echo_is_still_ok_with_the_ref(
    mocked: aioresponses, client: CdpClient, payload: bytes
) -> None:
    mocked.post(contact_url(), status=200, body=payload)
    outcome = await client.update_contact(CONTACT_REF, BODY)
    assert outcome.verdict is Verdict.OK  # we know which contact we replaced
    assert (outcome.contact_ref, outcome.href) == (CONTACT_REF, contact_url())


@pytest.mark.parametrize("payload", [b"", b"<html>ok</html>", b"[]", b"null", b'{"ref": "x"}'])
async def test_an_unreadable_contact_is_a_retry(
    mocked: aioresponses, client: CdpClient, payload: bytes
) -> None:
    mocked.get(contact_url(), status=200, body=payload)
    outcome = await client.get_contact(CONTACT_REF)
    assert (outcome.verdict, outcome.message) == (Verdict.RETRY, "unreadable contact")
    assert outcome.contact_ref is None


@pytest.mark.parametrize("payload", [b"", b"{}", orjson.dumps(created("someone-else"))])
async def test_a_delete_is_ok_with_the_ref_whatever_its_body(
    mocked: aioresponses, client: CdpClient, payload: bytes
) -> None:
    mocked.delete(contact_url(), status=200, body=payload)
    outcome = await client.delete_contact(CONTACT_REF)
    assert (outcome.verdict, outcome.contact_ref) == (Verdict.OK, CONTACT_REF)


async def test_update_honours_retry_after(mocked: aioresponses, client: CdpClient) -> None:
    mocked.post(contact_url(), status=429, body=b"", headers={"Retry-After": "7"})
    mocked.post(contact_url(), status=503, body=b"", headers={"Retry-After": http_date(60)})
    mocked.post(contact_url(), status=429, body=b"", headers={"Retry-After": "86400"})
    throttled = await client.update_contact(CONTACT_REF, BODY)
    assert (throttled.verdict, throttled.retry_after) == (Verdict.RETRY, 7.0)
    dated = await client.update_contact(CONTACT_REF, BODY)
    assert dated.retry_after is not None
    assert 57.0 <= dated.retry_after <= 61.0
    capped = await client.update_contact(CONTACT_REF, BODY)
    assert capped.retry_after == RETRY_AFTER_CAP


@pytest.mark.parametrize(
    ("exc", "changing_verdict", "label"),
    [
        (TimeoutError(), Verdict.IN_DOUBT, "timeout"),
        (aiohttp.SocketTimeoutError("read"), Verdict.IN_DOUBT, "timeout"),
        (aiohttp.ServerDisconnectedError(), Verdict.IN_DOUBT, "connection"),
        (aiohttp.ClientOSError(104, "reset"), Verdict.IN_DOUBT, "connection"),
        (connector_error(), Verdict.RETRY, "connection"),
        (aiohttp.ConnectionTimeoutError(), Verdict.RETRY, "connection"),
    ],
)
async def test_no_answer_is_in_doubt_for_update_and_delete_and_a_retry_for_get(
    mocked: aioresponses,
    client: CdpClient,
    exc: BaseException,
    changing_verdict: Verdict,
    label: str,
) -> None:
    mocked.post(contact_url(), exception=exc)
    mocked.delete(contact_url(), exception=exc)
    mocked.get(contact_url(), exception=exc)
    updated = await client.update_contact(CONTACT_REF, BODY)
    deleted = await client.delete_contact(CONTACT_REF)
    read = await client.get_contact(CONTACT_REF)
    for outcome in (updated, deleted):
        assert (outcome.verdict, outcome.label, outcome.status) == (changing_verdict, label, None)
        assert outcome.duration > 0
    assert (read.verdict, read.label, read.status) == (Verdict.RETRY, label, None)


async def test_outcomes_never_show_credentials(mocked: aioresponses, client: CdpClient) -> None:
    # A proxy's debug page that echoes the request's credentials back.
    echo = f"denied: Authorization: {BASIC} for {KEY} / {TOKEN}".encode()
    for method, url, _call in OPERATIONS.values():
        mocked.add(url, method, status=401, body=echo, repeat=True)
    outcomes = [await call(client) for _method, _url, call in OPERATIONS.values()]
    outcomes.append(await client.get_contact("../x"))
    for outcome in outcomes:
        assert outcome.verdict in (Verdict.AUTH, Verdict.REJECTED)
        for shown in (repr(outcome), str(outcome)):
            for secret in (KEY, TOKEN, BASIC, BASIC.split()[1]):
                assert secret not in shown
    assert outcomes[0].message == "denied: Authorization: [redacted] for [redacted] / [redacted]"


# -- the client against the real emulator ----------------------------------------------------


@pytest.fixture
async def emulator_default() -> AsyncIterator[Emulator]:
    async with Emulator(EmulatorConfig(seed=3)) as running:
        yield running


def real_client(emulator: Emulator, **kwargs: Any) -> CdpClient:
    config = EmulatorConfig()
    return CdpClient(emulator.url, config.client_key, config.api_token, **kwargs)


@pytest.mark.parametrize("version", ["v2", "v2.1"])
async def test_real_create_and_list_round_trip(emulator_default: Emulator, version: str) -> None:
    client = real_client(emulator_default, api_version=version)
    await client.open()
    order = str(uuid.uuid4())
    try:
        before = await client.list_contacts(order)
        made = await client.create_contact(order, BODY)
        listed = await client.list_contacts(order.upper())
    finally:
        await client.close()
    assert (before.verdict, before.contacts) == (Verdict.OK, ())
    assert made.verdict is Verdict.OK, made
    assert made.contact_ref is not None
    assert made.href == f"{emulator_default.url}/{version}/orderContacts/{made.contact_ref}"
    assert listed.contacts == ((made.contact_ref, made.href),)
    (stored,) = emulator_default.contacts_for(order)
    assert {k: stored[k] for k in BODY} == BODY  # the emulator validated and kept the body
    assert made.duration > 0


async def test_real_get_reads_a_created_contact(emulator_default: Emulator) -> None:
    client = real_client(emulator_default)
    await client.open()
    try:
        made = await client.create_contact(ORDER, BODY)
        assert made.contact_ref is not None
        read = await client.get_contact(made.contact_ref)
        missing = await client.get_contact("no-such-contact")
    finally:
        await client.close()
    assert (read.verdict, read.contact_ref, read.href) == (Verdict.OK, made.contact_ref, made.href)
    assert (missing.verdict, missing.status) == (Verdict.NOT_FOUND, 404)


async def test_real_wrong_credentials_and_invalid_body(emulator_default: Emulator) -> None:
    wrong = CdpClient(emulator_default.url, "someone", "else")
    await wrong.open()
    client = real_client(emulator_default)
    await client.open()
    try:
        auth = await wrong.create_contact(ORDER, BODY)
        rejected = await client.create_contact(ORDER, {"firstName": "John"})
    finally:
        await wrong.close()
        await client.close()
    assert (auth.verdict, auth.status) == (Verdict.AUTH, 401)
    assert (rejected.verdict, rejected.status) == (Verdict.REJECTED, 400)
    assert rejected.message is not None
    assert "lastName" in rejected.message
    assert emulator_default.stats()["contacts"] == 0


async def test_real_timeout_after_create_is_in_doubt_and_the_contact_exists(
    emulator_default: Emulator,
) -> None:
    emulator_default.config.timeout_after_create_rate = 1.0
    emulator_default.config.hang_seconds = 5.0  # woken at once when the emulator stops
    client = real_client(emulator_default, timeout=0.3)
    await client.open()
    try:
        started = time.monotonic()
        outcome = await client.create_contact(ORDER, BODY)
        elapsed = time.monotonic() - started
        emulator_default.config.timeout_after_create_rate = 0.0
        listed = await client.list_contacts(ORDER)
    finally:
        await client.close()
    assert (outcome.verdict, outcome.label, outcome.status) == (Verdict.IN_DOUBT, "timeout", None)
    assert elapsed < 4.0  # the client's timeout, not the emulator's hang
    assert 0.25 <= outcome.duration < 4.0
    (stored,) = emulator_default.contacts_for(ORDER)
    assert listed.contacts == ((stored["ref"], stored["href"]),)  # reconciliation finds it


async def test_real_reset_after_create_is_in_doubt(emulator_default: Emulator) -> None:
    emulator_default.config.reset_after_create_rate = 1.0
    client = real_client(emulator_default)
    await client.open()
    try:
        outcome = await client.create_contact(ORDER, BODY)
    finally:
        await client.close()
    assert (outcome.verdict, outcome.label, outcome.status) == (
        Verdict.IN_DOUBT,
        "connection",
        None,
    )
    assert len(emulator_default.contacts_for(ORDER)) == 1
    assert emulator_default.stats()["faults"] == {"reset_after_create": 1}


async def test_real_refused_connection_is_a_plain_retry() -> None:
    client = CdpClient(f"http://127.0.0.1:{free_port()}", KEY, TOKEN, timeout=2.0)
    await client.open()
    try:
        posted = await client.create_contact(ORDER, BODY)
        listed = await client.list_contacts(ORDER)
    finally:
        await client.close()
    assert (posted.verdict, posted.label) == (Verdict.RETRY, "connection")  # nothing was sent
    assert (listed.verdict, listed.label) == (Verdict.RETRY, "connection")


def test_outcome_defaults() -> None:
    outcome = Outcome(Verdict.RETRY, "timeout")
    assert (outcome.status, outcome.retry_after, outcome.contacts) == (None, None, ())
