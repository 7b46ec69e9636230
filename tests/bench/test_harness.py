"""``make bench`` keeps working: every benchmark runs for a second or two at a tiny load
(``python -m bench --quick``), and the harness's ground truth holds — beacons answered 202 =
records in Kafka = page views counted, in-process rows stored = events fed. No figure is
asserted: benchmarks are not tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import ROOT

pytestmark = pytest.mark.bench

FIGURES = (
    "ingest beacons/s",
    "ingest p99 latency",
    "counter JSON requests/s",
    "freshness p99",
    "stream subscribers",
    "aggregate events/s",
    "aggregate bytes per online visitor",
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--keep", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (out / "latest.md").read_text(encoding="utf-8") in proc.stdout
    result: dict[str, Any] = json.loads((out / "latest.json").read_text(encoding="utf-8"))
    result["kept_logs"] = sorted(p.name for p in (out / "logs").iterdir())
    return result


@pytest.mark.timeout(900)
def test_every_figure_is_reported_beside_its_baseline(quick_run: dict[str, Any]) -> None:
    figures = {f["name"]: f for f in quick_run["figures"]}
    for name in FIGURES:
        matching = [f for n, f in figures.items() if n.startswith(name)]
        assert matching, f"{name} missing from {sorted(figures)}"
        figure = matching[0]
        assert figure["value"] is not None and figure["value"] > 0, figure
        assert figure["baseline"] is not None and figure["baseline"] > 0, figure


@pytest.mark.timeout(900)
def test_keep_leaves_the_logs_of_the_processes(quick_run: dict[str, Any]) -> None:
    for name in ("aggregate.log", "ingest.log", "tansu.log"):
        assert name in quick_run["kept_logs"]


@pytest.mark.timeout(900)
def test_beacons_sent_equal_records_in_kafka_equal_pageviews_counted(
    quick_run: dict[str, Any],
) -> None:
    truth = quick_run["truth"]
    assert truth["beacons_refused_or_failed"] == 0
    assert truth["beacons_accepted"] > 0
    assert truth["kafka"]["records"] == truth["kafka"]["beacons_accepted"] > 0
    # the freshness probes go to a site of their own, on top of the wrk beacons
    assert truth["records_in_kafka_at_end"] == truth["beacons_accepted"] + truth["probes_accepted"]
    assert truth["pageviews_counted"] == truth["human_pageviews_accepted"]
    assert truth["catch_up"]["pageviews"] == truth["catch_up"]["expected"]


@pytest.mark.timeout(900)
def test_ground_truth_holds_with_answers_after_the_broker(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """``--publish-ack broker``: the answers wait for the broker's acknowledgement, and every
    beacon answered 202 reaches Kafka and is counted."""
    out = tmp_path_factory.mktemp("bench-broker")
    args = ["--quick", "--only", "ingest,freshness", "--publish-ack", "broker", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "`VISITORSTATS_PUBLISH_ACK=broker`" in proc.stdout
    truth = json.loads((out / "latest.json").read_text(encoding="utf-8"))["truth"]
    assert truth["beacons_refused_or_failed"] == 0
    assert truth["kafka"]["records"] == truth["kafka"]["beacons_accepted"] > 0
    assert truth["pageviews_counted"] == truth["human_pageviews_accepted"] > 0


@pytest.mark.timeout(900)
def test_the_in_process_figures_count_what_they_were_fed(quick_run: dict[str, Any]) -> None:
    agg = quick_run["truth"]["aggregate_inproc"]
    assert agg["rows_stored"] == agg["events"] > 0
    assert agg["pageviews_counted"] == agg["pageviews_sent"] > 0
    memory = quick_run["raw"]["memory"]
    assert memory["online"] > 0 and memory["bytes"] > 0


@pytest.mark.timeout(900)
def test_every_subscriber_holds_on_and_ends_on_the_current_numbers(
    quick_run: dict[str, Any],
) -> None:
    subs = quick_run["truth"]["subscribers"]
    assert subs["alive"] == subs["wanted"] > 0
    assert subs["on_current_numbers"] == subs["alive"]
    assert subs["fewest_events"] > 0
    baseline = quick_run["raw"]["subscribers"]["baseline"]
    assert baseline["alive"] == subs["wanted"]


def run_tool(module: str, *args: str) -> str:
    """``python -m module args``: its standard output (it must exit 0)."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return proc.stdout


@pytest.mark.parametrize("noop", [False, True])
def test_the_lane_figure_answers_every_beacon_and_hands_on_every_accepted_one(noop: bool) -> None:
    out = run_tool("bench.lane", "--beacons", "2000", *(["--noop"] if noop else []))
    line = next(x for x in out.splitlines() if x.startswith("BENCH "))
    result = json.loads(line.removeprefix("BENCH "))
    assert result["answers"] == 2000
    assert result["records"] == (0 if noop else 2000)
    assert result["cpu_us_per_beacon"] > 0


def test_the_broker_batches_tool_delivers_its_markers() -> None:
    out = run_tool(
        "bench.broker_batches",
        *("--flushes", "50", "--seconds", "2", "--prefill", "100", "--prefill-batch", "3"),
    )
    result = json.loads(out.splitlines()[-1])
    assert result["flushes_per_s"] == 50
    assert (result["prefilled"], result["prefill_batch"]) == (100, 3)  # acknowledged
    assert result["markers"] > 0  # the consumer read what the producer sent
    assert 0 <= result["lag_p50"] <= result["lag_p99"] <= result["lag_max"]
    assert result["broker_cores"] > 0


def test_the_many_sites_tool_counts_every_beacon_of_every_registry(tmp_path: Path) -> None:
    run_tool(
        "bench.many_sites",
        *("--sites", "1,30", "--rate", "40", "--active", "20", "--seconds", "1"),
        *("--idle-seconds", "1", "--out", str(tmp_path)),
    )  # exits 1 unless every beacon was answered 202 and counted on its own site
    results = json.loads((tmp_path / "many-sites.json").read_text())
    assert set(results) == {"1", "30"}
    for r in results.values():
        assert r["accepted"] == r["counted"] == 40 and r["exact"] is True
        assert r["freshness_probes"] >= 1 and r["idle_cpu"] >= 0
    assert "| 30 |" in (tmp_path / "many-sites.md").read_text()
