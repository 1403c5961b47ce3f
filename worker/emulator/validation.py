"""Strict validation of an order contact's body, field by field, as CDP documents it: the
same rules for a create, an update (the whole body) and a v2.1 PATCH (the fields given).

Messages name the field but never quote its value: values are personal data and the
worker keeps CDP's message in its dead letters.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
UUID_RE = re.compile(_UUID)
# CDP's documented wire format for dates: milliseconds and a literal Z, nothing else
# ([0-9], not \d, which would also take non-ASCII digits).
DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")
COUNTRY_RE = re.compile(r"[A-Z]{2}")
GUEST_HREF_RE = re.compile(rf"https?://.+/guests/{_UUID}")

# Written out from CDP's documentation rather than imported from `worker.contact`: the
# emulator is the independent check of what the worker sends.
TITLES = frozenset(
    {
        "Br", "Brigadier", "Capt", "Colonel", "Dame", "Dr", "Elder", "Fr", "General", "Hon",
        "Judge", "Lord", "Master", "Miss", "Mr", "Mrs", "Ms", "Mstr", "Prof", "Rabbi", "Rev",
        "Shaikha", "Sheikh", "Sir", "Sister", "Sr",
    }
)  # fmt: skip
GENDERS = frozenset({"male", "female", "unknown"})

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


def validate_contact(body: dict[str, Any], version: str, *, partial: bool = False) -> str | None:
    """Return why `body` is not a valid contact for `version`, or None if it is.

    `partial` (a v2.1 PATCH) checks each field given as a create would, but requires none:
    the fields left out keep their values. The message names the field but never quotes
    its value: values are personal data and the worker keeps CDP's message in its dead
    letters.
    """
    validators = FIELDS_BY_VERSION[version]
    for name, value in body.items():
        validator = validators.get(name)
        if validator is None:
            return f"{name}: unknown field for the {version} order contact"
        problem = validator(value)
        if problem is not None:
            return f"{name}: {problem}"
    if partial:
        return None
    for name in REQUIRED_FIELDS:
        if name not in body:
            return f"{name}: is required"
    return None
