"""Property tests of the envelope: nothing escapes but InvalidEvent, and valid input always
becomes a body in CDP's documented formats, stable under a second pass."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from string import ascii_letters as ASCII_LETTERS
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.contact import (
    API_VERSIONS,
    GENDERS,
    REASONS,
    TITLES,
    Event,
    build_body,
    parse_event,
)
from worker.errors import InvalidEvent

BASE = "https://api-engage-eu.sitecorecloud.io"
MARK = "\u00a7"  # every generated string carries it; no message may
FIELDS = (
    "title", "firstName", "lastName", "gender", "dateOfBirth", "emails", "phoneNumbers",
    "nationality", "country", "passportNumber", "passportExpiry", "identifiers", "guestRef",
    "street", "city", "state",
)  # fmt: skip
DOCUMENTED = {*FIELDS, "guest"} - {"guestRef"}
DATE_FIELDS = ("dateOfBirth", "passportExpiry")
CDP_DATE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
UUID_LOWER = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

PROPERTY = settings(max_examples=200, deadline=None)

# --- strategies ------------------------------------------------------------------------

marked_text = st.text(max_size=12).map(lambda s: MARK + s)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)  # what orjson can write
    | st.floats(allow_nan=False, allow_infinity=False)
    | marked_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | marked_text, inner, max_size=4)
    ),
    max_leaves=12,
)
uuids = st.uuids().map(str)
# Strings near the valid forms, so wrong values also reach the deeper rules.
plausible = st.sampled_from(
    [
        "", " ", "Mr", "mr.", "MALE", "ie", "IE", "irl", "1985-12-24", "1985-02-30",
        "1985-12-24T10:00:00+01:00", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00",
        "d680c9be-4c07-4731-857e-9602034b15f2", "D680C9BE-4C07-4731-857E-9602034B15F2",
    ]
)  # fmt: skip
identifier_like = st.dictionaries(
    st.sampled_from(["provider", "id", "expiryDate", MARK + "x"]),
    json_values | plausible,
    max_size=4,
)
wrong_values = (
    json_values
    | plausible
    | st.lists(plausible | marked_text, max_size=3)
    | st.lists(identifier_like, max_size=2)
)


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` nine times in ten: wholly random envelopes almost never get past orderRef."""
    return st.integers(0, 9).flatmap(lambda n: bad if n == 0 else good)


def padded(text: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Surrounding whitespace, which the parser strips."""
    pad = st.sampled_from(["", " ", "\t", " \n "])
    return st.tuples(pad, text, pad).map("".join)


@st.composite
def any_case(draw: st.DrawFn, text: str) -> str:
    flags = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.upper() if up else c.lower() for c, up in zip(text, flags, strict=True))


nonblank = padded(st.text(min_size=1, max_size=20).filter(str.strip))
offsets = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))
zones: st.SearchStrategy[tzinfo | None] = st.none() | st.just(UTC) | offsets
# Years 2..9998: an offset never pushes a moment outside what datetime can hold.
moments: st.SearchStrategy[datetime] = st.builds(
    datetime.replace, st.datetimes(datetime(2, 1, 1), datetime(9998, 12, 31)), tzinfo=zones
)


@st.composite
def iso_dates(draw: st.DrawFn) -> str:
    """A date or date-time in one of the ISO 8601 spellings producers use."""
    moment = draw(moments)
    style = draw(st.sampled_from(["date", "seconds", "millis", "micros", "zulu"]))
    if style == "date":
        return moment.date().isoformat()
    if style == "zulu" and moment.utcoffset() is None:
        return moment.replace(microsecond=0).isoformat() + "Z"
    spec = {"seconds": "seconds", "millis": "milliseconds"}.get(style, "microseconds")
    return moment.isoformat(timespec=spec)


# A valid value for each optional contact field, in the spellings the parser accepts.
VALID_OPTIONAL: dict[str, st.SearchStrategy[Any]] = {
    "title": padded(
        st.tuples(st.sampled_from(TITLES).flatmap(any_case), st.sampled_from(["", "."])).map(
            "".join
        )
    ),
    "gender": st.sampled_from(GENDERS).flatmap(any_case),
    "dateOfBirth": padded(iso_dates()),
    "passportExpiry": iso_dates(),
    "emails": st.lists(padded(st.text(max_size=20)), max_size=3),
    "phoneNumbers": st.lists(st.text(max_size=15), max_size=3),
    "nationality": padded(st.text(max_size=20)),
    "country": padded(st.text(ASCII_LETTERS, min_size=2, max_size=2)),
    "passportNumber": st.text(max_size=12) | st.none(),
    "identifiers": st.lists(
        st.fixed_dictionaries(
            {"provider": nonblank, "id": nonblank},
            optional={"expiryDate": iso_dates() | st.none() | st.just("")},
        ),
        max_size=3,
    ),
    "guestRef": uuids.map(str.upper) | uuids | st.none(),
}
VALID_V21: dict[str, st.SearchStrategy[Any]] = {
    "street": st.lists(nonblank, max_size=3),
    "city": st.text(max_size=20),
    "state": st.text(max_size=20) | st.none(),
}

VALID_ANY = VALID_OPTIONAL | VALID_V21 | {"firstName": nonblank, "lastName": nonblank}


@st.composite
def valid_contacts(draw: st.DrawFn, api_version: str) -> dict[str, Any]:
    contact: dict[str, Any] = {"firstName": draw(nonblank), "lastName": draw(nonblank)}
    optional = VALID_OPTIONAL | (VALID_V21 if api_version == "v2.1" else {})
    for name in draw(st.sets(st.sampled_from(sorted(optional)))):
        contact[name] = draw(optional[name])
    return contact


@st.composite
def chaotic_contacts(draw: st.DrawFn) -> dict[str, Any]:
    """Contacts where any field may be missing, of the wrong type, or unknown."""
    contact: dict[str, Any] = {}
    for name in draw(st.sets(st.sampled_from(FIELDS), max_size=8)) | {"firstName", "lastName"}:
        good = VALID_ANY[name]
        if draw(st.integers(0, 19)):  # now and then a field goes missing altogether
            contact[name] = draw(mostly(good, wrong_values))
    if draw(st.integers(0, 9)) == 0:
        contact[draw(marked_text | st.sampled_from(["guest", "eventId"]))] = draw(json_values)
    return contact


envelopes = st.fixed_dictionaries(
    {
        "orderRef": mostly(uuids.map(str.upper) | uuids, wrong_values),
        "contact": mostly(chaotic_contacts(), json_values),
    },
    optional={
        "eventId": mostly(st.text(min_size=1, max_size=128), wrong_values),
        "occurredAt": mostly(iso_dates(), wrong_values),
        "extra": json_values,
    },
)


# --- checks ----------------------------------------------------------------------------


def parse_or_reject(raw: bytes | str, api_version: str = "v2") -> Event | InvalidEvent:
    try:
        return parse_event(raw, default_event_id="msg-1", api_version=api_version)
    except InvalidEvent as exc:
        error = exc
    assert error.reason in REASONS
    assert error.event_id is not None
    assert MARK not in error.message
    return error


def assert_cdp_formats(body: dict[str, Any], api_version: str) -> None:
    """CDP's documented formats (DESIGN section 1), checked strictly."""
    assert set(body) <= DOCUMENTED
    assert {"firstName", "lastName"} <= set(body)
    for name, value in body.items():
        if name in ("emails", "phoneNumbers", "street"):
            assert value
            assert all(isinstance(v, str) and v and v == v.strip() for v in value)
        elif name == "identifiers":
            assert value
            for item in value:
                assert set(item) <= {"provider", "id", "expiryDate"}
                for key in ("provider", "id"):
                    assert item[key]
                    assert item[key] == item[key].strip()
                if "expiryDate" in item:
                    assert CDP_DATE.fullmatch(item["expiryDate"])
        elif name == "guest":
            prefix = f"{BASE}/{api_version}/guests/"
            assert set(value) == {"href"}
            assert value["href"].startswith(prefix)
            assert UUID_LOWER.fullmatch(value["href"].removeprefix(prefix))
        else:
            assert isinstance(value, str)
            assert value
            assert value == value.strip()
    for name in DATE_FIELDS:
        if name in body:
            assert CDP_DATE.fullmatch(body[name])
            datetime.strptime(body[name], "%Y-%m-%dT%H:%M:%S.%fZ")  # a real calendar date
    assert re.fullmatch("[A-Z]{2}", body.get("country", "IE"))
    assert body.get("title", "Mr") in TITLES
    assert body.get("gender", "male") in GENDERS
    orjson.dumps(body)


# --- properties ------------------------------------------------------------------------


@PROPERTY
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_invalid_event(raw: bytes) -> None:
    parse_or_reject(raw)


@PROPERTY
@given(st.text(max_size=200))
def test_arbitrary_text_only_raises_invalid_event(raw: str) -> None:
    parse_or_reject(raw)


@PROPERTY
@given(json_values)
def test_arbitrary_json_only_raises_invalid_event(value: Any) -> None:
    result = parse_or_reject(orjson.dumps(value))
    if not isinstance(value, dict):
        assert isinstance(result, InvalidEvent)
        assert result.reason == "invalid_event"


@PROPERTY
@given(envelopes, st.sampled_from(API_VERSIONS))
def test_arbitrary_envelopes_are_rejected_cleanly_or_build_valid_bodies(
    envelope: dict[str, Any], api_version: str
) -> None:
    result = parse_or_reject(orjson.dumps(envelope), api_version)
    if isinstance(result, InvalidEvent):
        assert result.event in (None, envelope)
        if result.reason == "invalid_event":
            assert result.order_ref is not None
            assert UUID_LOWER.fullmatch(result.order_ref)
        return
    assert result.order_ref == str(envelope["orderRef"]).lower()
    assert result.raw == envelope
    assert_cdp_formats(build_body(result, base_url=BASE, api_version=api_version), api_version)


@PROPERTY
@given(st.data(), st.sampled_from(API_VERSIONS), uuids.map(str.upper) | uuids)
def test_valid_contacts_build_cdp_bodies_and_reparse_identically(
    data: st.DataObject, api_version: str, order_ref: str
) -> None:
    contact = data.draw(valid_contacts(api_version))
    raw = orjson.dumps({"orderRef": order_ref, "contact": contact, "meta": [1, 2]})
    event = parse_event(raw, default_event_id="msg-1", api_version=api_version)
    body = build_body(event, base_url=BASE + "/", api_version=api_version)
    assert_cdp_formats(body, api_version)
    assert body["firstName"] == contact["firstName"].strip()

    # A second pass over the normalised contact changes nothing.
    again = {"orderRef": event.order_ref, "contact": {**event.contact, "guestRef": event.guest_ref}}
    reparsed = parse_event(orjson.dumps(again), default_event_id="msg-2", api_version=api_version)
    assert reparsed.contact == event.contact
    assert reparsed.guest_ref == event.guest_ref
    assert build_body(reparsed, base_url=BASE, api_version=api_version) == body


@PROPERTY
@given(moments)
def test_dates_normalise_to_utc_milliseconds(moment: datetime) -> None:
    raw = orjson.dumps(
        {
            "orderRef": "d680c9be-4c07-4731-857e-9602034b15f2",
            "contact": {"firstName": "A", "lastName": "B", "dateOfBirth": moment.isoformat()},
        }
    )
    result = parse_or_reject(raw)
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    utc = aware.astimezone(UTC)
    assert isinstance(result, Event)
    expected = utc.replace(microsecond=utc.microsecond // 1000 * 1000)
    parsed = datetime.strptime(result.contact["dateOfBirth"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert parsed.replace(tzinfo=UTC) == expected
