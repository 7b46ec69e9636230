"""Batched metric updates (``services/metrics.py``) give exactly what one update per event
gives: the publisher counts a batch at once."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from services import metrics
from services.http import WorkersProcessCollector
from services.ingest.publish import LocalPublisher
from services.ingest.publish_types import OutRecord

BUCKETS = (0.001, 0.01, 0.1, 1.0)


@settings(max_examples=200)
@given(st.lists(st.floats(min_value=0, max_value=5, allow_nan=False) | st.sampled_from(BUCKETS)))
def test_observe_many_is_one_observe_per_value(values: list[float]) -> None:
    one, many = CollectorRegistry(), CollectorRegistry()
    each = Histogram("h", "h", buckets=BUCKETS, registry=one)
    batched = Histogram("h", "h", buckets=BUCKETS, registry=many)
    for v in values:
        each.observe(v)
    metrics.observe_many(batched, values)
    assert _samples(one) == _samples(many)


def test_count_safe_adds_each_child_once_per_record() -> None:
    registry = CollectorRegistry()
    c = Counter("c", "c", ["site", "endpoint"], registry=registry)
    a, b, pixel = c.labels("a", "collect"), c.labels("b", "collect"), c.labels("a", "pixel")
    metrics.count_safe([(a, pixel), (b,), (a, pixel), (), (a,)])
    assert a._value.get() == 3
    assert b._value.get() == 1
    assert pixel._value.get() == 2


def _samples(registry: CollectorRegistry) -> list[str]:
    # the exposition without the creation time stamps
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


def _count_of(histogram: Any) -> float:
    return sum(
        sample.value
        for metric in histogram.collect()
        for sample in metric.samples
        if sample.name.endswith("_count")
    )


async def test_the_standalone_publisher_counts_what_it_handed_on_once_the_loop_turns() -> None:
    registry = CollectorRegistry()
    c = Counter("c", "c", ["site"], registry=registry)
    a, b = c.labels("a"), c.labels("b")
    published = metrics.BEACONS_PUBLISHED._value.get()
    latencies = _count_of(metrics.PUBLISH_LATENCY)
    handed: list[OutRecord] = []
    done: list[Exception | None] = []
    publisher = LocalPublisher(handed.append)
    await publisher.start()
    for counters in ((a,), (a, b), ()):
        publisher.submit(OutRecord(b"k", b"v", 0, counters), done.append)
    assert len(handed) == len(done) == 3  # handed on and done at once
    await asyncio.sleep(0)  # counted after the loop's turn
    assert (a._value.get(), b._value.get()) == (2, 1)
    assert metrics.BEACONS_PUBLISHED._value.get() == published + 3
    assert _count_of(metrics.PUBLISH_LATENCY) == latencies + 3  # one latency each
    publisher.submit(OutRecord(b"k", b"v", 0, (b,)), done.append)
    await publisher.stop()  # what stop finds uncounted is counted
    assert b._value.get() == 2
    assert metrics.BEACONS_PUBLISHED._value.get() == published + 4


def test_workers_process_metrics_add_up_the_live_writers(tmp_path: Path) -> None:
    """``WorkersProcessCollector``: the processes that wrote into the multiprocess directory
    and still run, their CPU, memory and open files added up, the least start time."""
    sleeper = subprocess.Popen(["sleep", "30"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        for pid in (os.getpid(), sleeper.pid, gone.pid):
            (tmp_path / f"counter_{pid}.db").write_bytes(b"")
        (tmp_path / f"gauge_livesum_{os.getpid()}.db").write_bytes(b"")
        collector = WorkersProcessCollector(str(tmp_path))
        assert collector.pids() == sorted([os.getpid(), sleeper.pid])
        got = {f.name: f.samples[0].value for f in collector.collect()}
        alone = {
            f.name: f.samples[0].value
            for f in ProcessCollector(pid=lambda: sleeper.pid, registry=None).collect()
        }
        mine = {f.name: f.samples[0].value for f in ProcessCollector(registry=None).collect()}
        assert got["process_resident_memory_bytes"] > mine["process_resident_memory_bytes"]
        assert got["process_resident_memory_bytes"] > alone["process_resident_memory_bytes"]
        assert got["process_open_fds"] >= mine["process_open_fds"] + alone["process_open_fds"] - 2
        assert got["process_start_time_seconds"] == mine["process_start_time_seconds"]
        assert got["process_max_fds"] == min(mine["process_max_fds"], alone["process_max_fds"])
    finally:
        sleeper.kill()
        sleeper.wait()
