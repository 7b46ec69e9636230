"""Running wrk with one of the Lua scripts of ``bench/wrk`` and reading the ``BENCH {...}`` line
its ``done()`` prints."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent / "wrk"
BENCH_SITES = ("bench-a", "bench-b", "bench-c", "bench-d")


def wrk_binary() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit("bench: wrk is not installed (apt-get install wrk; `make bench` does it)")
    return path


def run_wrk(
    url: str,
    script: str,
    *,
    threads: int,
    connections: int,
    seconds: float,
    args: list[str] | None = None,
    timeout_s: int = 5,
) -> dict[str, Any]:
    """Run wrk for ``seconds`` (whole seconds, at least 1) and return the script's summary."""
    cmd = [
        wrk_binary(),
        f"-t{threads}",
        f"-c{max(connections, threads)}",
        f"-d{max(1, round(seconds))}s",
        f"-T{timeout_s}s",
        "-s",
        str(SCRIPTS / script),
        url,
    ]
    if args:
        cmd += ["--", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            result: dict[str, Any] = json.loads(line[len("BENCH ") :])
            return result
    raise RuntimeError(
        f"wrk printed no summary (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )


def beacons(
    url: str,
    *,
    seconds: float,
    rate: int = 0,
    threads: int = 2,
    connections: int = 256,
    sites: tuple[str, ...] = BENCH_SITES,
    seed: int = 1,
    visitors: int = 20_000,
) -> dict[str, Any]:
    """Varied beacons for ``seconds`` (then health checks for one more second, so every beacon
    sent has its answer when wrk stops); ``rate`` > 0 paces them (beacons/s over all threads).
    Adds ``rate`` (accepted beacons/s) to wrk's summary."""
    beacon_seconds = max(1, round(seconds))
    result = run_wrk(
        url,
        "paced.lua" if rate else "beacons.lua",
        threads=threads,
        connections=connections,
        seconds=beacon_seconds + 1,
        args=[
            str(beacon_seconds),
            str(rate),
            ",".join(sites),
            str(seed),
            str(visitors),
            str(threads),
            str(random.getrandbits(32)),
        ],
    )
    # every thread sends beacons for exactly beacon_seconds from its first request
    result["rate"] = result["accepted"] / beacon_seconds
    result["target_rate"] = rate
    return result


def get(url: str, *, seconds: float, threads: int = 1, connections: int = 64) -> dict[str, Any]:
    result = run_wrk(url, "get.lua", threads=threads, connections=connections, seconds=seconds)
    result["rate"] = result["ok"] / (result["duration_us"] / 1e6)
    return result
