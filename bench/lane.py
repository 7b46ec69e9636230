"""CPU per beacon of the ingest hot path without the network: ``python -m bench.lane``.

Varied beacons (as ``bench/wrk/beacons.lua`` makes them: 4 sites, pageviews, heartbeats and
leaves, POST /collect and GET /collect.gif, 20,480 client addresses, 3 browsers) are fed as raw
request bytes to the server's fast lane (``LaneProtocol``) of a real ingest app whose publisher
is the standalone ``LocalPublisher``; the answers go to a transport that only counts them. What
is measured is the process's CPU time per beacon over the second pass (the first warms the
memos), so it does not depend on what else the machine runs; full collections are on a timer,
as in a server process (``services.gcpause``). ``--noop`` answers every lane
request at once with a ready reply: the lane's own parsing. Prints one ``BENCH {...}`` line;
checked: every beacon answered, every accepted one handed on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import replace
from typing import Any
from urllib.parse import quote

import uvloop

from bench.wrkrun import BENCH_SITES
from services import gcpause
from services.fastlane import LaneProtocol, RawRequest, Reply
from services.http import LANE_ROUTES, _Gate
from services.ingest import app as ingest_app
from services.ingest.publish import LocalPublisher
from services.ingest.publish_types import OutRecord
from services.ingest.service import create_ingest_app
from services.settings import Settings, parse_networks
from services.sites import Registry

UAS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
    "Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; SM-A546E) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.6478.71 Mobile Safari/537.36",
)


def requests(n: int) -> list[bytes]:
    rnd = random.Random(1)
    out = []
    for i in range(n):
        site = BENCH_SITES[i % len(BENCH_SITES)]
        ip = f"10.0.{rnd.randrange(80)}.{rnd.randrange(256)}"
        ua = rnd.choice(UAS)
        kind = rnd.choice(["pageview"] * 6 + ["heartbeat"] * 3 + ["leave"])
        url = f"https://{site}.example.vn/tin-tuc/{rnd.randrange(50)}/bai-{rnd.randrange(5000)}"
        if i % 2:
            body = json.dumps(
                {"site": site, "type": kind, "url": url, "title": f"Tin tức {i}"},
                ensure_ascii=False,
            ).encode()
            head = (
                "POST /collect HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: text/plain;charset=UTF-8\r\n"
                f"User-Agent: {ua}\r\nX-Forwarded-For: {ip}\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            out.append(head.encode() + body)
        else:
            target = f"/collect.gif?site={site}&type={kind}&url={quote(url, safe='')}"
            out.append(
                f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: {ua}\r\n"
                f"X-Forwarded-For: {ip}\r\n\r\n".encode()
            )
    return out


class _Transport:
    """Counts the answers written to it."""

    def __init__(self) -> None:
        self.answers = 0

    def write(self, data: bytes) -> None:
        self.answers += 1

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else None

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


async def run(beacons: int, noop: bool) -> dict[str, Any]:
    sites = "\n".join(f'[sites.{s}]\ntimezone = "Asia/Ho_Chi_Minh"\n' for s in BENCH_SITES)
    settings = replace(
        Settings(),
        secret=b"bench",
        rate_limit_per_second=0,
        trusted_proxies=parse_networks("127.0.0.0/8"),
    )
    records: list[OutRecord] = []
    app = create_ingest_app(settings, Registry.parse(sites), LocalPublisher(records.append))
    await app[ingest_app.PIPELINE].publisher.start()
    routes = app[LANE_ROUTES].copy()
    if noop:
        ready = Reply(b"HTTP/1.1 202 Accepted\r\n", b"")

        def answer(req: RawRequest, conn: LaneProtocol) -> Reply:
            return ready

        routes = dict.fromkeys(routes, answer)
    data = requests(beacons)
    undo_full_collections = gcpause.full_collections_every()  # as a server process does
    transport = _Transport()
    conn = LaneProtocol(routes, asyncio.Protocol, _Gate(10), 8190, 100)
    conn.connection_made(transport)  # type: ignore[arg-type]
    feed = conn.data_received
    for chunk in data:  # warm-up: the memos fill
        feed(chunk)
    records.clear()
    transport.answers = 0
    started = time.process_time()
    for chunk in data:
        feed(chunk)
    cpu = time.process_time() - started
    undo_full_collections()
    return {
        "beacons": beacons,
        "answers": transport.answers,
        "records": len(records),
        "cpu_us_per_beacon": cpu / beacons * 1e6,
        "noop": noop,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--beacons", type=int, default=50_000)
    parser.add_argument("--noop", action="store_true")
    args = parser.parse_args()
    result = uvloop.run(run(args.beacons, args.noop))
    print("BENCH " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
