"""ClickHouse unreachable at the aggregate service while beacons flow: first killed (connection
refused), then frozen (SIGSTOP: connections hang). The service keeps serving the last good
numbers marked ``"stale": true``, retries, and after recovery counts every beacon once."""

from __future__ import annotations

import json
import time
from typing import Any

import clickhouse_connect
import pytest

from tests.faults.conftest import (
    Deployment,
    assert_counter,
    counted_pageviews,
    wait_counting,
    wait_for,
)
from tests.faults.load import SITE, Plan, Sender
from tests.support.chdb_http import ChdbHttpServer
from tests.support.procs import Service, counter, http, numbers, wait_counter

pytestmark = pytest.mark.faults

OUTAGE_SECONDS = 12
WRITE_FAILED = "ClickHouse write failed"


def insert_errors(url: str) -> float:
    _, _, body = http("GET", f"{url}/metrics")
    for line in body.decode().splitlines():
        if line.startswith('visitorstats_clickhouse_errors_total{operation="insert"}'):
            return float(line.rpartition(" ")[2])
    raise AssertionError("no insert error series")


def outage(aggregate: Service, sender: Sender, stop: Any, restore: Any) -> None:
    """Break ClickHouse while the stream flows; check the counter goes stale with the last good
    numbers, and comes back fresh after ``restore``."""
    wait_counting(aggregate.url, counted_pageviews(aggregate.url))
    errors, failed = insert_errors(aggregate.url), aggregate.log().count(WRITE_FAILED)
    started = time.monotonic()
    stop()
    stale = wait_counter(aggregate.url, SITE, lambda c: c["stale"], timeout=60)
    assert stale["stale"] is True, stale
    before = sent = sender.sent
    # while it lasts: the same numbers, still stale, never made up; not ready
    wait_for(lambda: sender.sent > sent + 200, what="beacons accepted during the outage")
    again = counter(aggregate.url, SITE)
    assert again["stale"] is True
    assert numbers(again) == numbers(stale)
    assert again["as_of"] == stale["as_of"]
    status, _, body = http("GET", f"{aggregate.url}/readyz")
    assert status == 503
    checks = json.loads(body)["checks"]
    check = checks["clickhouse"]
    assert not check["ok"] and check["detail"].strip(": ") not in ("", "check failed"), check
    assert checks["kafka"]["ok"], checks  # the broker is not blamed for it
    time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - started)))
    # every failed write is counted, a client that could not even be made too (an outside
    # audit saw 48 failed writes counted as 4)
    failed = aggregate.log().count(WRITE_FAILED) - failed
    assert insert_errors(aggregate.url) - errors >= failed, (failed, errors)
    restore()
    fresh = wait_counter(aggregate.url, SITE, lambda c: not c["stale"], timeout=90)
    assert fresh["stale"] is False, fresh
    assert sender.sent > before


def test_clickhouse_down_during_the_stream(
    shared_deployment: Deployment, clickhouse: ChdbHttpServer
) -> None:
    d = shared_deployment
    ingest = d.ingest()
    aggregate = d.aggregate()
    # 120 s at 200/s: outlasts both outages even on a loaded machine (what is left is sent at
    # full speed once they are over)
    plan = Plan.generate(24_000, seed=15)
    sender = Sender([ingest.url], plan, rate=200).start()

    outage(aggregate, sender, clickhouse.kill, clickhouse.start)
    outage(aggregate, sender, clickhouse.pause, clickhouse.resume)
    # ClickHouse answers every read but refuses the events' inserts ("Too many parts", as when
    # merges fall behind): the numbers stop following the beacons, so they are stale too
    client = clickhouse_connect.get_client(dsn=clickhouse.dsn)
    refusing = "ALTER TABLE events MODIFY SETTING parts_to_throw_insert = 1"
    taking = "ALTER TABLE events RESET SETTING parts_to_throw_insert"
    outage(aggregate, sender, lambda: client.command(refusing), lambda: client.command(taking))
    print(f"outages over at {sender.progress():.0%} of the stream")
    sender.rate = 0
    sender.join()
    assert_counter(aggregate.url, plan)


def test_a_stop_while_clickhouse_refuses_writes_ends_and_loses_nothing(
    shared_deployment: Deployment, clickhouse: ChdbHttpServer
) -> None:
    """SIGTERM while the background write of a batch is being retried: the stop gives it up
    after ``STOP_WRITE_SECONDS`` and ends (an outside audit saw it retried until the 75 s
    watchdog, past Kubernetes' grace period); the next process counts what it held."""
    d = shared_deployment
    ingest = d.ingest()
    aggregate = d.aggregate()
    plan = Plan.generate(3_000, seed=16)
    sender = Sender([ingest.url], plan, rate=300).start()
    wait_counting(aggregate.url, 0)
    client = clickhouse_connect.get_client(dsn=clickhouse.dsn)
    client.command("ALTER TABLE events MODIFY SETTING parts_to_throw_insert = 1")
    wait_for(lambda: aggregate.log().count(WRITE_FAILED) >= 2, what="writes refused")
    assert aggregate.stop(timeout=70) == 0
    log = aggregate.log()
    assert "stopping with an unwritten batch" in log and "is stuck" not in log, log
    client.command("ALTER TABLE events RESET SETTING parts_to_throw_insert")
    again = d.aggregate()
    sender.join()
    assert_counter(again.url, plan)
