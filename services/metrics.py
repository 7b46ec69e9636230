"""Every Prometheus metric of visitorstats, declared in one place.

Names follow the Prometheus conventions: prefix ``visitorstats_``, counters end in ``_total``,
durations are ``_seconds`` histograms. Labels are bounded: ``site`` only ever carries a site id
from the registry (checked before a metric is touched), ``reason``/``outcome``/``kind`` come
from closed sets, ``partition`` is bounded by the topic's partition count.

With several ingest processes (``VISITORSTATS_WORKERS`` > 1) ``visitorstats`` sets
``PROMETHEUS_MULTIPROC_DIR`` before this module is imported: every process writes its values
there and ``/metrics`` answers their sum (gauges: the sum over the live processes, or the
maximum, as their ``multiprocess_mode`` says).
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from services.version import VERSION

# No ``*_created`` series beside every counter and histogram: nothing here reads them, and they
# doubled the series a Prometheus stores.
disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_FRESHNESS_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 10, 100, 1000, 5000, 10000, 50000, 100000)

# --- ingest ---------------------------------------------------------------------------------
INGEST_REQUESTS = Counter(
    "visitorstats_ingest_requests_total",
    "HTTP requests to the ingest endpoints, by endpoint and outcome.",
    ["endpoint", "outcome"],
)
# HTTP that could not be read as a request (a bad header, two Content-Lengths, a line over the
# limit: the server's own 400), by any route: which endpoint it was for is not known
MALFORMED_REQUESTS = INGEST_REQUESTS.labels("unknown", "malformed")
BEACONS_DROPPED = Counter(
    "visitorstats_beacons_dropped_total",
    "Beacons refused or not counted, by reason.",
    ["reason"],
)
BEACONS_ACCEPTED = Counter(
    "visitorstats_beacons_accepted_total",
    "Beacons accepted (answered 202), bots included.",
    ["site"],
)
BEACONS_PUBLISHED = Counter(
    "visitorstats_beacons_published_total",
    "Beacon records handed on (acknowledged by Kafka, or the in-process hand-off).",
)
PUBLISH_LATENCY = Histogram(
    "visitorstats_publish_latency_seconds",
    "Time from a beacon's acceptance to its acknowledgement by the broker.",
    buckets=_LATENCY_BUCKETS,
)
PUBLISH_ERRORS = Counter(
    "visitorstats_publish_errors_total",
    "Failed attempts to publish a batch of records to Kafka.",
)
SPOOL_DEPTH = Gauge(
    "visitorstats_spool_depth",
    "Records in the on-disk spool that the broker has not acknowledged yet (in run without "
    "Kafka: in its journal, not yet stored in ClickHouse).",
    multiprocess_mode="livesum",
)
SPOOL_BYTES = Gauge(
    "visitorstats_spool_bytes",
    "Bytes used by the on-disk spool (or run's journal).",
    multiprocess_mode="livesum",
)
SPOOL_CAPACITY = Gauge(
    "visitorstats_spool_capacity_bytes",
    "Bytes the on-disk spool may hold (VISITORSTATS_SPOOL_MAX_BYTES): full, beacons get 503.",
    multiprocess_mode="livesum",
)
SPOOL_DAMAGED = Counter(
    "visitorstats_spool_damaged_total",
    "Damaged stretches of the on-disk spool (or run's journal) found at start and skipped.",
)
SPOOL_OLDEST = Gauge(
    "visitorstats_spool_oldest_seconds",
    "Age of the oldest record in the spool that the broker has not acknowledged, or in run's "
    "journal that ClickHouse has not stored (0: none).",
    multiprocess_mode="livemax",
)

# --- HTTP (both services) -------------------------------------------------------------------
CONNECTIONS_OPEN = Gauge(
    "visitorstats_http_connections",
    "Open HTTP connections (of all worker processes).",
    multiprocess_mode="livesum",
)
CONNECTIONS_REFUSED = Counter(
    "visitorstats_http_connections_refused_total",
    "Connections answered 503 and closed at once: max_connections open, none of them idle.",
)
CONNECTIONS_EVICTED = Counter(
    "visitorstats_http_idle_connections_closed_total",
    "Idle connections closed to make room for a new one (max_connections open).",
)

# --- aggregate ------------------------------------------------------------------------------
EVENTS_CONSUMED = Counter(
    "visitorstats_events_consumed_total",
    "Records consumed from the beacon topic (or the in-process hand-off).",
)
EVENTS_COUNTED = Counter(
    "visitorstats_events_counted_total",
    "Consumed events by what the counting rules made of them.",
    ["outcome"],
)
DEAD_LETTERS = Counter(
    "visitorstats_dead_letters_total",
    "Records that could not be decoded and went to the dead-letter topic.",
)
CONSUMER_LAG = Gauge(
    "visitorstats_consumer_lag",
    "Records behind the end of the partition, per assigned partition.",
    ["partition"],
    multiprocess_mode="livesum",
)
FETCH_GAPS = Counter(
    "visitorstats_fetch_gaps",
    "Fetches that skipped offsets of a partition, read again from the first one skipped.",
)
LOGS_REPLACED = Counter(
    "visitorstats_partition_logs_replaced",
    "Partitions whose Kafka log was found lost and begun again (the topic made anew, a broker "
    "that kept its log in memory restarted); counting went on from the new log's first record.",
)
BATCH_SIZE = Histogram(
    "visitorstats_batch_size",
    "Events per batch written to ClickHouse.",
    buckets=_BATCH_BUCKETS,
)
CLICKHOUSE_WRITE_LATENCY = Histogram(
    "visitorstats_clickhouse_write_seconds",
    "Duration of one batch insert into ClickHouse.",
    buckets=_LATENCY_BUCKETS,
)
CLICKHOUSE_ERRORS = Counter(
    "visitorstats_clickhouse_errors_total",
    "Failed ClickHouse operations, by operation.",
    ["operation"],
)
COMMIT_LATENCY = Histogram(
    "visitorstats_commit_seconds",
    "Duration of one offset commit after a batch was written.",
    buckets=_LATENCY_BUCKETS,
)
FRESHNESS = Histogram(
    "visitorstats_freshness_seconds",
    "Time from a beacon's acceptance at ingest to its appearance in the counter.",
    buckets=_FRESHNESS_BUCKETS,
)
SNAPSHOT_REFRESH = Histogram(
    "visitorstats_snapshot_refresh_seconds",
    "Duration of one counter refresh: the ClickHouse queries of all sites' numbers.",
    buckets=_LATENCY_BUCKETS,
)
ONLINE = Gauge(
    "visitorstats_online",
    "Visitors online now, per site and kind (guests, members, total, bots).",
    ["site", "kind"],
    multiprocess_mode="max",
)
COUNTER_STALE = Gauge(
    "visitorstats_snapshot_stale",
    "1 while the counter of a site has no fresh numbers: it serves its last good ones (or, "
    "before any, 503) because a refresh failed, the broker is silent, or the numbers do not "
    "follow the beacons (a rebalance, refused writes, reading behind, a partition no one counts).",
    ["site"],
    multiprocess_mode="max",
)
PARTITIONS_UNATTENDED = Gauge(
    "visitorstats_partitions_unattended",
    "Partitions of the topic that another aggregate process owns and has not counted for 7 s "
    "(killed, frozen, or its writes stuck): the counter is stale until they are counted again.",
    multiprocess_mode="max",
)
COUNTER_AGE = Gauge(
    "visitorstats_snapshot_refreshed_timestamp_seconds",
    "Unix time of the last successful counter refresh.",
    multiprocess_mode="max",
)
STREAM_SUBSCRIBERS = Gauge(
    "visitorstats_stream_subscribers",
    "Open counter streams (server-sent events).",
    multiprocess_mode="livesum",
)

BUILD_INFO = Gauge(
    "visitorstats_build_info",
    "1, labelled with the version of visitorstats that runs.",
    ["version"],
    multiprocess_mode="max",
)
BUILD_INFO.labels(VERSION).set(1)


class DiskRoom(Collector):
    """The room on the file systems of the service's directories, read at each scrape: a full
    disk refuses the spool's and the journal's writes (beacons get 503), and ClickHouse's."""

    def __init__(self) -> None:
        self.dirs: dict[str, Path] = {}

    def watch(self, name: str, path: Path) -> None:
        self.dirs[name] = path

    def collect(self) -> Iterable[Metric]:
        free = GaugeMetricFamily(
            "visitorstats_disk_free_bytes",
            "Bytes the service may still write on the file system of each of its directories "
            "(dir: data, the data directory; spool, ingest's spool; clickhouse, the embedded "
            "ClickHouse).",
            labels=["dir"],
        )
        size = GaugeMetricFamily(
            "visitorstats_disk_size_bytes",
            "Size of the file system of each of the service's directories.",
            labels=["dir"],
        )
        for name, path in sorted(self.dirs.items()):
            try:
                st = os.statvfs(path)
            except OSError:  # not made yet
                continue
            free.add_metric([name], st.f_bavail * st.f_frsize)
            size.add_metric([name], st.f_blocks * st.f_frsize)
        return [free, size]


DISK_ROOM = DiskRoom()
REGISTRY.register(DISK_ROOM)

# Each service's /metrics shows its own families and the shared ones (``visitorstats run``, all):
# an ingest process showing events_consumed_total 0 misleads a query without a job selector.
INGEST: tuple[Any, ...] = (
    INGEST_REQUESTS,
    BEACONS_DROPPED,
    BEACONS_ACCEPTED,
    BEACONS_PUBLISHED,
    PUBLISH_LATENCY,
    PUBLISH_ERRORS,
    SPOOL_DEPTH,
    SPOOL_BYTES,
    SPOOL_CAPACITY,
    SPOOL_DAMAGED,
    SPOOL_OLDEST,
)
AGGREGATE: tuple[Any, ...] = (
    EVENTS_CONSUMED,
    EVENTS_COUNTED,
    DEAD_LETTERS,
    CONSUMER_LAG,
    FETCH_GAPS,
    LOGS_REPLACED,
    BATCH_SIZE,
    CLICKHOUSE_WRITE_LATENCY,
    CLICKHOUSE_ERRORS,
    COMMIT_LATENCY,
    FRESHNESS,
    SNAPSHOT_REFRESH,
    ONLINE,
    COUNTER_STALE,
    COUNTER_AGE,
    STREAM_SUBSCRIBERS,
)


def families(metrics: tuple[Any, ...]) -> frozenset[str]:
    """The family names (as collected: a counter's without ``_total``) of ``metrics``."""
    return frozenset(family.name for metric in metrics for family in metric.describe())


# Series that exist from the start, at 0: a dashboard or an alert then sees "none so far", not
# "no data" (the per-site ones: ``for_sites``).
for _operation in ("insert", "query", "rebuild"):
    CLICKHOUSE_ERRORS.labels(_operation)
for _outcome in ("visit", "pageview", "duplicate"):
    EVENTS_COUNTED.labels(_outcome)


def for_sites(site_ids: list[str]) -> None:
    """Make the per-site series of the registry's sites exist, at 0."""
    for site in site_ids:
        BEACONS_ACCEPTED.labels(site)


def count_safe(counters: list[tuple[Any, ...]]) -> None:
    """Add 1 to every child of every tuple (``OutRecord.counters``), one ``inc`` per child."""
    tally: dict[tuple[Any, ...], int] = {}
    for c in counters:
        tally[c] = tally.get(c, 0) + 1
    for children, n in tally.items():
        for child in children:
            child.inc(n)


def observe_many(histogram: Histogram, values: list[float]) -> None:
    """``histogram.observe(v)`` for every value, with one increment per bucket and one of the
    sum (prometheus_client has no bulk observe; ``tests/unit/test_metrics.py`` checks that the
    exposition is exactly that of one ``observe`` per value)."""
    if not values:
        return
    bounds = histogram._upper_bounds
    counts = [0] * len(bounds)
    for v in values:
        counts[bisect_left(bounds, v)] += 1
    for bucket, n in zip(histogram._buckets, counts, strict=True):
        if n:
            bucket.inc(n)
    histogram._sum.inc(sum(values))
