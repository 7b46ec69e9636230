"""The consume path (``Consumer``, ``KafkaSource``, ``Aggregator``, ``Store``) against the real
broker (Tansu) and the real ClickHouse engine behind its HTTP interface (chDB): a process
SIGKILLed with a batch pending, and one SIGKILLed while its insert hangs in a frozen ClickHouse
that then carries it out. Another process resumes, and every record is stored exactly once."""

from __future__ import annotations

import asyncio
import queue
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import clickhouse_connect
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from services.record import Event, encode
from tests.support.chdb_http import ChdbHttpServer
from tests.support.tansu import Tansu, create_topic

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TOPIC = "consume"
VISITORS = 50


class Runner:
    """``consumer_proc`` as a child process, its output lines readable as they come."""

    def __init__(self, bootstrap: str, url: str, flush: float, log: Path) -> None:
        command = "tests.integration.consumer_proc"
        with open(log, "ab") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", command, bootstrap, TOPIC, url, str(flush)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode().strip())

    def wait_line(self, predicate: object, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("the consumer process said nothing useful") from None
            if predicate(line):  # type: ignore[operator]
                return line

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def events(first: int, n: int) -> list[tuple[bytes, bytes]]:
    """(key, value) of ``n`` records: visitors in turn, a heartbeat every third record."""
    out = []
    for i in range(first, first + n):
        visitor = f"{i % VISITORS:032x}"
        kind = "heartbeat" if i % 3 == 2 else "pageview"
        event = Event(
            str(uuid.UUID(int=i + 1)), "hcm", kind, 1_790_000_000_000 + i, visitor, None,
            False, False, "https://portal.example.vn/", "", "",
        )  # fmt: skip
        out.append((visitor.encode(), encode(event)))
    return out


def expected(n: int) -> tuple[int, int, int, int]:
    pageviews = sum(1 for i in range(n) if i % 3 != 2)
    # one visit per visitor with a page view (all of their events are one run)
    visits = len({i % VISITORS for i in range(n) if i % 3 != 2})
    return (n, n, pageviews, visits)


async def produce(bootstrap: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        futures = [await producer.send(TOPIC, value, key=key) for key, value in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def stored(dsn: str) -> tuple[int, int, int, int]:
    client = clickhouse_connect.get_client(dsn=dsn)
    try:
        row = client.query(
            "SELECT count(), uniqExact(kafka_partition, kafka_offset), sum(pageview), "
            "sum(starts_visit) FROM events WHERE topic = {t:String}",
            parameters={"t": TOPIC},
        ).result_rows[0]
    finally:
        client.close()
    return tuple(int(x) for x in row)  # type: ignore[return-value]


def wait_stored(dsn: str, want: tuple[int, int, int, int], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    got = stored(dsn)
    while got[0] < want[0] and time.monotonic() < deadline:
        time.sleep(0.2)
        got = stored(dsn)
    time.sleep(1)  # anything counted twice would show by now
    assert stored(dsn) == want


def replaced_said(log: Path) -> int:
    """How many times a consumer process logged a partition's log as lost and begun again."""
    return log.read_text().count("was lost and begun again")


def next_process_counts_on(
    topic: Tansu, clickhouse: ChdbHttpServer, tmp_path: Path, first: int, n: int
) -> None:
    """``n`` more records; a consumer process started now stores every record once, on the
    log as it finds it (the same log: it never says it was begun again)."""
    asyncio.run(produce(topic.bootstrap, events(first, n)))
    second = Runner(topic.bootstrap, clickhouse.dsn, 0.2, tmp_path / "second.log")
    try:
        wait_stored(clickhouse.dsn, expected(first + n))
    finally:
        second.kill()
    assert replaced_said(tmp_path / "second.log") == 0


@pytest.fixture
def topic(tansu: Tansu) -> Tansu:
    asyncio.run(create_topic(tansu.bootstrap, TOPIC, 3))
    return tansu


def test_killed_with_a_pending_batch(
    topic: Tansu, clickhouse: ChdbHttpServer, tmp_path: Path
) -> None:
    asyncio.run(produce(topic.bootstrap, events(0, 600)))
    # flushes every 60 s: it is killed holding everything it read, unwritten
    first = Runner(topic.bootstrap, clickhouse.dsn, 60, tmp_path / "first.log")
    try:
        first.wait_line(lambda line: line == "pending 600")
    finally:
        first.kill()
    next_process_counts_on(topic, clickhouse, tmp_path, 600, 400)


def test_killed_while_its_insert_hangs_then_lands(
    topic: Tansu, clickhouse: ChdbHttpServer, tmp_path: Path
) -> None:
    asyncio.run(produce(topic.bootstrap, events(0, 300)))
    first = Runner(topic.bootstrap, clickhouse.dsn, 0.2, tmp_path / "first.log")
    try:
        first.wait_line(lambda line: line.startswith("written"))
        clickhouse.pause()  # its next insert hangs inside ClickHouse...
        asyncio.run(produce(topic.bootstrap, events(300, 300)))
        first.wait_line(lambda line: line.startswith("pending") and line != "pending 0")
        time.sleep(1.0)
    finally:
        first.kill()  # ...the process dies...
    clickhouse.resume()  # ...and ClickHouse carries the insert out after all
    next_process_counts_on(topic, clickhouse, tmp_path, 600, 400)


def positions(dsn: str) -> list[tuple[int, int, int, int, int]]:
    """Per partition: rows, the last position + 1, and of the rows with a base (from a log
    begun again): how many, their first and their last Kafka offset."""
    client = clickhouse_connect.get_client(dsn=dsn)
    try:
        rows = client.query(
            "SELECT kafka_partition, count(), max(kafka_offset) + 1, countIf(kafka_base > 0), "
            "minIf(kafka_offset - kafka_base, kafka_base > 0), "
            "maxIf(kafka_offset - kafka_base, kafka_base > 0) "
            "FROM events WHERE topic = {t:String} GROUP BY kafka_partition "
            "ORDER BY kafka_partition",
            parameters={"t": TOPIC},
        ).result_rows
    finally:
        client.close()
    return [tuple(int(x) for x in row[1:]) for row in rows]  # type: ignore[misc]


def test_a_log_lost_and_begun_again_is_counted_on(
    topic: Tansu, clickhouse: ChdbHttpServer, tmp_path: Path
) -> None:
    """The broker restarts without its log (Tansu keeps it in memory; a topic deleted and made
    anew is the same): the new log's offsets begin again at 0, below what was stored. Its
    records are counted all the same, after the ones counted before, and a process started
    later goes on from there without deciding it again."""
    asyncio.run(produce(topic.bootstrap, events(0, 600)))
    first = Runner(topic.bootstrap, clickhouse.dsn, 0.2, tmp_path / "first.log")
    try:
        first.wait_line(lambda line: line.startswith("written"))
        wait_stored(clickhouse.dsn, expected(600))
        topic.stop()
        topic.start()  # the same address, an empty log
        asyncio.run(create_topic(topic.bootstrap, TOPIC, 3))
        asyncio.run(produce(topic.bootstrap, events(600, 400)))
        wait_stored(clickhouse.dsn, expected(1000))
    finally:
        first.kill()
    assert replaced_said(tmp_path / "first.log") == 3  # once for each partition
    parts = positions(clickhouse.dsn)
    assert len(parts) == 3
    for rows, next_position, from_new_log, first_offset, last_offset in parts:
        assert next_position == rows  # positions 0 .. rows - 1: none skipped, none twice
        assert from_new_log > 0 and first_offset == 0 and last_offset == from_new_log - 1
    assert sum(p[2] for p in parts) == 400

    next_process_counts_on(topic, clickhouse, tmp_path, 1000, 200)
    assert all(rows == next_position for rows, next_position, *_ in positions(clickhouse.dsn))


# Tansu makes a topic it is asked about and does not have with 4 partitions: a topic deleted
# under running clients is made again at once, so the test's topic has those 4 from the start
REMADE_PARTITIONS = 4


@pytest.fixture
def topic4(tansu: Tansu) -> Tansu:
    asyncio.run(create_topic(tansu.bootstrap, TOPIC, REMADE_PARTITIONS))
    return tansu


async def remake_topic(bootstrap: str) -> None:
    """Delete the topic and make it anew: the same partitions, empty, offsets from 0 again."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([TOPIC])
    finally:
        await admin.close()
    await create_topic(bootstrap, TOPIC, REMADE_PARTITIONS)  # (unless a client's ask made it)


def test_a_topic_made_anew_under_a_running_consumer_is_counted_on(
    topic4: Tansu, clickhouse: ChdbHttpServer, tmp_path: Path
) -> None:
    """The topic deleted and made anew while the consumer stays in its group (no rebalance
    tells it): its fetches answer that the log now ends before where it reads, which it takes
    for a log begun again, checks, and counts on."""
    topic = topic4
    asyncio.run(produce(topic.bootstrap, events(0, 600)))
    first = Runner(topic.bootstrap, clickhouse.dsn, 0.2, tmp_path / "first.log")
    try:
        first.wait_line(lambda line: line.startswith("written"))
        wait_stored(clickhouse.dsn, expected(600))
        asyncio.run(remake_topic(topic.bootstrap))
        asyncio.run(produce(topic.bootstrap, events(600, 300)))
        wait_stored(clickhouse.dsn, expected(900))
    finally:
        first.kill()
    log = (tmp_path / "first.log").read_text()
    assert "their log ends before this reads" in log
    assert replaced_said(tmp_path / "first.log") == REMADE_PARTITIONS
    for rows, next_position, *_ in positions(clickhouse.dsn):
        assert next_position == rows  # none skipped, none twice
