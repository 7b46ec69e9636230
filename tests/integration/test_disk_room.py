"""The room the embedded ClickHouse has reserved on its disk (``Store.reserved_bytes``): what a
journal on the same disk keeps free besides its own reserve (``Spool.hold``), since a part that
the disk cut short in the middle of its write is committed by chDB all the same. The real
engine: a large insert reserves its part's room while it writes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.aggregate.store import Store
from services.standalone import _same_disk

pytestmark = pytest.mark.integration


async def test_clickhouse_reserves_room_while_it_writes_a_part_and_frees_it_after(
    store: Store,
) -> None:
    assert await store.reserved_bytes() == 0  # idle
    await store.run(
        lambda c: c.command("CREATE TABLE big (a UInt64, s String) ENGINE = MergeTree ORDER BY a")
    )
    insert = asyncio.ensure_future(
        store.run(
            lambda c: c.command(
                "INSERT INTO big SELECT number, randomPrintableASCII(100) FROM numbers(1500000)"
            )
        )
    )
    seen = []
    while not insert.done():
        seen.append(await store.reserved_bytes())  # (on the reading thread, beside the write)
    await insert
    assert max(seen) >= 1 << 20, seen  # at least the 1 MiB ClickHouse reserves for a part
    assert await store.reserved_bytes() == 0


def test_the_journal_holds_clickhouses_room_only_on_its_disk(tmp_path: Path) -> None:
    journal = tmp_path / "data" / "journal"
    journal.mkdir(parents=True)
    assert _same_disk(journal, f"chdb://{tmp_path}/data/clickhouse")  # made, as the store does
    assert (tmp_path / "data" / "clickhouse").is_dir()
    assert not _same_disk(journal, "http://default:@127.0.0.1:8123/default")
    assert not _same_disk(journal, "chdb:///proc/clickhouse")  # another file system
