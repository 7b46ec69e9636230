"""The in-process figures, each run in a process of its own (``python -m bench.inproc KIND``)
so that nothing else lives in its heap: prints one JSON line.

* ``aggregate``: the aggregate service's consume path, one process — ``Consumer.run`` itself
  over an in-memory ``Source`` that hands out records as ingest publishes them, in fetches
  shaped as ``KafkaSource.fetch`` makes them (runs of one partition): decoded, counted by
  ``PartitionState`` and written per partition (one fenced INSERT each, then the check) into
  embedded ClickHouse (chDB), the writes in the background as the loop does, until the last
  batch is written and committed. Checked: rows stored = events, page views stored = human page
  views fed, every offset committed. Wall time and CPU time (the process's, and the main
  thread's). Baseline: the same rows, already in columns, inserted into a table of the same
  schema (the engine's floor through clickhouse-connect).
* ``memory``: bytes per online visitor an aggregate process holds at N online, measured with
  tracemalloc: its ``PartitionState`` (each visitor with one pageview, keys shaped as ingest
  makes them, so one remembered event id), which also keeps who is online (the tallies the
  counter reads from ClickHouse, a few rows per partition and site): the value per visitor,
  the timing wheel (reported apart too) and the tallies. Baseline: a plain ``dict`` of the
  32-character hex visitor keys to their time stamps, measured the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import os
import random
import time
import tracemalloc
import uuid
from operator import itemgetter
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from bench.deploy import sites_toml
from bench.wrkrun import BENCH_SITES

T0_MS = 1_780_000_000_000  # a fixed moment (2026-05-28), so every run counts the same days


def visitor_key(i: int) -> str:
    """A key shaped like ingest's (16 bytes of HMAC-SHA256, hex), one per ``i``."""
    return hashlib.blake2b(i.to_bytes(8, "big"), digest_size=16).hexdigest()


def make_events(n: int, visitors: int, seed: int = 7) -> list[Any]:
    from services.record import Event

    rnd = random.Random(seed)
    events = []
    for i in range(n):
        v = rnd.randrange(visitors)
        r = rnd.random()
        kind = "pageview" if r < 0.6 else ("heartbeat" if r < 0.95 else "leave")
        bot = rnd.random() < 0.02
        site = BENCH_SITES[v % len(BENCH_SITES)]
        events.append(
            Event(
                event_id=str(uuid.UUID(int=rnd.getrandbits(128), version=4)),
                site=site,
                type=kind,
                ts=T0_MS + i * 2,  # 500 events/s of event time
                visitor=visitor_key(v),
                visitor_prev=None,
                member=not bot and v % 10 == 0,
                bot=bot,
                url=f"https://{site}.example.vn/tin-tuc/{v % 50}/bai-viet-so-{i % 5000}.html",
                referrer="https://www.google.com/" if i % 3 == 0 else "",
                title=f"Tin tức {i % 5000} — Cổng thông tin điện tử",
            )
        )
    return events


def write_registry(workdir: Path) -> Any:
    from services.sites import Registry

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "sites.toml").write_text(sites_toml(), encoding="utf-8")
    return Registry.load(workdir / "sites.toml")


class _MemorySource:
    """A ``Source`` (sources.py) serving the log from memory, one fetch at a time, making each
    fetch's ``InRecord``s as ``KafkaSource.fetch`` does; commits are recorded."""

    topic = "bench"

    def __init__(self, fetches: list[list[tuple[int, int, bytes]]], partitions: int) -> None:
        self._fetches = fetches
        self._next = 0
        self._partitions = list(range(partitions))
        self.committed_offsets: dict[int, int] = {}

    def drained(self) -> bool:
        return self._next >= len(self._fetches)

    async def start(self, on_assign: Any, on_revoke: Any) -> None:
        await on_assign(self._partitions)

    async def fetch(self, timeout: float, max_records: int) -> list[Any]:
        from services.aggregate.sources import InRecord

        if self.drained():
            return []
        fetch = self._fetches[self._next]
        self._next += 1
        return [InRecord(p, offset, value) for p, offset, value in fetch]

    async def commit(self, offsets: dict[int, int]) -> None:
        self.committed_offsets.update(offsets)

    async def committed(self, partitions: list[int]) -> dict[int, int]:
        return {}

    async def seek(self, offsets: dict[int, int]) -> None:
        if any(offsets.values()):
            raise RuntimeError(f"the bench starts from an empty table, not at {offsets}")

    async def rewind(self, records: list[Any]) -> None:
        raise RuntimeError("a write failed during the bench")

    def assigned(self) -> list[int]:
        return self._partitions

    def pause(self, partitions: list[int] | None) -> None:
        return None

    def resume(self, partitions: list[int] | None) -> None:
        return None

    async def dead_letter(self, records: list[Any], reason: str) -> None:
        raise RuntimeError(f"dead letter in the bench: {reason}")

    async def stop(self) -> None:
        return None

    def ready(self) -> tuple[bool, str]:
        return (True, "memory")

    def silent_seconds(self) -> float:
        return 0.0

    def rebalancing_seconds(self) -> float:
        return 0.0

    def behind(self) -> int:
        return 0

    def others(self) -> list[int]:
        return []

    def rebase(self, bases: dict[int, int]) -> None:
        pass

    async def replaced(self, last: dict[int, tuple[int, str]]) -> dict[int, int]:
        return {}

    def shrunk(self) -> list[int]:
        return []


def _timed_aggregator() -> Any:
    from services.aggregate.consume import Aggregator
    from services.aggregate.sources import InRecord

    class TimedAggregator(Aggregator):
        """The Aggregator, summing the wall time of ``process`` (decode + count)."""

        counting = 0.0

        def process(self, records: list[InRecord]) -> list[tuple[InRecord, str]]:
            t0 = time.perf_counter()
            try:
                return super().process(records)
            finally:
                self.counting += time.perf_counter() - t0

    return TimedAggregator


async def aggregate(n: int, workdir: Path) -> dict[str, Any]:
    from services.aggregate.consume import Consumer
    from services.aggregate.store import EVENT_COLUMNS, Store
    from services.record import encode, record_key
    from services.settings import Settings

    _TimedAggregator = _timed_aggregator()
    registry = write_registry(workdir)
    settings = Settings.from_env({})
    store = Store(f"chdb://{workdir / 'clickhouse'}")
    await store.migrate()
    events = make_events(n, visitors=max(1000, n // 5))
    partitions = 4
    # The log, as (partition, offset, value): in production it lives in the broker, so the
    # timed loop makes each fetch's InRecords itself (as KafkaSource.fetch does), and the
    # process holds no more of the input than one fetch.
    log_records: list[tuple[int, int, bytes]] = []
    offsets = [0] * partitions
    for e in events:
        p = hash(record_key(e.site, e.visitor)) % partitions
        log_records.append((p, offsets[p], encode(e)))
        offsets[p] += 1
    human_pageviews = sum(1 for e in events if e.type == "pageview" and not e.bot)
    del events
    batch = settings.flush_max_events
    # What a fetch hands out (aiokafka's getmany, so KafkaSource.fetch): each batch's records
    # in runs of one partition, log order within each (a stable sort keeps it).
    fetches = [
        sorted(log_records[i : i + batch], key=itemgetter(0))
        for i in range(0, len(log_records), batch)
    ]
    del log_records
    source = _MemorySource(fetches, partitions)
    flushed: list[int] = []  # the service passes the counter's note_flushed
    aggregator = _TimedAggregator(store, registry, settings, "bench", on_flushed=flushed.extend)
    stopping = asyncio.Event()
    stopping.set()  # run() returns once the source is drained and the last batch written
    consumer = Consumer(source, aggregator, settings, stopping)
    await consumer.start()
    gc.collect()
    started = time.perf_counter()
    cpu_started, main_started = time.process_time(), time.thread_time()
    await consumer.run(drained=source.drained)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    main_cpu = time.thread_time() - main_started
    counting = aggregator.counting

    def check(c: Any) -> tuple[int, int]:
        rows = c.query("SELECT count(), sum(pageview) FROM events WHERE topic = 'bench'")
        count, pageviews = rows.result_rows[0]
        return int(count), int(pageviews)

    stored, pageviews = await store.run(check)

    # Baseline: the same rows, prepared as columns beforehand, inserted batch by batch.
    def copy_rows(c: Any) -> list[list[Any]]:
        c.command("CREATE TABLE IF NOT EXISTS events_floor AS events")
        result = c.query(
            f"SELECT {', '.join(EVENT_COLUMNS)} FROM events WHERE topic = 'bench' "
            "ORDER BY kafka_partition, kafka_offset"
        )
        return [list(col) for col in result.result_columns]

    columns = await store.run(copy_rows)

    def insert_floor(c: Any) -> float:
        t0 = time.perf_counter()
        for i in range(0, len(columns[0]), batch):
            c.insert(
                "events_floor",
                [col[i : i + batch] for col in columns],
                column_names=EVENT_COLUMNS,
                column_oriented=True,
            )
        return time.perf_counter() - t0

    floor_elapsed = await store.run(insert_floor)
    store.close()
    return {
        "events": n,
        "seconds": elapsed,
        "events_per_s": n / elapsed,
        "cpu_seconds": cpu,
        "main_thread_cpu_seconds": main_cpu,
        "cpu_us_per_event": cpu / n * 1e6,
        "decode_and_count_seconds": counting,
        "rest_seconds": elapsed - counting,
        "all_committed": source.committed_offsets == dict(enumerate(offsets)),
        "stored": stored,
        "pageviews_counted": pageviews,
        "pageviews_sent": human_pageviews,
        "baseline_seconds": floor_elapsed,
        "baseline_events_per_s": len(columns[0]) / floor_elapsed if floor_elapsed else 0.0,
    }


def memory(n: int) -> dict[str, Any]:
    import sys

    from services.aggregate.counting import PartitionState
    from services.record import Event

    tz = ZoneInfo("Asia/Ho_Chi_Minh")
    rnd = random.Random(11)

    def event(i: int) -> Event:
        return Event(
            event_id=str(uuid.UUID(int=rnd.getrandbits(128), version=4)),
            site=BENCH_SITES[i % len(BENCH_SITES)],
            type="pageview",
            ts=T0_MS + i // 10,
            visitor=visitor_key(i),
            visitor_prev=None,
            member=False,
            bot=False,
            url="https://bench-a.example.vn/",
            referrer="",
            title="",
        )

    tracemalloc.start()
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    windows = dict.fromkeys(BENCH_SITES, 300)
    state = PartitionState(0, max_visitors=n + 1, windows=windows)
    state.advance(T0_MS)
    for i in range(n):
        state.apply(event(i), tz, 0, i)
    state.advance(T0_MS + n // 10)  # the last event's second: every visitor still online
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    wheel = state._wheel
    wheel_bytes = sys.getsizeof(wheel) + sum(sys.getsizeof(keys) for keys in wheel.values())
    online = sum(g + m + b for g, m, b in state.tallies().values())
    assert online == len(state) == n, (online, len(state))
    del state, wheel
    gc.collect()

    before = tracemalloc.get_traced_memory()[0]
    plain: dict[str, int] = {}
    for i in range(n):
        plain[visitor_key(i)] = T0_MS + i // 10
    gc.collect()
    baseline = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return {
        "online": online,
        "bytes": held,
        "bytes_per_visitor": held / n,
        "wheel_bytes_per_visitor": wheel_bytes / n,
        "baseline_bytes_per_visitor": baseline / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=("aggregate", "memory"))
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--visitors", type=int, default=1_000_000)
    parser.add_argument(
        "--workdir", type=Path, help="where chDB keeps its data (aggregate; a new directory)"
    )
    args = parser.parse_args()
    if args.kind == "aggregate":
        if args.workdir is None:
            parser.error("aggregate needs --workdir")
        if (args.workdir / "clickhouse").exists():
            # the same events again: their stored progress makes the consumer skip them all
            parser.error(f"{args.workdir} was used by an earlier run: give a new --workdir")
        result = asyncio.run(aggregate(args.events, args.workdir))
    else:
        result = memory(args.visitors)
    result["pid"] = os.getpid()
    print("BENCH " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
