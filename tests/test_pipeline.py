"""The pipeline end to end: memory source/state/dead letters, the emulator over real HTTP.

Each test drives one row of DESIGN section 3 and checks what CDP ended up with (one
contact per order), what was acked, and what was dead-lettered with which reason.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import orjson
import pytest
from aioresponses import aioresponses
from harness import Harness, free_port
from prometheus_client import generate_latest

from worker.emulator import Emulator
from worker.errors import NotOwner, SourceError, StateError
from worker.pipeline import Worker
from worker.sources import MemoryDeadLetterSink, MemorySource
from worker.state import Claim, ClaimStatus, Finish, MemoryStateStore, Want

Events = Callable[[int], list[dict[str, Any]]]
MakeWorker = Callable[..., Harness]


# A backoff step short enough that retries cost the tests little time.
FAST = 0.01


def one_contact_each(emulator: Emulator, events: list[dict[str, Any]]) -> None:
    per_order = emulator.stats()["contacts_per_order"]
    for event in events:
        assert per_order.get(event["orderRef"]) == 1, event["orderRef"]
    assert emulator.stats()["duplicate_orders"] == 0


async def test_delivers_each_event_once_and_acks(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    batch = events(50)
    harness = await make_worker(batch).run()
    one_contact_each(emulator, batch)
    assert len(harness.source.acked) == 50
    assert harness.worker.summary["delivered"] == 50
    claim = await harness.state.claim(batch[0]["orderRef"], "someone-else", 10, Want("changed"))
    assert claim.status is ClaimStatus.UPDATE
    assert (claim.href or "").startswith(emulator.url + "/v2/orderContacts/")


async def test_duplicates_are_skipped_without_a_request(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    batch = events(10)
    again = [{**event, "eventId": event["eventId"] + "-again"} for event in batch]
    harness = await make_worker(batch + again + batch).run()
    one_contact_each(emulator, batch)
    assert harness.worker.summary["duplicate"] == 20
    assert emulator.stats()["requests"].get("POST") == 10
    assert len(harness.source.acked) == 30


async def test_a_rerun_over_the_same_events_sends_nothing(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    batch = events(20)
    await make_worker(batch).run()
    posts = emulator.stats()["requests"]["POST"]
    rerun = await make_worker(batch).run()
    assert emulator.stats()["requests"]["POST"] == posts
    assert rerun.worker.summary["duplicate"] == 20


async def test_bad_input_is_dead_lettered_with_its_reason(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    good = events(1)[0]
    bad: list[Any] = [
        b"{not json",
        {**good, "orderRef": "../../v2/guests"},
        {**good, "contact": {**good["contact"], "firstName": ""}},
        {**good, "contact": {**good["contact"], "favouriteColour": "blue"}},
        b"[1, 2, 3]",
    ]
    harness = await make_worker(bad).run()
    # JSON that is not an object is an invalid event; only what is not JSON is malformed.
    assert sorted(harness.reasons) == sorted(
        ["malformed_json", "invalid_order_ref", "invalid_event", "invalid_event", "invalid_event"]
    )
    assert emulator.stats()["requests"] == {}
    assert len(harness.source.acked) == 5
    letters = {letter["reason"]: letter for letter in harness.dead.letters if "event" in letter}
    raw = {letter["reason"]: letter["raw"] for letter in harness.dead.letters if "raw" in letter}
    assert raw == {"malformed_json": "{not json", "invalid_event": "[1, 2, 3]"}
    assert letters["invalid_event"]["event"]["orderRef"] == good["orderRef"]
    assert set(letters["invalid_event"]) >= {
        "reason",
        "detail",
        "orderRef",
        "eventId",
        "status",
        "attempts",
        "deadAt",
        "event",
    }


async def test_cdp_rejection_is_dead_lettered_with_cdps_message(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    # v2 with a v2.1 field the parser lets through when configured for v2.1.
    event = events(1)[0]
    event["contact"]["city"] = "Dublin"
    harness = await make_worker([event], cdp_api_version="v2.1").run()
    assert harness.reasons == []  # v2.1 accepts it
    emulator.reset()
    event2 = events(2)[1]
    event2["contact"]["city"] = "Cork"
    harness = make_worker([event2], cdp_api_version="v2.1")
    # Point the v2.1 worker at v2 paths: CDP rejects the unknown field with a 400.
    harness.worker.client.api_version = "v2"
    await harness.run()
    assert harness.reasons == ["cdp_rejected"]
    letter = harness.dead.letters[0]
    assert letter["status"] == 400
    assert "city" in letter["detail"]
    claim = await harness.state.claim(event2["orderRef"], "other", 10)
    assert claim.previous == "dead"


async def test_server_errors_are_retried_until_delivered(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    emulator.config.error_rate = 0.5
    batch = events(30)
    harness = make_worker(batch, max_attempts=30, backoff_base=FAST)
    await harness.run()
    one_contact_each(emulator, batch)
    assert harness.worker.summary["delivered"] == 30
    responses = emulator.stats()["responses"]
    assert sum(responses.get(code, 0) for code in ("500", "502", "503")) > 0


async def test_an_event_failing_while_others_succeed_gives_up_after_its_attempts(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    # Only failures of the event's own count (DESIGN section 3): two orders CDP always
    # answers 500 while the others are created. (Every request failing is an outage:
    # tests/test_outage.py.)
    batch = events(20)
    failing = [batch[3]["orderRef"], batch[11]["orderRef"]]
    emulator.config.error_orders = failing
    harness = make_worker(batch, max_attempts=3, backoff_base=FAST)
    await asyncio.wait_for(harness.run(), 30)
    assert harness.reasons == ["retries_exhausted", "retries_exhausted"]
    assert {letter["orderRef"] for letter in harness.dead.letters} == set(failing)
    assert all(letter["attempts"] == 3 for letter in harness.dead.letters)
    assert emulator.stats()["orders"] == 18


@pytest.mark.parametrize("fault", ["timeout_after_create_rate", "reset_after_create_rate"])
async def test_a_post_of_unknown_fate_is_reconciled_not_repeated(
    make_worker: MakeWorker, emulator: Emulator, events: Events, fault: str
) -> None:
    setattr(emulator.config, fault, 1.0)
    emulator.config.hang_seconds = 2.0
    batch = events(5)
    harness = make_worker(batch, request_timeout=0.3, lease_seconds=5.0, backoff_base=FAST)
    await harness.run()
    one_contact_each(emulator, batch)
    assert harness.worker.summary["reconciled"] == 5
    kinds = emulator.stats()["requests_by_kind"]
    assert kinds["create"] == 5  # never posted again
    # The contact found is given this body (an idempotent update): it may be another's.
    assert kinds["update"] == 5
    # One listing each; five failures in a row with no answer are an outage, too, ended
    # by one probe (a listing) once CDP answers.
    assert 5 <= kinds["list"] <= 6


async def test_an_in_doubt_claim_is_reconciled_before_any_post(
    make_worker: MakeWorker, emulator: Emulator, events: Events, state: MemoryStateStore
) -> None:
    event = events(1)[0]
    # A crashed owner claimed the order, created the contact, and never recorded it.
    await state.claim(event["orderRef"], "crashed-owner", 10)
    await state.release(event["orderRef"], "crashed-owner", sent=True)
    harness = await make_worker([event]).run()
    assert emulator.stats()["requests"] == {"GET": 1, "POST": 1}  # listed first, then sent
    assert harness.worker.summary["reconciled"] == 0
    assert harness.worker.summary["delivered"] == 1
    one_contact_each(emulator, [event])


async def test_429_slows_the_whole_worker_and_is_retried(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    emulator.config.rate_limit = 20
    batch = events(40)
    harness = make_worker(batch, concurrency=16, max_attempts=20, backoff_base=FAST)
    await harness.run()
    one_contact_each(emulator, batch)
    assert emulator.stats()["responses"].get("429", 0) > 0
    throttled = harness.worker.metrics.throttled._value.get()
    assert throttled == emulator.stats()["responses"]["429"]


async def test_not_found_is_retried_within_the_grace_period(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    emulator.config.not_found_for = 0.3
    batch = events(3)
    harness = make_worker(batch, not_found_grace=10.0, backoff_base=FAST)
    await harness.run()
    one_contact_each(emulator, batch)
    assert emulator.stats()["responses"]["404"] >= 3


async def test_not_found_past_the_grace_period_is_dead_lettered(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    emulator.config.not_found_for = 60.0
    harness = make_worker(events(2), not_found_grace=0.2, backoff_base=FAST)
    await harness.run()
    assert harness.reasons == ["order_not_found", "order_not_found"]
    assert emulator.stats()["contacts"] == 0


async def test_bad_credentials_pause_the_worker_until_they_work(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    emulator.config.auth_failure = True
    batch = events(10)
    harness = make_worker(batch, backoff_base=FAST)
    run = asyncio.create_task(harness.run())
    while not harness.worker.metrics.auth_paused._value.get():
        await asyncio.sleep(0.01)
    assert harness.worker.ready() == (False, "paused: CDP rejected the credentials")
    await asyncio.sleep(0.2)  # probes keep failing meanwhile
    emulator.config.auth_failure = False
    await asyncio.wait_for(run, 10)
    assert harness.reasons == []  # nothing is dead-lettered for bad credentials
    one_contact_each(emulator, batch)
    assert harness.worker.metrics.auth_paused._value.get() == 0


async def test_an_auth_pause_stops_the_requests_already_fetched_too(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    # Requests the worker had fetched and was retrying must wait at the gate as well:
    # refused POSTs stay within about one per request slot, whatever the backlog.
    emulator.config.auth_failure = True
    batch = events(200)
    harness = make_worker(batch, concurrency=16, backoff_base=FAST)
    run = asyncio.create_task(harness.run())
    while not harness.worker.metrics.auth_paused._value.get():
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.5)  # probes keep failing; the fetched events wait
    refused_posts = emulator.stats()["requests"].get("POST", 0)
    assert refused_posts <= 16
    emulator.config.auth_failure = False
    await asyncio.wait_for(run, 20)
    one_contact_each(emulator, batch)
    assert emulator.stats()["requests"]["POST"] == refused_posts + 200


async def test_stop_gives_unfinished_messages_and_claims_back(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    batch = events(5)
    # Nothing can finish: every POST is answered 500 (not a gateway's 502 or 504, after
    # which the POST may have landed and the claim is given back in doubt).
    emulator.config.error_orders = [event["orderRef"] for event in batch]
    harness = make_worker(batch, shutdown_timeout=1.0)
    run = asyncio.create_task(harness.run())
    while emulator.stats()["requests"].get("POST", 0) < 5:
        await asyncio.sleep(0.01)
    harness.worker.stop()
    await asyncio.wait_for(run, 5)
    assert len(harness.source.nacked) == 5
    assert harness.source.acked == []
    for event in batch:  # claims were released: the next worker may go at once
        claim = await harness.state.claim(event["orderRef"], "next", 10)
        assert claim.status is ClaimStatus.CREATE


async def test_health_endpoints_and_metrics(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    emulator.config.latency = 0.3
    harness = make_worker(events(5), concurrency=5, http_port=free_port())
    run = asyncio.create_task(harness.run())
    while emulator.stats()["requests"].get("POST", 0) < 5:
        await asyncio.sleep(0.01)
    assert harness.worker._health is not None
    base = f"http://127.0.0.1:{harness.worker._health.port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/healthz") as response:
            assert response.status == 200
        async with http.get(base + "/readyz") as response:
            assert response.status == 200
        async with http.get(base + "/metrics") as response:
            assert response.status == 200
            assert "cdp_sync_in_flight 5.0" in await response.text()
        harness.worker.stop()
        async with http.get(base + "/readyz") as response:
            assert response.status == 503
            assert (await response.json())["reason"] == "draining"
    await run
    exposition = generate_latest(harness.worker.metrics.registry).decode()
    for name in (
        "cdp_sync_events_received_total 5.0",
        'cdp_sync_events_total{outcome="delivered"} 5.0',
        'cdp_sync_requests_total{status="201"} 5.0',
        "cdp_sync_request_duration_seconds_bucket",
        "cdp_sync_in_flight 0.0",
        "cdp_sync_concurrency_limit 5.0",
        "cdp_sync_rate_limit_wait_seconds_total",
        "cdp_sync_throttled_total 0.0",
        "cdp_sync_last_success_timestamp_seconds",
        "cdp_sync_auth_paused 0.0",
    ):
        assert name in exposition


async def test_cdp_error_text_quoting_the_contact_stays_out_of_the_logs(
    make_worker: MakeWorker,
    events: Events,
    mocked: aioresponses,
    capsys: pytest.CaptureFixture[str],
) -> None:
    event = events(1)[0]
    email = event["contact"]["emails"][0]
    error = {"status": 400, "code": 400, "message": f"bad email {email}", "developerMessage": ""}
    mocked.post(re.compile(r".*/contacts$"), status=503, payload={"message": f"busy {email}"})
    mocked.post(re.compile(r".*/contacts$"), status=400, payload=error)
    harness = make_worker([event], backoff_base=FAST)
    await harness.run()
    assert harness.reasons == ["cdp_rejected"]
    assert email in harness.dead.letters[0]["detail"]  # the dead letter keeps CDP's words
    lines = capsys.readouterr().out.splitlines()
    assert [orjson.loads(line)["event"] for line in lines if "event.retry" in line]
    for line in lines:
        assert email not in line


class FlakyState(MemoryStateStore):
    """A memory store whose first outcome records, first `renew` calls or first
    `claim_many` fail, as a disk might (that claim_many after claiming: a pipeline whose
    connection dropped after the server ran it)."""

    def __init__(
        self, *, record_failures: int = 0, renew_failures: int = 0, claim_failures: int = 0
    ) -> None:
        super().__init__()
        self.record_failures = record_failures
        self.renew_failures = renew_failures
        self.claim_failures = claim_failures

    async def record_many(self, owner: str, finishes: Sequence[Finish]) -> list[NotOwner | None]:
        if self.record_failures:
            self.record_failures -= 1
            raise StateError("disk I/O error")
        return await super().record_many(owner, finishes)

    async def claim_many(
        self, wants: Sequence[tuple[str, Want]], owner: str, lease_seconds: float
    ) -> list[Claim]:
        claims = await super().claim_many(wants, owner, lease_seconds)
        if self.claim_failures:
            self.claim_failures -= 1
            raise StateError("connection lost after the claims landed")
        return claims

    async def renew(self, order_ref: str, owner: str, lease_seconds: float) -> bool:
        if self.renew_failures:
            self.renew_failures -= 1
            return False
        return await super().renew(order_ref, owner, lease_seconds)


async def test_a_contact_created_while_the_store_is_down_is_recorded_once_it_is_back(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    # CDP confirmed the contact; the store refuses to record it for a while (Redis away
    # for seconds). The outcome is kept and recorded when the store answers again: not
    # given back, not left busy for a whole lease, not listed or posted again.
    state = FlakyState(record_failures=5)
    await state.open()
    event = events(1)[0]
    harness = make_worker([event], state=state, backoff_base=FAST)
    await asyncio.wait_for(harness.run(), 20)
    await state.close()
    assert state.record_failures == 0  # the store did refuse five times
    one_contact_each(emulator, [event])
    assert emulator.stats()["requests"] == {"POST": 1}
    assert harness.worker.summary["delivered"] == 1
    assert harness.source.nacked == []
    assert len(harness.source.acked) == 1


async def test_claims_of_a_failed_claim_many_are_given_back_not_left_busy(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    # The batch's claims landed but the answer was lost: each event claims again on its
    # own, which must not find its own claim busy for a whole lease (10 s here).
    state = FlakyState(claim_failures=1)
    await state.open()
    batch = events(20)
    harness = make_worker(batch, state=state, backoff_base=FAST)
    await asyncio.wait_for(harness.run(), 5)
    await state.close()
    one_contact_each(emulator, batch)
    assert harness.worker.summary["delivered"] == 20
    assert harness.source.nacked == []


async def test_no_request_is_sent_for_an_order_whose_lease_may_be_lost(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    # A lease barely longer than the timeout: every request first renews it.
    state = FlakyState(renew_failures=1)
    await state.open()
    event = events(1)[0]
    harness = make_worker([event], state=state, request_timeout=0.5, lease_seconds=1.0)
    await asyncio.wait_for(harness.run(), 20)
    await state.close()
    assert len(harness.source.nacked) >= 1  # given back when the renewal failed
    one_contact_each(emulator, [event])
    assert emulator.stats()["requests"]["POST"] == 1


async def test_after_stop_nothing_new_is_sent_and_unsent_claims_are_not_in_doubt(
    make_worker: MakeWorker, emulator: Emulator, events: Events, state: MemoryStateStore
) -> None:
    emulator.config.latency = 0.3
    batch = events(12)
    harness = make_worker(batch, rate_limit=4.0, concurrency=2, shutdown_timeout=5.0)
    run = asyncio.create_task(harness.run())
    while emulator.stats()["requests"].get("POST", 0) < 2:
        await asyncio.sleep(0.01)
    harness.worker.stop()
    await asyncio.wait_for(run, 10)
    posts = emulator.stats()["requests"]["POST"]
    assert posts <= 3  # those in flight (or just leaving) at the stop, nothing after
    statuses = Counter()
    for event in batch:
        claim = await state.claim(event["orderRef"], "next-worker", 10)
        statuses[claim.status] += 1
    assert statuses[ClaimStatus.DUPLICATE] == emulator.stats()["orders"]
    assert statuses[ClaimStatus.IN_DOUBT] == 0  # nothing was released as "maybe sent"
    assert statuses[ClaimStatus.CREATE] == 12 - emulator.stats()["orders"]


class SlowGivingBack(MemoryStateStore):
    """A memory store whose claims wait for the test's word and whose releases take
    longer than the shutdown timeout: a stop lands while a batch is being claimed, and
    the drain cuts the giving back of those claims short."""

    def __init__(self) -> None:
        super().__init__()
        self.claiming = asyncio.Event()
        self.go_on = asyncio.Event()

    async def claim_many(
        self, wants: Sequence[tuple[str, Want]], owner: str, lease_seconds: float
    ) -> list[Claim]:
        self.claiming.set()
        await self.go_on.wait()
        return await super().claim_many(wants, owner, lease_seconds)

    async def release(self, order_ref: str, owner: str, *, sent: bool) -> None:
        await asyncio.sleep(0.2)
        await super().release(order_ref, owner, sent=sent)


async def test_a_stop_during_a_claim_loses_no_message_and_no_claim(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    # The drain's timeout (20 ms) cancels the tasks that give the claims back (200 ms):
    # what they could not do is done after the drain. Every message is acked or given
    # back, and no order is left busy for a whole lease (10 s).
    state = SlowGivingBack()
    await state.open()
    batch = events(6)
    harness = make_worker(batch, state=state, shutdown_timeout=0.02)
    run = asyncio.create_task(harness.run())
    await asyncio.wait_for(state.claiming.wait(), 5)
    harness.worker.stop()
    state.go_on.set()
    await asyncio.wait_for(run, 5)
    settled = harness.source.acked + harness.source.nacked
    assert sorted(message.id for message in settled) == sorted(f"mem-{n}" for n in range(1, 7))
    for event in batch:
        claim = await state.claim(event["orderRef"], "next-worker", 10)
        assert claim.status is not ClaimStatus.BUSY, event["orderRef"]
    assert emulator.stats()["requests"] == {}  # claimed as the stop came: nothing sent
    await state.close()


async def test_the_auth_pause_ends_only_when_a_probe_succeeds(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    emulator.config.auth_failure = True
    batch = events(3)
    harness = make_worker(batch, backoff_base=FAST)
    run = asyncio.create_task(harness.run())
    while not harness.worker.metrics.auth_paused._value.get():
        await asyncio.sleep(0.01)
    emulator.config.auth_failure = False
    emulator.config.error_rate = 1.0  # CDP down: a probe that says nothing about credentials
    await asyncio.sleep(0.3)
    assert harness.worker.metrics.auth_paused._value.get() == 1
    emulator.config.error_rate = 0.0
    await asyncio.wait_for(run, 10)
    one_contact_each(emulator, batch)


async def test_a_message_the_worker_keeps_failing_on_is_dead_lettered_not_looped(
    make_worker: MakeWorker, emulator: Emulator, events: Events
) -> None:
    batch = events(2)
    harness = make_worker(batch, max_attempts=3, backoff_base=FAST)
    calls = 0

    async def broken(order_ref: str, body: object) -> object:
        nonlocal calls
        calls += 1
        raise RuntimeError("a bug in the worker, not the event's fault")

    harness.worker.client.create_contact = broken  # type: ignore[method-assign, assignment]
    await asyncio.wait_for(harness.run(), 30)
    assert harness.reasons == ["retries_exhausted", "retries_exhausted"]
    assert calls == 6  # three tries each, then the dead letter
    letter = harness.dead.letters[0]
    assert letter["event"]["orderRef"] in {event["orderRef"] for event in batch}
    assert "RuntimeError" in letter["detail"]
    assert len(harness.source.acked) == 2


async def test_the_start_says_where_the_state_is_and_warns_when_it_is_empty(
    make_worker: MakeWorker, emulator: Emulator, events: Events, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = events(3)
    await make_worker(batch).run()
    lines = capsys.readouterr().out.splitlines()
    records = [orjson.loads(line) for line in lines if line.startswith("{")]
    opened = [r for r in records if r["event"] == "state.opened"]
    assert opened == [opened[0]]
    assert opened[0]["location"] == "memory (this process only)"
    assert opened[0]["empty"] is True
    empty = [r for r in records if r["event"] == "state.empty"]
    assert len(empty) == 1
    assert empty[0]["level"] == "warning"
    await make_worker(batch).run()  # the same store, no longer empty: no warning
    records = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["empty"] for r in records if r["event"] == "state.opened"] == [False]
    assert [r for r in records if r["event"] == "state.empty"] == []


async def test_an_empty_store_with_verify_new_is_no_warning(
    make_worker: MakeWorker, events: Events, capsys: pytest.CaptureFixture[str]
) -> None:
    await make_worker(events(1), verify_new=True).run()
    records = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    empty = [r for r in records if r["event"] == "state.empty"]
    assert [r["level"] for r in empty] == ["info"]
    assert "--verify-new" in empty[0]["consequence"]


async def test_an_order_busy_elsewhere_is_logged_once_per_lease_not_per_retry(
    make_worker: MakeWorker,
    emulator: Emulator,
    events: Events,
    state: MemoryStateStore,
    capsys: pytest.CaptureFixture[str],
) -> None:
    event = events(1)[0]
    await state.claim(event["orderRef"], "another-replica", 4.5)  # it dies holding it
    copies = [{**event, "eventId": f"copy-{n}"} for n in range(4)]
    harness = make_worker(copies, backoff_base=FAST)
    await asyncio.wait_for(harness.run(), 30)
    lines = capsys.readouterr().out.splitlines()
    busy = [line for line in lines if '"event.busy_elsewhere"' in line]
    assert len(busy) == 1, len(busy)
    one_contact_each(emulator, [event])


class FlakySink(MemoryDeadLetterSink):
    """A sink that is away for its first `failures` letters (a broker restarting)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.tries = 0

    async def put(self, letter: dict[str, Any]) -> None:
        self.tries += 1
        if self.failures:
            self.failures -= 1
            raise SourceError("dead-letter stream: connection refused")
        await super().put(letter)


async def test_a_letter_the_sink_cannot_take_yet_waits_there_without_a_hot_loop(
    make_settings: Callable[..., Any], state: MemoryStateStore
) -> None:
    sink = FlakySink(failures=4)
    source = MemorySource([b"{not json"])
    worker = Worker(make_settings(), source=source, state=state, dead_letters=sink)
    run = asyncio.create_task(worker.run())
    await asyncio.sleep(0.2)
    assert worker.ready() == (False, "paused: the dead-letter sink does not store letters")
    await asyncio.wait_for(run, 10)
    await worker.close()
    assert [letter["reason"] for letter in sink.letters] == ["malformed_json"]
    assert sink.tries == 5  # 0.1, 0.2, 0.4, 0.8 s apart: bounded, not a hot loop
    assert source.nacked == []
    assert len(source.acked) == 1
