"""The emulator's knobs: one mutable `EmulatorConfig`, read afresh on every request."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

# The kinds of write that change contacts; each has its pair of after-write fault knobs.
WRITE_KINDS = ("create", "update", "delete")


@dataclass
class EmulatorConfig:
    """Every knob of the emulator. Mutable on purpose: it is read afresh on each request."""

    client_key: str = "emulator-key"
    api_token: str = "emulator-token"  # noqa: S105 (a public, documented test default)
    rate_limit: float = 0.0  # accepted API requests per sliding second; 0 = off
    latency: float = 0.0  # seconds added to every API answer
    latency_jitter: float = 0.0  # uniform +- seconds around `latency`
    error_rate: float = 0.0  # fraction of API requests answered 500/502/503
    # Faults *after* a write is applied: the change is made at the emulator, then the
    # client gets no answer. `timeout_...` hangs for `hang_seconds` before answering (a
    # client with a shorter timeout sees a timeout), `reset_...` drops the connection.
    # One pair per kind of write, so a test can fault creates, updates or deletes alone.
    timeout_after_create_rate: float = 0.0  # fraction of creating POSTs that then hang
    reset_after_create_rate: float = 0.0  # fraction of creating POSTs whose connection drops
    # updates: v2 POST /v2/orderContacts/{ref}, v2.1 PUT and PATCH /v2.1/orderContacts/{ref}
    timeout_after_update_rate: float = 0.0  # fraction of applied updates that then hang
    reset_after_update_rate: float = 0.0  # fraction of applied updates whose connection drops
    # deletes: DELETE /{version}/orderContacts/{ref}
    timeout_after_delete_rate: float = 0.0  # fraction of applied deletes that then hang
    reset_after_delete_rate: float = 0.0  # fraction of applied deletes whose connection drops
    hang_seconds: float = 30.0  # how long a "timeout after create/update/delete" write hangs
    forbidden: bool = False  # valid credentials are answered 403
    auth_failure: bool = False  # every API request is answered 401
    not_found_for: float = 0.0  # an order 404s to POST this long after its first POST
    seed: int | None = None  # seed of the random choices (faults, jitter)
    # orderRefs (any case) whose writes are always answered 500, before anything changes:
    # creating POSTs, and updates and deletes of the order's contacts. A fault of one
    # event's, while the others succeed. Reads (GET, listing) are not affected.
    error_orders: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_config_values(dataclasses.asdict(self))

    def update(self, changes: Mapping[str, object]) -> None:
        """Apply several knobs at once, all or nothing (ValueError names the bad one)."""
        _check_config_values(changes)
        for name, value in changes.items():
            # JSON has no float/int distinction; keep the dataclass's declared kinds.
            setattr(self, name, float(value) if name in _FLOAT_KNOBS else value)  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_STR_KNOBS = frozenset({"client_key", "api_token"})
_BOOL_KNOBS = frozenset({"forbidden", "auth_failure"})
_RATE_KNOBS = frozenset(
    {"error_rate"}
    | {f"{fault}_after_{kind}_rate" for fault in ("timeout", "reset") for kind in WRITE_KINDS}
)
_FLOAT_KNOBS = frozenset(
    {"rate_limit", "latency", "latency_jitter", "hang_seconds", "not_found_for"} | _RATE_KNOBS
)
_KNOBS = frozenset(f.name for f in fields(EmulatorConfig))


def _check_config_values(values: Mapping[str, object]) -> None:
    """Reject unknown knobs and wrong kinds up front, so a typo in a PATCH is loud."""
    for name, value in values.items():
        if name not in _KNOBS:
            raise ValueError(f"unknown emulator setting {name!r}")
        if name in _STR_KNOBS and not isinstance(value, str):
            raise ValueError(f"{name} must be a string")
        if name in _BOOL_KNOBS and not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false")
        if name == "seed" and not (value is None or _is_int(value)):
            raise ValueError("seed must be an integer or null")
        if name in _FLOAT_KNOBS:
            _check_number(name, value)
        if name == "error_orders" and not (
            isinstance(value, list) and all(isinstance(item, str) for item in value)
        ):
            raise ValueError("error_orders must be a list of orderRefs")


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0")  # `not >=` also catches NaN
    if name in _RATE_KNOBS and value > 1:
        raise ValueError(f"{name} must be a fraction between 0 and 1")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
