"""``visitorstats migrate --cluster NAME`` DDL, checked by the ClickHouse engine's own parser."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.procs import ROOT

pytestmark = pytest.mark.ops

# chDB runs in a child process: an embedded engine is one per process, and the tests' own
# engines open data paths.
FORMAT = """
import json, sys, chdb
out = []
for statement in json.load(sys.stdin):
    quoted = "'" + statement.replace("\\\\", "\\\\\\\\").replace("'", "\\\\'") + "'"
    out.append(chdb.query("SELECT formatQuery(" + quoted + ")", "JSONEachRow").bytes().decode())
print(json.dumps(out))
"""


def statements(*args: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "migrate", "--print", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    return [s.strip() for s in result.stdout.split(";\n") if s.strip().rstrip(";")]


def formatted(stmts: list[str]) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", FORMAT],
        input=json.dumps([s.rstrip(";") for s in stmts]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line)[next(iter(json.loads(line)))] for line in json.loads(result.stdout)]


def test_cluster_ddl_parses_and_creates_replicated_and_distributed_tables() -> None:
    stmts = statements("--cluster", "visitorstats")
    out = formatted(stmts)
    assert len(out) == len(stmts)
    joined = "\n".join(out)
    assert "ON CLUSTER visitorstats" in joined
    assert "ReplicatedMergeTree('/clickhouse/tables/{shard}/default/events'" in joined
    assert "ENGINE = Distributed(visitorstats, default, events_local, kafka_partition)" in joined
    assert "ENGINE = Distributed(visitorstats, default, peaks_local, rand())" in joined
    assert "replicated_deduplication_window" in joined
    assert "non_replicated_deduplication_window" not in joined
    assert (
        "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/default/online_now', "
        "'{replica}', version)" in joined
    )
    assert (
        "ENGINE = Distributed(visitorstats, default, online_now_local, kafka_partition)" in joined
    )
    for table in ("events", "peaks", "online_now", "schema_migrations"):
        assert any(f"CREATE TABLE IF NOT EXISTS {table}" in s for s in out), table
    # a projection is added to the replicated tables (the Distributed one has no parts), and
    # dropped again by a later migration
    alters = [s for s in out if s.startswith("ALTER TABLE")]
    assert len(alters) == 9, alters
    local = [s for s in alters if s.startswith("ALTER TABLE events_local ON CLUSTER visitorstats")]
    assert len(local) == 6, alters
    assert "ADD PROJECTION IF NOT EXISTS buckets" in local[0]
    assert "MATERIALIZE PROJECTION buckets" in local[1]
    assert "DROP PROJECTION IF EXISTS buckets" in local[2]
    # a column goes to the replicated tables, then to the Distributed table over them
    assert "ADD COLUMN IF NOT EXISTS `micros` UInt16 DEFAULT 0 AFTER ts" in local[3]
    assert alters[4].startswith("ALTER TABLE events ON CLUSTER visitorstats")
    assert "ADD COLUMN IF NOT EXISTS `micros` UInt16 DEFAULT 0 AFTER ts" in alters[4]
    assert "ADD COLUMN IF NOT EXISTS `in_visit` UInt8 DEFAULT 1 AFTER starts_visit" in local[4]
    assert alters[6].startswith("ALTER TABLE events ON CLUSTER visitorstats")
    assert "ADD COLUMN IF NOT EXISTS `in_visit` UInt8 DEFAULT 1 AFTER starts_visit" in alters[6]
    assert "ADD COLUMN IF NOT EXISTS `kafka_base` Int64 DEFAULT 0 AFTER kafka_offset" in local[5]
    assert alters[8].startswith("ALTER TABLE events ON CLUSTER visitorstats")
    assert "ADD COLUMN IF NOT EXISTS `kafka_base` Int64 DEFAULT 0 AFTER kafka_offset" in alters[8]


def test_single_server_ddl_parses() -> None:
    out = formatted(statements())
    joined = "\n".join(out)
    assert "Distributed" not in joined and "ON CLUSTER" not in joined
    assert "PROJECTION daily" in joined and "non_replicated_deduplication_window" in joined
    assert "ADD PROJECTION IF NOT EXISTS buckets" in joined
    assert "MATERIALIZE PROJECTION buckets" in joined
    assert "DROP PROJECTION IF EXISTS buckets" in joined
    assert "ENGINE = ReplacingMergeTree(version)" in joined


def test_a_cluster_name_that_is_not_an_identifier_is_refused() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "migrate", "--print", "--cluster", "x; DROP"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode != 0
    assert "--cluster must be a plain identifier" in result.stderr
