"""What both services share over HTTP: ``/healthz``, ``/readyz``, ``/metrics``, and serving an
app with uvloop, no access log by default, and ``SO_REUSEPORT`` worker processes."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
from collections.abc import Awaitable, Callable

import orjson
import uvloop
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from services.settings import Settings

ReadyCheck = Callable[[], Awaitable[tuple[bool, str]]]
READY_CHECKS = web.AppKey("ready_checks", dict[str, ReadyCheck])

log = logging.getLogger(__name__)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    checks = request.app[READY_CHECKS]
    results = {}
    for name, check in checks.items():
        try:
            ok, detail = await asyncio.wait_for(check(), 5)
        except Exception as e:
            ok, detail = False, f"check failed: {e}"
        results[name] = {"ok": ok, "detail": detail}
    ready = all(r["ok"] for r in results.values())
    failing = [n for n, r in results.items() if not r["ok"]]
    return web.Response(
        status=200 if ready else 503,
        body=orjson.dumps({"ready": ready, "failing": failing, "checks": results}),
        content_type="application/json",
    )


async def metrics_endpoint(request: web.Request) -> web.Response:
    return web.Response(
        body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def add_routes(app: web.Application) -> None:
    app[READY_CHECKS] = {}
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)


def add_ready_check(app: web.Application, name: str, check: ReadyCheck) -> None:
    app[READY_CHECKS][name] = check


def new_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=settings.client_max_size)
    add_routes(app)
    return app


def serve(
    make_app: Callable[[], web.Application], settings: Settings, *, reuse_port: bool = False
) -> None:
    """Run one server process until SIGTERM/SIGINT; then stop taking requests, finish the ones
    in flight, and run every cleanup (flush, drain) before exiting."""
    logging.basicConfig(
        level=os.environ.get("VISITORSTATS_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )

    async def app_factory() -> web.Application:
        # inside the loop: aiokafka clients must be created with a running loop
        return make_app()

    web.run_app(
        app_factory(),
        host=settings.host,
        port=settings.port,
        access_log=logging.getLogger("aiohttp.access") if settings.access_log else None,
        reuse_port=reuse_port or None,
        handler_cancellation=True,
        shutdown_timeout=10,
        loop=uvloop.new_event_loop(),
        print=lambda *a: log.info("listening on http://%s:%s", settings.host, settings.port),
    )


def serve_workers(
    make_app: Callable[[], web.Application], settings: Settings, workers: int
) -> None:
    """``workers`` processes share the port with ``SO_REUSEPORT``; the kernel spreads
    connections. SIGTERM to the parent is passed on to every worker, which drains."""
    if workers <= 1:
        serve(make_app, settings)
        return
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=serve, args=(make_app, settings), kwargs={"reuse_port": True})
        for _ in range(workers)
    ]
    for p in procs:
        p.start()

    def forward(signum: int, frame: object) -> None:
        for p in procs:
            if p.pid:
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for p in procs:
        p.join()
