"""``visitorstats run``'s journal is its spool: what ClickHouse has not stored yet shows in the
spool's gauges, so the spool's alerts watch it (an outside audit saw every one of them at 0
while ClickHouse refused writes and beacons got 503)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.support.procs import Service, http, send_beacon, write_sites

pytestmark = pytest.mark.e2e

N = 12


def gauge(base: str, name: str) -> float:
    _, _, body = http("GET", f"{base}/metrics")
    found = re.search(rf"^{name} (\S+)$", body.decode(), re.M)
    assert found, name
    return float(found.group(1))


def test_what_clickhouse_has_not_stored_shows_in_the_spools_gauges(tmp_path: Path) -> None:
    write_sites(tmp_path)
    env = {
        "VISITORSTATS_SPOOL_MAX_BYTES": str(1 << 20),
        "VISITORSTATS_FLUSH_INTERVAL_SECONDS": "60",  # nothing stored for a minute
        "VISITORSTATS_RATE_LIMIT_PER_SECOND": "0",
    }
    run = Service("run", tmp_path, env).start()
    try:
        assert gauge(run.url, "visitorstats_spool_capacity_bytes") == 1 << 20
        assert gauge(run.url, "visitorstats_spool_depth") == 0
        for i in range(N):
            assert send_beacon(run.url, "dongha", client=f"198.51.100.{i + 1}") == 202
        assert gauge(run.url, "visitorstats_spool_depth") == N
        assert gauge(run.url, "visitorstats_spool_bytes") > N * 50
        time.sleep(2.5)
        assert gauge(run.url, "visitorstats_spool_oldest_seconds") >= 2  # and it grows
    finally:
        assert run.stop() == 0  # (written at the stop)
    run = Service("run", tmp_path, env, port=run.port).start()
    try:
        assert gauge(run.url, "visitorstats_spool_depth") == 0  # stored: none waits
    finally:
        assert run.stop() == 0
