"""`worker/_batching.py`: group commits, each caller settled with its own result."""

from __future__ import annotations

import asyncio

import pytest

from worker._batching import Batcher


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


async def test_a_window_lets_callers_of_about_the_same_moment_share_a_batch() -> None:
    async def trickle(batcher: Batcher[int, int]) -> None:
        tasks = []
        for n in range(5):  # one caller every loop iteration, as answers come in
            tasks.append(asyncio.create_task(batcher.submit(n)))
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)

    def batcher_and_batches(window: float) -> tuple[Batcher[int, int], list[list[int]]]:
        batches: list[list[int]] = []

        async def flush(items: list[int]) -> list[int | BaseException]:
            batches.append(items)
            return list(items)

        return Batcher(flush, name="test", window=window), batches

    at_once, split = batcher_and_batches(0.0)
    await trickle(at_once)
    assert len(split) > 1  # each flush took what had queued by then
    windowed, joined = batcher_and_batches(0.05)
    await trickle(windowed)
    assert joined == [[0, 1, 2, 3, 4]]


async def test_a_full_batch_does_not_wait_for_the_window() -> None:
    batches: list[list[int]] = []

    async def flush(items: list[int]) -> list[int | BaseException]:
        batches.append(items)
        return list(items)

    batcher: Batcher[int, int] = Batcher(flush, name="test", max_batch=3, window=30.0)
    results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(n) for n in range(3))), 5)
    assert results == [0, 1, 2]
