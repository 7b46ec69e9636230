"""The whole aggregate tier stopped at once and started again (a deploy): the consumer group
forms again and the counter counts on, exactly. With both processes leaving the group as they
stopped, Tansu lost it: the two started next joined it (generation 2), neither was made its
leader, and no partition was ever assigned again."""

from __future__ import annotations

import threading
import time

import pytest

from tests.faults.conftest import Deployment, assert_counter
from tests.faults.load import Plan, Sender

pytestmark = pytest.mark.faults


def test_every_aggregate_stopped_at_once_and_started_again(
    shared_deployment: Deployment,
) -> None:
    """Two aggregate processes sharing ClickHouse, SIGTERMed together, two new ones started
    3 s later: the counter is the ground truth of before and after, from both."""
    d = shared_deployment
    ingest = d.ingest()
    first = [d.aggregate(), d.aggregate()]
    before = Plan.generate(2_000, seed=31)
    assert set(Sender([ingest.url], before).start().join().statuses) == {202}
    assert_counter(first[0].url, before)
    stops = [threading.Thread(target=a.stop, kwargs={"timeout": 60}) for a in first]
    for t in stops:
        t.start()
    for t in stops:
        t.join()
    time.sleep(3)
    second = [d.aggregate(wait=False), d.aggregate(wait=False)]
    after = Plan.generate(2_000, seed=32, first_client=100_000)
    assert set(Sender([ingest.url], after).start().join().statuses) == {202}
    both = Plan(before.visitors + after.visitors)
    for a in second:
        assert_counter(a.url, both, timeout=90)
