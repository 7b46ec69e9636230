"""Batched metric updates (``services/metrics.py``) give exactly what one update per event
gives: the publisher counts a batch at once."""

from __future__ import annotations

import asyncio
import functools
import subprocess
import time
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
    and still run, their CPU, memory and open files added up, the least start time. Two
    sleeping processes as the workers (their numbers hold still), and one that is gone."""
    workers = [subprocess.Popen(["sleep", "30"]) for _ in range(2)]
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        for pid in (*(w.pid for w in workers), gone.pid):
            (tmp_path / f"counter_{pid}.db").write_bytes(b"")
        (tmp_path / f"gauge_livesum_{workers[0].pid}.db").write_bytes(b"")
        while any(Path(f"/proc/{w.pid}/stat").read_text().split()[2] != "S" for w in workers):
            time.sleep(0.01)  # until both sleep
        collector = WorkersProcessCollector(str(tmp_path))
        assert collector.pids() == sorted(w.pid for w in workers)
        got = {f.name: f.samples[0].value for f in collector.collect()}
        each = [
            {
                f.name: f.samples[0].value
                for f in ProcessCollector(
                    pid=functools.partial(int, w.pid), registry=None
                ).collect()
            }
            for w in workers
        ]
        for name in (
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_cpu_seconds",  # a counter family: its samples end in _total
            "process_open_fds",
        ):
            assert got[name] == each[0][name] + each[1][name], name
        for name in ("process_start_time_seconds", "process_max_fds"):
            assert got[name] == min(each[0][name], each[1][name]), name
    finally:
        for w in workers:
            w.kill()
            w.wait()
