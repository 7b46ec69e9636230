"""A fetch that skips offsets (seen, rarely, from the Tansu broker under load): the records
after the hole are not counted, the partition is read again from the first missing offset, and
every record ends up stored once. A hole that comes back every time is taken as real (a topic
with transactions or compaction has such gaps) and counted past. Real chDB."""

from __future__ import annotations

import pytest

from services.aggregate.consume import GAP_RETRIES
from services.aggregate.store import Store
from tests.integration.test_fencing import aggregator, expected, records, stored

pytestmark = pytest.mark.integration


async def test_a_fetch_that_skipped_offsets_is_read_again(store: Store) -> None:
    agg = aggregator(store)
    assert await agg.rebuild([0], {}) == {0: 0}
    agg.process(records(0, 9) + records(15, 19))  # 10..14 skipped by the fetch
    assert agg.take_gaps() == {0: 10}
    assert agg.take_gaps() == {}
    assert agg.next_offset[0] == 10  # nothing after the hole was counted
    agg.process(records(10, 19))  # read again from 10
    assert agg.take_gaps() == {}
    await agg.write()
    assert await stored(store) == expected(19)


async def test_a_gap_that_stays_is_counted_past(store: Store) -> None:
    agg = aggregator(store)
    await agg.rebuild([0], {})
    for _ in range(GAP_RETRIES):
        agg.process(records(0, 4) + records(7, 9))
        assert agg.take_gaps() == {0: 5}
    agg.process(records(0, 4) + records(7, 9))  # the same hole again: the log has none there
    assert agg.take_gaps() == {}
    assert agg.next_offset[0] == 10
    await agg.write()
    rows, offsets, _, _ = await stored(store)
    assert (rows, offsets) == (8, 8)
