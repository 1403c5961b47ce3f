"""The event loop a command runs on: uvloop where it is installed, else asyncio's own.

uvloop (libuv underneath) spends fewer CPU microseconds per wake-up, task and socket
call than asyncio's loop, which is most of what the worker does per event. It is a
dependency only where it has wheels (see pyproject.toml); `--loop asyncio` opts out,
e.g. to rule it out while chasing a bug.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")

LOOPS = ("auto", "uvloop", "asyncio")
_OPTION = "--loop / WORKER_LOOP"


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes the loop `name` asks for (None: asyncio's default).

    "auto" is uvloop if it can be imported; "uvloop" insists on it (ConfigError if it is
    not installed).
    """
    if name not in LOOPS:
        raise ConfigError(f"{_OPTION}: expected {', '.join(LOOPS)}")
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise ConfigError(f"{_OPTION}: uvloop is not installed (pip install uvloop)") from None
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], loop: str = "auto") -> T:
    """`asyncio.run(main)` on the loop `loop` names."""
    try:
        factory = loop_factory(loop)
    except ConfigError:
        main.close()  # never awaited: say nothing about it
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def running_loop_name() -> str:
    """Which loop runs this coroutine ("uvloop" or "asyncio"), for the start-up line."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


def collect_rarely(thresholds: tuple[int, int, int]) -> None:
    """Freeze start-up's objects out of the garbage collector and set its `thresholds`
    (allocations between two collections of the youngest generation, then collections of
    one generation between two of the next; Python's defaults are 700, 10, 10).

    A long-running process keeps the hundreds of thousands of objects its imports made
    for its whole life; with the defaults, every full collection walked them all again.
    Reference counting frees nearly everything a worker or the emulator drops (a worker
    leaves 0.1 objects per event to the collector), so collections can be rare.
    """
    gc.freeze()
    gc.set_threshold(*thresholds)
