"""The counter's incremental online tally (online.py) gives exactly the numbers of the one query
over the whole window it replaced, on random event streams: late rows, rows older than the
window, rows from the future, leaves, members, bots, two windows, the clock stepping back, and
``now`` falling exactly on the edges of a window. Real chDB, no mocks."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from services.aggregate.counting import Row
from services.aggregate.migrate import migrations, render, schema_migrations_ddl
from services.aggregate.online import BUCKET_MS, COUNTS_QUERY, ONLINE_BY_QUERY
from services.aggregate.store import Online, Store
from services.record import Event

WINDOWS = {"long": 300, "short": 60, "other": 300}
T0 = 1_772_600_000_000  # ms


class Stream:
    """Random events of a few visitors; each visitor stays in one partition, as ingest keys
    them, and each partition's offsets grow, so (ts, offset) orders a visitor's rows."""

    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.visitors = [(self.rnd.choice(list(WINDOWS)), f"v{i}") for i in range(40)]
        self.offsets = [0, 0, 0]
        self.last_ts: list[int] = []

    def rows(self, now_ms: int, n: int) -> list[Row]:
        rnd = self.rnd
        out = []
        for _ in range(n):
            site, visitor = rnd.choice(self.visitors)
            shape = rnd.random()
            if shape < 0.7:
                ts = now_ms - rnd.randrange(2_000)  # just now
            elif shape < 0.85:
                ts = now_ms - rnd.randrange(400_000)  # late, possibly beyond every window
            elif shape < 0.9:
                ts = now_ms + rnd.randrange(5_000)  # a clock ahead of ours
            elif self.last_ts:
                ts = rnd.choice(self.last_ts)  # the same ms as another row
            else:
                ts = now_ms
            self.last_ts.append(ts)
            kind = rnd.choices(["pageview", "heartbeat", "leave"], [5, 4, 2])[0]
            p = int(visitor[1:]) % 3
            self.offsets[p] += 1
            event = Event(
                str(uuid.UUID(int=rnd.getrandbits(128))), site, kind, ts, visitor, None,
                rnd.random() < 0.3, rnd.random() < 0.1, "https://x.example.vn/", "", "",
            )  # fmt: skip
            day = datetime.fromtimestamp(ts / 1000, UTC).date()
            out.append(Row(event, visitor, False, kind == "pageview", day, p, self.offsets[p]))
        return out


async def insert(store: Store, rows: list[Row]) -> None:
    for p in range(3):
        part = [r for r in rows if r.partition == p]
        if part:
            await store.insert_events(part, "t", str(uuid.uuid4()))


async def by_query(store: Store, windows: dict[str, int], now_ms: int) -> dict[str, Online]:
    sites = list(windows)
    params: dict[str, Any] = {
        "since": now_ms - max(windows.values()) * 1000,
        "now": now_ms,
        "sites": sites,
        "windows": [windows[s] * 1000 for s in sites],
    }
    rows = await store.run(lambda c: c.query(ONLINE_BY_QUERY, parameters=params).result_rows)
    return {s: Online(int(g), int(m), int(b)) for s, g, m, b in rows}


async def incremental(store: Store, windows: dict[str, int], now_ms: int) -> dict[str, Online]:
    snap = await store.snapshot(windows, date(2026, 1, 1), now_ms)
    return snap.online


def same(a: dict[str, Online], b: dict[str, Online], sites: list[str]) -> bool:
    return all(a.get(s, Online()) == b.get(s, Online()) for s in sites)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_the_incremental_tally_is_the_query_over_the_window(
    store: Store, seed: int, tmp_path: Path
) -> None:
    stream = Stream(seed)
    rnd = stream.rnd
    now = T0
    windows = dict(WINDOWS)
    checked = 0
    for tick in range(60):
        await insert(store, stream.rows(now, rnd.randrange(0, 40)))
        step = rnd.random()
        if step < 0.5:
            now += rnd.randrange(1, 3_000)
        elif step < 0.8:
            now += rnd.randrange(3_000, 120_000)
        elif step < 0.9 and stream.last_ts:
            # exactly on an edge: a row's window ends now, or just did
            edge = rnd.choice(stream.last_ts) + rnd.choice([60_000, 300_000])
            now = max(now, edge + rnd.choice([0, 1]))
        elif step < 0.95:
            now -= rnd.randrange(1, 30_000)  # the clock steps back
        if tick == 40:
            windows = {"long": 300, "short": 120}  # the registry changed
        want = await by_query(store, windows, now)
        got = await incremental(store, windows, now)
        assert same(got, want, list(windows)), (tick, now, got, want)
        checked += sum(o.guests + o.members + o.bots for o in want.values()) > 0
    assert checked > 20  # most ticks had someone online

    # another process, starting from nothing, serves the same numbers
    other = Store(f"chdb://{tmp_path}/clickhouse")
    try:
        assert same(
            await incremental(other, windows, now),
            await by_query(store, windows, now),
            list(windows),
        )
    finally:
        other.close()


async def test_rows_landing_in_an_old_bucket_are_read_again(store: Store) -> None:
    windows = {"long": 300}
    stream = Stream(7)
    now = T0
    await insert(store, stream.rows(now, 30))
    await incremental(store, windows, now)
    # late rows for a bucket already read (same bucket, same count would be the same rows)
    late = stream.rows(now, 1)[0]
    visitor = "late-one"
    event = late.event._replace(visitor=visitor, ts=now - 10_000, type="pageview", bot=False)
    await insert(store, [late._replace(event=event, visitor=visitor)])
    now += BUCKET_MS // 5
    assert same(
        await incremental(store, windows, now), await by_query(store, windows, now), ["long"]
    )


async def test_totals_and_days_read_the_daily_projection(store: Store) -> None:
    """Totals and per-day sums cost rows per part, site and day, not per event."""
    await insert(store, Stream(5).rows(T0, 50))
    for sql in (
        "SELECT site, sum(starts_visit), sum(pageview) FROM events GROUP BY site",
        "SELECT site, day, sum(starts_visit), sum(pageview) FROM events "
        "WHERE day >= '2026-01-01' GROUP BY site, day",
    ):
        plan = await store.run(lambda c, sql=sql: c.query("EXPLAIN " + sql).result_rows)
        assert any("ReadFromMergeTree (daily)" in line for (line,) in plan), plan


async def test_the_edges_of_the_windows_to_the_millisecond(store: Store, tmp_path: Path) -> None:
    """Online while ``last >= now - window``; a bot while a bot row is within the longest
    window; checked tick after tick, as the counter runs, and by a process starting then."""
    windows = {"long": 300, "short": 60}
    stream = Stream(9)

    def row(site: str, visitor: str, ts: int, *, bot: bool = False, kind: str = "pageview") -> Row:
        r = stream.rows(ts, 1)[0]
        event = r.event._replace(site=site, visitor=visitor, ts=ts, bot=bot, type=kind)
        return r._replace(event=event, visitor=visitor)

    await insert(
        store,
        [
            row("long", "bot-then-human", T0, bot=True),
            row("long", "bot-then-human", T0 + 100_000),
            row("short", "reader", T0 + 1_000),
            row("long", "leaver", T0),
            row("long", "leaver", T0 + 2_000, kind="leave"),
        ],
    )
    for now in (
        T0 + 2_000,
        T0 + 60_999,
        T0 + 61_000,
        T0 + 61_001,
        T0 + 299_999,
        T0 + 300_000,
        T0 + 300_001,
        T0 + 399_999,
        T0 + 400_000,
        T0 + 400_001,
    ):
        want = await by_query(store, windows, now)
        assert same(await incremental(store, windows, now), want, list(windows)), (now - T0, want)
        fresh = Store(f"chdb://{tmp_path}/clickhouse")
        try:
            assert same(await incremental(fresh, windows, now), want, list(windows)), now - T0
        finally:
            fresh.close()
    assert (await by_query(store, windows, T0 + 300_000))["long"] == Online(0, 0, 1)
    assert (await by_query(store, windows, T0 + 300_001))["long"] == Online(1, 0, 0)


async def test_bucket_counts_read_the_buckets_projection(store: Store) -> None:
    await insert(store, Stream(6).rows(T0, 50))
    params = {"first": (T0 - 400_000) // BUCKET_MS, "sites": list(WINDOWS)}
    plan = await store.run(
        lambda c: c.query("EXPLAIN " + COUNTS_QUERY, parameters=params).result_rows
    )
    assert any("ReadFromMergeTree (buckets)" in line for (line,) in plan), plan


async def test_an_upgraded_database_keeps_its_numbers(tmp_path: Path) -> None:
    """A database of the previous version (0001 and 0002 applied, rows stored) gets the
    ``buckets`` projection for the rows it has: same totals, same online numbers."""
    url = f"chdb://{tmp_path}/clickhouse"
    old = Store(url)
    stream = Stream(11)
    windows = {"long": 300, "short": 60}
    now = T0 + 100_000

    def previous_version(c: Any) -> None:
        c.command(schema_migrations_ddl(None))
        for mig in migrations():
            if mig.version <= 2:
                for statement in render(mig):
                    c.command(statement)
                c.insert("schema_migrations", [[mig.version, mig.name]], ["version", "name"])

    try:
        await old.run(previous_version)
        for t in range(0, 100_000, 10_000):
            await insert(old, stream.rows(T0 + t, 30))
        before = await old.run(
            lambda c: (
                c.query(
                    "SELECT site, sum(starts_visit), sum(pageview), count() "
                    "FROM events GROUP BY site"
                ).result_rows
            )
        )
        want = await by_query(old, windows, now)
    finally:
        old.close()

    new = Store(url)
    try:
        assert await new.migrate() == ["0003_buckets"]
        assert await new.migrate() == []
        snap = await new.snapshot(windows, date(2026, 1, 1), now)
        assert {s: t for s, t in snap.totals.items()} == {s: (v, p) for s, v, p, _ in before}
        assert same(snap.online, want, list(windows))
        # every stored part has the projection: the counts come from it, and are the rows'
        counts = await new.run(
            lambda c: (
                c.query(COUNTS_QUERY, parameters={"first": 0, "sites": list(WINDOWS)}).result_rows
            )
        )
        assert sum(n for _, n in counts) == sum(n for *_, n in before)
        missing = await new.run(
            lambda c: c.command(
                "SELECT count() FROM system.parts WHERE table = 'events' AND active "
                "AND NOT has(projections, 'buckets')"
            )
        )
        assert missing == 0
    finally:
        new.close()
