"""``KafkaSource.replaced`` against the real broker (Tansu): whether a partition's log still
holds, at a Kafka offset, the record a stored row came from. Asked of records inside one
record batch too (Tansu's listed end of a partition can stop short inside its last batch, so
only the records themselves tell)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaProducer

from services.aggregate.sources import KafkaSource
from services.record import Event, encode
from tests.support.tansu import Tansu, create_topic

pytestmark = pytest.mark.integration

TOPIC = "probed"


def event_id(i: int) -> str:
    return str(uuid.UUID(int=(i + 1) << 64 | 0xABCDEF))  # with letters: its case shows


def record(i: int) -> bytes:
    event = Event(
        event_id(i), "hcm", "pageview", 1_790_000_000_000 + i, f"{i:032x}", None, False, False,
        "https://portal.example.vn/", "", "",
    )  # fmt: skip
    return encode(event)


async def fill(bootstrap: str) -> None:
    """Partition 0: 50 records of ingest's, sent together (a few record batches); then one
    that is not (an undecodable value). Partition 1: 111 records of ingest's in three batches
    of 37 (its listed end can stop short of 111). Partition 2: empty."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=50)
    await producer.start()
    try:
        futures = [await producer.send(TOPIC, record(i), partition=0) for i in range(50)]
        futures.append(await producer.send(TOPIC, b"not a record", partition=0))
        await asyncio.gather(*futures)
        for batch in range(3):
            futures = [
                await producer.send(TOPIC, record(i), partition=1)
                for i in range(batch * 37, batch * 37 + 37)
            ]
            await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def probe(tansu: Tansu) -> None:
    await create_topic(tansu.bootstrap, TOPIC, 3)
    await fill(tansu.bootstrap)
    source = KafkaSource(tansu.bootstrap, TOPIC, "probe-test", TOPIC + "-dlq")
    # the same log: every record where it was, the last of a batch and the last of the log
    for i in (0, 10, 49):
        assert await source.replaced({0: (i, event_id(i))}) == {}, i
    # another record there, past the end, or a record that is not ingest's: begun again
    assert await source.replaced({0: (10, event_id(11))}) == {0: 0}
    assert await source.replaced({0: (51, event_id(51))}) == {0: 0}
    assert await source.replaced({0: (5_000, event_id(3))}) == {0: 0}
    assert await source.replaced({0: (50, event_id(50))}) == {0: 0}
    # the last record of a log, inside its last batch; and just past it
    assert await source.replaced({1: (110, event_id(110))}) == {}
    assert await source.replaced({1: (111, event_id(111))}) == {1: 0}
    # an empty partition holds nothing stored before; one with no row stored is not asked
    assert await source.replaced({2: (0, event_id(0)), 0: (49, event_id(49))}) == {2: 0}
    assert await source.replaced({}) == {}
    # UUIDs compare as ClickHouse gives them back (lower case); any other spelling is another id
    assert await source.replaced({0: (7, event_id(7).upper())}) == {0: 0}
    # a broker that does not answer is never taken for a lost log: the caller tries again
    tansu.pause()
    try:
        with pytest.raises(TimeoutError):
            await source.replaced({1: (110, event_id(110))})
    finally:
        tansu.resume()
    assert await source.replaced({1: (110, event_id(110))}) == {}
    await source.stop()


def test_replaced_tells_a_log_begun_again_from_the_same_log(tansu: Tansu) -> None:
    asyncio.run(probe(tansu))
