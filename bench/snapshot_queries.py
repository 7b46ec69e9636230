"""The counter's snapshot queries against a realistic table (``python -m bench.snapshot_queries``).

Fills a chDB path through ``Store.insert_events`` (as the consumer writes: one INSERT per
partition per batch) with ``--events`` events over ``--minutes`` minutes ending now, from
``--visitors`` visitors on ``--sites`` sites (pageviews, heartbeats, leaves; some members, some
bots); an ``Aggregator`` then takes the partitions over (rebuilt from the rows, timed) and
writes their online tallies, and ``Store.snapshot`` is timed ``--repeat`` times, then over
``--ticks`` ticks of new events counted and flushed by that aggregator. The online numbers are
checked against the one query over the rows (``ONLINE_BY_QUERY``). ``--keep PATH`` reuses (or
fills once) a path between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import tempfile
import time
import uuid
from datetime import UTC, date, datetime, timedelta

from services.aggregate.consume import Aggregator
from services.aggregate.counting import Row
from services.aggregate.online import ONLINE_BY_QUERY
from services.aggregate.sources import InRecord
from services.aggregate.store import Online, Store
from services.record import Event, encode
from services.settings import Settings
from services.sites import Registry

PARTITIONS = 4


def day_of(ts_ms: int) -> date:
    return (datetime.fromtimestamp(ts_ms / 1000, UTC) + timedelta(hours=7)).date()


def event_row(rnd: random.Random, keys: list[str], sites: int, ts: int, offsets: list[int]) -> Row:
    v = rnd.randrange(len(keys))
    key = keys[v]
    p = v % PARTITIONS
    r = rnd.random()
    typ = "pageview" if r < 0.5 else ("heartbeat" if r < 0.93 else "leave")
    ev = Event(
        str(uuid.UUID(int=rnd.getrandbits(128))),
        f"site-{v % sites}",
        typ,
        ts,
        key,
        None,
        v % 10 == 0 and rnd.random() < 0.9,
        v % 20 == 1,
        "https://example.vn/a",
        "",
        "",
    )
    offsets[p] += 1
    return Row(
        ev,
        key,
        typ == "pageview" and rnd.random() < 0.2,
        typ == "pageview",
        day_of(ts),
        p,
        offsets[p],
    )


async def insert(store: Store, rows: list[Row]) -> None:
    by_part: dict[int, list[Row]] = {}
    for row in rows:
        by_part.setdefault(row.partition, []).append(row)
    for part_rows in by_part.values():
        await store.insert_events(part_rows, "pageviews", str(uuid.uuid4()))


async def fill(store: Store, events: int, visitors: int, sites: int, minutes: int) -> None:
    rnd = random.Random(6)
    now = int(time.time() * 1000)
    start = now - minutes * 60_000
    step = (now - start) / events
    keys = [uuid.UUID(int=rnd.getrandbits(128)).hex for _ in range(visitors)]
    offsets = [0] * PARTITIONS
    batch = []
    for i in range(events):
        batch.append(event_row(rnd, keys, sites, int(start + i * step), offsets))
        if len(batch) >= 80_000:
            await insert(store, batch)
            batch = []
    await insert(store, batch)


def registry(sites: int) -> Registry:
    return Registry.parse(
        "".join(
            f'[sites.site-{s}]\ntimezone = "Asia/Ho_Chi_Minh"\nonline_window_seconds = 300\n'
            for s in range(sites)
        )
    )


async def ticks(
    agg: Aggregator,
    clock: list[float],
    windows: dict[str, int],
    today: date,
    n: int,
    rate: int,
    visitors: int,
    sites: int,
) -> list[float]:
    """``n`` ticks of 250 ms of (simulated) time: ``rate``/s new events, a tenth of them late
    (up to 5 s), counted and flushed by ``agg`` (rows and tallies), then its tick, then a
    snapshot, timed."""
    store = agg.store
    rnd = random.Random(n)
    keys = [uuid.UUID(int=random.Random(6).getrandbits(128)).hex for _ in range(visitors)]
    offsets = [agg.next_offset[p] - 1 for p in range(PARTITIONS)]
    per_tick = rate // 4
    times = []
    for _ in range(n):
        now_ms = int(clock[0] * 1000)
        records = []
        for j in range(per_tick):
            ts = now_ms + j * 250 // per_tick
            if rnd.random() < 0.1:
                ts -= rnd.randrange(5000)
            row = event_row(rnd, keys, sites, ts, offsets)
            records.append(InRecord(row.partition, row.offset, encode(row.event)))
        records.sort(key=lambda r: r.partition)
        agg.process(records)
        await agg.flush()
        clock[0] += 0.25
        await agg.tick()
        t0 = time.monotonic()
        await store.snapshot(windows, today, int(clock[0] * 1000), "pageviews")
        times.append(time.monotonic() - t0)
    return times


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=3_000_000)
    ap.add_argument("--visitors", type=int, default=400_000)
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--minutes", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--keep", default=None)
    ap.add_argument("--ticks", type=int, default=20)
    ap.add_argument("--rate", type=int, default=10_000)
    args = ap.parse_args()
    path = args.keep or tempfile.mkdtemp(prefix="snapq-")
    store = Store(f"chdb://{path}")
    try:
        t0 = time.monotonic()
        applied = await store.migrate()
        print(f"migrations applied: {applied} in {time.monotonic() - t0:.1f} s")
        n = await store.run(lambda c: c.command("SELECT count() FROM events"))
        if not n:
            t0 = time.monotonic()
            await fill(store, args.events, args.visitors, args.sites, args.minutes)
            print(f"filled {args.events} events in {time.monotonic() - t0:.1f} s")
        # the data was made relative to when it was filled: query as of its last event
        last = await store.run(
            lambda c: c.command("SELECT toUnixTimestamp64Milli(max(ts)) FROM events")
        )
        clock = [int(last) / 1000]
        windows = {f"site-{s}": 300 for s in range(args.sites)}
        today = day_of(int(last))  # the sites' day (Ho Chi Minh City) at the last event
        agg = Aggregator(
            store, registry(args.sites), Settings(), "pageviews", clock=lambda: clock[0]
        )
        t0 = time.monotonic()
        await agg.assign(list(range(PARTITIONS)))
        await agg.tick()
        print(f"partitions rebuilt from the rows in {time.monotonic() - t0:.1f} s")
        times = []
        snap = None
        for _ in range(args.repeat):
            t0 = time.monotonic()
            snap = await store.snapshot(windows, today, int(clock[0] * 1000), "pageviews")
            times.append(time.monotonic() - t0)
        assert snap is not None
        print(
            f"rows {n or args.events}; snapshot ms: " + " ".join(f"{t * 1000:.0f}" for t in times)
        )
        if args.ticks:
            tick_times = await ticks(
                agg, clock, windows, today, args.ticks, args.rate, args.visitors, args.sites
            )
            print(
                f"{args.ticks} ticks at {args.rate}/s, snapshot ms: "
                + " ".join(f"{t * 1000:.0f}" for t in tick_times)
                + f"; median {statistics.median(tick_times) * 1000:.0f}"
                + f", max {max(tick_times) * 1000:.0f}"
            )
        now_ms = int(clock[0] * 1000)
        snap = await store.snapshot(windows, today, now_ms, "pageviews")
        # the one query over the rows, for the time and the numbers
        sites = list(windows)
        params = {
            "since": now_ms - 300_000,
            "now": now_ms,
            "sites": sites,
            "windows": [windows[s] * 1000 for s in sites],
        }
        old_times = []
        for _ in range(args.repeat):
            t0 = time.monotonic()
            rows = await store.run(
                lambda c: c.query(ONLINE_BY_QUERY, parameters=params).result_rows
            )
            old_times.append(time.monotonic() - t0)
        print(
            "the one query over the rows, ms: "
            + " ".join(f"{t * 1000:.0f}" for t in old_times)
            + f"; median {statistics.median(old_times) * 1000:.0f}"
        )
        old = {s: Online(int(g), int(m), int(b)) for s, g, m, b in rows}
        assert all(snap.online.get(s, Online()) == old.get(s, Online()) for s in sites), (
            snap.online,
            old,
        )
        print("same online numbers as the query over the rows")
        print("online", {k: (o.guests, o.members, o.bots) for k, o in sorted(snap.online.items())})
        print("totals", dict(sorted(snap.totals.items())))
    finally:
        store.close()
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
