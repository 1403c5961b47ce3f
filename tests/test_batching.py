"""`worker/_batching.py`: group commits, each caller settled with its own result."""

from __future__ import annotations

import asyncio
import types
from typing import TypeVar

import pytest

from worker._batching import EARLY, PROBE_EVERY, STRETCH, Batcher

T = TypeVar("T")


async def test_what_arrives_during_a_flush_goes_in_the_next_one() -> None:
    batches: list[list[int]] = []

    async def flush(items: list[int]) -> list[int | BaseException]:
        batches.append(items)
        await asyncio.sleep(0.01)
        return [item * 10 if item != 3 else ValueError("three") for item in items]

    batcher: Batcher[int, int] = Batcher(flush, name="test")
    first = [asyncio.create_task(batcher.submit(n)) for n in (1, 2)]
    await asyncio.sleep(0)  # the flusher has taken 1 and 2
    later = [asyncio.create_task(batcher.submit(n)) for n in (3, 4, 5)]
    assert await asyncio.gather(*first) == [10, 20]
    with pytest.raises(ValueError, match="three"):
        await later[0]
    assert [await later[1], await later[2]] == [40, 50]
    assert batches == [[1, 2], [3, 4, 5]]


async def test_a_flush_that_raises_fails_each_caller_of_its_batch() -> None:
    async def flush(items: list[int]) -> list[int | BaseException]:
        raise OSError("disk full")

    batcher: Batcher[int, int] = Batcher(flush, name="test")
    results = await asyncio.gather(*(batcher.submit(n) for n in range(3)), return_exceptions=True)
    assert [type(result) for result in results] == [OSError] * 3


async def test_max_batch_bounds_a_batch() -> None:
    sizes: list[int] = []

    async def flush(items: list[int]) -> list[int | BaseException]:
        sizes.append(len(items))
        return list(items)

    batcher: Batcher[int, int] = Batcher(flush, name="test", max_batch=4)
    assert await asyncio.gather(*(batcher.submit(n) for n in range(10))) == list(range(10))
    assert sizes == [4, 4, 2]


async def test_a_cancelled_caller_does_not_abandon_the_others() -> None:
    async def flush(items: list[int]) -> list[int | BaseException]:
        await asyncio.sleep(0.02)
        return list(items)

    batcher: Batcher[int, int] = Batcher(flush, name="test")
    cancelled = asyncio.create_task(batcher.submit(1))
    other = asyncio.create_task(batcher.submit(2))
    await asyncio.sleep(0.005)
    cancelled.cancel()
    assert await other == 2
    await batcher.wait_idle()


async def test_callers_of_a_flusher_cut_short_are_told_not_left_waiting() -> None:
    started = asyncio.Event()

    async def flush(items: list[int]) -> list[int | BaseException]:
        started.set()
        await asyncio.sleep(60)
        return list(items)

    batcher: Batcher[int, int] = Batcher(flush, name="test")
    waiting = [asyncio.create_task(batcher.submit(n)) for n in range(2)]
    await started.wait()
    queued = asyncio.create_task(batcher.submit(2))  # waits for the next round
    await asyncio.sleep(0)
    flusher = batcher._flusher
    assert flusher is not None
    flusher.cancel()  # as a loop shutting down does
    done, pending = await asyncio.wait([*waiting, queued], timeout=1)
    assert not pending
    assert all(task.cancelled() for task in done)


async def trickle(batcher: Batcher[T, T], items: list[T]) -> None:
    """A caller for each item, one every loop iteration, as answers come in."""
    tasks = []
    for item in items:
        tasks.append(asyncio.create_task(batcher.submit(item)))
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)


async def test_a_window_lets_callers_of_about_the_same_moment_share_a_batch() -> None:
    def batcher_and_batches(window: float) -> tuple[Batcher[int, int], list[list[int]]]:
        batches: list[list[int]] = []

        async def flush(items: list[int]) -> list[int | BaseException]:
            batches.append(items)
            return list(items)

        return Batcher(flush, name="test", window=window), batches

    at_once, split = batcher_and_batches(0.0)
    await trickle(at_once, list(range(5)))
    assert len(split) > 1  # each flush took what had queued by then
    windowed, joined = batcher_and_batches(0.05)
    await trickle(windowed, list(range(5)))
    assert joined == [[0, 1, 2, 3, 4]]


async def test_a_full_batch_does_not_wait_for_the_window() -> None:
    batches: list[list[int]] = []

    async def flush(items: list[int]) -> list[int | BaseException]:
        batches.append(items)
        return list(items)

    batcher: Batcher[int, int] = Batcher(flush, name="test", max_batch=3, window=30.0)
    results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(n) for n in range(3))), 5)
    assert results == [0, 1, 2]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The batcher's clock alone, moved by hand (the loop's own keeps running)."""
    now = [1000.0]
    monkeypatch.setattr("worker._batching.time", types.SimpleNamespace(monotonic=lambda: now[0]))
    return now


def recording_batcher(
    window: float = 0.0, enough: int | None = None, longest: float | None = None
) -> tuple[Batcher[str, str], list[list[str]]]:
    batches: list[list[str]] = []

    async def flush(items: list[str]) -> list[str | BaseException]:
        batches.append(items)
        return [item.upper() for item in items]

    batcher = Batcher(flush, name="test", window=window, longest=longest, enough=enough)
    return batcher, batches


async def test_an_unhurried_item_rides_with_the_next_batch() -> None:
    batcher, batches = recording_batcher()
    unhurried = asyncio.create_task(batcher.submit("checkpoint", within=30.0))
    await asyncio.sleep(0.01)
    assert batches == []  # it started no flush of its own
    assert await batcher.submit("outcome") == "OUTCOME"
    assert await asyncio.wait_for(unhurried, 5) == "CHECKPOINT"
    assert batches == [["checkpoint", "outcome"]]  # one flush for both


async def test_an_unhurried_item_alone_goes_within_its_time() -> None:
    batcher, batches = recording_batcher()
    assert await asyncio.wait_for(batcher.submit("checkpoint", within=0.01), 5) == "CHECKPOINT"
    assert batches == [["checkpoint"]]


async def test_wait_idle_flushes_unhurried_items_too() -> None:
    batcher, batches = recording_batcher()
    unhurried = asyncio.create_task(batcher.submit("checkpoint", within=30.0))
    await asyncio.sleep(0)
    await asyncio.wait_for(batcher.wait_idle(), 5)
    assert unhurried.done()
    assert unhurried.result() == "CHECKPOINT"
    assert batches == [["checkpoint"]]


async def test_an_item_long_after_the_last_does_not_wait_for_the_window(clock: list[float]) -> None:
    batcher, batches = recording_batcher(window=30.0)
    clock[0] += 30.0 / STRETCH + 1  # a paced caller: no company is coming
    assert await asyncio.wait_for(batcher.submit("alone"), 5) == "ALONE"
    # One that follows closely is taken for a burst again: it waits for company.
    clock[0] += 0.001
    waiting = asyncio.create_task(batcher.submit("close behind"))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    # One that comes once the batch has waited half its window takes it along at once.
    clock[0] += 30.0 * EARLY
    assert await asyncio.wait_for(batcher.submit("late"), 5) == "LATE"
    assert await waiting == "CLOSE BEHIND"
    assert batches == [["alone"], ["close behind", "late"]]


async def test_a_group_long_after_the_last_one_goes_at_once(clock: list[float]) -> None:
    # At a paced rate, answers come back in groups a slice apart: what is left of the
    # window after a group rarely catches the next one, so the group goes as it is. Its
    # second item came close behind the first, but the first one's gap is the batch's.
    batcher, batches = recording_batcher(window=30.0)
    clock[0] += 30.0 / STRETCH + 1
    group = asyncio.gather(*(batcher.submit(item) for item in ("a", "b", "c")))
    assert await asyncio.wait_for(group, 5) == ["A", "B", "C"]
    assert batches == [["a", "b", "c"]]


async def test_a_batch_after_a_gap_waits_for_the_groups_that_follow(clock: list[float]) -> None:
    # Groups a gap apart (paced answers): with the window stretched to STRETCH gaps, the
    # next group joins the batch and the one after it takes the batch along.
    batcher, batches = recording_batcher(window=1.0, longest=100.0)
    gap = 10.0  # ten short windows: without the stretch, a lonely group going alone
    assert gap < EARLY * STRETCH * gap <= 2 * gap  # the second group after it flushes
    clock[0] += gap
    first = asyncio.gather(*(batcher.submit(item) for item in ("a1", "a2")))
    await asyncio.sleep(0.05)
    clock[0] += gap
    second = asyncio.ensure_future(batcher.submit("b"))
    await asyncio.sleep(0.05)
    assert not first.done()
    assert not second.done()
    clock[0] += gap
    assert await asyncio.wait_for(batcher.submit("c"), 5) == "C"
    assert await first == ["A1", "A2"]
    assert await second == "B"
    assert batches == [["a1", "a2", "b", "c"]]


async def test_the_rest_of_a_group_split_by_a_flush_waits_for_the_next_groups(
    clock: list[float],
) -> None:
    # The first answer of a group takes the waiting batch along; the rest of the group
    # comes a moment later. With the gap before their group, they wait for the groups
    # that follow rather than the short window (a wake-up and a commit of their own).
    batcher, batches = recording_batcher(window=0.2, longest=100.0)
    gap = 10.0

    async def group_member(item: str) -> asyncio.Future[str]:
        task = asyncio.ensure_future(batcher.submit(item))
        await asyncio.sleep(0.01)
        return task

    clock[0] += gap
    a = await group_member("a")
    clock[0] += gap
    b = await group_member("b")
    clock[0] += gap
    assert await asyncio.wait_for(batcher.submit("c1"), 5) == "C1"  # takes them along
    assert [await a, await b] == ["A", "B"]
    clock[0] += 0.001
    c2 = await group_member("c2")
    await asyncio.sleep(0.5)  # longer than the short window
    assert not c2.done()
    clock[0] += gap
    d = await group_member("d")
    clock[0] += gap
    assert await asyncio.wait_for(batcher.submit("e1"), 5) == "E1"
    assert [await c2, await d] == ["C2", "D"]
    assert batches == [["a", "b", "c1"], ["c2", "d", "e1"]]


async def test_a_batch_without_a_gap_keeps_the_short_window() -> None:
    # The last outcomes of a busy run: no gap before them, so they wait the short window
    # for company that will not come, not the longest.
    batcher, batches = recording_batcher(window=0.05, longest=30.0)
    assert await asyncio.wait_for(batcher.submit("last"), 5) == "LAST"
    assert batches == [["last"]]


async def test_an_urgent_item_takes_the_waiting_batch_along_at_once() -> None:
    batcher, batches = recording_batcher(window=30.0)
    waiting = asyncio.create_task(batcher.submit("outcome"))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    assert await asyncio.wait_for(batcher.submit("claim", urgent=True), 5) == "CLAIM"
    assert await waiting == "OUTCOME"
    assert batches == [["outcome", "claim"]]


async def test_enough_items_go_without_waiting_for_the_window() -> None:
    batcher, batches = recording_batcher(window=30.0, enough=3)
    await asyncio.wait_for(trickle(batcher, list("abcdef")), 5)
    assert batches == [["a", "b", "c"], ["d", "e", "f"]]


async def test_callers_one_after_the_other_are_not_kept_waiting_for_company(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits = 0
    wait_for_company = Batcher._wait_for_company

    async def counted(self: Batcher[str, str]) -> None:
        nonlocal waits
        waits += 1
        await wait_for_company(self)

    monkeypatch.setattr(Batcher, "_wait_for_company", counted)
    batcher, batches = recording_batcher(window=0.05)
    for n in range(4 * PROBE_EVERY):  # each waits for its own result: none has company
        await batcher.submit(str(n))
    # A few waits find out that no company comes, then one in PROBE_EVERY looks again.
    assert waits <= 3 + 4, waits
    assert len(batches) == 4 * PROBE_EVERY
    # Company that comes back (one item each loop iteration, as answers come in) is
    # found by the next probe, and waited for again.
    await trickle(batcher, [str(n) for n in range(100)])
    assert max(len(batch) for batch in batches[4 * PROBE_EVERY :]) >= 50
