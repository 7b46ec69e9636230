"""``/metrics`` of ``visitorstats ingest`` with several worker processes: every scrape, whichever
worker answers it, shows the sum over all of them (prometheus_client's multiprocess mode)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.procs import Service, http, send_beacon, write_sites
from tests.support.tansu import Tansu

pytestmark = pytest.mark.e2e
N = 60


def sample(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    assert match, f"{name}{{{labels}}} not in /metrics:\n{text[:2000]}"
    return float(match.group(1))


def test_metrics_add_up_every_worker(tmp_path: Path, tansu: Tansu) -> None:
    tansu.create_topic("pageviews", 4)
    write_sites(tmp_path)
    env = {"VISITORSTATS_KAFKA_BOOTSTRAP": tansu.bootstrap, "VISITORSTATS_WORKERS": "2"}
    ingest = Service("ingest", tmp_path, env).start()
    try:
        # one connection per beacon: the kernel spreads them over both workers
        for i in range(N):
            assert send_beacon(ingest.url, "dongha", client=f"198.51.100.{i}") == 202
        for _ in range(6):  # every scrape, whichever worker answers it
            status, _, body = http("GET", f"{ingest.url}/metrics")
            assert status == 200
            text = body.decode()
            assert sample(
                text, "visitorstats_ingest_requests_total", 'endpoint="collect",outcome="accepted"'
            ) == float(N)
            assert sample(text, "visitorstats_beacons_accepted_total", 'site="dongha"') == N
            assert "visitorstats_http_connections " in text  # gauges too
        metrics_dirs = list((tmp_path / "data").glob("metrics-*"))
        assert len(metrics_dirs) == 1
        assert len(list(metrics_dirs[0].glob("counter_*.db"))) >= 2  # one file per worker
    finally:
        assert ingest.stop() == 0
    assert not list((tmp_path / "data").glob("metrics-*"))  # removed at exit
