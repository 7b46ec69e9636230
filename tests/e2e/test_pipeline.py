"""End to end on real processes: the broker (Tansu), ``visitorstats ingest`` and
``visitorstats aggregate`` (chDB), and the same traffic through ``visitorstats run``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.metrics import AGGREGATE, INGEST, families
from tests.e2e.traffic import Truth, portal_traffic
from tests.support.procs import (
    SITES_TOML,
    Service,
    http,
    numbers,
    send_beacon,
    wait_counter,
    write_sites,
)
from tests.support.tansu import Tansu

pytestmark = pytest.mark.e2e
SITE = "dongha"
BASELINE_VISITS = 23070412
BASELINE_PAGEVIEWS = 1000


def metric_families(url: str) -> set[str]:
    status, _, body = http("GET", f"{url}/metrics")
    assert status == 200
    return {f.name for f in text_string_to_metric_families(body.decode())}


def expected(truth: Truth) -> dict[str, Any]:
    def period(n: int, base: int) -> dict[str, int]:
        return {
            "today": n,
            "yesterday": 0,
            "this_week": n,
            "this_month": n,
            "total": base + n,
        }

    return {
        "online": truth.online,
        "visits": period(truth.visits, BASELINE_VISITS),
        "pageviews": period(truth.pageviews, BASELINE_PAGEVIEWS),
    }


@pytest.fixture
def kafka_deployment(tmp_path: Path, tansu: Tansu) -> Iterator[tuple[Service, Service]]:
    tansu.create_topic("pageviews", 4)
    write_sites(tmp_path)
    env = {"VISITORSTATS_KAFKA_BOOTSTRAP": tansu.bootstrap}
    ingest = Service("ingest", tmp_path, env).start()
    aggregate = Service("aggregate", tmp_path, env).start()
    try:
        yield ingest, aggregate
    finally:
        ingest.stop()
        aggregate.stop()


def test_kafka_path_and_standalone_give_the_same_exact_numbers(
    tmp_path: Path, kafka_deployment: tuple[Service, Service]
) -> None:
    ingest, aggregate = kafka_deployment
    truth = portal_traffic(ingest.url, SITE)
    want = expected(truth)
    got = wait_counter(aggregate.url, SITE, lambda c: numbers(c) == want)
    assert numbers(got) == want
    assert got["stale"] is False
    assert got["online"]["peak"]["total"] >= truth.online["total"]
    # each service's /metrics shows its own families and the shared ones, not the other's at 0
    shown = {s.command: metric_families(s.url) for s in (ingest, aggregate)}
    assert "visitorstats_beacons_published" in shown["ingest"]
    assert "visitorstats_events_consumed" in shown["aggregate"]
    assert families(AGGREGATE) & shown["ingest"] == set()
    assert families(INGEST) & shown["aggregate"] == set()
    assert {"visitorstats_http_connections", "process_cpu_seconds"} <= shown["ingest"]
    assert {"visitorstats_http_connections", "process_cpu_seconds"} <= shown["aggregate"]

    standalone_dir = tmp_path / "standalone"
    standalone_dir.mkdir()
    write_sites(standalone_dir)
    run = Service("run", standalone_dir).start()
    try:
        truth_run = portal_traffic(run.url, SITE)
        assert expected(truth_run) == want
        got_run = wait_counter(run.url, SITE, lambda c: numbers(c) == want)
        assert numbers(got_run) == numbers(got)
        assert families(INGEST) | families(AGGREGATE) <= metric_families(run.url)  # both
    finally:
        run.stop()


def test_totals_survive_a_restart_of_the_aggregate_service(
    tmp_path: Path, kafka_deployment: tuple[Service, Service]
) -> None:
    ingest, aggregate = kafka_deployment
    truth = portal_traffic(ingest.url, SITE, clients=5)
    want = expected(truth)
    assert numbers(wait_counter(aggregate.url, SITE, lambda c: numbers(c) == want)) == want
    assert aggregate.stop() == 0
    aggregate.start()
    after = wait_counter(aggregate.url, SITE, lambda c: numbers(c) == want)
    assert numbers(after) == want


def test_a_site_that_reached_ingest_before_the_aggregate_loses_no_beacon(
    tmp_path: Path, kafka_deployment: tuple[Service, Service]
) -> None:
    """A rollout of a new sites.toml restarts ingest before the aggregate: the aggregate
    counts the new site's beacons meanwhile, in the time zone the records name, and serves
    them once it has the site too (an outside audit saw them dead-lettered, never counted)."""
    ingest, aggregate = kafka_deployment
    write_sites(tmp_path, SITES_TOML + '\n[sites.moi]\nname = "Cổng mới"\ntimezone = "UTC"\n')
    assert ingest.stop() == 0
    ingest.start()
    for i in range(5):
        assert send_beacon(ingest.url, "moi", client=f"203.0.113.{i + 1}") == 202
    deadline = time.monotonic() + 30
    while "this service's registry does not have" not in aggregate.log():
        assert time.monotonic() < deadline, aggregate.log()
        time.sleep(0.2)
    assert "moi" in aggregate.log()
    assert http("GET", f"{aggregate.url}/v1/sites/moi/counter")[0] == 404  # not its site yet
    _, _, body = http("GET", f"{aggregate.url}/metrics")
    assert "\nvisitorstats_dead_letters_total 0.0\n" in body.decode()
    assert aggregate.stop() == 0
    aggregate.start()
    got = wait_counter(aggregate.url, "moi", lambda c: c["pageviews"]["total"] == 5)
    assert got["pageviews"]["total"] == 5 and got["visits"]["today"] == 5, got


def test_standalone_graceful_stop_loses_no_accepted_beacon(tmp_path: Path) -> None:
    write_sites(tmp_path)
    run = Service("run", tmp_path).start()
    truth = portal_traffic(run.url, SITE, clients=8)
    assert run.stop() == 0  # SIGTERM right after the last 202: nothing may be lost
    run.start()
    want = expected(truth)
    got = wait_counter(run.url, SITE, lambda c: numbers(c)["visits"] == want["visits"])
    try:
        assert got["visits"] == want["visits"]
        assert got["pageviews"] == want["pageviews"]
    finally:
        run.stop()
