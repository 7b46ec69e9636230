"""Handing accepted beacons on: to Kafka (batched, ``acks="all"``) or, in ``visitorstats run``
without a broker, to the in-process aggregate service.

A request is answered ``202`` only once its record is safe: written to the on-disk spool (by
default, ``VISITORSTATS_PUBLISH_ACK=spool``: ``SpoolFirstPublisher``), acknowledged by the
broker (``VISITORSTATS_PUBLISH_ACK=broker``: ``KafkaPublisher``, which spools while the broker
is unreachable), or handed to the in-process aggregate service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer

from services import metrics
from services.ingest.publish_types import OutRecord
from services.ingest.spool import Spool, SpoolFullError

log = logging.getLogger(__name__)

ORPHAN_SCAN_SECONDS = 10.0  # how often a publisher looks for spools nobody claimed
_SPOOL_FULL = "broker unreachable and spool full"
_JOURNAL_FULL = "the journal on disk is full"


class Unavailable(Exception):
    """The record could not be made safe (broker down and spool full, or shutting down)."""


# Called once a record is safe (``None``) or could not be made safe (``Unavailable``).
Done = Callable[[BaseException | None], None]


class Publisher(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def submit(self, record: OutRecord, done: Done) -> None: ...
    def ready(self) -> tuple[bool, str]: ...


async def publish(publisher: Publisher, record: OutRecord) -> None:
    """Submit ``record`` and wait until it is safe (raises ``Unavailable`` if it cannot be)."""
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    publisher.submit(record, partial(_settle_future, fut))
    await fut


def _settle_future(fut: asyncio.Future[None], exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


class LocalPublisher:
    """Standalone hand-off: the record goes straight to the in-process aggregate log."""

    def __init__(self, sink: Callable[[OutRecord], None], journal: Spool | None = None) -> None:
        self._sink = sink
        self._journal = journal
        self._open = False
        # the records handed on since the loop last ran ``_count``: one ``inc`` per counter
        # for all of them (a prometheus_client ``inc`` takes a lock: four per beacon cost
        # ~1.7 µs of a beacon's ~27, ``python -m bench.lane``), and their publish latencies
        self._uncounted: list[OutRecord] = []

    async def start(self) -> None:
        self._open = True

    async def stop(self) -> None:
        self._open = False
        self._count()

    def submit(self, record: OutRecord, done: Done) -> None:
        """Done at once: the record is in the in-process log (and its journal on disk)."""
        if not self._open:
            raise Unavailable("shutting down")
        try:
            self._sink(record)
        except SpoolFullError:
            raise Unavailable(_JOURNAL_FULL) from None
        except OSError:  # the disk refused it (said and timed by the journal): not taken
            raise Unavailable("the journal on disk cannot be written") from None
        if not self._uncounted:
            asyncio.get_running_loop().call_soon(self._count)
        self._uncounted.append(record)
        done(None)

    def _count(self) -> None:
        """Count what was handed on: beacons published, their sites' counters, and their
        publish latency (accepted -> in the journal, as the loop saw it)."""
        uncounted, self._uncounted = self._uncounted, []
        if uncounted:
            now = time.monotonic()
            metrics.BEACONS_PUBLISHED.inc(len(uncounted))
            metrics.count_safe([r.counters for r in uncounted])
            metrics.observe_many(metrics.PUBLISH_LATENCY, [now - r.accepted_at for r in uncounted])

    def ready(self) -> tuple[bool, str]:
        if not self._open:
            return (False, "stopped")
        refusal = None if self._journal is None else self._journal.refusal(_JOURNAL_FULL)
        return (False, refusal) if refusal is not None else (True, "ok")


class KafkaPublisher:
    """``VISITORSTATS_PUBLISH_ACK=broker``: collects records for ``linger_seconds`` and sends
    one batch per partition.

    Two paths, never both at once for the same records, so that order per visitor holds (a
    visitor's records go to one partition, in the order of acceptance):

    * **direct**: while the broker answers and the spool is empty, a flush is sent and every
      record acknowledged (``acks="all"``) before its request is answered;
    * **spooled**: once a send fails or times out (``ack_timeout_seconds``), the flush and every
      later one go to the on-disk spool, behind what is already there. The drain loop sends the
      spool oldest first and switches back to direct only when the spool is empty, so new
      records never overtake spooled ones. A record whose send timed out may still arrive from
      the producer's own queue and again from the spool: a duplicate ``event_id``, which the
      aggregate service counts once.

    A producer whose start failed (broker down when ingest started) is thrown away and a fresh
    one started by the drain loop: aiokafka's clients are not meant to be started twice.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        spool: Spool,
        linger_seconds: float = 0.002,
        max_pending: int = 20_000,
        ack_timeout_seconds: float = 10.0,
    ) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._linger = linger_seconds
        self._spool = spool
        self._max_pending = max_pending
        self._ack_timeout = ack_timeout_seconds
        self._producer: AIOKafkaProducer | None = None
        self._pending: list[tuple[OutRecord, Done]] = []
        self._wakeup = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._adopter: asyncio.Task[None] | None = None
        # the batch of a spool on its way to the broker: a stop lets it finish (it is
        # forgotten once acknowledged), not cancelled after the broker took it and sent again
        self._in_flight: set[asyncio.Future[None]] = set()
        self._partitions: list[int] = []
        self._broker_ok = False
        self._closing = False

    async def start(self) -> None:
        try:
            await self._connect(15)
        except Exception as e:  # broker unreachable at start: accept into the spool
            log.warning("Kafka not reachable at start (%s); spooling", e)
        self._start_tasks()
        self._adopter = asyncio.create_task(self._adopt_loop(), name="spool-adopt")

    def _start_tasks(self) -> None:
        """Once the first connection was tried: the tasks that publish."""
        self._broker_ok = self._producer is not None and self._spool.empty()
        self._flusher = asyncio.create_task(self._flush_loop(), name="publish-flush")
        self._drainer = asyncio.create_task(self._drain_loop(), name="spool-drain")

    async def _connect(self, timeout: float) -> AIOKafkaProducer:
        if self._producer is not None:
            return self._producer
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            acks="all",
            enable_idempotence=False,
            linger_ms=0,
            max_batch_size=1024 * 1024,
            request_timeout_ms=10_000,
            retry_backoff_ms=200,
        )
        try:
            async with asyncio.timeout(timeout):
                await producer.start()
                partitions = sorted(await producer.partitions_for(self._topic))
            if not partitions:
                raise RuntimeError(f"topic {self._topic!r} has no partitions")
        except BaseException:
            await _close(producer)
            raise
        self._partitions = partitions
        self._producer = producer
        return producer

    async def stop(self) -> None:
        """Flush what is pending (to Kafka, else to the spool), drain the spool while the
        broker answers, then close. What the broker does not take stays in the spool on disk
        and is sent by the next process that claims it."""
        self._closing = True
        self._wakeup.set()
        if self._flusher:
            await self._flusher
        for task in (self._drainer, self._adopter):
            if task:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        if not self._spool.empty():
            try:
                # while the broker answers, drain it all; if it is away, do not hold the stop
                # up for long: the spool waits on disk for the next process
                async with asyncio.timeout(None if self._broker_ok else 5):
                    await self._connect(5)
                    await self._drain(self._spool)
            except Exception as e:
                log.warning("stopping with %d records left in the spool (%r)", len(self._spool), e)
        if self._producer is not None:
            await _close(self._producer)
        self._spool.close()

    def ready(self) -> tuple[bool, str]:
        if self._closing:
            return (False, "shutting down")
        refusal = self._spool.refusal(_SPOOL_FULL)
        if refusal is not None:
            return (False, refusal)
        return (True, "ok" if self._broker_ok else "broker unreachable; spooling")

    def submit(self, record: OutRecord, done: Done) -> None:
        """Queue ``record`` for the next flush; ``done`` is called once it is safe (or with
        ``Unavailable``). Raises ``Unavailable`` at once when no more can be taken now."""
        if self._closing:
            raise Unavailable("shutting down")
        if len(self._pending) >= self._max_pending:
            raise Unavailable("too many beacons in flight")
        self._pending.append((record, done))
        if len(self._pending) == 1:
            self._wakeup.set()

    async def _flush_loop(self) -> None:
        """One flush at a time (order per partition). ``linger_seconds`` gathers a batch only
        when the pipe was idle: records that arrived during a flush have waited already and go
        out as soon as it is done."""
        waited = False
        while True:
            if not waited:
                await self._wakeup.wait()
                self._wakeup.clear()
                if self._linger and not self._closing:
                    await asyncio.sleep(self._linger)
            if self._pending:
                pending, self._pending = self._pending, []
                await self._flush(pending)
            waited = bool(self._pending)
            if waited:
                self._wakeup.clear()
            if self._closing and not self._pending:
                return

    async def _flush(self, pending: list[tuple[OutRecord, Done]]) -> None:
        records = [r for r, _ in pending]
        if self._broker_ok and self._spool.empty():
            try:
                await self._send(records)
                now = time.monotonic()
                metrics.observe_many(
                    metrics.PUBLISH_LATENCY, [now - r.accepted_at for r in records]
                )
                metrics.count_safe([r.counters for r in records])
                _tell(pending, None)
                return
            except Exception as e:
                metrics.PUBLISH_ERRORS.inc()
                log.warning("publish failed (%r); spooling %d records", e, len(records))
                self._broker_ok = False
        # The broker is unreachable (or the spool is still draining): keep order, spool.
        try:
            self._spool.append(records)
        except SpoolFullError:
            _tell(pending, Unavailable(_SPOOL_FULL))
            return
        except OSError:  # the disk refused the write (said by the spool): nothing made safe
            _tell(pending, Unavailable("broker unreachable and the spool cannot be written"))
            return
        metrics.count_safe([r.counters for r in records])
        _tell(pending, None)

    async def _send(self, records: list[OutRecord]) -> None:
        """Send records in batches per partition and wait for every acknowledgement, at most
        ``ack_timeout_seconds``. The delivery futures are waited on, never cancelled."""
        producer = self._producer
        if producer is None:
            raise ConnectionError("no producer")
        n = len(self._partitions)
        batches: dict[int, list[OutRecord]] = {}
        for rec in records:
            batches.setdefault(self._partitions[rec.shard % n], []).append(rec)
        futures: list[asyncio.Future[Any]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._ack_timeout
        async with asyncio.timeout_at(deadline):
            for partition, recs in batches.items():
                batch = producer.create_batch()
                for rec in recs:
                    if batch.append(key=rec.key, value=rec.value, timestamp=None) is None:
                        futures.append(
                            await producer.send_batch(batch, self._topic, partition=partition)
                        )
                        batch = producer.create_batch()
                        batch.append(key=rec.key, value=rec.value, timestamp=None)
                futures.append(await producer.send_batch(batch, self._topic, partition=partition))
        for f in futures:
            f.add_done_callback(_retrieve)
        done, not_done = await asyncio.wait(futures, timeout=max(0.0, deadline - loop.time()))
        if not_done:
            raise TimeoutError(f"{len(not_done)} batches not acknowledged in time")
        for f in done:
            f.result()
        metrics.BEACONS_PUBLISHED.inc(len(records))

    async def _adopt_loop(self) -> None:
        """Every ``ORPHAN_SCAN_SECONDS``, ship the spools that no living process claimed (their
        process is gone and was not replaced), then let them go. One the broker does not take
        now is let go too, and taken again at a later scan."""
        while True:
            for orphan in Spool.orphans(self._spool.root):
                try:
                    log.warning("shipping %d records left by a process that is gone", len(orphan))
                    await self._connect(10)
                    await self._drain(orphan)
                except Exception as e:
                    log.info("a spool left behind waits for the broker (%r)", e)
                finally:
                    orphan.close()
            await asyncio.sleep(ORPHAN_SCAN_SECONDS)

    async def _drain(self, spool: Spool) -> None:
        """Send everything ``spool`` holds, oldest first, forgetting it as it is acknowledged."""
        while not spool.empty():
            await self._send_then_forget(spool, 5000)

    async def _send_then_forget(self, spool: Spool, n: int) -> None:
        """Send the oldest ``n`` records of ``spool`` and forget them once acknowledged; the
        tasks that call this may be cancelled (a stop), the batch is not (``_in_flight``)."""
        records = spool.peek(n)

        async def send() -> None:
            await self._send(records)
            spool.pop(len(records))

        batch = asyncio.ensure_future(send())
        self._in_flight.add(batch)
        batch.add_done_callback(self._in_flight.discard)
        batch.add_done_callback(_retrieve)  # its caller may be gone (cancelled by a stop)
        await asyncio.shield(batch)

    async def _drain_loop(self) -> None:
        """While the spool holds records, retry the broker with backoff and drain in order;
        go back to direct sends only once it is empty."""
        backoff = 0.2
        while True:
            metrics.SPOOL_OLDEST.set(self._spool.oldest_age())
            if self._spool.empty() and self._broker_ok:
                await asyncio.sleep(0.2)
                continue
            backoff = await self._attempt(lambda: self._drain(self._spool), backoff)

    async def _attempt(self, step: Callable[[], Awaitable[None]], backoff: float) -> float:
        """Run ``step`` against the broker once (connecting first); the backoff for the next
        attempt: 0.2 s after a success, doubled up to 5 s after a failure (waited here)."""
        try:
            await self._connect(10)
            await step()
        except Exception as e:
            metrics.PUBLISH_ERRORS.inc()
            if self._broker_ok:
                log.warning("publish failed (%r); spooling", e)
            else:
                log.info("broker still unreachable (%r); retrying in %.1fs", e, backoff)
            self._broker_ok = False
            await asyncio.sleep(backoff)
            return min(backoff * 2, 5.0)
        self._broker_ok = True
        return 0.2


class SpoolFirstPublisher(KafkaPublisher):
    """``VISITORSTATS_PUBLISH_ACK=spool`` (the default): a request is answered once its record
    is in the on-disk spool, and the spool is shipped to Kafka behind the answers.

    * **write-ahead**: the records submitted while the event loop handles one round of I/O are
      appended to the spool with one ``write()``, and their requests answered. The spool
      survives a crash of the process (the next one claims it and ships it first), not a power
      loss of the machine: for the ~``linger_seconds`` until the broker has a record, it is on
      one disk only (no fsync), where ``acks="all"`` before the answer would have it on the
      broker's replicas.
    * **ship**: one task sends the spool oldest first, in batches per partition, at most every
      ``linger_seconds`` (records gather meanwhile: fewer, larger batches for the broker), waits
      for every acknowledgement and only then forgets them. While the broker is away it retries
      with backoff and the spool grows, up to its size; then beacons are refused (``503``).

    Order per visitor holds within one process. Across processes it does not: a reader's next
    beacon, answered by another process, may reach the broker first. The aggregate service
    takes a visitor's events by their time of acceptance, to the microsecond (the record's
    ``ts_us``): who is online follows the latest, and a late first page view still begins its
    visit (README "Guarantees").
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        spool: Spool,
        linger_seconds: float = 0.02,
        max_pending: int = 20_000,
        ack_timeout_seconds: float = 10.0,
        ship_max_records: int = 10_000,
    ) -> None:
        super().__init__(bootstrap, topic, spool, linger_seconds, max_pending, ack_timeout_seconds)
        self._ship_max = ship_max_records
        self._shippable = asyncio.Event()  # set once the spool holds records
        self._loop: asyncio.AbstractEventLoop | None = None

    def _start_tasks(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._broker_ok = self._producer is not None
        if not self._spool.empty():
            self._shippable.set()  # what a previous process left: shipped first
        self._drainer = asyncio.create_task(self._ship_loop(), name="spool-ship")

    async def stop(self) -> None:
        self._closing = True
        self._write_ahead()
        await super().stop()  # stops the ship loop, ships the rest while the broker answers

    def submit(self, record: OutRecord, done: Done) -> None:
        """Queue ``record`` for the spool; ``done`` is called once it is there (or with
        ``Unavailable``), after the event loop's current round of I/O."""
        if self._closing:
            raise Unavailable("shutting down")
        if self._loop is None:
            raise Unavailable("not started")
        if len(self._pending) >= self._max_pending:
            raise Unavailable("too many beacons in flight")
        self._pending.append((record, done))
        if len(self._pending) == 1:
            self._loop.call_soon(self._write_ahead)

    def _write_ahead(self) -> None:
        """Append everything pending to the spool with one write, and answer it."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        records = [r for r, _ in pending]
        try:
            self._spool.append(records)
        except SpoolFullError:
            _tell(pending, Unavailable(_SPOOL_FULL))
            return
        except OSError:  # the disk refused the write (said by the spool): nothing made safe
            _tell(pending, Unavailable("the spool cannot be written"))
            return
        metrics.count_safe([r.counters for r in records])
        _tell(pending, None)
        self._shippable.set()

    async def _ship_loop(self) -> None:
        """Ship the spool for as long as the process lives: a batch at most every
        ``linger_seconds`` while it holds records; with backoff while the broker is away."""
        loop = asyncio.get_running_loop()
        backoff = 0.2
        while True:
            metrics.SPOOL_OLDEST.set(self._spool.oldest_age())
            if self._spool.empty():
                self._shippable.clear()
                await self._shippable.wait()
            started = loop.time()
            backoff = await self._attempt(self._ship_batch, backoff)
            if self._broker_ok:
                # records that came meanwhile gather until the next batch is due
                await asyncio.sleep(max(0.0, started + self._linger - loop.time()))

    async def _ship_batch(self) -> None:
        """Send the oldest records of the spool, then forget them."""
        records = self._spool.peek(self._ship_max)
        await self._send_then_forget(self._spool, self._ship_max)
        now = time.monotonic()
        metrics.observe_many(metrics.PUBLISH_LATENCY, [now - r.accepted_at for r in records])


async def _close(producer: AIOKafkaProducer) -> None:
    """Stop a producer; if the broker does not answer (its queue cannot be flushed), close its
    connections anyway: what it held is in the spool."""
    try:
        await asyncio.wait_for(producer.stop(), 5)
    except Exception as e:
        log.warning("producer did not stop cleanly (%r); closing its connections", e)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.client.close(), 5)


def _tell(pending: list[tuple[OutRecord, Done]], exc: BaseException | None) -> None:
    """Call every record's ``done``; one that fails (a connection gone) does not stop the
    others."""
    for _, done in pending:
        try:
            done(exc)
        except Exception:
            log.exception("answering a published beacon failed")


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a delivery future's outcome as seen (a late failure is already handled)."""
    if not future.cancelled():
        future.exception()
