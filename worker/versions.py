"""An event's version, and how two versions compare (DESIGN sections 2 and 4).

An event's version is its `version` field (an integer, e.g. the booking's revision) when
given, else its `occurredAt` instant. Both are kept as one integer of a *kind*: "n" for a
`version`, "t" for an instant in microseconds since the epoch (any UTC offset lands on
the same integer). Integers, not strings or floats, because every state backend compares
them in its own language (SQL, Lua) and all of them compare integers alike; they stay
below 2**53 so that Lua's doubles hold them exactly.

Versions of different kinds do not compare: a producer uses one kind per order, and
when it does not, the later event worked wins, as for events without a version.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import NamedTuple

# Integer versions above this are refused: Lua (the redis store) holds numbers as doubles.
MAX_VERSION = 2**53 - 1
NUMBER, INSTANT = "n", "t"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class Version(NamedTuple):
    """`kind` is NUMBER or INSTANT; `value` an integer (microseconds for an instant)."""

    kind: str
    value: int

    @classmethod
    def of_instant(cls, moment: datetime) -> Version:
        return cls(INSTANT, (moment - _EPOCH) // _MICROSECOND)

    def __str__(self) -> str:
        """For log lines: the revision number, or the instant in ISO 8601."""
        if self.kind == NUMBER:
            return str(self.value)
        return (_EPOCH + self.value * _MICROSECOND).isoformat().replace("+00:00", "Z")


def event_version(version: int | None, occurred_at: datetime | None) -> Version | None:
    """The version of an event with these fields: `version` decides when both are given."""
    if version is not None:
        return Version(NUMBER, version)
    if occurred_at is not None:
        return Version.of_instant(occurred_at)
    return None


def older(event: Version | None, record: Version | None) -> bool:
    """True if an event of version `event` is older than what a record holds: stale."""
    if event is None or record is None or event.kind != record.kind:
        return False
    return event.value < record.value


def forward(record: Version | None, event: Version | None) -> Version | None:
    """The record's version once an event that is not older was worked (or skipped)."""
    return record if event is None else event
