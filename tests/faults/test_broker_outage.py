"""The broker unreachable (Tansu frozen with SIGSTOP) while beacons flow: ingest keeps
accepting into its on-disk spool and delivers everything once the broker is back, the counter
is marked stale while the broker is silent and not after; a full spool answers 503 with
Retry-After and fails /readyz; SIGTERM drains. And the broker restarted without its log: what
was counted stays, and what comes after is counted."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from services.aggregate.counter import SILENT_SECONDS
from tests.faults.conftest import (
    DLQ_TOPIC,
    PARTITIONS,
    TOPIC,
    Deployment,
    assert_counter,
    metric,
    wait_for,
)
from tests.faults.load import Plan, Sender
from tests.support.procs import Service, counter, http, wait_counter

pytestmark = pytest.mark.faults

OUTAGE_SECONDS = 20


def spooled_bytes(workdir: Path) -> int:
    return sum(p.stat().st_size for p in (workdir / "data" / "spool").glob("*/*.spool"))


def ready(service: Service) -> tuple[int, dict[str, object]]:
    status, _, body = http("GET", f"{service.url}/readyz")
    return status, json.loads(body)


def test_broker_paused_during_the_stream(deployment: Deployment) -> None:
    d = deployment
    ingest = d.ingest()
    aggregate = d.aggregate()
    plan = Plan.generate(10_000, seed=13)
    sender = Sender([ingest.url], plan, rate=250).start()
    sender.wait_progress(0.2)

    d.broker.pause()
    paused_at = time.monotonic()
    accepted_before = sender.sent
    # ingest keeps answering 202 (into its spool) and stays ready
    wait_for(lambda: sender.sent > accepted_before + 1000, timeout=90, what="202s while paused")
    assert metric(ingest.url, "visitorstats_spool_depth") > 0
    status, body = ready(ingest)
    assert status == 200, body
    # the counter keeps being served meanwhile, marked stale once the broker has been silent
    assert http("GET", f"{aggregate.url}/v1/sites/dongha/counter")[0] == 200
    left = OUTAGE_SECONDS - (time.monotonic() - paused_at)
    stale = wait_counter(aggregate.url, "dongha", lambda c: c["stale"], timeout=left)
    assert stale["stale"] is True, stale
    assert time.monotonic() - paused_at >= SILENT_SECONDS  # not before the broker fell silent
    time.sleep(1.5)  # the last good numbers stay as they were, with their as_of
    assert counter(aggregate.url, "dongha") == stale
    time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - paused_at)))
    d.broker.resume()

    sender.join()
    assert set(sender.statuses) == {202}, sender.statuses  # nothing refused, nothing retried
    assert_counter(aggregate.url, plan)
    wait_for(lambda: metric(ingest.url, "visitorstats_spool_depth") == 0, what="spool drained")
    assert spooled_bytes(d.workdir) == 0


def test_full_spool_refuses_and_sigterm_drains(deployment: Deployment) -> None:
    d = deployment
    small = {"VISITORSTATS_SPOOL_MAX_BYTES": str(64 * 1024)}
    ingest = d.ingest(**small)
    aggregate = d.aggregate()
    plan = Plan.generate(3_000, seed=14)

    # 1. Broker down: the spool fills, then beacons are refused with 503 + Retry-After, and
    #    the service says it is not ready.
    d.broker.pause()
    first = Sender([ingest.url], plan, threads=4, retry=False).start().join(timeout=300)
    assert first.statuses[202] > 100, first.statuses
    assert first.statuses[503] > 0, first.statuses
    status, body = ready(ingest)
    assert status == 503 and "publish" in body["failing"], body  # type: ignore[operator]
    status, headers, _ = http(
        "POST",
        f"{ingest.url}/collect",
        json.dumps({"site": "dongha", "url": "https://portal.example.vn/"}).encode(),
        {"Content-Type": "text/plain", "X-Forwarded-For": "10.200.0.1"},
    )
    assert status == 503 and int(headers["Retry-After"]) >= 1

    # 2. SIGTERM while the broker is still away: what is spooled stays on disk...
    assert ingest.stop(timeout=60) == 0
    assert spooled_bytes(d.workdir) > 0
    # ...and the next process that claims the spool delivers it once the broker is back.
    d.broker.resume()
    ingest = d.ingest(**small)
    wait_for(lambda: spooled_bytes(d.workdir) == 0, timeout=90, what="the old spool delivered")

    # 3. Broker down again; beacons spooled; broker back and SIGTERM at once: the process
    #    drains its spool before it exits.
    d.broker.pause()
    second = Sender([ingest.url], plan, threads=4, retry=False).start().join(timeout=300)
    assert second.statuses[202] > 0
    d.broker.resume()
    assert ingest.stop(timeout=60) == 0
    assert spooled_bytes(d.workdir) == 0

    # Everything refused is sent again (same event_ids) and accepted: the counter holds
    # every beacon once, however many times it was sent.
    ingest = d.ingest()
    Sender([ingest.url], plan).start().join()
    assert_counter(aggregate.url, plan)


def test_broker_restarted_without_its_log(deployment: Deployment) -> None:
    """Tansu keeps its log in memory: restarted, it has the topic's partitions again, empty,
    with offsets from 0 (as a topic deleted and made anew has). Beacons accepted after the
    restart are counted on top of those counted before; none of before is counted again."""
    d = deployment
    ingest = d.ingest()
    aggregate = d.aggregate()
    before = Plan.generate(1_500, seed=15)
    assert set(Sender([ingest.url], before).start().join().statuses) == {202}
    assert_counter(aggregate.url, before)

    d.broker.stop()
    d.broker.start()
    d.broker.create_topic(TOPIC, PARTITIONS)
    d.broker.create_topic(DLQ_TOPIC, 1)
    after = Plan.generate(1_500, seed=16, first_client=100_000)
    assert set(Sender([ingest.url], after).start().join().statuses) == {202}
    assert_counter(aggregate.url, Plan(before.visitors + after.visitors))
    assert metric(aggregate.url, "visitorstats_partition_logs_replaced_total") > 0
