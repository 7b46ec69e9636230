"""``make bench`` (``python -m bench``): every figure of issue 6 against real processes on this
machine, each beside a baseline measured in the same run with the same number of processes.

    python -m bench                      # the full run (a few minutes; the machine must be quiet)
    python -m bench --quick              # every figure for a second or two at a tiny load
    python -m bench --freshness-seconds 15 --only ingest,freshness --profile

The table is printed and written to ``bench-results/latest.md`` and ``latest.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import freshness, profile, report, wrkrun
from bench.deploy import (
    Baseline,
    CpuMeter,
    Deployment,
    machine_busy,
    raise_open_files,
    worker_pids,
)
from bench.report import Figure, Report
from bench.sse_clients import final_key
from tests.support.procs import ROOT

FIGURES = ("ingest", "latency", "counter", "freshness", "aggregate", "memory", "subscribers")


class Sizes:
    def __init__(self, args: argparse.Namespace) -> None:
        quick = args.quick
        self.seconds = args.seconds or (1 if quick else 10)
        self.connections = 32 if quick else 256
        self.latency_rate = 300 if quick else 20_000
        self.freshness_rate = 200 if quick else 10_000
        self.freshness_seconds = args.freshness_seconds or (2 if quick else 60)
        self.freshness_baseline_seconds = 1 if quick else 10
        self.aggregate_events = args.aggregate_events or (5_000 if quick else 500_000)
        self.memory_visitors = args.memory_visitors or (20_000 if quick else 1_000_000)
        self.subscribers = args.subscribers or (20 if quick else 10_000)
        self.stream_seconds = 3 if quick else 10


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def inproc(kind: str, *extra: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.inproc", kind, *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            result: dict[str, Any] = json.loads(line[6:])
            return result
    raise RuntimeError(f"bench.inproc {kind} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}")


def subscribers(
    url: str, n: int, seconds: float, drive: Any = None, settled: Any = None
) -> dict[str, Any]:
    """N subscribers in a process of their own; ``drive(seconds)`` changes the numbers while
    they listen, ``settled()`` returns once the numbers have stopped changing; then the last
    event has 2.5 s (a tick, the one-second pacing and a margin) to reach every subscriber."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.sse_clients", url, str(n), str(seconds)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    ready = proc.stdout.readline()
    if not ready.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"sse_clients: {ready!r}")
    started = time.monotonic()
    if drive is not None:
        drive(seconds)
    time.sleep(max(0.0, started + seconds - time.monotonic()))
    if settled is not None:
        settled()
    time.sleep(2.5)
    out, _ = proc.communicate("report\n", timeout=seconds + 120)
    for line in out.splitlines():
        if line.startswith("BENCH "):
            result: dict[str, Any] = json.loads(line[6:])
            result["ready"] = json.loads(ready[6:])
            return result
    raise RuntimeError(f"sse_clients printed no summary: {out!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny loads, a second or two each")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(FIGURES)}")
    parser.add_argument("--seconds", type=int, help="length of the wrk runs (default 10)")
    parser.add_argument("--freshness-seconds", type=int, help="sustained load (default 60)")
    parser.add_argument("--aggregate-events", type=int)
    parser.add_argument("--memory-visitors", type=int)
    parser.add_argument("--subscribers", type=int)
    parser.add_argument("--workers", type=int, default=2, help="ingest (and baseline) processes")
    parser.add_argument("--profile", action="store_true", help="py-spy the measured processes")
    parser.add_argument(
        "--publish-ack",
        choices=("spool", "broker"),
        default="spool",
        help="ingest's VISITORSTATS_PUBLISH_ACK (default: spool, the product's default)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    parser.add_argument(
        "--keep", action="store_true", help="keep the processes' logs: copied to OUT/logs"
    )
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else set(FIGURES)
    unknown = only - set(FIGURES)
    if unknown:
        parser.error(f"unknown figures: {', '.join(sorted(unknown))}")
    sizes = Sizes(args)
    quick = args.quick
    out: Path = args.out
    # processes' data (chDB, spool, logs) stay outside the repository and go at the end
    work = Path(tempfile.mkdtemp(prefix="visitorstats-bench-"))
    open_files = raise_open_files()
    rep = Report(mode="quick" if quick else "full")
    rep.machine = report.machine()
    rep.machine["open_files"] = open_files
    rep.machine["cores_busy_before_start"] = machine_busy()
    rep.machine["publish_ack"] = args.publish_ack
    profiles: list[tuple[str, Path]] = []
    workers = args.workers

    def met(ok: bool) -> bool | None:
        return None if quick else ok

    truth: dict[str, Any] = {
        "beacons_accepted": 0,
        "beacons_refused_or_failed": 0,
        "human_pageviews_accepted": 0,
    }

    def tally(result: dict[str, Any]) -> None:
        truth["beacons_accepted"] += result["accepted"]
        truth["beacons_refused_or_failed"] += result["other"] + sum(result["errors"].values())
        truth["human_pageviews_accepted"] += result["pageviews"] - result["bot_pageviews"]

    needs_deployment = only & {"ingest", "latency", "counter", "freshness", "subscribers"}
    dep = (
        Deployment(work / "deployment", workers=workers, publish_ack=args.publish_ack)
        if needs_deployment
        else None
    )
    try:

        def server_pids() -> dict[str, list[int]]:
            assert dep is not None and dep.broker.proc is not None
            pids = {"broker": [dep.broker.proc.pid]}
            if dep.ingest is not None:
                pids["ingest"] = worker_pids(dep.ingest)
            if dep.aggregate is not None and dep.aggregate.proc is not None:
                pids["aggregate"] = [dep.aggregate.proc.pid]
            return pids

        if dep is not None:
            log("starting Tansu and visitorstats ingest")
            dep.start_broker()
            ingest = dep.start_ingest()

        if dep is not None and "ingest" in only:

            def ingest_baseline(when: str) -> dict[str, Any]:
                log(f"ingest beacons/s: baseline ({workers} processes), {when}")
                with Baseline(work, workers) as base, CpuMeter({"baseline": base.pids()}) as cpu:
                    b = wrkrun.beacons(
                        base.url, seconds=sizes.seconds, connections=sizes.connections
                    )
                b["cpu_cores"] = cpu.shares()
                return b

            # The baseline on both sides of the measured run, against the machine's drift: its
            # speed moved by up to a fifth between runs a minute apart (BENCHMARKS.md).
            before = ingest_baseline("before")
            log(f"ingest beacons/s: visitorstats ingest ({workers} processes)")
            sampler = None
            if args.profile:
                path = out / "profile-ingest.txt"
                sampler = profile.Sampler(worker_pids(ingest)[0], sizes.seconds, path)
                profiles.append(("ingest worker, at full load", path))
            with CpuMeter(server_pids()) as cpu:
                r = wrkrun.beacons(ingest.url, seconds=sizes.seconds, connections=sizes.connections)
            r["cpu_cores"] = cpu.shares()
            if sampler:
                sampler.wait()
            tally(r)
            after = ingest_baseline("after")
            rep.raw["ingest"] = {
                "baseline before": before,
                "visitorstats": r,
                "baseline after": after,
            }
            baseline_rate = (before["rate"] + after["rate"]) / 2
            fig = Figure(
                f"ingest beacons/s, {workers} processes, every beacon in Kafka",
                r["rate"],
                "/s",
                baseline_rate,
                f"{workers} processes; the mean of {before['rate']:,.0f}/s before and "
                f"{after['rate']:,.0f}/s after",
                "≥ 0.7× and ≥ 40,000",
                met(r["rate"] >= 0.7 * baseline_rate and r["rate"] >= 40_000),
                note=f"p99 {r['latency_us']['p99'] / 1000:.1f} ms at {args.seconds or 10} s, "
                f"{sizes.connections} connections"
                if not quick
                else "",
            )
            rep.add(fig)

        if dep is not None and "latency" in only:
            rate = sizes.latency_rate
            log(f"ingest p99 at {rate}/s: baseline")
            with Baseline(work, workers) as base, CpuMeter({"baseline": base.pids()}) as cpu:
                b = wrkrun.beacons(
                    base.url, seconds=sizes.seconds, rate=rate, threads=1, connections=128
                )
            b["cpu_cores"] = cpu.shares()
            log(f"ingest p99 at {rate}/s: visitorstats ingest")
            with CpuMeter(server_pids()) as cpu:
                r = wrkrun.beacons(
                    ingest.url, seconds=sizes.seconds, rate=rate, threads=1, connections=128
                )
            r["cpu_cores"] = cpu.shares()
            tally(r)
            rep.raw["latency"] = {"baseline": b, "visitorstats": r}
            p99, bp99 = r["latency_us"]["p99"] / 1000, b["latency_us"]["p99"] / 1000
            rep.add(
                Figure(
                    f"ingest p99 latency at {rate:,} beacons/s",
                    p99,
                    "ms",
                    bp99,
                    f"{workers} processes",
                    "< 5 ms",
                    met(p99 < 5 and r["rate"] >= 0.98 * rate),
                    note=f"achieved {r['rate']:,.0f}/s, p50 {r['latency_us']['p50'] / 1000:.2f} ms",
                    higher_is_better=False,
                )
            )

        if dep is not None and (only & {"ingest", "latency"}):
            accepted = truth["beacons_accepted"]
            truth["kafka"] = {
                "beacons_accepted": accepted,
                "records": dep.settled_offsets(accepted),
            }

        if dep is not None and (only & {"counter", "freshness", "subscribers"}):
            log("starting visitorstats aggregate; catching up with the topic")
            aggregate = dep.start_aggregate()
            want = truth["human_pageviews_accepted"]
            got, took = dep.wait_pageviews(want)
            truth["catch_up"] = {"pageviews": got, "expected": want, "seconds": round(took, 1)}

        if dep is not None and "counter" in only:
            counter_path = "/v1/sites/bench-a/counter"
            log("counter JSON requests/s: baseline (1 process)")
            with Baseline(work, 1) as base, CpuMeter({"baseline": base.pids()}) as cpu:
                b = wrkrun.get(base.url + counter_path, seconds=sizes.seconds)
            b["cpu_cores"] = cpu.shares()
            log("counter JSON requests/s: visitorstats aggregate (1 process)")
            with CpuMeter(server_pids()) as cpu:
                r = wrkrun.get(aggregate.url + counter_path, seconds=sizes.seconds)
            r["cpu_cores"] = cpu.shares()
            rep.raw["counter"] = {"baseline": b, "visitorstats": r}
            rep.add(
                Figure(
                    "counter JSON requests/s, 1 process",
                    r["rate"],
                    "/s",
                    b["rate"],
                    "1 process",
                    "≥ 0.8×",
                    met(r["rate"] >= 0.8 * b["rate"] and r["other"] == 0),
                )
            )

        if dep is not None and "freshness" in only:
            # the consumer has joined its group and counts: one probe seen end to end
            warm = asyncio.run(freshness.probe(ingest.url, aggregate.url, 0.1))
            log(f"freshness: probe alone for {sizes.freshness_baseline_seconds}s")
            idle = asyncio.run(
                freshness.probe(ingest.url, aggregate.url, sizes.freshness_baseline_seconds)
            )
            rate, seconds = sizes.freshness_rate, sizes.freshness_seconds
            log(f"freshness: probe under {rate}/s for {seconds}s")
            load: dict[str, Any] = {}

            def background() -> None:
                load.update(
                    wrkrun.beacons(
                        ingest.url, seconds=seconds, rate=rate, threads=1, connections=256, seed=3
                    )
                )

            meter = CpuMeter(server_pids())
            meter.__enter__()
            thread = threading.Thread(target=background)
            thread.start()
            sampler = None
            if args.profile:
                path = out / "profile-aggregate.txt"
                sampler = profile.Sampler(
                    aggregate.proc.pid if aggregate.proc else 0, seconds, path
                )
                profiles.append((f"aggregate process, {rate}/s sustained", path))
            loaded = asyncio.run(freshness.probe(ingest.url, aggregate.url, seconds))
            thread.join()
            meter.__exit__(None, None, None)
            load["cpu_cores"] = meter.shares()
            if sampler:
                sampler.wait()
            tally(load)
            truth["probes_accepted"] = warm["probes"] + idle["probes"] + loaded["probes"]
            rep.raw["freshness"] = {"idle": idle, "loaded": loaded, "load": load}
            ok = (
                loaded["p99"] is not None
                and loaded["p99"] <= 1.0
                and loaded["seen"] == loaded["probes"]
                and load["rate"] >= 0.98 * rate
            )
            rep.add(
                Figure(
                    f"freshness p99, accepted → in the counter, at {rate:,}/s for {seconds} s",
                    loaded["p99"],
                    "s",
                    idle["p99"],
                    "probe alone, no load",
                    "≤ 1 s",
                    met(ok),
                    note=f"{loaded['seen']}/{loaded['probes']} probes, load {load['rate']:,.0f}/s",
                    higher_is_better=False,
                )
            )

        if dep is not None and "subscribers" in only:
            n, seconds = sizes.subscribers, sizes.stream_seconds
            log(f"stream subscribers: baseline fan-out, {n} subscribers")
            with Baseline(work, 1) as base:
                b = subscribers(base.url + "/stream", n, seconds)
            log(f"stream subscribers: visitorstats aggregate, {n} subscribers")
            drive_load: dict[str, Any] = {}

            def drive(secs: float) -> None:
                drive_load.update(
                    wrkrun.beacons(
                        ingest.url,
                        seconds=secs,
                        rate=200,
                        threads=1,
                        connections=4,
                        sites=("bench-a",),
                        seed=5,
                    )
                )

            def settled() -> None:
                dep.wait_pageviews(truth["human_pageviews_accepted"])

            def drive_and_tally(secs: float) -> None:
                drive(secs)
                tally(drive_load)

            r = subscribers(
                aggregate.url + "/v1/sites/bench-a/counter/stream",
                n,
                seconds,
                drive_and_tally,
                settled,
            )
            current = final_key(json.dumps(dep.counter("bench-a")).encode())
            on_current = r["finals"].get(current, 0)
            # the stream sends at most one event a second; the numbers change every tick
            every_tick = r["events_min"] >= seconds - 2
            rep.raw["subscribers"] = {"baseline": b, "visitorstats": r, "drive": drive_load}
            rep.add(
                Figure(
                    "stream subscribers held by one aggregate process",
                    float(r["alive"]),
                    "",
                    float(b["alive"]),
                    f"trivial fan-out; ≥ {b['events_min']} events each",
                    "≥ 10,000, each receiving every tick",
                    met(r["alive"] >= 10_000 and every_tick and on_current == r["alive"]),
                    note=f"each got ≥ {r['events_min']} events in {seconds} s; "
                    f"{on_current} ended on the current numbers",
                )
            )
            truth["subscribers"] = {
                "wanted": n,
                "alive": r["alive"],
                "on_current_numbers": on_current,
                "fewest_events": r["events_min"],
            }

        if dep is not None and dep.aggregate is not None:
            want = truth["human_pageviews_accepted"]
            got, _ = dep.wait_pageviews(want)
            truth["pageviews_counted"] = got
            truth["records_in_kafka_at_end"] = dep.end_offsets()

        if "aggregate" in only:
            log(f"aggregate events/s: {sizes.aggregate_events:,} events into chDB")
            a = inproc(
                "aggregate",
                "--events",
                str(sizes.aggregate_events),
                "--workdir",
                str(work / "aggregate"),
            )
            rep.raw["aggregate"] = a
            rep.add(
                Figure(
                    "aggregate events/s, one process, into ClickHouse (chDB)",
                    a["events_per_s"],
                    "/s",
                    a["baseline_events_per_s"],
                    "the same rows as ready columns: chDB's insert floor",
                    "≥ 100,000",
                    met(a["events_per_s"] >= 100_000),
                    note=f"{a['events']:,} events",
                )
            )
            truth["aggregate_inproc"] = {
                "events": a["events"],
                "rows_stored": a["stored"],
                "pageviews_sent": a["pageviews_sent"],
                "pageviews_counted": a["pageviews_counted"],
            }

        if "memory" in only:
            log(f"memory per online visitor at {sizes.memory_visitors:,} online")
            m = inproc("memory", "--visitors", str(sizes.memory_visitors))
            rep.raw["memory"] = m
            rep.add(
                Figure(
                    f"aggregate bytes per online visitor at {m['online']:,} online",
                    m["bytes_per_visitor"],
                    "B",
                    m["baseline_bytes_per_visitor"],
                    "plain dict of hex keys → ts",
                    "≤ 250 B",
                    met(m["bytes_per_visitor"] <= 250 and m["online"] >= 1_000_000),
                    note="counting state with who is online, timing wheel "
                    f"{m['wheel_bytes_per_visitor']:.0f} B of it",
                    higher_is_better=False,
                )
            )
    finally:
        if dep is not None:
            log("stopping the deployment")
            dep.stop()
        if args.keep:
            logs = out / "logs"
            shutil.rmtree(logs, ignore_errors=True)
            logs.mkdir(parents=True)
            for path in work.rglob("*.log"):
                shutil.copy(path, logs / path.name)
        shutil.rmtree(work, ignore_errors=True)

    rep.truth = truth
    md_path, _ = report.write(rep, out)
    text = report.markdown(rep)
    if profiles:
        text += "\n## Profiles (py-spy)\n\n" + "\n".join(
            profile.markdown(title, profile.top(path)) for title, path in profiles
        )
        md_path.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
