"""`Delivery`'s retry and reconciliation logic alone: plain fakes for its four Protocols.

No emulator, no worker, no event loop tricks: a scripted client answers each request with
the next `Outcome`, the gate sends at once and writes down its retries and sleeps, and the
recorder writes down how the event ended. Each test is one path of DESIGN section 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from worker.cdp import Outcome, Verdict
from worker.contact import DELETE_FINGERPRINT, Event, build_body, fingerprint, parse_event
from worker.delivery import Delivery, Policy
from worker.demo import contact_event
from worker.errors import Draining
from worker.sources import Message
from worker.state import Claim, ClaimStatus

CREATED = Outcome(Verdict.OK, "201", 201, contact_ref="c-1", href="https://cdp/c-1")
LISTED_NONE = Outcome(Verdict.OK, "200", 200)
LISTED_ONE = Outcome(Verdict.OK, "200", 200, contacts=(("c-9", "https://cdp/c-9"),))
UNAVAILABLE = Outcome(Verdict.RETRY, "503", 503)
TIMEOUT = Outcome(Verdict.IN_DOUBT, "timeout")
CONFLICT = Outcome(Verdict.CONFLICT, "409", 409)
REJECTED = Outcome(Verdict.REJECTED, "400", 400, message="firstName too long")
NOT_FOUND = Outcome(Verdict.NOT_FOUND, "404", 404, message="no such order")
REFUSED = Outcome(Verdict.AUTH, "401", 401)
UPDATED = Outcome(Verdict.OK, "200", 200, contact_ref="c-9", href="https://cdp/c-9")
DELETED = Outcome(Verdict.OK, "204", 204, contact_ref="c-9")
LISTED_TWO = Outcome(
    Verdict.OK, "200", 200, contacts=(("c-9", "https://cdp/c-9"), ("c-8", "https://cdp/c-8"))
)
NEW = Claim(ClaimStatus.CREATE, attempts=1)
IN_DOUBT = Claim(ClaimStatus.IN_DOUBT, attempts=2, previous="in_flight")
UPDATE = Claim(ClaimStatus.UPDATE, 1, "c-9", "https://cdp/c-9", previous="done")


class ScriptedClient:
    """Answers each call with the next outcome of its script; records what was asked."""

    def __init__(self, script: Iterable[Outcome]) -> None:
        self.script = list(script)
        self.calls: list[str] = []

    def _next(self, kind: str) -> Outcome:
        self.calls.append(kind)
        assert self.script, f"an unexpected {kind} after the script ended"
        return self.script.pop(0)

    async def create_contact(self, order_ref: str, body: Mapping[str, Any]) -> Outcome:
        assert body["firstName"]
        return self._next("post")

    async def list_contacts(self, order_ref: str) -> Outcome:
        return self._next("list")

    async def update_contact(self, contact_ref: str, body: Mapping[str, Any]) -> Outcome:
        assert body["firstName"]
        return self._next(f"update {contact_ref}")

    async def delete_contact(self, contact_ref: str) -> Outcome:
        return self._next(f"delete {contact_ref}")


@dataclass
class FakeGate:
    """Sends at once; writes down retries (reason, delay), sleeps and auth pauses.

    `stop_after_retries`: the worker stops at that retry (its sleep raises Draining).
    """

    stop_after_retries: int | None = None
    outage: bool = False  # every failure of CDP's is an outage: none counts
    retries: list[tuple[str, float]] = field(default_factory=list)
    auth_pauses: int = 0
    outage_probes: int = 0
    probe: Callable[[], Awaitable[Outcome]] | None = None

    async def request(self, order_ref: str, call: Callable[[], Awaitable[Outcome]]) -> Outcome:
        return await call()

    async def retry_in(self, seconds: float, reason: str) -> None:
        self.retries.append((reason, seconds))
        if self.stop_after_retries is not None and len(self.retries) >= self.stop_after_retries:
            raise Draining

    def auth_failed(self, probe: Callable[[], Awaitable[Outcome]]) -> None:
        self.auth_pauses += 1
        self.probe = probe

    answers: int = 0

    def failed(
        self, outcome: Outcome, probe: Callable[[], Awaitable[Outcome]], answers_before: int
    ) -> bool:
        if self.outage and (outcome.status is None or outcome.status >= 500):
            self.outage_probes += 1
            self.probe = probe
            return False
        return True


@dataclass
class FakeRecorder:
    ended: list[tuple[Any, ...]] = field(default_factory=list)
    fingerprints: list[str | None] = field(default_factory=list)

    async def done(
        self,
        message: Message,
        event: Event,
        contact: tuple[str, str],
        outcome: str,
        *,
        fingerprint: str | None,
    ) -> None:
        self.ended.append(("done", outcome, *contact))
        self.fingerprints.append(fingerprint)

    async def deleted(self, message: Message, event: Event) -> None:
        self.ended.append(("deleted",))

    async def dead(
        self,
        message: Message,
        event: Event,
        reason: str,
        detail: str | None,
        *,
        status: int | None,
        attempts: int,
        fingerprint: str | None,
    ) -> None:
        self.ended.append(("dead", reason, detail, status, attempts))
        self.fingerprints.append(fingerprint)


@dataclass
class Run:
    delivery: Delivery
    client: ScriptedClient
    gate: FakeGate
    recorder: FakeRecorder

    @property
    def ended(self) -> list[tuple[Any, ...]]:
        return self.recorder.ended


def event(**fields: Any) -> Event:
    raw = {**contact_event(random.Random(3), 1), **fields}
    return parse_event(orjson.dumps(raw), default_event_id="m-1")


async def deliver(
    script: Iterable[Outcome],
    *,
    claim: Claim = NEW,
    claims: int = 1,
    max_attempts: int = 4,
    not_found_grace: float = 300.0,
    gate: FakeGate | None = None,
    erasure: bool = False,
    on_change: str = "update",
    verify_new: bool = False,
) -> Run:
    client, recorder = ScriptedClient(script), FakeRecorder()
    gate = gate or FakeGate()
    policy = Policy(
        max_attempts=max_attempts,
        not_found_grace=not_found_grace,
        backoff_base=0.5,
        on_change=on_change,
        verify_new=verify_new,
    )
    the_event = event(op="delete") if erasure else event()
    body = None if erasure else build_body(the_event, base_url="https://cdp.example")
    delivery = Delivery(
        Message(id="m-1", body=b"{}"),
        the_event,
        body=body,
        fingerprint=DELETE_FINGERPRINT if body is None else fingerprint(body),
        claim=claim,
        gate=gate,
        recorder=recorder,
        client=client,
        policy=policy,
        claims=claims,
    )
    run = Run(delivery, client, gate, recorder)
    with contextlib.suppress(Draining):  # the worker stopped: the message goes back
        await delivery.run()
    assert not client.script, "the delivery stopped before the script ended"
    return run


async def test_a_201_is_recorded_as_delivered() -> None:
    run = await deliver([CREATED])
    assert run.ended == [("done", "delivered", "c-1", "https://cdp/c-1")]
    assert run.client.calls == ["post"]
    assert run.gate.retries == []


async def test_server_errors_are_retried_with_growing_jittered_backoff() -> None:
    run = await deliver([UNAVAILABLE, UNAVAILABLE, UNAVAILABLE, CREATED])
    assert run.ended[0][:2] == ("done", "delivered")
    assert [reason for reason, _ in run.gate.retries] == ["5xx", "5xx", "5xx"]
    for attempt, (_, delay) in enumerate(run.gate.retries, start=1):
        assert 0 <= delay <= 0.5 * 2 ** (attempt - 1)  # full jitter under the ceiling


async def test_retry_after_is_a_floor_for_the_backoff() -> None:
    throttled = Outcome(Verdict.RETRY, "429", 429, retry_after=7.0)
    run = await deliver([throttled, CREATED])
    assert run.gate.retries == [("429", 7.0)]


async def test_attempts_are_capped_then_the_event_is_dead_lettered() -> None:
    run = await deliver([UNAVAILABLE] * 4, max_attempts=4)
    assert run.ended == [("dead", "retries_exhausted", "gave up after the last attempt", None, 4)]
    assert run.client.calls == ["post"] * 4


async def test_a_message_redelivered_past_max_attempts_is_dead_lettered_unsent() -> None:
    run = await deliver([], claims=5, max_attempts=4)
    assert run.ended == [("dead", "retries_exhausted", "gave up after the last attempt", None, 0)]
    assert run.client.calls == []


async def test_a_rejection_is_dead_lettered_with_cdps_message() -> None:
    run = await deliver([REJECTED])
    assert run.ended == [("dead", "cdp_rejected", "firstName too long", 400, 1)]


@pytest.mark.parametrize(
    "unknown",
    [TIMEOUT, CONFLICT, Outcome(Verdict.IN_DOUBT, "504", 504)],
    ids=["timeout", "409", "504"],
)
async def test_an_unknown_fate_is_reconciled_and_the_contact_found_updated(
    unknown: Outcome,
) -> None:
    # Even after our own POST timed out, the contact found may be another's (a lost or
    # swept record): what it holds is unknown, so it gets this body (idempotently).
    run = await deliver([unknown, LISTED_ONE, UPDATED])
    assert run.client.calls == ["post", "list", "update c-9"]
    assert run.ended == [("done", "reconciled", "c-9", "https://cdp/c-9")]
    assert run.recorder.fingerprints == [run.delivery.fingerprint]


async def test_a_timeout_with_nothing_at_cdp_is_posted_again() -> None:
    run = await deliver([TIMEOUT, LISTED_NONE, CREATED])
    assert run.client.calls == ["post", "list", "post"]
    assert run.ended[0][:2] == ("done", "delivered")


async def test_an_in_doubt_claim_lists_before_any_post() -> None:
    run = await deliver([LISTED_ONE, UPDATED], claim=IN_DOUBT)
    assert run.client.calls == ["list", "update c-9"]  # what it holds is unknown
    assert run.ended[0][:2] == ("done", "reconciled")


async def test_failed_listings_count_as_attempts() -> None:
    run = await deliver([UNAVAILABLE] * 3, claim=IN_DOUBT, max_attempts=3)
    assert run.client.calls == ["list"] * 3
    assert run.ended == [
        ("dead", "retries_exhausted", "could not list the order's contacts", 503, 3)
    ]


async def test_a_401_pauses_at_the_gate_without_counting_an_attempt() -> None:
    run = await deliver([REFUSED, REFUSED, CREATED], max_attempts=1)
    assert run.gate.auth_pauses == 2
    assert run.gate.retries == []  # no backoff of its own: the gate's pause is the wait
    assert run.ended[0][:2] == ("done", "delivered")
    assert run.gate.probe is not None  # the probe lists this order's contacts
    run.client.script.append(LISTED_NONE)
    assert (await run.gate.probe()).verdict is Verdict.OK
    assert run.client.calls[-1] == "list"


async def test_a_404_is_retried_uncounted_within_the_grace_period() -> None:
    run = await deliver([NOT_FOUND, NOT_FOUND, CREATED], max_attempts=1, not_found_grace=60)
    assert [reason for reason, _ in run.gate.retries] == ["404", "404"]
    assert run.ended[0][:2] == ("done", "delivered")


async def test_a_404_past_the_grace_period_is_dead_lettered_order_not_found() -> None:
    run = await deliver([NOT_FOUND], not_found_grace=0)
    assert run.ended == [("dead", "order_not_found", "no such order", 404, 0)]


async def test_a_stop_mid_backoff_leaves_the_send_in_doubt_only_if_it_may_have_arrived() -> None:
    after_5xx = await deliver([UNAVAILABLE], gate=FakeGate(stop_after_retries=1))
    assert after_5xx.ended == []
    assert after_5xx.delivery.sent_in_doubt is False  # CDP said nothing was created
    after_timeout = await deliver([TIMEOUT], gate=FakeGate(stop_after_retries=1))
    assert after_timeout.ended == []
    assert after_timeout.delivery.sent_in_doubt is True  # the POST may have arrived


async def test_an_empty_listing_clears_the_doubt_of_a_create() -> None:
    run = await deliver([TIMEOUT, LISTED_NONE, UNAVAILABLE], gate=FakeGate(stop_after_retries=2))
    assert run.client.calls == ["post", "list", "post"]
    assert run.delivery.sent_in_doubt is False  # CDP holds none, as the record said


async def test_a_write_that_may_have_landed_stays_in_doubt_whatever_follows() -> None:
    # The update timed out (it may have landed), its retry got a 503: the record must
    # not be put back as it was, as if CDP still held the old body.
    update = await deliver(
        [TIMEOUT, UNAVAILABLE], claim=UPDATE, gate=FakeGate(stop_after_retries=2)
    )
    assert update.delivery.sent_in_doubt is True
    erase = Claim(ClaimStatus.DELETE, 1, "c-9", "https://cdp/c-9", previous="done")
    deleted = await deliver(
        [TIMEOUT, UNAVAILABLE], claim=erase, erasure=True, gate=FakeGate(stop_after_retries=2)
    )
    assert deleted.delivery.sent_in_doubt is True
    in_doubt = await deliver(
        [LISTED_NONE, UNAVAILABLE], claim=IN_DOUBT, gate=FakeGate(stop_after_retries=1)
    )
    assert in_doubt.delivery.sent_in_doubt is True  # an earlier owner's may still land


async def test_an_update_answered_404_while_cdp_still_lists_it_gives_up_in_time() -> None:
    run = await deliver([NOT_FOUND, LISTED_ONE] * 3, claim=UPDATE, max_attempts=3)
    assert run.ended == [("dead", "retries_exhausted", "gave up after the last attempt", None, 3)]
    assert len(run.gate.retries) == 3  # backed off each time, no hot loop


async def test_failures_during_an_outage_count_no_attempt() -> None:
    outage = FakeGate(outage=True)
    script = [UNAVAILABLE] * 6 + [TIMEOUT, UNAVAILABLE, LISTED_NONE, CREATED]
    run = await deliver(script, gate=outage, max_attempts=2)
    assert run.ended[0][:2] == ("done", "delivered")  # not retries_exhausted after 2
    assert outage.outage_probes == 8
    delays = [delay for _, delay in outage.retries]
    assert max(delays) > 0.5 * 2**2  # the backoff still grows while nothing counts


async def test_an_event_still_gives_up_when_only_its_own_requests_fail() -> None:
    run = await deliver([UNAVAILABLE] * 2, gate=FakeGate(outage=False), max_attempts=2)
    assert run.ended == [("dead", "retries_exhausted", "gave up after the last attempt", None, 2)]


async def test_a_listing_failing_in_an_outage_does_not_end_an_event_at_its_last_attempt() -> None:
    class CountsTwice(FakeGate):
        """The first two failures count, then an outage: none does."""

        counted = 0

        def failed(self, outcome: Outcome, probe: Any, answers_before: int) -> bool:
            self.counted += 1
            return self.counted <= 2

    script = [UNAVAILABLE, TIMEOUT, UNAVAILABLE, LISTED_NONE, CREATED]
    run = await deliver(script, gate=CountsTwice(), max_attempts=3)
    assert run.client.calls == ["post", "post", "list", "list", "post"]
    assert run.ended[0][:2] == ("done", "delivered")


# -- with the real gate: what counts as an attempt ---------------------------------------------


class Switchable:
    """A CDP that is up or down (connection refused) as the test says; POSTs of the
    orders in `failing` are answered 500 while it is up."""

    def __init__(self) -> None:
        self.up = True
        self.failing: set[str] = set()
        self.posts = 0

    async def create_contact(self, order_ref: str, body: Mapping[str, Any]) -> Outcome:
        self.posts += 1
        if not self.up:
            return REFUSED_CONNECTION
        if order_ref in self.failing:
            return Outcome(Verdict.RETRY, "500", 500)
        return CREATED

    async def list_contacts(self, order_ref: str) -> Outcome:
        return LISTED_NONE if self.up else REFUSED_CONNECTION

    async def update_contact(self, contact_ref: str, body: Mapping[str, Any]) -> Outcome:
        raise AssertionError("no update in these tests")

    async def delete_contact(self, contact_ref: str) -> Outcome:
        raise AssertionError("no delete in these tests")


REFUSED_CONNECTION = Outcome(Verdict.RETRY, "connection", message="ClientConnectorError")


class NoLeases:
    async def ensure(self, order_ref: str) -> None:
        return None


def real_gate() -> Any:
    from worker.gate import RequestGate
    from worker.limits import RateLimiter
    from worker.observability import Metrics

    return RequestGate(
        concurrency=4, limiter=RateLimiter(0), metrics=Metrics(), leases=NoLeases(),
        backoff_base=0.001,
    )  # fmt: skip


def delivery_on(gate: Any, client: Switchable, number: int, max_attempts: int) -> Any:
    raw = contact_event(random.Random(number), number)
    event = parse_event(orjson.dumps(raw), default_event_id=f"m-{number}")
    policy = Policy(max_attempts=max_attempts, not_found_grace=300, backoff_base=0.001)
    recorder = FakeRecorder()
    body = build_body(event, base_url="https://cdp.example")
    made = Delivery(
        Message(id=f"m-{number}", body=b"{}"), event, body=body, fingerprint=fingerprint(body),
        claim=NEW, gate=gate, recorder=recorder, client=client, policy=policy, claims=1,
    )  # fmt: skip
    return made, recorder, event.order_ref


async def test_a_quiet_worker_after_many_successes_pauses_for_an_outage_instead_of_giving_up() -> (
    None
):
    gate, cdp = real_gate(), Switchable()
    for number in range(20):  # a burst of successes, then CDP goes away
        delivery, recorder, _ = delivery_on(gate, cdp, number, max_attempts=8)
        await delivery.run()
    cdp.up = False
    delivery, recorder, _ = delivery_on(gate, cdp, 99, max_attempts=8)
    running = asyncio.create_task(delivery.run())
    async with asyncio.timeout(10):
        while gate.pause_reason is None:
            await asyncio.sleep(0.005)
    assert recorder.ended == []  # paused, not dead-lettered after its 8 tries
    cdp.up = True
    await asyncio.wait_for(running, 10)
    assert recorder.ended[0][:2] == ("done", "delivered")
    await gate.close()


async def test_an_order_failing_alone_still_gives_up_after_its_attempts() -> None:
    # No other traffic, CDP up (listings work), only this order's POSTs fail: each probe
    # that CDP answers lets one more failure count, until the event is dead-lettered.
    gate, cdp = real_gate(), Switchable()
    delivery, recorder, order_ref = delivery_on(gate, cdp, 7, max_attempts=3)
    cdp.failing.add(order_ref)
    await asyncio.wait_for(delivery.run(), 30)
    assert recorder.ended == [
        ("dead", "retries_exhausted", "gave up after the last attempt", None, 3)
    ]
    await gate.close()


async def test_an_order_failing_while_others_succeed_counts_every_failure() -> None:
    gate, cdp = real_gate(), Switchable()
    delivery, recorder, order_ref = delivery_on(gate, cdp, 5, max_attempts=3)
    cdp.failing.add(order_ref)

    async def others() -> None:
        for number in range(100, 400):
            await delivery_on(gate, cdp, number, max_attempts=3)[0].run()
            await asyncio.sleep(0)

    traffic = asyncio.create_task(others())
    await asyncio.wait_for(delivery.run(), 30)
    traffic.cancel()
    assert recorder.ended[0][:2] == ("dead", "retries_exhausted")
    assert gate.pause_reason is None  # never mistaken for an outage
    await gate.close()


# -- updates, erasures, adoption (DESIGN section 4) ---------------------------------------------


async def test_an_update_claim_replaces_the_known_contact() -> None:
    run = await deliver([UPDATED], claim=UPDATE)
    assert run.client.calls == ["update c-9"]
    assert run.ended == [("done", "updated", "c-9", "https://cdp/c-9")]


async def test_an_update_in_doubt_is_simply_sent_again() -> None:
    run = await deliver([TIMEOUT, UNAVAILABLE, UPDATED], claim=UPDATE)
    assert run.client.calls == ["update c-9"] * 3
    assert run.ended[0][:2] == ("done", "updated")


async def test_an_update_answered_404_creates_the_contact_again() -> None:
    run = await deliver([NOT_FOUND, LISTED_NONE, CREATED], claim=UPDATE, max_attempts=2)
    assert run.client.calls == ["update c-9", "list", "post"]
    assert run.ended == [("done", "delivered", "c-1", "https://cdp/c-1")]


async def test_a_rejected_update_is_dead_lettered_with_its_fingerprint() -> None:
    run = await deliver([REJECTED], claim=UPDATE)
    assert run.ended == [("dead", "cdp_rejected", "firstName too long", 400, 1)]
    assert run.recorder.fingerprints == [run.delivery.fingerprint]


async def test_an_erasure_deletes_the_known_contact() -> None:
    claim = Claim(ClaimStatus.DELETE, 1, "c-9", "https://cdp/c-9", previous="done")
    run = await deliver([TIMEOUT, DELETED], claim=claim, erasure=True)
    assert run.client.calls == ["delete c-9", "delete c-9"]  # idempotent: sent again
    assert run.ended == [("deleted",)]


async def test_an_erasure_of_a_contact_already_gone_is_done() -> None:
    claim = Claim(ClaimStatus.DELETE, 1, "c-9", "https://cdp/c-9", previous="done")
    run = await deliver([NOT_FOUND], claim=claim, erasure=True)
    assert run.ended == [("deleted",)]


async def test_an_erasure_of_an_order_we_never_saw_deletes_what_cdp_lists() -> None:
    run = await deliver(
        [LISTED_TWO, DELETED, DELETED], claim=Claim(ClaimStatus.DELETE, 1), erasure=True
    )
    assert run.client.calls == ["list", "delete c-9", "delete c-8"]
    assert run.ended == [("deleted",)]
    nothing = await deliver([LISTED_NONE], claim=Claim(ClaimStatus.DELETE, 1), erasure=True)
    assert nothing.ended == [("deleted",)]


async def test_a_second_contact_found_is_deleted_before_the_outcome() -> None:
    run = await deliver([LISTED_TWO, DELETED, UPDATED], claim=IN_DOUBT)
    assert run.client.calls == ["list", "delete c-8", "update c-9"]
    assert run.ended == [("done", "reconciled", "c-9", "https://cdp/c-9")]


async def test_verify_new_lists_before_creating_an_order_the_store_never_saw() -> None:
    adopted = await deliver([LISTED_ONE, UPDATED], verify_new=True)
    assert adopted.client.calls == ["list", "update c-9"]
    created = await deliver([LISTED_NONE, CREATED], verify_new=True)
    assert created.client.calls == ["list", "post"]
    # A tombstone is a record: the store knows CDP holds nothing.
    recreated = await deliver(
        [CREATED], verify_new=True, claim=Claim(ClaimStatus.CREATE, 1, previous="deleted")
    )
    assert recreated.client.calls == ["post"]


async def test_on_change_ignore_adopts_without_updating_and_knows_no_content() -> None:
    run = await deliver([LISTED_ONE], claim=IN_DOUBT, on_change="ignore")
    assert run.client.calls == ["list"]
    assert run.ended == [("done", "reconciled", "c-9", "https://cdp/c-9")]
    assert run.recorder.fingerprints == [None]
