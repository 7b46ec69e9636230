"""Two aggregators counting the same partition (a zombie that lost it, and its new owner) on
the real ClickHouse engine (chDB): whichever writes first, every record is stored once, and
the loser learns it and rebuilds from ClickHouse."""

from __future__ import annotations

import uuid
from datetime import date

import pytest
from prometheus_client import REGISTRY

from services.aggregate.consume import Aggregator
from services.aggregate.sources import InRecord
from services.aggregate.store import Online, Store, online_rows
from services.record import Event, encode
from services.settings import Settings
from services.sites import Registry


def metric_value(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


pytestmark = pytest.mark.integration

SITES = """
[sites.hcm]
timezone = "Asia/Ho_Chi_Minh"
"""
TOPIC = "fence"
T0 = 1_790_000_000_000


def records(first: int, last: int) -> list[InRecord]:
    """Page views of 7 visitors, a heartbeat every third record, ``first..last`` inclusive."""
    out = []
    for offset in range(first, last + 1):
        kind = "heartbeat" if offset % 3 == 2 else "pageview"
        event = Event(
            str(uuid.UUID(int=offset + 1)),
            "hcm",
            kind,
            T0 + offset * 1000,
            f"{offset % 7:032x}",
            None,
            False,
            False,
            "https://portal.example.vn/",
            "",
            "",
        )
        out.append(InRecord(0, offset, encode(event)))
    return out


async def stored(store: Store) -> tuple[int, int, int, int]:
    """(rows, distinct offsets, page views, visits) of the partition."""
    row = await store.run(
        lambda c: c.query(
            "SELECT count(), uniqExact(kafka_offset), sum(pageview), sum(starts_visit) "
            "FROM events WHERE topic = {t:String}",
            parameters={"t": TOPIC},
        ).result_rows[0]
    )
    return tuple(int(x) for x in row)  # type: ignore[return-value]


def aggregator(store: Store) -> Aggregator:
    return Aggregator(store, Registry.parse(SITES), Settings(), TOPIC)


def expected(last: int) -> tuple[int, int, int, int]:
    """Every record once; a visit for each visitor with a page view (all of their events are
    one run: one who starts with a heartbeat has their visit at their first page view)."""
    n = last + 1
    pageviews = sum(1 for o in range(n) if o % 3 != 2)
    visits = len({o % 7 for o in range(n) if o % 3 != 2})
    return (n, n, pageviews, visits)


@pytest.mark.parametrize("zombie_first", [True, False])
async def test_a_zombie_write_is_fenced(store: Store, zombie_first: bool) -> None:
    # both own partition 0 at offset 20, after an earlier batch [0..19] was stored
    first = aggregator(store)
    assert await first.rebuild([0], {}) == {0: 0}
    first.process(records(0, 19))
    await first.write()

    zombie, owner = aggregator(store), aggregator(store)
    assert await zombie.rebuild([0], {}) == {0: 20}
    assert await owner.rebuild([0], {}) == {0: 20}
    zombie.process(records(20, 49))  # it then loses the partition, its batch unwritten
    owner.process(records(20, 79))  # the new owner counts further in one batch

    order = [zombie, owner] if zombie_first else [owner, zombie]
    await order[0].write()
    await order[1].write()
    # the second writer's insert carried the first one's token: dropped by ClickHouse, and the
    # writer knows its rows are not what is stored
    assert order[1].needs_reset == {0}
    assert not order[0].needs_reset
    stored_last = 79 if not zombie_first else 49
    assert await stored(store) == expected(stored_last)

    # the owner goes on from ClickHouse's word; every record is stored once
    if zombie_first:
        resume = await owner.rebuild([0], {})
        assert resume == {0: 50}
        owner.process(records(20, 99))  # a redelivery from before the resume point is skipped
    else:
        owner.process(records(80, 99))
    await owner.write()
    assert await stored(store) == expected(99)


async def test_a_retry_after_a_lost_answer_is_counted_once(store: Store) -> None:
    """The insert landed but its answer was lost: the retry (same rows, same token) stores
    nothing more, and the aggregator finds its rows there."""
    agg = aggregator(store)
    await agg.rebuild([0], {})
    agg.process(records(0, 29))
    batch = agg.batch
    await agg.write()
    agg.batch = batch  # as if write() had raised after the INSERT reached ClickHouse
    for pending in batch.parts.values():
        pending.written = False
    assert await agg.write() == {0: 30}
    assert not agg.needs_reset
    assert await stored(store) == expected(29)


async def test_records_below_the_resume_point_are_never_counted_again(store: Store) -> None:
    agg = aggregator(store)
    await agg.rebuild([0], {})
    agg.process(records(0, 9))
    await agg.write()
    # a restarted process; the broker redelivers from an older committed offset
    again = aggregator(store)
    assert await again.rebuild([0], {0: 5}) == {0: 10}
    again.process(records(5, 14))
    assert await again.write() == {0: 15}
    assert await stored(store) == expected(14)
    # a committed offset past the last row (the tail produced no row) is where it resumes
    third = aggregator(store)
    assert await third.rebuild([0], {0: 17}) == {0: 17}


async def test_a_background_write_then_the_next_batch(store: Store) -> None:
    """``begin_write`` (the consume loop's pipelining): the next records are counted while the
    batch is written; ``write`` settles both, in log order, each stored once."""
    agg = aggregator(store)
    await agg.rebuild([0], {})
    agg.process(records(0, 29))
    agg.begin_write()
    assert agg.batch.empty() and agg.writing is not None
    agg.process(records(30, 59))  # counted on the state that the batch in flight left
    assert agg.pending_rows == 60
    assert await agg.write(filling=False) == {0: 30}
    assert agg.writing is None and len(agg.batch) == 30
    agg.begin_write()
    agg.process(records(20, 79))  # a redelivery overlapping both batches: only 60.. counts
    assert await agg.write() == {0: 80}  # both settled, in turn
    assert agg.idle() and not agg.needs_reset
    assert await stored(store) == expected(79)


async def test_a_fenced_background_write_drops_what_was_counted_after_it(store: Store) -> None:
    """The owner's background write loses to a zombie's: the rows it counted since, on the
    state ClickHouse contradicts, are dropped, not committed, and counted again after the
    rebuild."""
    first = aggregator(store)
    await first.rebuild([0], {})
    first.process(records(0, 19))
    await first.write()
    zombie, owner = aggregator(store), aggregator(store)
    assert await zombie.rebuild([0], {}) == {0: 20}
    assert await owner.rebuild([0], {}) == {0: 20}
    zombie.process(records(20, 49))
    await zombie.write()  # the zombie's insert lands first
    owner.process(records(20, 39))
    owner.begin_write()  # same token as the zombie's: dropped by ClickHouse
    owner.process(records(40, 69))
    assert await owner.write(filling=False) == {}  # nothing of it to commit
    assert owner.needs_reset == {0}
    assert owner.batch.empty()  # 40..69 were counted after it: dropped
    assert owner.idle()
    assert await stored(store) == expected(49)
    assert await owner.rebuild([0], {}) == {0: 50}
    owner.process(records(40, 99))
    assert await owner.write() == {0: 100}
    assert await stored(store) == expected(99)


async def test_dropping_a_background_write_resets_both_batches(store: Store) -> None:
    agg = aggregator(store)
    await agg.rebuild([0], {})
    agg.process(records(0, 9))
    agg.begin_write()
    agg.process(records(10, 19))
    agg.drop_batch()  # a revoke that could not write: its insert may still land, fenced
    assert agg.idle() and agg.needs_reset == {0}
    assert agg.pending_rows == 0
    resume = await agg.rebuild([0], {})  # waits behind the insert on the store's thread
    agg.process(records(resume[0], 29))
    assert await agg.write() == {0: 30}
    assert await stored(store) == expected(29)


async def online(store: Store, now_ms: int) -> Online:
    snap = await store.snapshot({"hcm": 300}, date(2026, 1, 1), now_ms, TOPIC)
    return snap.online.get("hcm", Online())


@pytest.mark.parametrize("zombie_first", [True, False])
async def test_a_fenced_former_owners_late_tally_does_not_override_the_new_owners(
    store: Store, zombie_first: bool
) -> None:
    """Each partition's online tally is written with its flush, after the flush's rows are
    stored and checked: a fenced write writes none, and the counter takes, per partition, the
    tally of the greatest (next offset, at), so a former owner's tally written late (its clock
    later, its offset behind) never replaces the new owner's."""
    clock = [T0 / 1000]
    now = lambda: clock[0]  # noqa: E731

    def agg() -> Aggregator:
        return Aggregator(store, Registry.parse(SITES), Settings(), TOPIC, clock=now)

    first = agg()
    await first.rebuild([0], {})
    first.process(records(0, 19))
    await first.write()
    zombie, owner = agg(), agg()
    assert await zombie.rebuild([0], {}) == {0: 20}
    assert await owner.rebuild([0], {}) == {0: 20}
    zombie.process(records(20, 49))
    owner.process(records(20, 99))
    clock[0] += 100  # ts of record 99 (T0 + 99 s): all 7 visitors online until T0 + 399 s
    if zombie_first:
        await zombie.write()  # stored, its tally with it (next offset 50)
        await owner.write()  # fenced: no tally
        assert owner.needs_reset == {0}
        await owner.rebuild([0], {})
        owner.process(records(50, 99))
        await owner.write()
    else:
        await owner.write()
        await zombie.write()  # fenced: no tally
        assert zombie.needs_reset == {0}
    assert await stored(store) == expected(99)
    assert owner.states[0].tallies() == {"hcm": (7, 0, 0)}
    assert await online(store, int(clock[0] * 1000)) == Online(7, 0, 0)

    # the former owner, much later by its own clock (everyone gone), writes the tally of its
    # state, its offset behind the new owner's: the new owner's stays (read as of the owner's
    # clock: by the former's, the owner's tally is older than the window and counts no one)
    then = int(clock[0] * 1000)
    clock[0] += 1000
    former = zombie
    former.states[0].advance(int(clock[0] * 1000))
    assert former.states[0].tallies() == {"hcm": (0, 0, 0)}
    late = online_rows(TOPIC, 0, 50, int(clock[0] * 1000), former.states[0].tallies())
    await store.write_online(late)
    assert await online(store, then) == Online(7, 0, 0)
    # the owner's own tick moves it on
    await owner.tick()
    assert await online(store, int(clock[0] * 1000)) == Online(0, 0, 0)


async def test_a_log_begun_again_is_told_once_however_often_it_is_decided(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """Every rebuild until a row of the new log is stored decides it again (a broker's return
    often brings two rebalances): the same base each time, logged and counted once."""
    agg = aggregator(store)
    await agg.rebuild([0], {})
    agg.process(records(0, 9))
    await agg.write()
    asked: list[dict[int, tuple[int, str]]] = []

    async def lost(last: dict[int, tuple[int, str]]) -> dict[int, int]:
        asked.append(last)
        return {0: 0}  # the log holds no such record: begun again from offset 0

    told = metric_value("visitorstats_partition_logs_replaced_total")
    for _ in range(3):
        agg.forget([0])  # a revoke, then the partition assigned again
        assert await agg.rebuild([0], {}, replaced=lost) == {0: 10}
        assert agg.bases[0] == 10
    assert asked == [{0: (9, str(uuid.UUID(int=10)))}] * 3
    assert metric_value("visitorstats_partition_logs_replaced_total") == told + 1
    assert caplog.text.count("was lost and begun again") == 1
    agg.process([InRecord(0, 10, records(10, 10)[0].value)])  # the new log's first record
    assert await agg.write() == {0: 11}
