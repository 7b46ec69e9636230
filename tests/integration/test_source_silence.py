"""``KafkaSource.silent_seconds`` against the real broker (Tansu): small while the broker
answers the consumer's fetches, growing from the moment it is frozen (SIGSTOP), small again
once it is back. The counter marks its numbers stale on it (``counter.SILENT_SECONDS``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY

from services.aggregate.counter import SILENT_SECONDS
from services.aggregate.sources import KafkaSource
from tests.support.tansu import Tansu, create_topic

pytestmark = pytest.mark.integration


async def fetch_for(source: KafkaSource, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await source.fetch(0.2, 100)


@contextlib.asynccontextmanager
async def assigned_source(tansu: Tansu, topic: str) -> AsyncIterator[KafkaSource]:
    """A source on a new topic of 2 partitions, both assigned to it, stopped at the end."""
    await create_topic(tansu.bootstrap, topic, 2)
    source = KafkaSource(tansu.bootstrap, topic, f"{topic}-group", f"{topic}-dead")
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
        yield source
    finally:
        await source.stop()


async def test_silent_seconds_follow_the_brokers_answers(tansu: Tansu) -> None:
    async with assigned_source(tansu, "silence") as source:
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


async def read_all(source: KafkaSource, n: int) -> int:
    """Fetch until ``n`` records were read (or 30 s went by); how many were."""
    read = 0
    deadline = time.monotonic() + 30
    while read < n and time.monotonic() < deadline:
        read += len(await source.fetch(0.2, 100))
    return read


def lag() -> float:
    """The consumer lag over every partition, as /metrics shows it."""
    total = 0.0
    for family in REGISTRY.collect():
        if family.name == "visitorstats_consumer_lag":
            total += sum(s.value for s in family.samples)
    return total


async def test_partitions_held_paused_still_see_their_lag_and_the_broker(tansu: Tansu) -> None:
    """While ClickHouse refuses writes the consumer holds every partition paused, and no fetch
    goes out: the lag still grows with what waits, and the broker, answering, is not taken
    for silent (an outside audit saw the lag stay at 8 behind 7,844 records, and readiness
    blame Kafka)."""
    producer = AIOKafkaProducer(bootstrap_servers=tansu.bootstrap)
    await producer.start()
    try:
        async with assigned_source(tansu, "held") as source:
            # some records read first: the lag then has a position to count from
            for i in range(20):
                await producer.send_and_wait("held", b"{}", partition=i % 2)
            assert await read_all(source, 20) == 20
            await fetch_for(source, 1)
            before = lag()
            source.pause(None)
            for i in range(200):
                await producer.send_and_wait("held", b"{}", partition=i % 2)
            await fetch_for(source, SILENT_SECONDS + 2)
            assert await source.fetch(0.2, 100) == []  # held: nothing read
            # it grows with what waits (Tansu's answer of the ends may fall batches short: 130 of
            # 200 seen here; without the ends asked, it stayed where it was)
            assert lag() >= before + 100, (before, lag())
            assert source.behind() == lag()  # what the counter is told waits
            assert source.silent_seconds() < 5
            assert source.ready() == (True, "ok")
            source.resume(None)
            assert await read_all(source, 200) == 200
            await fetch_for(source, 1)
            assert source.behind() == 0
    finally:
        await producer.stop()
