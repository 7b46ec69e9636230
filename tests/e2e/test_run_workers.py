"""``visitorstats run`` with ``VISITORSTATS_WORKERS``: several processes share the port when
there is Kafka for the hand-off and a ClickHouse server to share (each takes beacons, counts its
share of the partitions and serves the counter); with embedded ClickHouse, one process and a
message saying why."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.chdb_http import ChdbHttpServer
from tests.support.procs import Service, counter, http, send_beacon, wait_counter, write_sites
from tests.support.tansu import Tansu

pytestmark = pytest.mark.e2e
N = 40
BASELINE_PAGEVIEWS = 1000  # dongha's in tests.support.procs' sites.toml


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def shown(c: dict[str, Any]) -> tuple[int, int]:
    return c["pageviews"]["total"], c["online"]["total"]


def test_run_forks_its_workers_with_kafka_and_a_clickhouse_server(
    tmp_path: Path, tansu: Tansu, clickhouse: ChdbHttpServer
) -> None:
    tansu.create_topic("pageviews", 4)
    write_sites(tmp_path)
    env = {
        "VISITORSTATS_KAFKA_BOOTSTRAP": tansu.bootstrap,
        "VISITORSTATS_CLICKHOUSE_URL": clickhouse.dsn,
        "VISITORSTATS_WORKERS": "2",
    }
    run = Service("run", tmp_path, env).start(timeout=120)
    try:
        assert run.proc is not None
        assert len(children(run.proc.pid)) == 2
        # one connection per beacon: the kernel spreads them over both workers
        for i in range(N):
            assert send_beacon(run.url, "dongha", client=f"198.51.100.{i}") == 202
        want = (BASELINE_PAGEVIEWS + N, N)
        # Whichever worker answers: the same numbers, once each has refreshed after the other's
        # last write (another process's tallies may follow its page views by a refresh).
        for _ in range(4):
            got = wait_counter(run.url, "dongha", lambda c: shown(c) == want, 60)
            assert shown(got) == want
        status, _, body = http("GET", f"{run.url}/metrics")
        match = re.search(r'^visitorstats_beacons_accepted_total\{site="dongha"\} (\S+)$',
                          body.decode(), re.M)  # fmt: skip
        assert status == 200 and match and float(match.group(1)) == N  # both workers' sum
    finally:
        assert run.stop() == 0


def test_run_stays_one_process_with_embedded_clickhouse(tmp_path: Path, tansu: Tansu) -> None:
    tansu.create_topic("pageviews", 4)
    write_sites(tmp_path)
    env = {"VISITORSTATS_KAFKA_BOOTSTRAP": tansu.bootstrap, "VISITORSTATS_WORKERS": "2"}
    run = Service("run", tmp_path, env).start(timeout=120)
    try:
        assert run.proc is not None and children(run.proc.pid) == []
        assert "needs a ClickHouse server" in run.log()
        assert send_beacon(run.url, "dongha", client="198.51.100.1") == 202
        assert counter(run.url, "dongha")["stale"] is False
    finally:
        assert run.stop() == 0
