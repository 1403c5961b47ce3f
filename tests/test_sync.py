"""Convergent sync end to end (DESIGN section 4): the pipeline against the emulator over
real HTTP, one path each. Changed contacts are updated, older events are stale, erasures
delete, an abandoned claim is finished by the next owner, `--verify-new` and
`--on-change ignore` do what they say, and every outcome is one log line that names the
order, the event and its version, never the contact."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import SECRET_KEY, SECRET_TOKEN
from harness import Harness

from worker.cdp import basic_authorization
from worker.contact import build_body, fingerprint, parse_event
from worker.demo import changed, convergence_problems, expected_bodies
from worker.emulator import Emulator
from worker.state import ClaimStatus, MemoryStateStore, Want
from worker.versions import NUMBER, Version

MakeWorker = Callable[..., Harness]
Events = Callable[[int], list[dict[str, Any]]]
FAST = 0.005


def versioned(event: dict[str, Any], version: int, **fields: Any) -> dict[str, Any]:
    return {**event, "eventId": f"{event['eventId']}-v{version}", "version": version, **fields}


def erasure(event: dict[str, Any], version: int) -> dict[str, Any]:
    return {"orderRef": event["orderRef"], "op": "delete", "version": version}


def converged(emulator: Emulator, events: list[dict[str, Any]]) -> list[str]:
    """How CDP's final state differs from what `events` say it must be (the model)."""
    lines = [orjson.dumps(event) for event in events]
    return convergence_problems(emulator, expected_bodies(lines, base_url=emulator.url))


async def test_a_changed_contact_is_updated_once(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    first = versioned(events(1)[0], 1)
    second = versioned(changed(random.Random(1), first, 1), 2)
    harness = await make_worker([first, second, second]).run()
    assert converged(emulator, [first, second]) == []
    per_order = emulator.stats()["per_order"][first["orderRef"]]
    assert (per_order["creates"], per_order["updates"]) == (1, 1)
    summary = harness.worker.summary
    assert (summary["delivered"], summary["updated"], summary["duplicate"]) == (1, 1, 1)


async def test_an_older_version_after_a_newer_one_is_stale_and_sends_nothing(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    base = events(1)[0]
    newer = versioned(changed(random.Random(2), base, 2), 5)
    older = versioned(base, 3)
    harness = await make_worker([newer, older]).run()
    assert harness.worker.summary["stale"] == 1
    assert converged(emulator, [newer, older]) == []
    assert emulator.stats()["updates"] == 0
    assert len(harness.source.acked) == 2


async def test_occurred_at_versions_compare_as_instants(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    base = events(1)[0]
    later = {**changed(random.Random(3), base, 3), "eventId": "later"}
    later["occurredAt"] = "2026-11-26T12:30:00+02:00"  # 10:30 UTC
    earlier = {**base, "eventId": "earlier", "occurredAt": "2026-11-26T10:15:00Z"}
    harness = await make_worker([later, earlier]).run()
    assert harness.worker.summary["stale"] == 1
    assert converged(emulator, [later, earlier]) == []


async def test_an_erasure_deletes_and_a_newer_version_creates_again(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    first = versioned(events(1)[0], 1)
    gone = erasure(first, 2)
    harness = await make_worker([first, gone, first]).run()  # v1 again: stale
    assert emulator.bodies_for(first["orderRef"]) == []
    assert harness.worker.summary["deleted"] == 1
    assert harness.worker.summary["stale"] == 1
    back = versioned(first, 3)
    await make_worker([back]).run()
    assert converged(emulator, [first, gone, back]) == []


async def test_an_erasure_of_an_order_this_store_never_saw_deletes_what_cdp_holds(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    order = events(1)[0]
    other = MemoryStateStore()  # another deployment created it
    await other.open()
    await make_worker([order], state=other).run()
    harness = await make_worker([erasure(order, 1)]).run()
    assert emulator.bodies_for(order["orderRef"]) == []
    assert harness.worker.summary["deleted"] == 1
    await other.close()


async def test_verify_new_with_a_fresh_store_creates_nothing_twice(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    batch = [versioned(event, 1) for event in events(6)]
    await make_worker(batch).run()
    rng = random.Random(4)
    changes = [versioned(changed(rng, event, n), 2) for n, event in enumerate(batch[:3])]
    fresh = MemoryStateStore()  # the state store was lost
    await fresh.open()
    harness = await make_worker(batch + changes, state=fresh, verify_new=True).run()
    assert emulator.stats()["creates"] == 6  # the first run's, none since
    assert emulator.stats()["duplicate_orders"] == 0
    assert converged(emulator, batch + changes) == []
    assert harness.worker.summary["delivered"] == 0
    await fresh.close()


async def test_without_verify_new_a_fresh_store_would_create_twice(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    # What --verify-new is for, shown: the store is the only memory of what was created.
    order = events(1)[0]
    await make_worker([order]).run()
    fresh = MemoryStateStore()
    await fresh.open()
    await make_worker([order], state=fresh).run()
    assert emulator.stats()["duplicate_orders"] == 1
    await fresh.close()


async def test_an_abandoned_update_is_finished_by_the_next_owner(
    make_worker: MakeWorker, emulator: Emulator, events: Events, state: MemoryStateStore
) -> None:
    first = versioned(events(1)[0], 1)
    await make_worker([first]).run()
    second = versioned(changed(random.Random(5), first, 5), 2)
    body = build_body(
        parse_event(orjson.dumps(second), default_event_id="x"),
        base_url=emulator.url,
    )
    want = Want(fingerprint(body), Version(NUMBER, 2))
    # A worker claimed the update and died (its lease runs out at once): did it send?
    claim = await state.claim(first["orderRef"], "dead-worker", 0.0, want)
    assert claim.status is ClaimStatus.UPDATE
    harness = await make_worker([second], backoff_base=FAST).run()
    assert converged(emulator, [first, second]) == []  # listed, adopted, updated
    assert harness.worker.summary["reconciled"] == 1
    assert emulator.stats()["updates"] == 1


async def test_a_contact_deleted_at_cdp_is_created_again_by_its_update(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    first = versioned(events(1)[0], 1)
    await make_worker([first]).run()
    headers = {"Authorization": basic_authorization(SECRET_KEY, SECRET_TOKEN)}
    async with aiohttp.ClientSession(headers=headers) as session:  # deleted behind our back
        for contact in emulator.contacts_for(first["orderRef"]):
            async with session.delete(contact["href"]) as response:
                assert response.status == 204
    second = versioned(changed(random.Random(6), first, 6), 2)
    harness = await make_worker([second]).run()
    assert converged(emulator, [first, second]) == []
    assert harness.worker.summary["delivered"] == 1


async def test_on_change_ignore_keeps_the_first_body_and_counts_the_change(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    first = versioned(events(1)[0], 1)
    second = versioned(changed(random.Random(7), first, 7), 2)
    harness = await make_worker([first, second], on_change="ignore").run()
    assert converged(emulator, [first]) == []
    assert harness.worker.summary["changed_ignored"] == 1
    assert emulator.stats()["updates"] == 0
    gone = erasure(first, 3)  # erasures apply in both modes
    await make_worker([gone], on_change="ignore").run()
    assert emulator.bodies_for(first["orderRef"]) == []


async def test_records_of_the_previous_release_are_updated_once(
    make_worker: MakeWorker, emulator: Emulator, events: Events, state: MemoryStateStore
) -> None:
    order = events(1)[0]
    await make_worker([order]).run()
    record = await state.lookup(order["orderRef"])
    assert record is not None
    # As the release before fingerprints wrote it: done, content unknown.
    state._orders[order["orderRef"]] = dataclasses.replace(record, fingerprint=None, version=None)
    again = await make_worker([order, order]).run()
    assert (again.worker.summary["updated"], again.worker.summary["duplicate"]) == (1, 1)
    assert emulator.stats()["updates"] == 1


async def test_each_outcome_is_one_line_with_order_event_and_version_never_the_contact(
    make_worker: MakeWorker, emulator: Emulator, events: Events, capsys: pytest.CaptureFixture[str]
) -> None:
    first = versioned(events(1)[0], 1)
    second = versioned(changed(random.Random(8), first, 8), 2)
    await make_worker([first, second, versioned(first, 1), erasure(first, 3)]).run()
    records = [orjson.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    outcomes = [r for r in records if r["event"] in {
        "event.delivered", "event.updated", "event.stale", "event.deleted"}]  # fmt: skip
    assert [r["event"] for r in outcomes] == [
        "event.delivered", "event.updated", "event.stale", "event.deleted"
    ]  # fmt: skip
    assert [r["version"] for r in outcomes] == ["1", "2", "1", "3"]
    assert {r["order_ref"] for r in outcomes} == {first["orderRef"]}
    assert all(r["event_id"] for r in outcomes)
    text = "\n".join(orjson.dumps(r).decode() for r in records)
    for contact in (first["contact"], second["contact"]):
        for leak in (contact["firstName"], contact["lastName"], *contact["emails"]):
            assert leak not in text
