"""The consume loop: records -> counting rules -> one ClickHouse insert -> commit.

How exactly-once holds (see README, "Guarantees"):

1. Every stored row carries its (topic, partition, offset); one batch is one INSERT, which is
   one atomic part. So ClickHouse itself says how far each partition was counted, and on start
   or rebalance consumption resumes right after the last stored offset (``assign``).
2. The counting state (latest event per visitor, linked keys, recent event ids) is rebuilt from
   the partition's recent rows (``PartitionState.replay``), so decisions after a restart are the
   ones the dead process would have made.
3. A batch that failed to insert is retried unchanged, with the same insert-deduplication
   token, so an insert that did land but whose answer was lost is not counted again.
4. Offsets are committed to Kafka only after the insert returned (for lag and for tools); the
   resume point never depends on that commit.
5. On revoke, the pending batch is written before the partition is given up; if it cannot be,
   the batch is dropped (nothing committed) and every partition is re-read from ClickHouse's
   resume point.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services import metrics
from services.aggregate.counting import PartitionState, Row
from services.aggregate.sources import InRecord, Source
from services.aggregate.store import Store, batch_token
from services.record import RecordError, decode
from services.settings import Settings
from services.sites import Registry

log = logging.getLogger(__name__)


@dataclass
class Batch:
    rows: list[Row] = field(default_factory=list)
    spans: dict[int, list[int]] = field(default_factory=dict)  # partition -> [first, last]
    started: float = 0.0
    token: str | None = None  # fixed at the first insert attempt; retries reuse it

    def __len__(self) -> int:
        return len(self.rows)

    def empty(self) -> bool:
        return not self.spans


class Aggregator:
    def __init__(
        self,
        store: Store,
        registry: Registry,
        settings: Settings,
        topic: str,
        on_flushed: Callable[[list[int]], None] | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.settings = settings
        self.topic = topic
        self.states: dict[int, PartitionState] = {}
        self.batch = Batch()
        self.needs_reset = False
        self._on_flushed = on_flushed

    def _new_state(self, partition: int) -> PartitionState:
        return PartitionState(
            partition,
            visit_timeout_s=self.settings.visit_timeout_seconds,
            dedup_horizon_s=self.settings.dedup_horizon_seconds,
            max_visitors=self.settings.max_visitors_per_partition,
        )

    async def assign(self, partitions: list[int]) -> dict[int, int]:
        """Rebuild the state of newly owned partitions from ClickHouse; return where to resume.
        Retries until ClickHouse answers: counting without the state would count wrong."""
        horizon_ms = 1000 * max(
            self.settings.visit_timeout_seconds, self.settings.dedup_horizon_seconds
        )
        backoff = 0.2
        while True:
            try:
                offsets = await self.store.next_offsets(self.topic)
                for p in partitions:
                    state = self._new_state(p)
                    for event, visitor in await self.store.recent_rows(self.topic, p, horizon_ms):
                        state.replay(event, visitor)
                    self.states[p] = state
                log.info("assigned partitions %s; resuming at %s", partitions, offsets)
                return {p: offsets[p] for p in partitions if p in offsets}
            except Exception as e:
                metrics.CLICKHOUSE_ERRORS.labels("rebuild").inc()
                log.warning("cannot rebuild state (%s); retrying in %.1fs", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def revoke(self, partitions: list[int]) -> None:
        """Write what is pending before giving partitions up; never commit what was not
        written."""
        if not self.batch.empty():
            try:
                await asyncio.wait_for(self._write(), 20)
            except Exception as e:
                log.warning("revoked with an unwritten batch (%s): dropping it, will re-read", e)
                self.batch = Batch()
                self.needs_reset = True
        for p in partitions:
            self.states.pop(p, None)
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(str(p))

    def process(self, records: list[InRecord]) -> list[tuple[InRecord, str]]:
        """Apply the counting rules to records in log order; return the undecodable ones."""
        bad: list[tuple[InRecord, str]] = []
        batch = self.batch
        if batch.empty():
            batch.started = time.monotonic()
        sites = self.registry.sites
        for rec in records:
            state = self.states.get(rec.partition)
            if state is None:
                # Not ours, or its state is not rebuilt yet: never count it without state.
                # Re-reading from ClickHouse's resume point picks it up if it is ours.
                self.needs_reset = True
                continue
            span = batch.spans.get(rec.partition)
            if span is None:
                batch.spans[rec.partition] = [rec.offset, rec.offset]
            else:
                span[1] = rec.offset
            try:
                event = decode(rec.value)
            except RecordError as e:
                bad.append((rec, str(e)))
                continue
            site = sites.get(event.site)
            if site is None:
                bad.append((rec, f"unknown site {event.site!r}"))
                continue
            row = state.apply(event, site.tz, rec.partition, rec.offset)
            if row is None:
                metrics.EVENTS_COUNTED.labels("duplicate").inc()
                continue
            batch.rows.append(row)
        metrics.EVENTS_CONSUMED.inc(len(records))
        return bad

    def due(self) -> bool:
        b = self.batch
        return not b.empty() and (
            len(b) >= self.settings.flush_max_events
            or time.monotonic() - b.started >= self.settings.flush_interval_seconds
        )

    async def _write(self) -> dict[int, int]:
        batch = self.batch
        if batch.token is None:
            batch.token = batch_token(self.topic, ((p, a, b) for p, (a, b) in batch.spans.items()))
        if batch.rows:
            await self.store.insert_events(batch.rows, self.topic, batch.token)
        self.batch = Batch()
        counted_visits = sum(r.starts_visit for r in batch.rows)
        counted_pv = sum(r.pageview for r in batch.rows)
        metrics.EVENTS_COUNTED.labels("visit").inc(counted_visits)
        metrics.EVENTS_COUNTED.labels("pageview").inc(counted_pv)
        if self._on_flushed is not None and batch.rows:
            step = max(1, len(batch.rows) // 500)
            self._on_flushed([r.event.ts for r in batch.rows[::step]])
        for state in self.states.values():
            state.expire()
        return {p: last + 1 for p, (_, last) in batch.spans.items()}

    async def flush(self) -> dict[int, int]:
        """Write the pending batch; return the offsets to commit. Raises if ClickHouse fails
        (the batch is kept, unchanged, for the retry)."""
        return await self._write()


async def consume(
    source: Source,
    aggregator: Aggregator,
    settings: Settings,
    stopping: asyncio.Event,
    drained: Callable[[], bool] = lambda: True,
) -> None:
    """Run until ``stopping`` is set and ``drained()`` says nothing more will arrive; the last
    batch is written before returning."""

    async def write_and_commit() -> None:
        backoff = 0.2
        paused = False
        offsets: dict[int, int] = {}
        while True:
            try:
                offsets = await aggregator.flush()
                break
            except Exception as e:
                log.warning("ClickHouse write failed (%s); retrying in %.1fs", e, backoff)
                if not paused:
                    source.pause()
                    paused = True
                # Keep polling (paused: returns nothing) so the group does not evict us.
                await source.fetch(backoff, 1)
                backoff = min(backoff * 2, 5.0)
                if aggregator.batch.empty():
                    break  # revoked meanwhile: the batch was written or dropped there
        if paused:
            source.resume()
        if offsets:
            started = time.monotonic()
            try:
                await source.commit(offsets)
                metrics.COMMIT_LATENCY.observe(time.monotonic() - started)
            except Exception as e:  # the resume point lives in ClickHouse; this is advisory
                log.info("offset commit failed: %s", e)

    while True:
        if aggregator.needs_reset:
            aggregator.needs_reset = False
            owned = source.assigned()
            await source.seek(await aggregator.assign(owned))
        stopping_now = stopping.is_set() and drained()
        if stopping_now:
            records = []
        else:
            records = await source.fetch(
                settings.flush_interval_seconds / 2, settings.flush_max_events
            )
        if records:
            bad = aggregator.process(records)
            if bad:
                await source.dead_letter([r for r, _ in bad], bad[0][1])
        if aggregator.due() or (stopping_now and not aggregator.batch.empty()):
            await write_and_commit()
        if stopping_now:
            return
