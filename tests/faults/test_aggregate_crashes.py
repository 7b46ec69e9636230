"""Aggregate processes killed, started and stopped while tens of thousands of beacons flow:
every number of the counter ends equal to the ground truth."""

from __future__ import annotations

import random
import re
import signal
import time

import pytest

from tests.faults.conftest import (
    PARTITIONS,
    Deployment,
    assert_counter,
    counted_pageviews,
    owned_partitions,
    wait_consuming,
    wait_counting,
    wait_for,
)
from tests.faults.load import Plan, Sender
from tests.support.procs import numbers

pytestmark = pytest.mark.faults


def test_sigkill_of_the_aggregate_process_during_a_stream(deployment: Deployment) -> None:
    """One ingest, one aggregate process SIGKILLed three times at random moments (mid-batch,
    mid-write, mid-rebalance: wherever it is) and restarted; 25 000 beacons."""
    ingest = deployment.ingest()
    aggregate = deployment.aggregate()
    plan = Plan.generate(25_000, seed=11)
    # paced so that the stream outlasts the kills, then let go
    sender = Sender([ingest.url], plan, rate=300).start()
    rng = random.Random(5)
    for _ in range(3):
        # each process gets to count something, and is killed at a random moment after,
        # while records are still coming to it
        aggregate.wait_ready(90)
        wait_counting(aggregate.url, counted_pageviews(aggregate.url))
        time.sleep(rng.uniform(0, 1.0))
        print(f"kill at {sender.progress():.0%} of the stream")
        aggregate.kill()
        aggregate.start(wait_ready=False)
    sender.rate = 0
    sender.join()
    aggregate.wait_ready(90)
    assert_counter(aggregate.url, plan)


def test_two_and_three_aggregate_processes_join_and_leave(
    shared_deployment: Deployment,
) -> None:
    """Two ingest processes; aggregate processes sharing ClickHouse come and go during the
    stream: 1 -> 2 -> 3 -> one frozen past its session and thawed (a zombie holding a pending
    batch, which it writes late) -> one stopped -> one SIGKILLed and one started -> 1. The
    numbers are the ground truth, and every process answers the same."""
    d = shared_deployment
    ingests = [d.ingest(), d.ingest()]
    a1 = d.aggregate()
    plan = Plan.generate(20_000, seed=12)
    sender = Sender([i.url for i in ingests], plan, rate=250).start()  # outlasts the changes

    sender.wait_progress(0.05)
    a2 = d.aggregate()
    # flushing every 2 s, it nearly always holds a pending batch when it is frozen below
    a3 = d.aggregate(VISITORSTATS_FLUSH_INTERVAL_SECONDS="2")
    wait_consuming(a3)
    # Frozen longer than its session: the group gives its partitions away; thawed, it still
    # holds a batch and writes it. The insert tokens must fence that late write.
    a3.signal(signal.SIGSTOP)
    frozen = time.monotonic()
    wait_for(
        lambda: owned_partitions(a1) | owned_partitions(a2) == set(range(PARTITIONS)),
        timeout=120,
        what="the partitions of the frozen process to be given to the others",
    )
    print(f"frozen process replaced after {time.monotonic() - frozen:.1f}s")
    a3.signal(signal.SIGCONT)
    wait_consuming(a2)
    assert a2.stop() == 0  # a graceful leave: its last batch written, then the group rebalances
    wait_consuming(a1)
    a1.kill()
    a4 = d.aggregate()
    wait_consuming(a4)
    assert a3.stop() == 0
    print(f"last change at {sender.progress():.0%} of the stream")
    sender.rate = 0
    sender.join()
    got = assert_counter(a4.url, plan)

    a5 = d.aggregate()  # a fresh process over the same ClickHouse answers the same numbers
    again = assert_counter(a5.url, plan)
    assert numbers(again) == numbers(got)


def test_a_stopped_aggregate_leaves_the_group_and_its_successor_joins_once(
    deployment: Deployment,
) -> None:
    """SIGTERM: the process leaves the consumer group as it stops, so the process started
    next gets every partition at its first join, not after the old member's session has timed
    out and a second join (Tansu numbers the first generation 0, where aiokafka would not
    leave by itself)."""
    aggregate = deployment.aggregate()
    every = set(range(PARTITIONS))
    wait_for(lambda: owned_partitions(aggregate) == every, timeout=90, what="partitions")
    aggregate.stop()
    aggregate.start()
    wait_for(lambda: owned_partitions(aggregate) == every, timeout=90, what="partitions again")
    first, _, second = (
        aggregate.log_path.read_text().partition("listening on")[2].partition("listening on")
    )
    assert "left the group" in first
    joined = second.partition("Setting newly assigned partitions")[0]
    assert joined.count("(Re-)joining group") == 1, second


def test_a_survivor_says_stale_while_a_killed_members_partitions_go_uncounted(
    shared_deployment: Deployment,
) -> None:
    """Two aggregate processes; one SIGKILLed while beacons flow. The group hands its
    partitions on only once its session has timed out (10 s); their beacons do not show
    meanwhile. The survivor marks its numbers stale before that, because those partitions'
    rows of tallies stopped changing, and says which; then it counts them, and its numbers
    are the ground truth."""
    d = shared_deployment
    ingest = d.ingest()
    survivor, doomed = d.aggregate(), d.aggregate()
    every = set(range(PARTITIONS))

    def split() -> bool:
        mine, theirs = owned_partitions(survivor), owned_partitions(doomed)
        return bool(mine) and bool(theirs) and mine | theirs == every

    wait_for(split, timeout=120, what="the partitions to be shared by both processes")
    lost = owned_partitions(doomed)
    plan = Plan.generate(4_000, seed=13)
    sender = Sender([ingest.url], plan, rate=200).start()
    wait_counting(doomed.url, 0)
    wait_counting(survivor.url, 0)
    before = len(survivor.log_path.read_text())
    doomed.kill()
    wait_for(
        lambda: owned_partitions(survivor) == every,
        timeout=120,
        what="the killed process's partitions to be given to the survivor",
    )
    sender.join()
    assert_counter(survivor.url, plan)
    log = survivor.log_path.read_text()[before:]
    said = re.search(r"partitions ([\d, ]+) of pageviews not counted", log)
    assert said, log
    assert {int(p) for p in said[1].split(", ")} == lost, said[0]
    # said before the group's rebalance: its own partitions revoked, then all assigned
    assert said.start() < log.index("Setting newly assigned partitions"), log
