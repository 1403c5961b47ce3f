"""The outcome recorder: every way a message ends, each one path.

Each path records the outcome durably first (the state store, the dead-letter sink),
then acks the message, then counts it (metrics, the run's summary, one log line), so a
crash anywhere in between leaves a message that comes again rather than one that is
lost (DESIGN section 3: nothing is acked before its outcome is durably recorded). A
failure to record or to ack raises: the caller gives the message back.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from ._batching import Batcher
from .contact import Event
from .errors import InvalidEvent, NotOwner, SourceError, StateError
from .observability import Metrics, get_logger
from .sources import DeadLetterSink, Message, Source, dead_letter
from .state import Finish, StateStore
from .state.base import DEAD, DELETED, DONE

log = get_logger("worker.outcomes")

RETRIES_EXHAUSTED = "retries_exhausted"
# An outcome the store could not record is tried again after this long, doubling up to
# the cap: the store is usually back within seconds (a restart, a failover).
RECORD_RETRY_FIRST = 0.1
# The parts an outcome is written to, and readiness while one keeps an outcome waiting.
STATE, DEAD_LETTERS = "state", "dead letters"
STALLED = {
    STATE: "paused: the state store does not record outcomes",
    DEAD_LETTERS: "paused: the dead-letter sink does not store letters",
}
RECORD_RETRY_CAP = 2.0


class Recorder:
    """Records, acks and counts. `summary` counts outcomes (and `dead:<reason>`) for the
    run's last line and the demo."""

    def __init__(
        self,
        *,
        state: StateStore,
        source: Source,
        dead_letters: DeadLetterSink,
        metrics: Metrics,
        owner: str,
    ) -> None:
        self._state = state
        self._source = source
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._owner = owner
        # Outcomes of events that end at about the same time go to the store together:
        # one record_many (one transaction, pipeline or statement) for all of them.
        self._records: Batcher[Finish, NotOwner | None] = Batcher(
            self._record_many, name="state-records"
        )
        self.summary: Counter[str] = Counter()
        # Messages fetched and neither acked nor given back yet, by identity (ids may
        # repeat across a source's redeliveries): what a cut-short drain must return.
        self._unsettled: dict[int, Message] = {}
        # Outcomes waiting for the part that records them to answer again (see stalled).
        self.waiting: Counter[str] = Counter()

    @property
    def stalled(self) -> str | None:
        """Why readiness is off while outcomes wait for a part to record them, or None."""
        for part, why in STALLED.items():
            if self.waiting[part]:
                return why
        return None

    def taken(self, messages: list[Message]) -> None:
        """Messages just fetched: each leaves through an ack or a give-back."""
        unsettled = self._unsettled
        for message in messages:
            unsettled[id(message)] = message

    async def give_back_unsettled(self) -> int:
        """Give back every message still neither acked nor given back (those of tasks a
        drain cancelled before they could); how many there were."""
        left = list(self._unsettled.values())
        for message in left:
            await self.give_back(message)
        return len(left)

    async def done(
        self,
        message: Message,
        event: Event,
        contact: tuple[str, str],
        outcome: str,
        *,
        fingerprint: str | None,
    ) -> None:
        """CDP's `contact` holds the event's body (`fingerprint`; None: unknown): record
        `done`, ack, count `outcome` (delivered, updated or reconciled)."""
        ref, href = contact
        await self._record(Finish(event.order_ref, DONE, ref, href, fingerprint, event.version))
        await self._ack(message)
        self._metrics.mark_success()
        self.count(outcome, contact_ref=ref)

    async def deleted(self, message: Message, event: Event) -> None:
        """CDP holds no contact for the order any more: record `deleted`, ack, count."""
        await self._record(Finish(event.order_ref, DELETED, version=event.version))
        await self._ack(message)
        self._metrics.mark_success()
        self.count("deleted")

    async def skipped(self, message: Message, outcome: str, **fields: Any) -> None:
        """Nothing to do at CDP (duplicate, stale, changed_ignored): ack and count; the
        claim wrote what it had to (the version moved forward)."""
        await self._ack(message)
        self.count(outcome, **fields)

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
        """A claimed event that can never be delivered: its letter, then `dead`, then ack."""
        letter = dead_letter(
            reason,
            detail,
            order_ref=event.order_ref,
            event_id=event.event_id,
            status=status,
            attempts=attempts,
            event=event.raw,
            raw=message.body,  # kept only if the event cannot be written back as JSON
        )
        await self._store(letter)
        await self._record(
            Finish(
                event.order_ref, DEAD, fingerprint=fingerprint, version=event.version, reason=reason
            )
        )
        # CDP's error text (detail) stays out of the log: it may quote the contact.
        await self._acked_dead(message, reason, status=status)

    async def reject(self, message: Message, invalid: InvalidEvent) -> None:
        """A message that is not a valid event: dead-lettered without a claim or request."""
        event_id = invalid.event_id or message.id
        letter = dead_letter(
            invalid.reason,
            invalid.message,
            order_ref=invalid.order_ref,
            event_id=event_id,
            status=None,
            attempts=0,
            event=invalid.event,
            raw=message.body,  # kept if there is no event, or it cannot be written back
        )
        await self._store(letter)
        # The parser's messages name fields, never values: they may be logged.
        await self._acked_dead(
            message,
            invalid.reason,
            detail=invalid.message,
            order_ref=invalid.order_ref,
            event_id=event_id,
        )

    async def give_up(
        self,
        message: Message,
        event: dict[str, Any] | None,
        failures: int,
        error: BaseException,
    ) -> None:
        """A message the worker itself keeps failing on (a bug, not the event's fault).

        Its claim, if any, was given back; the letter keeps the event (or the raw text).
        """
        order_ref = event.get("orderRef") if event else None
        letter = dead_letter(
            RETRIES_EXHAUSTED,
            f"the worker failed on this message {failures} times ({type(error).__name__})",
            order_ref=order_ref if isinstance(order_ref, str) else None,
            event_id=message.id,
            status=None,
            attempts=failures,
            event=event,
            raw=message.body,
        )
        await self._store(letter)
        await self._acked_dead(message, RETRIES_EXHAUSTED, status=None)

    async def give_back(self, message: Message, *, delay: float = 0.0) -> None:
        """No outcome: the transport delivers the message again, not before `delay` s."""
        try:
            await self._source.nack(message, delay=delay)
        except Exception:
            log.exception("source.nack_failed")  # the transport redelivers it itself
        self._unsettled.pop(id(message), None)  # not reached if cancelled: tried again

    async def _ack(self, message: Message) -> None:
        await self._source.ack(message)
        self._unsettled.pop(id(message), None)

    async def _record(self, finish: Finish) -> None:
        """Record an outcome in the state store, with those of about the same moment,
        however long the store is away (see `_durably`)."""

        async def write() -> None:
            if self._state.groups_writes:  # it batches already: no second hand-off
                await self._state.record_one(self._owner, finish)
                return
            refused = await self._records.submit(finish)
            if refused is not None:
                raise refused

        await self._durably(STATE, write)

    async def _record_many(self, finishes: list[Finish]) -> list[NotOwner | None]:
        return await self._state.record_many(self._owner, finishes)

    async def _store(self, letter: dict[str, Any]) -> None:
        """Store a dead letter, however long the sink is away (see `_durably`)."""
        await self._durably(DEAD_LETTERS, lambda: self._dead_letters.put(letter))

    async def _durably(self, part: str, write: Callable[[], Awaitable[None]]) -> None:
        """Write an outcome, however long the part that keeps it (`part`) is away.

        The outcome stays here (this coroutine, holding the message and the order) and is
        written as soon as the part answers, tried again 0.1 s doubling to 2 s later, so
        never in a hot loop; readiness is off meanwhile. Given back instead, the order
        would look busy to every worker for a whole lease, and a letter would be worked
        out again. NotOwner is not retried: another worker took the order over, and it
        reconciles. A stop (the drain's cancellation) ends the wait: the next owner
        reconciles too.
        """
        delay = RECORD_RETRY_FIRST
        failing = False
        try:
            while True:
                try:
                    await write()
                except NotOwner:
                    raise
                except (StateError, SourceError) as exc:
                    if not failing:
                        failing = True
                        self.waiting[part] += 1
                        log.warning("outcome.record_waiting", part=part, error=str(exc))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RECORD_RETRY_CAP)
                    continue
                if failing:
                    log.info("outcome.recorded", part=part)
                return
        finally:
            if failing:
                self.waiting[part] -= 1

    async def _acked_dead(self, message: Message, reason: str, **fields: Any) -> None:
        await self._ack(message)
        self.summary[f"dead:{reason}"] += 1
        self.count("dead_lettered", reason=reason, **fields)

    def count(self, outcome: str, **fields: Any) -> None:
        """Count a finished event, and say so in one log line."""
        self._metrics.events_by_outcome[outcome].inc()
        self.summary[outcome] += 1
        level = log.warning if outcome == "dead_lettered" else log.info
        level(f"event.{outcome}", **fields)
