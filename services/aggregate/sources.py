"""Where the aggregate service reads beacon records from: a Kafka consumer group, or (in
``visitorstats run``) the in-process log that ingest appends to. Both present the same small
interface to ``consume.py``: batches of ``InRecord`` in log order per partition, assignment
callbacks, pause/resume, commit, and a dead-letter sink."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, OffsetOutOfRangeError
from aiokafka.protocol.admin import DescribeGroupsRequest
from aiokafka.protocol.group import JoinGroupRequest, LeaveGroupRequest

from services import metrics
from services.aggregate.counter import SILENT_SECONDS
from services.ingest.publish_types import OutRecord
from services.ingest.spool import Spool
from services.record import RecordError, decode

log = logging.getLogger(__name__)

# How long ``KafkaSource.replaced`` waits for the records it asks the broker for
PROBE_SECONDS = 5.0
# While this process holds its partitions paused, how often it asks the broker for their ends
HELD_ENDS_SECONDS = 2.0

OnAssign = Callable[[list[int]], Awaitable[None]]
OnRevoke = Callable[[list[int]], Awaitable[None]]


def _event_id(value: bytes) -> str | None:
    """The event id of a record's value, as ClickHouse gives a UUID back; None when it is no
    record of ingest's."""
    try:
        return str(uuid.UUID(decode(value).event_id))
    except (RecordError, ValueError):
        return None


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
    async def committed(self, partitions: list[int]) -> dict[int, int]: ...
    async def seek(self, offsets: dict[int, int]) -> None: ...
    async def rewind(self, records: list[InRecord]) -> None: ...
    def assigned(self) -> list[int]: ...
    def pause(self, partitions: list[int] | None) -> None: ...
    def resume(self, partitions: list[int] | None) -> None: ...
    async def dead_letter(self, records: list[InRecord], reason: str) -> None: ...
    async def stop(self) -> None: ...
    def ready(self) -> tuple[bool, str]: ...
    def silent_seconds(self) -> float: ...
    def rebalancing_seconds(self) -> float: ...
    def behind(self) -> int: ...
    def others(self) -> Collection[int] | None: ...
    def rebase(self, bases: dict[int, int]) -> None: ...
    async def replaced(self, last: dict[int, tuple[int, str]]) -> dict[int, int]: ...
    def shrunk(self) -> list[int]: ...


class LocalLog:
    """The standalone hand-off: an in-memory log with one partition, holding what was appended
    and not yet stored in ClickHouse: what waits to be fetched, and what was fetched and not
    yet committed (``seek`` back reads that again, as Kafka would: a partition rebuilt after
    the clock went back resumes where ClickHouse's rows end). Its offsets continue from what
    ClickHouse already holds (set by ``seek`` at start), so the same progress rule works as with
    Kafka.

    With a ``journal`` (an on-disk ``Spool``) every record is written there before it is taken
    (before its ``202``) and forgotten once ClickHouse holds it (``commit``), so a process
    killed hard loses nothing: the next one reads the journal back first. A record stored but
    not yet forgotten when the process died comes back too, and is counted once by its
    ``event_id``, as a broker's redelivery is."""

    topic = "local"

    def __init__(self, journal: Spool | None = None) -> None:
        self._records: list[InRecord] = []  # to fetch
        self._fetched: deque[InRecord] = deque()  # fetched, not yet committed
        self._next = 0
        self._arrived = asyncio.Event()
        self._paused = False
        self._journal = journal
        if journal is not None:
            for rec in journal.peek(len(journal)):
                self._records.append(InRecord(0, self._next, rec.value))
                self._next += 1

    def append(self, record: OutRecord) -> None:
        """Raises ``SpoolFullError`` when the journal cannot take it (nothing appended)."""
        if self._journal is not None:
            self._journal.append([record])
        self._records.append(InRecord(0, self._next, record.value))
        self._next += 1
        self._arrived.set()

    async def start(self, on_assign: OnAssign, on_revoke: OnRevoke) -> None:
        await on_assign([0])

    def pending(self) -> int:
        return len(self._records)

    async def fetch(self, timeout: float, max_records: int) -> list[InRecord]:
        """The next records; the consumer lag is what waits behind them."""
        if self._journal is not None:  # how long its oldest has waited for ClickHouse
            metrics.SPOOL_OLDEST.set(self._journal.oldest_age())
        if self._paused:  # held by the consumer's retries: its backoff, whatever arrives
            metrics.CONSUMER_LAG.labels("0").set(len(self._records))
            await asyncio.sleep(timeout)
            return []
        if not self._records:
            metrics.CONSUMER_LAG.labels("0").set(len(self._records))
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except TimeoutError:
                return []
            if self._paused:
                return []
        batch, self._records = self._records[:max_records], self._records[max_records:]
        self._fetched.extend(batch)
        metrics.CONSUMER_LAG.labels("0").set(len(self._records))
        return batch

    async def commit(self, offsets: dict[int, int]) -> None:
        """ClickHouse holds everything before ``offsets[0]``: the journal forgets it. The
        journal holds the latest records appended, so its oldest has offset ``_next - len``."""
        if 0 not in offsets:
            return
        fetched = self._fetched
        while fetched and fetched[0].offset < offsets[0]:
            fetched.popleft()
        if self._journal is None:
            return
        stored = offsets[0] - (self._next - len(self._journal))
        if stored > 0:
            self._journal.pop(stored)

    async def committed(self, partitions: list[int]) -> dict[int, int]:
        return {}

    async def seek(self, offsets: dict[int, int]) -> None:
        """Back: what was fetched from there on, not yet committed, is fetched again. Forward
        (the resume point at start): what waits here, appended (or read back from the journal)
        before the resume point was known, is renumbered from it."""
        target = offsets.get(0, 0)
        if self._fetched and self._fetched[-1].offset >= target:
            again = [r for r in self._fetched if r.offset >= target]
            self._records[:0] = again
            for _ in again:
                self._fetched.pop()
            return
        first = self._records[0].offset if self._records else self._next
        if target > first:
            shift = target - first
            for rec in self._records:
                rec.offset += shift
            self._next += shift

    async def rewind(self, records: list[InRecord]) -> None:
        """``records``, the last fetched, go back to be fetched again."""
        self._records[:0] = records
        for _ in records:
            self._fetched.pop()

    def assigned(self) -> list[int]:
        return [0]

    def pause(self, partitions: list[int] | None) -> None:
        self._paused = True

    def resume(self, partitions: list[int] | None) -> None:
        self._paused = False
        self._arrived.set()

    async def dead_letter(self, records: list[InRecord], reason: str) -> None:
        metrics.DEAD_LETTERS.inc(len(records))
        log.warning("dropped %d undecodable records: %s", len(records), reason)

    async def stop(self) -> None:
        if self._journal is not None:
            self._journal.close()

    def ready(self) -> tuple[bool, str]:
        return (True, "in-process")

    def silent_seconds(self) -> float:
        return 0.0  # ingest appends in the same process: never cut off

    def behind(self) -> int:
        return len(self._records)

    def others(self) -> Collection[int]:
        return ()  # its one partition is this process's

    def rebalancing_seconds(self) -> float:
        return 0.0  # no group

    def rebase(self, bases: dict[int, int]) -> None:
        """Its offsets are positions already (``seek`` renumbers what waits)."""

    async def replaced(self, last: dict[int, tuple[int, str]]) -> dict[int, int]:
        return {}  # never lost while the process runs; the journal is read back whole

    def shrunk(self) -> list[int]:
        return []


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: KafkaSource, on_assign: OnAssign, on_revoke: OnRevoke) -> None:
        self._source, self._on_assign, self._on_revoke = source, on_assign, on_revoke

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self._source.rebalance_began()
        parts = sorted(tp.partition for tp in revoked if tp.topic == self._source.topic)
        if parts:
            await self._on_revoke(parts)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        parts = sorted(tp.partition for tp in assigned if tp.topic == self._source.topic)
        if parts:
            await self._on_assign(parts)
        self._source.rebalance_ended()


class KafkaSource:
    """A consumer group member. Positions are set by the consume loop (``seek``) from
    ClickHouse's record of progress; auto-commit is off and the commit is advisory.

    The loop counts in *positions*, which only grow: a record's position is its Kafka offset
    plus its partition's *base* (``rebase``), 0 until the partition's log is found lost and
    begun again (``replaced``). ``fetch``, ``seek`` and ``commit`` translate; ``committed``
    answers Kafka offsets, as the broker keeps them."""

    def __init__(self, bootstrap: str, topic: str, group: str, dead_letter_topic: str) -> None:
        self.topic = topic
        self._dlq_topic = dead_letter_topic
        self._bootstrap = bootstrap
        self._group = group
        self._consumer = self._new_consumer()
        self._dlq: AIOKafkaProducer | None = None
        self._ok = False
        self._position: dict[int, int] = {}  # partition -> next offset to read (for the lag)
        self._bases: dict[int, int] = {}  # partition -> position - Kafka offset
        # owned partitions whose log ends before where this process reads (``shrunk``)
        self._shrunk: set[int] = set()
        # when the broker last answered a fetch of an owned partition (or, before the group
        # was joined, when this source was made): ``silent_seconds``
        self._heard_at = time.monotonic()
        self._last_poll = 0
        # partitions paused by this process (ClickHouse refusing writes): no fetch then
        # refreshes their high watermarks nor says that the broker answered
        self._held = False
        self._ends_asked = 0.0
        self._held_ends: dict[int, int] = {}  # partition -> its end, asked while held
        # since when the group has been rebalancing (from the first revoke of a rebalance to
        # its assignment; from the start until the first one); None while stable
        self._rebalancing_since: float | None = time.monotonic()

    def _new_consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=self._group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_uncommitted",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            # Fetches of up to 50 ms of records, not one as soon as a record is there: each
            # fetch costs the broker work, and a fetch per record made the broker the
            # bottleneck of a sustained load (freshness p99 at 10,000/s for 60 s: 3.5 s with
            # the defaults, 0.8-0.9 s with these; BENCHMARKS.md). With Tansu (the test
            # broker) that work grows with the number of batches the partition holds: its
            # memory storage lists them all on each fetch (`python -m bench.broker_batches
            # --prefill 300000 --prefill-batch 3`).
            fetch_min_bytes=256 * 1024,
            fetch_max_wait_ms=50,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=2_000,
            # A revoke may spend a while writing its last batch (consume.REVOKE_WRITE_SECONDS);
            # the group waits that long for a live member before giving its partitions away.
            rebalance_timeout_ms=60_000,
            max_poll_interval_ms=300_000,
        )

    def _tp(self, partition: int) -> TopicPartition:
        return TopicPartition(self.topic, partition)

    async def start(self, on_assign: OnAssign, on_revoke: OnRevoke) -> None:
        """Join the group. A client whose start failed is not reused: a failed start can leave
        it half set up, so the next attempt gets a fresh one."""
        try:
            await asyncio.wait_for(self._consumer.start(), 30)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            self._consumer = self._new_consumer()
            raise
        self._consumer.subscribe([self.topic], listener=_Listener(self, on_assign, on_revoke))
        self._ok = True
        self._heard_at = time.monotonic()

    async def fetch(self, timeout: float, max_records: int) -> list[InRecord]:
        try:
            # getmany waits for a rebalance to end whatever its timeout: bound it, so that a
            # stop is not held up by a broker that went away mid-rebalance.
            batches = await asyncio.wait_for(
                self._consumer.getmany(timeout_ms=int(timeout * 1000), max_records=max_records),
                timeout + 10,
            )
            self._ok = True
        except TimeoutError:
            return []
        except Exception as e:
            self._ok = False
            log.warning("fetch failed: %s", e)
            await asyncio.sleep(timeout)
            return []
        if self._held:
            await self._note_held_ends()
        out = []
        fetched = {}
        bases = self._bases
        for tp, records in batches.items():
            base = bases.get(tp.partition, 0)
            for r in records:
                out.append(InRecord(tp.partition, r.offset + base, r.value))
            if records:
                fetched[tp.partition] = records[-1].offset + 1
        self._note_fetched(fetched)
        return out

    def _note_fetched(self, fetched: dict[int, int]) -> None:
        """Records behind the end of each owned partition, from the broker's high watermark
        and the next offset this process will read; and whether the broker answered a fetch
        since the last call (its answers stamp each partition, records or not)."""
        self._position.update(fetched)
        owned = self._consumer.assignment()
        if not owned:
            self._heard_at = time.monotonic()  # nothing to fetch: nothing missed
        for tp in owned:
            waiting = self._waiting(tp)
            if waiting is not None:
                metrics.CONSUMER_LAG.labels(str(tp.partition)).set(waiting)
                high = self._consumer.highwater(tp)
                if high is not None and high < self._position[tp.partition]:
                    self._shrunk.add(tp.partition)
            polled = self._consumer.last_poll_timestamp(tp)
            if polled is not None and polled > self._last_poll:
                self._last_poll = polled
                self._heard_at = time.monotonic()

    async def _note_held_ends(self) -> None:
        """While every partition is held paused, ask the broker for their ends now and then:
        the lag then grows with what waits (an outside audit saw it stay at 8 while 7,844
        records waited behind a ClickHouse outage), and the broker's answer says it is there
        (readiness blamed Kafka for ClickHouse's outage). Tansu may answer a batch short: the
        lag only, never a decision, is taken from it."""
        now = time.monotonic()
        owned = list(self._consumer.assignment())
        if not owned or now - self._ends_asked < HELD_ENDS_SECONDS:
            return
        self._ends_asked = now
        try:
            ends = await asyncio.wait_for(self._consumer.end_offsets(owned), PROBE_SECONDS)
        except Exception as e:
            log.debug("no end offsets while paused: %s", e)
            return
        self._heard_at = time.monotonic()
        for tp, end in ends.items():
            # where it reads next; nothing read yet: where the log ended when last fetched
            pos = self._position.get(tp.partition, self._consumer.highwater(tp))
            if pos is not None:
                self._held_ends[tp.partition] = end
                if tp.partition not in self._position:
                    metrics.CONSUMER_LAG.labels(str(tp.partition)).set(max(0, end - pos))

    def rebalance_began(self) -> None:
        if self._rebalancing_since is None:
            self._rebalancing_since = time.monotonic()

    def rebalance_ended(self) -> None:
        self._rebalancing_since = None

    def rebalancing_seconds(self) -> float:
        """Seconds the consumer group has been rebalancing (0 while stable): no member reads
        then (aiokafka's rebalances stop every member), so the counter's numbers stop
        following the beacons, however well the broker answers."""
        since = self._rebalancing_since
        return 0.0 if since is None else time.monotonic() - since

    def behind(self) -> int:
        """Records after where this process reads, up to the ends of its partitions as last
        heard (the consumer lag, summed)."""
        return sum(self._waiting(tp) or 0 for tp in self._consumer.assignment())

    def others(self) -> Collection[int] | None:
        """The partitions of the topic that this process does not own, as the broker's
        metadata last said (None before it has): other members of the group count them."""
        found: set[int] | None = self._consumer.partitions_for_topic(self.topic)
        if found is None:
            return None
        return found - {tp.partition for tp in self._consumer.assignment()}

    def _waiting(self, tp: TopicPartition) -> int | None:
        """Records of ``tp`` after where this process reads, up to its end as last heard:
        the high watermark of the last fetch, or, while held (no fetch moves the high
        watermark), the end asked of the broker. None before both are known."""
        high: int | None = self._consumer.highwater(tp)
        pos = self._position.get(tp.partition)
        if high is None or pos is None:
            return None
        return max(0, max(high, self._held_ends.get(tp.partition, high)) - pos)

    def silent_seconds(self) -> float:
        """Seconds since the broker last answered a fetch of a partition this process owns:
        the counter's numbers stop following the beacons while it is silent (a fetch comes back
        within ``fetch_max_wait_ms`` even when there is nothing new)."""
        return time.monotonic() - self._heard_at

    async def commit(self, offsets: dict[int, int]) -> None:
        owned = {tp.partition for tp in self._consumer.assignment()}
        bases = self._bases
        to_commit = {self._tp(p): o - bases.get(p, 0) for p, o in offsets.items() if p in owned}
        if to_commit:
            await self._consumer.commit(to_commit)

    async def committed(self, partitions: list[int]) -> dict[int, int]:
        out = {}
        for p in partitions:
            c = await self._consumer.committed(self._tp(p))
            if c is not None:
                out[p] = c
        return out

    async def seek(self, offsets: dict[int, int]) -> None:
        for p, position in offsets.items():
            offset = position - self._bases.get(p, 0)
            # IllegalStateError: no longer assigned; a rebalance is under way and will set it
            with contextlib.suppress(IllegalStateError):
                self._consumer.seek(self._tp(p), offset)
                self._position[p] = offset

    def rebase(self, bases: dict[int, int]) -> None:
        """Each partition's base from now on: position - Kafka offset (consume.py)."""
        self._bases.update(bases)

    def shrunk(self) -> list[int]:
        """The owned partitions whose log, by a fetch's answer, now ends before where this
        process reads: a log can only grow, so it was lost and begun again while the group
        stayed as it was (a topic deleted and made anew); the consume loop rebuilds them,
        which checks it (``replaced``). Each is told once."""
        out, self._shrunk = sorted(self._shrunk), set()
        return out

    async def replaced(self, last: dict[int, tuple[int, str]]) -> dict[int, int]:
        """Which partitions' logs were lost and begun again, and for each its first offset
        (where counting goes on from). ``last``: per partition, the Kafka offset of the last
        record stored from it and that record's event id. A partition's log was replaced when
        it ends before that offset, or holds another record there (the topic deleted and made
        anew; a broker that kept its log in memory restarted; both keep the topic's name and
        begin its offsets again at 0). A record gone to retention (the log begins after it)
        proves nothing: not replaced. Raises when the broker does not answer (the caller's
        rebuild tries again), so that a slow answer is never taken for a lost log."""
        wanted = {self._tp(p): (o, event_id) for p, (o, event_id) in last.items() if o >= 0}
        if not wanted:
            return {}
        probe = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="none",
            isolation_level="read_uncommitted",
        )
        try:
            await asyncio.wait_for(probe.start(), 10)
            return await self._probe(probe, wanted)
        finally:
            await probe.stop()

    @staticmethod
    async def _probe(
        probe: AIOKafkaConsumer, wanted: dict[TopicPartition, tuple[int, str]]
    ) -> dict[int, int]:
        """``replaced`` with its consumer (no group) started. Past the end is what a fetch
        answer says (its high watermark at or before the offset, and no record), or Kafka's
        out-of-range error: never ListOffsets' end, which Tansu can give a whole record batch
        short (75 for a log of 111 records)."""
        tps = list(wanted)
        probe.assign(tps)
        begins = await asyncio.wait_for(probe.beginning_offsets(tps), 10)
        # per partition: the value at the offset asked for; None: not there but proving nothing;
        # b"": past the end
        found: dict[TopicPartition, bytes | None] = {}
        for tp in tps:
            if wanted[tp][0] < begins[tp]:
                found[tp] = None  # gone to retention
            else:
                probe.seek(tp, wanted[tp][0])
        deadline = time.monotonic() + PROBE_SECONDS
        while len(found) < len(tps) and (left := deadline - time.monotonic()) > 0:
            try:
                batches = await probe.getmany(timeout_ms=int(min(left, 0.5) * 1000) + 1)
            except OffsetOutOfRangeError as e:  # Kafka says so: past the end
                for tp in e.args[0] if e.args and isinstance(e.args[0], dict) else ():
                    if tp in wanted and tp not in found:
                        found[tp] = b""
                        probe.pause(tp)
                continue
            for tp in tps:
                if tp in found:
                    continue
                records = batches.get(tp)
                if records:
                    # a first record after the offset asked for: nothing there (no record of
                    # ingest's), which proves nothing either
                    first = records[0]
                    found[tp] = first.value if first.offset == wanted[tp][0] else None
                    probe.pause(tp)
                    continue
                high = probe.highwater(tp)
                if high is not None and high <= wanted[tp][0]:
                    found[tp] = b""  # the broker answered: its log ends before that offset
                    probe.pause(tp)
        out = {}
        for tp in tps:
            if tp not in found:
                raise TimeoutError(f"partition {tp.partition}: no answer at {wanted[tp][0]} yet")
            value = found[tp]
            if value is None or (value and _event_id(value) == wanted[tp][1]):
                continue
            out[tp.partition] = begins[tp]
        return out

    async def rewind(self, records: list[InRecord]) -> None:
        first: dict[int, int] = {}
        for r in records:
            first[r.partition] = min(r.offset, first.get(r.partition, r.offset))
        await self.seek(first)

    def assigned(self) -> list[int]:
        return sorted(tp.partition for tp in self._consumer.assignment())

    def _tps(self, partitions: list[int] | None) -> list[TopicPartition]:
        owned = self._consumer.assignment()
        if partitions is None:
            return list(owned)
        return [tp for tp in map(self._tp, partitions) if tp in owned]

    def pause(self, partitions: list[int] | None) -> None:
        self._consumer.pause(*self._tps(partitions))
        self._held = self._held or partitions is None

    def resume(self, partitions: list[int] | None) -> None:
        self._consumer.resume(*self._tps(partitions))
        if partitions is None:
            self._held = False
            self._held_ends.clear()

    async def dead_letter(self, records: list[InRecord], reason: str) -> None:
        """Publish undecodable records to the dead-letter topic. Bounded: the partition must
        not stall on a dead letter, so a failure leaves them in the log only."""
        metrics.DEAD_LETTERS.inc(len(records))
        try:
            if self._dlq is None:
                producer = AIOKafkaProducer(bootstrap_servers=self._bootstrap, acks="all")
                try:
                    await asyncio.wait_for(producer.start(), 10)
                except BaseException:
                    await producer.stop()
                    raise
                self._dlq = producer
            futures = [
                await self._dlq.send(
                    self._dlq_topic,
                    r.value or b"",
                    headers=[
                        ("reason", reason.encode()[:200]),
                        ("source", f"{self.topic}/{r.partition}/{r.offset}".encode()),
                    ],
                )
                for r in records
            ]
            await asyncio.wait_for(asyncio.gather(*futures), 10)
        except Exception as e:
            log.warning("dead-letter publish failed (%s); %d records logged only", e, len(records))

    async def stop(self) -> None:
        await self._leave_group()
        await self._consumer.stop()
        if self._dlq is not None:
            await self._dlq.stop()

    async def _leave_group(self) -> None:
        """Leave the group at once when this process is its one member and it is stable, so
        that the process restarted gets the partitions without waiting for the session to
        time out. aiokafka leaves on stop only when its generation is above 0, as Kafka
        numbers them; Tansu (the test broker) numbers the first generation 0, and a process
        restarted there got its partitions back 18 s later instead of 5.

        With other members, or a rebalance under way, it does not leave (nor lets aiokafka
        leave): its session times out and the group rebalances then, as after a crash. Tansu
        loses a group whose members leave while a rebalance is under way: with two processes
        stopped at once, the processes started next joined it and never got an assignment (no
        leader), for good (``tests/faults/test_tier_restart.py``)."""
        coordinator = getattr(self._consumer, "_coordinator", None)
        if coordinator is None or coordinator.member_id == JoinGroupRequest.UNKNOWN_MEMBER_ID:
            return  # nothing to leave
        if not await self._alone_and_stable(coordinator):

            async def stay() -> None:
                coordinator.reset_generation()

            coordinator._maybe_leave_group = stay  # what aiokafka's close would send
            log.info("staying in the group: its session times out (other members, or a rebalance)")
            return
        if coordinator.generation != 0:
            return  # aiokafka leaves by itself
        try:
            await asyncio.wait_for(
                coordinator._send_req(LeaveGroupRequest(self._group, coordinator.member_id)), 5
            )
        except Exception as e:  # the session times out instead
            log.info("could not leave the group: %s", e)
        else:
            log.info("left the group")

    async def _alone_and_stable(self, coordinator: Any) -> bool:
        """Whether the group is stable with this member its only one (the broker says)."""
        try:
            response = await asyncio.wait_for(
                coordinator._send_req(DescribeGroupsRequest([self._group])), 5
            )
        except Exception as e:
            log.info("could not describe the group: %s", e)
            return False
        # each group: error, id, state, protocol type, protocol, members (each: its id first)
        for error, group, state, *_, members in (g[:6] for g in response.groups):
            if group == self._group:
                ids = [m[0] for m in members]
                return error == 0 and state == "Stable" and ids == [coordinator.member_id]
        return False

    def ready(self) -> tuple[bool, str]:
        """Not ready when a fetch failed, or when the broker has not answered for
        ``SILENT_SECONDS`` (a consumer's fetches come back empty, not failed, while the broker
        is away; the counter's numbers are stale then)."""
        if not self._ok:
            return False, "broker unreachable"
        silence = self.silent_seconds()
        if silence > SILENT_SECONDS:
            rebalancing = self.rebalancing_seconds()
            if rebalancing:  # the broker answers: the group has not given out partitions
                return False, f"consumer group rebalancing for {rebalancing:.0f} s"
            return False, f"broker silent for {silence:.0f} s"
        return True, "ok"
