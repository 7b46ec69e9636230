"""The counting rules of the spec, with an injected clock, on the real ClickHouse engine (chDB).

Events go through the very code both deployments run (``Aggregator.process`` ->
``PartitionState`` -> ``Store.insert_events``) and are read back through ``CounterService``;
who is online through the tallies the aggregator writes at a tick of the same clock.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from prometheus_client import REGISTRY

from services.aggregate import store as store_module
from services.aggregate.consume import Aggregator
from services.aggregate.counter import (
    BEHIND_STALE_SECONDS,
    REBALANCE_STALE_SECONDS,
    SILENT_SECONDS,
    SITES_PER_SLICE,
    UNATTENDED_SECONDS,
    CounterService,
)
from services.aggregate.sources import InRecord
from services.aggregate.store import Store
from services.record import Event, encode
from services.settings import Settings
from services.sites import Registry

pytestmark = pytest.mark.integration

SITES = """
[sites.hcm]
timezone = "Asia/Ho_Chi_Minh"
baseline_visits = 23070412
baseline_pageviews = 500
online_window_seconds = 300

[sites.utc]
timezone = "UTC"
online_window_seconds = 60
"""
HCM = ZoneInfo("Asia/Ho_Chi_Minh")
MIN = 60.0


def at(tz: ZoneInfo, *args: int) -> float:
    return datetime(*args, tzinfo=tz).timestamp()  # type: ignore[misc]


@dataclass
class Rig:
    store: Store
    registry: Registry
    settings: Settings
    now: float = 0.0
    topic: str = "rules"
    offsets: dict[int, itertools.count[int]] = field(default_factory=dict)
    aggregator: Aggregator | None = None

    async def start(self) -> None:
        self.aggregator = Aggregator(
            self.store, self.registry, self.settings, self.topic, clock=lambda: self.now
        )
        resume = await self.aggregator.assign([0, 1])
        self.offsets = {p: itertools.count(resume.get(p, 0)) for p in (0, 1)}

    async def send(
        self,
        site: str,
        visitor: str,
        kind: str = "pageview",
        *,
        t: float,
        member: bool = False,
        bot: bool = False,
        event_id: str | None = None,
        prev: str | None = None,
        partition: int = 0,
    ) -> str:
        assert self.aggregator is not None
        event_id = event_id or str(uuid.uuid4())
        event = Event(
            event_id, site, kind, int(t * 1000), visitor, prev, member, bot,
            "https://portal.example.vn/", "", "",
        )  # fmt: skip
        offset = next(self.offsets[partition])
        assert self.aggregator.process([InRecord(partition, offset, encode(event))]) == []
        await self.aggregator.flush()
        return event_id

    def service(self, **kwargs: Any) -> CounterService:
        """A counter over the rig's store and registry, on its clock and topic."""
        return CounterService(
            self.store, self.registry, clock=lambda: self.now, topic=self.topic, **kwargs
        )

    async def counter(self, site: str, t: float) -> dict[str, Any]:
        self.now = t
        agg = self.aggregator
        assert agg is not None
        await agg.tick()  # as the consume loop does: the tallies as of now
        if agg.needs_reset:  # the clock went back: rebuilt from the rows, as the loop does
            await agg.rebuild(sorted(agg.needs_reset), {})
            await agg.tick()
        service = self.service()
        await service.refresh()
        await service.write_peaks()  # (as the service does, soon after)
        payload: dict[str, Any] = service.prepared[site].payload
        return payload


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    store = Store(f"chdb://{tmp_path}/clickhouse")
    await store.migrate()
    rig = Rig(store, Registry.parse(SITES), Settings())
    await rig.start()
    try:
        yield rig
    finally:
        store.close()


T0 = at(HCM, 2026, 3, 4, 10, 0)  # a Wednesday, 10:00 in Ho Chi Minh City


async def test_online_window_expires(rig: Rig) -> None:
    await rig.send("hcm", "a", t=T0)
    assert (await rig.counter("hcm", T0 + 299))["online"]["total"] == 1
    assert (await rig.counter("hcm", T0 + 301))["online"]["total"] == 0
    # the UTC site has a 60 s window
    await rig.send("utc", "b", t=T0)
    assert (await rig.counter("utc", T0 + 59))["online"]["guests"] == 1
    assert (await rig.counter("utc", T0 + 61))["online"]["guests"] == 0


async def test_leave_takes_a_reader_offline_at_once_but_keeps_the_visit(rig: Rig) -> None:
    await rig.send("hcm", "a", t=T0)
    await rig.send("hcm", "b", t=T0)
    await rig.send("hcm", "a", "leave", t=T0 + 5)
    c = await rig.counter("hcm", T0 + 6)
    assert c["online"] == {**c["online"], "guests": 1, "members": 0, "total": 1}
    assert c["visits"]["today"] == 2
    # coming back after a leave: online again, same visit (within 30 minutes)
    await rig.send("hcm", "a", t=T0 + 60)
    c = await rig.counter("hcm", T0 + 61)
    assert c["online"]["total"] == 2
    assert c["visits"]["today"] == 2
    assert c["pageviews"]["today"] == 3


async def test_a_guest_who_logs_in_becomes_a_member(rig: Rig) -> None:
    await rig.send("hcm", "a", t=T0)
    c = await rig.counter("hcm", T0 + 1)
    assert (c["online"]["guests"], c["online"]["members"]) == (1, 0)
    await rig.send("hcm", "a", "heartbeat", t=T0 + 10, member=True)
    c = await rig.counter("hcm", T0 + 11)
    assert (c["online"]["guests"], c["online"]["members"], c["online"]["total"]) == (0, 1, 1)
    assert c["visits"]["today"] == 1


async def test_a_visit_times_out_after_30_minutes_and_a_new_one_starts(rig: Rig) -> None:
    await rig.send("hcm", "a", t=T0)
    await rig.send("hcm", "a", t=T0 + 29 * MIN)  # same visit
    assert (await rig.counter("hcm", T0 + 29 * MIN))["visits"]["today"] == 1
    await rig.send("hcm", "a", t=T0 + 59 * MIN)  # exactly 30 minutes of silence: new visit
    c = await rig.counter("hcm", T0 + 59 * MIN)
    assert c["visits"]["today"] == 2
    assert c["pageviews"]["today"] == 3


async def test_heartbeats_keep_a_visit_alive_but_never_start_one(rig: Rig) -> None:
    await rig.send("hcm", "a", t=T0)
    for minute in (10, 20, 30, 40, 50, 60):
        await rig.send("hcm", "a", "heartbeat", t=T0 + minute * MIN)
    await rig.send("hcm", "a", t=T0 + 65 * MIN)  # 65 min after the start, 5 after a heartbeat
    c = await rig.counter("hcm", T0 + 65 * MIN)
    assert c["visits"]["today"] == 1
    assert c["pageviews"]["today"] == 2
    # a heartbeat from a reader silent for 40 minutes starts no visit
    await rig.send("hcm", "b", t=T0)
    await rig.send("hcm", "b", "heartbeat", t=T0 + 40 * MIN)
    c = await rig.counter("hcm", T0 + 40 * MIN)
    assert c["visits"]["today"] == 2  # a's one and b's first
    # and a heartbeat alone (never a page view) is online but no visit
    await rig.send("hcm", "c", "heartbeat", t=T0 + 41 * MIN)
    c = await rig.counter("hcm", T0 + 41 * MIN)
    assert c["visits"]["today"] == 2
    assert c["online"]["total"] == 3


async def test_a_run_that_began_with_a_heartbeat_has_its_visit_at_its_first_page_view(
    rig: Rig,
) -> None:
    # a reader whose first beacon is a heartbeat (the page was open before), then reads on
    await rig.send("hcm", "a", "heartbeat", t=T0)
    await rig.send("hcm", "a", t=T0 + 1 * MIN)
    await rig.send("hcm", "a", t=T0 + 2 * MIN)
    c = await rig.counter("hcm", T0 + 2 * MIN)
    assert (c["visits"]["today"], c["pageviews"]["today"]) == (1, 2)
    # back at a tab hidden for 40 minutes: the heartbeat starts nothing, the page view read
    # next begins the second visit
    await rig.send("hcm", "a", "heartbeat", t=T0 + 42 * MIN)
    c = await rig.counter("hcm", T0 + 42 * MIN)
    assert (c["visits"]["today"], c["pageviews"]["today"]) == (1, 2)
    await rig.send("hcm", "a", t=T0 + 43 * MIN)
    await rig.send("hcm", "a", "heartbeat", t=T0 + 44 * MIN)
    await rig.send("hcm", "a", t=T0 + 45 * MIN)
    c = await rig.counter("hcm", T0 + 45 * MIN)
    assert (c["visits"]["today"], c["pageviews"]["today"]) == (2, 4)


async def test_midnight_in_ho_chi_minh_city(rig: Rig) -> None:
    before = at(HCM, 2026, 3, 4, 23, 50)
    after = at(HCM, 2026, 3, 5, 0, 10)
    await rig.send("hcm", "a", t=before)
    await rig.send("hcm", "a", t=after)  # same visit, crossing midnight
    await rig.send("hcm", "b", t=after)
    c = await rig.counter("hcm", after + 1)
    # A visit belongs to the day on which it began; page views to their own day.
    assert c["visits"] == {
        "today": 1, "yesterday": 1, "this_week": 2, "this_month": 2, "total": 23070412 + 2,
    }  # fmt: skip
    assert c["pageviews"]["today"] == 2 and c["pageviews"]["yesterday"] == 1
    assert c["as_of"].startswith("2026-03-05T00:10:01+07:00")
    # 23:50 in Ho Chi Minh City is 16:50 UTC: for the UTC site it is all "today"
    await rig.send("utc", "x", t=before)
    await rig.send("utc", "y", t=after)
    u = await rig.counter("utc", after + 1)
    assert (u["visits"]["today"], u["visits"]["yesterday"]) == (2, 0)


async def test_midnight_in_utc(rig: Rig) -> None:
    before = at(UTC, 2026, 3, 4, 23, 59)  # type: ignore[arg-type]
    after = at(UTC, 2026, 3, 5, 0, 1)  # type: ignore[arg-type]
    await rig.send("utc", "a", t=before)
    await rig.send("utc", "b", t=after)
    u = await rig.counter("utc", after)
    assert (u["visits"]["today"], u["visits"]["yesterday"]) == (1, 1)
    # 07:00 HCM on the 5th: both are "today" in Ho Chi Minh City
    await rig.send("hcm", "a", t=before)
    await rig.send("hcm", "b", t=after)
    h = await rig.counter("hcm", after)
    assert (h["visits"]["today"], h["visits"]["yesterday"]) == (2, 0)


async def test_iso_week_and_month_boundaries(rig: Rig) -> None:
    sunday = at(HCM, 2026, 3, 1, 12, 0)  # Sunday 1 March: this month, last ISO week
    saturday_feb = at(HCM, 2026, 2, 28, 12, 0)  # last month
    monday = at(HCM, 2026, 3, 2, 9, 0)  # Monday: a new ISO week
    for i, t in enumerate((saturday_feb, sunday, monday)):
        await rig.send("hcm", f"v{i}", t=t)
    c = await rig.counter("hcm", monday + 60)
    assert c["visits"]["today"] == 1
    assert c["visits"]["yesterday"] == 1
    assert c["visits"]["this_week"] == 1
    assert c["visits"]["this_month"] == 2
    assert c["visits"]["total"] == 23070412 + 3
    # in UTC, Monday 00:30 UTC is still in the same week as Monday 07:30 HCM
    mon_utc = at(UTC, 2026, 3, 2, 0, 30)  # type: ignore[arg-type]
    sun_utc = at(UTC, 2026, 3, 1, 23, 30)  # type: ignore[arg-type]
    await rig.send("utc", "s", t=sun_utc)
    await rig.send("utc", "m", t=mon_utc)
    u = await rig.counter("utc", mon_utc + 60)
    assert (u["visits"]["this_week"], u["visits"]["this_month"], u["visits"]["today"]) == (1, 2, 1)


async def test_duplicate_event_ids_count_once(rig: Rig) -> None:
    eid = await rig.send("hcm", "a", t=T0)
    await rig.send("hcm", "a", t=T0 + 1, event_id=eid)
    await rig.send("hcm", "a", t=T0 + 2, event_id=eid, partition=0)
    hb = await rig.send("hcm", "a", "heartbeat", t=T0 + 3)
    await rig.send("hcm", "a", "heartbeat", t=T0 + 4, event_id=hb)
    c = await rig.counter("hcm", T0 + 5)
    assert c["pageviews"]["today"] == 1
    assert c["visits"]["today"] == 1
    # the same event_id on another site is another event
    await rig.send("utc", "a", t=T0 + 6, event_id=eid)
    assert (await rig.counter("utc", T0 + 7))["pageviews"]["today"] == 1


async def test_bots_are_tallied_apart_and_never_counted(rig: Rig) -> None:
    await rig.send("hcm", "bot1", t=T0, bot=True)
    await rig.send("hcm", "bot1", t=T0 + 1, bot=True)
    await rig.send("hcm", "bot2", t=T0 + 1, bot=True)
    await rig.send("hcm", "reader", t=T0 + 2)
    c = await rig.counter("hcm", T0 + 3)
    assert c["online"]["bots"] == 2
    assert (c["online"]["guests"], c["online"]["total"]) == (1, 1)
    assert c["visits"]["today"] == 1
    assert c["pageviews"]["today"] == 1


async def test_baselines_and_empty_sites(rig: Rig) -> None:
    c = await rig.counter("hcm", T0)
    assert c["visits"]["total"] == 23070412
    assert c["pageviews"]["total"] == 500
    assert c["visits"]["today"] == 0
    assert c["online"]["peak"] == {"total": 0, "at": None}
    u = await rig.counter("utc", T0)
    assert (u["visits"]["total"], u["pageviews"]["total"]) == (0, 0)


async def test_state_is_rebuilt_after_a_restart(rig: Rig) -> None:
    eid = await rig.send("hcm", "a", t=T0)
    await rig.start()  # a new aggregator: state rebuilt from ClickHouse
    await rig.send("hcm", "a", t=T0 + 10 * MIN)  # same visit
    await rig.send("hcm", "a", t=T0 + 11 * MIN, event_id=eid)  # a duplicate, after restart
    c = await rig.counter("hcm", T0 + 11 * MIN)
    assert c["visits"]["today"] == 1
    assert c["pageviews"]["today"] == 2


async def test_a_rebuild_read_in_pages_is_the_rebuild_read_at_once(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows a rebuild replays come a page at a time (a busy hour is millions): pages of 2
    rows make the very state one page makes, and the counting after it is the same."""
    ids = {}
    for i in range(7):
        ids[i] = await rig.send("hcm", f"v{i % 3}", "heartbeat" if i == 4 else "pageview", t=T0 + i)
    await rig.send("hcm", "bot", t=T0 + 8, bot=True)
    assert rig.aggregator is not None
    whole = rig.aggregator.states[0]
    monkeypatch.setattr(store_module, "REPLAY_PAGE", 2)
    replayed = []
    rows = await rig.store.replay_recent(
        rig.topic, 0, 3_600_000, None, lambda e, *_: replayed.append(e.event_id)
    )
    assert rows == 8 and replayed == [*ids.values(), replayed[-1]]
    await rig.start()  # rebuilt, in pages of 2
    paged = rig.aggregator.states[0]
    assert paged.tallies() == whole.tallies() and paged.high_ts == whole.high_ts
    await rig.send("hcm", "v1", t=T0 + 9, event_id=ids[1])  # a duplicate still
    await rig.send("hcm", "v1", t=T0 + 10)  # the same visit
    c = await rig.counter("hcm", T0 + 11)
    assert (c["visits"]["today"], c["pageviews"]["today"]) == (3, 7)
    assert (c["online"]["total"], c["online"]["bots"]) == (3, 1)


async def test_a_rebuild_under_way_is_told(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a rebuild runs its partitions are not read: ``rebuilding_seconds`` says for how
    long, which the service's counter adds to a rebalance's (stale after 2 s: an outside audit
    saw a restart after a busy hour serve online 0 with stale false for 85 s)."""
    assert rig.aggregator is not None
    assert rig.aggregator.rebuilding_seconds() == 0
    release = asyncio.Event()
    real = rig.store.replay_recent

    async def slow(*args: Any) -> int:
        await release.wait()
        return await real(*args)

    monkeypatch.setattr(rig.store, "replay_recent", slow)
    task = asyncio.create_task(rig.aggregator.rebuild([0], {}))
    await asyncio.sleep(0.2)
    assert rig.aggregator.rebuilding_seconds() >= 0.1
    release.set()
    await task
    assert rig.aggregator.rebuilding_seconds() == 0


async def test_a_visitor_across_the_salt_rotation_stays_one(rig: Rig) -> None:
    await rig.send("hcm", "key-day1", t=T0)
    await rig.send("hcm", "key-day2", "heartbeat", t=T0 + 60, prev="key-day1")
    await rig.send("hcm", "key-day2", t=T0 + 120)
    await rig.start()  # the link survives a rebuild too
    await rig.send("hcm", "key-day2", t=T0 + 180)
    c = await rig.counter("hcm", T0 + 181)
    assert c["online"]["total"] == 1
    assert c["visits"]["today"] == 1
    assert c["pageviews"]["today"] == 3
    # an unrelated reader whose prev key is unknown is a new visitor
    await rig.send("hcm", "other-day2", t=T0 + 200, prev="never-seen")
    c = await rig.counter("hcm", T0 + 201)
    assert (c["online"]["total"], c["visits"]["today"]) == (2, 2)


async def test_peak_is_the_most_online_together(rig: Rig) -> None:
    for i in range(3):
        await rig.send("hcm", f"r{i}", t=T0)
    c = await rig.counter("hcm", T0 + 1)
    assert c["online"]["peak"]["total"] == 3
    assert c["online"]["peak"]["at"] == "2026-03-04T10:00:01+07:00"
    c = await rig.counter("hcm", T0 + 400)  # all gone
    assert c["online"]["total"] == 0
    assert c["online"]["peak"]["total"] == 3


async def test_the_running_service_stores_new_peaks_in_the_background_and_when_it_stops(
    rig: Rig,
) -> None:
    async def stored() -> int:
        rows = await rig.store.run_read(
            lambda c: c.query("SELECT max(online) FROM peaks WHERE site = 'hcm'").result_rows
        )
        return int(rows[0][0])

    async def until(probe: Callable[[], Awaitable[int]], expected: int) -> None:
        for _ in range(400):
            if await probe() == expected:
                return
            await asyncio.sleep(0.025)
        raise AssertionError(f"not {expected} in 10 s")

    agg = rig.aggregator
    assert agg is not None
    for i in range(2):
        await rig.send("hcm", f"p{i}", t=T0)
    rig.now = T0 + 1
    await agg.tick()
    # one write at once, then none for an hour: what comes later waits for the stop
    service = rig.service(interval_seconds=0.05, peak_write_seconds=3600)
    stopping = asyncio.Event()
    running = asyncio.create_task(service.run(stopping))

    async def shown() -> int:
        prepared = service.prepared.get("hcm")
        return int(prepared.payload["online"]["peak"]["total"]) if prepared else 0

    await until(stored, 2)
    await rig.send("hcm", "p2", t=T0 + 1)
    rig.now = T0 + 2
    await agg.tick()
    await until(shown, 3)  # shown from memory at once
    assert await stored() == 2  # not written yet: at most one write an hour here
    stopping.set()
    await running
    assert await stored() == 3  # the stop stored it


async def tick_at(rig: Rig, t: float) -> None:
    """The consume loop's tick at ``t``: the tallies as of then."""
    rig.now = t
    assert rig.aggregator is not None
    await rig.aggregator.tick()


async def test_the_numbers_are_stale_while_the_broker_is_silent(rig: Rig) -> None:
    """While the broker has not answered for ``SILENT_SECONDS``, the last good numbers stay,
    with their ``as_of``, marked stale: who is online does not wear away meanwhile (readers'
    beacons wait in ingest's spool). Once it answers again, the current numbers."""
    silent = [0.0]
    service = rig.service(silent=lambda: silent[0])
    await rig.send("hcm", "a", t=T0)
    await tick_at(rig, T0 + 1)
    await service.refresh()
    good = service.prepared["hcm"].payload
    assert good["stale"] is False and good["online"]["total"] == 1
    silent[0] = SILENT_SECONDS + 0.1
    await rig.send("hcm", "b", t=T0 + 1)
    await tick_at(rig, T0 + 400)  # past the window: the tally says no one is online
    await service.refresh()
    assert service.prepared["hcm"].payload == {**good, "stale": True}
    silent[0] = 0.2
    await service.refresh()
    now = service.prepared["hcm"].payload
    assert now["stale"] is False
    assert now["pageviews"]["total"] == good["pageviews"]["total"] + 1
    assert now["online"]["total"] == 0 and now["as_of"] != good["as_of"]


async def test_the_numbers_are_stale_while_the_group_rebalances(rig: Rig) -> None:
    """No member of the consumer group reads while it rebalances, however well the broker
    answers: after ``REBALANCE_STALE_SECONDS`` the last good numbers are marked stale (a new
    page view does not show), and the current ones come back with the assignment."""
    rebalancing = [0.0]
    service = rig.service(rebalancing=lambda: rebalancing[0])
    await rig.send("hcm", "a", t=T0)
    await tick_at(rig, T0 + 1)
    await service.refresh()
    good = service.prepared["hcm"].payload
    assert good["stale"] is False
    rebalancing[0] = REBALANCE_STALE_SECONDS - 0.5  # a short one goes unmarked
    await service.refresh()
    assert service.prepared["hcm"].payload["stale"] is False
    rebalancing[0] = REBALANCE_STALE_SECONDS + 0.1
    await rig.send("hcm", "b", t=T0 + 1)
    await tick_at(rig, T0 + 2)
    await service.refresh()
    assert service.prepared["hcm"].payload == {**good, "stale": True}
    rebalancing[0] = 0.0
    await service.refresh()
    now = service.prepared["hcm"].payload
    assert now["stale"] is False
    assert now["pageviews"]["total"] == good["pageviews"]["total"] + 1


async def test_the_numbers_are_stale_while_a_partition_is_counted_by_no_one(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """Another member of the group dies: its partition's beacons stop showing, and the group
    hands the partition on only after its session timeout. Every owner writes a row of each
    partition it counts every second; once a partition's latest row has stayed as it was for
    ``UNATTENDED_SECONDS``, the last good numbers are marked stale, and the log names it. The
    current ones come back when a new owner counts it. Only the partitions other processes
    count are judged (here the rig's aggregator stands for them): not one this process owns
    (its own reading and writing say how it goes), nor one the topic no longer has, nor any
    before the topic's partitions are known."""
    mono = [0.0]
    parts: list[list[int] | None] = [[0, 1]]
    service = rig.service(others=lambda: parts[0], monotonic=lambda: mono[0])
    agg = rig.aggregator
    assert agg is not None
    await rig.send("hcm", "a", t=T0)
    await rig.send("hcm", "b", t=T0, partition=1)
    await tick_at(rig, T0 + 1)
    await service.refresh()
    good = service.prepared["hcm"].payload
    assert good["stale"] is False and good["online"]["total"] == 2
    agg.forget([1])  # partition 1's owner is gone; this one still counts partition 0
    for second in range(2, 2 + int(UNATTENDED_SECONDS)):  # a while under the limit: fine
        await tick_at(rig, T0 + second)
        mono[0] = second - 1.0
        await service.refresh()
        assert service.prepared["hcm"].payload["stale"] is False, second
    last = service.prepared["hcm"].payload
    assert {**last, "as_of": good["as_of"]} == good
    t = rig.now
    await rig.send("hcm", "c", t=t + 1)
    await tick_at(rig, t + 2)
    mono[0] = UNATTENDED_SECONDS + 0.1
    with caplog.at_level("WARNING", logger="services.aggregate.counter"):
        await service.refresh()
    assert service.prepared["hcm"].payload == {**last, "stale": True}  # c does not show
    assert f"partitions 1 of {rig.topic} not counted" in caplog.text
    assert REGISTRY.get_sample_value("visitorstats_partitions_unattended") == 1
    parts[0] = None  # the topic's partitions not known: not judged
    await service.refresh()
    assert service.prepared["hcm"].payload["stale"] is False
    parts[0] = [0]  # nor is one this process now owns, or the topic no longer has
    await service.refresh()
    assert service.prepared["hcm"].payload["stale"] is False
    parts[0] = [0, 1]  # another's again: judged anew, with the same grace
    await service.refresh()
    assert service.prepared["hcm"].payload["stale"] is False
    mono[0] += UNATTENDED_SECONDS + 0.1
    await tick_at(rig, t + 3)
    await service.refresh()
    assert service.prepared["hcm"].payload["stale"] is True
    await agg.assign([1])  # the group hands it on: counted again
    await tick_at(rig, t + 4)
    await service.refresh()
    now = service.prepared["hcm"].payload
    assert now["stale"] is False
    assert now["pageviews"]["total"] == good["pageviews"]["total"] + 1
    assert now["online"]["total"] == 3
    assert REGISTRY.get_sample_value("visitorstats_partitions_unattended") == 0


async def test_the_numbers_are_stale_while_the_consumer_reads_far_behind(rig: Rig) -> None:
    """The broker answers, but records wait past what was read and nothing newer than
    ``BEHIND_STALE_SECONDS`` ago is written: the last good numbers, marked stale (a soak saw
    them minutes old, online fallen to 0, unmarked). Under a steady load records always wait,
    but what was written is a moment old: not stale."""
    waiting = [0]
    service = rig.service(behind=lambda: waiting[0])

    async def written(visitor: str, t: float, refresh_at: float) -> dict[str, Any]:
        await rig.send("hcm", visitor, t=t)
        service.note_flushed([int(t * 1000)])
        await tick_at(rig, refresh_at)
        await service.refresh()
        payload: dict[str, Any] = service.prepared["hcm"].payload
        return payload

    good = await written("a", T0, T0 + 1)
    assert good["stale"] is False
    waiting[0] = 500
    for i in range(1, 60, 3):  # records wait all along; each refresh sees one written 1 s ago
        steady = await written(f"s{i}", T0 + i, T0 + i + 1)
        assert steady["stale"] is False, i
    await tick_at(rig, T0 + 60 + BEHIND_STALE_SECONDS + 1)
    await service.refresh()
    assert service.prepared["hcm"].payload == {**steady, "stale": True}
    assert service.behind_seconds > BEHIND_STALE_SECONDS
    waiting[0] = 0  # caught up
    await service.refresh()
    assert service.prepared["hcm"].payload["stale"] is False and service.behind_seconds == 0


async def test_a_counter_with_no_numbers_yet_serves_the_stored_ones_stale_while_silent(
    rig: Rig,
) -> None:
    await rig.send("hcm", "a", t=T0)
    await tick_at(rig, T0 + 1)
    service = rig.service(silent=lambda: 60.0)
    await service.refresh()  # e.g. started while the broker was down
    payload = service.prepared["hcm"].payload
    assert payload["stale"] is True and payload["online"]["total"] == 1


def _stale_gauge(site: str) -> float | None:
    return REGISTRY.get_sample_value("visitorstats_snapshot_stale", {"site": site})


async def test_a_counter_kept_running_rebuilds_what_changed_and_restamps_the_rest(
    rig: Rig,
) -> None:
    """One service across many refreshes, as it runs: a site whose numbers are made of the same
    rows keeps its ETag and its numbers, with a newer ``as_of``; a new day, a visitor gone, a
    stale spell and its end, each change what they change, and the gauges follow."""
    silent = [0.0]
    service = rig.service(silent=lambda: silent[0])

    def shown(site: str) -> dict[str, Any]:
        prepared = service.prepared[site]
        assert orjson.loads(prepared.body) == prepared.payload
        return prepared.payload

    await rig.send("hcm", "a", t=T0)
    await tick_at(rig, T0 + 1)
    await service.refresh()
    first, first_tag = shown("hcm"), service.prepared["hcm"].etag
    assert first["visits"]["today"] == 1 and first["online"]["total"] == 1
    assert first["online"]["peak"] == {"total": 1, "at": "2026-03-04T10:00:01+07:00"}
    utc_tag = service.prepared["utc"].etag

    await tick_at(rig, T0 + 2)  # nothing new
    await service.refresh()
    assert service.prepared["hcm"].etag == first_tag
    assert shown("hcm") == {**first, "as_of": "2026-03-04T10:00:02+07:00"}

    silent[0] = SILENT_SECONDS + 1
    await tick_at(rig, T0 + 3)
    await service.refresh()
    stale = {**first, "as_of": "2026-03-04T10:00:02+07:00", "stale": True}  # the last good
    assert shown("hcm") == stale and _stale_gauge("hcm") == 1
    silent[0] = 0.0
    await service.refresh()  # the same rows as before the spell: fresh again all the same
    assert shown("hcm") == {**first, "as_of": "2026-03-04T10:00:03+07:00"}
    assert service.prepared["hcm"].etag == first_tag and _stale_gauge("hcm") == 0

    await rig.send("utc", "b", t=T0 + 3)  # another site's beacon changes that site alone
    await tick_at(rig, T0 + 4)
    await service.refresh()
    assert shown("utc")["pageviews"]["today"] == 1 and service.prepared["utc"].etag != utc_tag
    assert service.prepared["hcm"].etag == first_tag

    await tick_at(rig, at(HCM, 2026, 3, 4, 23, 59, 50))  # gone long ago, before midnight
    await service.refresh()
    assert shown("hcm")["online"]["total"] == 0 and shown("hcm")["visits"]["today"] == 1
    await tick_at(rig, at(HCM, 2026, 3, 5, 0, 0, 30))  # past midnight, nothing else new
    await service.refresh()
    thursday = shown("hcm")
    assert thursday["visits"] == {**first["visits"], "today": 0, "yesterday": 1}
    assert (
        thursday["online"]["total"] == 0 and thursday["online"]["peak"] == first["online"]["peak"]
    )
    assert REGISTRY.get_sample_value("visitorstats_online", {"site": "hcm", "kind": "total"}) == 0


async def test_every_site_of_a_large_registry_is_served(rig: Rig) -> None:
    """A refresh of thousands of sites lets the loop serve between slices of them; each site
    gets its own numbers all the same."""
    many = Registry.parse(
        "".join(f"[sites.s{i}]\nbaseline_visits = {i}\n\n" for i in range(2 * SITES_PER_SLICE + 7))
    )
    service = CounterService(rig.store, many, clock=lambda: T0, topic=rig.topic)
    await service.refresh()
    assert len(service.prepared) == len(many)
    assert all(service.prepared[s.id].payload["visits"]["total"] == s.baseline_visits for s in many)
