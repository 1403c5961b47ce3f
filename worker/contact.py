"""The event envelope (DESIGN section 2): parse, validate, normalise, build CDP's body.

Everything an event can get wrong is found here, before any claim or request, so that a
bad event costs one dead letter and never a call to CDP. Rules worth knowing:

- `orderRef` must be a hyphenated UUID (any case) and becomes lowercase; it is the only
  event value that ever reaches a URL, and `order_ref_path` guards that a second time.
- `eventId` and `orderRef` are identifiers and are taken verbatim (not stripped); every
  string inside `contact` is stripped.
- Inside `contact`, an optional field that is `null`, an empty string after stripping, or
  an empty array is *absent*: it is not sent. Blank items of `emails`, `phoneNumbers`
  and `street` are dropped too. `firstName` and `lastName` are required and non-empty.
- Error messages name the field path and the JSON type found, never a value: values are
  personal data, and messages end up in logs and in dead letters' `detail`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any

import orjson

from .errors import FieldRejected, InvalidEvent
from .versions import MAX_VERSION, Version, event_version

API_VERSIONS: tuple[str, ...] = ("v2", "v2.1")

MALFORMED_JSON = "malformed_json"
INVALID_EVENT = "invalid_event"
INVALID_ORDER_REF = "invalid_order_ref"
REASONS: tuple[str, ...] = (MALFORMED_JSON, INVALID_EVENT, INVALID_ORDER_REF)
# A malformed_json message: this, then where the decoder gave up (`worker validate` puts
# the position before it, as the file's line and column).
NOT_JSON = "event is not valid UTF-8 JSON"

MAX_EVENT_BYTES = 1 << 20  # far above any real contact; bounds memory and parse time
MAX_EVENT_ID_CHARS = 128

TITLES: tuple[str, ...] = (
    "Br", "Brigadier", "Capt", "Colonel", "Dame", "Dr", "Elder", "Fr", "General", "Hon",
    "Judge", "Lord", "Master", "Miss", "Mr", "Mrs", "Ms", "Mstr", "Prof", "Rabbi", "Rev",
    "Shaikha", "Sheikh", "Sir", "Sister", "Sr",
)  # fmt: skip
GENDERS: tuple[str, ...] = ("male", "female", "unknown")
# The envelope's `op`: create or update the order's contact, or erase it.
UPSERT, DELETE = "upsert", "delete"
OPS: tuple[str, ...] = (UPSERT, DELETE)
# The fingerprint of an erasure (it has no body); no body's fingerprint looks like it.
DELETE_FINGERPRINT = "delete"
# Hex digits of a body's sha256 kept as its fingerprint: 128 bits, no collision in sight.
FINGERPRINT_HEX = 32

_TITLE_BY_KEY = {title.lower(): title for title in TITLES}
_TITLE_LIST = ", ".join(TITLES)

# Explicit ASCII classes: `uuid.UUID` and `\d` without re.ASCII accept non-ASCII digits,
# underscores, braces and "urn:uuid:" forms, none of which belong in a URL path.
_UUID_PATTERN = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_UUID_RE = re.compile(_UUID_PATTERN)
_COUNTRY_RE = re.compile("[A-Za-z]{2}")
# YYYY-MM-DD, optionally followed by a time (seconds and fraction optional) and an offset.
# Written by hand rather than datetime.fromisoformat, which also takes week dates, basic
# format and other forms producers should not rely on.
_INSTANT_PATTERN = (
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?"
    r"([Zz]|[+-]\d{2}(?::?\d{2})?)?)?"
)
_INSTANT_RE = re.compile(_INSTANT_PATTERN, re.ASCII)
_DAY_RE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)  # a day alone: midnight UTC
_SAFE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

_DATE_MESSAGE = "expected YYYY-MM-DD or ISO 8601 date-time"


@dataclass(frozen=True, slots=True, repr=False)
class Event:
    """A parsed, validated and normalised event.

    `contact` holds CDP body fields in CDP's formats (without `guestRef`, kept apart as
    `guest_ref` because CDP wants it as a `guest.href` built from the base URL); `raw` is
    the original object, kept for dead letters. `version` is the event's (`version`, else
    `occurredAt`; None without either); `op` is UPSERT or DELETE (an erasure, whose
    `contact` is empty).
    """

    event_id: str
    order_ref: str
    occurred_at: datetime | None
    contact: Mapping[str, Any]
    guest_ref: str | None
    raw: dict[str, Any]
    version: Version | None = None
    op: str = UPSERT

    @property
    def erasure(self) -> bool:
        return self.op == DELETE

    def __repr__(self) -> str:
        # Identifiers only: a repr ends up in logs and tracebacks, the contact must not.
        return f"Event(event_id={self.event_id!r}, order_ref={self.order_ref!r})"


# --- small helpers ---------------------------------------------------------------------


def _json_type(value: object) -> str:
    """The JSON type name of a parsed value, for messages that must not show the value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _canonical_uuid(value: object) -> str | None:
    if isinstance(value, str) and _UUID_RE.fullmatch(value):
        return value.lower()
    return None


def _check_version(api_version: str) -> None:
    if api_version not in API_VERSIONS:
        raise ValueError(f"api_version must be one of {', '.join(API_VERSIONS)}")


def _parse_instant(text: str) -> datetime:
    """ISO 8601 date or date-time to an aware UTC datetime; naive means UTC.

    Raises ValueError (bad field values) or OverflowError (e.g. year 1 shifted before 1).
    """
    match = _INSTANT_RE.fullmatch(text)
    if match is None:
        raise ValueError("not ISO 8601")
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    tz = UTC
    if offset and offset not in ("Z", "z"):
        digits = offset[1:].replace(":", "")
        delta = timedelta(hours=int(digits[:2]), minutes=int(digits[2:] or 0))
        tz = timezone(-delta if offset[0] == "-" else delta)
    moment = datetime(
        int(year), int(month), int(day),
        int(hour or 0), int(minute or 0), int(second or 0), micro, tzinfo=tz,
    )  # fmt: skip
    return moment.astimezone(UTC)


def _format_instant(moment: datetime) -> str:
    # Not strftime: %Y does not zero-pad years below 1000 on every platform.
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T"
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}."
        f"{moment.microsecond // 1000:03d}Z"
    )


# --- contact field normalisers: (path, non-null value) -> normalised value or None ------


def _string(path: str, value: object) -> str:
    if not isinstance(value, str):
        raise FieldRejected(f"{path}: expected a string, got {_json_type(value)}")
    return value.strip()


def _optional_string(path: str, value: object) -> str | None:
    return _string(path, value) or None


def _required_string(path: str, value: object) -> str:
    text = _string(path, value)
    if not text:
        raise FieldRejected(f"{path}: must not be empty")
    return text


def _title(path: str, value: object) -> str | None:
    text = _string(path, value)
    if not text:
        return None
    title = _TITLE_BY_KEY.get(text.removesuffix(".").lower())
    if title is None:
        raise FieldRejected(f"{path}: expected one of {_TITLE_LIST}")
    return title


def _gender(path: str, value: object) -> str | None:
    text = _string(path, value).lower()
    if text and text not in GENDERS:
        raise FieldRejected(f"{path}: expected male, female or unknown")
    return text or None


def _country(path: str, value: object) -> str | None:
    text = _string(path, value)
    if text and not _COUNTRY_RE.fullmatch(text):
        raise FieldRejected(f"{path}: expected an ISO 3166-1 alpha-2 code (2 letters)")
    return text.upper() or None


def _date(path: str, value: object) -> str | None:
    text = _string(path, value)
    if not text:
        return None
    try:
        if _DAY_RE.fullmatch(text):  # the usual form (a birth date, an expiry): no shift
            date.fromisoformat(text)  # a real day, or ValueError
            return f"{text}T00:00:00.000Z"
        return _format_instant(_parse_instant(text))
    except (ValueError, OverflowError):
        raise FieldRejected(f"{path}: {_DATE_MESSAGE}") from None


def _guest_ref(path: str, value: object) -> str | None:
    text = _string(path, value)
    if not text:
        return None
    ref = _canonical_uuid(text)
    if ref is None:
        raise FieldRejected(f"{path}: expected a UUID")
    return ref


def _string_list(path: str, value: object) -> list[str] | None:
    if not isinstance(value, list):
        raise FieldRejected(f"{path}: expected an array of strings, got {_json_type(value)}")
    items = []
    for index, item in enumerate(value):
        # _string only for what is not a string: it raises, naming the item's path (a
        # path built per item would cost more than the rest of the field).
        text = item.strip() if isinstance(item, str) else _string(f"{path}[{index}]", item)
        if text:
            items.append(text)
    return items or None


_IDENTIFIER_KEYS = frozenset(("provider", "id", "expiryDate"))


def _identifier(path: str, value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise FieldRejected(f"{path}: expected an object, got {_json_type(value)}")
    for key in value:
        if key not in _IDENTIFIER_KEYS:
            raise FieldRejected(f"{_child_path(path, key)}: unknown field")
    result: dict[str, str] = {}
    for key in ("provider", "id"):
        if value.get(key) is None:
            raise FieldRejected(f"{path}.{key}: required")
        result[key] = _required_string(f"{path}.{key}", value[key])
    expiry = value.get("expiryDate")
    if expiry is not None and (date := _date(f"{path}.expiryDate", expiry)) is not None:
        result["expiryDate"] = date
    return result


def _identifiers(path: str, value: object) -> list[dict[str, str]] | None:
    if not isinstance(value, list):
        raise FieldRejected(f"{path}: expected an array of objects, got {_json_type(value)}")
    return [_identifier(f"{path}[{index}]", item) for index, item in enumerate(value)] or None


_Normaliser = Callable[[str, object], Any]

# CDP's documented body fields in CDP's own order, which is also the order of the body.
_FIELDS: dict[str, _Normaliser] = {
    "title": _title,
    "firstName": _required_string,
    "lastName": _required_string,
    "gender": _gender,
    "dateOfBirth": _date,
    "emails": _string_list,
    "phoneNumbers": _string_list,
    "nationality": _optional_string,
    "country": _country,
    "passportNumber": _optional_string,
    "passportExpiry": _date,
    "identifiers": _identifiers,
}
_V21_FIELDS: dict[str, _Normaliser] = {
    "street": _string_list,
    "city": _optional_string,
    "state": _optional_string,
}
_FIELDS_BY_VERSION: dict[str, dict[str, _Normaliser]] = {
    "v2": {**_FIELDS, "guestRef": _guest_ref},
    "v2.1": {**_FIELDS, **_V21_FIELDS, "guestRef": _guest_ref},
}
_BODY_FIELDS: tuple[str, ...] = (*_FIELDS, *_V21_FIELDS)
_PATHS = {key: f"contact.{key}" for key in _FIELDS_BY_VERSION["v2.1"]}  # built once, not per event
_REQUIRED: tuple[str, ...] = ("firstName", "lastName")
_HINTS = {"guest": " (send guestRef: the worker builds guest.href)"}


def _child_path(path: str, key: str) -> str:
    """`path.key`, unless the key is not a plain name: keys come from the producer too."""
    if _SAFE_NAME_RE.fullmatch(key):
        return f"{path}.{key}"
    return f"{path}.<a field whose name is not shown>"


def _contact(value: object, api_version: str) -> tuple[dict[str, Any], str | None]:
    """Validate and normalise `contact`; returns CDP fields and the guest ref apart."""
    if value is None:
        raise FieldRejected("contact: required")
    if not isinstance(value, dict):
        raise FieldRejected(f"contact: expected an object, got {_json_type(value)}")
    fields = _FIELDS_BY_VERSION[api_version]
    contact: dict[str, Any] = {}
    for key, item in value.items():
        normalise = fields.get(key)
        if normalise is None:
            if key not in _V21_FIELDS:
                hint = _HINTS.get(key, "")
                raise FieldRejected(f"{_child_path('contact', key)}: unknown field{hint}")
            if item is not None:  # null is absent, and absent is fine under v2
                raise FieldRejected(f"contact.{key}: needs CDP_API_VERSION=v2.1")
            continue
        if item is not None and (result := normalise(_PATHS[key], item)) is not None:
            contact[key] = result
    for key in _REQUIRED:
        if key not in contact:
            raise FieldRejected(f"contact.{key}: required")
    return contact, contact.pop("guestRef", None)


# --- envelope ----------------------------------------------------------------------------


def _too_large(raw: bytes | str) -> bool:
    if len(raw) > MAX_EVENT_BYTES:
        return True  # every character is at least one byte
    if isinstance(raw, str) and len(raw) * 4 > MAX_EVENT_BYTES:
        # Only now can the UTF-8 form exceed the cap; surrogatepass so that a lone
        # surrogate is left for orjson to report as malformed.
        return len(raw.encode("utf-8", "surrogatepass")) > MAX_EVENT_BYTES
    return False


_BOM = "\ufeff"
_BOM_BYTES = _BOM.encode()


def without_bom(raw: bytes | str) -> bytes | str:
    """`raw` without a UTF-8 byte-order mark in front (editors on Windows write one)."""
    if isinstance(raw, bytes):
        return raw[len(_BOM_BYTES) :] if raw.startswith(_BOM_BYTES) else raw
    return raw[len(_BOM) :] if raw.startswith(_BOM) else raw


def is_blank(line: bytes) -> bool:
    """True for a line with nothing but whitespace, of any kind, and maybe a byte-order
    mark: no event, skipped (not dead-lettered) by the file source and `worker validate`.

    A line that is not UTF-8 is not blank: it is bad input and gets its dead letter.
    """
    stripped = line.strip()
    if not stripped:
        return True
    try:
        text = stripped.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return not without_bom(text).strip()


def _load(raw: bytes | str, event_id: str) -> dict[str, Any]:
    if _too_large(raw):
        raise InvalidEvent(INVALID_EVENT, "event larger than 1 MiB", event_id=event_id)
    try:
        value = orjson.loads(without_bom(raw))
    except orjson.JSONDecodeError as exc:
        # Position only: orjson's own text is not promised to be free of input. The line
        # is named only when the event has more than one (a broker's message may).
        where = f"column {exc.colno}"
        if exc.lineno > 1:
            where = f"line {exc.lineno}, {where}"
        message = f"{NOT_JSON} at {where}"
        raise InvalidEvent(MALFORMED_JSON, message, event_id=event_id) from None
    if not isinstance(value, dict):
        # JSON, but not an event: the letter keeps its text (`event` is always an object).
        message = f"event is a JSON {_json_type(value)}, expected an object"
        raise InvalidEvent(INVALID_EVENT, message, event_id=event_id)
    return value


def _event_id(value: object, default: str) -> tuple[str, str | None]:
    """The event id to report, and what is wrong with the given one if anything."""
    if value is None:
        return default, None
    if not isinstance(value, str):
        return default, f"eventId: expected a string, got {_json_type(value)}"
    if not value:
        return default, "eventId: must not be empty"
    if len(value) > MAX_EVENT_ID_CHARS:
        return default, f"eventId: longer than {MAX_EVENT_ID_CHARS} characters"
    return value, None


def _order_ref(value: object) -> str:
    if value is None:
        raise FieldRejected("orderRef: required")
    if not isinstance(value, str):
        raise FieldRejected(f"orderRef: expected a string, got {_json_type(value)}")
    ref = _canonical_uuid(value)
    if ref is None:
        raise FieldRejected("orderRef: expected a UUID (8-4-4-4-12 hex digits)")
    return ref


def _occurred_at(value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise FieldRejected(f"occurredAt: expected a string, got {_json_type(value)}")
    try:
        return _parse_instant(value)
    except (ValueError, OverflowError):
        raise FieldRejected(f"occurredAt: {_DATE_MESSAGE}") from None


def _version(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldRejected(f"version: expected an integer, got {_json_type(value)}")
    if not 0 <= value <= MAX_VERSION:
        raise FieldRejected("version: expected an integer from 0 to 2^53-1")
    return value


def _event_version(version: int | None, occurred_at: datetime | None) -> Version | None:
    found = event_version(version, occurred_at)
    if found is not None and abs(found.value) > MAX_VERSION:
        # An instant in microseconds past 2**53: the redis store's Lua could not compare
        # it exactly.
        raise FieldRejected("occurredAt: expected an instant between 1685 and 2255")
    return found


def _op(value: object) -> str:
    if value is None:
        return UPSERT
    if value not in OPS:
        kind = "another string" if isinstance(value, str) else _json_type(value)
        raise FieldRejected(f'op: expected "upsert" or "delete", got {kind}')
    return str(value)


def parse_event(raw: bytes | str, *, default_event_id: str, api_version: str = "v2") -> Event:
    """Parse one message into an `Event`, or raise `InvalidEvent` naming the dead-letter reason.

    `default_event_id` (the transport's message id) is used when `eventId` is absent or
    unusable. `api_version` decides whether `street`, `city` and `state` are allowed.
    """
    _check_version(api_version)
    obj = _load(raw, default_event_id)
    event_id, event_id_problem = _event_id(obj.get("eventId"), default_event_id)
    try:
        order_ref = _order_ref(obj.get("orderRef"))
    except FieldRejected as exc:
        raise InvalidEvent(INVALID_ORDER_REF, str(exc), event=obj, event_id=event_id) from None
    if event_id_problem:
        raise InvalidEvent(
            INVALID_EVENT, event_id_problem, event=obj, order_ref=order_ref, event_id=event_id
        )
    try:
        occurred_at = _occurred_at(obj.get("occurredAt"))
        version = _event_version(_version(obj.get("version")), occurred_at)
        op = _op(obj.get("op"))
        # An erasure needs no contact, and whatever it carries is ignored.
        contact, guest_ref = (
            ({}, None) if op == DELETE else _contact(obj.get("contact"), api_version)
        )
    except FieldRejected as exc:
        raise InvalidEvent(
            INVALID_EVENT, str(exc), event=obj, order_ref=order_ref, event_id=event_id
        ) from None
    return Event(
        event_id, order_ref, occurred_at, MappingProxyType(contact), guest_ref, obj, version, op
    )


def order_ref_path(order_ref: str) -> str:
    """The canonical UUID for a URL path; ValueError for anything that is not a UUID."""
    ref = _canonical_uuid(order_ref)
    if ref is None:
        raise ValueError("order ref is not a UUID")
    return ref


def build_body(event: Event, *, base_url: str, api_version: str = "v2") -> dict[str, Any]:
    """CDP's request body: documented contact fields only, plus `guest.href`.

    A fresh structure every time (callers may mutate it); nothing of the envelope leaks.
    An event parsed under v2.1 with `street`/`city`/`state` cannot be sent under v2: that
    is an `InvalidEvent` rather than a silent loss of data.
    """
    _check_version(api_version)
    contact = event.contact
    body: dict[str, Any] = {}
    for name in _BODY_FIELDS:
        value = contact.get(name)
        if value is None:
            continue
        if api_version == "v2" and name in _V21_FIELDS:
            raise InvalidEvent(
                INVALID_EVENT,
                f"contact.{name}: needs CDP_API_VERSION=v2.1",
                event=event.raw,
                order_ref=event.order_ref,
                event_id=event.event_id,
            )
        if isinstance(value, list):
            value = [dict(item) if isinstance(item, Mapping) else item for item in value]
        body[name] = value
    if event.guest_ref is not None:
        guest_ref = order_ref_path(event.guest_ref)
        body["guest"] = {"href": f"{base_url.rstrip('/')}/{api_version}/guests/{guest_ref}"}
    return body


def fingerprint(body: Mapping[str, Any]) -> str:
    """The fingerprint of a CDP body: what the state store keeps instead of the contact.

    A hash of the canonical JSON (sorted keys), so the same normalised body always gives
    the same fingerprint and the record never holds personal data.
    """
    canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:FINGERPRINT_HEX]


# --- JSON Schema -------------------------------------------------------------------------


def event_json_schema(api_version: str = "v2") -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of the envelope for `api_version`; a fresh dict per call.

    It states the canonical forms producers should send. The parser is a little more
    lenient (case of title, gender and country, a title's trailing dot, surrounding
    whitespace, nulls and blanks as absent) and also checks calendar dates.
    """
    _check_version(api_version)
    uuid = {"type": "string", "format": "uuid", "pattern": f"^{_UUID_PATTERN}$"}
    instant = {
        "type": ["string", "null"],
        "pattern": f"^{_INSTANT_PATTERN}$",
        "description": "YYYY-MM-DD or ISO 8601 date-time (no offset = UTC); "
        "sent to CDP as YYYY-MM-DDTHH:MM:SS.sssZ in UTC",
    }
    text = {"type": ["string", "null"]}
    name = {"type": "string", "minLength": 1, "pattern": r"\S"}
    strings = {"type": ["array", "null"], "items": {"type": "string"}}
    identifier = {
        "type": "object",
        "required": ["provider", "id"],
        "additionalProperties": False,
        "properties": {"provider": name, "id": name, "expiryDate": instant},
    }
    contact: dict[str, Any] = {
        "title": {"enum": [*TITLES, None], "description": "case-insensitive; 'Mr.' is Mr"},
        "firstName": name,
        "lastName": name,
        "gender": {"enum": [*GENDERS, None], "description": "case-insensitive"},
        "dateOfBirth": instant,
        "emails": strings,
        "phoneNumbers": strings,
        "nationality": text,
        "country": {
            "type": ["string", "null"],
            "pattern": "^[A-Z]{2}$",
            "description": "ISO 3166-1 alpha-2; case-insensitive",
        },
        "passportNumber": text,
        "passportExpiry": instant,
        "identifiers": {"type": ["array", "null"], "items": identifier},
    }
    if api_version == "v2.1":
        contact.update(street=strings, city=text, state=text)
    contact["guestRef"] = {
        **uuid,
        "type": ["string", "null"],
        "description": f"sent as guest.href = {{base}}/{api_version}/guests/{{guestRef}}",
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:cdp-sync:order-contact-event:{api_version}",
        "title": f"cdp-sync order-contact event (CDP API {api_version})",
        "type": "object",
        "required": ["orderRef"],
        # An erasure (op "delete") needs no contact; every other event does.
        "if": {"required": ["op"], "properties": {"op": {"const": DELETE}}},
        "else": {"required": ["contact"]},
        "additionalProperties": True,  # producers may add metadata; it is ignored
        "properties": {
            "eventId": {
                "type": ["string", "null"],
                "minLength": 1,
                "maxLength": MAX_EVENT_ID_CHARS,
                "description": "defaults to the transport's message id",
            },
            "orderRef": {**uuid, "description": "any case; sent lowercase"},
            "occurredAt": {
                **instant,
                "description": "the event's version when `version` is absent; compared as "
                "instants (any UTC offset)",
            },
            "version": {
                "type": ["integer", "null"],
                "minimum": 0,
                "maximum": MAX_VERSION,
                "description": "the event's version (e.g. the booking's revision); decides "
                "over occurredAt; an older event than the order's last is skipped as stale",
            },
            "op": {
                "enum": [*OPS, None],
                "description": "upsert (default): create the order's contact, or update it "
                "when it changed; delete: erase it at CDP (contact not required)",
            },
            "contact": {
                "type": "object",
                "required": list(_REQUIRED),
                "additionalProperties": False,
                "properties": contact,
            },
        },
    }
