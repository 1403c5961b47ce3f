"""The request gate alone: pauses, the stop flag, the lease check and concurrency slots.

Requests are plain coroutines that count themselves; the gate's parts are real (the rate
limiter, the metrics) except the lease check, a fake that can refuse.
"""

from __future__ import annotations

import asyncio

import pytest

from worker.cdp import Outcome, Verdict
from worker.errors import Draining, LeaseLost
from worker.gate import RequestGate
from worker.limits import RateLimiter
from worker.observability import Metrics
from worker.pauses import WHY, Pause, Recent

OK = Outcome(Verdict.OK, "201", 201, contact_ref="c", href="h", duration=0.01)
REFUSED = Outcome(Verdict.AUTH, "401", 401)


class FakeLeases:
    def __init__(self) -> None:
        self.lost: set[str] = set()

    async def ensure(self, order_ref: str) -> None:
        if order_ref in self.lost:
            raise LeaseLost


class Counting:
    """A request that counts how often it was sent and how many are in flight at once."""

    def __init__(self, answer: Outcome = OK, seconds: float = 0.0) -> None:
        self.answer, self.seconds = answer, seconds
        self.sent = self.in_flight = self.most_in_flight = 0

    async def __call__(self) -> Outcome:
        self.sent += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(self.seconds)
        self.in_flight -= 1
        return self.answer


def make_gate(concurrency: int = 4, leases: FakeLeases | None = None) -> RequestGate:
    return RequestGate(
        concurrency=concurrency,
        limiter=RateLimiter(0),
        metrics=Metrics(),
        leases=leases or FakeLeases(),
        backoff_base=0.01,
    )


async def test_requests_are_sent_and_counted_within_the_slots() -> None:
    gate, call = make_gate(concurrency=3), Counting(seconds=0.02)
    outcomes = await asyncio.gather(*(gate.request(f"o-{n}", call) for n in range(12)))
    assert outcomes == [OK] * 12
    assert call.most_in_flight == 3
    assert gate.metrics.requests.labels("201")._value.get() == 12
    assert len(gate.latencies) == 12


async def test_a_pause_holds_back_every_request_until_the_probe_gets_through() -> None:
    gate = make_gate()
    probe = Counting(REFUSED)
    gate.auth_failed(probe)
    assert gate.pause_reason == WHY[Pause.AUTH]
    waiting = Counting()
    held = [asyncio.create_task(gate.request(f"o-{n}", waiting)) for n in range(20)]
    while probe.sent < 3:  # the probe keeps being refused: nothing else goes out
        await asyncio.sleep(0.01)
    assert waiting.sent == 0
    assert gate.metrics.auth_paused._value.get() == 1
    probe.answer = OK
    assert await asyncio.gather(*held) == [OK] * 20
    assert gate.pause_reason is None
    assert gate.metrics.auth_paused._value.get() == 0
    await gate.close()


async def test_a_second_auth_failure_starts_no_second_probe() -> None:
    gate, probe, other = make_gate(), Counting(REFUSED), Counting(REFUSED)
    gate.auth_failed(probe)
    gate.auth_failed(other)
    await asyncio.sleep(0.1)
    assert probe.sent >= 1
    assert other.sent == 0
    await gate.close()


async def test_stop_ends_waits_with_draining_and_sends_nothing_more() -> None:
    gate, call = make_gate(), Counting()
    gate.auth_failed(Counting(REFUSED))
    held = asyncio.create_task(gate.request("o-1", call))
    sleeping = asyncio.create_task(gate.sleep(60))
    await asyncio.sleep(0.02)
    gate.stop()
    for task in (held, sleeping):
        with pytest.raises(Draining):
            await task
    with pytest.raises(Draining):
        await gate.request("o-2", call)
    assert call.sent == 0
    await gate.close()


async def test_nothing_is_sent_for_an_order_whose_lease_is_lost() -> None:
    leases = FakeLeases()
    leases.lost.add("o-1")
    gate, call = make_gate(leases=leases), Counting()
    with pytest.raises(LeaseLost):
        await gate.request("o-1", call)
    assert await gate.request("o-2", call) == OK
    assert call.sent == 1


async def test_a_429_brakes_every_request_of_the_process() -> None:
    gate = make_gate()
    throttled = Counting(Outcome(Verdict.RETRY, "429", 429, retry_after=0.2))
    await gate.request("o-1", throttled)
    started = asyncio.get_running_loop().time()
    await gate.request("o-2", Counting())
    assert asyncio.get_running_loop().time() - started >= 0.15
    assert gate.metrics.throttled._value.get() == 1


class SlowLeases(FakeLeases):
    """A lease check that takes a state-store round trip: it waits for `go`."""

    def __init__(self) -> None:
        super().__init__()
        self.checking = asyncio.Event()
        self.go = asyncio.Event()

    async def ensure(self, order_ref: str) -> None:
        self.checking.set()
        await self.go.wait()
        await super().ensure(order_ref)


async def test_a_pause_that_begins_during_the_lease_check_holds_that_request_too() -> None:
    leases = SlowLeases()
    gate, call, probe = make_gate(leases=leases), Counting(), Counting(REFUSED)
    held = asyncio.create_task(gate.request("o-1", call))
    await leases.checking.wait()
    gate.auth_failed(probe)  # another delivery heard a 401 meanwhile
    leases.go.set()
    while probe.sent < 2:
        await asyncio.sleep(0.01)
    assert call.sent == 0
    probe.answer = OK
    assert await held == OK
    await gate.close()


async def test_a_stop_during_the_lease_check_sends_nothing() -> None:
    leases = SlowLeases()
    gate, call = make_gate(leases=leases), Counting()
    held = asyncio.create_task(gate.request("o-1", call))
    await leases.checking.wait()
    gate.stop()
    leases.go.set()
    with pytest.raises(Draining):
        await held
    assert call.sent == 0


async def test_a_probe_that_fails_unexpectedly_keeps_probing_and_close_still_works() -> None:
    gate = make_gate()
    answers = [RuntimeError("a bug"), REFUSED, OK]

    async def probe() -> Outcome:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    gate.auth_failed(probe)
    assert await asyncio.wait_for(gate.request("o-1", Counting()), 5) == OK
    assert answers == []
    await gate.close()


async def test_a_cancelled_wait_leaves_no_task_behind() -> None:
    gate = make_gate()
    gate.auth_failed(Counting(REFUSED))
    before = asyncio.all_tasks()
    held = asyncio.create_task(gate.request("o-1", Counting()))
    await asyncio.sleep(0.02)
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held
    await asyncio.sleep(0)
    assert {t for t in asyncio.all_tasks() - before if not t.done()} == set()
    await gate.close()


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


DOWN = Outcome(Verdict.RETRY, "connection")


def test_the_outage_detector_looks_at_the_last_minute_only() -> None:
    clock = Clock()
    recent = Recent(clock=clock)
    for _ in range(16):
        recent.note(OK)
    for _ in range(4):
        recent.note(DOWN)
    assert not recent.outage  # 4 of 20 failed
    recent.note(DOWN)
    assert recent.outage  # the latest five all failed, whatever came before
    recent.clear()
    for _ in range(10):
        recent.note(OK)
    clock.t += 61  # an hour of quiet, say: those successes say nothing about CDP now
    for _ in range(4):
        recent.note(DOWN)
    assert not recent.outage  # only 4 seen in the last minute
    recent.note(Outcome(Verdict.RETRY, "503", 503))
    assert recent.outage


def test_answers_count_every_answer_and_nothing_else() -> None:
    recent = Recent()
    for outcome in (OK, REFUSED, DOWN, Outcome(Verdict.RETRY, "503", 503), OK):
        recent.note(outcome)
    assert recent.answers == 3  # 201, 401, 201: CDP answered; not the refused or the 503


def test_a_429_is_never_an_attempt_and_a_5xx_is_one_only_if_others_were_answered() -> None:
    gate = make_gate()
    throttled = Outcome(Verdict.RETRY, "429", 429)
    assert gate.failed(throttled, Counting(), gate.answers) is False
    before = gate.answers
    unavailable = Outcome(Verdict.RETRY, "503", 503)
    gate.recent.note(unavailable)
    assert gate.failed(unavailable, Counting(), before) is False  # nobody answered since
    gate.recent.note(OK)
    gate.recent.note(unavailable)
    assert gate.failed(unavailable, Counting(), before) is True  # others were answered
