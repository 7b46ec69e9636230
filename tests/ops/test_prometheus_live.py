"""A real Prometheus (Debian's) scrapes a real ingest and aggregate during an end-to-end run."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.traffic import portal_traffic
from tests.ops.deploy_checks import dashboard_expressions
from tests.support.procs import Service, http, send_beacon, wait_counter, write_sites
from tests.support.tansu import Tansu, free_port, wait_port

pytestmark = pytest.mark.ops


class Prometheus:
    def __init__(self, workdir: Path, targets: dict[str, str]) -> None:
        self.port = free_port()
        self.workdir = workdir
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target]}]}
                for job, target in targets.items()
            ],
        }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(json.dumps(config))  # JSON is YAML
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        log = open(self.workdir / "prometheus.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                shutil.which("prometheus") or "prometheus",
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_port(self.port, 30)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)

    def query(self, expr: str) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        _, _, body = http("GET", url)
        result: dict[str, Any] = json.loads(body)
        return result

    def value(self, expr: str) -> float | None:
        data = self.query(expr)
        if data.get("status") != "success" or not data["data"]["result"]:
            return None
        return float(data["data"]["result"][0]["value"][1])

    def wait_value(self, expr: str, want: float, timeout: float = 30) -> float | None:
        deadline = time.monotonic() + timeout
        got = None
        while time.monotonic() < deadline:
            got = self.value(expr)
            if got == want:
                return got
            time.sleep(0.5)
        return got


@pytest.fixture
def deployment(tmp_path: Path, tansu: Tansu) -> Iterator[tuple[Service, Service, Prometheus]]:
    tansu.create_topic("pageviews", 2)
    write_sites(tmp_path)
    env = {"VISITORSTATS_KAFKA_BOOTSTRAP": tansu.bootstrap}
    ingest = Service("ingest", tmp_path, env).start()
    aggregate = Service("aggregate", tmp_path, env).start()
    prom = Prometheus(
        tmp_path,
        {
            "visitorstats-ingest": f"127.0.0.1:{ingest.port}",
            "visitorstats-aggregate": f"127.0.0.1:{aggregate.port}",
        },
    ).start()
    try:
        yield ingest, aggregate, prom
    finally:
        prom.stop()
        ingest.stop()
        aggregate.stop()


def test_prometheus_sees_the_traffic_that_was_sent(
    deployment: tuple[Service, Service, Prometheus],
) -> None:
    ingest, aggregate, prom = deployment
    truth = portal_traffic(ingest.url, "dongha", clients=6)
    # traffic: every beacon of a client twice (same event_id), plus 2 bots
    accepted = 2 * sum(3 + (1 if i % 4 == 0 else 0) for i in range(6)) + 2
    # an origin-locked site refuses a foreign page
    status, _, _ = http(
        "POST",
        f"{ingest.url}/collect",
        b'{"site":"locked","url":"https://evil.example/"}',
        {"Content-Type": "text/plain", "Origin": "https://evil.example"},
    )
    assert status == 403
    assert send_beacon(ingest.url, "dongha", client="203.0.113.99", url="") == 400
    wait_counter(aggregate.url, "dongha", lambda c: c["online"]["total"] == truth.online["total"])

    assert prom.wait_value('sum(visitorstats_beacons_accepted_total{site="dongha"})', accepted)
    assert prom.wait_value("sum(visitorstats_beacons_published_total)", accepted) == accepted
    assert prom.wait_value('visitorstats_beacons_dropped_total{reason="invalid"}', 4) == 4
    assert prom.wait_value('visitorstats_beacons_dropped_total{reason="unknown_site"}', 1) == 1
    assert prom.wait_value('visitorstats_beacons_dropped_total{reason="origin"}', 1) == 1
    assert (
        prom.wait_value('sum(visitorstats_ingest_requests_total{outcome="accepted"})', accepted)
        == accepted
    )
    total = truth.online["total"]
    assert prom.wait_value('visitorstats_online{site="dongha",kind="total"}', total) == total
    bots = truth.online["bots"]
    assert prom.wait_value('visitorstats_online{site="dongha",kind="bots"}', bots) == bots
    assert prom.wait_value("sum(visitorstats_events_consumed_total)", accepted) == accepted
    assert prom.wait_value('visitorstats_snapshot_stale{site="dongha"}', 0) == 0
    assert (
        prom.value("histogram_quantile(0.99, sum by (le) (visitorstats_freshness_seconds_bucket))")
        or 0
    ) > 0
    assert prom.value('up{job="visitorstats-ingest"}') == 1
    assert prom.value('up{job="visitorstats-aggregate"}') == 1

    # every expression of the Grafana dashboard evaluates without error
    for expr in dashboard_expressions({"__rate_interval": "10s"}):
        result = prom.query(expr)
        assert result.get("status") == "success", (expr, result)


def test_promtool_accepts_both_metrics_outputs(
    deployment: tuple[Service, Service, Prometheus],
) -> None:
    ingest, aggregate, _ = deployment
    portal_traffic(ingest.url, "dongha", clients=2)
    for service in (ingest, aggregate):
        status, _, body = http("GET", f"{service.url}/metrics")
        assert status == 200
        result = subprocess.run(
            ["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30
        )
        assert result.returncode == 0, (service.name, result.stdout, result.stderr)
