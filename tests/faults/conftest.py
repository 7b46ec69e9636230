"""Fixtures of the fault-injection suite: a deployment of real processes (Tansu, ingest and
aggregate processes, optionally the chDB-backed ClickHouse HTTP server) that a test can break
at will, and the check that compares every number of the counter with the ground truth."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.load import BASELINE_PAGEVIEWS, SITE, Plan
from tests.support.chdb_http import ChdbHttpServer
from tests.support.procs import Service, http, numbers, wait_counter, write_sites
from tests.support.tansu import Tansu

PARTITIONS = 4
TOPIC = "pageviews"
DLQ_TOPIC = "pageviews-dlq"


class Deployment:
    """Processes of one test, all stopped (or killed) at teardown."""

    def __init__(self, workdir: Path, broker: Tansu, clickhouse_url: str | None = None) -> None:
        self.workdir = workdir
        self.broker = broker
        self.clickhouse_url = clickhouse_url
        self.services: list[Service] = []
        self._n = 0
        write_sites(workdir)

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "VISITORSTATS_KAFKA_BOOTSTRAP": self.broker.bootstrap,
            # load tests send from many addresses, but a retried beacon must not be throttled
            "VISITORSTATS_RATE_LIMIT_PER_SECOND": "1000",
            "VISITORSTATS_RATE_LIMIT_BURST": "1000",
        }
        if self.clickhouse_url:
            env["VISITORSTATS_CLICKHOUSE_URL"] = self.clickhouse_url
        return {**env, **extra}

    def service(self, command: str, wait: bool = True, **env: str) -> Service:
        self._n += 1
        s = Service(command, self.workdir, self.env(**env), name=f"{command}-{self._n}")
        self.services.append(s)
        return s.start(wait_ready=wait, timeout=90)

    def ingest(self, **env: str) -> Service:
        return self.service("ingest", **env)

    def aggregate(self, wait: bool = True, **env: str) -> Service:
        return self.service("aggregate", wait=wait, **env)

    def teardown(self) -> None:
        for s in self.services:
            try:
                if s.proc is not None and s.proc.poll() is None:
                    s.stop(timeout=20)
            except Exception:
                s.kill()


@pytest.fixture
def broker(tansu: Tansu) -> Tansu:
    tansu.create_topic(TOPIC, PARTITIONS)
    tansu.create_topic(DLQ_TOPIC, 1)
    return tansu


@pytest.fixture
def deployment(tmp_path: Path, broker: Tansu) -> Iterator[Deployment]:
    d = Deployment(tmp_path, broker)
    try:
        yield d
    finally:
        d.teardown()


@pytest.fixture
def shared_deployment(
    tmp_path: Path, broker: Tansu, clickhouse: ChdbHttpServer
) -> Iterator[Deployment]:
    """Aggregate processes that share one ClickHouse through its HTTP interface."""
    d = Deployment(tmp_path, broker, clickhouse.dsn)
    try:
        yield d
    finally:
        d.teardown()


def assert_counter(base: str, plan: Plan, timeout: float = 120) -> dict[str, Any]:
    """Wait until the counter equals the plan's ground truth, number for number, and is not
    stale; fail with both when it does not get there."""

    def matches(c: dict[str, Any]) -> bool:
        return not c["stale"] and numbers(c) == plan.expected(c["as_of"])

    got = wait_counter(base, SITE, matches, timeout=timeout)
    assert got, "no counter answered"
    assert numbers(got) == plan.expected(got["as_of"])
    assert got["stale"] is False
    return got


def counted_pageviews(base: str) -> int:
    """Page views counted so far (0 while the counter does not answer)."""
    status, _, body = http("GET", f"{base}/v1/sites/{SITE}/counter", timeout=5)
    if status != 200:
        return 0
    return int(json.loads(body)["pageviews"]["total"]) - BASELINE_PAGEVIEWS


def wait_counting(base: str, above: int, timeout: float = 120) -> int:
    """Wait until the counter shows more than ``above`` page views; return how many."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            n = counted_pageviews(base)
        except OSError:
            n = 0
        if n > above:
            return n
        assert time.monotonic() < deadline, f"nothing counted beyond {above} in {timeout}s"
        time.sleep(0.1)


def metric(base: str, name: str) -> float:
    """The value of one unlabelled Prometheus sample of a service."""
    status, _, body = http("GET", f"{base}/metrics")
    assert status == 200
    m = re.search(rf"^{re.escape(name)} (\S+)$", body.decode(), re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def wait_consuming(service: Service, timeout: float = 120) -> None:
    """Wait until an aggregate process owns partitions and is consuming records from them
    (no rebalance under way)."""
    deadline = time.monotonic() + timeout
    before = None
    while True:
        try:
            status, _, body = http("GET", f"{service.url}/metrics", timeout=5)
            text = body.decode()
        except OSError:
            status, text = 0, ""
        if status == 200 and "visitorstats_consumer_lag{" in text:
            consumed = metric(service.url, "visitorstats_events_consumed_total")
            if before is not None and consumed > before:
                return
            before = consumed
        assert time.monotonic() < deadline, f"{service.name} is not consuming"
        time.sleep(0.3)


def owned_partitions(service: Service) -> set[int]:
    """The partitions an aggregate process reports a lag for: the ones it owns."""
    try:
        status, _, body = http("GET", f"{service.url}/metrics", timeout=5)
    except OSError:
        return set()
    if status != 200:
        return set()
    return {
        int(p)
        for p in re.findall(
            r'^visitorstats_consumer_lag\{partition="(\d+)"\}', body.decode(), re.MULTILINE
        )
    }


def wait_for(
    predicate: Any,
    timeout: float = 60,
    what: str = "condition",
    said: Callable[[], str] | None = None,
) -> None:
    """Wait for ``predicate``; on a timeout, fail with what ``said`` tells (a process's log)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out waiting for {what}" + (f"\n{said()}" if said else ""))
        time.sleep(0.1)
