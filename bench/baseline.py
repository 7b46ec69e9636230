"""The baseline: a trivial aiohttp + uvloop endpoint that answers 202 to everything and does
nothing else, served exactly like visitorstats (access log off, ``workers`` processes sharing
the port with ``SO_REUSEPORT``). ``python -m bench.baseline --port P --workers N``.

For the stream figure it also has ``GET /stream``: a trivial server-sent-event fan-out that
sends every subscriber one fixed small message per tick (once a second)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator

import uvloop
from aiohttp import web

from services.http import fork_workers


async def accepted(request: web.Request) -> web.Response:
    return web.Response(status=202)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(status=200)


class Tick:
    def __init__(self) -> None:
        self.number = 0
        self.changed = asyncio.Event()

    def next(self) -> None:
        event, self.changed = self.changed, asyncio.Event()
        self.number += 1
        event.set()


TICK = web.AppKey("tick", Tick)


async def stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    tick = request.app[TICK]
    while True:
        changed = tick.changed
        await response.write(b'data: {"tick": %d}\n\n' % tick.number)
        await changed.wait()


async def ticker(app: web.Application) -> AsyncIterator[None]:
    async def run() -> None:
        while True:
            await asyncio.sleep(1.0)
            app[TICK].next()

    app[TICK] = Tick()
    task = asyncio.create_task(run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def make_app() -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(ticker)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/stream", stream)
    app.router.add_route("*", "/{tail:.*}", accepted)
    return app


def serve(host: str, port: int, reuse_port: bool) -> None:
    web.run_app(
        make_app(),
        host=host,
        port=port,
        access_log=None,
        reuse_port=reuse_port or None,
        loop=uvloop.new_event_loop(),
        print=None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if args.workers <= 1:
        serve(args.host, args.port, False)
        return
    # the same process management as the product's workers (not part of what is measured)
    fork_workers(lambda: serve(args.host, args.port, True), args.workers)


if __name__ == "__main__":
    main()
