"""``visitorstats ingest`` killed hard (SIGKILL) while beacons flow, in both publishing modes:

* ``VISITORSTATS_PUBLISH_ACK=broker``: every beacon answered 202 was acknowledged by the broker
  first;
* ``VISITORSTATS_PUBLISH_ACK=spool``: every beacon answered 202 was in the spool on disk first,
  and the next ingest process ships what the dead one had not.

Either way the aggregate counts every accepted beacon (and at most the one request cut off by
the kill, whose record may have been made safe without its answer), none twice, and each once
again when they are all sent a second time to the next ingest process."""

from __future__ import annotations

import random
import time

import pytest

from tests.faults.conftest import Deployment, assert_counter, counted_pageviews, wait_for
from tests.faults.load import Plan, Sender
from tests.support.procs import Service

pytestmark = pytest.mark.faults


def spooled(d: Deployment) -> int:
    return sum(p.stat().st_size for p in (d.workdir / "data" / "spool").glob("*/*.spool"))


def kill_under_load(ingest: Service, plan: Plan, pause: float) -> int:
    """Send ``plan`` one beacon after another, kill ``ingest`` ``pause`` seconds after a third
    of it; how many beacons were answered 202."""
    sender = Sender([ingest.url], plan, threads=1, retry=False, rate=300).start()
    sender.wait_progress(0.3)
    time.sleep(pause)
    ingest.kill()
    sender.stop()
    accepted = len(sender.accepted)
    assert 0 < accepted < len(plan)
    return accepted


def all_counted_once(d: Deployment, aggregate: Service, ingest: Service, plan: Plan) -> None:
    """Once the next ingest process is up: sent again, every beacon is counted once; and
    nothing is left in the spool."""
    ingest.start(wait_ready=True, timeout=90)
    for v in plan.visitors:
        v.first_sent = None
    again = Sender([ingest.url], plan).start().join()
    assert again.statuses[202] == len(plan)
    assert_counter(aggregate.url, plan)
    wait_for(lambda: spooled(d) == 0, what="the spool shipped and forgotten")


def test_ingest_answering_after_the_broker_killed_hard_loses_nothing(
    deployment: Deployment,
) -> None:
    d = deployment
    aggregate = d.aggregate()
    ingest = d.ingest(VISITORSTATS_PUBLISH_ACK="broker")
    # one page view per visitor (at most one request in flight)
    plan = Plan.generate(3_000, seed=23, per_visitor=(1, 1), bots=0, leaves=0)
    accepted = kill_under_load(ingest, plan, random.uniform(0, 1))

    wait_for(lambda: counted_pageviews(aggregate.url) >= accepted, what="every 202 counted")
    time.sleep(1)  # anything counted twice would show by now
    assert accepted <= counted_pageviews(aggregate.url) <= accepted + 1
    all_counted_once(d, aggregate, ingest, plan)


def test_spool_first_ingest_killed_hard_loses_nothing(deployment: Deployment) -> None:
    d = deployment
    aggregate = d.aggregate()
    # the spool is shipped only every 3 s: at the kill it holds answered beacons that are
    # nowhere else
    ingest = d.ingest(VISITORSTATS_PUBLISH_ACK="spool", VISITORSTATS_PUBLISH_LINGER_SECONDS="3")
    plan = Plan.generate(3_000, seed=29, per_visitor=(1, 1), bots=0, leaves=0)
    accepted = kill_under_load(ingest, plan, random.uniform(3.0, 4.0))
    assert spooled(d) > 0
    wait_for(lambda: counted_pageviews(aggregate.url) > 0, what="the shipped beacons counted")
    assert counted_pageviews(aggregate.url) < accepted  # the spooled ones are not in Kafka

    # the next ingest process claims the spool and ships it first
    ingest.start(wait_ready=True, timeout=90)
    wait_for(lambda: counted_pageviews(aggregate.url) >= accepted, what="every 202 counted")
    time.sleep(1)
    assert accepted <= counted_pageviews(aggregate.url) <= accepted + 1
    ingest.stop()
    all_counted_once(d, aggregate, ingest, plan)
