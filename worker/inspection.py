"""`worker inspect ORDER_REF`: what happened to one order, without reading logs.

It reads the order's record from the state store (`StateStore.lookup`, which takes
nothing) and, with `--cdp`, asks CDP what it holds for the order now: each contact's
ref, and whether its fields are still the ones the record's fingerprint was taken of.
The contact's fields themselves are personal data: they are printed only with
`--show-contact`, and never logged.

Exit codes: 0 the state store knows the order, 1 it does not (CDP may still hold
contacts: `--cdp` says so), 2 a configuration error.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from ._urls import refuse_bare_path
from .cdp import CdpClient, Verdict
from .config import Settings, default, format_duration, load_settings
from .contact import fingerprint
from .errors import ConfigError
from .state import Record, StateStore, open_state_store
from .state.base import DEAD, DELETED, DONE, IN_FLIGHT, RECONCILE
from .state.sqlite import URL_PREFIX as SQLITE_PREFIX
from .state.sqlite import path_from_url
from .versions import NUMBER

FOUND, UNKNOWN = 0, 1

# Fields of a contact read from CDP that are CDP's own, not the body the worker sent:
# left out of the fingerprint compared with the record's.
CDP_FIELDS = frozenset({"href", "ref", "createdAt", "modifiedAt", "order"})

# What each status means, for a person.
MEANING = {
    DONE: "delivered: CDP holds the contact below",
    DELETED: "erased: CDP holds no contact for it (an older event is stale)",
    DEAD: "dead-lettered: the worker gave up on its last event (worker dlq list)",
    IN_FLIGHT: "being worked, or abandoned mid-way by a worker that stopped",
}

Write = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Found:
    """One contact CDP holds for the order: its ref, and its fields (None: unreadable)."""

    ref: str
    fields: dict[str, Any] | None


def open_parts(state_url: str | None, *, cdp: bool) -> tuple[StateStore, CdpClient | None]:
    """The state store `--state` names (or $WORKER_STATE, or the default file), not yet
    opened, and with `cdp` a client built from the environment as `worker run`'s is.

    A sqlite file that is not there is an error, not a new empty store: inspecting from
    another directory than the worker's would otherwise say every order is unknown.
    """
    url = state_url or os.environ.get("WORKER_STATE") or default("state")
    refuse_bare_path(url, "--state", suggest=SQLITE_PREFIX)
    if url.startswith("memory:"):
        raise ConfigError("--state: a memory: store lives in its worker's process only")
    if url.startswith(SQLITE_PREFIX):
        path = os.path.abspath(path_from_url(url))
        if not os.path.exists(path):
            raise ConfigError(
                f"--state: {path} does not exist; give the worker's own --state, or run "
                "from its working directory"
            )
    state = open_state_store(url, retention_seconds=None)  # None: no sweep, read only
    return state, client_for(_cdp_settings()) if cdp else None


def _cdp_settings() -> Settings:
    """The CDP settings of the environment. A Settings needs a source: inspect reads
    none, and memory: opens nothing."""
    return load_settings({"source": "memory:"})


async def run(
    order_ref: str, state: StateStore, client: CdpClient | None, *, show_contact: bool
) -> int:
    """Open the parts, inspect the order, close them; the exit code."""
    await state.open()
    try:
        if client is None:
            return await inspect_order(order_ref, state)
        await client.open()
        try:
            return await inspect_order(order_ref, state, client=client, show_contact=show_contact)
        finally:
            await client.close()
    finally:
        await state.close()


async def inspect_order(
    order_ref: str,
    state: StateStore,
    *,
    client: CdpClient | None = None,
    show_contact: bool = False,
    write: Write = print,
) -> int:
    """Write what the store (and, given `client`, CDP) knows of `order_ref`; the exit code."""
    record = await state.lookup(order_ref)
    write(f"order {order_ref}")
    write(f"  state store    {state.location}")
    if record is None:
        write("  record         none: this state store never saw the order (or swept it)")
    else:
        for label, value in describe(record, now=time.time()):
            write(f"  {label:<14} {value}")
    if client is not None:
        found = await contacts_at_cdp(client, order_ref)
        for line in cdp_lines(found, record, show_contact=show_contact):
            write(line)
    return UNKNOWN if record is None else FOUND


def describe(record: Record, *, now: float) -> list[tuple[str, str]]:
    """The record as (label, value) rows, without personal data (it holds none)."""
    rows = [("status", f"{record.status}  ({MEANING.get(record.status, 'unknown status')})")]
    if record.status == IN_FLIGHT:
        rows.append(("doing", _doing(record)))
        rows.append(("owner", record.owner or "- (given back: the next claim lists first)"))
        rows.append(("lease", _lease(record.lease_until, now)))
    if record.status == DEAD:
        rows.append(("reason", record.reason or "-"))
    if record.contact_ref:
        rows.append(("contact", record.contact_ref))
        rows.append(("href", record.href or "-"))
    if record.version is not None:
        kind = "the event's version" if record.version.kind == NUMBER else "its occurredAt"
        rows.append(("version", f"{record.version}  ({kind})"))
    rows.append(("fingerprint", record.fingerprint or "- (content unknown)"))
    rows.append(("attempts", str(record.attempts)))
    when = "since" if record.status == IN_FLIGHT else "recorded"
    rows.append((when, _instant(record.updated_at, now)))
    return rows


def _doing(record: Record) -> str:
    if record.op == RECONCILE:
        return "reconcile (CDP's side is unknown: the next owner lists the order's contacts)"
    return record.op or "-"


def _lease(lease_until: float, now: float) -> str:
    if lease_until <= 0:
        return "none (given back)"
    left = lease_until - now
    if left > 0:
        return f"{_at(lease_until)}, {format_duration(round(left, 1))} left"
    return f"{_at(lease_until)}, ran out {format_duration(round(-left, 1))} ago (in doubt)"


def _instant(at: float, now: float) -> str:
    return f"{_at(at)} ({format_duration(max(0, round(now - at)))} ago)"


def _at(instant: float) -> str:
    return datetime.fromtimestamp(instant, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


async def contacts_at_cdp(client: CdpClient, order_ref: str) -> list[Found] | str:
    """The order's contacts at CDP, each read whole; or why they could not be listed."""
    listed = await client.list_contacts(order_ref)
    if listed.verdict is not Verdict.OK:
        return f"CDP did not list the order's contacts: {listed.label} {listed.message or ''}"
    found = []
    for ref, _href in listed.contacts:
        outcome, fields = await client.contact_fields(ref)
        found.append(Found(ref, fields if outcome.verdict is Verdict.OK else None))
    return found


def cdp_lines(found: list[Found] | str, record: Record | None, *, show_contact: bool) -> list[str]:
    """What CDP holds, against the record: one line per contact."""
    if isinstance(found, str):
        return [f"  at CDP         {found}"]
    if not found:
        expected = record is None or record.status in (DELETED, DEAD, IN_FLIGHT)
        return [f"  at CDP         no contact{'' if expected else '  (the record names one!)'}"]
    lines = [f"  at CDP         {len(found)} contact{'s' if len(found) > 1 else ''}"]
    for contact in found:
        lines.append(f"    {contact.ref}  {_match(contact, record)}")
        if show_contact and contact.fields is not None:
            shown = orjson.dumps(contact.fields, option=orjson.OPT_SORT_KEYS).decode()
            lines.append(f"      {shown}")
    if len(found) > 1:
        lines.append("    more than one contact: the next event of the order keeps the first")
    return lines


def _match(contact: Found, record: Record | None) -> str:
    """Whether the contact is the record's, and holds the fields it was last sent."""
    if contact.fields is None:
        return "(could not be read)"
    if record is None or record.contact_ref != contact.ref:
        return "not the record's contact"
    if record.fingerprint is None:
        return "the record's contact (its content was never fingerprinted)"
    if body_fingerprint(contact.fields) == record.fingerprint:
        return "the record's contact; its fields match the record's fingerprint"
    return "the record's contact; its fields differ from what the record says was sent"


def body_fingerprint(fields: Mapping[str, Any]) -> str:
    """The fingerprint of a contact read from CDP: of its fields but CDP's own."""
    return fingerprint({k: v for k, v in fields.items() if k not in CDP_FIELDS})


def client_for(settings: Settings) -> CdpClient:
    """A CDP client for one order's few reads."""
    return CdpClient(
        settings.cdp_base_url,
        settings.cdp_client_key,
        settings.cdp_api_token,
        api_version=settings.cdp_api_version,
        timeout=settings.request_timeout,
        concurrency=2,
        ca_file=settings.cdp_ca_file,
    )
