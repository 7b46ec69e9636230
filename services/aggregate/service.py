"""``visitorstats aggregate``: the aggregate app factory (Kafka in, ClickHouse, counter out),
and the pieces ``visitorstats run`` reuses with the in-process log instead of Kafka."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from services import http, metrics
from services.aggregate import api
from services.aggregate.consume import Aggregator, Consumer
from services.aggregate.counter import (
    BEHIND_STALE_SECONDS,
    READS_FAILING_SECONDS,
    WRITES_FAILING_STALE_SECONDS,
    CounterService,
    first_set,
)
from services.aggregate.sources import KafkaSource, Source
from services.aggregate.store import Store
from services.settings import CannotStart, Settings, reason, redact
from services.sites import Registry

log = logging.getLogger(__name__)


# How often the room the embedded ClickHouse has reserved on its disk is read (``held``).
RESERVED_READ_SECONDS = 1.0


def add_aggregate(
    app: web.Application,
    settings: Settings,
    registry: Registry,
    source: Source,
    drained: Callable[[], bool] = lambda: True,
    held: Callable[[int], None] | None = None,
) -> None:
    """Wire the store, the counter and the consume loop into ``app``, each with its own
    cleanup context: on stop, the consume loop writes its last batch, then the counter stops,
    then the store closes. ``held``: told every second what the embedded ClickHouse has
    reserved on its disk (``Spool.hold`` of a journal on the same disk)."""
    store = Store(settings.clickhouse_url)
    counter = CounterService(
        store,
        registry,
        settings.counter_interval_seconds,
        topic=source.topic,
        silent=source.silent_seconds,
        behind=source.behind,
        others=source.others,
    )
    stopping = asyncio.Event()
    migrated = asyncio.Event()
    embedded = settings.clickhouse_url.startswith("chdb://")
    if embedded:  # its disk may not be the data directory's
        path = settings.clickhouse_url[len("chdb://") :] or "data/clickhouse"
        metrics.DISK_ROOM.watch("clickhouse", Path(path))
    not_migrated = "schema not applied yet"  # and why, until it is

    async def migrate() -> None:
        """A ClickHouse server may come up after this process (or be restarting): the schema is
        applied once it answers, and the service serves health, readiness and a counter that
        says it is not available meanwhile. An embedded one that fails to open will not open
        later: that fails the start."""
        nonlocal not_migrated
        backoff = 0.5
        while True:
            try:
                await store.migrate()
                break
            except Exception as e:
                if embedded:
                    raise
                if isinstance(e, CannotStart):  # reachable, but its tables need the operator
                    not_migrated = str(e)
                    log.error("%s; trying again in %.1fs", e, backoff)
                else:
                    not_migrated = f"schema not applied: {reason(e)}"
                    log.warning(
                        "cannot apply the schema to ClickHouse %s (%s); retrying in %.1fs",
                        redact(settings.clickhouse_url),
                        reason(e),
                        backoff,
                    )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
        migrated.set()

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        if embedded:
            await migrate()
            task = None
        else:
            task = asyncio.create_task(migrate(), name="migrate")
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.get_running_loop().run_in_executor(None, store.close)

    async def counter_ctx(app: web.Application) -> AsyncIterator[None]:
        await counter.refresh()
        task = asyncio.create_task(counter.run(stopping), name="counter")
        yield
        stopping.set()
        await task
        await counter.last_look()  # after the consumer's last write (cleanups run in reverse)

    async def consume_ctx(app: web.Application) -> AsyncIterator[None]:
        aggregator = Aggregator(
            store, registry, settings, source.topic, on_flushed=counter.note_flushed
        )
        consumer = Consumer(source, aggregator, settings, stopping)
        # a rebalance, or a rebuild (``run`` has no group, and rebuilds at start), reads no
        # partition: set here, where both are known, before the counter's first tick
        counter.rebalancing = lambda: max(
            source.rebalancing_seconds(), aggregator.rebuilding_seconds()
        )
        counter.writes_failing = consumer.writes_failing_seconds
        write_waiting.append(consumer.write_waiting_seconds)

        async def run() -> None:
            await first_set(migrated, stopping)
            backoff = 0.5
            while not stopping.is_set():
                try:
                    await consumer.start()
                    break
                except Exception as e:  # broker not there yet: keep serving the counter
                    log.warning("cannot start consuming (%s); retrying in %.1fs", e, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
            else:
                return
            await consumer.run(drained)

        task = asyncio.create_task(run(), name="consume")
        yield
        stopping.set()
        await task
        await source.stop()

    async def clickhouse_ready() -> tuple[bool, str]:
        if not await store.ping():
            return False, "ClickHouse unreachable"
        if not migrated.is_set():
            return False, not_migrated
        failing = counter.writes_failing()
        if failing > WRITES_FAILING_STALE_SECONDS:  # it answers, but takes no event
            return False, f"ClickHouse has refused the events' writes for {failing:.0f} s"
        failing = counter.reads_failing()
        if failing > READS_FAILING_SECONDS:  # it answers, but the counter reads nothing
            error = counter.read_error.splitlines()[0][:300] if counter.read_error else ""
            return False, f"the counter's reads have failed for {failing:.0f} s: {error}"
        return True, "ok"

    write_waiting: list[Callable[[], float]] = []  # the consumer's, once it is made

    async def source_ready() -> tuple[bool, str]:
        if not migrated.is_set():  # the consumer joins once ClickHouse has the schema
            return False, "not consuming until ClickHouse has the schema"
        ok, detail = source.ready()
        waited = max((f() for f in write_waiting), default=0.0)
        if not ok and waited > 0 and waited > source.silent_seconds() - 1:
            # no fetch goes out while the loop waits on a ClickHouse write (a hung server):
            # the silence is ClickHouse's, said by its own check
            return True, f"not reading while a ClickHouse write waits ({waited:.0f} s)"
        if (
            ok
            and counter.behind_seconds > BEHIND_STALE_SECONDS
            and counter.writes_failing() <= WRITES_FAILING_STALE_SECONDS  # else ClickHouse's
        ):
            return False, f"reading behind the log's end for {counter.behind_seconds:.0f} s"
        return ok, detail

    async def held_ctx(app: web.Application) -> AsyncIterator[None]:
        async def watch(tell: Callable[[int], None]) -> None:
            while not stopping.is_set():
                try:
                    tell(await store.reserved_bytes())
                except Exception as e:  # said by the counter's own reads if it persists
                    log.debug("cannot read ClickHouse's reserved room: %s", e)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), RESERVED_READ_SECONDS)

        task = None
        if held is not None and embedded:
            task = asyncio.create_task(watch(held), name="reserved")
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.cleanup_ctx.extend([store_ctx, counter_ctx, held_ctx, consume_ctx])
    http.add_ready_check(app, "clickhouse", clickhouse_ready)
    http.add_ready_check(app, "kafka" if isinstance(source, KafkaSource) else "log", source_ready)
    api.add_routes(app, counter, settings.stream_keepalive_seconds)


def create_aggregate_app(settings: Settings, registry: Registry) -> web.Application:
    if not settings.kafka_bootstrap:
        raise SystemExit("visitorstats aggregate needs VISITORSTATS_KAFKA_BOOTSTRAP")
    app = http.new_app(settings)
    http.hide_metrics(app, metrics.families(metrics.INGEST))
    source = KafkaSource(
        settings.kafka_bootstrap,
        settings.kafka_topic,
        settings.kafka_group,
        settings.kafka_dead_letter_topic,
    )
    add_aggregate(app, settings, registry, source)
    return app
