"""Many server-sent-event subscribers in one process: ``python -m bench.sse_clients URL N
SECONDS``. Opens N connections to URL (a stream), prints ``READY {...}`` when all are open (or
could not be), counts the events each receives for SECONDS, then keeps listening until a line
comes on standard input (the harness sends it once the numbers have settled) and prints
``BENCH {...}``: per subscriber the events received in the window, and how many ended on each
final payload (its JSON without ``as_of``)."""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import resource
import sys
import time
from typing import Any, cast
from urllib.parse import urlsplit

import uvloop


class Subscriber(asyncio.Protocol):
    def __init__(self, request: bytes, connected: asyncio.Future[bool]) -> None:
        self.request = request
        self.connected = connected
        self.buffer = b""
        self.events = 0
        self.window_events = 0
        self.counting = False
        self.last: bytes | None = None
        self.closed = False
        self.headers_done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.WriteTransport, transport).write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.headers_done:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            self.headers_done = True
            ok = head.startswith(b"HTTP/1.1 200")
            if not self.connected.done():
                self.connected.set_result(ok)
            self.buffer = rest
        *events, self.buffer = self.buffer.split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    self.events += 1
                    if self.counting:
                        self.window_events += 1
                    self.last = line[6:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.connected.done():
            self.connected.set_result(False)


def final_key(payload: bytes | None) -> str:
    if payload is None:
        return "none"
    try:
        value = json.loads(payload)
    except ValueError:
        return "invalid"
    if isinstance(value, dict):
        value.pop("as_of", None)
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


async def run(url: str, n: int, seconds: float, concurrency: int) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (
        f"GET {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    subscribers: list[Subscriber] = []

    async def open_one() -> bool:
        async with gate:
            connected: asyncio.Future[bool] = loop.create_future()
            try:
                _, proto = await asyncio.wait_for(
                    loop.create_connection(lambda: Subscriber(request, connected), host, port), 30
                )
            except (OSError, TimeoutError):
                return False
            subscribers.append(proto)
            try:
                return await asyncio.wait_for(connected, 30)
            except TimeoutError:
                return False

    started = time.monotonic()
    results = await asyncio.gather(*(open_one() for _ in range(n)))
    open_seconds = time.monotonic() - started
    opened = sum(results)
    print("READY " + json.dumps({"opened": opened, "seconds": open_seconds}), flush=True)
    for s in subscribers:
        s.counting = True
    await asyncio.sleep(seconds)
    for s in subscribers:
        s.counting = False
    await loop.run_in_executor(None, sys.stdin.readline)
    alive = [s for s in subscribers if not s.closed]
    counts = sorted(s.window_events for s in alive) or [0]
    finals = collections.Counter(final_key(s.last) for s in alive)
    return {
        "wanted": n,
        "opened": opened,
        "alive": len(alive),
        "open_seconds": open_seconds,
        "window_seconds": seconds,
        "events_min": counts[0],
        "events_median": counts[len(counts) // 2],
        "events_max": counts[-1],
        "events_total": sum(counts),
        "finals": dict(finals),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("n", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("--concurrency", type=int, default=256)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.n + 64 > hard:
        sys.exit(f"sse_clients: {args.n} subscribers need more than the {hard} open files allowed")
    result = uvloop.run(run(args.url, args.n, args.seconds, args.concurrency))
    print("BENCH " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
