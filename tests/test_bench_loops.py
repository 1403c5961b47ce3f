"""The benchmark's floor loop does the job it stands for: every event delivered once and
recorded done, over real HTTP against the emulator (`make bench` only prints figures;
this keeps the loop behind one of them honest)."""

from __future__ import annotations

from pathlib import Path

from tests import floor_loop
from worker.contact import parse_event
from worker.demo import generate_events
from worker.emulator import Emulator, EmulatorConfig
from worker.state.base import DONE
from worker.state.sqlite import SqliteStateStore


async def test_floor_loop_delivers_each_event_once_and_records_it(tmp_path: Path) -> None:
    # More events than lanes times a chunk: lanes take several chunks each.
    lines = generate_events(150, duplicate_share=0.0, invalid_rounds=0, seed=3)
    config = EmulatorConfig(client_key=floor_loop.KEY, api_token=floor_loop.TOKEN)
    async with Emulator(config) as emulator:
        rate = await floor_loop.deliver_all(emulator.url, lines, str(tmp_path / "f.db"), 2)
        stats = emulator.stats()
    assert rate > 0
    assert stats["contacts"] == 150
    assert stats["duplicate_orders"] == 0
    state = SqliteStateStore(tmp_path / "f.db")
    await state.open()
    try:
        for line in lines:
            record = await state.lookup(parse_event(line, default_event_id="-").order_ref)
            assert record is not None
            assert record.status == DONE
            assert record.owner is None  # the claim was finished, not left held
    finally:
        await state.close()
