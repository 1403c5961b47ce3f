"""The CDP emulator over real HTTP: it must be as strict as CDP and its faults must be real.

The worker's own tests trust this emulator to catch wrong bodies, missing auth, duplicate
contacts and rate-limit breaches, so each rule is pinned down here.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from worker.emulator import Emulator, EmulatorConfig, add_cli_arguments, config_from_args
from worker.emulator.faults import peak_in_window

ISO_MS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
GUEST = "9d94ee11-7043-4b71-980c-a777d00a7b46"


def basic(key: str = "emulator-key", token: str = "emulator-token") -> str:
    """By hand: aiohttp.BasicAuth is deprecated in 3.14 and warnings are errors here."""
    return "Basic " + base64.b64encode(f"{key}:{token}".encode()).decode()


HEADERS = {"Authorization": basic(), "Accept": "application/json"}


def contact(**extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"title": "Mr", "firstName": "John", "lastName": "Doe"}
    body.update(extra)
    return body


def new_order() -> str:
    return str(uuid.uuid4())


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    async with Emulator(EmulatorConfig(seed=7)) as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def post(
    session: aiohttp.ClientSession,
    emulator: Emulator,
    order_ref: str,
    body: Any,
    *,
    version: str = "v2",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], Any]:
    """POST a contact; returns (status, response headers, decoded JSON body)."""
    url = f"{emulator.url}/{version}/orders/{order_ref}/contacts"
    sent = headers if headers is not None else HEADERS
    async with session.post(url, json=body, headers=sent) as response:
        return response.status, dict(response.headers), orjson.loads(await response.read())


async def get(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with session.get(url, headers=headers if headers is not None else HEADERS) as response:
        return response.status, orjson.loads(await response.read())


async def send(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """Any request; returns (status, response headers, decoded JSON body or None if empty)."""
    sent = headers if headers is not None else HEADERS
    async with session.request(method, url, json=body, headers=sent) as response:
        raw = await response.read()
        return response.status, dict(response.headers), orjson.loads(raw) if raw else None


def contact_url(emulator: Emulator, ref: str, version: str = "v2") -> str:
    return f"{emulator.url}/{version}/orderContacts/{ref}"


# The update of each version: (version, method).
UPDATES = [("v2", "POST"), ("v2.1", "PUT")]


def assert_cdp_error(body: Any, status: int) -> None:
    assert body["status"] == status
    assert body["code"] == status
    assert isinstance(body["message"], str)
    assert body["message"]
    assert isinstance(body["developerMessage"], str)
    assert body["moreInfoUrl"] == "https://doc.sitecore.com/cdp"


# --------------------------------------------------------------------------- success


@pytest.mark.parametrize("version", ["v2", "v2.1"])
async def test_create_answers_201_in_cdp_shape(
    emulator: Emulator, session: aiohttp.ClientSession, version: str
) -> None:
    order = new_order()
    body = contact(
        gender="male",
        dateOfBirth="1985-12-24T00:00:00.000Z",
        emails=["john@example.com"],
        phoneNumbers=["+353161123345"],
        nationality="Irish",
        country="IE",
        passportNumber="PZ4A9565",
        passportExpiry="2031-01-01T00:00:00.000Z",
        identifiers=[{"provider": "BookingSystem", "id": "C-991"}],
        guest={"href": f"https://api.example/{version}/guests/{GUEST}"},
    )
    status, _, created = await post(session, emulator, order, body, version=version)
    assert status == 201
    ref = created["ref"]
    assert UUID_RE.fullmatch(ref)
    assert created["href"] == f"{emulator.url}/{version}/orderContacts/{ref}"
    assert created["order"] == {"href": f"{emulator.url}/{version}/orders/{order}"}
    assert ISO_MS.fullmatch(created["createdAt"])
    assert ISO_MS.fullmatch(created["modifiedAt"])
    for name, value in body.items():
        assert created[name] == value
    assert emulator.contacts_for(order) == [created]


async def test_v2_1_accepts_address_fields(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    address = {"street": ["1 Main St", "Apt 2"], "city": "Dublin", "state": "Leinster"}
    status, _, created = await post(
        session, emulator, new_order(), contact(**address), version="v2.1"
    )
    assert status == 201
    assert {name: created[name] for name in address} == address


async def test_list_and_get_contacts(emulator: Emulator, session: aiohttp.ClientSession) -> None:
    order = new_order()
    _, _, created = await post(session, emulator, order, contact())
    ref = created["ref"]

    status, listing = await get(session, f"{emulator.url}/v2/orders/{order}/contacts")
    assert status == 200
    assert listing == {
        "href": f"{emulator.url}/v2/orders/{order}/contacts",
        "offset": 0,
        "limit": 10,
        "items": [{"href": f"{emulator.url}/v2/orderContacts/{ref}"}],
    }
    # v2.1 list items also carry the ref, so a reconciling client needs no URL parsing.
    _, listing = await get(session, f"{emulator.url}/v2.1/orders/{order}/contacts")
    assert listing["items"] == [{"href": f"{emulator.url}/v2.1/orderContacts/{ref}", "ref": ref}]

    status, fetched = await get(session, f"{emulator.url}/v2/orderContacts/{ref}")
    assert status == 200
    assert fetched == created


async def test_unknown_order_lists_empty_and_unknown_contact_is_404(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    status, listing = await get(session, f"{emulator.url}/v2/orders/{new_order()}/contacts")
    assert (status, listing["items"]) == (200, [])
    status, body = await get(session, f"{emulator.url}/v2/orderContacts/{new_order()}")
    assert status == 404
    assert_cdp_error(body, 404)


async def test_order_ref_is_matched_case_insensitively(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    order = new_order()
    await post(session, emulator, order.upper(), contact())
    _, listing = await get(session, f"{emulator.url}/v2/orders/{order}/contacts")
    assert len(listing["items"]) == 1


# --------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": basic("emulator-key", "wrong-token")},
        {"Authorization": "Bearer emulator-token"},
        {"Authorization": "Basic not-base64!"},
    ],
    ids=["missing", "wrong-token", "wrong-scheme", "garbage"],
)
async def test_bad_credentials_are_401(
    emulator: Emulator, session: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    order = new_order()
    status, answer_headers, body = await post(session, emulator, order, contact(), headers=headers)
    assert status == 401
    assert_cdp_error(body, 401)
    assert answer_headers["WWW-Authenticate"].startswith("Basic")
    assert emulator.contacts_for(order) == []


async def test_configured_credentials_are_required(session: aiohttp.ClientSession) -> None:
    config = EmulatorConfig(client_key="k", api_token="t")
    async with Emulator(config) as emulator:
        status, _, _ = await post(session, emulator, new_order(), contact())
        assert status == 401
        good = {"Authorization": basic("k", "t")}
        status, _, _ = await post(session, emulator, new_order(), contact(), headers=good)
        assert status == 201


async def test_forbidden_answers_403_to_valid_credentials(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    emulator.config.forbidden = True
    status, _, body = await post(session, emulator, new_order(), contact())
    assert status == 403
    assert_cdp_error(body, 403)
    status, _ = await get(session, f"{emulator.url}/v2/orders/{new_order()}/contacts")
    assert status == 403
    assert emulator.stats()["contacts"] == 0


async def test_auth_failure_rejects_every_request(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    emulator.config.auth_failure = True
    status, _, body = await post(session, emulator, new_order(), contact())
    assert status == 401
    assert_cdp_error(body, 401)
    emulator.config.auth_failure = False  # live: the worker's auth probe must then succeed
    status, _, _ = await post(session, emulator, new_order(), contact())
    assert status == 201


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "body",
    [
        contact(orderRef="d680c9be-4c07-4731-857e-9602034b15f2"),
        contact(eventId="bk-1"),
        contact(title="Mister"),
        contact(title="mr"),
        contact(gender="Male"),
        contact(dateOfBirth="1985-12-24"),
        contact(dateOfBirth="1985-12-24T00:00:00Z"),
        contact(dateOfBirth="1985-12-24T00:00:00.000+00:00"),
        contact(passportExpiry="2031-13-01T00:00:00.000Z"),
        contact(lastName=""),
        contact(lastName="   "),
        contact(firstName=None),
        {"lastName": "Doe"},
        {"firstName": "John"},
        contact(emails="john@example.com"),
        contact(phoneNumbers=[353161123345]),
        contact(country="ie"),
        contact(country="IRL"),
        contact(nationality=["Irish"]),
        contact(identifiers=[{"provider": "BookingSystem"}]),
        contact(identifiers=[{"provider": "B", "id": "1", "expiryDate": "2031-01-01"}]),
        contact(identifiers=[{"provider": "B", "id": "1", "extra": "x"}]),
        contact(guest={"href": f"https://api.example/v2/guests/{GUEST[:-1]}"}),
        contact(guest={"href": f"https://api.example/v2/guests/{GUEST}", "ref": GUEST}),
        contact(guest=GUEST),
        contact(street=["1 Main St"]),
        contact(city="Dublin"),
        contact(state="Leinster"),
    ],
    ids=[
        "envelope-orderRef",
        "envelope-eventId",
        "unknown-title",
        "title-case",
        "gender-case",
        "date-only",
        "date-no-millis",
        "date-offset",
        "date-impossible",
        "empty-lastName",
        "blank-lastName",
        "null-firstName",
        "missing-firstName",
        "missing-lastName",
        "emails-not-array",
        "phone-not-string",
        "country-lowercase",
        "country-alpha3",
        "nationality-not-string",
        "identifier-without-id",
        "identifier-date-only",
        "identifier-unknown-field",
        "guest-href-not-uuid",
        "guest-extra-field",
        "guest-not-object",
        "street-under-v2",
        "city-under-v2",
        "state-under-v2",
    ],
)
async def test_invalid_bodies_are_400_and_create_nothing(
    emulator: Emulator, session: aiohttp.ClientSession, body: dict[str, Any]
) -> None:
    order = new_order()
    status, _, answer = await post(session, emulator, order, body)
    assert status == 400
    assert_cdp_error(answer, 400)
    assert emulator.contacts_for(order) == []


async def test_error_messages_name_the_field_not_the_value(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    _, _, answer = await post(session, emulator, new_order(), contact(passportNumber=12345678))
    assert "passportNumber" in answer["message"]
    assert "12345678" not in orjson.dumps(answer).decode()


@pytest.mark.parametrize("order_ref", ["not-a-uuid", "123", GUEST.replace("-", "")])
async def test_order_ref_must_be_a_uuid(
    emulator: Emulator, session: aiohttp.ClientSession, order_ref: str
) -> None:
    status, _, answer = await post(session, emulator, order_ref, contact())
    assert status == 400
    assert_cdp_error(answer, 400)
    status, _ = await get(session, f"{emulator.url}/v2/orders/{order_ref}/contacts")
    assert status == 400


async def test_content_type_must_be_json(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    url = f"{emulator.url}/v2/orders/{new_order()}/contacts"
    headers = {**HEADERS, "Content-Type": "text/plain"}
    async with session.post(url, data=orjson.dumps(contact()), headers=headers) as response:
        assert response.status == 415
        assert_cdp_error(orjson.loads(await response.read()), 415)


@pytest.mark.parametrize(
    ("raw", "status"),
    [(b"{not json", 400), (b"[]", 400), (b'"text"', 400), (b"{" + b" " * 70_000 + b"}", 413)],
    ids=["malformed", "array", "string", "too-large"],
)
async def test_body_must_be_a_small_json_object(
    emulator: Emulator, session: aiohttp.ClientSession, raw: bytes, status: int
) -> None:
    url = f"{emulator.url}/v2/orders/{new_order()}/contacts"
    headers = {**HEADERS, "Content-Type": "application/json"}
    async with session.post(url, data=raw, headers=headers) as response:
        assert response.status == status
        assert_cdp_error(orjson.loads(await response.read()), status)


async def test_unknown_version_and_method_are_cdp_errors(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    status, body = await get(session, f"{emulator.url}/v3/orders/{new_order()}/contacts")
    assert status == 404
    assert_cdp_error(body, 404)
    url = f"{emulator.url}/v2/orders/{new_order()}/contacts"
    async with session.delete(url, headers=HEADERS) as response:
        assert response.status == 405
        assert_cdp_error(orjson.loads(await response.read()), 405)


# --------------------------------------------------------------------------- duplicates, stats


async def test_second_post_creates_a_second_contact_and_stats_show_it(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    twice, once = new_order(), new_order()
    for order in (twice, twice, once):
        status, _, _ = await post(session, emulator, order, contact())
        assert status == 201
    await get(session, f"{emulator.url}/v2/orders/{twice}/contacts")
    stats = emulator.stats()
    assert stats["contacts"] == 3
    assert stats["orders"] == 2
    assert stats["duplicate_orders"] == 1
    assert stats["contacts_per_order"] == {twice: 2, once: 1}
    assert stats["requests"] == {"POST": 3, "GET": 1}
    assert stats["responses"] == {"201": 3, "200": 1}
    assert stats["first_request_at"] <= stats["last_request_at"]
    # The same numbers over HTTP, for the benchmark that runs the emulator in another process.
    status, over_http = await get(session, f"{emulator.url}/_emulator/stats", headers={})
    assert status == 200
    assert over_http["contacts_per_order"] == stats["contacts_per_order"]


async def test_progress_is_the_stats_a_poller_needs_in_constant_time(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    # A benchmark polls while a run goes on: stats' per-order tables grow with the run,
    # and building them paused the emulator (20-30 ms at 4,000 orders), bunching the
    # requests that arrived meanwhile into a busier second than was sent.
    twice, once = new_order(), new_order()
    for order in (twice, twice, once):
        await post(session, emulator, order, contact())
    status, progress = await get(session, f"{emulator.url}/_emulator/progress", headers={})
    assert status == 200
    stats = emulator.stats()
    assert progress == {
        key: stats[key]
        for key in (
            "contacts", "orders", "requests", "responses",
            "first_request_at", "last_request_at", "duration_seconds",
        )
    }  # fmt: skip
    assert progress["orders"] == 2


async def test_reset_forgets_contacts_and_stats(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    order = new_order()
    await post(session, emulator, order, contact())
    async with session.post(f"{emulator.url}/_emulator/reset") as response:
        assert response.status == 200
    stats = emulator.stats()
    assert (stats["contacts"], stats["requests"], stats["responses"]) == (0, {}, {})
    assert stats["max_posts_in_any_second"] == 0
    assert emulator.contacts_for(order) == []


def test_peak_in_window_counts_half_open_one_second_windows() -> None:
    assert peak_in_window([]) == 0
    assert peak_in_window([0.0, 0.5, 0.99, 1.0, 1.5]) == 3  # 1.0 is out of [0.0, 1.0)
    assert peak_in_window([0.0, 2.0, 2.1, 2.2, 3.5]) == 3


# --------------------------------------------------------------------------- rate limit


async def test_rate_limit_answers_429_with_retry_after(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    emulator.config.rate_limit = 5
    results = await asyncio.gather(
        *(post(session, emulator, new_order(), contact()) for _ in range(12))
    )
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [201] * 5 + [429] * 7
    for status, headers, body in results:
        if status == 429:
            # When the window frees a slot, in seconds with milliseconds.
            assert re.fullmatch(r"[01]\.[0-9]{3}", headers["Retry-After"])
            assert 0 < float(headers["Retry-After"]) <= 1.0
            assert_cdp_error(body, 429)
    stats = emulator.stats()
    assert stats["contacts"] == 5  # a 429'd request creates nothing
    assert stats["max_posts_in_any_second"] == 12
    assert stats["accepted_per_second_peak"] == 5


async def test_rate_limit_window_slides(emulator: Emulator, session: aiohttp.ClientSession) -> None:
    emulator.config.rate_limit = 2
    first = [(await post(session, emulator, new_order(), contact()))[0] for _ in range(3)]
    assert first == [201, 201, 429]
    await asyncio.sleep(1.05)
    status, _, _ = await post(session, emulator, new_order(), contact())
    assert status == 201
    assert emulator.stats()["accepted_per_second_peak"] == 2


async def test_auth_failures_do_not_reach_the_rate_limiter(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    emulator.config.rate_limit = 1
    for _ in range(3):
        status, _, _ = await post(session, emulator, new_order(), contact(), headers={})
        assert status == 401
    status, _, _ = await post(session, emulator, new_order(), contact())
    assert status == 201
    assert emulator.stats()["max_posts_in_any_second"] == 1


# --------------------------------------------------------------------------- faults


async def test_error_rate_answers_5xx_before_creating(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    emulator.config.error_rate = 1.0
    results = [await post(session, emulator, new_order(), contact()) for _ in range(10)]
    for status, _, body in results:
        assert status in (500, 502, 503)
        assert_cdp_error(body, status)
    stats = emulator.stats()
    assert stats["contacts"] == 0
    assert stats["faults"] == {"error": 10}


async def test_timeout_after_create_leaves_the_contact_behind(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    emulator.config.timeout_after_create_rate = 1.0
    emulator.config.hang_seconds = 2.0
    order = new_order()
    url = f"{emulator.url}/v2/orders/{order}/contacts"
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with session.post(
            url, json=contact(), headers=HEADERS, timeout=aiohttp.ClientTimeout(total=0.3)
        ) as response:
            await response.read()
    assert time.monotonic() - started < 1.5
    assert len(emulator.contacts_for(order)) == 1
    emulator.config.timeout_after_create_rate = 0.0
    _, listing = await get(session, f"{emulator.url}/v2/orders/{order}/contacts")
    assert len(listing["items"]) == 1  # what the worker's reconciliation will find


async def test_hang_ends_with_201_for_a_patient_client(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    emulator.config.timeout_after_create_rate = 1.0
    emulator.config.hang_seconds = 0.2
    started = time.monotonic()
    status, _, _ = await post(session, emulator, new_order(), contact())
    assert status == 201
    assert time.monotonic() - started >= 0.2


async def test_reset_after_create_drops_the_connection_after_creating(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    emulator.config.reset_after_create_rate = 1.0
    order = new_order()
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(session, emulator, order, contact())
    assert len(emulator.contacts_for(order)) == 1
    stats = emulator.stats()
    assert stats["faults"] == {"reset_after_create": 1}
    assert stats["responses"] == {}  # nothing was answered


async def test_not_found_for_makes_new_orders_404_for_a_while(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    emulator.config.not_found_for = 0.3
    order = new_order()
    status, _, body = await post(session, emulator, order, contact())
    assert status == 404
    assert_cdp_error(body, 404)
    assert emulator.contacts_for(order) == []
    await asyncio.sleep(0.35)
    status, _, _ = await post(session, emulator, order, contact())
    assert status == 201


async def test_latency_delays_every_answer(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    emulator.config.latency = 0.15
    emulator.config.latency_jitter = 0.05
    started = time.monotonic()
    status, _ = await get(session, f"{emulator.url}/v2/orders/{new_order()}/contacts", {})
    assert status == 401  # refusals are slow too
    assert time.monotonic() - started >= 0.1


async def test_seeded_faults_are_reproducible(session: aiohttp.ClientSession) -> None:
    async def statuses() -> list[int]:
        async with Emulator(EmulatorConfig(seed=42, error_rate=0.5)) as emulator:
            return [(await post(session, emulator, new_order(), contact()))[0] for _ in range(20)]

    first, second = await statuses(), await statuses()
    assert first == second
    assert 201 in first
    assert any(status >= 500 for status in first)


# --------------------------------------------------------------------------- updates, deletes


async def created_contact(
    session: aiohttp.ClientSession, emulator: Emulator, version: str = "v2", **extra: Any
) -> tuple[str, dict[str, Any]]:
    """A new order with one contact: (orderRef, the 201 body)."""
    order = new_order()
    status, _, created = await post(session, emulator, order, contact(**extra), version=version)
    assert status == 201
    return order, created


@pytest.mark.parametrize(("version", "method"), UPDATES)
async def test_update_replaces_the_whole_contact(
    emulator: Emulator, session: aiohttp.ClientSession, version: str, method: str
) -> None:
    order, created = await created_contact(
        session,
        emulator,
        version,
        emails=["john@example.com"],
        guest={"href": f"https://api.example/{version}/guests/{GUEST}"},
    )
    ref = created["ref"]
    replacement = {"firstName": "Jane", "lastName": "Roe", "gender": "female", "country": "FR"}
    status, _, updated = await send(
        session, method, contact_url(emulator, ref, version), replacement
    )
    assert status == 200
    # The whole resource is the new body: emails, title and guest, absent from it, are gone.
    fields = {
        k: v
        for k, v in updated.items()
        if k not in ("href", "ref", "createdAt", "modifiedAt", "order")
    }
    assert fields == replacement
    assert updated["ref"] == ref
    assert updated["href"] == contact_url(emulator, ref, version)
    assert updated["order"] == {"href": f"{emulator.url}/{version}/orders/{order}"}
    assert updated["createdAt"] == created["createdAt"]
    assert ISO_MS.fullmatch(updated["modifiedAt"])
    assert updated["modifiedAt"] >= created["modifiedAt"]
    status, fetched = await get(session, contact_url(emulator, ref, version))
    assert (status, fetched) == (200, updated)
    assert emulator.contacts_for(order) == [updated]
    _, listing = await get(session, f"{emulator.url}/{version}/orders/{order}/contacts")
    assert len(listing["items"]) == 1  # replaced in place, not a second contact


async def test_v2_1_put_accepts_address_fields(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    _, created = await created_contact(session, emulator, "v2.1")
    address = {"street": ["1 Main St"], "city": "Dublin", "state": "Leinster"}
    url = contact_url(emulator, created["ref"], "v2.1")
    status, _, updated = await send(session, "PUT", url, contact(**address))
    assert status == 200
    assert {name: updated[name] for name in address} == address


@pytest.mark.parametrize(("version", "method"), UPDATES)
@pytest.mark.parametrize(
    "body",
    [
        {"lastName": "Doe"},
        contact(lastName=""),
        contact(orderRef="d680c9be-4c07-4731-857e-9602034b15f2"),
        contact(dateOfBirth="1985-12-24"),
        contact(country="ie"),
        contact(guest=GUEST),
        contact(ref=GUEST),
        contact(createdAt="2026-01-01T00:00:00.000Z"),
        [],
    ],
    ids=[
        "missing-firstName",
        "empty-lastName",
        "envelope-field",
        "date-only",
        "country-lowercase",
        "guest-not-object",
        "ref",
        "createdAt",
        "array",
    ],
)
async def test_invalid_updates_are_400_and_change_nothing(
    emulator: Emulator, session: aiohttp.ClientSession, version: str, method: str, body: Any
) -> None:
    order, created = await created_contact(session, emulator, version, emails=["j@example.com"])
    url = contact_url(emulator, created["ref"], version)
    status, _, answer = await send(session, method, url, body)
    assert status == 400
    assert_cdp_error(answer, 400)
    assert emulator.contacts_for(order) == [created]
    assert emulator.stats()["updates"] == 0


async def test_v2_update_rejects_address_fields(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    order, created = await created_contact(session, emulator)
    url = contact_url(emulator, created["ref"])
    status, _, answer = await send(session, "POST", url, contact(city="Dublin"))
    assert status == 400
    assert_cdp_error(answer, 400)
    assert "city" in answer["message"]
    assert emulator.contacts_for(order) == [created]


async def test_update_body_must_be_json(emulator: Emulator, session: aiohttp.ClientSession) -> None:
    order, created = await created_contact(session, emulator)
    url = contact_url(emulator, created["ref"])
    headers = {**HEADERS, "Content-Type": "text/plain"}
    async with session.post(url, data=orjson.dumps(contact()), headers=headers) as response:
        assert response.status == 415
        assert_cdp_error(orjson.loads(await response.read()), 415)
    headers = {**HEADERS, "Content-Type": "application/json"}
    async with session.post(url, data=b"{not json", headers=headers) as response:
        assert response.status == 400
    assert emulator.contacts_for(order) == [created]


async def test_patch_replaces_only_the_fields_given(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    order, created = await created_contact(
        session, emulator, "v2.1", emails=["john@example.com"], city="Dublin"
    )
    url = contact_url(emulator, created["ref"], "v2.1")
    status, _, patched = await send(session, "PATCH", url, {"lastName": "Smith", "city": "Cork"})
    assert status == 200
    expected = {**created, "lastName": "Smith", "city": "Cork", "modifiedAt": patched["modifiedAt"]}
    assert patched == expected
    assert (patched["title"], patched["emails"]) == ("Mr", ["john@example.com"])  # kept
    assert emulator.contacts_for(order) == [patched]

    # Each field given is checked as a create checks it; a bad one changes nothing.
    for bad in ({"lastName": ""}, {"firstName": None}, {"title": "Mister"}, {"eventId": "e"}):
        status, _, answer = await send(session, "PATCH", url, bad)
        assert status == 400, bad
        assert_cdp_error(answer, 400)
    assert emulator.contacts_for(order) == [patched]
    assert emulator.stats()["updates"] == 1


@pytest.mark.parametrize(
    ("version", "method"),
    [("v2", "PUT"), ("v2", "PATCH"), ("v2.1", "POST")],
)
async def test_the_other_versions_update_method_is_405(
    emulator: Emulator, session: aiohttp.ClientSession, version: str, method: str
) -> None:
    order, created = await created_contact(session, emulator, version)
    url = contact_url(emulator, created["ref"], version)
    status, headers, answer = await send(session, method, url, contact(lastName="Roe"))
    assert status == 405
    assert_cdp_error(answer, 405)
    allowed = {name.strip() for name in headers["Allow"].split(",")}
    assert method not in allowed
    assert {"GET", "DELETE"} <= allowed
    assert ("POST" if version == "v2" else "PUT") in allowed
    assert emulator.contacts_for(order) == [created]


@pytest.mark.parametrize(
    ("version", "method"),
    [*UPDATES, ("v2.1", "PATCH"), ("v2", "DELETE"), ("v2.1", "DELETE")],
)
async def test_update_and_delete_of_an_unknown_ref_are_404(
    emulator: Emulator, session: aiohttp.ClientSession, version: str, method: str
) -> None:
    url = contact_url(emulator, new_order(), version)
    body = None if method == "DELETE" else contact()
    status, _, answer = await send(session, method, url, body)
    assert status == 404
    assert_cdp_error(answer, 404)
    stats = emulator.stats()
    assert (stats["contacts"], stats["updates"], stats["deletes"]) == (0, 0, 0)


@pytest.mark.parametrize("version", ["v2", "v2.1"])
async def test_delete_removes_the_contact_everywhere(
    emulator: Emulator, session: aiohttp.ClientSession, version: str
) -> None:
    order, created = await created_contact(session, emulator, version)
    url = contact_url(emulator, created["ref"], version)
    async with session.delete(url, headers=HEADERS) as response:
        assert response.status == 204
        assert await response.read() == b""
    _, listing = await get(session, f"{emulator.url}/{version}/orders/{order}/contacts")
    assert listing["items"] == []
    status, answer = await get(session, url)
    assert status == 404
    assert_cdp_error(answer, 404)
    assert emulator.contacts_for(order) == []
    # Already gone: a second delete, and any update, are 404 and bring nothing back.
    status, _, answer = await send(session, "DELETE", url)
    assert status == 404
    assert_cdp_error(answer, 404)
    for update_version, method in [*UPDATES, ("v2.1", "PATCH")]:
        update_url = contact_url(emulator, created["ref"], update_version)
        status, _, answer = await send(session, method, update_url, contact())
        assert status == 404, (update_version, method)
        assert_cdp_error(answer, 404)
    stats = emulator.stats()
    assert (stats["contacts"], stats["orders"], stats["contacts_per_order"]) == (0, 0, {})
    assert stats["per_order"] == {order: {"live": [], "creates": 1, "updates": 0, "deletes": 1}}


async def test_delete_of_a_duplicate_leaves_the_other_contact(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    order = new_order()
    refs = [(await post(session, emulator, order, contact()))[2]["ref"] for _ in range(2)]
    assert emulator.stats()["duplicate_orders"] == 1
    status, _, _ = await send(session, "DELETE", contact_url(emulator, refs[0]))
    assert status == 204
    _, listing = await get(session, f"{emulator.url}/v2.1/orders/{order}/contacts")
    assert [item["ref"] for item in listing["items"]] == [refs[1]]
    assert [stored["ref"] for stored in emulator.contacts_for(order)] == [refs[1]]
    stats = emulator.stats()
    assert (stats["contacts"], stats["duplicate_orders"]) == (1, 0)
    assert stats["contacts_per_order"] == {order: 1}


async def test_stats_count_writes_per_order_and_requests_by_kind(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    kept, erased = new_order(), new_order()
    _, _, first = await post(session, emulator, kept, contact())
    _, _, second = await post(session, emulator, kept, contact())
    _, _, gone = await post(session, emulator, erased, contact(), version="v2.1")
    await send(session, "POST", contact_url(emulator, first["ref"]), contact(lastName="Roe"))
    await send(session, "PATCH", contact_url(emulator, first["ref"], "v2.1"), {"title": "Dr"})
    await send(session, "DELETE", contact_url(emulator, second["ref"]))
    await send(session, "DELETE", contact_url(emulator, gone["ref"], "v2.1"))
    await send(session, "DELETE", contact_url(emulator, gone["ref"], "v2.1"))  # 404
    await get(session, f"{emulator.url}/v2/orders/{kept}/contacts")
    await get(session, contact_url(emulator, first["ref"]))
    await send(session, "PUT", contact_url(emulator, first["ref"]), contact())  # 405 on v2

    stats = emulator.stats()
    assert stats["per_order"] == {
        kept: {"live": [first["ref"]], "creates": 2, "updates": 2, "deletes": 1},
        erased: {"live": [], "creates": 1, "updates": 0, "deletes": 1},
    }
    assert (stats["creates"], stats["updates"], stats["deletes"]) == (3, 2, 2)
    assert (stats["contacts"], stats["orders"], stats["duplicate_orders"]) == (1, 1, 0)
    assert stats["contacts_per_order"] == {kept: 1}
    assert stats["requests"] == {"POST": 4, "PATCH": 1, "DELETE": 3, "GET": 2, "PUT": 1}
    assert stats["requests_by_kind"] == {
        "create": 3, "update": 2, "delete": 3, "list": 1, "get": 1, "other": 1
    }  # fmt: skip
    assert stats["responses_by_kind"] == {
        "create": {"201": 3},
        "update": {"200": 2},
        "delete": {"204": 2, "404": 1},
        "list": {"200": 1},
        "get": {"200": 1},
        "other": {"405": 1},
    }
    assert stats["responses"] == {"201": 3, "200": 4, "204": 2, "404": 1, "405": 1}
    status, over_http = await get(session, f"{emulator.url}/_emulator/stats", headers={})
    assert status == 200
    assert over_http["per_order"] == stats["per_order"]
    assert over_http["responses_by_kind"] == stats["responses_by_kind"]


async def test_stats_list_every_kind_before_any_request(emulator: Emulator) -> None:
    stats = emulator.stats()
    assert stats["requests_by_kind"] == dict.fromkeys(
        ("create", "update", "delete", "list", "get"), 0
    )
    assert stats["responses_by_kind"] == {kind: {} for kind in stats["requests_by_kind"]}
    assert (stats["per_order"], stats["creates"], stats["updates"], stats["deletes"]) == (
        {},
        0,
        0,
        0,
    )


async def test_contacts_for_returns_copies(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    order, created = await created_contact(session, emulator)
    (copy,) = emulator.contacts_for(order)
    copy["lastName"] = "Changed"
    assert emulator.contacts_for(order) == [created]


async def update_or_delete(
    session: aiohttp.ClientSession,
    emulator: Emulator,
    kind: str,
    ref: str,
    *,
    timeout: float | None = None,
) -> int:
    """A v2.1 update (PUT) or delete of `ref`; returns the status."""
    url = contact_url(emulator, ref, "v2.1")
    body = contact(lastName="Roe") if kind == "update" else None
    method = "PUT" if kind == "update" else "DELETE"
    client_timeout = aiohttp.ClientTimeout(total=timeout) if timeout else aiohttp.ClientTimeout()
    async with session.request(
        method, url, json=body, headers=HEADERS, timeout=client_timeout
    ) as response:
        await response.read()
        return response.status


async def assert_applied(
    session: aiohttp.ClientSession, emulator: Emulator, kind: str, order: str, ref: str
) -> None:
    """What the worker will see when it looks after a write it got no answer to."""
    status, fetched = await get(session, contact_url(emulator, ref, "v2.1"))
    _, listing = await get(session, f"{emulator.url}/v2.1/orders/{order}/contacts")
    if kind == "update":
        assert (status, fetched["lastName"]) == (200, "Roe")
        assert [item["ref"] for item in listing["items"]] == [ref]
    else:
        assert status == 404
        assert listing["items"] == []
        assert emulator.contacts_for(order) == []


@pytest.mark.parametrize("kind", ["update", "delete"])
async def test_timeout_after_a_write_applies_it_then_hangs(
    emulator: Emulator, session: aiohttp.ClientSession, kind: str
) -> None:
    order, created = await created_contact(session, emulator, "v2.1")
    setattr(emulator.config, f"timeout_after_{kind}_rate", 1.0)
    emulator.config.hang_seconds = 2.0
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await update_or_delete(session, emulator, kind, created["ref"], timeout=0.3)
    assert time.monotonic() - started < 1.5
    await assert_applied(session, emulator, kind, order, created["ref"])
    stats = emulator.stats()
    assert stats["faults"] == {f"timeout_after_{kind}": 1}
    assert stats[f"{kind}s"] == 1


@pytest.mark.parametrize("kind", ["update", "delete"])
async def test_hanging_write_ends_with_its_answer_for_a_patient_client(
    emulator: Emulator, session: aiohttp.ClientSession, kind: str
) -> None:
    _, created = await created_contact(session, emulator, "v2.1")
    setattr(emulator.config, f"timeout_after_{kind}_rate", 1.0)
    emulator.config.hang_seconds = 0.2
    started = time.monotonic()
    status = await update_or_delete(session, emulator, kind, created["ref"])
    assert status == (200 if kind == "update" else 204)
    assert time.monotonic() - started >= 0.2


async def raw_exchange(emulator: Emulator, method: str, path: str, body: Any = None) -> bytes:
    """One request on a connection of its own, written by hand: every byte the emulator
    sent back before closing. (aiohttp's client would resend a PUT or DELETE once after a
    dropped connection, hiding the drop.)"""
    payload = orjson.dumps(body) if body is not None else b""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{emulator.port}\r\n"
        f"Authorization: {basic()}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", emulator.port)
    try:
        writer.write(head.encode() + payload)
        await writer.drain()
        try:
            async with asyncio.timeout(5):
                return await reader.read()  # until the emulator closes the connection
        except ConnectionResetError:
            return b""
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("kind", "version", "method"),
    [("update", "v2", "POST"), ("update", "v2.1", "PUT"), ("delete", "v2", "DELETE")],
)
async def test_reset_after_a_write_applies_it_then_drops_the_connection(
    emulator: Emulator, session: aiohttp.ClientSession, kind: str, version: str, method: str
) -> None:
    order, created = await created_contact(session, emulator, "v2.1")
    ref = created["ref"]
    # A control first: the same exchange, unfaulted, is answered.
    _, control = await created_contact(session, emulator, "v2.1")
    body = contact(lastName="Roe") if kind == "update" else None
    answer = await raw_exchange(
        emulator, method, f"/{version}/orderContacts/{control['ref']}", body
    )
    assert answer.startswith(b"HTTP/1.1 20")
    setattr(emulator.config, f"reset_after_{kind}_rate", 1.0)
    answer = await raw_exchange(emulator, method, f"/{version}/orderContacts/{ref}", body)
    assert answer == b""  # the connection closed without a byte of answer
    setattr(emulator.config, f"reset_after_{kind}_rate", 0.0)
    await assert_applied(session, emulator, kind, order, ref)
    stats = emulator.stats()
    assert stats["faults"] == {f"reset_after_{kind}": 1}
    assert stats[f"{kind}s"] == 2  # the control's and the dropped one's
    assert sum(stats["responses_by_kind"][kind].values()) == 1  # only the control answered


async def test_after_write_knobs_are_per_kind(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    order, created = await created_contact(session, emulator, "v2.1")
    # Faults of creates and deletes leave updates alone, and those of updates leave deletes.
    emulator.config.update(
        {"timeout_after_create_rate": 1.0, "reset_after_create_rate": 1.0}
        | {"timeout_after_delete_rate": 1.0, "reset_after_delete_rate": 1.0}
    )
    assert await update_or_delete(session, emulator, "update", created["ref"], timeout=1) == 200
    emulator.config.update(
        {"timeout_after_delete_rate": 0.0, "reset_after_delete_rate": 0.0}
        | {"timeout_after_update_rate": 1.0, "reset_after_update_rate": 1.0}
    )
    assert await update_or_delete(session, emulator, "delete", created["ref"], timeout=1) == 204
    assert emulator.stats()["faults"] == {}
    assert emulator.contacts_for(order) == []


async def test_error_orders_fail_updates_and_deletes_too(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    order, created = await created_contact(session, emulator, "v2.1")
    _, other = await created_contact(session, emulator, "v2.1")
    emulator.config.error_orders = [order.upper()]  # any case
    for method, body in (("PUT", contact(lastName="Roe")), ("PATCH", {"city": "Cork"})):
        status, _, answer = await send(
            session, method, contact_url(emulator, created["ref"], "v2.1"), body
        )
        assert status == 500
        assert_cdp_error(answer, 500)
    status, _, answer = await send(session, "DELETE", contact_url(emulator, created["ref"]))
    assert status == 500
    assert_cdp_error(answer, 500)
    status, fetched = await get(session, contact_url(emulator, created["ref"], "v2.1"))
    assert (status, fetched) == (200, created)  # reads are not affected, nothing changed
    # The other orders' contacts still update and delete.
    assert await update_or_delete(session, emulator, "update", other["ref"]) == 200
    assert await update_or_delete(session, emulator, "delete", other["ref"]) == 204
    stats = emulator.stats()
    assert stats["faults"] == {"error_order": 3}
    assert (stats["updates"], stats["deletes"]) == (1, 1)


async def test_error_rate_answers_updates_and_deletes_5xx_before_applying(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    order, created = await created_contact(session, emulator, "v2.1")
    emulator.config.error_rate = 1.0
    assert await update_or_delete(session, emulator, "update", created["ref"]) in (500, 502, 503)
    assert await update_or_delete(session, emulator, "delete", created["ref"]) in (500, 502, 503)
    assert emulator.contacts_for(order) == [created]


async def test_rate_limit_and_auth_apply_to_updates_and_deletes(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    order, created = await created_contact(session, emulator)
    url = contact_url(emulator, created["ref"])
    emulator.config.rate_limit = 1  # the create above used this second's request
    for method, body in (("POST", contact(lastName="Roe")), ("DELETE", None)):
        status, headers, answer = await send(session, method, url, body)
        assert status == 429
        assert 0 < float(headers["Retry-After"]) <= 1.0
        assert_cdp_error(answer, 429)
    emulator.config.rate_limit = 0
    for method, body in (("POST", contact(lastName="Roe")), ("DELETE", None)):
        status, headers, answer = await send(session, method, url, body, headers={})
        assert status == 401
        assert_cdp_error(answer, 401)
        assert headers["WWW-Authenticate"].startswith("Basic")
    emulator.config.forbidden = True
    v21 = contact_url(emulator, created["ref"], "v2.1")
    for method, target, body in (
        ("POST", url, contact(lastName="Roe")),
        ("PUT", v21, contact(lastName="Roe")),
        ("PATCH", v21, {"city": "Cork"}),
        ("DELETE", url, None),
    ):
        status, _, answer = await send(session, method, target, body)
        assert status == 403, method
        assert_cdp_error(answer, 403)
    assert emulator.contacts_for(order) == [created]
    responses = emulator.stats()["responses_by_kind"]
    assert responses["update"] == {"429": 1, "401": 1, "403": 3}
    assert responses["delete"] == {"429": 1, "401": 1, "403": 1}


# --------------------------------------------------------------------------- runtime config


async def test_patch_config_changes_behaviour_at_runtime(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    config_url = f"{emulator.url}/_emulator/config"
    async with session.patch(config_url, json={"forbidden": True, "rate_limit": 3}) as response:
        assert response.status == 200
        shown = orjson.loads(await response.read())
    assert shown["forbidden"] is True
    assert shown["rate_limit"] == 3.0
    assert emulator.config.forbidden is True
    status, _, _ = await post(session, emulator, new_order(), contact())
    assert status == 403

    async with session.patch(config_url, json={"forbidden": False}) as response:
        assert response.status == 200
    status, _, _ = await post(session, emulator, new_order(), contact())
    assert status == 201
    status, config = await get(session, config_url, headers={})
    assert (status, config["rate_limit"], config["forbidden"]) == (200, 3.0, False)


async def test_patch_config_sets_after_write_faults(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    order, created = await created_contact(session, emulator)
    changes = {"timeout_after_delete_rate": 1, "hang_seconds": 0.1, "error_orders": []}
    async with session.patch(f"{emulator.url}/_emulator/config", json=changes) as response:
        assert response.status == 200
        shown = orjson.loads(await response.read())
    assert shown["timeout_after_delete_rate"] == 1.0
    assert isinstance(emulator.config.timeout_after_delete_rate, float)
    assert (shown["timeout_after_update_rate"], shown["reset_after_update_rate"]) == (0.0, 0.0)
    status, _, _ = await send(session, "DELETE", contact_url(emulator, created["ref"]))
    assert status == 204  # after the hang
    assert emulator.stats()["faults"] == {"timeout_after_delete": 1}
    assert emulator.contacts_for(order) == []


@pytest.mark.parametrize(
    "changes",
    [
        {"no_such_knob": 1},
        {"error_rate": 1.5},
        {"reset_after_update_rate": 1.5},
        {"timeout_after_delete_rate": -0.1},
        {"latency": -1},
        {"forbidden": "yes"},
        {"rate_limit": True},
        {"seed": 1.5},
        [],
    ],
)
async def test_patch_config_rejects_bad_settings_atomically(
    emulator: Emulator, session: aiohttp.ClientSession, changes: Any
) -> None:
    before = emulator.config.as_dict()
    async with session.patch(f"{emulator.url}/_emulator/config", json=changes) as response:
        assert response.status == 400
        assert_cdp_error(orjson.loads(await response.read()), 400)
    assert emulator.config.as_dict() == before


def test_config_rejects_bad_values_at_construction() -> None:
    with pytest.raises(ValueError, match="error_rate"):
        EmulatorConfig(error_rate=2)


# --------------------------------------------------------------------------- CLI


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    return parser.parse_args(argv)


def test_cli_defaults_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("EMULATOR_"):
            monkeypatch.delenv(name)
    defaults = parse([])
    assert (defaults.host, defaults.port) == ("127.0.0.1", 8080)
    assert config_from_args(defaults) == EmulatorConfig()

    monkeypatch.setenv("EMULATOR_RATE_LIMIT", "40")
    monkeypatch.setenv("EMULATOR_FORBIDDEN", "true")
    args = parse(["--error-rate", "0.1", "--seed", "3", "--reset-after-create", "0.2"])
    config = config_from_args(args)
    assert (config.rate_limit, config.error_rate, config.seed) == (40.0, 0.1, 3)
    assert (config.reset_after_create_rate, config.forbidden) == (0.2, True)
    assert config_from_args(parse(["--rate-limit", "7"])).rate_limit == 7.0  # flag wins


def test_cli_after_write_fault_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMULATOR_RESET_AFTER_UPDATE", "0.25")
    flags = "--timeout-after-update 0.1 --timeout-after-delete 0.2 --reset-after-delete 0.3"
    args = parse([*flags.split(), "--timeout-after-create", "0.4"])
    config = config_from_args(args)
    assert (config.timeout_after_update_rate, config.reset_after_update_rate) == (0.1, 0.25)
    assert (config.timeout_after_delete_rate, config.reset_after_delete_rate) == (0.2, 0.3)
    assert (config.timeout_after_create_rate, config.reset_after_create_rate) == (0.4, 0.0)


def test_cli_describes_the_routes() -> None:
    parser = argparse.ArgumentParser(prog="worker emulator")
    add_cli_arguments(parser)
    text = parser.format_help()
    for route in ("PUT", "PATCH", "DELETE", "/_emulator/stats", "--reset-after-delete"):
        assert route in text


def test_cli_rejects_bad_values(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(["--error-rate", "2"])
    assert "error-rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--reset-after-delete", "2"])
    assert "reset-after-delete" in capsys.readouterr().err


def test_run_from_args_serves_until_sigterm() -> None:
    """The `worker emulator` entry point, in its own process as the benchmark runs it."""
    code = (
        "import argparse, sys\n"
        "from worker.emulator import add_cli_arguments, run_from_args\n"
        "parser = argparse.ArgumentParser(); add_cli_arguments(parser)\n"
        "sys.exit(run_from_args(parser.parse_args(sys.argv[1:])))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "EMULATOR_API_TOKEN": "from-env"},
    )
    try:
        assert process.stdout is not None
        started = orjson.loads(process.stdout.readline())
        assert started["event"] == "emulator.started"
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", started["url"])
        assert "from-env" not in orjson.dumps(started).decode()  # never print credentials
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def test_the_command_prints_what_a_worker_needs_to_talk_to_it() -> None:
    """`worker emulator` tells the operator its URL and the credentials it accepts, as a
    block to paste; the JSON line on stdout stays as it was, without them."""
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "emulator", "--port", "0", "--client-key", "my-key"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "EMULATOR_API_TOKEN": "from-env"},
    )
    try:
        assert process.stdout is not None
        started = orjson.loads(process.stdout.readline())
        assert "my-key" not in orjson.dumps(started).decode()
        process.send_signal(signal.SIGTERM)  # what it printed at start is all there then
        _, err = process.communicate(timeout=10)
        assert process.returncode == 0
        block = [line.strip() for line in err.splitlines() if line.startswith("export ")]
        assert block == [
            f"export CDP_BASE_URL={started['url']}",
            "export CDP_CLIENT_KEY=my-key",
            "export CDP_API_TOKEN=from-env",
        ], err
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


async def test_the_emulator_freezes_what_survives_out_of_later_collections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Kept contacts filled the young generation, whose collection then walked them all
    # and paused the emulator: frozen each interval, they are never walked again.
    import gc

    from worker.emulator import command

    monkeypatch.setattr(command, "FREEZE_INTERVAL", 0.01)
    kept = {"emails": ["x@example.com"]}  # a contact's shape: tracked by the collector
    gc.unfreeze()
    assert any(obj is kept for obj in gc.get_objects())  # one it would walk
    freezing = asyncio.create_task(command._freeze_survivors())
    try:
        await asyncio.sleep(0.05)
        # get_objects lists what the collector walks: frozen objects are not among them.
        assert not any(obj is kept for obj in gc.get_objects())
        assert gc.get_freeze_count() > 0
    finally:
        freezing.cancel()
        gc.unfreeze()
