"""Unit tests of the envelope: every rejection, every normalisation, the body, the schema."""

from __future__ import annotations

import copy
import re
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from worker.contact import (
    API_VERSIONS,
    DELETE,
    GENDERS,
    TITLES,
    UPSERT,
    Event,
    build_body,
    event_json_schema,
    fingerprint,
    is_blank,
    order_ref_path,
    parse_event,
)
from worker.errors import InvalidEvent
from worker.versions import INSTANT, MAX_VERSION, NUMBER, Version

ORDER_REF = "d680c9be-4c07-4731-857e-9602034b15f2"
GUEST_REF = "9d94ee11-7043-4b71-980c-a777d00a7b46"
BASE = "https://api-engage-eu.sitecorecloud.io"
SECRET = "S3CRET"  # planted in rejected values: it must never show up in a message

# The example of DESIGN section 2, verbatim.
DESIGN_EXAMPLE = b"""{"eventId": "bk-2026-000123", "orderRef": "d680c9be-4c07-4731-857e-9602034b15f2",
 "occurredAt": "2026-11-26T10:00:00Z",
 "contact": {"title": "Mr", "firstName": "John", "lastName": "Doe", "gender": "male",
             "dateOfBirth": "1985-12-24", "emails": ["john@example.com"],
             "phoneNumbers": ["+353161123345"], "nationality": "Irish", "country": "IE",
             "passportNumber": "PZ4A9565", "passportExpiry": "2031-01-01",
             "identifiers": [{"provider": "BookingSystem", "id": "C-991"}],
             "guestRef": "9d94ee11-7043-4b71-980c-a777d00a7b46"}}"""  # noqa: E501

DESIGN_BODY = {
    "title": "Mr",
    "firstName": "John",
    "lastName": "Doe",
    "gender": "male",
    "dateOfBirth": "1985-12-24T00:00:00.000Z",
    "emails": ["john@example.com"],
    "phoneNumbers": ["+353161123345"],
    "nationality": "Irish",
    "country": "IE",
    "passportNumber": "PZ4A9565",
    "passportExpiry": "2031-01-01T00:00:00.000Z",
    "identifiers": [{"provider": "BookingSystem", "id": "C-991"}],
    "guest": {"href": f"{BASE}/v2/guests/{GUEST_REF}"},
}

DOCUMENTED = {
    "title", "firstName", "lastName", "gender", "dateOfBirth", "emails", "phoneNumbers",
    "nationality", "country", "passportNumber", "passportExpiry", "identifiers", "guest",
    "street", "city", "state",
}  # fmt: skip
PERSONAL = ("John", "Doe", "john@example.com", "353161123345", "PZ4A9565", "1985", "Irish")

MISSING = object()  # a table entry that removes a field instead of setting it


def envelope(**contact: Any) -> dict[str, Any]:
    """A minimal valid envelope; keyword arguments set (or, with MISSING, remove) contact fields."""
    event: dict[str, Any] = {
        "eventId": "ev-1",
        "orderRef": ORDER_REF,
        "contact": {"firstName": "John", "lastName": "Doe"},
    }
    for key, value in contact.items():
        if value is MISSING:
            event["contact"].pop(key, None)
        else:
            event["contact"][key] = value
    return event


def parse(obj: Any, api_version: str = "v2") -> Event:
    return parse_event(orjson.dumps(obj), default_event_id="msg-1", api_version=api_version)


def reject(obj: Any, api_version: str = "v2") -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        parse(obj, api_version)
    return info.value


# --- rejections ------------------------------------------------------------------------

# (contact field, value, text the message must contain)
INVALID_CONTACT_FIELDS: list[tuple[str, Any, str]] = [
    ("firstName", MISSING, "contact.firstName: required"),
    ("firstName", None, "contact.firstName: required"),
    ("firstName", "   ", "contact.firstName: must not be empty"),
    ("firstName", 12345, "contact.firstName: expected a string, got number"),
    ("lastName", "", "contact.lastName: must not be empty"),
    ("lastName", [SECRET], "contact.lastName: expected a string, got array"),
    ("title", f"Mister {SECRET}", "contact.title: expected one of"),
    ("title", "Mr..", "contact.title: expected one of"),
    ("title", ".", "contact.title: expected one of"),
    ("title", 5, "contact.title: expected a string"),
    ("gender", SECRET, "contact.gender: expected male, female or unknown"),
    ("gender", True, "contact.gender: expected a string, got boolean"),
    ("country", SECRET, "contact.country: expected an ISO 3166-1 alpha-2"),
    ("country", "I", "contact.country"),
    ("country", "IRL", "contact.country"),
    ("country", "1E", "contact.country"),
    ("country", "\u00cdE", "contact.country"),  # non-ASCII letter
    ("country", "\u0131e", "contact.country"),  # dotless i: upper() would make it ASCII
    ("dateOfBirth", SECRET, "contact.dateOfBirth: expected YYYY-MM-DD or ISO 8601 date-time"),
    ("dateOfBirth", "1985-13-01", "contact.dateOfBirth: expected YYYY-MM-DD"),
    ("dateOfBirth", "1985-02-30", "contact.dateOfBirth"),
    ("dateOfBirth", "24/12/1985", "contact.dateOfBirth"),
    ("dateOfBirth", "19851224", "contact.dateOfBirth"),
    ("dateOfBirth", "2026-W48-4", "contact.dateOfBirth"),
    ("dateOfBirth", "1985-12-24T25:00:00Z", "contact.dateOfBirth"),
    ("dateOfBirth", "1985-12-24T10:00:60Z", "contact.dateOfBirth"),
    ("dateOfBirth", "1985-12-24T10:00:00+24:00", "contact.dateOfBirth"),
    ("dateOfBirth", "1985-12-24T10:00:00+05:3", "contact.dateOfBirth"),
    ("dateOfBirth", "1985-12-24Z", "contact.dateOfBirth"),
    ("dateOfBirth", "1985-12-24x", "contact.dateOfBirth"),
    ("dateOfBirth", "0001-01-01T00:00:00+01:00", "contact.dateOfBirth"),  # before year 1 in UTC
    ("dateOfBirth", "\u0661\u0669\u0668\u0665-12-24", "contact.dateOfBirth"),  # Arabic digits
    ("dateOfBirth", 19851224, "contact.dateOfBirth: expected a string, got number"),
    ("passportExpiry", SECRET, "contact.passportExpiry: expected YYYY-MM-DD"),
    ("emails", f"{SECRET}@example.com", "contact.emails: expected an array of strings, got string"),
    ("emails", [1], "contact.emails[0]: expected a string, got number"),
    ("emails", ["a@example.com", None], "contact.emails[1]: expected a string, got null"),
    ("emails", {"home": SECRET}, "contact.emails: expected an array of strings, got object"),
    ("phoneNumbers", f"+353{SECRET}", "contact.phoneNumbers: expected an array of strings"),
    ("phoneNumbers", [["+353"]], "contact.phoneNumbers[0]: expected a string, got array"),
    ("nationality", 5, "contact.nationality: expected a string, got number"),
    ("passportNumber", [SECRET], "contact.passportNumber: expected a string, got array"),
    ("identifiers", {"provider": SECRET, "id": "x"}, "contact.identifiers: expected an array"),
    ("identifiers", [SECRET], "contact.identifiers[0]: expected an object, got string"),
    ("identifiers", [{"id": SECRET}], "contact.identifiers[0].provider: required"),
    ("identifiers", [{"provider": SECRET}], "contact.identifiers[0].id: required"),
    ("identifiers", [{"provider": " ", "id": SECRET}], "contact.identifiers[0].provider: must not"),
    ("identifiers", [{"provider": "p", "id": 991}], "contact.identifiers[0].id: expected a string"),
    (
        "identifiers",
        [{"provider": "p", "id": "x"}, {"provider": "p", "id": "y", "expiryDate": SECRET}],
        "contact.identifiers[1].expiryDate: expected YYYY-MM-DD",
    ),
    (
        "identifiers",
        [{"provider": "p", "id": "x", "note": SECRET}],
        "contact.identifiers[0].note: unknown field",
    ),
    ("guestRef", SECRET, "contact.guestRef: expected a UUID"),
    ("guestRef", 5, "contact.guestRef: expected a string, got number"),
    ("guestRef", "{" + GUEST_REF + "}", "contact.guestRef: expected a UUID"),
    ("guestRef", GUEST_REF.replace("-", ""), "contact.guestRef: expected a UUID"),
    ("nickname", SECRET, "contact.nickname: unknown field"),
    ("guest", {"href": SECRET}, "contact.guest: unknown field (send guestRef"),
    (f"{SECRET}@example.com", "x", "contact.<a field whose name is not shown>: unknown field"),
    ("street", [SECRET], "contact.street: needs CDP_API_VERSION=v2.1"),
    ("city", SECRET, "contact.city: needs CDP_API_VERSION=v2.1"),
    ("state", SECRET, "contact.state: needs CDP_API_VERSION=v2.1"),
]


@pytest.mark.parametrize(("field", "value", "expected"), INVALID_CONTACT_FIELDS)
def test_invalid_contact_field(field: str, value: Any, expected: str) -> None:
    event = envelope(**{field: value})
    error = reject(event)
    assert error.reason == "invalid_event"
    assert expected in error.message
    assert str(error) == error.message
    assert SECRET not in error.message
    if isinstance(value, int | float) and not isinstance(value, bool):
        assert str(value) not in error.message
    # The dead letter carries the identifiers and the original object.
    assert error.order_ref == ORDER_REF
    assert error.event_id == "ev-1"
    assert error.event == event


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("street", f"1 {SECRET} Street", "contact.street: expected an array of strings"),
        ("street", [5], "contact.street[0]: expected a string, got number"),
        ("city", [SECRET], "contact.city: expected a string, got array"),
        ("state", 5, "contact.state: expected a string, got number"),
    ],
)
def test_invalid_v21_field(field: str, value: Any, expected: str) -> None:
    error = reject(envelope(**{field: value}), api_version="v2.1")
    assert error.reason == "invalid_event"
    assert expected in error.message
    assert SECRET not in error.message


# (top-level field, value, text the message must contain)
INVALID_ENVELOPE: list[tuple[str, Any, str]] = [
    ("contact", MISSING, "contact: required"),
    ("contact", None, "contact: required"),
    ("contact", [SECRET], "contact: expected an object, got array"),
    ("contact", SECRET, "contact: expected an object, got string"),
    ("eventId", 12345, "eventId: expected a string, got number"),
    ("eventId", [SECRET], "eventId: expected a string, got array"),
    ("eventId", "", "eventId: must not be empty"),
    ("eventId", SECRET + "x" * 128, "eventId: longer than 128 characters"),
    ("occurredAt", SECRET, "occurredAt: expected YYYY-MM-DD or ISO 8601 date-time"),
    ("occurredAt", "2026-11-26T10:00:00+25:00", "occurredAt: expected"),
    ("occurredAt", 1764151200, "occurredAt: expected a string, got number"),
]


@pytest.mark.parametrize(("field", "value", "expected"), INVALID_ENVELOPE)
def test_invalid_envelope_field(field: str, value: Any, expected: str) -> None:
    event = envelope()
    if value is MISSING:
        del event[field]
    else:
        event[field] = value
    error = reject(event)
    assert error.reason == "invalid_event"
    assert expected in error.message
    assert SECRET not in error.message
    assert "1764151200" not in error.message
    assert error.order_ref == ORDER_REF
    # A bad eventId falls back to the transport's id, so the dead letter still has one.
    assert error.event_id == ("msg-1" if field == "eventId" else "ev-1")
    assert error.event == event


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (MISSING, "orderRef: required"),
        (None, "orderRef: required"),
        (12345, "orderRef: expected a string, got number"),
        ({"id": SECRET}, "orderRef: expected a string, got object"),
        (SECRET, "orderRef: expected a UUID"),
        ("", "orderRef: expected a UUID"),
        (ORDER_REF.replace("-", ""), "orderRef: expected a UUID"),
        ("{" + ORDER_REF + "}", "orderRef: expected a UUID"),
        ("urn:uuid:" + ORDER_REF, "orderRef: expected a UUID"),
        (" " + ORDER_REF, "orderRef: expected a UUID"),
        (ORDER_REF + "\n", "orderRef: expected a UUID"),
        (ORDER_REF[:-1] + "\u0662", "orderRef: expected a UUID"),  # Arabic-Indic digit
        (ORDER_REF[:-2] + "_2", "orderRef: expected a UUID"),
        (ORDER_REF + "/../x", "orderRef: expected a UUID"),
        (ORDER_REF[:-1] + "g", "orderRef: expected a UUID"),
    ],
)
def test_invalid_order_ref(value: Any, expected: str) -> None:
    event = envelope()
    if value is MISSING:
        del event["orderRef"]
    else:
        event["orderRef"] = value
    error = reject(event)
    assert error.reason == "invalid_order_ref"
    assert error.message.startswith(expected)
    assert SECRET not in error.message
    assert error.order_ref is None
    assert error.event_id == "ev-1"
    assert error.event == event


def test_invalid_order_ref_wins_over_other_problems() -> None:
    event = {"eventId": 5, "orderRef": "nope", "contact": 7}
    error = reject(event)
    assert error.reason == "invalid_order_ref"
    assert error.event_id == "msg-1"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\xff\xfe", "event is not valid UTF-8 JSON"),
        (b"", "event is not valid UTF-8 JSON"),
        (b"not json " + SECRET.encode(), "event is not valid UTF-8 JSON at column 1"),
        (b'{"a":\n 1,,}', "event is not valid UTF-8 JSON at line 2, column 4"),  # a broker's
        (b'{"orderRef": "' + SECRET.encode(), "event is not valid UTF-8 JSON"),
        (b"[" * 5000 + b"]" * 5000, "event is not valid UTF-8 JSON"),  # too deep for orjson
        (b"NaN", "event is not valid UTF-8 JSON"),
        ('{"a": "\ud800"}', "event is not valid UTF-8 JSON"),  # lone surrogate in a str
        (b"\xef\xbb\xbf", "event is not valid UTF-8 JSON"),  # a byte-order mark alone
    ],
)
def test_malformed_json(raw: bytes | str, expected: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw, default_event_id="msg-1")
    error = info.value
    assert error.reason == "malformed_json"
    assert error.message.startswith(expected)
    assert SECRET not in error.message
    assert error.event is None
    assert error.order_ref is None
    assert error.event_id == "msg-1"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"[]", "event is a JSON array, expected an object"),
        (b"[1, 2, 3]", "event is a JSON array, expected an object"),
        (b'"' + SECRET.encode() + b'"', "event is a JSON string, expected an object"),
        (b"null", "event is a JSON null, expected an object"),
        (b"12345", "event is a JSON number, expected an object"),
        (b"true", "event is a JSON boolean, expected an object"),
    ],
)
def test_json_that_is_not_an_object_is_an_invalid_event(raw: bytes, expected: str) -> None:
    # DESIGN section 2: only text that is not JSON at all is malformed_json.
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw, default_event_id="msg-1")
    error = info.value
    assert error.reason == "invalid_event"
    assert error.message == expected
    assert SECRET not in error.message
    assert "12345" not in error.message
    assert error.event is None  # the letter keeps the text: `event` is always an object
    assert error.order_ref is None


@pytest.mark.parametrize("as_text", [False, True], ids=["bytes", "str"])
def test_a_byte_order_mark_before_the_event_is_ignored(as_text: bool) -> None:
    raw: bytes | str = (
        "\ufeff" + DESIGN_EXAMPLE.decode() if as_text else b"\xef\xbb\xbf" + DESIGN_EXAMPLE
    )
    event = parse_event(raw, default_event_id="msg-1")
    assert event.order_ref == ORDER_REF


@pytest.mark.parametrize(
    ("line", "blank"),
    [
        (b"", True),
        (b" \t\r\n", True),
        (b"\x0b\x0c", True),  # vertical tab, form feed
        ("\u00a0\u2003\u3000".encode(), True),  # no-break, em and ideographic spaces
        (b"\xef\xbb\xbf  ", True),  # a byte-order mark and spaces
        (b" {} ", False),
        (b"\xff", False),  # not UTF-8: a malformed line, not a blank one
    ],
)
def test_what_counts_as_a_blank_line(line: bytes, blank: bool) -> None:
    assert is_blank(line) is blank


@pytest.mark.parametrize("as_text", [False, True])
def test_event_larger_than_one_mib_is_rejected(as_text: bool) -> None:
    event = envelope(nationality="x" * (1 << 20))
    raw = orjson.dumps(event)
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw.decode() if as_text else raw, default_event_id="msg-1")
    assert info.value.reason == "invalid_event"
    assert info.value.message == "event larger than 1 MiB"
    assert info.value.event_id == "msg-1"


def test_text_under_one_mib_in_characters_but_over_in_bytes_is_rejected() -> None:
    # 400k three-byte characters: under the cap in characters, over it in UTF-8.
    raw = orjson.dumps(envelope(nationality="\u20ac" * 400_000)).decode()
    assert len(raw) < 1 << 20
    with pytest.raises(InvalidEvent, match="larger than 1 MiB"):
        parse_event(raw, default_event_id="msg-1")


def test_event_just_under_the_cap_parses() -> None:
    event = envelope()
    padding = (1 << 20) - len(orjson.dumps(event)) - len(',"pad":""')
    event["pad"] = "x" * padding
    raw = orjson.dumps(event)
    assert len(raw) == 1 << 20
    assert parse_event(raw, default_event_id="m").order_ref == ORDER_REF


def test_unknown_api_version_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="api_version"):
        parse_event(orjson.dumps(envelope()), default_event_id="m", api_version="v3")
    event = parse(envelope())
    with pytest.raises(ValueError, match="api_version"):
        build_body(event, base_url=BASE, api_version="v1")
    with pytest.raises(ValueError, match="api_version"):
        event_json_schema("2")


# --- normalisation ---------------------------------------------------------------------

# (contact field, input, normalised value)
NORMALISED: list[tuple[str, Any, Any]] = [
    ("firstName", "  John \t", "John"),
    ("lastName", "\nDoe ", "Doe"),
    ("title", "mr", "Mr"),
    ("title", "MR.", "Mr"),
    ("title", " Dr. ", "Dr"),
    ("title", "prof", "Prof"),
    ("title", "sHAIKHA", "Shaikha"),
    ("title", "mstr.", "Mstr"),
    ("gender", "Male", "male"),
    ("gender", " FEMALE ", "female"),
    ("gender", "Unknown", "unknown"),
    ("country", "ie", "IE"),
    ("country", " Ie ", "IE"),
    ("nationality", " Irish ", "Irish"),
    ("passportNumber", " PZ4A9565\n", "PZ4A9565"),
    ("dateOfBirth", "1985-12-24", "1985-12-24T00:00:00.000Z"),
    ("dateOfBirth", " 1985-12-24 ", "1985-12-24T00:00:00.000Z"),
    ("dateOfBirth", "1985-12-24T10:11:12Z", "1985-12-24T10:11:12.000Z"),
    ("dateOfBirth", "1985-12-24t10:11:12z", "1985-12-24T10:11:12.000Z"),
    ("dateOfBirth", "1985-12-24 10:11:12Z", "1985-12-24T10:11:12.000Z"),
    ("dateOfBirth", "1985-12-24T10:11", "1985-12-24T10:11:00.000Z"),  # naive is UTC
    ("dateOfBirth", "1985-12-24T10:11:12.3456+02:00", "1985-12-24T08:11:12.345Z"),
    ("dateOfBirth", "1985-12-24T10:11:12,5Z", "1985-12-24T10:11:12.500Z"),
    ("dateOfBirth", "1985-12-24T10:11:12.999999999Z", "1985-12-24T10:11:12.999Z"),  # truncated
    ("dateOfBirth", "1985-12-24T00:30:00+01:00", "1985-12-23T23:30:00.000Z"),
    ("dateOfBirth", "1985-12-24T10:11:12-0530", "1985-12-24T15:41:12.000Z"),
    ("dateOfBirth", "1985-12-24T10:11:12+01", "1985-12-24T09:11:12.000Z"),
    ("dateOfBirth", "1985-12-24T00:00:00.000Z", "1985-12-24T00:00:00.000Z"),
    ("dateOfBirth", "0099-01-01", "0099-01-01T00:00:00.000Z"),  # zero-padded year
    ("dateOfBirth", "2000-02-29", "2000-02-29T00:00:00.000Z"),
    ("passportExpiry", "2031-01-01T23:59:59-01:00", "2031-01-02T00:59:59.000Z"),
    ("emails", [" john@example.com ", "", "  ", "j@d.ie"], ["john@example.com", "j@d.ie"]),
    ("phoneNumbers", ["+353161123345 "], ["+353161123345"]),
    ("guestRef", GUEST_REF.upper(), MISSING),  # kept apart: see test_guest_ref_is_kept_apart
    (
        "identifiers",
        [
            {"provider": " BookingSystem ", "id": " C-991 ", "expiryDate": "2031-01-01"},
            {"provider": "Loyalty", "id": "L-1", "expiryDate": None},
            {"provider": "Other", "id": "O-1", "expiryDate": " "},
        ],
        [
            {"provider": "BookingSystem", "id": "C-991", "expiryDate": "2031-01-01T00:00:00.000Z"},
            {"provider": "Loyalty", "id": "L-1"},
            {"provider": "Other", "id": "O-1"},
        ],
    ),
]

# Optional fields, and inputs that make them absent: null, blanks, empty arrays.
ABSENT: list[tuple[str, Any]] = [
    *[(field, None) for field in sorted(DOCUMENTED - {"firstName", "lastName", "guest"})],
    *[(field, value) for field in ("title", "gender", "country") for value in ("", "  ")],
    ("nationality", " \t "),
    ("passportNumber", ""),
    ("dateOfBirth", ""),
    ("passportExpiry", "  "),
    ("guestRef", ""),
    ("emails", []),
    ("emails", ["", " "]),
    ("phoneNumbers", []),
    ("identifiers", []),
]


@pytest.mark.parametrize(("field", "value", "expected"), NORMALISED)
def test_normalisation(field: str, value: Any, expected: Any) -> None:
    event = parse(envelope(**{field: value}))
    if expected is MISSING:
        assert field not in event.contact
    else:
        assert event.contact[field] == expected
        assert build_body(event, base_url=BASE)[field] == expected


@pytest.mark.parametrize(("field", "value"), ABSENT)
def test_absent_optional_fields_are_dropped(field: str, value: Any) -> None:
    event = parse(envelope(**{field: value}), api_version="v2.1")
    assert field not in event.contact
    assert event.guest_ref is None
    body = build_body(event, base_url=BASE, api_version="v2.1")
    assert body == {"firstName": "John", "lastName": "Doe"}


@pytest.mark.parametrize("title", TITLES)
@pytest.mark.parametrize("spelling", [str.lower, str.upper, lambda t: f" {t}. "])
def test_every_title_is_recognised(title: str, spelling: Any) -> None:
    assert parse(envelope(title=spelling(title))).contact["title"] == title


@pytest.mark.parametrize("gender", GENDERS)
def test_every_gender_is_recognised(gender: str) -> None:
    assert parse(envelope(gender=gender.upper())).contact["gender"] == gender


def test_guest_ref_is_kept_apart_and_lowercased() -> None:
    event = parse(envelope(guestRef=f" {GUEST_REF.upper()} "))
    assert event.guest_ref == GUEST_REF
    assert "guestRef" not in event.contact


def test_order_ref_is_canonical_lowercase() -> None:
    event = envelope()
    event["orderRef"] = ORDER_REF.upper()
    assert parse(event).order_ref == ORDER_REF


@pytest.mark.parametrize(
    ("given", "expected"),
    [(MISSING, "msg-1"), (None, "msg-1"), ("ev-9", "ev-9"), (" ev 9 ", " ev 9 "), ("x" * 128,) * 2],
)
def test_event_id_defaults_to_transport_id_and_is_verbatim(given: Any, expected: str) -> None:
    event = envelope()
    if given is MISSING:
        del event["eventId"]
    else:
        event["eventId"] = given
    assert parse(event).event_id == expected


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (MISSING, None),
        (None, None),
        ("2026-11-26T10:00:00Z", datetime(2026, 11, 26, 10, tzinfo=UTC)),
        ("2026-11-26T11:00:00.5+01:00", datetime(2026, 11, 26, 10, 0, 0, 500_000, tzinfo=UTC)),
        ("2026-11-26T10:00:00", datetime(2026, 11, 26, 10, tzinfo=UTC)),
        ("2026-11-26", datetime(2026, 11, 26, tzinfo=UTC)),
    ],
)
def test_occurred_at(given: Any, expected: datetime | None) -> None:
    event = envelope()
    if given is not MISSING:
        event["occurredAt"] = given
    occurred_at = parse(event).occurred_at
    assert occurred_at == expected
    if occurred_at is not None:
        assert occurred_at.tzinfo is UTC


def test_unknown_top_level_fields_are_ignored_but_kept_in_raw() -> None:
    event = envelope()
    event["producer"] = {"name": "bookings", "version": 3}
    parsed = parse(event)
    assert parsed.raw == event
    assert "producer" not in build_body(parsed, base_url=BASE)


def test_v2_accepts_null_v21_fields_as_absent() -> None:
    event = parse(envelope(street=None, city=None, state=None))
    assert set(event.contact) == {"firstName", "lastName"}


def test_text_and_bytes_parse_alike() -> None:
    as_bytes = parse_event(DESIGN_EXAMPLE, default_event_id="m")
    as_text = parse_event(DESIGN_EXAMPLE.decode(), default_event_id="m")
    assert as_bytes == as_text


def test_contact_is_read_only() -> None:
    event = parse(envelope())
    with pytest.raises(TypeError):
        event.contact["firstName"] = "x"  # type: ignore[index]


# --- the DESIGN example and the body ---------------------------------------------------


def test_design_example_parses() -> None:
    event = parse_event(DESIGN_EXAMPLE, default_event_id="msg-1")
    assert event.event_id == "bk-2026-000123"
    assert event.order_ref == ORDER_REF
    assert event.occurred_at == datetime(2026, 11, 26, 10, tzinfo=UTC)
    assert event.guest_ref == GUEST_REF
    assert event.raw == orjson.loads(DESIGN_EXAMPLE)


@pytest.mark.parametrize("base_url", [BASE, BASE + "/", "http://localhost:8080/"])
def test_design_example_builds_the_expected_body(base_url: str) -> None:
    event = parse_event(DESIGN_EXAMPLE, default_event_id="msg-1")
    expected = copy.deepcopy(DESIGN_BODY)
    expected["guest"] = {"href": f"{base_url.rstrip('/')}/v2/guests/{GUEST_REF}"}
    body = build_body(event, base_url=base_url)
    assert body == expected
    assert list(body) == list(expected)  # CDP's documented order
    assert orjson.loads(orjson.dumps(body)) == expected


def test_v21_body_carries_address_and_versioned_guest_href() -> None:
    raw = orjson.loads(DESIGN_EXAMPLE)
    raw["contact"] |= {"street": [" 1 Main St ", ""], "city": " Dublin ", "state": "Leinster"}
    event = parse(raw, api_version="v2.1")
    body = build_body(event, base_url=BASE, api_version="v2.1")
    expected = DESIGN_BODY | {
        "street": ["1 Main St"],
        "city": "Dublin",
        "state": "Leinster",
        "guest": {"href": f"{BASE}/v2.1/guests/{GUEST_REF}"},
    }
    assert body == expected


def test_v21_fields_cannot_be_sent_under_v2() -> None:
    event = parse(envelope(city="Dublin"), api_version="v2.1")
    with pytest.raises(InvalidEvent) as info:
        build_body(event, base_url=BASE, api_version="v2")
    assert info.value.reason == "invalid_event"
    assert info.value.message == "contact.city: needs CDP_API_VERSION=v2.1"
    assert info.value.order_ref == ORDER_REF


@pytest.mark.parametrize("api_version", API_VERSIONS)
def test_body_has_nothing_of_the_envelope(api_version: str) -> None:
    raw = orjson.loads(DESIGN_EXAMPLE)
    raw["metadata"] = {"source": "x"}
    body = build_body(parse(raw, api_version), base_url=BASE, api_version=api_version)
    assert set(body) <= DOCUMENTED
    text = orjson.dumps(body).decode()
    for envelope_item in ("eventId", "orderRef", "occurredAt", "guestRef", "bk-2026", ORDER_REF):
        assert envelope_item not in text


def test_body_omits_guest_without_guest_ref() -> None:
    body = build_body(parse(envelope()), base_url=BASE)
    assert body == {"firstName": "John", "lastName": "Doe"}


def test_body_sends_only_documented_fields_of_a_hand_made_event() -> None:
    event = Event(
        "e", ORDER_REF, None, {"firstName": "A", "lastName": "B", "eventId": "e"}, None, {}
    )
    assert build_body(event, base_url=BASE) == {"firstName": "A", "lastName": "B"}


def test_body_is_a_fresh_copy() -> None:
    event = parse_event(DESIGN_EXAMPLE, default_event_id="m")
    body = build_body(event, base_url=BASE)
    body["emails"].append("x")
    body["identifiers"][0]["id"] = "changed"
    assert build_body(event, base_url=BASE) == DESIGN_BODY


# --- no personal data in reprs ---------------------------------------------------------


def test_repr_shows_only_identifiers() -> None:
    event = parse_event(DESIGN_EXAMPLE, default_event_id="m")
    expected = f"Event(event_id='bk-2026-000123', order_ref='{ORDER_REF}')"
    assert repr(event) == expected
    assert str(event) == expected
    assert f"{event!r} {[event]}" == f"{expected} [{expected}]"
    for value in PERSONAL:
        assert value not in repr(event)


def test_rejection_messages_never_show_personal_data() -> None:
    raw = orjson.loads(DESIGN_EXAMPLE)
    raw["contact"]["country"] = "Ireland"
    error = reject(raw)
    assert "Ireland" not in str(error)
    for value in PERSONAL:
        assert value not in str(error)


# --- order_ref_path --------------------------------------------------------------------


@pytest.mark.parametrize("ref", [ORDER_REF, ORDER_REF.upper(), ORDER_REF.title()])
def test_order_ref_path_is_canonical(ref: str) -> None:
    assert order_ref_path(ref) == ORDER_REF


@pytest.mark.parametrize(
    "ref",
    ["", "x", ORDER_REF + "/", "../" + ORDER_REF, ORDER_REF.replace("-", ""), f"{ORDER_REF}?a=1"],
)
def test_order_ref_path_refuses_anything_else(ref: str) -> None:
    with pytest.raises(ValueError, match="not a UUID"):
        order_ref_path(ref)


def test_order_ref_path_refuses_non_strings() -> None:
    with pytest.raises(ValueError, match="not a UUID"):
        order_ref_path(None)  # type: ignore[arg-type]


# --- JSON Schema -----------------------------------------------------------------------


def conforms(value: Any, schema: dict[str, Any]) -> bool:
    """A tiny validator for the keywords our schema uses (the project has no jsonschema)."""
    types = schema.get("type")
    if types is not None:
        names = {type(value).__name__} if value is not None else {"NoneType"}
        mapping = {"string": "str", "array": "list", "object": "dict", "null": "NoneType"}
        wanted = {mapping[t] for t in ([types] if isinstance(types, str) else types)}
        if not names & wanted:
            return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            return False
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
            return False
    if isinstance(value, list) and "items" in schema:
        return all(conforms(item, schema["items"]) for item in value)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        if any(key not in value for key in schema.get("required", [])):
            return False
        if schema.get("additionalProperties") is False and set(value) - set(properties):
            return False
        return all(conforms(v, properties[k]) for k, v in value.items() if k in properties)
    return True


@pytest.mark.parametrize("api_version", API_VERSIONS)
def test_schema_shape(api_version: str) -> None:
    schema = event_json_schema(api_version)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["type"] == "object"
    assert schema["required"] == ["orderRef"]
    assert schema["else"] == {"required": ["contact"]}  # unless an erasure
    contact = schema["properties"]["contact"]
    assert contact["additionalProperties"] is False
    assert contact["required"] == ["firstName", "lastName"]
    assert contact["properties"]["title"]["enum"] == [*TITLES, None]
    assert contact["properties"]["gender"]["enum"] == [*GENDERS, None]
    assert schema["properties"]["eventId"]["maxLength"] == 128
    has_address = {"street", "city", "state"} <= set(contact["properties"])
    assert has_address == (api_version == "v2.1")
    assert orjson.loads(orjson.dumps(schema)) == schema  # printable as JSON
    assert event_json_schema(api_version) is not schema  # fresh per call


@pytest.mark.parametrize("api_version", API_VERSIONS)
def test_schema_patterns_are_portable(api_version: str) -> None:
    text = orjson.dumps(event_json_schema(api_version)).decode()
    for pattern in re.findall(r'"pattern":"((?:[^"\\]|\\.)*)"', text):
        unescaped = orjson.loads(f'"{pattern}"')
        re.compile(unescaped)
        assert "(?P" not in unescaped  # Python-only syntax, not ECMA 262
        assert "\\Z" not in unescaped


def test_schema_agrees_with_the_parser_on_examples() -> None:
    schema = event_json_schema("v2")
    assert conforms(orjson.loads(DESIGN_EXAMPLE), schema)
    assert conforms(envelope(), schema)
    assert not conforms(envelope(nickname="x"), schema)
    assert not conforms(envelope(firstName=" "), schema)
    assert not conforms(envelope(street=["x"]), schema)
    assert not conforms(envelope(identifiers=[{"id": "x"}]), schema)
    assert not conforms({"orderRef": "nope", "contact": {}}, schema)
    assert conforms(envelope(street=["x"]), event_json_schema("v2.1"))


# --- version, op and fingerprint (convergent sync) ----------------------------------------


def test_the_version_is_version_else_occurred_at() -> None:
    assert parse(envelope()).version is None
    assert parse({**envelope(), "version": 7}).version == Version(NUMBER, 7)
    at = parse({**envelope(), "occurredAt": "2026-11-26T11:00:00+01:00"}).version
    assert at == parse({**envelope(), "occurredAt": "2026-11-26T10:00:00Z"}).version
    assert at == Version(INSTANT, 1_795_687_200_000_000)
    both = {**envelope(), "version": 3, "occurredAt": "2026-11-26T10:00:00Z"}
    assert parse(both).version == Version(NUMBER, 3)  # version decides
    assert str(Version(NUMBER, 3)) == "3"
    assert str(at) == "2026-11-26T10:00:00Z"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "version: expected an integer from 0 to 2^53-1"),
        (MAX_VERSION + 1, "version: expected an integer from 0 to 2^53-1"),
        (1.5, "version: expected an integer, got number"),
        (2.0, "version: expected an integer, got number"),
        ("3", "version: expected an integer, got string"),
        (True, "version: expected an integer, got boolean"),
    ],
)
def test_a_bad_version_is_an_invalid_event(value: Any, message: str) -> None:
    invalid = reject({**envelope(), "version": value})
    assert (invalid.reason, invalid.message) == ("invalid_event", message)
    assert parse({**envelope(), "version": MAX_VERSION}).version == Version(NUMBER, MAX_VERSION)


def test_an_occurred_at_beyond_what_versions_hold_is_an_invalid_event() -> None:
    for instant in ("2300-01-01T00:00:00Z", "1600-01-01"):
        invalid = reject({**envelope(), "occurredAt": instant})
        assert invalid.message == "occurredAt: expected an instant between 1685 and 2255"
    assert parse({**envelope(), "occurredAt": "2250-01-01"}).version is not None


def test_op_is_upsert_by_default_and_delete_needs_no_contact() -> None:
    assert parse(envelope()).op == UPSERT
    assert parse({**envelope(), "op": "upsert"}).op == UPSERT
    erasure = parse({"orderRef": ORDER_REF, "op": "delete", "version": 4})
    assert (erasure.op, erasure.erasure, dict(erasure.contact)) == (DELETE, True, {})
    # Whatever contact an erasure carries is ignored, not validated.
    ignored = parse({**envelope(firstName=""), "op": "delete"})
    assert dict(ignored.contact) == {}
    assert ignored.guest_ref is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("DELETE", 'op: expected "upsert" or "delete", got another string'),
        ("erase", 'op: expected "upsert" or "delete", got another string'),
        (1, 'op: expected "upsert" or "delete", got number'),
        ([], 'op: expected "upsert" or "delete", got array'),
    ],
)
def test_a_bad_op_is_an_invalid_event(value: Any, message: str) -> None:
    invalid = reject({**envelope(), "op": value})
    assert (invalid.reason, invalid.message) == ("invalid_event", message)
    assert "erase" not in invalid.message  # values are never quoted


def test_an_upsert_without_contact_is_still_invalid() -> None:
    invalid = reject({"orderRef": ORDER_REF, "op": "upsert"})
    assert invalid.reason == "invalid_event"


def test_the_fingerprint_is_of_the_normalised_body_and_holds_no_personal_data() -> None:
    def body(contact: dict[str, Any]) -> dict[str, Any]:
        event = parse({"orderRef": ORDER_REF, "contact": contact})
        return build_body(event, base_url="https://cdp.example")

    plain = body({"firstName": "John", "lastName": "Doe", "title": "Mr", "country": "IE"})
    messy = body({"country": "ie", "lastName": " Doe ", "title": "mr.", "firstName": "John"})
    assert fingerprint(plain) == fingerprint(messy)  # same body after normalisation
    assert fingerprint(plain) != fingerprint(body({"firstName": "Jon", "lastName": "Doe"}))
    assert len(fingerprint(plain)) == 32
    assert all(part not in fingerprint(plain) for part in PERSONAL)


def test_the_schema_knows_version_op_and_erasures() -> None:
    import jsonschema

    schema = event_json_schema("v2")
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"orderRef": ORDER_REF, "op": "delete"})
    assert not validator.is_valid({"orderRef": ORDER_REF})  # an upsert needs its contact
    assert not validator.is_valid({"orderRef": ORDER_REF, "op": "erase"})
    assert validator.is_valid({**envelope(), "version": 3})
    assert not validator.is_valid({**envelope(), "version": -1})
    assert not validator.is_valid({**envelope(), "version": 1.5})
