"""The consumer's garbage-collection policy (services/aggregate/gcpause.py): automatic full
collections off while a consumer runs, one on a timer instead, and the collector's thresholds
as they were once every consumer has stopped."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from services import gcpause


async def test_full_collections_come_from_the_timer_and_the_thresholds_come_back() -> None:
    before = gc.get_threshold()
    full: list[int] = []
    twice = asyncio.Event()

    def seen(phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and info["generation"] == 2:
            full.append(1)
            if len(full) >= 2:
                twice.set()

    gc.callbacks.append(seen)
    try:
        undo = gcpause.full_collections_every(0.05)
        assert gc.get_threshold()[2] > 1_000_000  # no automatic full collection
        assert gc.get_threshold()[:2] == before[:2]  # young ones as before
        # two full collections: the timer's (nothing else asks for one)
        await asyncio.wait_for(twice.wait(), 30)
        undo()
        assert gc.get_threshold() == before
        ran = len(full)
        await asyncio.sleep(0.15)
        assert len(full) == ran  # the timer stopped with it
    finally:
        gc.callbacks.remove(seen)
        gc.set_threshold(*before)


async def test_the_thresholds_come_back_when_the_last_user_stops() -> None:
    before = gc.get_threshold()
    first = gcpause.full_collections_every(30)
    second = gcpause.full_collections_every(30)
    first()
    assert gc.get_threshold()[2] > 1_000_000  # the second still runs
    first()  # undoing twice changes nothing
    assert gc.get_threshold()[2] > 1_000_000
    second()
    assert gc.get_threshold() == before
