"""The standalone hand-off's journal (``LocalLog`` over an on-disk ``Spool``): a record is on
disk before it is taken, forgotten once ClickHouse holds it (``commit``), and what a killed
process left is read back by the next one, renumbered from ClickHouse's resume point."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services import metrics
from services.aggregate.sources import LocalLog
from services.ingest.publish_types import OutRecord
from services.ingest.spool import Spool, SpoolFullError


def record(i: int) -> OutRecord:
    return OutRecord(b"k", b"value-%d" % i, 0)


async def test_what_was_not_stored_is_read_back_by_the_next_process(tmp_path: Path) -> None:
    journal = Spool.claim(tmp_path, 1 << 20, metered=False)
    log = LocalLog(journal)
    for i in range(5):
        log.append(record(i))
    fetched = await log.fetch(0.1, 3)
    assert [r.offset for r in fetched] == [0, 1, 2]
    assert metrics.CONSUMER_LAG.labels("0")._value.get() == 2  # 3 and 4 wait behind them
    await log.commit({0: 3})  # ClickHouse holds 0-2
    assert len(journal) == 2
    journal.close()  # the process dies here, 3 and 4 taken but not stored

    journal = Spool.claim(tmp_path, 1 << 20, metered=False)
    again = LocalLog(journal)
    await again.seek({0: 3})  # ClickHouse's resume point
    back = await again.fetch(0.1, 10)
    assert [(r.offset, r.value) for r in back] == [(3, b"value-3"), (4, b"value-4")]
    again.append(record(5))
    await again.commit({0: 5})
    assert [r.value for r in await again.fetch(0.1, 10)] == [b"value-5"]
    assert len(journal) == 1
    await again.commit({0: 6})
    assert len(journal) == 0
    await again.stop()
    assert not [p for p in tmp_path.rglob("*.spool")]  # noqa: ASYNC240 - after the run


async def test_a_full_journal_takes_nothing(tmp_path: Path) -> None:
    log = LocalLog(Spool.claim(tmp_path, 30, metered=False))
    log.append(record(0))
    with pytest.raises(SpoolFullError):
        log.append(record(1))
    assert log.pending() == 1  # the refused record is not in the log either
    await log.stop()


def test_a_spool_emptied_then_reopened_keeps_what_comes_after(tmp_path: Path) -> None:
    """Every segment popped and deleted, ``head`` points past them: a restarted spool's new
    segments must come after it, or the next restart would take them for popped ones."""
    spool = Spool(tmp_path, 1 << 20)
    spool.append([record(0), record(1)])
    spool.pop(2)
    spool.close()
    for i in (2, 3):  # restarted, one record, killed; twice
        spool = Spool(tmp_path, 1 << 20)
        assert [r.value for r in spool.peek(10)] == [b"value-%d" % j for j in range(2, i)]
        spool.append([record(i)])
        spool.close()
    spool = Spool(tmp_path, 1 << 20)
    assert [r.value for r in spool.peek(10)] == [b"value-2", b"value-3"]
    spool.pop(1)
    spool.close()
    assert [r.value for r in Spool(tmp_path, 1 << 20).peek(10)] == [b"value-3"]


def test_the_spool_says_how_much_it_may_hold(tmp_path: Path) -> None:
    """Its capacity beside its bytes: "% full" can be watched before beacons get 503."""
    spool = Spool.claim(tmp_path, 123_456)
    try:
        sample = metrics.SPOOL_CAPACITY.collect()[0].samples[0]
        assert sample.value == 123_456
    finally:
        spool.close()


async def test_held_it_waits_out_the_backoff_whatever_arrives(tmp_path: Path) -> None:
    """While ClickHouse refuses writes the consumer holds the log paused and waits in ``fetch``
    between attempts: beacons still arriving must not cut that wait short (an outside audit saw
    about 90 attempts a second, each logged, each counted as an error)."""
    log = LocalLog(Spool.claim(tmp_path, 1 << 20, metered=False))
    log.pause(None)
    loop = asyncio.get_running_loop()
    for i in range(3):
        loop.call_later(0.05 * (i + 1), log.append, record(i))
    started = loop.time()
    assert await log.fetch(0.3, 1) == []
    assert loop.time() - started >= 0.3  # a lower bound: asyncio.sleep never ends early
    assert log.pending() == 3
    log.resume(None)
    assert [r.value for r in await log.fetch(0.1, 10)] == [b"value-0", b"value-1", b"value-2"]
