"""A part of a table damaged on disk under the embedded ClickHouse (``visitorstats run``): its
reads fail while ClickHouse still answers. The counter serves its last numbers marked stale,
and readiness says that the counter's reads fail and why, rather than "ok" (a part that chDB
committed with files cut short, when the disk refused it in the middle of the write, left a
service ready by every check whose counter never moved again). A restart sets the damaged
part aside (ClickHouse's ``broken-on-start``) and counts again.

The damage is real: the column file of every part of ``peaks`` cut to 4 bytes, as a disk
that filled in the middle of a part's write leaves it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.faults.conftest import counted_pageviews, wait_for
from tests.support.procs import Service, http, send_beacon, write_sites

pytestmark = pytest.mark.faults

ENV = {"VISITORSTATS_RATE_LIMIT_PER_SECOND": "1000", "VISITORSTATS_RATE_LIMIT_BURST": "1000"}


def table_parts(clickhouse: Path, table: str) -> list[Path]:
    """The directories of the active-looking parts of ``table`` (an Atomic database: the
    table's metadata names the UUID of its data directory)."""
    for sql in clickhouse.glob(f"store/*/*/{table}.sql"):
        found = re.search(r"UUID '([0-9a-f-]{36})'", sql.read_text())
        if found:
            uuid = found.group(1)
            return sorted(
                p for p in clickhouse.glob(f"store/{uuid[:3]}/{uuid}/all_*") if p.is_dir()
            )
    return []


def readiness(base: str) -> tuple[int, dict[str, dict[str, object]]]:
    status, _, body = http("GET", f"{base}/readyz")
    return status, json.loads(body)["checks"]


def test_a_damaged_part_makes_the_counter_stale_and_readiness_say_its_reads_fail(
    tmp_path: Path,
) -> None:
    write_sites(tmp_path)
    clickhouse = tmp_path / "data" / "clickhouse"
    run = Service("run", tmp_path, ENV).start()
    try:
        for i in range(5):
            assert send_beacon(run.url, "dongha", client=f"198.51.100.{i + 1}") == 202
        wait_for(lambda: counted_pageviews(run.url) == 5, what="the beacons counted")
        wait_for(lambda: table_parts(clickhouse, "peaks"), what="a peak stored")
        for part in table_parts(clickhouse, "peaks"):
            for column in part.glob("*.bin"):
                with column.open("r+b") as f:
                    f.truncate(4)

        def said() -> str:
            return f"readyz {readiness(run.url)}\n{run.log()}"

        wait_for(lambda: readiness(run.url)[0] == 503, what="readiness refusing", said=said)
        status, checks = readiness(run.url)
        detail = str(checks["clickhouse"]["detail"])
        assert checks["clickhouse"]["ok"] is False
        assert detail.startswith("the counter's reads have failed for "), detail
        assert "peaks" in detail or "CANNOT_READ" in detail or "Cannot read" in detail, detail
        status, _, body = http("GET", f"{run.url}/v1/sites/dongha/counter")
        assert status == 200 and json.loads(body)["stale"] is True, body
        assert http("GET", f"{run.url}/healthz")[0] == 200
        # a beacon is still taken (the journal and the events' table are well)
        assert send_beacon(run.url, "dongha", client="198.51.100.99") == 202
    finally:
        assert run.stop() == 0

    run = Service("run", tmp_path, ENV, port=run.port).start()  # ready again
    try:
        wait_for(lambda: counted_pageviews(run.url) == 6, what="every beacon counted")
        status, _, body = http("GET", f"{run.url}/v1/sites/dongha/counter")
        assert json.loads(body)["stale"] is False, body
        assert readiness(run.url)[0] == 200
        assert list(clickhouse.glob("store/*/*/detached/broken-on-start_*"))  # set aside
    finally:
        assert run.stop() == 0
