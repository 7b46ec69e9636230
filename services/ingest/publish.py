"""Handing accepted beacons on: to Kafka (batched, ``acks="all"``) or, in ``visitorstats run``
without a broker, to the in-process aggregate service.

A request is answered ``202`` only once its record is safe: acknowledged by the broker, written
to the on-disk spool (broker unreachable), or handed to the in-process aggregate service.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from aiokafka import AIOKafkaProducer

from services import metrics
from services.ingest.publish_types import OutRecord
from services.ingest.spool import Spool, SpoolFullError

log = logging.getLogger(__name__)


class Unavailable(Exception):
    """The record could not be made safe (broker down and spool full, or shutting down)."""


class Publisher(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def publish(self, record: OutRecord) -> None: ...
    def ready(self) -> tuple[bool, str]: ...


class LocalPublisher:
    """Standalone hand-off: the record goes straight to the in-process aggregate log."""

    def __init__(self, sink: Callable[[OutRecord], None]) -> None:
        self._sink = sink
        self._open = False

    async def start(self) -> None:
        self._open = True

    async def stop(self) -> None:
        self._open = False

    async def publish(self, record: OutRecord) -> None:
        if not self._open:
            raise Unavailable("shutting down")
        self._sink(record)
        metrics.BEACONS_PUBLISHED.inc()

    def ready(self) -> tuple[bool, str]:
        return (self._open, "ok" if self._open else "stopped")


class KafkaPublisher:
    """Collects records for ``linger_seconds`` and sends one batch per partition.

    Order per visitor is kept: a visitor's records go to one partition, in the order of
    acceptance, and while the spool holds anything, new records queue behind it.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        spool: Spool,
        linger_seconds: float = 0.002,
        max_pending: int = 20_000,
    ) -> None:
        self._topic = topic
        self._linger = linger_seconds
        self._spool = spool
        self._max_pending = max_pending
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            enable_idempotence=False,
            linger_ms=0,
            max_batch_size=1024 * 1024,
            request_timeout_ms=10_000,
            retry_backoff_ms=200,
        )
        self._pending: list[tuple[OutRecord, asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._partitions: list[int] = []
        self._broker_ok = False
        self._closing = False

    async def start(self) -> None:
        try:
            await asyncio.wait_for(self._producer.start(), 15)
            self._partitions = sorted(await self._producer.partitions_for(self._topic))
            self._broker_ok = bool(self._partitions)
        except Exception as e:  # broker unreachable at start: accept into the spool
            log.warning("Kafka not reachable at start (%s); spooling", e)
            self._broker_ok = False
        self._flusher = asyncio.create_task(self._flush_loop(), name="publish-flush")
        self._drainer = asyncio.create_task(self._drain_loop(), name="spool-drain")

    async def stop(self) -> None:
        """Flush what is pending (to Kafka, else to the spool), drain the spool while the
        broker answers, then close."""
        self._closing = True
        self._wakeup.set()
        if self._flusher:
            await self._flusher
        if self._drainer:
            self._drainer.cancel()
            await asyncio.gather(self._drainer, return_exceptions=True)
        if self._broker_ok and not self._spool.empty():
            await self._drain_once()
        await self._producer.stop()
        self._spool.close()

    def ready(self) -> tuple[bool, str]:
        if self._closing:
            return (False, "shutting down")
        if self._spool.full():
            return (False, "broker unreachable and spool full")
        return (True, "ok" if self._broker_ok else "broker unreachable; spooling")

    async def publish(self, record: OutRecord) -> None:
        if self._closing:
            raise Unavailable("shutting down")
        if len(self._pending) >= self._max_pending:
            raise Unavailable("too many beacons in flight")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((record, fut))
        if len(self._pending) == 1:
            self._wakeup.set()
        await fut

    async def _flush_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self._linger and not self._closing:
                await asyncio.sleep(self._linger)
            if self._pending:
                pending, self._pending = self._pending, []
                await self._flush(pending)
            if self._closing and not self._pending:
                return

    async def _flush(self, pending: list[tuple[OutRecord, asyncio.Future[None]]]) -> None:
        records = [r for r, _ in pending]
        if self._broker_ok and self._spool.empty():
            try:
                await self._send(records)
                now = time.monotonic()
                for rec, fut in pending:
                    metrics.PUBLISH_LATENCY.observe(now - rec.accepted_at)
                    if not fut.done():
                        fut.set_result(None)
                return
            except Exception as e:
                metrics.PUBLISH_ERRORS.inc()
                log.warning("publish failed (%s); spooling %d records", e, len(records))
                self._broker_ok = False
        # The broker is unreachable (or the spool is still draining): keep order, spool.
        try:
            self._spool.append(records)
        except SpoolFullError:
            for _, fut in pending:
                if not fut.done():
                    fut.set_exception(Unavailable("broker unreachable and spool full"))
            return
        for _, fut in pending:
            if not fut.done():
                fut.set_result(None)

    async def _send(self, records: list[OutRecord]) -> None:
        """Send records in batches per partition and wait for every acknowledgement."""
        n = len(self._partitions)
        batches: dict[int, list[OutRecord]] = {}
        for rec in records:
            batches.setdefault(self._partitions[rec.shard % n], []).append(rec)
        futures = []
        for partition, recs in batches.items():
            batch = self._producer.create_batch()
            for rec in recs:
                if batch.append(key=rec.key, value=rec.value, timestamp=None) is None:
                    futures.append(
                        await self._producer.send_batch(batch, self._topic, partition=partition)
                    )
                    batch = self._producer.create_batch()
                    batch.append(key=rec.key, value=rec.value, timestamp=None)
            futures.append(await self._producer.send_batch(batch, self._topic, partition=partition))
        await asyncio.wait_for(asyncio.gather(*futures), 30)
        metrics.BEACONS_PUBLISHED.inc(len(records))

    async def _drain_once(self) -> None:
        while not self._spool.empty():
            records = self._spool.peek(5000)
            await self._send(records)
            self._spool.pop(len(records))

    async def _drain_loop(self) -> None:
        """While the spool holds records, retry the broker with backoff and drain in order."""
        backoff = 0.2
        while True:
            if self._spool.empty() and self._broker_ok:
                await asyncio.sleep(0.2)
                continue
            try:
                if not self._partitions:
                    await asyncio.wait_for(self._producer.start(), 10)
                    self._partitions = sorted(await self._producer.partitions_for(self._topic))
                await self._drain_once()
                self._broker_ok = True
                backoff = 0.2
            except Exception as e:
                metrics.PUBLISH_ERRORS.inc()
                log.info("broker still unreachable (%s); retrying in %.1fs", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
