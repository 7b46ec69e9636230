"""Every beacon sent twice with the same event_id (at once, and again later), and records the
aggregate service cannot decode written straight onto the topic: each beacon is counted once,
each bad record goes to the dead-letter topic and its metric, and no partition stalls."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from tests.faults.conftest import (
    DLQ_TOPIC,
    PARTITIONS,
    TOPIC,
    Deployment,
    assert_counter,
    metric,
)
from tests.faults.load import Plan, Sender

pytestmark = pytest.mark.faults


def undecodable() -> list[bytes | None]:
    good = {
        "event_id": str(uuid.uuid4()),
        "site": "dongha",
        "type": "pageview",
        "ts": 1_770_000_000_000,
        "visitor": "v",
        "member": False,
        "bot": False,
        "url": "https://portal.example.vn/",
    }
    return [
        None,  # a tombstone
        b"",
        b"not json",
        b"\xff\xfe\x00garbage",
        b"[1, 2, 3]",
        b"{}",
        json.dumps({**good, "ts": "yesterday"}).encode(),
        json.dumps({**good, "type": "click"}).encode(),
        json.dumps({**good, "event_id": "not-a-uuid"}).encode(),
        json.dumps({**good, "site": "nosuchsite"}).encode(),
        json.dumps({**good, "member": "yes"}).encode(),
    ]


async def produce(bootstrap: str, values: list[bytes | None]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for p in range(PARTITIONS):
            for v in values:
                await producer.send_and_wait(TOPIC, v, key=b"junk", partition=p)
    finally:
        await producer.stop()


async def dead_letter_sources(bootstrap: str, expected: int) -> list[bytes]:
    """The ``source`` header of every record on the dead-letter topic (read until ``expected``
    were seen, or nothing more comes)."""
    consumer = AIOKafkaConsumer(
        DLQ_TOPIC, bootstrap_servers=bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    sources: list[bytes] = []
    try:
        idle = 0
        while len(sources) < expected and idle < 10:
            batches = await consumer.getmany(timeout_ms=1000)
            idle = 0 if batches else idle + 1
            for records in batches.values():
                sources.extend(dict(r.headers)["source"] for r in records)
    finally:
        await consumer.stop()
    return sources


def test_duplicates_and_undecodable_records(deployment: Deployment) -> None:
    d = deployment
    ingest = d.ingest()
    aggregate = d.aggregate()
    plan = Plan.generate(6_000, seed=16)
    sender = Sender([ingest.url], plan, twice=True, rate=400).start()
    bad = undecodable()
    rounds = 3
    for k in range(rounds):
        sender.wait_progress((k + 1) / (rounds + 1))
        asyncio.run(produce(d.broker.bootstrap, bad))
    sender.join()
    # a fifth of the visitors send their whole history a third time, later
    again = Plan(plan.visitors[::5])
    Sender([ingest.url], again).start().join()

    assert sender.statuses[202] == 2 * len(plan)
    assert_counter(aggregate.url, plan)
    n_bad = rounds * PARTITIONS * len(bad)
    assert metric(aggregate.url, "visitorstats_dead_letters_total") == n_bad

    # every bad record is on the dead-letter topic once, with where it came from
    sources = asyncio.run(dead_letter_sources(d.broker.bootstrap, n_bad))
    assert len(sources) == n_bad and len(set(sources)) == n_bad
