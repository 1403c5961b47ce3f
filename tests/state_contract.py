"""The state store contract (DESIGN section 4, `worker/state/base.py`), for every backend.

A backend's test module subclasses `StateStoreContract` and defines a `make_store`
fixture (see the class); the suite opens the stores it needs from it. Time is faked
through the `clock` fixture, which replaces `worker.state.base.now`: leases expire
without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar, TypeVar

import pytest

from worker.errors import NotOwner, StateError
from worker.state import base, open_state_store
from worker.state.base import (
    DEAD,
    DELETE,
    DELETE_FINGERPRINT,
    DELETED,
    DONE,
    IN_FLIGHT,
    UPSERT,
    Claim,
    ClaimStatus,
    Finish,
    Record,
    StateStore,
    Want,
)
from worker.versions import INSTANT, MAX_VERSION, NUMBER, Version

LEASE = 60.0
DAY = 86400.0


UPSERT_A = Want("fp-a")
UPSERT_B = Want("fp-b")


def v(number: int) -> Version:
    """An event's `version` field."""
    return Version(NUMBER, number)


async def done(
    store: StateStore, order_ref: str, want: Want, contact_ref: str, **fields: Any
) -> None:
    """Claim and complete `order_ref` with `want`'s content, as worker "w1"."""
    claim = await store.claim(order_ref, "w1", LEASE, want)
    assert claim.held, claim
    fields.setdefault("fingerprint", want.fingerprint)
    await store.complete(
        order_ref, "w1", contact_ref, f"h-{contact_ref}", version=want.version, **fields
    )


async def contact_of(store: StateStore, order_ref: str) -> tuple[str | None, str | None]:
    """The contact a done record knows, read through the claim of a change (which
    takes the order: call it last)."""
    claim = await store.claim(order_ref, "reader", LEASE, Want("fp-probe-a-change"))
    assert claim.status is ClaimStatus.UPDATE, claim
    return claim.contact_ref, claim.href


class FakeClock:
    """Stands in for `base.now`; starts at a realistic wall-clock time."""

    def __init__(self, start: float = 1_750_000_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


# `await open_again(retention_seconds)`: a new store opened on the same data.
OpenAgain = Callable[[float | None], Awaitable[StateStore]]
Store = TypeVar("Store", bound=StateStore)


@contextlib.asynccontextmanager
async def closing(build: Callable[..., Store]) -> AsyncIterator[Callable[..., Store]]:
    """`make(**options)` builds a store with `build`; every store it made is closed at
    the end. What a backend's `make_store` fixture yields."""
    made: list[Store] = []

    def make(*args: Any, **options: Any) -> Store:
        store = build(*args, **options)
        made.append(store)
        return store

    try:
        yield make
    finally:
        for store in made:
            await store.close()


async def opened(make: Callable[..., Store], **options: Any) -> Store:
    """A store from `make` (a `make_store` factory), opened."""
    store = make(**options)
    await store.open()
    return store


class StateStoreContract:
    """Subclasses provide `make_store`: a fixture yielding `make(**options)`, which builds
    a store (not opened) on this test's data and closes it after the test (`closing`).

    From it the suite opens `store`; `replica`, a second store on the same data standing
    in for another worker process (unless `shared` is False: an in-process backend, whose
    replica is the store itself); and `open_again`, which opens a new store on the same
    data as after a restart (unless `durable` is False: nothing survives one).
    """

    shared: ClassVar[bool] = True
    durable: ClassVar[bool] = True
    #: A server backend's URLs where nothing listens (with a password), and where each
    #: says it looked: opening must fail with a StateError naming it, never the password.
    unreachable: ClassVar[tuple[tuple[str, str], ...]] = ()

    @pytest.fixture
    async def store(self, make_store: Callable[..., StateStore]) -> StateStore:
        return await opened(make_store)

    @pytest.fixture
    async def replica(self, store: StateStore, make_store: Callable[..., StateStore]) -> StateStore:
        if not self.shared:
            return store
        return await opened(make_store)  # its own connections: another process

    @pytest.fixture
    def open_again(self, make_store: Callable[..., StateStore]) -> OpenAgain | None:
        if not self.durable:
            return None

        async def reopen(retention_seconds: float | None) -> StateStore:
            return await opened(make_store, retention_seconds=retention_seconds)

        return reopen

    @pytest.fixture
    def clock(self, monkeypatch: pytest.MonkeyPatch) -> FakeClock:
        fake = FakeClock()
        monkeypatch.setattr(base, "now", fake)  # monkeypatch undoes it after the test
        return fake

    # -- claim ---------------------------------------------------------------------------

    async def test_fresh_claim_is_create_with_one_attempt(self, store: StateStore) -> None:
        assert await store.claim("ORD-1", "w1", LEASE) == Claim(ClaimStatus.CREATE, attempts=1)

    async def test_live_lease_of_another_owner_is_busy(self, store: StateStore) -> None:
        await store.claim("ORD-1", "w1", LEASE)
        assert (await store.claim("ORD-1", "w2", LEASE)).status is ClaimStatus.BUSY

    async def test_live_lease_of_the_same_owner_is_busy(self, store: StateStore) -> None:
        await store.claim("ORD-1", "w1", LEASE)
        assert (await store.claim("ORD-1", "w1", LEASE)).status is ClaimStatus.BUSY

    async def test_busy_does_not_count_an_attempt(
        self, store: StateStore, clock: FakeClock
    ) -> None:
        await store.claim("ORD-1", "w1", LEASE)
        assert await store.claim("ORD-1", "w2", LEASE) == Claim(
            ClaimStatus.BUSY, previous=IN_FLIGHT
        )
        clock.advance(LEASE + 1)
        assert (await store.claim("ORD-1", "w2", LEASE)).attempts == 2

    async def test_expired_lease_is_in_doubt_and_transfers_ownership(
        self, store: StateStore, clock: FakeClock
    ) -> None:
        await store.claim("ORD-1", "w1", LEASE, UPSERT_A)
        clock.advance(LEASE + 1)
        assert await store.claim("ORD-1", "w2", LEASE, UPSERT_A) == Claim(
            ClaimStatus.IN_DOUBT, attempts=2, previous=IN_FLIGHT
        )
        # w2 owns it now: w1 may no longer finish it, and w2's new lease is live.
        assert await store.renew("ORD-1", "w1", LEASE) is False
        with pytest.raises(NotOwner):
            await store.complete("ORD-1", "w1", "c-1", "h-1", fingerprint="fp-a")
        assert (await store.claim("ORD-1", "w3", LEASE)).status is ClaimStatus.BUSY
        await store.complete("ORD-1", "w2", "c-2", "h-2", fingerprint="fp-a")
        assert await contact_of(store, "ORD-1") == ("c-2", "h-2")

    async def test_lease_expiry_in_real_time(self, store: StateStore) -> None:
        # Without the fake clock: backends that compare times elsewhere (a database server)
        # must agree with wall-clock leases. Generous margins keep it steady on slow CI.
        await store.claim("ORD-1", "w1", 0.2)
        assert (await store.claim("ORD-1", "w2", LEASE)).status is ClaimStatus.BUSY
        await asyncio.sleep(0.25)
        assert (await store.claim("ORD-1", "w2", LEASE)).status is ClaimStatus.IN_DOUBT

    async def test_attempts_count_every_takeover(self, store: StateStore, clock: FakeClock) -> None:
        assert (await store.claim("ORD-1", "w0", LEASE)).attempts == 1
        for n in range(2, 6):
            clock.advance(LEASE + 1)
            claim = await store.claim("ORD-1", f"w{n}", LEASE)
            assert (claim.status, claim.attempts) == (ClaimStatus.IN_DOUBT, n)

    async def test_the_same_owner_reclaiming_after_expiry_is_in_doubt(
        self, store: StateStore, clock: FakeClock
    ) -> None:
        await store.claim("ORD-1", "w1", LEASE)
        clock.advance(LEASE + 1)
        claim = await store.claim("ORD-1", "w1", LEASE)
        assert (claim.status, claim.attempts) == (ClaimStatus.IN_DOUBT, 2)

    # -- claim_many ----------------------------------------------------------------------

    async def test_claim_many_answers_as_one_claim_each_in_the_order_asked(
        self, store: StateStore, replica: StateStore
    ) -> None:
        await done(store, "ORD-done", Want("fp-a", v(2)), "c-1")
        await done(store, "ORD-changed", Want("fp-a", v(2)), "c-2")
        await done(store, "ORD-older", Want("fp-a", v(5)), "c-3")
        await done(store, "ORD-erased", UPSERT_A, "c-4")
        await store.claim("ORD-held", "other", LEASE)
        claim = await store.claim("ORD-dead", "w1", LEASE, UPSERT_A)
        assert claim.held
        await store.fail("ORD-dead", "w1", "cdp_rejected", fingerprint="fp-a")
        # Not sorted: a backend that sorts (postgres, for its locks) must map back.
        wants = [
            ("ORD-z-new", UPSERT_A),
            ("ORD-done", Want("fp-a", v(3))),
            ("ORD-changed", Want("fp-b", v(3))),
            ("ORD-older", Want("fp-b", v(4))),
            ("ORD-erased", Want(DELETE_FINGERPRINT, op=DELETE)),
            ("ORD-held", UPSERT_A),
            ("ORD-dead", UPSERT_B),
            ("ORD-a-gone", Want(DELETE_FINGERPRINT, op=DELETE)),
        ]
        answers = await replica.claim_many(wants, "w2", LEASE)
        assert [(a.status, a.contact_ref) for a in answers] == [
            (ClaimStatus.CREATE, None),
            (ClaimStatus.DUPLICATE, None),
            (ClaimStatus.UPDATE, "c-2"),
            (ClaimStatus.STALE, None),
            (ClaimStatus.DELETE, "c-4"),
            (ClaimStatus.BUSY, None),
            (ClaimStatus.IN_DOUBT, None),
            (ClaimStatus.DELETE, None),
        ]
        # What was taken is held by w2 now, and only that.
        for order_ref in ("ORD-z-new", "ORD-changed", "ORD-erased", "ORD-dead", "ORD-a-gone"):
            assert (await store.claim(order_ref, "w3", LEASE)).status is ClaimStatus.BUSY
            assert await store.renew(order_ref, "w2", LEASE) is True
        await replica.complete("ORD-changed", "w2", "c-2", "h-c-2", fingerprint="fp-b")
        assert (await store.claim("ORD-changed", "w3", LEASE, UPSERT_B)).status is (
            ClaimStatus.DUPLICATE
        )
        # The duplicate moved the version forward, as one claim does.
        assert (await store.claim("ORD-done", "w3", LEASE, Want("fp-a", v(2)))).status is (
            ClaimStatus.STALE
        )

    async def test_claim_many_of_nothing_is_nothing(self, store: StateStore) -> None:
        assert await store.claim_many([], "w1", LEASE) == []

    async def test_claim_many_refuses_an_order_twice(self, store: StateStore) -> None:
        with pytest.raises(ValueError, match="twice"):
            await store.claim_many([("ORD-1", UPSERT_A), ("ORD-1", UPSERT_B)], "w1", LEASE)
        assert (await store.claim("ORD-1", "w1", LEASE)).status is ClaimStatus.CREATE

    async def test_claim_many_of_replicas_overlapping_gives_each_order_one_holder(
        self, store: StateStore, replica: StateStore
    ) -> None:
        # Opposite orders of the same orders at once: a backend locking rows one after
        # the other in the order given would deadlock here.
        refs = [f"ORD-{i:03}" for i in range(120)]
        first, second = await asyncio.gather(
            store.claim_many([(ref, UPSERT_A) for ref in refs], "w1", LEASE),
            replica.claim_many([(ref, UPSERT_A) for ref in reversed(refs)], "w2", LEASE),
        )
        for ref, a, b in zip(refs, first, reversed(second), strict=True):
            assert sorted((a.status, b.status)) == sorted((ClaimStatus.CREATE, ClaimStatus.BUSY)), (
                ref
            )

    # -- record_many ---------------------------------------------------------------------

    async def test_record_many_records_each_as_its_own_method_would(
        self, store: StateStore, replica: StateStore, clock: FakeClock
    ) -> None:
        for ref in ("ORD-done", "ORD-erased", "ORD-dead"):
            assert (await store.claim(ref, "w1", LEASE, Want("fp-a", v(2)))).held
        await done(store, "ORD-again", UPSERT_A, "c-9")
        await store.claim("ORD-other", "w2", LEASE)
        answers = await replica.record_many(
            "w1",
            [
                Finish("ORD-done", DONE, "c-1", "h-1", "fp-a", v(2)),
                Finish("ORD-other", DONE, "c-2", "h-2", "fp-a"),  # w2's: refused
                Finish("ORD-erased", DELETED, version=v(2)),
                Finish("ORD-dead", DEAD, fingerprint="fp-a", reason="cdp_rejected"),
                Finish("ORD-again", DONE, "c-9", "h-c-9", "fp-a"),  # a retried write: fine
                Finish("ORD-never", DELETED),  # nobody's: refused
            ],
        )
        assert [type(a).__name__ for a in answers] == [
            "NoneType", "NotOwner", "NoneType", "NoneType", "NoneType", "NotOwner"
        ]  # fmt: skip
        assert "ORD-other" in str(answers[1])
        assert await store.lookup("ORD-done") == Record(
            DONE, clock.t, attempts=1, contact_ref="c-1", href="h-1", fingerprint="fp-a",
            version=v(2),
        )  # fmt: skip
        erased = await store.lookup("ORD-erased")
        assert erased is not None
        assert (erased.status, erased.version) == (DELETED, v(2))
        dead = await store.lookup("ORD-dead")
        assert dead is not None
        assert (dead.status, dead.reason) == (DEAD, "cdp_rejected")
        other = await store.lookup("ORD-other")
        assert other is not None
        assert (other.status, other.owner) == (IN_FLIGHT, "w2")  # untouched
        assert await store.lookup("ORD-never") is None

    async def test_record_many_of_nothing_is_nothing(self, store: StateStore) -> None:
        assert await store.record_many("w1", []) == []

    async def test_record_many_refuses_an_order_twice(self, store: StateStore) -> None:
        await store.claim("ORD-1", "w1", LEASE)
        twice = [Finish("ORD-1", DELETED), Finish("ORD-1", DEAD, reason="r")]
        with pytest.raises(ValueError, match="twice"):
            await store.record_many("w1", twice)
        assert await store.renew("ORD-1", "w1", LEASE) is True  # still held, unrecorded

    # -- lookup (worker inspect) -----------------------------------------------------------

    async def test_lookup_of_an_unknown_order_is_none_and_takes_nothing(
        self, store: StateStore
    ) -> None:
        assert await store.lookup("ORD-1") is None
        assert (await store.claim("ORD-1", "w1", LEASE)).status is ClaimStatus.CREATE

    async def test_lookup_reads_each_state_as_stored(
        self, store: StateStore, replica: StateStore, clock: FakeClock
    ) -> None:
        await store.claim("ORD-flight", "w1", LEASE, Want("fp-a", v(3)))
        flying = await replica.lookup("ORD-flight")
        assert flying == Record(
            IN_FLIGHT, clock.t, owner="w1", lease_until=clock.t + LEASE, attempts=1, op="create"
        )
        await done(store, "ORD-done", Want("fp-a", Version(INSTANT, 1_700_000_000_000_001)), "c-1")
        assert await replica.lookup("ORD-done") == Record(
            DONE,
            clock.t,
            attempts=1,
            contact_ref="c-1",
            href="h-c-1",
            fingerprint="fp-a",
            version=Version(INSTANT, 1_700_000_000_000_001),
        )
        assert (await store.claim("ORD-dead", "w1", LEASE, UPSERT_B)).held
        await store.fail("ORD-dead", "w1", "cdp_rejected", fingerprint="fp-b")
        dead = await replica.lookup("ORD-dead")
        assert dead is not None
        assert (dead.status, dead.reason, dead.fingerprint, dead.owner) == (
            DEAD, "cdp_rejected", "fp-b", None
        )  # fmt: skip
        # Reading took nothing: the in-flight order is still w1's.
        assert (await replica.claim("ORD-flight", "w2", LEASE)).status is ClaimStatus.BUSY
        assert await store.renew("ORD-flight", "w1", LEASE) is True

    # -- complete / fail -----------------------------------------------------------------

    async def test_complete_makes_the_same_content_a_duplicate(self, store: StateStore) -> None:
        await store.claim("ORD-1", "w1", LEASE, UPSERT_A)
        await store.complete("ORD-1", "w1", "contact-1", "https://cdp/c-1", fingerprint="fp-a")
        expected = Claim(ClaimStatus.DUPLICATE, previous=DONE)
        assert await store.claim("ORD-1", "w2", LEASE, UPSERT_A) == expected
        assert await store.claim("ORD-1", "w1", LEASE) == expected  # content unknown
        assert await contact_of(store, "ORD-1") == ("contact-1", "https://cdp/c-1")

    async def test_fail_makes_the_same_content_a_duplicate(self, store: StateStore) -> None:
        await store.claim("ORD-1", "w1", LEASE, UPSERT_A)
        await store.fail("ORD-1", "w1", "cdp_rejected", fingerprint="fp-a")
        assert await store.claim("ORD-1", "w2", LEASE, UPSERT_A) == Claim(
            ClaimStatus.DUPLICATE, previous=DEAD, reason="cdp_rejected"
        )

    async def test_complete_or_fail_by_a_non_owner_raises(self, store: StateStore) -> None:
        await store.claim("ORD-1", "w1", LEASE)
        with pytest.raises(NotOwner):
            await store.complete("ORD-1", "w2", "c", "h")
        with pytest.raises(NotOwner):
            await store.fail("ORD-1", "w2", "cdp_rejected")
        with pytest.raises(NotOwner):
            await store.mark_deleted("ORD-1", "w2")
        # Nothing changed: w1 still holds it.
        assert (await store.claim("ORD-1", "w3", LEASE)).status is ClaimStatus.BUSY

    async def test_complete_or_fail_without_a_claim_raises(self, store: StateStore) -> None:
        with pytest.raises(NotOwner):
            await store.complete("ORD-1", "w1", "c", "h")
        with pytest.raises(NotOwner):
            await store.fail("ORD-2", "w1", "cdp_rejected")
        with pytest.raises(NotOwner):
            await store.mark_deleted("ORD-3", "w1")

    async def test_completing_again_is_harmless_only_with_the_same_outcome(
        self, store: StateStore
    ) -> None:
        await store.claim("ORD-1", "w1", LEASE, UPSERT_A)
        await store.complete("ORD-1", "w1", "first", "h-first", fingerprint="fp-a")
        # A retried write that had landed, by anyone: nothing changes.
        await store.complete("ORD-1", "w1", "first", "h-first", fingerprint="fp-a")
        await store.complete("ORD-1", "someone-else", "first", "h-first", fingerprint="fp-a")
        # Another outcome from someone who no longer holds it is refused: its sender must
        # not ack an event whose effect may have been overwritten since.
        with pytest.raises(NotOwner):
            await store.complete("ORD-1", "w1", "second", "h-second", fingerprint="fp-a")
        with pytest.raises(NotOwner):
            await store.complete("ORD-1", "w1", "first", "h-first", fingerprint="fp-b")
        assert await contact_of(store, "ORD-1") == ("first", "h-first")

    async def test_fail_does_not_overwrite_done(self, store: StateStore) -> None:
        await store.claim("ORD-1", "w1", LEASE)
        await store.complete("ORD-1", "w1", "c", "h")
        with pytest.raises(NotOwner):
            await store.fail("ORD-1", "w1", "retries_exhausted")
        assert (await store.claim("ORD-1", "w2", LEASE)).status is ClaimStatus.DUPLICATE

    async def test_owner_may_finish_after_expiry_if_nobody_took_over(
        self, store: StateStore, clock: FakeClock
    ) -> None:
        await store.claim("ORD-1", "w1", LEASE)
        await store.claim("ORD-2", "w1", LEASE)
        clock.advance(LEASE + 1)
        await store.complete("ORD-1", "w1", "c", "h")
        await store.fail("ORD-2", "w1", "cdp_rejected")
        assert (await store.claim("ORD-1", "w2", LEASE)).previous == DONE
        assert (await store.claim("ORD-2", "w2", LEASE)).previous == DEAD

    # -- convergence: updates, deletes, versions -------------------------------------------

    async def test_other_content_on_a_done_order_is_an_update_of_its_contact(
        self, store: StateStore, clock: FakeClock
    ) -> None:
        await done(store, "ORD-1", UPSERT_A, "c-1")
        claim = await store.claim("ORD-1", "w2", LEASE, UPSERT_B)
        assert claim == Claim(ClaimStatus.UPDATE, 1, "c-1", "h-c-1", previous=DONE)
        assert (await store.claim("ORD-1", "w3", LEASE, UPSERT_B)).status is ClaimStatus.BUSY
        await store.complete("ORD-1", "w2", "c-1", "h-c-1", fingerprint="fp-b")
        assert (await store.claim("ORD-1", "w3", LEASE, UPSERT_B)).status is ClaimStatus.DUPLICATE
        assert (await store.claim("ORD-1", "w3", LEASE, UPSERT_A)).status is ClaimStatus.UPDATE

    async def test_on_change_ignore_answers_changed_and_takes_nothing(
        self, store: StateStore
    ) -> None:
        await done(store, "ORD-1", UPSERT_A, "c-1")
        ignore = Want("fp-b", None, UPSERT, "ignore")
        assert await store.claim("ORD-1", "w2", LEASE, ignore) == Claim(
            ClaimStatus.CHANGED, previous=DONE
        )
        assert (await store.claim("ORD-1", "w3", LEASE, UPSERT_B)).status is ClaimStatus.UPDATE

    async def test_an_older_event_is_stale_and_a_newer_duplicate_moves_the_version(
        self, store: StateStore
    ) -> None:
        await done(store, "ORD-1", Want("fp-a", v(1)), "c-1")
        # A v1, A v3 (a duplicate, but newer), then B v2: B is stale.
        assert (await store.claim("ORD-1", "w", LEASE, Want("fp-a", v(3)))).status is (
            ClaimStatus.DUPLICATE
        )
        assert await store.claim("ORD-1", "w", LEASE, Want("fp-b", v(2))) == Claim(
            ClaimStatus.STALE, previous=DONE
        )
        assert (await store.claim("ORD-1", "w", LEASE, Want("fp-b", v(3)))).status is (
            ClaimStatus.UPDATE  # equal versions, other content: the later worked wins
        )

    async def test_versions_of_another_kind_or_none_are_never_older(
        self, store: StateStore
    ) -> None:
        await done(store, "ORD-1", Want("fp-a", v(1_000_000)), "c-1")
        instant = Want("fp-b", Version(INSTANT, 5))
        assert (await store.claim("ORD-1", "w", LEASE, instant)).status is ClaimStatus.UPDATE
        await done(store, "ORD-2", Want("fp-a", v(7)), "c-2")
        assert (await store.claim("ORD-2", "w", LEASE, UPSERT_B)).status is ClaimStatus.UPDATE

    async def test_versions_compare_as_integers_up_to_two_to_the_53(
        self, store: StateStore
    ) -> None:
        big = MAX_VERSION
        await done(store, "ORD-1", Want("fp-a", v(big)), "c-1")
        assert (await store.claim("ORD-1", "w", LEASE, Want("fp-b", v(big - 1)))).status is (
            ClaimStatus.STALE
        )
        assert (await store.claim("ORD-1", "w", LEASE, Want("fp-b", v(9)))).status is (
            ClaimStatus.STALE  # not a string comparison: "9" > "9007..."
        )

    async def test_an_erasure_deletes_the_contact_and_leaves_a_tombstone(
        self, store: StateStore
    ) -> None:
        await done(store, "ORD-1", Want("fp-a", v(1)), "c-1")
        erase = Want(DELETE_FINGERPRINT, v(2), DELETE)
        assert await store.claim("ORD-1", "w2", LEASE, erase) == Claim(
            ClaimStatus.DELETE, 1, "c-1", "h-c-1", previous=DONE
        )
        await store.mark_deleted("ORD-1", "w2", version=v(2))
        await store.mark_deleted("ORD-1", "w2", version=v(2))  # a retried write: harmless
        assert await store.claim("ORD-1", "w", LEASE, erase) == Claim(
            ClaimStatus.DUPLICATE, previous=DELETED
        )
        # An older upsert stays away; a newer one creates the contact again.
        stale = await store.claim("ORD-1", "w", LEASE, Want("fp-a", v(1)))
        assert stale == Claim(ClaimStatus.STALE, previous=DELETED)
        again = await store.claim("ORD-1", "w3", LEASE, Want("fp-c", v(3)))
        assert again == Claim(ClaimStatus.CREATE, attempts=1, previous=DELETED)

    async def test_an_erasure_of_an_unknown_order_deletes_whatever_cdp_holds(
        self, store: StateStore
    ) -> None:
        erase = Want(DELETE_FINGERPRINT, None, DELETE)
        assert await store.claim("ORD-1", "w1", LEASE, erase) == Claim(
            ClaimStatus.DELETE, attempts=1
        )
        await store.mark_deleted("ORD-1", "w1")
        assert (await store.claim("ORD-1", "w", LEASE, UPSERT_A)).status is ClaimStatus.CREATE

    async def test_a_dead_order_with_other_content_is_worked_again_in_doubt(
        self, store: StateStore
    ) -> None:
        await store.claim("ORD-1", "w1", LEASE, UPSERT_A)
        await store.fail("ORD-1", "w1", "cdp_rejected", fingerprint="fp-a")
        # The producer fixed it: work it again, listing first (a create may have landed).
        assert await store.claim("ORD-1", "w2", LEASE, UPSERT_B) == Claim(
            ClaimStatus.IN_DOUBT, attempts=1, previous=DEAD, reason="cdp_rejected"
        )
        await store.complete("ORD-1", "w2", "c-1", "h-1", fingerprint="fp-b")
        assert (await store.claim("ORD-1", "w", LEASE, UPSERT_B)).status is ClaimStatus.DUPLICATE

    async def test_an_erasure_of_a_dead_order_is_always_carried_out(
        self, store: StateStore
    ) -> None:
        erase = Want(DELETE_FINGERPRINT, None, DELETE)
        await done(store, "ORD-1", UPSERT_A, "c-1")
        await store.claim("ORD-1", "w2", LEASE, erase)
        await store.fail("ORD-1", "w2", "retries_exhausted", fingerprint=DELETE_FINGERPRINT)
        # The same erasure again: not a duplicate, the contact may still be there.
        claim = await store.claim("ORD-1", "w3", LEASE, erase)
        assert (claim.status, claim.contact_ref) == (ClaimStatus.IN_DOUBT, "c-1")
        await store.claim("ORD-2", "w1", LEASE, UPSERT_A)
        await store.fail("ORD-2", "w1", "cdp_rejected")  # no fingerprint: before fingerprints
        assert (await store.claim("ORD-2", "w", LEASE, erase)).status is ClaimStatus.IN_DOUBT

    async def test_a_late_retried_write_by_a_former_owner_changes_nothing(
        self, store: StateStore, clock: FakeClock
    ) -> None:
        erase5 = Want(DELETE_FINGERPRINT, v(5), DELETE)
        await store.claim("ORD-1", "w1", LEASE, erase5)
        clock.advance(LEASE + 1)  # w1's lease ran out while it kept retrying its write
        await store.claim("ORD-1", "w2", LEASE, Want(DELETE_FINGERPRINT, v(7), DELETE))
        await store.mark_deleted("ORD-1", "w2", version=v(7))
        await store.mark_deleted("ORD-1", "w1", version=v(5))  # lands late: harmless
        assert (await store.claim("ORD-1", "w", LEASE, Want("fp-a", v(6)))).status is (
            ClaimStatus.STALE  # the record still says v7
        )
        await store.claim("ORD-2", "w1", LEASE, Want("fp-a", v(5)))
        clock.advance(LEASE + 1)
        await store.claim("ORD-2", "w2", LEASE, Want("fp-a", v(7)))
        await store.complete("ORD-2", "w2", "c-2", "h-2", fingerprint="fp-a", version=v(7))
        await store.complete("ORD-2", "w1", "c-2", "h-old", fingerprint="fp-a", version=v(5))
        assert (await store.claim("ORD-2", "w", LEASE, Want("fp-b", v(6)))).status is (
            ClaimStatus.STALE
        )

    async def test_a_failed_update_keeps_the_contact_it_knew(self, store: StateStore) -> None:
        await done(store, "ORD-1", UPSERT_A, "c-1")
        await store.claim("ORD-1", "w2", LEASE, UPSERT_B)
        await store.fail("ORD-1", "w2", "cdp_rejected", fingerprint="fp-b")
        claim = await store.claim("ORD-1", "w3", LEASE, Want("fp-c"))
        assert (claim.status, claim.contact_ref) == (ClaimStatus.IN_DOUBT, "c-1")

    async def test_records_without_a_fingerprint_are_content_unknown(
        self, store: StateStore
    ) -> None:
        # What the release before convergent sync wrote: done, no fingerprint.
        await done(store, "ORD-1", Want(), "c-1", fingerprint=None)
        assert (
            await store.claim("ORD-1", "w", LEASE, Want("fp-a", None, UPSERT, "ignore"))
        ).status is (
            ClaimStatus.DUPLICATE  # create-once: it may hold this very content
        )
        claim = await store.claim("ORD-1", "w2", LEASE, UPSERT_A)
        assert (claim.status, claim.contact_ref) == (ClaimStatus.UPDATE, "c-1")  # once
        await store.complete("ORD-1", "w2", "c-1", "h-c-1", fingerprint="fp-a")
        assert (await store.claim("ORD-1", "w", LEASE, UPSERT_A)).status is ClaimStatus.DUPLICATE

    async def test_a_stale_event_does_not_take_an_abandoned_claim(
        self, store: StateStore, clock: FakeClock
    ) -> None:
        await done(store, "ORD-1", Want("fp-a", v(5)), "c-1")
        await store.claim("ORD-1", "w2", LEASE, Want("fp-b", v(6)))
        clock.advance(LEASE + 1)
        assert (await store.claim("ORD-1", "w3", LEASE, Want("fp-c", v(4)))).status is (
            ClaimStatus.STALE
        )
        claim = await store.claim("ORD-1", "w3", LEASE, Want("fp-b", v(6)))
        # An abandoned update: the contact holds either body.
        assert claim == Claim(ClaimStatus.IN_DOUBT, 2, "c-1", "h-c-1", previous=IN_FLIGHT)

    # -- release -------------------------------------------------------------------------

    async def test_release_unsent_makes_it_claimable_afresh(self, store: StateStore) -> None:
        await store.claim("ORD-1", "w1", LEASE)
        await store.release("ORD-1", "w1", sent=False)
        assert await store.claim("ORD-1", "w2", LEASE) == Claim(ClaimStatus.CREATE, attempts=1)

    async def test_release_sent_makes_the_next_claim_in_doubt(self, store: StateStore) -> None:
        await store.claim("ORD-1", "w1", LEASE)
        await store.release("ORD-1", "w1", sent=True)
        claim = await store.claim("ORD-1", "w2", LEASE)
        assert (claim.status, claim.attempts) == (ClaimStatus.IN_DOUBT, 2)

    async def test_release_unsent_puts_back_what_was_there(self, store: StateStore) -> None:
        await done(store, "ORD-1", Want("fp-a", v(1)), "c-1")
        await store.claim("ORD-1", "w2", LEASE, Want("fp-b", v(2)))  # an update
        await store.release("ORD-1", "w2", sent=False)
        assert (await store.claim("ORD-1", "w", LEASE, Want("fp-a", v(1)))).status is (
            ClaimStatus.DUPLICATE
        )
        await store.claim("ORD-1", "w2", LEASE, Want(DELETE_FINGERPRINT, v(2), DELETE))
        await store.release("ORD-1", "w2", sent=False)
        assert (await store.claim("ORD-1", "w", LEASE, Want("fp-a", v(1)))).status is (
            ClaimStatus.DUPLICATE
        )
        await store.claim("ORD-1", "w2", LEASE, Want(DELETE_FINGERPRINT, v(2), DELETE))
        await store.mark_deleted("ORD-1", "w2", version=v(2))
        await store.claim("ORD-1", "w3", LEASE, Want("fp-c", v(3)))  # a re-create
        await store.release("ORD-1", "w3", sent=False)
        assert (await store.claim("ORD-1", "w", LEASE, Want("fp-a", v(1)))).status is (
            ClaimStatus.STALE  # the tombstone is back
        )

    async def test_release_unsent_of_an_in_doubt_claim_stays_in_doubt(
        self, store: StateStore, clock: FakeClock
    ) -> None:
        await store.claim("ORD-1", "w1", LEASE)
        clock.advance(LEASE + 1)
        await store.claim("ORD-1", "w2", LEASE)
        await store.release("ORD-1", "w2", sent=False)  # w1's request may still have landed
        assert (await store.claim("ORD-1", "w3", LEASE)).status is ClaimStatus.IN_DOUBT

    async def test_release_by_a_non_owner_is_a_no_op(self, store: StateStore) -> None:
        await store.claim("ORD-1", "w1", LEASE)
        await store.release("ORD-1", "w2", sent=False)
        await store.release("ORD-1", "w2", sent=True)
        await store.release("ORD-unknown", "w2", sent=False)
        assert (await store.claim("ORD-1", "w3", LEASE)).status is ClaimStatus.BUSY

    async def test_release_does_not_touch_finished_records(self, store: StateStore) -> None:
        await store.claim("ORD-1", "w1", LEASE)
        await store.complete("ORD-1", "w1", "c", "h")
        await store.release("ORD-1", "w1", sent=False)
        assert (await store.claim("ORD-1", "w2", LEASE)).status is ClaimStatus.DUPLICATE

    # -- renew ---------------------------------------------------------------------------

    async def test_renew_extends_the_lease(self, store: StateStore, clock: FakeClock) -> None:
        await store.claim("ORD-1", "w1", LEASE)
        clock.advance(LEASE - 1)
        assert await store.renew("ORD-1", "w1", LEASE) is True
        clock.advance(LEASE - 1)  # past the original expiry, within the renewed one
        assert (await store.claim("ORD-1", "w2", LEASE)).status is ClaimStatus.BUSY
        clock.advance(2)
        assert (await store.claim("ORD-1", "w2", LEASE)).status is ClaimStatus.IN_DOUBT

    async def test_renew_in_real_time(self, store: StateStore) -> None:
        await store.claim("ORD-1", "w1", 0.1)
        assert await store.renew("ORD-1", "w1", LEASE) is True
        await asyncio.sleep(0.15)
        assert (await store.claim("ORD-1", "w2", LEASE)).status is ClaimStatus.BUSY

    async def test_renew_by_a_non_owner_or_of_a_finished_record_is_false(
        self, store: StateStore
    ) -> None:
        assert await store.renew("ORD-1", "w1", LEASE) is False
        await store.claim("ORD-1", "w1", LEASE)
        assert await store.renew("ORD-1", "w2", LEASE) is False
        await store.complete("ORD-1", "w1", "c", "h")
        assert await store.renew("ORD-1", "w1", LEASE) is False

    # -- checkpoints ---------------------------------------------------------------------

    async def test_checkpoints(self, store: StateStore) -> None:
        assert await store.get_checkpoint("file:/data/a.jsonl") is None
        await store.set_checkpoint("file:/data/a.jsonl", "1024")
        assert await store.get_checkpoint("file:/data/a.jsonl") == "1024"
        await store.set_checkpoint("file:/data/a.jsonl", "2048")
        assert await store.get_checkpoint("file:/data/a.jsonl") == "2048"
        assert await store.get_checkpoint("file:/data/b.jsonl") is None
        # Urgent (a source closing): written at once, durable when it returns, like any.
        await store.set_checkpoint("file:/data/a.jsonl", "4096", urgent=True)
        assert await store.get_checkpoint("file:/data/a.jsonl") == "4096"

    # -- sweep ---------------------------------------------------------------------------

    async def test_sweep_removes_only_old_finished_records(
        self, store: StateStore, clock: FakeClock
    ) -> None:
        for ref in ("old-done", "old-dead", "old-in-flight"):
            await store.claim(ref, "w1", LEASE)
        await store.complete("old-done", "w1", "c", "h")
        await store.fail("old-dead", "w1", "cdp_rejected")
        clock.advance(10 * DAY)
        for ref in ("new-done", "new-dead"):
            await store.claim(ref, "w1", LEASE)
        await store.complete("new-done", "w1", "c", "h")
        await store.fail("new-dead", "w1", "cdp_rejected")
        clock.advance(1 * DAY)

        assert await store.sweep(5 * DAY) == 2

        assert (await store.claim("old-done", "w2", LEASE)).status is ClaimStatus.CREATE
        assert (await store.claim("old-dead", "w2", LEASE)).status is ClaimStatus.CREATE
        # An abandoned in-flight record is never swept: its POST may have happened.
        assert (await store.claim("old-in-flight", "w2", LEASE)).status is ClaimStatus.IN_DOUBT
        assert (await store.claim("new-done", "w2", LEASE)).previous == DONE
        assert (await store.claim("new-dead", "w2", LEASE)).previous == DEAD
        assert await store.sweep(5 * DAY) == 0

    # -- concurrency ---------------------------------------------------------------------

    async def test_concurrent_claims_of_one_order_have_one_winner(self, store: StateStore) -> None:
        claims = await asyncio.gather(*(store.claim("ORD-1", f"w{i}", LEASE) for i in range(50)))
        statuses = [c.status for c in claims]
        assert statuses.count(ClaimStatus.CREATE) == 1
        assert statuses.count(ClaimStatus.BUSY) == 49

    async def test_concurrent_claims_of_many_orders_all_win(self, store: StateStore) -> None:
        claims = await asyncio.gather(*(store.claim(f"ORD-{i}", "w1", LEASE) for i in range(200)))
        assert all(c == Claim(ClaimStatus.CREATE, attempts=1) for c in claims)

    # -- lifecycle -----------------------------------------------------------------------

    async def test_a_new_store_is_empty_until_an_order_is_claimed(
        self, store: StateStore, open_again: OpenAgain | None
    ) -> None:
        assert await store.is_empty() is True
        await store.set_checkpoint("file:a.jsonl", "1")  # a position is not an order
        assert await store.is_empty() is True
        await store.claim("ORD-1", "w1", LEASE)
        assert await store.is_empty() is False
        await store.complete("ORD-1", "w1", "c", "h")
        assert await store.is_empty() is False
        if open_again is not None:
            await store.close()
            assert await (await open_again(None)).is_empty() is False

    async def test_an_unreachable_server_is_a_state_error_without_the_password(self) -> None:
        if not self.unreachable:
            pytest.skip("no server to reach: an in-process or file store")
        for url, where in self.unreachable:
            store = open_state_store(url)
            with pytest.raises(StateError) as info:
                await store.open()
            message = str(info.value)
            assert "--state / WORKER_STATE" in message
            assert where in message
            assert "s3cret" not in message
            await store.close()
            with pytest.raises(StateError, match="not open"):
                await store.claim("ORD-1", "w1", LEASE)

    async def test_close_is_idempotent_and_use_after_close_raises(self, store: StateStore) -> None:
        await store.close()
        await store.close()
        with pytest.raises(StateError):
            await store.claim("ORD-1", "w1", LEASE)

    # -- forget (dlq replay) --------------------------------------------------------------

    async def test_forget_reopens_a_dead_order_only(self, store: StateStore) -> None:
        for ref in ("dead", "done", "in-flight"):
            await store.claim(ref, "w1", LEASE)
        await store.fail("dead", "w1", "cdp_rejected")
        await store.complete("done", "w1", "c", "h")
        assert await store.forget("dead") is True
        assert await store.forget("dead") is False  # reopened already
        assert await store.forget("done") is False
        assert await store.forget("in-flight") is False
        assert await store.forget("never-seen") is False
        # Reopened in doubt: a contact may exist, so the replayed event lists first.
        assert await store.claim("dead", "w2", LEASE) == Claim(
            ClaimStatus.IN_DOUBT, attempts=1, previous=IN_FLIGHT
        )
        assert (await store.claim("done", "w2", LEASE)).status is ClaimStatus.DUPLICATE
        assert (await store.claim("in-flight", "w2", LEASE)).status is ClaimStatus.BUSY

    async def test_forget_keeps_the_contact_a_failed_update_knew(self, store: StateStore) -> None:
        await done(store, "ORD-1", UPSERT_A, "c-1")
        await store.claim("ORD-1", "w2", LEASE, UPSERT_B)
        await store.fail("ORD-1", "w2", "cdp_rejected", fingerprint="fp-b")
        assert await store.forget("ORD-1") is True
        claim = await store.claim("ORD-1", "w3", LEASE, UPSERT_B)  # the replay
        assert (claim.status, claim.contact_ref) == (ClaimStatus.IN_DOUBT, "c-1")

    # -- several replicas ----------------------------------------------------------------

    async def test_two_replicas_racing_claim_each_order_once(
        self, store: StateStore, replica: StateStore
    ) -> None:
        refs = [f"ORD-{i}" for i in range(50)]
        contenders = [(store, "A1"), (replica, "B1"), (store, "A2"), (replica, "B2")]
        claims = await asyncio.gather(
            *(s.claim(ref, owner, LEASE) for ref in refs for s, owner in contenders)
        )
        for i, ref in enumerate(refs):
            statuses = [c.status for c in claims[4 * i : 4 * i + 4]]
            assert statuses.count(ClaimStatus.CREATE) == 1, ref
            assert statuses.count(ClaimStatus.BUSY) == 3, ref
            winner = contenders[statuses.index(ClaimStatus.CREATE)][1]
            for s, owner in contenders:
                assert await s.renew(ref, owner, LEASE) is (owner == winner)

    async def test_two_replicas_racing_a_takeover_have_one_winner(
        self, store: StateStore, replica: StateStore, clock: FakeClock
    ) -> None:
        refs = [f"ORD-{i}" for i in range(50)]
        await asyncio.gather(*(store.claim(ref, "dead-replica", LEASE) for ref in refs))
        clock.advance(LEASE + 1)
        claims = await asyncio.gather(
            *(
                s.claim(ref, owner, LEASE)
                for ref in refs
                for s, owner in ((store, "A"), (replica, "B"))
            )
        )
        for i in range(len(refs)):
            pair = sorted(c.status for c in claims[2 * i : 2 * i + 2])
            assert pair == sorted([ClaimStatus.IN_DOUBT, ClaimStatus.BUSY])
            assert max(c.attempts for c in claims[2 * i : 2 * i + 2]) == 2

    # -- durability ----------------------------------------------------------------------

    async def test_records_and_checkpoints_survive_a_restart(
        self, store: StateStore, open_again: OpenAgain | None
    ) -> None:
        if open_again is None:
            pytest.skip("an in-memory store: nothing survives a restart")
        for ref in ("done", "dead", "in-flight"):
            await store.claim(ref, "w1", LEASE)
        await store.complete("done", "w1", "contact-1", "href-1")
        await store.fail("dead", "w1", "cdp_rejected")
        await store.set_checkpoint("file:a.jsonl", "42")
        await store.close()

        second = await open_again(None)
        assert await contact_of(second, "done") == ("contact-1", "href-1")
        dead = await second.claim("dead", "w2", LEASE)
        assert dead == Claim(ClaimStatus.DUPLICATE, previous=DEAD, reason="cdp_rejected")
        assert (await second.claim("in-flight", "w2", LEASE)).status is ClaimStatus.BUSY
        assert await second.get_checkpoint("file:a.jsonl") == "42"

    async def test_open_sweeps_with_the_configured_retention(
        self, store: StateStore, open_again: OpenAgain | None, clock: FakeClock
    ) -> None:
        if open_again is None:
            pytest.skip("an in-memory store: nothing survives a restart")
        await store.claim("ORD-1", "w1", LEASE)
        await store.complete("ORD-1", "w1", "c", "h")
        await store.close()
        clock.advance(6 * DAY)
        second = await open_again(5 * DAY)
        assert (await second.claim("ORD-1", "w2", LEASE)).status is ClaimStatus.CREATE
