"""KafkaPublisher (answers after the broker's acknowledgement) and SpoolFirstPublisher (answers
once the record is in the spool) with their on-disk spool against the real broker (Tansu): the
broker frozen and back, down when ingest starts, and the spool full. Every acknowledged record
arrives, in order per key (a duplicate of one may follow it: the aggregate service counts an
event_id once)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.ingest.publish import KafkaPublisher, SpoolFirstPublisher, Unavailable, publish
from services.ingest.publish_types import OutRecord
from services.ingest.spool import Spool
from tests.support.tansu import Tansu, create_topic, free_port

pytestmark = pytest.mark.integration

TOPIC = "beacons"
PARTITIONS = 3
KEYS = 40


def record(key: int, seq: int) -> OutRecord:
    return OutRecord(f"k{key}".encode(), json.dumps({"k": key, "seq": seq}).encode(), key * 7919)


async def read_all(bootstrap: str, expected: int) -> list[tuple[int, int, int]]:
    """(partition, key, seq) of every record on the topic, in log order per partition."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    out: list[tuple[int, int, int]] = []
    try:
        consumer.assign([TopicPartition(TOPIC, p) for p in range(PARTITIONS)])
        idle = 0
        while idle < 6 and len(out) < expected:
            batches = await consumer.getmany(timeout_ms=500)
            idle = 0 if batches else idle + 1
            for tp, records in batches.items():
                for r in records:
                    v = json.loads(r.value)
                    out.append((tp.partition, v["k"], v["seq"]))
    finally:
        await consumer.stop()
    return out


def check_order(got: list[tuple[int, int, int]], per_key: int) -> None:
    """Every (key, seq) arrived; per key, in one partition, first copies in order."""
    seen: dict[int, list[int]] = {}
    partition_of: dict[int, int] = {}
    for partition, key, seq in got:
        assert partition_of.setdefault(key, partition) == partition, f"key {key} moved"
        if seq not in seen.setdefault(key, []):
            seen[key].append(seq)
    for key in range(KEYS):
        assert seen.get(key) == list(range(per_key)), f"key {key}: {seen.get(key)}"


@pytest.fixture
async def topic(tansu: Tansu) -> AsyncIterator[Tansu]:
    await create_topic(tansu.bootstrap, TOPIC, PARTITIONS)
    yield tansu


async def publish_keys(publisher: KafkaPublisher, seqs: range) -> None:
    """Each key's records one after another (as a visitor's beacons), keys concurrently."""

    async def one_key(key: int) -> None:
        for seq in seqs:
            await publish(publisher, record(key, seq))

    await asyncio.gather(*(one_key(k) for k in range(KEYS)))


@pytest.fixture(params=[KafkaPublisher, SpoolFirstPublisher], ids=["broker", "spool"])
def publisher_class(request: pytest.FixtureRequest) -> type[KafkaPublisher]:
    """Both publishing modes (``VISITORSTATS_PUBLISH_ACK``)."""
    cls: type[KafkaPublisher] = request.param
    return cls


async def until(condition: Callable[[], bool], seconds: float = 30) -> None:
    """Wait for ``condition`` (checked every 0.1 s); fail after ``seconds``."""
    for _ in range(int(seconds * 10)):
        if condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not reached in {seconds} s: {condition}")


async def test_broker_frozen_then_back_delivers_all_in_order(topic: Tansu, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 64 * 1024 * 1024)
    publisher = KafkaPublisher(topic.bootstrap, TOPIC, spool, ack_timeout_seconds=2)
    await publisher.start()
    try:
        await publish_keys(publisher, range(0, 20))
        topic.pause()
        # acknowledged from the spool while the broker is away
        await publish_keys(publisher, range(20, 60))
        assert len(spool) > 0
        assert publisher.ready() == (True, "broker unreachable; spooling")
        topic.resume()
        # new records keep coming while the spool drains: they queue behind it
        await publish_keys(publisher, range(60, 80))
        for _ in range(300):
            if spool.empty():
                break
            await asyncio.sleep(0.1)
        assert spool.empty()
    finally:
        await publisher.stop()
    check_order(await read_all(topic.bootstrap, KEYS * 80), 80)
    assert not list((tmp_path / "spool").glob("*.spool"))


async def test_spool_first_answers_while_the_broker_is_frozen(topic: Tansu, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 64 * 1024 * 1024)
    publisher = SpoolFirstPublisher(topic.bootstrap, TOPIC, spool, ack_timeout_seconds=2)
    await publisher.start()
    try:
        await publish_keys(publisher, range(0, 20))
        topic.pause()
        # answered once in the spool: the answers do not wait for the broker
        async with asyncio.timeout(5):
            await publish_keys(publisher, range(20, 60))
        assert len(spool) >= KEYS * 40
        await until(lambda: publisher.ready() == (True, "broker unreachable; spooling"))
        topic.resume()
        await publish_keys(publisher, range(60, 80))
        await until(spool.empty)
        await until(lambda: publisher.ready() == (True, "ok"))
    finally:
        await publisher.stop()
    check_order(await read_all(topic.bootstrap, KEYS * 80), 80)
    assert not list((tmp_path / "spool").glob("*.spool"))


async def test_spool_first_ships_soon_after_the_answers(topic: Tansu, tmp_path: Path) -> None:
    """In normal operation the spool only passes records on: each is acknowledged by the
    broker and forgotten within a few ship rounds, and its segment files are deleted."""
    spool = Spool(tmp_path / "spool", 64 * 1024 * 1024)
    publisher = SpoolFirstPublisher(topic.bootstrap, TOPIC, spool, linger_seconds=0.01)
    await publisher.start()
    try:
        await publish_keys(publisher, range(0, 30))
        await until(spool.empty, seconds=10)
        assert publisher.ready() == (True, "ok")
        assert not list((tmp_path / "spool").glob("*.spool"))
    finally:
        await publisher.stop()
    check_order(await read_all(topic.bootstrap, KEYS * 30), 30)


async def test_broker_down_when_ingest_starts(
    tmp_path: Path, publisher_class: type[KafkaPublisher]
) -> None:
    port = free_port()
    spool = Spool(tmp_path / "spool", 64 * 1024 * 1024)
    publisher = publisher_class(f"127.0.0.1:{port}", TOPIC, spool, ack_timeout_seconds=2)
    await publisher.start()  # nothing listens: it starts anyway, spooling
    broker = None
    try:
        await publish_keys(publisher, range(0, 10))
        assert len(spool) == KEYS * 10
        broker = Tansu(port=port, log_path=tmp_path / "tansu.log").start()
        await create_topic(broker.bootstrap, TOPIC, PARTITIONS)
        await publish_keys(publisher, range(10, 20))
        for _ in range(300):
            if spool.empty():
                break
            await asyncio.sleep(0.1)
        assert spool.empty()
        await publish_keys(publisher, range(20, 25))  # and straight to the broker after
        await publisher.stop()
        check_order(await read_all(broker.bootstrap, KEYS * 25), 25)
    finally:
        await publisher.stop()
        if broker is not None:
            broker.stop()


async def test_a_full_spool_refuses_and_stop_drains_it(
    topic: Tansu, tmp_path: Path, publisher_class: type[KafkaPublisher]
) -> None:
    directory = tmp_path / "spool"
    publisher = publisher_class(
        topic.bootstrap, TOPIC, Spool.claim(directory, 4096), ack_timeout_seconds=2
    )
    await publisher.start()
    topic.pause()
    accepted = 0
    try:
        with pytest.raises(Unavailable):
            for seq in range(2000):
                await publish(publisher, record(seq % KEYS, seq // KEYS))
                accepted += 1
        assert publisher.ready() == (False, "broker unreachable and spool full")
        topic.resume()
    finally:
        await publisher.stop()  # the broker is back: stopping drains the spool
    assert not list(directory.glob("*/*.spool"))
    got = await read_all(topic.bootstrap, accepted)
    assert {(k, s) for _, k, s in got} == {(q % KEYS, q // KEYS) for q in range(accepted)}


async def test_a_spool_left_behind_is_sent_by_the_next_process(
    topic: Tansu, tmp_path: Path, publisher_class: type[KafkaPublisher]
) -> None:
    directory = tmp_path / "spool"
    left = Spool.claim(directory, 1024 * 1024)  # what a process killed during an outage leaves
    left.append([record(k, seq) for seq in range(5) for k in range(KEYS)])
    left.close()
    successor = publisher_class(topic.bootstrap, TOPIC, Spool.claim(directory, 1024 * 1024))
    await successor.start()
    try:
        await publish_keys(successor, range(5, 10))  # new records queue behind the old ones
        for _ in range(300):
            if not list(directory.glob("*/*.spool")):
                break
            await asyncio.sleep(0.1)
    finally:
        await successor.stop()
    check_order(await read_all(topic.bootstrap, KEYS * 10), 10)


async def test_spools_of_processes_that_are_gone_are_shipped(
    topic: Tansu, tmp_path: Path, publisher_class: type[KafkaPublisher]
) -> None:
    """Two processes killed during an outage, one restarted: it ships its own spool and the
    other's, which no process claimed, and lets it go."""
    directory = tmp_path / "spool"
    left = [Spool.claim(directory, 1024 * 1024) for _ in range(2)]
    for n, spool in enumerate(left):
        spool.append([record(k, seq) for seq in range(5) for k in range(n, KEYS, 2)])
        spool.close()
    survivor = publisher_class(topic.bootstrap, TOPIC, Spool.claim(directory, 1024 * 1024))
    await survivor.start()
    try:
        await until(lambda: not list(directory.glob("*/*.spool")))
        assert Spool.orphans(directory) == []
    finally:
        await survivor.stop()
    check_order(await read_all(topic.bootstrap, KEYS * 5), 5)
    # the other process's directory is free again: a process started now claims it
    claimed = [Spool.claim(directory, 1024) for _ in range(2)]
    assert [s.root for s in claimed] == [directory, directory]
    assert (directory / "worker-2").exists() is False
    for s in claimed:
        s.close()
