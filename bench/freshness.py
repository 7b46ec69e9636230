"""Freshness: from a beacon's ``202`` to the moment the counter shows it.

A probe sends one pageview at a time to the ``probe`` site (always the same visitor, so the
probes share one partition and are counted in the order they were accepted) and polls the
counter every ``poll`` seconds: when ``pageviews.total`` reaches i, the i-th accepted probe is
in the counter. The poll period bounds the error (it is added, never hidden).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import aiohttp

from bench.deploy import PROBE_SITE

PROBE_UA = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36"
)


async def probe(
    ingest_url: str, aggregate_url: str, seconds: float, rate: float = 10.0, poll: float = 0.02
) -> dict[str, Any]:
    counter_url = f"{aggregate_url}/v1/sites/{PROBE_SITE}/counter"
    accepted: list[float] = []
    seen: list[float] = []
    refused = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

        async def count() -> int:
            async with session.get(counter_url) as resp:
                body = await resp.read()
            return int(json.loads(body)["pageviews"]["total"])

        base = await count()
        counted = 0
        sending = True

        async def sender() -> None:
            nonlocal refused, sending
            interval = 1.0 / rate
            next_at = time.monotonic()
            end = next_at + seconds
            while time.monotonic() < end:
                body = json.dumps(
                    {
                        "site": PROBE_SITE,
                        "type": "pageview",
                        "url": "https://probe.example.vn/",
                        "event_id": str(uuid.uuid4()),
                    }
                )
                async with session.post(
                    f"{ingest_url}/collect",
                    data=body,
                    headers={
                        "Content-Type": "text/plain",
                        "User-Agent": PROBE_UA,
                        "X-Forwarded-For": "192.0.2.1",
                    },
                ) as resp:
                    await resp.read()
                    status = resp.status
                now = time.monotonic()
                if status == 202:
                    accepted.append(now)
                    # counted before its answer came back: visible at once
                    while len(seen) < min(counted, len(accepted)):
                        seen.append(now)
                else:
                    refused += 1
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            sending = False

        async def poller() -> None:
            nonlocal counted
            give_up = None
            while True:
                try:
                    counted = await count() - base
                except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                    await asyncio.sleep(poll)
                    continue
                now = time.monotonic()
                while len(seen) < min(counted, len(accepted)):
                    seen.append(now)
                if not sending:
                    if len(seen) >= len(accepted):
                        return
                    give_up = give_up or now + 30
                    if now > give_up:
                        return
                await asyncio.sleep(poll)

        await asyncio.gather(sender(), poller())
    timed = [(a, max(0.0, s - a)) for s, a in zip(seen, accepted, strict=False)]
    lags = sorted(lag for _, lag in timed)
    start = accepted[0] if accepted else 0.0
    return {
        "probes": len(accepted),
        "seen": len(seen),
        "refused": refused,
        "poll_seconds": poll,
        "p50": percentile(lags, 50),
        "p99": percentile(lags, 99),
        "max": lags[-1] if lags else None,
        # the slowest probes: (seconds into the run when accepted, seconds to the counter)
        "slowest": [
            (round(a - start, 2), round(lag, 3))
            for a, lag in sorted(timed, key=lambda t: t[1], reverse=True)[:10]
        ],
    }


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    k = min(len(values) - 1, max(0, round(p / 100 * len(values) + 0.5) - 1))
    return values[k]
