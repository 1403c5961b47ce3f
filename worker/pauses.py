"""Pauses: when nothing may be sent to CDP, and what ends it (DESIGN section 3).

Two reasons stop every request at the gate, each ended only by its probe, one listing at a
time with backoff (cap 60 s), sent past the pause:

- `auth`: CDP refused the credentials (401/403). Resumes when a listing gets through.
- `outage`: CDP does not answer, or answers 5xx, to nearly every recent request (`Recent`
  tells). Connection refused, DNS, TLS and certificate failures, timeouts and 5xx are
  nobody's fault but CDP's (or the network's): while they are, no attempt of any event is
  counted, and nothing is dead-lettered for them. Resumes when CDP answers a listing.

A third, the shared rate limit's Redis being away, is the limiter's own: it admits
nothing meanwhile (`limits.SharedRateLimit`); it shows in readiness and `paused{reason}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections import deque
from collections.abc import Awaitable, Callable

from .cdp import Outcome, Verdict
from .errors import Draining
from .limits import BACKOFF_CAP, backoff_delay
from .observability import Metrics, get_logger

log = get_logger("worker.pauses")

Call = Callable[[], Awaitable[Outcome]]

# The outage detector looks at this many of the latest requests, of the last minute...
RECENT_REQUESTS = 20
RECENT_SECONDS = 60.0
# ...and calls it an outage when at least this many were seen and this share failed, or
# the latest this many all failed.
OUTAGE_MIN_REQUESTS = 5
OUTAGE_SHARE = 0.8


class Pause(enum.StrEnum):
    AUTH = "auth"
    OUTAGE = "outage"


# Readiness while each pause is on (the shared limit's is the limiter's, see the gate).
WHY = {
    Pause.AUTH: "paused: CDP rejected the credentials",
    Pause.OUTAGE: "paused: CDP is unreachable",
}


def systemic(outcome: Outcome) -> bool:
    """A failure that is not the event's fault: no answer at all (connection refused,
    DNS, TLS, a timeout), a 408 or a 5xx. Counted as the event's only while others
    succeed. (A 429 is CDP pacing us: never the event's, never an outage either.)"""
    return outcome.status is None or outcome.status == 408 or outcome.status >= 500


class Recent:
    """The latest requests' outcomes, answered or not: the outage detector.

    Only what happened within RECENT_SECONDS speaks: a quiet worker whose last successes
    are an hour old knows nothing about CDP now. `answers` counts every request CDP
    answered (not systemic), ever: a delivery compares it before and after its failures
    to tell whether others were answered meanwhile.
    """

    def __init__(
        self, size: int = RECENT_REQUESTS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._seen: deque[tuple[float, bool]] = deque(maxlen=size)  # (when, failed)
        self._clock = clock
        self.answers = 0

    def note(self, outcome: Outcome) -> None:
        failed = systemic(outcome)
        self._seen.append((self._clock(), failed))
        if not failed:
            self.answers += 1

    def clear(self) -> None:
        self._seen.clear()

    def _latest(self) -> tuple[int, int]:
        """(requests, failures) within the window."""
        since = self._clock() - RECENT_SECONDS
        while self._seen and self._seen[0][0] < since:
            self._seen.popleft()
        return len(self._seen), sum(failed for _, failed in self._seen)

    @property
    def outage(self) -> bool:
        """Nearly all recent requests failed, or the latest few did, one after the other
        (however many succeeded before them: CDP may have just gone away)."""
        seen, failed = self._latest()
        if seen < OUTAGE_MIN_REQUESTS:
            return False
        latest = list(self._seen)[-OUTAGE_MIN_REQUESTS:]
        return failed >= OUTAGE_SHARE * seen or all(failed for _, failed in latest)


class Pauses:
    """The pause on now, if any, and the probe that will end it.

    `send(call)` sends one request past every pause (the gate's slot, pacing and stop
    flag still apply) and notes its outcome.
    """

    def __init__(
        self,
        metrics: Metrics,
        send: Callable[[Call], Awaitable[Outcome]],
        recent: Recent,
        *,
        backoff_base: float,
    ) -> None:
        self.reason: Pause | None = None
        self.lifted = asyncio.Event()
        self.lifted.set()
        self._metrics = metrics
        self._send = send
        self._recent = recent
        self._backoff_base = backoff_base
        self._probe: asyncio.Task[None] | None = None
        self._closed = False
        for reason in (*Pause, "rate_limit_backend"):
            metrics.paused.labels(reason).set(0)

    def begin(self, reason: Pause, probe: Call, cause: Outcome | None = None) -> None:
        """Pause every request for `reason`, probing with `probe` (a listing) until it
        ends. An outage does not replace an auth pause (the probe tells both apart)."""
        if self._closed:
            return  # the worker is closing: nothing is sent any more, nothing to probe
        if self.reason is not None:
            if reason is Pause.AUTH and self.reason is Pause.OUTAGE:
                self._set(Pause.AUTH)
                log.error("cdp.auth_failed", probe=0)
            return
        self._set(reason)
        self.lifted.clear()
        if reason is Pause.AUTH:
            log.error("cdp.auth_failed", probe=0)
        else:
            log.error("cdp.outage", probe=0, reason=cause.label if cause else None)
            if cause is not None:
                _say_if_tls(cause, probe=0)
        self._probe = asyncio.create_task(self._probing(probe), name="pause-probe")

    def _set(self, reason: Pause | None) -> None:
        for each in Pause:
            self._metrics.paused.labels(each).set(1 if each is reason else 0)
        self._metrics.auth_paused.set(1 if reason is Pause.AUTH else 0)
        self.reason = reason

    def _lift(self, answer: Outcome) -> None:
        """CDP answered the probe: what failed before says nothing any more."""
        self._recent.clear()
        self._recent.note(answer)
        self._set(None)
        self.lifted.set()

    async def _probing(self, probe: Call) -> None:
        """List an order's contacts with backoff until CDP answers as hoped: then resume."""
        attempt = 0
        while self.reason is not None:
            attempt += 1
            # Never hammer CDP: at least one base step between probes.
            base = self._backoff_base
            await asyncio.sleep(backoff_delay(attempt, base=2 * base, cap=BACKOFF_CAP) + base)
            try:
                outcome = await self._send(probe)
            except Draining:
                return
            except Exception:  # a bug must not end the probing: the pause would never lift
                log.exception("cdp.probe_failed", probe=attempt)
                continue
            if self.reason is Pause.AUTH:
                self._after_auth_probe(outcome, attempt)
            else:
                self._after_outage_probe(outcome, attempt)

    def _after_auth_probe(self, outcome: Outcome, attempt: int) -> None:
        if outcome.verdict is Verdict.AUTH:
            log.error("cdp.auth_failed", probe=attempt, status=outcome.status)
        elif outcome.verdict is Verdict.OK:  # a listing that worked
            log.info("cdp.auth_recovered", probe=attempt)
            self._lift(outcome)
        else:  # CDP unreachable or busy: says nothing about the credentials
            log.info("cdp.auth_probe_inconclusive", probe=attempt, reason=outcome.label)

    def _after_outage_probe(self, outcome: Outcome, attempt: int) -> None:
        if outcome.verdict is Verdict.AUTH:  # CDP is back, and refuses us: another pause
            self._set(Pause.AUTH)
            log.error("cdp.auth_failed", probe=attempt, status=outcome.status)
        elif systemic(outcome):
            log.warning("cdp.outage", probe=attempt, reason=outcome.label)
            _say_if_tls(outcome, probe=attempt)
        else:  # an answer: CDP is back
            log.info("cdp.outage_recovered", probe=attempt)
            self._lift(outcome)

    async def close(self) -> None:
        """Stop the probe, if one runs; no pause begins after this."""
        self._closed = True
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await probe


def _say_if_tls(outcome: Outcome, *, probe: int) -> None:
    """A certificate or TLS failure, named with the verification error, once per probe."""
    if outcome.label == "tls":
        log.error("cdp.tls_failed", probe=probe, error=outcome.message)
