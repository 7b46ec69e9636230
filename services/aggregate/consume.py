"""The consume loop: records -> counting rules -> ClickHouse -> commit.

How exactly-once holds (see README, "Guarantees"):

1. **ClickHouse is the record of progress.** Every stored row carries its (topic, partition,
   offset). When a partition is assigned, and after any doubt, it is counted again from right
   after its last stored offset (or from the committed offset when that is later: the records in
   between produced no row — duplicates, dead letters). Records below that point are skipped
   whatever the broker hands out (``Aggregator.process``), so a redelivery, a stale prefetch or
   a seek race cannot count a record twice.
2. **The state is a function of the rows.** A partition's counting state (latest event per
   visitor, linked keys, recent event ids) is rebuilt from its recent rows
   (``PartitionState.replay``), so the decisions after a restart or a rebalance are the ones the
   previous owner made: the same records give the same rows.
3. **One INSERT per partition per flush, fenced by its token.** The insert-deduplication token
   is (topic, partition, offset of the first row). A retry sends the same rows with the same
   token; by 1 and 2, so does any other process that counts the same records, since it resumes
   at the same point and decides the same. ClickHouse keeps the first of them and drops the
   others. This fences a *zombie*: a process that lost a partition (session expired, frozen,
   batch dropped on revoke, ClickHouse hung) but whose insert lands later.
4. **Every insert is checked.** After the inserts, each partition's stored maximum offset must be
   the last row just written. If a different insert with the same token won (a zombie's, with
   other bounds), the partition's state and position are rebuilt from ClickHouse (1, 2). If the
   token was swallowed with no row stored (ClickHouse can record a token and then lose the part
   in a crash), the rows are inserted again under a new token.
5. **Frozen batches.** Once an insert was attempted, the batch (rows and tokens) never changes.
   While ClickHouse refuses it, the partitions are paused, anything fetched is rewound, and the
   loop keeps polling so the process stays in the group. On revoke the batch is written (with
   bounded retries) or dropped; 3 makes a late landing of a dropped batch harmless.
6. **Commit after write.** Offsets are committed to Kafka only after the rows are stored; the
   commit is advisory (lag, tools, and a floor for 1).
7. **One lock.** The rebalance callbacks run in aiokafka's coordinator task, beside this loop.
   ``Consumer.lock`` serialises them with the loop's process and write steps, so the state, the
   batch and the positions are only ever changed by one party at a time. Nothing waits on the
   broker while holding it, except the assignment callback itself.
8. **Who is online, per partition.** Each partition's state keeps who of it is online
   (counting.py); its tallies are written to ``online_now`` with each flush, after the flush's
   events are stored and checked (numbers of stored rows), and at a tick when only time changed
   them (for a partition with nothing pending: its state is then that of the stored rows).
   Each row carries (next offset, time): the counter takes, per partition, the greatest, which
   a fenced former owner (resuming at or before what the new owner resumes at) cannot beat.
9. **One write in the background.** When a batch is due, its inserts may run on the store's
   thread (``Aggregator.begin_write``) while the loop counts the next records into a new batch;
   before that one is written, the first is awaited and checked (4), so per partition the
   inserts land and are checked in log order, and at most two batches are held. A batch counted
   after a write that turns out fenced is dropped with it (its partitions are rebuilt); a
   revoke, a stop or a rebuild writes (or drops) both at once.
10. **Positions, not offsets.** The loop counts in positions that only grow: a record's
   position is its Kafka offset plus its partition's *base*, stored with every row
   (``kafka_offset`` is the position, ``kafka_base`` the base). The base is 0 until a
   partition's log is lost and begun again under the same name (the topic deleted and made
   anew; a broker that kept its log in memory restarted), which Kafka offsets alone would
   hide: the new log's offsets would fall below what 1 skips, and nothing it holds would be
   counted. So a rebuild checks that the log still holds, where the last stored row says, the
   record of that row (``Source.replaced``); when it does not, the new log is counted from its
   first record on, at the position after the last stored row. Each rebuild checks again
   until a row of the new log is stored, and decides the same. A log replaced while the group
   stays as it is (no rebalance, no rebuild) shows in the fetches: its end falls below where
   this process reads (``Source.shrunk``), and the partition is rebuilt, so checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from itertools import groupby
from operator import attrgetter
from typing import Any

from services import gcpause, metrics
from services.aggregate.counting import PartitionState, Row
from services.aggregate.countrun import count_run
from services.aggregate.sources import InRecord, Source
from services.aggregate.store import Store, online_rows
from services.settings import Settings
from services.sites import Registry

log = logging.getLogger(__name__)

# ``Source.replaced``: per partition (Kafka offset, event id) of the last record stored -> the
# partitions whose log was lost and begun again, with its first offset
Replaced = Callable[[dict[int, tuple[int, str]]], Awaitable[dict[int, int]]]

# How long a revoke (a rebalance) may spend writing the pending batch before dropping it.
REVOKE_WRITE_SECONDS = 20.0
# How long a graceful stop may spend writing the last batch while ClickHouse refuses it.
STOP_WRITE_SECONDS = 30.0
# A fetch that skipped offsets is read again; the same gap this many times over is taken as real
GAP_RETRIES = 3
# A partition's tallies are written again at least this often (ms) even when they have not
# changed: a live owner's latest tally is then never older than the smallest online window a
# site may have (10 s), and the counter can take an older one for a gone owner's, whose
# visitors have all left the window since (store.NUMBERS_QUERY).
TALLY_REFRESH_MS = 5_000
# Every owned partition gets a row in ``online_now`` at least this often (ms): its tallies, or,
# when they are as last written, a row of no site (``ALIVE_SITE``, no one online). Every
# aggregate's counter sees by it that the partition is being counted: one whose latest row
# stops changing has lost its owner (killed, frozen, or its writes stuck) before the consumer
# group has noticed (``counter.UNATTENDED_SECONDS``).
ALIVE_MS = 1_000
ALIVE_SITE = ""  # never a site id (``sites.SITE_ID``)


@dataclass
class Pending:
    """One partition's share of the batch."""

    rows: list[Row] = field(default_factory=list)
    base: int = 0  # the partition's log base (``Aggregator.bases``), stored with its rows
    last: int = -1  # last offset processed (rows or not): what the commit covers
    token: str | None = None  # frozen at the first insert attempt
    written: bool = False
    attempt: int = 0  # > 0 after a token was swallowed without its rows (see 4 above)
    # (next offset, tallies) of the partition's state when the batch froze, written with it
    online: tuple[int, dict[str, tuple[int, int, int]]] | None = None
    online_rows: list[list[Any]] | None = None


@dataclass
class Batch:
    parts: dict[int, Pending] = field(default_factory=dict)
    started: float = 0.0
    frozen: bool = False
    notified: bool = False  # on_flushed was told of its rows

    def __len__(self) -> int:
        return sum(len(p.rows) for p in self.parts.values())

    def empty(self) -> bool:
        return not self.parts


_partition_of = attrgetter("partition")
_starts_visit = attrgetter("starts_visit")
_pageview = attrgetter("pageview")


def _retrieve(task: asyncio.Future[dict[int, int]]) -> None:
    """Done callback of a dropped background write: its outcome is of no interest, but must be
    retrieved (asyncio logs an exception nobody retrieved)."""
    if not task.cancelled():
        task.exception()


class _BrokerError(Exception):
    """A rebuild could not check its partitions' logs (``Source.replaced``)."""


def insert_token(topic: str, partition: int, first_offset: int, attempt: int = 0) -> str:
    """The identity of a partition's insert: the same records counted from the same point,
    by any process, give the same token (see 3 above)."""
    token = f"{topic};{partition};{first_offset}"
    return token if attempt == 0 else f"{token};{attempt}"


class Aggregator:
    """The counting state of the owned partitions, the pending batch, and its writes.

    Not safe for concurrent use on its own: ``Consumer`` calls it under its lock."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        settings: Settings,
        topic: str,
        on_flushed: Callable[[list[int]], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.registry = registry
        self._strangers: set[str] = set()  # sites counted by the tz of their records
        self._tallies_failure_said = float("-inf")
        self.settings = settings
        self.topic = topic
        self.clock = clock
        self.windows = {s.id: s.online_window_seconds for s in registry}
        # per owned partition: the (next offset, tallies) last handed to ClickHouse, and the
        # next offset its tallies are written with (after the last row it stored)
        self.published: dict[int, tuple[int, dict[str, tuple[int, int, int]]]] = {}
        self.tally_offset: dict[int, int] = {}
        # per owned partition: the ``at`` of its latest tallies written (by any owner, as of the
        # rebuild): the next are later, even after the clock went back
        self.last_at: dict[int, int] = {}
        # per owned partition: when (by this process's clock, unlike ``last_at``, which a
        # rebuild takes from the stored rows, ahead if another owner's clock was) its tallies,
        # and any row of it, were last written
        self.tallied_at: dict[int, int] = {}
        self.sent_at: dict[int, int] = {}
        self.states: dict[int, PartitionState] = {}
        self.next_offset: dict[int, int] = {}  # per owned partition: the first offset not counted
        # per owned partition: its log base, position - Kafka offset (see 10 above)
        self.bases: dict[int, int] = {}
        # partition -> the base of the last new log told of (logged and counted once: every
        # rebuild until a row of it is stored decides it again, and a broker's return often
        # brings two rebalances)
        self._told_bases: dict[int, int] = {}
        self._rebuilding_since: float | None = None  # see ``rebuilding_seconds``
        self.batch = Batch()
        self.needs_reset: set[int] = set()  # partitions to rebuild from ClickHouse
        # A fetch that skipped offsets (see ``_count``): partition -> the offset to read again
        # from, and per gap (partition, first missing, next present) the times it was met.
        self.gaps: dict[int, int] = {}
        self._gap_seen: dict[tuple[int, int, int], int] = {}
        # The batch whose write was started in the background (``begin_write``), and its I/O
        self.writing: Batch | None = None
        self._sending: asyncio.Future[dict[int, int]] | None = None
        self._on_flushed = on_flushed

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _new_state(self, partition: int, now_ms: int) -> PartitionState:
        state = PartitionState(
            partition,
            visit_timeout_s=self.settings.visit_timeout_seconds,
            dedup_horizon_s=self.settings.dedup_horizon_seconds,
            max_visitors=self.settings.max_visitors_per_partition,
            windows=self.windows,
        )
        state.advance(now_ms)
        return state

    def rebuilding_seconds(self) -> float:
        """How long a rebuild has been under way (0 when none is): its partitions are not read
        meanwhile, so the counter's numbers stop following the beacons."""
        since = self._rebuilding_since
        return 0.0 if since is None else time.monotonic() - since

    async def rebuild(
        self,
        partitions: list[int],
        floor: dict[int, int],
        give_up: Callable[[], bool] = lambda: False,
        replaced: Replaced | None = None,
    ) -> dict[int, int]:
        if self._rebuilding_since is None:
            self._rebuilding_since = time.monotonic()
        try:
            return await self._rebuild(partitions, floor, give_up, replaced)
        finally:
            self._rebuilding_since = None

    async def _rebuild(
        self,
        partitions: list[int],
        floor: dict[int, int],
        give_up: Callable[[], bool],
        replaced: Replaced | None,
    ) -> dict[int, int]:
        """Rebuild the state of ``partitions`` from ClickHouse; return where each resumes:
        after its last stored row, or ``floor`` (the committed Kafka offset) when later. Sets
        each one's log base (``bases``): that of its last stored row, or, when ``replaced``
        (the source's check of that row's record) finds its log lost and begun again, the one
        that puts the new log's first record right after it (see 10 above). Retries until
        ClickHouse and the check answer (counting without the state would count wrong), or
        ``give_up()``."""
        longest_ms = 1000 * max(self.windows.values(), default=0)
        horizon_ms = max(
            1000 * self.settings.visit_timeout_seconds,
            1000 * self.settings.dedup_horizon_seconds,
            longest_ms,
        )
        backoff = 0.2
        while True:
            try:
                stored = await self.store.next_offsets(self.topic)
                last = await self.store.last_stored(
                    self.topic, {p: stored[p] for p in partitions if p in stored}
                )
                unseen = [p for p in partitions if p in stored and p not in last]
                if unseen:  # its base unknown, its position in Kafka would be a guess
                    raise RuntimeError(f"the last rows of partitions {unseen} were not found")
                lost = {}
                if replaced is not None:
                    try:
                        lost = await replaced(
                            {p: (stored[p] - 1 - base, eid) for p, (base, eid) in last.items()}
                        )
                    except Exception as e:
                        raise _BrokerError(f"the broker did not tell ({e!r})") from e
                stamps = await self.store.online_stamps(self.topic)
                states = {}
                for p in partitions:
                    now = self.now_ms()
                    state = self._new_state(p, now)
                    # the rows that decide who is online now, too (even behind a future row);
                    # replayed on the store's thread (the state is this rebuild's own)
                    await self.store.replay_recent(
                        self.topic, p, horizon_ms, now - longest_ms, state.replay
                    )
                    states[p] = state
                break
            except Exception as e:
                if not isinstance(e, _BrokerError):
                    metrics.CLICKHOUSE_ERRORS.labels("rebuild").inc()
                if give_up():
                    raise
                log.warning("cannot rebuild state (%s); retrying in %.1fs", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        resume = {}
        for p in partitions:
            if p in lost:
                # what was stored of the lost log stays counted; the new log follows it
                self.bases[p] = stored[p] - lost[p]
                resume[p] = stored[p]
                if self._told_bases.get(p) == self.bases[p]:
                    continue
                self._told_bases[p] = self.bases[p]
                metrics.LOGS_REPLACED.inc()
                log.warning(
                    "partition %d: its log was lost and begun again (the record stored last, "
                    "Kafka offset %d, is not there); counting the new log from offset %d as "
                    "position %d",
                    p,
                    stored[p] - 1 - last[p][0],
                    lost[p],
                    stored[p],
                )
            else:
                self.bases[p] = base = last[p][0] if p in last else 0
                resume[p] = max(stored.get(p, 0), floor[p] + base if p in floor else 0)
        for p in partitions:
            self.states[p] = states[p]
            self.next_offset[p] = resume[p]
            self.needs_reset.discard(p)
            # the next tick writes its tallies (every site, zeros too) as of its resume point
            self.tally_offset[p] = resume[p]
            self.published.pop(p, None)
            self.last_at[p] = stamps.get(p, 0)
        log.info("partitions %s rebuilt; resuming at %s", partitions, resume)
        return resume

    async def assign(self, partitions: list[int]) -> dict[int, int]:
        """``rebuild`` with no committed offsets: for driving an Aggregator directly (tests)."""
        return await self.rebuild(partitions, {})

    def forget(self, partitions: list[int]) -> None:
        for p in partitions:
            self.states.pop(p, None)
            self.next_offset.pop(p, None)
            self.bases.pop(p, None)
            self.needs_reset.discard(p)
            self.published.pop(p, None)
            self.tally_offset.pop(p, None)
            self.last_at.pop(p, None)
            self.tallied_at.pop(p, None)
            self.sent_at.pop(p, None)
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(str(p))

    def drop_batch(self) -> None:
        """Give the pending batches up without writing them (the one being written, if any, and
        the one being filled). Their partitions must be rebuilt (the state holds the dropped
        rows' effects); if an insert lands late, the token fences it."""
        self.needs_reset.update(self.batch.parts)
        self.batch = Batch()
        if self.writing is not None:
            self.needs_reset.update(self.writing.parts)
            self.writing = None
        task, self._sending = self._sending, None
        if task is not None:
            # Its insert may still land (the store's thread carries it out): fenced, see above.
            task.cancel()
            task.add_done_callback(_retrieve)

    def process(self, records: list[InRecord]) -> list[tuple[InRecord, str]]:
        """Apply the counting rules to records in log order; return the undecodable ones."""
        batch = self.batch
        assert not batch.frozen, "a batch is never changed once an insert was attempted"
        bad: list[tuple[InRecord, str]] = []
        if batch.empty():
            batch.started = time.monotonic()
        duplicates = self._count(records, bad)
        if duplicates:
            metrics.EVENTS_COUNTED.labels("duplicate").inc(duplicates)
        metrics.EVENTS_CONSUMED.inc(len(records))
        return bad

    def _count(self, records: list[InRecord], bad: list[tuple[InRecord, str]]) -> int:
        """``process``'s loop; returns the number of duplicates. Records come in runs of one
        partition (a fetch groups them so): the partition's state, resume point and share of
        the batch are looked up once per run, not per record."""
        sites = self.registry.sites
        parts = self.batch.parts
        duplicates = 0
        strangers = self._strangers
        known = len(strangers)
        for partition, run in groupby(records, _partition_of):
            state = self.states.get(partition)
            if state is None or partition in self.needs_reset:
                # Not ours, or not rebuilt yet (the assignment seeks it to its resume point),
                # or about to be rebuilt and read again.
                continue
            first = after = self.next_offset[partition]
            pending = parts.get(partition)
            if pending is None:
                pending = Pending(base=self.bases.get(partition, 0))
            after, dups = count_run(
                state, partition, run, after, sites, pending.rows, bad, self._gap, strangers
            )
            duplicates += dups
            if after != first:
                self.next_offset[partition] = after
                pending.last = after - 1
                parts[partition] = pending
        if len(strangers) != known:
            log.warning(
                "counting records of sites this service's registry does not have, in the time "
                "zone ingest gave: %s (ingest's sites.toml has them: their counters are served "
                "once they are added here)",
                ", ".join(sorted(strangers)),
            )
        return duplicates

    def _gap(self, partition: int, after: int, offset: int) -> bool:
        """Offsets ``after`` to ``offset - 1`` did not come. This topic has no transactions and
        no compaction, so every offset holds a record: a fetch skipped them (seen with Tansu,
        rarely, under load; likely a fetch between a produce raising the high watermark and
        storing its batch, BENCHMARKS.md round 7), and counting on would lose them for good.
        True: read the partition again from ``after`` (``gaps``); False once the same gap came
        back ``GAP_RETRIES`` times (the log really has none there: counted past)."""
        key = (partition, after, offset)
        seen = self._gap_seen[key] = self._gap_seen.get(key, 0) + 1
        if seen > GAP_RETRIES:
            del self._gap_seen[key]
            log.warning(
                "partition %d: offsets %d-%d are not in the log", partition, after, offset - 1
            )
            return False
        if len(self._gap_seen) > 1000:
            self._gap_seen.clear()  # bounded; a gap met again starts its count afresh
        log.warning(
            "partition %d: a fetch skipped offsets %d-%d; reading again from %d",
            partition,
            after,
            offset - 1,
            after,
        )
        metrics.FETCH_GAPS.inc()
        self.gaps[partition] = after
        return True

    def take_gaps(self) -> dict[int, int]:
        """The partitions to read again (``_gap``), and from where."""
        gaps, self.gaps = self.gaps, {}
        return gaps

    def due(self) -> bool:
        b = self.batch
        return not b.empty() and (
            len(b) >= self.settings.flush_max_events
            or time.monotonic() - b.started >= self.settings.flush_interval_seconds
        )

    @property
    def pending_rows(self) -> int:
        """Rows counted and not yet known to be stored: the batch being filled, plus the one
        being written."""
        return len(self.batch) + (len(self.writing) if self.writing is not None else 0)

    def begin_write(self) -> None:
        """Start writing the batch in the background and start a new one: its inserts run on
        the store's thread (chDB and the HTTP client release the GIL) while the next records
        are counted. ``write()`` (or ``write(filling=False)``) settles it later. Only when no
        write is pending; never for partitions about to be rebuilt (the loop writes those
        synchronously first)."""
        assert self.writing is None and not self.batch.empty()
        batch, self.batch = self.batch, Batch()
        batch.frozen = True
        self.writing = batch
        # handed to the store's thread now, before the loop goes on counting
        self._sending = asyncio.ensure_future(
            self._send_in_background(batch, self._start_send(batch))
        )

    async def _send_in_background(
        self, batch: Batch, sending: asyncio.Future[dict[int, int]]
    ) -> dict[int, int]:
        stored = await sending
        if all(
            stored.get(p, 0) - 1 == pending.rows[-1].offset
            for p, pending in batch.parts.items()
            if pending.rows
        ):
            # Stored as sent: tell the counter now, not when the loop comes to settle it.
            self._notify(batch)
        return stored

    def _notify(self, batch: Batch) -> None:
        if self._on_flushed is not None and not batch.notified:
            batch.notified = True
            rows = [r for pending in batch.parts.values() for r in pending.rows]
            if rows:
                step = max(1, len(rows) // 500)
                self._on_flushed([r.event.ts for r in rows[::step]])

    def idle(self) -> bool:
        """Nothing counted is waiting to be written."""
        return self.writing is None and self.batch.empty()

    def write_settled(self) -> bool:
        """Whether a background write is there and its inserts are done (settling it will not
        wait)."""
        return self._sending is not None and self._sending.done()

    async def write(self, filling: bool = True) -> dict[int, int]:
        """Write what is pending: the batch being written in the background, if any, then (with
        ``filling``) the batch being filled. Return the offsets to commit. Raises if ClickHouse
        fails: the batch is kept, frozen, for the retry (the batch being filled, untouched)."""
        offsets: dict[int, int] = {}
        writing = self.writing
        if writing is not None:
            task, self._sending = self._sending, None
            # a background write that failed raises here; the retry sends again (what was
            # stored is not: ``written``), from the caller's next attempt
            stored = await task if task is not None else await self._send(writing)
            offsets.update(self._settle(writing, stored))
            self.writing = None
        if filling and not self.batch.empty():
            batch = self.batch
            stored = await self._send(batch)
            offsets.update(self._settle(batch, stored))
            self.batch = Batch()
        return offsets

    async def _send(self, batch: Batch) -> dict[int, int]:
        """The batch's I/O (``_start_send``), awaited."""
        return await self._start_send(batch)

    def _start_send(self, batch: Batch) -> asyncio.Future[dict[int, int]]:
        """Hand the batch's I/O to the store's thread now: one INSERT per partition not yet
        written, in partition order, then the check query (``Store.write_events``). The future
        returned gives each written partition's next offset as ClickHouse has it."""
        batch.frozen = True
        todo = []
        online = []
        now = self.now_ms()
        for p, pending in sorted(batch.parts.items()):
            if not pending.rows:
                continue
            state = self.states.get(p)
            if pending.online_rows is None and state is not None:
                # the state holds exactly the rows counted so far: up to this batch's last
                state.advance(now)
                next_offset = pending.rows[-1].offset + 1
                tallies = state.tallies()
                pending.online = (next_offset, tallies)
                at = self._stamp(p, state.now, tallied=True)
                pending.online_rows = online_rows(self.topic, p, next_offset, at, tallies)
            if pending.online_rows is not None:
                online.append((p, pending.rows[-1].offset, pending.online_rows))
            if not pending.written:
                if pending.token is None:
                    pending.token = insert_token(
                        self.topic, p, pending.rows[0].offset, pending.attempt
                    )
                todo.append(pending)
        check = [p for p, pending in batch.parts.items() if pending.rows]
        done: list[int] = []
        sent = self.store.write_events(
            [(pending.rows, pending.token or "", pending.base) for pending in todo],
            self.topic,
            check,
            done,
            online,
        )

        def written(future: asyncio.Future[dict[int, int]]) -> None:
            for i in done:
                todo[i].written = True
            if not future.cancelled():
                future.exception()  # seen here (a dropped write's is of no interest)

        sent.add_done_callback(written)
        return sent

    def _settle(self, batch: Batch, stored: dict[int, int]) -> dict[int, int]:
        """Check that every partition's insert is the one stored (see 4 above); return the
        offsets to commit."""
        lost: list[int] = []
        for p, pending in batch.parts.items():
            if not pending.rows:
                continue
            at = stored.get(p, 0) - 1
            if at == pending.rows[-1].offset:
                if pending.online is not None and p in self.states:
                    # its tallies were written with it
                    self.published[p] = pending.online
                    self.tally_offset[p] = pending.online[0]
                continue
            if at < pending.rows[0].offset:
                # The token was taken but no row of it is stored: insert again, new token.
                log.warning("insert %s was swallowed; resending", pending.token)
                pending.attempt += 1
                pending.token = None
                pending.written = False
                raise RuntimeError(f"insert of partition {p} swallowed by deduplication")
            # Another insert of these records won (a zombie's): take ClickHouse's word.
            log.warning("partition %d: rows up to %d stored by another writer; rebuilding", p, at)
            lost.append(p)
        parts = batch.parts.values()
        metrics.EVENTS_COUNTED.labels("visit").inc(
            sum(sum(map(_starts_visit, pending.rows)) for pending in parts)
        )
        metrics.EVENTS_COUNTED.labels("pageview").inc(
            sum(sum(map(_pageview, pending.rows)) for pending in parts)
        )
        self._notify(batch)
        for p in lost:
            self.needs_reset.add(p)
            if self.batch is not batch:
                # counted after this batch, on the state ClickHouse just contradicted: dropped
                # (not committed; the rebuild seeks the partition back)
                self.batch.parts.pop(p, None)
        for state in self.states.values():
            state.expire()
        return {p: pending.last + 1 for p, pending in batch.parts.items() if p not in lost}

    flush = write  # the name the counting-rules tests drive it by

    def tick_rows(self) -> list[list[Any]]:
        """Move every owned partition's clock to now; the ``online_now`` rows to write: the
        tallies of each partition with nothing pending (its state is that of its stored rows)
        that differ from those last written, or were written ``TALLY_REFRESH_MS`` ago. A
        partition whose clock went back (by more than a second) is rebuilt from its rows
        instead (``needs_reset``): time only moves forward in a state."""
        now = self.now_ms()
        busy = {p for p, pending in self.batch.parts.items() if pending.rows}
        if self.writing is not None:
            busy.update(p for p, pending in self.writing.parts.items() if pending.rows)
        out: list[list[Any]] = []
        for p, state in self.states.items():
            if p in self.needs_reset:
                continue
            if now < state.now - 1000:
                log.warning("partition %d: the clock went back; rebuilding its state", p)
                self.needs_reset.add(p)
                continue
            state.advance(now)
            if p in busy:
                continue  # its tallies go with its flush
            tallies = state.tallies()
            offset = self.tally_offset[p]
            fresh = state.now - self.tallied_at.get(p, 0) < TALLY_REFRESH_MS
            if fresh and self.published.get(p) == (offset, tallies):
                if state.now - self.sent_at.get(p, 0) >= ALIVE_MS:  # still counted: say so
                    at = self._stamp(p, state.now)
                    out.extend(online_rows(self.topic, p, offset, at, {ALIVE_SITE: (0, 0, 0)}))
                continue
            self.published[p] = (offset, tallies)
            at = self._stamp(p, state.now, tallied=True)
            out.extend(online_rows(self.topic, p, offset, at, tallies))
        return out

    def _stamp(self, partition: int, now_ms: int, tallied: bool = False) -> int:
        """The ``at`` of a row of ``partition`` as of ``now_ms``: later than its last (of
        its tallies when ``tallied``)."""
        at = max(now_ms, self.last_at.get(partition, 0) + 1)
        self.last_at[partition] = at
        self.sent_at[partition] = now_ms
        if tallied:
            self.tallied_at[partition] = now_ms
        return at

    async def publish(self, rows: list[list[Any]]) -> None:
        """Write ``tick_rows``; if that fails, they are written again at the next tick."""
        if not rows:
            return
        try:
            await self.store.write_online(rows)
        except Exception as e:
            metrics.CLICKHOUSE_ERRORS.labels("insert").inc()
            now = time.monotonic()
            if now - self._tallies_failure_said >= 10:  # said once per 10 s, not per tick
                self._tallies_failure_said = now
                log.warning("could not write the online tallies (%s); next tick", e)
            for p in {row[1] for row in rows}:
                self.published.pop(p, None)
            return
        if self._on_flushed is not None:
            self._on_flushed([])  # the counter refreshes soon

    async def tick(self) -> None:
        await self.publish(self.tick_rows())


class Consumer:
    """Runs an ``Aggregator`` over a ``Source``: the loop, and the rebalance callbacks."""

    def __init__(
        self,
        source: Source,
        aggregator: Aggregator,
        settings: Settings,
        stopping: asyncio.Event | None = None,
    ) -> None:
        self.source = source
        self.aggregator = aggregator
        self.settings = settings
        self.stopping = stopping or asyncio.Event()
        self.lock = asyncio.Lock()
        # a write given up while stopping: what it held is re-read by the next process (from
        # the journal or Kafka); the stop goes on without waiting for more
        self.abandoned = False
        self._failing_since: float | None = None  # when writes began to fail, None if not
        self._write_waited_since: float | None = None  # the loop waits on a write since then

    async def start(self) -> None:
        await self.source.start(self.on_assign, self.on_revoke)

    # -- rebalance callbacks (aiokafka's coordinator task) ----------------------------------------
    async def on_assign(self, partitions: list[int]) -> None:
        # Hold the new partitions back until their state is rebuilt and their position set
        # (an optimisation only: records fetched before that are skipped by ``process``).
        self.source.pause(partitions)
        async with self.lock:
            try:
                await self._assign(partitions)
            except Exception as e:  # the broker or ClickHouse failed us: the loop tries again
                log.warning("assignment of %s failed (%r); retrying from the loop", partitions, e)
                self.aggregator.needs_reset.update(partitions)
            finally:
                self.source.resume(partitions)

    async def _assign(self, partitions: list[int]) -> None:
        agg, source = self.aggregator, self.source
        committed = await source.committed(partitions)
        resume = await agg.rebuild(partitions, committed, self.stopping.is_set, source.replaced)
        source.rebase({p: agg.bases[p] for p in partitions})
        await source.seek(resume)

    async def on_revoke(self, partitions: list[int]) -> None:
        """Write what is pending before giving partitions up (bounded); never commit what was
        not written."""
        async with self.lock:
            agg = self.aggregator
            if not agg.idle():
                offsets = await self._write_for(REVOKE_WRITE_SECONDS)
                if offsets is None:
                    log.warning("revoked with an unwritten batch: dropping it, will re-read")
                    agg.drop_batch()
                else:
                    await self._commit(offsets)
            agg.forget(partitions)

    # -- the loop -------------------------------------------------------------------------------
    async def run(self, drained: Callable[[], bool] = lambda: True) -> None:
        """Run until ``stopping`` is set and ``drained()`` says nothing more will arrive; the last
        batch is written before returning. Garbage collections run on timers meanwhile, not
        as objects are made (see gcpause)."""
        undo_full = gcpause.full_collections_every()
        undo_young = gcpause.young_collections_every()
        try:
            await self._run(drained)
        finally:
            undo_young()
            undo_full()

    async def _run(self, drained: Callable[[], bool]) -> None:
        agg, source, settings, stopping = (
            self.aggregator,
            self.source,
            self.settings,
            self.stopping,
        )
        last_tick = 0.0
        # the online tallies' write of the last tick: in the background (on the store's writing
        # thread, after any write of events already handed to it), one at a time
        publishing: asyncio.Future[None] | None = None
        while True:
            if (publishing is None or publishing.done()) and (
                time.monotonic() - last_tick >= settings.counter_interval_seconds
            ):
                last_tick = time.monotonic()
                async with self.lock:
                    rows = agg.tick_rows()
                if rows:
                    publishing = asyncio.ensure_future(agg.publish(rows))
            if agg.needs_reset:
                async with self.lock:
                    owned = set(source.assigned())
                    parts = sorted(agg.needs_reset & owned)
                    agg.forget(sorted(agg.needs_reset - owned))
                    if parts and agg.idle():
                        try:
                            await self._assign(parts)
                        except Exception as e:
                            log.warning("cannot rebuild %s yet (%r)", parts, e)
                            await asyncio.sleep(1)
            if agg.write_settled():
                # the background write is done: check it, commit it (this does not wait)
                await self._commit(await self._write_until_done(None, filling=False))
            stopping_now = stopping.is_set() and (drained() or self.abandoned)
            if stopping_now and self.abandoned:
                if publishing is not None:
                    with contextlib.suppress(Exception):
                        await publishing
                return
            records: list[InRecord] = []
            if not stopping_now:
                # not longer than half a tick: the ticks (the online tallies, the rows that say
                # a partition is counted) and a stop wait on it (a flush interval of a minute
                # held them 30 s when no beacon came)
                wait = min(settings.flush_interval_seconds, settings.counter_interval_seconds) / 2
                records = await source.fetch(wait, settings.flush_max_events)
            # (told at every fetch until the rebuild has moved it: said once)
            shrunk = [p for p in source.shrunk() if p in agg.states and p not in agg.needs_reset]
            if shrunk:
                log.warning("partitions %s: their log ends before this reads; rebuilding", shrunk)
                async with self.lock:
                    agg.needs_reset.update(shrunk)
            bad: list[tuple[InRecord, str]] = []
            if records:
                async with self.lock:
                    bad = agg.process(records)
                    gaps = agg.take_gaps()
                    if gaps:
                        await source.seek(gaps)
            if bad:
                await source.dead_letter([r for r, _ in bad], bad[0][1])
            if agg.due() or (stopping_now and not agg.idle()):
                if stopping_now or agg.needs_reset:
                    # write everything now: before stopping, or before a rebuild
                    limit = STOP_WRITE_SECONDS if stopping_now else None
                    await self._commit(await self._write_until_done(limit))
                else:
                    # Pipelined: the previous batch's write must be done and checked first
                    # (per partition, inserts land in log order); then this batch's starts in
                    # the background while the loop counts the next records.
                    if agg.writing is not None:
                        await self._commit(await self._write_until_done(None, filling=False))
                    async with self.lock:
                        if agg.writing is None and not agg.needs_reset and agg.due():
                            agg.begin_write()
            if stopping_now:
                if publishing is not None:
                    await publishing
                return

    async def _write_for(self, seconds: float) -> dict[int, int] | None:
        """Under the lock: try to write the batch for up to ``seconds``; None if it failed."""
        deadline = time.monotonic() + seconds
        backoff = 0.2
        while True:
            try:
                return await self.aggregator.write()
            except Exception as e:
                if time.monotonic() + backoff > deadline:
                    log.warning("ClickHouse write failed (%s); giving up", e)
                    return None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _write_until_done(
        self, limit: float | None, filling: bool = True
    ) -> dict[int, int] | None:
        """Write the pending batches (``Aggregator.write``; without ``filling``, only the one
        being written in the background), retrying with backoff while ClickHouse refuses it.
        Between attempts the lock is released (a rebalance may write or drop the batch
        meanwhile) and the partitions are paused but still polled, so the group keeps this
        member."""
        agg, source = self.aggregator, self.source
        deadline = None if limit is None else time.monotonic() + limit
        backoff = 0.2
        paused = False
        self._write_waited_since = time.monotonic()
        try:
            while True:
                async with self.lock:
                    if agg.idle() or (not filling and agg.writing is None):
                        self._failing_since = None  # nothing held back any more
                        return None  # written or dropped by a revoke meanwhile
                    try:
                        offsets = await agg.write(filling)
                        self._failing_since = None
                        return offsets
                    except Exception as e:
                        if self._failing_since is None:
                            self._failing_since = time.monotonic()
                        # every failed write counted here, whatever failed (a client that
                        # could not even be made: an outside audit saw 48 failed writes and
                        # 4 errors counted)
                        metrics.CLICKHOUSE_ERRORS.labels("insert").inc()
                        log.warning("ClickHouse write failed (%s); retrying in %.1fs", e, backoff)
                        if deadline is None and self.stopping.is_set():
                            # a stop began while the write was retried: bounded from here
                            deadline = time.monotonic() + STOP_WRITE_SECONDS
                        if deadline is not None and time.monotonic() > deadline:
                            log.error(
                                "stopping with an unwritten batch of %d rows (they are read "
                                "again at the next start)",
                                agg.pending_rows,
                            )
                            agg.drop_batch()
                            self.abandoned = self.stopping.is_set()
                            return None
                        if not paused:
                            source.pause(None)
                            paused = True
                fetched = await source.fetch(backoff, 1)
                if fetched:
                    async with self.lock:
                        await source.rewind(fetched)
                backoff = min(backoff * 2, 5.0)
        finally:
            self._write_waited_since = None
            if paused:
                async with self.lock:
                    source.resume(None)

    def write_waiting_seconds(self) -> float:
        """Seconds the loop has waited on a write (0 when it does not): it reads nothing
        meanwhile, so a silence of the broker then says nothing about the broker."""
        since = self._write_waited_since
        return 0.0 if since is None else time.monotonic() - since

    def writes_failing_seconds(self) -> float:
        """Seconds ClickHouse has refused the events' writes (0 while they succeed): the
        counter's numbers stop following the beacons meanwhile."""
        since = self._failing_since
        return 0.0 if since is None else time.monotonic() - since

    async def _commit(self, offsets: dict[int, int] | None) -> None:
        if not offsets:
            return
        started = time.monotonic()
        try:
            await self.source.commit(offsets)
            metrics.COMMIT_LATENCY.observe(time.monotonic() - started)
        except Exception as e:  # the resume point lives in ClickHouse; this is advisory
            log.info("offset commit failed: %s", e)
