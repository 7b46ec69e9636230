"""``/metrics`` of ``visitorstats ingest`` with several worker processes: every scrape, whichever
worker answers it, shows the sum over all of them (prometheus_client's multiprocess mode)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import pytest

from services.version import VERSION
from tests.support.procs import Service, http, send_beacon, write_sites
from tests.support.tansu import Tansu, count_records

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
            # process_* of the workers added up: more than any one of them has
            assert ingest.proc is not None
            rss = [resident_bytes(pid) for pid in children(ingest.proc.pid)]
            assert len(rss) == 2
            assert sample_of(text, "process_resident_memory_bytes") > 1.2 * max(rss)
            assert sample_of(text, "process_cpu_seconds_total") > 0
            assert sample_of(text, "process_open_fds") > 2 * 3
            assert sample(text, "visitorstats_build_info", f'version="{VERSION}"') == 1
            # the room on the disks of the data directory and the spool, as statvfs says now
            room = os.statvfs(tmp_path / "data")
            for d in ("data", "spool"):
                free = sample(text, "visitorstats_disk_free_bytes", f'dir="{d}"')
                size = sample(text, "visitorstats_disk_size_bytes", f'dir="{d}"')
                assert size == room.f_blocks * room.f_frsize and 0 < free <= size
        metrics_dirs = list((tmp_path / "data").glob("metrics-*"))
        assert len(metrics_dirs) == 1
        assert len(list(metrics_dirs[0].glob("counter_*.db"))) >= 2  # one file per worker
    finally:
        assert ingest.stop() == 0
    assert not list((tmp_path / "data").glob("metrics-*"))  # removed at exit


def sample_of(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics:\n{text[:2000]}"
    return float(match.group(1))


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def children(pid: int) -> set[int]:
    return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def spooled(url: str) -> float:
    status, _, body = http("GET", f"{url}/metrics")
    assert status == 200
    match = re.search(r"^visitorstats_spool_depth (\S+)$", body.decode(), re.M)
    assert match, "visitorstats_spool_depth not in /metrics"
    return float(match.group(1))


def wait_for(check: object, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.2)
    return False


def test_a_worker_that_dies_is_replaced_and_its_spool_leaves_the_metrics(
    tmp_path: Path, tansu: Tansu
) -> None:
    """While the broker is away both workers spool; one is killed (SIGKILL) after its 202s: a
    new worker takes its place, and once the broker is back every accepted beacon reaches it
    (the dead one's spool shipped by the others) and the spool depth in ``/metrics`` falls to
    0 (the dead worker's last value no longer added to it)."""
    tansu.create_topic("pageviews", 4)
    write_sites(tmp_path)
    env = {"VISITORSTATS_KAFKA_BOOTSTRAP": tansu.bootstrap, "VISITORSTATS_WORKERS": "2"}
    ingest = Service("ingest", tmp_path, env).start()
    try:
        assert ingest.proc is not None
        workers = children(ingest.proc.pid)
        assert len(workers) == 2
        time.sleep(6)  # past RESPAWN_AFTER_SECONDS: a death now is not a failed start
        tansu.pause()
        try:
            for i in range(N):
                assert send_beacon(ingest.url, "dongha", client=f"198.51.100.{i}") == 202
            assert wait_for(lambda: spooled(ingest.url) == N)
            victim = min(workers)
            os.kill(victim, signal.SIGKILL)
            assert wait_for(lambda: len(children(ingest.proc.pid) - {victim}) == 2)  # type: ignore[union-attr]
            assert victim not in children(ingest.proc.pid)
        finally:
            tansu.resume()
        assert wait_for(lambda: spooled(ingest.url) == 0)
        assert wait_for(lambda: asyncio.run(count_records(tansu.bootstrap, "pageviews")) >= N)
        assert asyncio.run(count_records(tansu.bootstrap, "pageviews")) == N
    finally:
        assert ingest.stop() == 0


def test_workers_stop_when_their_parent_is_killed(tmp_path: Path, tansu: Tansu) -> None:
    """The parent SIGKILLed (out of memory, say): its workers drain and exit, instead of
    serving on, orphaned, beside the workers of the next start; what they accepted reaches
    the broker."""
    tansu.create_topic("pageviews", 4)
    before = asyncio.run(count_records(tansu.bootstrap, "pageviews"))  # the broker is shared
    write_sites(tmp_path)
    env = {"VISITORSTATS_KAFKA_BOOTSTRAP": tansu.bootstrap, "VISITORSTATS_WORKERS": "2"}
    ingest = Service("ingest", tmp_path, env).start()
    assert ingest.proc is not None
    workers = children(ingest.proc.pid)
    assert len(workers) == 2
    for i in range(N):
        assert send_beacon(ingest.url, "dongha", client=f"198.51.100.{i}") == 202
    ingest.proc.kill()
    ingest.proc.wait()
    assert wait_for(lambda: not any(Path(f"/proc/{w}").exists() for w in workers), timeout=60)
    assert asyncio.run(count_records(tansu.bootstrap, "pageviews")) == before + N
