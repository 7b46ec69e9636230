"""What a site costs (``python -m bench.many_sites``): ``visitorstats run`` with registries of
``--sites`` sizes, each measured alone, idle and then under a steady load.

For each size: the CPU of the idle process over ``--idle-seconds`` and its counter refreshes
(``visitorstats_snapshot_refresh_seconds``); then ``--rate`` beacons a second over the first
``--active`` sites for ``--seconds``, paced (open loop), each beacon's latency timed, while a
probe sends one beacon a second to a site of its own and polls the counter until it shows it
(freshness). Ground truth: the page views counted over the loaded sites equal the beacons
answered 202. Prints a table and writes it (and every number) under ``bench-results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.deploy import CpuMeter, stop
from bench.freshness import percentile
from tests.support.procs import Service, write_sites

PROBE = "probe"


def registry(sites: int) -> str:
    blocks = [f'[sites.s{i}]\ntimezone = "Asia/Ho_Chi_Minh"\n' for i in range(sites)]
    blocks.append(f'[sites.{PROBE}]\ntimezone = "UTC"\n')
    return "\n".join(blocks)


async def refreshes(session: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    """(count, sum of seconds) of the counter's refreshes so far."""
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    found = {"count": 0.0, "sum": 0.0}
    for line in text.splitlines():
        for part in found:
            if line.startswith(f"visitorstats_snapshot_refresh_seconds_{part} "):
                found[part] = float(line.split()[1])
    return found["count"], found["sum"]


async def pageviews(session: aiohttp.ClientSession, url: str, site: str) -> int:
    async with session.get(f"{url}/v1/sites/{site}/counter") as resp:
        body = await resp.json()
    return int(body["pageviews"]["total"])


async def beacon(session: aiohttp.ClientSession, url: str, site: str, i: int) -> int:
    body = json.dumps({"site": site, "url": f"https://portal.example.vn/{site}/{i}"})
    headers = {
        "Content-Type": "text/plain",
        "User-Agent": f"Mozilla/5.0 (X11; Linux x86_64) bench/{i % 5000}",
        "X-Forwarded-For": f"10.{i % 200}.{(i // 200) % 250}.{i % 250}",
    }
    async with session.post(f"{url}/collect", data=body, headers=headers) as resp:
        await resp.read()
        return resp.status


async def load(
    session: aiohttp.ClientSession, url: str, rate: int, seconds: float, active: int
) -> dict[str, Any]:
    """``rate`` beacons a second, each sent at its time whatever the others do."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    per_site = [0] * active

    async def one(i: int) -> None:
        started = time.perf_counter()
        status = await beacon(session, url, f"s{i % active}", i)
        latencies.append(time.perf_counter() - started)
        statuses[status] = statuses.get(status, 0) + 1
        if status == 202:
            per_site[i % active] += 1

    tasks = []
    t0 = time.perf_counter()
    for i in range(int(rate * seconds)):
        due = t0 + i / rate
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    return {"latencies": latencies, "statuses": statuses, "per_site": per_site}


async def freshness(session: aiohttp.ClientSession, url: str, seconds: float) -> list[float]:
    """Once a second: a beacon to the probe site, then the time until its counter shows it."""
    found: list[float] = []
    shown = await pageviews(session, url, PROBE)
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        i += 1
        sent = time.monotonic()
        if await beacon(session, url, PROBE, 10_000_000 + i) != 202:
            continue
        while time.monotonic() - sent < 10:
            now = await pageviews(session, url, PROBE)
            if now > shown:
                found.append(time.monotonic() - sent)
                shown = now
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - sent)))
    return found


async def measure(service: Service, args: argparse.Namespace, active: int) -> dict[str, Any]:
    url = service.url
    assert service.proc is not None
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.sleep(2)  # past the start's first refreshes
        count0, sum0 = await refreshes(session, url)
        with CpuMeter({"run": [service.proc.pid]}) as idle:
            await asyncio.sleep(args.idle_seconds)
        count1, sum1 = await refreshes(session, url)
        loaded, fresh = await asyncio.gather(
            load(session, url, args.rate, args.seconds, active),
            freshness(session, url, args.seconds),
        )
        await asyncio.sleep(3)  # the last beacons reach the counter
        counted = [await pageviews(session, url, f"s{i}") for i in range(active)]
    lat = sorted(loaded["latencies"])
    refreshes_seen = count1 - count0
    return {
        "idle_cpu": idle.shares()["run"],
        "refresh_mean_s": (sum1 - sum0) / refreshes_seen if refreshes_seen else None,
        "refreshes_per_s": refreshes_seen / idle.seconds,
        "beacon_p50_s": percentile(lat, 50),
        "beacon_p99_s": percentile(lat, 99),
        "statuses": loaded["statuses"],
        "freshness_p50_s": percentile(sorted(fresh), 50),
        "freshness_max_s": max(fresh) if fresh else None,
        "freshness_probes": len(fresh),
        "accepted": sum(loaded["per_site"]),
        "counted": sum(counted),
        "exact": counted == loaded["per_site"],
    }


def run_one(sites: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    write_sites(workdir, registry(sites))
    env = {
        "VISITORSTATS_DATA_DIR": str(workdir / "data"),
        "VISITORSTATS_LOG_LEVEL": "WARNING",
        "VISITORSTATS_RATE_LIMIT_PER_SECOND": "0",
    }
    service = Service("run", workdir, env).start(timeout=180)
    try:
        return asyncio.run(measure(service, args, min(sites, args.active)))
    finally:
        stop(service.proc)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def table(results: dict[int, dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"`python -m bench.many_sites --sites {args.sites}` ({args.rate} beacons/s over the "
        f"first {args.active} sites for {args.seconds:g} s; idle over {args.idle_seconds:g} s)",
        "",
        "| sites | idle CPU (of one core) | counter refresh (mean) | beacon p50 / p99 under "
        "load | freshness p50 / max | counted exactly |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for sites, r in results.items():
        lines.append(
            f"| {sites:,} | {r['idle_cpu'] * 100:.0f} % | {_ms(r['refresh_mean_s'])} | "
            f"{_ms(r['beacon_p50_s'])} / {_ms(r['beacon_p99_s'])} | "
            f"{r['freshness_p50_s'] or 0:.2f} s / {r['freshness_max_s'] or 0:.2f} s "
            f"({r['freshness_probes']} probes) | "
            f"{'yes' if r['exact'] else 'NO'}: {r['counted']:,} of {r['accepted']:,} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", default="10,2000,5000,10000", help="registry sizes")
    parser.add_argument("--rate", type=int, default=200, help="beacons a second")
    parser.add_argument("--active", type=int, default=500, help="sites the load goes to")
    parser.add_argument("--seconds", type=float, default=20.0, help="of load per size")
    parser.add_argument("--idle-seconds", type=float, default=15.0)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    results: dict[int, dict[str, Any]] = {}
    for sites in (int(s) for s in args.sites.split(",")):
        with tempfile.TemporaryDirectory(prefix=f"many-sites-{sites}-") as tmp:
            results[sites] = run_one(sites, args, Path(tmp))
        print(f"{sites} sites: {results[sites]}", flush=True)
    text = table(results, args)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "many-sites.md").write_text(text + "\n")
    (args.out / "many-sites.json").write_text(json.dumps(results, indent=1, default=str))
    worst = [r for r in results.values() if not r["exact"] or set(r["statuses"]) != {202}]
    return 1 if worst else 0


if __name__ == "__main__":
    raise SystemExit(main())
