"""Who is online, as the counter reads it: the tallies each partition's owner writes to
``online_now`` (counting.py, consume.py), summed, are exactly the numbers of the one query over
the stored rows (``ONLINE_BY_QUERY``), at many ``now``s, on random streams through the real
consume path (``Aggregator.process``, ``flush``, ``tick``): late rows, rows older than the
window, future rows, equal-ms rows, leaves, members, bots (under a human's key too), two sites
with different windows, salt-rotation aliases, expiry by a visit timeout shorter than a window,
duplicates, the clock stepping back; and after a rebuild by another process. Real chDB, no
mocks."""

from __future__ import annotations

import asyncio
import random
import threading
import uuid
from datetime import date
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from services.aggregate import store as store_module
from services.aggregate.consume import ALIVE_MS, TALLY_REFRESH_MS, Aggregator, Consumer
from services.aggregate.counting import PartitionState
from services.aggregate.migrate import migrations, render, schema_migrations_ddl
from services.aggregate.online import ONLINE_BY_QUERY
from services.aggregate.sources import InRecord, LocalLog
from services.aggregate.store import (
    EVENT_COLUMNS,
    ONLINE_GRACE_MS,
    Online,
    Store,
    event_columns,
    online_rows,
)
from services.ingest.publish_types import OutRecord
from services.record import Event, decode, encode
from services.settings import Settings
from services.sites import Registry

pytestmark = pytest.mark.integration

SITES = """
[sites.long]
timezone = "Asia/Ho_Chi_Minh"
online_window_seconds = 300

[sites.short]
timezone = "UTC"
online_window_seconds = 60
"""
WINDOWS = {"long": 300, "short": 60}
TOPIC = "online"
T0 = 1_772_600_000_000  # ms
PARTITIONS = 3


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> float:
        return self.ms / 1000


class Stream:
    """Random events of a few people; each stays in one partition across salt rotations (as
    ingest keys them), and a rotation gives them a new key that carries the previous one."""

    def __init__(self, seed: int, people: int = 40) -> None:
        self.rnd = random.Random(seed)
        rnd = self.rnd
        self.people = [
            {
                "site": rnd.choice(list(WINDOWS)),
                "keys": [uuid.UUID(int=rnd.getrandbits(128)).hex],
                "p": rnd.randrange(PARTITIONS),
            }
            for _ in range(people)
        ]
        self.offsets = [0] * PARTITIONS
        self.stamps: list[int] = []
        self.ids: list[str] = []

    def records(self, now: int, n: int) -> list[InRecord]:
        rnd = self.rnd
        out = []
        for _ in range(n):
            person = rnd.choice(self.people)
            keys: list[str] = person["keys"]
            prev = None
            if rnd.random() < 0.05:  # the salt rotates for this person
                prev = keys[-1]
                keys.append(uuid.UUID(int=rnd.getrandbits(128)).hex)
            shape = rnd.random()
            if shape < 0.65:
                ts = now - rnd.randrange(2_000)  # just now
            elif shape < 0.8:
                ts = now - rnd.randrange(400_000)  # late, possibly beyond every window
            elif shape < 0.87:
                ts = now + rnd.randrange(5_000)  # a clock ahead of ours
            elif self.stamps:
                ts = rnd.choice(self.stamps)  # the same ms as another row
            else:
                ts = now
            self.stamps.append(ts)
            event_id = str(uuid.UUID(int=rnd.getrandbits(128)))
            if self.ids and rnd.random() < 0.03:
                event_id = rnd.choice(self.ids)  # sent again
            self.ids.append(event_id)
            kind = rnd.choices(["pageview", "heartbeat", "leave"], [5, 4, 2])[0]
            event = Event(
                event_id, person["site"], kind, ts, keys[-1], prev,
                rnd.random() < 0.3, rnd.random() < 0.08, "https://x.example.vn/", "", "",
                rnd.choice((0, 0, 1, 999)),  # equal ms: ordered by these, or equal too
            )  # fmt: skip
            p = person["p"]
            out.append(InRecord(p, self.offsets[p], encode(event)))
            self.offsets[p] += 1
        return sorted(out, key=lambda r: r.partition)  # runs of one partition, as fetched


async def by_query(store: Store, now_ms: int) -> dict[str, Online]:
    sites = list(WINDOWS)
    params: dict[str, Any] = {
        "since": now_ms - max(WINDOWS.values()) * 1000,
        "now": now_ms,
        "sites": sites,
        "windows": [WINDOWS[s] * 1000 for s in sites],
    }
    rows = await store.run(lambda c: c.query(ONLINE_BY_QUERY, parameters=params).result_rows)
    return {s: Online(int(g), int(m), int(b)) for s, g, m, b in rows}


async def published(store: Store, now_ms: int) -> dict[str, Online]:
    snap = await store.snapshot(dict(WINDOWS), date(2026, 1, 1), now_ms, TOPIC)
    return snap.online


def same(a: dict[str, Online], b: dict[str, Online]) -> bool:
    return all(a.get(s, Online()) == b.get(s, Online()) for s in WINDOWS)


def aggregator(store: Store, clock: Clock, **settings: Any) -> Aggregator:
    return Aggregator(store, Registry.parse(SITES), Settings(**settings), TOPIC, clock=clock)


async def tick(agg: Aggregator) -> None:
    """The consume loop's tick, and its rebuild of a partition whose clock went back."""
    await agg.tick()
    if agg.needs_reset:
        await agg.rebuild(sorted(agg.needs_reset), {})
        await agg.tick()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_the_summed_tallies_are_the_query_over_the_rows(store: Store, seed: int) -> None:
    clock = Clock(T0)
    # a visit timeout shorter than the longest window: expiry keeps who may be online
    settings = {"visit_timeout_seconds": 120, "dedup_horizon_seconds": 600}
    agg = aggregator(store, clock, **settings)
    await agg.assign(list(range(PARTITIONS)))
    stream = Stream(seed)
    rnd = stream.rnd
    checked = 0
    for step in range(50):
        agg.process(stream.records(clock.ms, rnd.randrange(0, 40)))
        if rnd.random() < 0.3:
            await tick(agg)  # a tick with rows pending: those partitions wait for the flush
        await agg.flush()
        r = rnd.random()
        if r < 0.5:
            clock.ms += rnd.randrange(1, 3_000)
        elif r < 0.8:
            clock.ms += rnd.randrange(3_000, 120_000)
        elif r < 0.92 and stream.stamps:
            # exactly on an edge: a row's window ends now, or just did
            edge = rnd.choice(stream.stamps) + rnd.choice([60_000, 300_000])
            clock.ms = max(clock.ms, edge + rnd.choice([0, 1]))
        elif r < 0.96:
            clock.ms -= rnd.randrange(2_000, 30_000)  # the clock steps back
        await tick(agg)
        want = await by_query(store, clock.ms)
        assert same(await published(store, clock.ms), want), (step, clock.ms - T0, want)
        checked += sum(o.guests + o.members + o.bots for o in want.values()) > 0
    assert checked > 20  # most steps had someone online

    # another process takes the partitions over: rebuilt from the rows, the same numbers
    clock.ms += 1_500
    other = aggregator(store, clock, **settings)
    await other.assign(list(range(PARTITIONS)))
    await other.tick()
    want = await by_query(store, clock.ms)
    assert same(await published(store, clock.ms), want)
    for edge in (1, 60_001, 300_001):
        clock.ms += edge
        await other.tick()
        assert same(await published(store, clock.ms), await by_query(store, clock.ms)), edge


async def test_the_visitor_cap_takes_the_forgotten_out_of_the_tally(store: Store) -> None:
    """The stated bound: past ``max_visitors`` the longest idle are forgotten, online or not;
    they leave the tally with their state (the query over the rows still sees them)."""
    clock = Clock(T0)
    agg = aggregator(store, clock, max_visitors_per_partition=20)
    await agg.assign([0])
    records = []
    for i in range(30):
        event = Event(
            str(uuid.uuid4()), "long", "pageview", T0 + i, f"{i:032x}", None, False, False,
            "https://x.example.vn/", "", "",
        )  # fmt: skip
        records.append(InRecord(0, i, encode(event)))
    agg.process(records)
    await agg.flush()
    await tick(agg)
    kept = len(agg.states[0])
    assert kept == 20
    assert (await published(store, clock.ms))["long"] == Online(kept, 0, 0)
    assert (await by_query(store, clock.ms))["long"] == Online(30, 0, 0)
    clock.ms += 301_000  # their window ended: the same numbers again
    await tick(agg)
    assert same(await published(store, clock.ms), await by_query(store, clock.ms))


async def test_the_edges_of_the_windows_to_the_millisecond(store: Store) -> None:
    """Online while ``last >= now - window``; a bot while a bot row is within the longest
    window; tick after tick, and by a process rebuilding then."""
    clock = Clock(T0)
    agg = aggregator(store, clock)
    await agg.assign([0])

    def rec(offset: int, site: str, visitor: str, ts: int, **kw: Any) -> InRecord:
        event = Event(
            str(uuid.uuid4()), site, kw.get("kind", "pageview"), ts, visitor, None, False,
            kw.get("bot", False), "https://x.example.vn/", "", "",
        )  # fmt: skip
        return InRecord(0, offset, encode(event))

    agg.process(
        [
            rec(0, "long", "bot-then-human", T0, bot=True),
            rec(1, "long", "bot-then-human", T0 + 100_000),
            rec(2, "short", "reader", T0 + 1_000),
            rec(3, "long", "leaver", T0),
            rec(4, "long", "leaver", T0 + 2_000, kind="leave"),
        ]
    )
    await agg.flush()
    for at in (2_000, 60_999, 61_000, 61_001, 299_999, 300_000, 300_001, 399_999, 400_000):
        clock.ms = T0 + at
        await tick(agg)
        want = await by_query(store, clock.ms)
        assert same(await published(store, clock.ms), want), (at, want)
        fresh = aggregator(store, clock)
        await fresh.assign([0])
        assert fresh.states[0].tallies() == agg.states[0].tallies(), at
    assert (await by_query(store, T0 + 300_000))["long"] == Online(0, 0, 1)
    assert (await by_query(store, T0 + 300_001))["long"] == Online(1, 0, 0)


async def test_a_gone_owners_tally_stops_counting_once_its_window_has_passed(
    store: Store,
) -> None:
    """A partition whose owner is gone (and not yet taken over) keeps its last tally in
    ``online_now``; everyone in it has left the window by ``at + window``, so from then on
    (plus ``ONLINE_GRACE_MS`` for clocks) it counts no one, per site and to the millisecond."""
    now = T0 + 1_000_000
    cut = {site: now - window * 1000 - ONLINE_GRACE_MS for site, window in WINDOWS.items()}
    tallies = {"long": (1, 2, 3), "short": (10, 20, 30)}
    ages = {  # partition -> how its last tally is stamped
        0: now - 1_000,  # a live owner's: counted for both sites
        1: cut["short"],  # just out of the short window: counted for the long one only
        2: cut["short"] + 1,  # just inside it: counted for both
        3: cut["long"],  # out of both
        4: cut["long"] + 1,  # inside the long window only
    }
    for partition, at_ms in ages.items():
        await store.write_online(online_rows(TOPIC, partition, 10, at_ms, tallies))
    # partition 3's former owner had written a newer-looking stamp with less progress: the
    # latest tally (greatest version) decides, not the latest stamp
    await store.write_online(online_rows(TOPIC, 3, 9, now, tallies))
    online = await published(store, now)
    assert online["long"] == Online(4, 8, 12)  # partitions 0, 1, 2, 4
    assert online["short"] == Online(20, 40, 60)  # partitions 0, 2
    # and once every stamp is out of its window, no one
    assert await published(store, now + 400_000) == {}


async def test_a_live_owner_writes_its_unchanged_tallies_again_before_they_look_gone(
    store: Store,
) -> None:
    """Unchanged tallies are written again every ``TALLY_REFRESH_MS``, so the counter never
    takes a live owner's latest tally for a gone owner's: here ingest's clock is 30 s ahead of
    the aggregate's, so the reader stays online for 30 s more than the window past the
    tally's stamp."""
    clock = Clock(T0)
    agg = aggregator(store, clock)
    await agg.assign([0])
    ts = T0 + 30_000
    event = Event(
        str(uuid.uuid4()), "short", "pageview", ts, "reader", None, False, False,
        "https://x.example.vn/", "", "",
    )  # fmt: skip
    agg.process([InRecord(0, 0, encode(event))])
    await agg.flush()
    rewrites = 0
    for ms in range(1_000, 90_000, 1_000):  # the loop ticks; nothing new comes
        clock.ms = T0 + ms
        rows = agg.tick_rows()
        rewrites += bool(rows)
        await agg.publish(rows)
        assert (await published(store, clock.ms))["short"] == Online(1, 0, 0), ms
    assert rewrites >= 90_000 // TALLY_REFRESH_MS - 1
    clock.ms = ts + 60_001  # the window after the reader's last event: gone
    await tick(agg)
    assert (await published(store, clock.ms)).get("short", Online()) == Online()


async def test_a_live_owner_says_every_second_that_it_counts_each_partition(
    store: Store,
) -> None:
    """With nothing new for a minute, every partition an owner counts still gets a row every
    ``ALIVE_MS``, while its unchanged tallies are written again only every
    ``TALLY_REFRESH_MS``: the counter's ``alive`` follows each, and the rows that say so count
    no one. A partition given away is no longer said to be counted."""
    clock = Clock(T0)
    agg = aggregator(store, clock)
    await agg.assign([0, 1])
    for p in (0, 1):
        event = Event(
            str(uuid.uuid4()), "long", "pageview", T0, f"reader{p}", None, False, False,
            "https://x.example.vn/", "", "",
        )  # fmt: skip
        agg.process([InRecord(p, 0, encode(event))])
    await agg.flush()
    tallied = 0
    for ms in range(500, 60_000, 500):  # the loop's ticks
        clock.ms = T0 + ms
        rows = agg.tick_rows()
        tallied += any(row[2] != "" for row in rows)
        await agg.publish(rows)
        snap = await store.snapshot(dict(WINDOWS), date(2026, 1, 1), clock.ms, TOPIC)
        for p in (0, 1):
            assert clock.ms - ALIVE_MS <= snap.alive[p] <= clock.ms, (ms, p, snap.alive)
        assert snap.online == {"long": Online(2, 0, 0)}, ms
    assert tallied <= 60_000 // TALLY_REFRESH_MS, tallied
    agg.forget([1])
    before = (await store.snapshot(dict(WINDOWS), date(2026, 1, 1), clock.ms, TOPIC)).alive
    for ms in range(60_000, 65_000, 500):
        clock.ms = T0 + ms
        await agg.tick()
    after = (await store.snapshot(dict(WINDOWS), date(2026, 1, 1), clock.ms, TOPIC)).alive
    assert after[1] == before[1] and after[0] > before[0]
    # the counter of every topic at once judges none
    assert (await store.snapshot(dict(WINDOWS), date(2026, 1, 1), clock.ms, "")).alive == {}


async def test_totals_and_days_read_the_daily_projection(store: Store) -> None:
    """Totals and per-day sums cost rows per part, site and day, not per event."""
    agg = aggregator(store, Clock(T0))
    await agg.assign(list(range(PARTITIONS)))
    agg.process(Stream(5).records(T0, 50))
    await agg.flush()
    for sql in (
        "SELECT site, sum(starts_visit), sum(pageview) FROM events GROUP BY site",
        "SELECT site, day, sum(starts_visit), sum(pageview) FROM events "
        "WHERE day >= '2026-01-01' GROUP BY site, day",
    ):
        plan = await store.run(lambda c, sql=sql: c.query("EXPLAIN " + sql).result_rows)
        assert any("ReadFromMergeTree (daily)" in line for (line,) in plan), plan


LATER_COLUMNS = ("micros", "in_visit", "kafka_base")  # of events: added after 0003


async def test_an_upgraded_database_gets_the_table_and_the_numbers(tmp_path: Path) -> None:
    """A database of an earlier version (0001-0003 applied, rows stored without ``micros``,
    ``in_visit`` and ``kafka_base``) gets ``online_now`` and those columns; the consumer,
    rebuilding, writes the numbers of the rows it has."""
    url = f"chdb://{tmp_path}/clickhouse"
    old = Store(url)

    def previous_version(c: Any) -> None:
        c.command(schema_migrations_ddl(None))
        for mig in migrations():
            if mig.version <= 3:
                for statement in render(mig):
                    c.command(statement)
                c.insert("schema_migrations", [[mig.version, mig.name]], ["version", "name"])

    clock = Clock(T0 + 100_000)
    try:
        await old.run(previous_version)
        # rows as the previous version's consumer stored them (the same counting rules)
        state = PartitionState(0)
        stream = Stream(11)
        for t in range(0, 100_000, 10_000):
            for p in range(PARTITIONS):
                rows = [
                    row
                    for r in stream.records(T0 + t, 30)
                    if r.partition == p and r.value is not None
                    for row in [state.apply(decode(r.value), ZoneInfo("UTC"), p, r.offset)]
                    if row is not None
                ]
                if rows:
                    columns = [
                        column
                        for name, column in zip(
                            EVENT_COLUMNS, event_columns(rows, TOPIC), strict=True
                        )
                        if name not in LATER_COLUMNS
                    ]
                    await old.run(
                        lambda c, columns=columns: c.insert(
                            "events",
                            columns,
                            column_names=[n for n in EVENT_COLUMNS if n not in LATER_COLUMNS],
                            column_oriented=True,
                        )
                    )
    finally:
        old.close()

    new = Store(url)
    try:
        assert await new.migrate() == [
            "0004_online_now",
            "0005_drop_buckets",
            "0006_micros",
            "0007_in_visit",
            "0008_kafka_base",
        ]
        assert await new.migrate() == []
        want = await by_query(new, clock.ms)
        projections = await new.run(
            lambda c: (
                c.query("SELECT name FROM system.projections WHERE table = 'events'").result_rows
            )
        )
        assert sorted(name for (name,) in projections) == ["daily", "progress"]
        agg = aggregator(new, clock)
        await agg.assign(list(range(PARTITIONS)))
        await agg.tick()
        assert sum(o.guests + o.members + o.bots for o in want.values()) > 0
        assert same(await published(new, clock.ms), want)
    finally:
        new.close()


async def consume_loop(
    store: Store, settings: Settings, clock: Clock
) -> tuple[LocalLog, asyncio.Event, asyncio.Task[None]]:
    """``visitorstats run``'s consume loop over an in-process log, running: the log, the event
    that stops it, and its task."""
    log = LocalLog()
    agg = Aggregator(store, Registry.parse(SITES), settings, log.topic, clock=clock)
    stopping = asyncio.Event()
    consumer = Consumer(log, agg, settings, stopping)
    await consumer.start()
    return log, stopping, asyncio.create_task(consumer.run(drained=lambda: log.pending() == 0))


async def test_the_consume_loop_ticks_visitors_out_when_their_window_ends(store: Store) -> None:
    """``visitorstats run``'s path (the in-process log, ``Consumer.run``): with no event at all,
    the loop's tick takes a visitor out of the tally when their window ends, and writes it."""
    clock = Clock(T0)
    settings = Settings(flush_interval_seconds=0.05, counter_interval_seconds=0.05)
    log, stopping, task = await consume_loop(store, settings, clock)

    async def online_now(want: dict[str, Online]) -> dict[str, Online]:
        got: dict[str, Online] = {}
        for _ in range(200):
            snap = await store.snapshot(dict(WINDOWS), date(2026, 1, 1), clock.ms, log.topic)
            got = snap.online
            if same(got, want):
                break
            await asyncio.sleep(0.02)
        return got

    try:
        for i, (site, member) in enumerate([("long", False), ("short", True), ("long", True)]):
            event = Event(
                str(uuid.uuid4()), site, "pageview", T0 + i, f"{i + 1:032x}", None, member,
                False, "https://x.example.vn/", "", "",
            )  # fmt: skip
            log.append(OutRecord(b"", encode(event), 0))
        want = {"long": Online(1, 1, 0), "short": Online(0, 1, 0)}
        assert same(await online_now(want), want)
        clock.ms = T0 + 61_002  # the short window ended
        want = {"long": Online(1, 1, 0), "short": Online(0, 0, 0)}
        assert same(await online_now(want), want)
        clock.ms = T0 + 300_003  # and the long one
        assert same(await online_now({}), {})
        assert same(await online_now({}), await by_query(store, clock.ms))
    finally:
        stopping.set()
        await task


async def test_a_long_flush_interval_does_not_hold_the_ticks_nor_a_stop(store: Store) -> None:
    """The loop waits for records at most half a tick: with a flush interval of a minute and no
    beacon, it waited 30 s in each fetch, its ticks (the rows that say a partition is counted:
    others then took it for unattended after 7 s) and a stop with it."""
    clock = Clock(T0)
    settings = Settings(flush_interval_seconds=60, counter_interval_seconds=0.1)
    log, stopping, task = await consume_loop(store, settings, clock)
    try:
        seen: set[int] = set()
        for step in range(1, 31):  # three seconds of the owner's clock, in the loop's time
            await asyncio.sleep(0.1)
            clock.ms = T0 + step * 100
            snap = await store.snapshot(dict(WINDOWS), date(2026, 1, 1), clock.ms, log.topic)
            seen.add(snap.alive.get(0, 0))
        assert len(seen - {0}) >= 2, seen  # a row each second of it
    finally:
        stopping.set()
        await asyncio.wait_for(task, 5)  # at once, not after a fetch of 30 s


async def test_the_in_process_log_reads_again_what_a_rebuild_after_the_clock_went_back_needs(
    store: Store,
) -> None:
    """``visitorstats run``'s hand-off, step by step as ``Consumer.run`` takes it: records
    fetched while a partition waits for its rebuild (its clock went back) are skipped, and the
    rebuild resumes where ClickHouse's rows end; the in-process log gives them again from there,
    as Kafka does (an outside audit: a step back of 2 s under traffic stopped all counting until
    a restart, every fetch then a "gap")."""
    clock = Clock(T0 + 10_000)
    log = LocalLog()
    agg = Aggregator(store, Registry.parse(SITES), Settings(), log.topic, clock=clock)
    await log.seek(await agg.assign([0]))

    def append(first: int, n: int) -> None:
        for i in range(first, first + n):
            event = Event(
                str(uuid.uuid4()), "long", "pageview", clock.ms, f"{i + 1:032x}", None, False,
                False, "https://x.example.vn/", "", "",
            )  # fmt: skip
            log.append(OutRecord(b"", encode(event), 0))

    async def stored() -> int:
        return int(await store.run(lambda c: c.command("SELECT count() FROM events")))

    append(0, 5)
    assert agg.process(await log.fetch(0.1, 100)) == []  # counted, not written yet
    clock.ms -= 3_000  # an NTP step back
    assert agg.tick_rows() == [] and agg.needs_reset == {0}
    append(5, 5)
    assert agg.process(await log.fetch(0.1, 100)) == []  # skipped: to be read again
    await log.commit(await agg.write())  # the loop writes before a rebuild
    assert await stored() == 5
    await log.seek(await agg.rebuild([0], {}))  # resumes at 5
    assert agg.process(await log.fetch(0.1, 100)) == []
    await log.commit(await agg.write())
    assert await stored() == 10
    assert await log.fetch(0.01, 100) == []  # and nothing more: each once


def pageviews_of_new_visitors(first: int, n: int) -> list[InRecord]:
    """The first page views on ``long`` of guests ``first`` to ``first + n - 1``, one per
    partition in turn."""
    out = []
    for i in range(first, first + n):
        event = Event(
            str(uuid.uuid4()), "long", "pageview", T0 + i, f"{i + 1:032x}", None, False, False,
            "https://x.example.vn/", "", "",
        )  # fmt: skip
        out.append(InRecord(i % PARTITIONS, i // PARTITIONS, encode(event)))
    return sorted(out, key=lambda r: r.partition)


async def test_a_refresh_sees_a_writes_page_views_and_their_visitors_together(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The events of a flush land before its tallies (two inserts): a counter refresh in
    between would show the page views without the visitors. It waits for the tallies; for at
    most ``LANDING_WAIT_SECONDS`` when the write is stuck."""
    tallying, go_on = threading.Event(), threading.Event()
    insert_online = Store._insert_online

    def held_back(c: Any, rows: list[list[Any]]) -> None:  # the real insert, once let go
        tallying.set()
        go_on.wait(30)
        insert_online(c, rows)

    monkeypatch.setattr(Store, "_insert_online", staticmethod(held_back))
    monkeypatch.setattr(store_module, "LANDING_WAIT_SECONDS", 30.0)
    clock = Clock(T0 + 1_000)
    agg = aggregator(store, clock)
    await agg.assign(list(range(PARTITIONS)))
    agg.process(pageviews_of_new_visitors(0, 6))
    flushing = asyncio.ensure_future(agg.flush())
    assert await asyncio.to_thread(tallying.wait, 30)  # the page views are stored now
    stored = await store.run_read(lambda c: c.query("SELECT count() FROM events").result_rows)
    assert stored == [(6,)]

    reading = asyncio.ensure_future(store.snapshot(dict(WINDOWS), date(2026, 1, 1), clock.ms))
    await asyncio.sleep(0.3)  # the read's turn comes while the tallies are held back
    go_on.set()
    snap = await reading
    await flushing
    assert snap.totals["long"] == (6, 6)
    assert snap.online.get("long") == Online(6, 0, 0)

    # a write that does not land its tallies holds the counter back no longer than the bound
    go_on.clear()
    tallying.clear()
    monkeypatch.setattr(store_module, "LANDING_WAIT_SECONDS", 0.1)
    agg.process(pageviews_of_new_visitors(6, 3))  # three more, each partition's next offset
    flushing = asyncio.ensure_future(agg.flush())
    assert await asyncio.to_thread(tallying.wait, 30)
    snap = await asyncio.wait_for(
        store.snapshot(dict(WINDOWS), date(2026, 1, 1), clock.ms), timeout=20
    )
    assert not flushing.done()
    assert snap.totals["long"] == (9, 9)  # read while the write was still held
    go_on.set()
    await flushing


async def test_a_peak_stored_twice_is_the_first_time_it_was_reached(store: Store) -> None:
    """Two aggregate processes see the same new peak in one snapshot and store it a few ms
    apart (an outside audit: 241 such pairs): the peak is when it was first reached, whatever
    order the rows are read in, not either one by chance."""
    for peaks in (
        {"long": (5, T0 + 46), "short": (5, T0)},
        {"long": (5, T0), "short": (5, T0 + 46)},
        {"long": (3, T0 + 900), "short": (3, T0 + 900)},
    ):
        await store.record_peaks(peaks)
    snap = await store.snapshot(dict(WINDOWS), date(2026, 1, 1), T0 + 1_000, TOPIC)
    assert snap.peaks == {"long": (5, T0), "short": (5, T0)}


async def test_an_owner_whose_clock_is_behind_the_last_owners_still_says_so_every_second(
    store: Store,
) -> None:
    """The rows of a partition whose previous owner's clock ran 10 s ahead: the new owner's
    rows are stamped after those (``at`` only grows), and still come every ``ALIVE_MS`` by its
    own clock, not once its clock has caught up."""
    await store.write_online(online_rows(TOPIC, 0, 0, T0 + 10_000, {"long": (0, 0, 0)}))
    clock = Clock(T0)
    agg = aggregator(store, clock)
    await agg.assign([0])
    seen = []
    for ms in range(0, 8_000, 500):
        clock.ms = T0 + ms
        await agg.tick()
        alive = (await store.snapshot(dict(WINDOWS), date(2026, 1, 1), clock.ms, TOPIC)).alive
        seen.append(alive[0])
    assert seen[0] > T0 + 10_000
    # a newer row at least every second (every other tick)
    assert all(later > earlier for earlier, later in zip(seen[::2], seen[2::2], strict=False))
