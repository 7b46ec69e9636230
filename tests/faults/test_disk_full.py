"""The disk refusing the journal's writes while beacons come (``visitorstats run``): each beacon
it could not keep gets a 503 that says so, readiness says why, nothing is half kept, and every
beacon answered 202 is counted, across a hard kill too (an outside audit on a full tmpfs lost
answered beacons: a segment begun without its magic, a record cut short and then dropped at the
next start; and dropped connections where a 503 was due).

The disk is made to refuse from outside with ``prlimit`` (``RLIMIT_FSIZE`` of the running
process): a write past the limit is cut short and the next one fails, as on a full disk. The
limit applies to files only, so the process's output goes to a pipe here.

The limit is the journal's disk refusing: ClickHouse runs in a process of its own here (the
tests' chDB HTTP server). Embedded, it would be held to the limit too, in the middle of its
writes, and chDB then commits a part with files cut short as if written (a part of ``peaks``
read back 4 bytes of 25: every counter refresh failed after). On a real disk ClickHouse
reserves room before it writes; ``test_disk_reserve.py`` checks that the journal leaves it
that room."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest

from tests.faults.conftest import counted_pageviews, wait_for
from tests.support.chdb_http import ChdbHttpServer
from tests.support.procs import CHROME_UA, ROOT, Service, http, send_beacon, write_sites

pytestmark = pytest.mark.faults

ENV = {"VISITORSTATS_RATE_LIMIT_PER_SECOND": "1000", "VISITORSTATS_RATE_LIMIT_BURST": "1000"}


class PipedService(Service):
    """A ``Service`` whose output is read from a pipe (a file would be refused too)."""

    def start(self, wait_ready: bool = True, timeout: float = 60) -> PipedService:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.output: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", self.command],
            cwd=self.workdir,
            env={**self.env, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out = self.proc.stdout
        assert out is not None
        threading.Thread(target=self._read, args=(out,), daemon=True).start()
        if wait_ready:
            self._ready_or_killed(timeout)
        return self

    def _read(self, out: IO[bytes]) -> None:
        with out:
            self.output.extend(line.decode(errors="replace") for line in out)

    def log(self) -> str:
        return "".join(self.output)[-4000:]

    def limit_files(self, size: int) -> None:
        """Files of the process may not grow past ``size`` bytes (-1: no limit)."""
        assert self.proc is not None
        limit = resource.RLIM_INFINITY if size < 0 else size
        resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def unavailable(base: str) -> float:
    _, _, body = http("GET", f"{base}/metrics")
    lines = body.decode().splitlines()
    return sum(
        float(line.rpartition(" ")[2])
        for line in lines
        if line.startswith("visitorstats_ingest_requests_total{") and 'ome="unavailable"' in line
    )


def alive(base: str) -> bool:
    try:
        return http("GET", f"{base}/healthz")[0] == 200
    except OSError:
        return False


def beacons(base: str, first: int, n: int, status: int) -> None:
    """``n`` page views of new visitors, each answered ``status``."""
    for i in range(first, first + n):
        got = send_beacon(base, "dongha", client=f"198.51.{i // 250}.{i % 250 + 1}")
        assert got == status, (i, got)


def refused_and_said(run: PipedService) -> None:
    """Not ready, saying why; alive; the refusals counted as unavailable."""
    status, _, body = http("GET", f"{run.url}/readyz")
    assert status == 503, body
    detail = json.loads(body)["checks"]["publish"]["detail"]
    assert detail.startswith("cannot write to ") and "journal" in detail, detail
    assert http("GET", f"{run.url}/healthz")[0] == 200


def telling(run: PipedService) -> Callable[[], str]:
    """What a failed wait shows: the count, readiness and the process's last output."""

    def report() -> str:
        ready = http("GET", f"{run.url}/readyz")[2].decode(errors="replace")
        return f"counted {counted_pageviews(run.url)}; readyz {ready}\n{run.log()}"

    return report


def segments(journal: Path) -> list[Path]:
    return sorted(journal.glob("*/*.spool"))


def test_a_full_disk_gets_503s_and_loses_no_answered_beacon(
    tmp_path: Path, clickhouse: ChdbHttpServer
) -> None:
    write_sites(tmp_path)
    journal = tmp_path / "data" / "journal"
    env = {**ENV, "VISITORSTATS_CLICKHOUSE_URL": clickhouse.dsn}
    run = PipedService("run", tmp_path, env).start()
    try:
        beacons(run.url, 0, 20, 202)
        wait_for(
            lambda: counted_pageviews(run.url) == 20,
            what="the first beacons counted",
            said=telling(run),
        )
        wait_for(lambda: not segments(journal), what="the journal emptied")

        # 1. the next beacon needs a new segment, whose magic the disk cuts short
        before = unavailable(run.url)
        run.limit_files(4)
        beacons(run.url, 100, 5, 503)
        refused_and_said(run)
        assert unavailable(run.url) - before == 5
        assert not segments(journal) or all(p.stat().st_size == 0 for p in segments(journal))
        run.limit_files(-1)
        beacons(run.url, 200, 30, 202)
        assert http("GET", f"{run.url}/readyz")[0] == 200  # a write went through again
        wait_for(
            lambda: counted_pageviews(run.url) == 50,
            what="the beacons after the refusal",
            said=telling(run),
        )
        assert run.stop() == 0
        said = run.log().count("cannot write to")
        assert said == 1, run.log()  # said once, not once per beacon

        # 2. a record cut short in the middle of a segment (nothing written to ClickHouse for
        # a minute, so the journal holds every beacon), then a hard kill
        slow = PipedService(
            "run", tmp_path, {**env, "VISITORSTATS_FLUSH_INTERVAL_SECONDS": "60"}, port=run.port
        ).start()
        run = slow
        beacons(run.url, 300, 10, 202)
        (segment,) = segments(journal)
        run.limit_files(segment.stat().st_size + 40)  # part of the next record only
        beacons(run.url, 400, 3, 503)
        refused_and_said(run)
        run.limit_files(-1)
        beacons(run.url, 500, 10, 202)
        run.kill()

        run = PipedService("run", tmp_path, env, port=run.port).start()
        wait_for(
            lambda: counted_pageviews(run.url) >= 70,
            what="every answered beacon",
            said=telling(run),
        )
        assert counted_pageviews(run.url) == 70  # 20 + 30 + 10 + 10: none refused, none lost
        assert "damaged" not in run.log(), run.log()
    finally:
        run.stop()


def test_beacons_are_refused_before_the_disk_is_full(tmp_path: Path) -> None:
    """The journal leaves ``VISITORSTATS_DISK_RESERVE_BYTES`` free on its disk for the embedded
    ClickHouse (and others): past it, beacons get a 503 that says so, readiness says so, and
    nothing is counted; the service stays up. (Here the reserve is more than the disk has free.)"""
    write_sites(tmp_path)
    st = os.statvfs(tmp_path)
    reserve = st.f_bavail * st.f_frsize + (1 << 30)
    run = PipedService(
        "run", tmp_path, {**ENV, "VISITORSTATS_DISK_RESERVE_BYTES": str(reserve)}
    ).start(wait_ready=False)  # never ready: its journal's disk has no room above the reserve
    try:
        wait_for(lambda: alive(run.url), what="the service up", said=telling(run))
        status, _, body = http(
            "POST",
            f"{run.url}/collect",
            json.dumps({"site": "dongha", "url": "https://portal.example.vn/"}).encode(),
            {"Content-Type": "application/json", "User-Agent": CHROME_UA},
        )
        assert status == 503, body
        # the public is told no more (the operator's reason is readiness's, below)
        assert json.loads(body)["error"] == "the service cannot take more beacons now"
        beacons(run.url, 0, 5, 503)
        status, _, body = http("GET", f"{run.url}/readyz")
        assert status == 503, body
        detail = json.loads(body)["checks"]["publish"]["detail"]
        assert "kept free" in detail and f"{reserve:,}" in detail, detail
        assert "VISITORSTATS_DISK_RESERVE_BYTES" in detail and "journal" in detail, detail
        assert http("GET", f"{run.url}/healthz")[0] == 200
        assert unavailable(run.url) == 6
        time.sleep(1)  # a counter tick or two: nothing came in
        assert counted_pageviews(run.url) == 0
        assert not any(p.stat().st_size for p in segments(tmp_path / "data" / "journal"))
    finally:
        assert run.stop() == 0
