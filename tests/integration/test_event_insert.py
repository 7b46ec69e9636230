"""``Store.insert_events`` sends the rows as JSONCompactColumns text (``event_columns_json``): the
rows stored must be exactly those of clickhouse-connect's Native insert of the same columns
(``event_columns``), on chDB and over HTTP, whatever the strings hold."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from services.aggregate.counting import Row
from services.aggregate.store import EVENT_COLUMNS, Store, event_columns, event_columns_json
from services.record import Event
from tests.support.chdb_http import ChdbHttpServer

pytestmark = pytest.mark.integration

T0 = 1_790_000_000_000

STRINGS = [
    "",
    "plain",
    'a "quoted" title',
    "back\\slash \\N \\n \\t",
    "line\nbreak\r\nand\ttab",
    "nul\x00byte and \x1f control",
    "Tin tức — Cổng thông tin điện tử",
    "emoji 🎉 and \u2028 \u2029 separators",
    "NULL",
    "null",
    "None",
    "[1, 2]",
    '{"json": true}',
    "'single' ,comma, ;",
    "x" * 4096,
]
TIMESTAMPS = [
    0,
    1,
    999,
    1000,
    1001,
    T0,
    T0 + 1,
    T0 + 999,
    1_000_000_000_001,
    4_102_444_799_999,  # 2099-12-31 23:59:59.999
    253_402_300_799_999,  # the last millisecond that goes as text
]
UUIDS = [
    str(uuid.UUID(int=0)),
    str(uuid.UUID(int=2**128 - 1)),
    "0123abcd-4567-89ef-0123-456789abcdef",
    str(uuid.UUID(int=7, version=4)),
]
DAYS = [date(1970, 1, 1), date(2026, 5, 28), date(2149, 6, 6)]


def rows(count: int = 60) -> list[Row]:
    out = []
    for i in range(count):
        s = STRINGS[i % len(STRINGS)]
        event = Event(
            UUIDS[i % len(UUIDS)] if i < len(UUIDS) else str(uuid.UUID(int=i * 7919, version=4)),
            ("site-" + s[:20]) if i % 5 == 0 and s else "hcm",
            ("pageview", "heartbeat", "leave")[i % 3],
            TIMESTAMPS[i % len(TIMESTAMPS)],
            f"{i:032x}" if i % 2 else "visitor " + s[:30],
            None,
            i % 4 == 1,
            i % 7 == 3,
            s,
            STRINGS[(i + 3) % len(STRINGS)],
            STRINGS[(i + 5) % len(STRINGS)][:1024],
            (0, 1, 999, 500)[i % 4],
        )
        out.append(
            Row(
                event,
                f"{i * 3:032x}" if i % 3 else event.visitor,
                i % 2 == 0,
                event.type == "pageview" and not event.bot,
                DAYS[i % len(DAYS)],
                i % 3,
                10 * i + 2**40 * (i % 2),
                i % 5 != 0,
            )
        )
    return out


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChdbHttpServer]:
    with ChdbHttpServer(tmp_path_factory.mktemp("chdb") / "data") as srv:
        yield srv


# The HTTP server is shared by the tests of this module: each test writes its own topics.
@pytest.fixture(params=["chdb", "http"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "chdb":
        s = Store(f"chdb://{tmp_path}/clickhouse")
    else:
        server: ChdbHttpServer = request.getfixturevalue("http_server")
        s = Store(server.dsn)
    await s.migrate()
    try:
        yield s
    finally:
        s.close()


async def stored(store: Store, topic: str) -> list[tuple[Any, ...]]:
    """Every column but the topic, with ``ts`` as integer milliseconds, in offset order."""
    columns = [
        "toUnixTimestamp64Milli(ts)" if c == "ts" else c for c in EVENT_COLUMNS if c != "topic"
    ]
    return await store.run(
        lambda c: (
            c.query(
                f"SELECT {', '.join(columns)} FROM events WHERE topic = {{t:String}} "
                "ORDER BY kafka_partition, kafka_offset",
                parameters={"t": topic},
            ).result_rows
        )
    )


async def native_insert(store: Store, batch: list[Row], topic: str, base: int = 0) -> None:
    columns = event_columns(batch, topic, base)
    await store.run(
        lambda c: c.insert("events", columns, column_names=EVENT_COLUMNS, column_oriented=True)
    )


async def test_json_insert_stores_what_the_native_insert_stores(store: Store) -> None:
    batch = rows()
    base = 2**40 + 3  # a partition whose log was begun again (consume.py, 10)
    assert event_columns_json(batch, "json", base) is not None
    await store.insert_events(batch, "json", "json;0;0", base)
    await native_insert(store, batch, "native", base)
    got = await stored(store, "json")
    assert got == await stored(store, "native")
    assert len(got) == len(batch)
    by_offset = {r.offset: r for r in batch}
    for values in got:
        r = by_offset[values[-2]]
        e = r.event
        assert values == (
            e.site,
            uuid.UUID(e.event_id),
            e.type,
            e.ts,
            e.micros,
            r.day,
            r.visitor,
            e.visitor,
            int(e.member),
            int(e.bot),
            int(r.starts_visit),
            int(r.in_visit),
            int(r.pageview),
            e.url,
            e.referrer,
            e.title,
            r.partition,
            r.offset,
            base,
        )


async def test_the_token_fences_a_second_insert(store: Store) -> None:
    batch = rows(10)
    await store.insert_events(batch, "fenced", "fenced;0;0")
    await store.insert_events(batch, "fenced", "fenced;0;0")
    assert len(await stored(store, "fenced")) == len(batch)
    await store.insert_events(batch, "fenced", "fenced;0;0;1")
    assert len(await stored(store, "fenced")) == 2 * len(batch)


@pytest.mark.parametrize("ts", [253_402_300_800_000, 2**53 - 1])
async def test_a_time_stamp_text_cannot_carry_goes_as_native_columns(store: Store, ts: int) -> None:
    batch = rows(6)
    batch[2] = batch[2]._replace(event=batch[2].event._replace(ts=ts))
    topic = f"far-{ts}"
    assert event_columns_json(batch, topic) is None
    await store.insert_events(batch, topic, f"{topic};0;0")
    await native_insert(store, batch, f"{topic}-native")
    got = await stored(store, topic)
    assert got == await stored(store, f"{topic}-native")
    assert sorted(values[3] for values in got) == sorted(r.event.ts for r in batch)
