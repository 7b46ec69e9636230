"""Where the aggregate service reads beacon records from: a Kafka consumer group, or (in
``visitorstats run``) the in-process log that ingest appends to. Both present the same small
interface to ``consume.py``: batches of ``InRecord`` in log order per partition, assignment
callbacks, pause/resume, commit, and a dead-letter sink."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from services import metrics
from services.ingest.publish_types import OutRecord

log = logging.getLogger(__name__)

OnAssign = Callable[[list[int]], Awaitable[dict[int, int]]]
OnRevoke = Callable[[list[int]], Awaitable[None]]


@dataclass(slots=True)
class InRecord:
    partition: int
    offset: int
    value: bytes | None


class Source(Protocol):
    topic: str  # the name under which progress is stored in ClickHouse

    async def start(self, on_assign: OnAssign, on_revoke: OnRevoke) -> None: ...
    async def fetch(self, timeout: float, max_records: int) -> list[InRecord]: ...
    async def commit(self, offsets: dict[int, int]) -> None: ...
    async def seek(self, offsets: dict[int, int]) -> None: ...
    def assigned(self) -> list[int]: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    async def dead_letter(self, records: list[InRecord], reason: str) -> None: ...
    async def stop(self) -> None: ...
    def ready(self) -> tuple[bool, str]: ...


class LocalLog:
    """The standalone hand-off: an in-memory log with one partition. Offsets continue from
    what ClickHouse already holds, so the same progress rule works as with Kafka. A hard kill
    loses what was appended but not yet written (at most one flush interval)."""

    topic = "local"

    def __init__(self) -> None:
        self._records: list[InRecord] = []
        self._next = 0
        self._arrived = asyncio.Event()
        self._paused = False
        self._on_revoke: OnRevoke | None = None

    def append(self, record: OutRecord) -> None:
        self._records.append(InRecord(0, self._next, record.value))
        self._next += 1
        self._arrived.set()

    async def start(self, on_assign: OnAssign, on_revoke: OnRevoke) -> None:
        self._on_revoke = on_revoke
        offsets = await on_assign([0])
        self._next = max(self._next, offsets.get(0, 0))

    def pending(self) -> int:
        return len(self._records)

    async def fetch(self, timeout: float, max_records: int) -> list[InRecord]:
        if not self._records or self._paused:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except TimeoutError:
                return []
            if self._paused:
                return []
        batch, self._records = self._records[:max_records], self._records[max_records:]
        return batch

    async def commit(self, offsets: dict[int, int]) -> None:
        return None

    async def seek(self, offsets: dict[int, int]) -> None:
        return None  # nothing to re-read: the log only holds what was not yet processed

    def assigned(self) -> list[int]:
        return [0]

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._arrived.set()

    async def dead_letter(self, records: list[InRecord], reason: str) -> None:
        metrics.DEAD_LETTERS.inc(len(records))
        log.warning("dropped %d undecodable records: %s", len(records), reason)

    async def stop(self) -> None:
        return None

    def ready(self) -> tuple[bool, str]:
        return (True, "in-process")


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: KafkaSource, on_assign: OnAssign, on_revoke: OnRevoke) -> None:
        self._source, self._on_assign, self._on_revoke = source, on_assign, on_revoke

    async def on_partitions_revoked(self, revoked: Any) -> None:
        parts = sorted(tp.partition for tp in revoked if tp.topic == self._source.topic)
        if parts:
            await self._on_revoke(parts)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        parts = sorted(tp.partition for tp in assigned if tp.topic == self._source.topic)
        if parts:
            # aiokafka may hand out records of a new partition while this callback awaits:
            # hold them back until the state is rebuilt and the position is set.
            self._source.pause_partitions(parts)
            try:
                offsets = await self._on_assign(parts)
                await self._source.seek(offsets)
            finally:
                self._source.resume_partitions(parts)


class KafkaSource:
    def __init__(self, bootstrap: str, topic: str, group: str, dead_letter_topic: str) -> None:
        self.topic = topic
        self._dlq_topic = dead_letter_topic
        self._bootstrap = bootstrap
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_uncommitted",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=2_000,
            max_poll_interval_ms=300_000,
        )
        self._dlq: AIOKafkaProducer | None = None
        self._ok = False

    async def start(self, on_assign: OnAssign, on_revoke: OnRevoke) -> None:
        await self._consumer.start()
        self._consumer.subscribe([self.topic], listener=_Listener(self, on_assign, on_revoke))
        self._ok = True

    async def fetch(self, timeout: float, max_records: int) -> list[InRecord]:
        try:
            batches = await self._consumer.getmany(
                timeout_ms=int(timeout * 1000), max_records=max_records
            )
            self._ok = True
        except Exception as e:
            self._ok = False
            log.warning("fetch failed: %s", e)
            await asyncio.sleep(timeout)
            return []
        out = []
        for tp, records in batches.items():
            for r in records:
                out.append(InRecord(tp.partition, r.offset, r.value))
        self._update_lag()
        return out

    def _update_lag(self) -> None:
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is None:
                continue
            try:
                pos = self._consumer._fetcher._subscriptions.assignment[tp].position
            except (AttributeError, KeyError):
                pos = None
            if pos is not None:
                metrics.CONSUMER_LAG.labels(str(tp.partition)).set(max(0, high - pos))

    async def commit(self, offsets: dict[int, int]) -> None:
        owned = {tp.partition for tp in self._consumer.assignment()}
        to_commit = {TopicPartition(self.topic, p): o for p, o in offsets.items() if p in owned}
        if to_commit:
            await self._consumer.commit(to_commit)

    async def seek(self, offsets: dict[int, int]) -> None:
        committed: dict[int, int] = {}
        for p in offsets:
            c = await self._consumer.committed(TopicPartition(self.topic, p))
            if c is not None:
                committed[p] = c
        for p in set(offsets) | set(committed):
            # ClickHouse holds the truth; a committed offset past it can only cover records
            # that produced no row (duplicates, dead letters), so the later of the two is right.
            target = max(offsets.get(p, 0), committed.get(p, 0))
            if p in offsets or p in committed:
                self._consumer.seek(TopicPartition(self.topic, p), target)

    def assigned(self) -> list[int]:
        return sorted(tp.partition for tp in self._consumer.assignment())

    def pause(self) -> None:
        self._consumer.pause(*self._consumer.assignment())

    def pause_partitions(self, partitions: list[int]) -> None:
        self._consumer.pause(*(TopicPartition(self.topic, p) for p in partitions))

    def resume_partitions(self, partitions: list[int]) -> None:
        self._consumer.resume(*(TopicPartition(self.topic, p) for p in partitions))

    def resume(self) -> None:
        self._consumer.resume(*self._consumer.assignment())

    async def dead_letter(self, records: list[InRecord], reason: str) -> None:
        metrics.DEAD_LETTERS.inc(len(records))
        try:
            if self._dlq is None:
                self._dlq = AIOKafkaProducer(bootstrap_servers=self._bootstrap, acks="all")
                await self._dlq.start()
            for r in records:
                await self._dlq.send_and_wait(
                    self._dlq_topic,
                    r.value or b"",
                    headers=[
                        ("reason", reason.encode()[:200]),
                        ("source", f"{self.topic}/{r.partition}/{r.offset}".encode()),
                    ],
                )
        except Exception as e:  # the partition must not stall on a dead letter
            log.warning("dead-letter publish failed (%s); %d records logged only", e, len(records))

    async def stop(self) -> None:
        await self._consumer.stop()
        if self._dlq is not None:
            await self._dlq.stop()

    def ready(self) -> tuple[bool, str]:
        return (self._ok, "ok" if self._ok else "broker unreachable")
