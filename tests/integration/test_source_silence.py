"""``KafkaSource.silent_seconds`` against the real broker (Tansu): small while the broker
answers the consumer's fetches, growing from the moment it is frozen (SIGSTOP), small again
once it is back. The counter marks its numbers stale on it (``counter.SILENT_SECONDS``)."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.aggregate.counter import SILENT_SECONDS
from services.aggregate.sources import KafkaSource
from tests.support.tansu import Tansu, create_topic

pytestmark = pytest.mark.integration


async def fetch_for(source: KafkaSource, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await source.fetch(0.2, 100)


async def test_silent_seconds_follow_the_brokers_answers(tansu: Tansu) -> None:
    await create_topic(tansu.bootstrap, "silence", 2)
    source = KafkaSource(tansu.bootstrap, "silence", "silence-group", "silence-dead")
    assigned = asyncio.Event()

    async def on_assign(partitions: list[int]) -> None:
        assigned.set()

    async def on_revoke(partitions: list[int]) -> None:
        return None

    await source.start(on_assign, on_revoke)
    try:
        deadline = time.monotonic() + 30
        while not assigned.is_set() and time.monotonic() < deadline:
            await source.fetch(0.2, 100)
        assert source.assigned() == [0, 1]
        await fetch_for(source, 1)
        assert source.silent_seconds() < 5  # answered every fetch_max_wait_ms (50 ms)
        assert source.ready() == (True, "ok")

        tansu.pause()
        paused = time.monotonic()
        try:
            await fetch_for(source, 3)
            # no answer since the freeze (one already on its way then may still have come)
            assert source.silent_seconds() >= time.monotonic() - paused - 0.5
            # readiness follows: not ready once silent for longer than the counter allows
            await fetch_for(source, SILENT_SECONDS - (time.monotonic() - paused) + 1)
            ok, detail = source.ready()
            assert not ok and detail.startswith("broker silent for"), detail
        finally:
            tansu.resume()
        deadline = time.monotonic() + 60
        while source.silent_seconds() >= 1 and time.monotonic() < deadline:
            await source.fetch(0.2, 100)
        assert source.silent_seconds() < 1
        assert source.ready() == (True, "ok")
    finally:
        await source.stop()
