"""``visitorstats ingest`` killed hard (SIGKILL) while beacons flow: every beacon it answered 202
was acknowledged by the broker first, so the aggregate counts every accepted beacon (and at most
the one request cut off by the kill, whose record may have reached the broker without its
answer), none twice, and each once again when they are all sent a second time to the next
ingest process."""

from __future__ import annotations

import random
import time

import pytest

from tests.faults.conftest import Deployment, assert_counter, counted_pageviews, wait_for
from tests.faults.load import Plan, Sender

pytestmark = pytest.mark.faults


def test_ingest_killed_hard_loses_nothing(deployment: Deployment) -> None:
    d = deployment
    aggregate = d.aggregate()
    ingest = d.ingest()
    # one page view per visitor, sent one after another (at most one request in flight)
    plan = Plan.generate(3_000, seed=23, per_visitor=(1, 1), bots=0, leaves=0)
    sender = Sender([ingest.url], plan, threads=1, retry=False, rate=300).start()
    sender.wait_progress(0.3)
    time.sleep(random.uniform(0, 1))
    ingest.kill()
    sender.stop()
    accepted = len(sender.accepted)
    assert 0 < accepted < len(plan)

    wait_for(lambda: counted_pageviews(aggregate.url) >= accepted, what="every 202 counted")
    time.sleep(1)  # anything counted twice would show by now
    assert accepted <= counted_pageviews(aggregate.url) <= accepted + 1

    # sent again to the next ingest process, every beacon is counted once
    ingest.start(wait_ready=True, timeout=90)
    for v in plan.visitors:
        v.first_sent = None
    again = Sender([ingest.url], plan).start().join()
    assert again.statuses[202] == len(plan)
    assert_counter(aggregate.url, plan)
