"""A ClickHouse that hangs (SIGSTOP: its socket open, no answer) under the counter: the numbers
are marked stale once a refresh has gone unanswered for ``SLOW_REFRESH_STALE_SECONDS``, not
when the refresh gives up 10 s later (an outside audit saw them served as fresh for 10.5 s);
and fresh again once it answers. A real ClickHouse engine behind the HTTP interface."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from services.aggregate.counter import CounterService
from services.aggregate.store import Store
from services.sites import Registry
from tests.support.chdb_http import ChdbHttpServer

pytestmark = pytest.mark.integration

SITE = "hue"


async def until(predicate: Callable[[], object], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_a_hung_clickhouse_makes_the_numbers_stale_before_the_refresh_gives_up(
    clickhouse: ChdbHttpServer,
) -> None:
    store = Store(clickhouse.dsn)
    await store.migrate()
    counter = CounterService(store, Registry.parse(f'[sites.{SITE}]\ntimezone = "UTC"\n'), 0.2)
    stopping = asyncio.Event()
    task = asyncio.create_task(counter.run(stopping))
    try:
        await until(lambda: SITE in counter.prepared, 30)
        fresh = counter.prepared[SITE].payload
        assert fresh["stale"] is False
        clickhouse.pause()
        try:
            await until(lambda: counter.prepared[SITE].payload["stale"], 30)
            # said while the refresh still waits (it gives up after 10 s): the slow path's
            assert counter.reads_failing() == 0 and counter.read_error == ""
            stale = counter.prepared[SITE].payload
            assert numbers(stale) == numbers(fresh)  # the last numbers
        finally:
            clickhouse.resume()
        await until(lambda: not counter.prepared[SITE].payload["stale"], 60)
    finally:
        stopping.set()
        await task
        store.close()


def numbers(payload: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if k not in ("as_of", "stale")}
