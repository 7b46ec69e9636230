"""What both services share over HTTP: ``/healthz``, ``/readyz``, ``/metrics``,
``/openapi.json``, JSON errors, and serving an app with uvloop, no access log by default, and
``SO_REUSEPORT`` worker processes.

Limits against slow and oversized clients, per process (``Settings``; defaults in brackets):

* request line and each header at most ``max_header_bytes`` [8190], at most ``max_headers``
  header lines [100]: beyond them ``400`` (JSON) and the connection is closed;
* a connection that has not sent a complete request head within ``read_timeout_seconds`` [10]
  of opening (or of its previous response) is closed: slowloris gets nowhere. The same
  timeout closes idle keep-alive connections, bounds the reading of a body (``408``), and
  drops a connection whose client has not read its answers for as long (``_Gate.sweep``);
* at most ``max_connections`` [10000] open connections (and the open-file limit is raised to
  make room for them). At the limit a new connection replaces the oldest idle one (between
  requests, or still sending its request head); when every one is busy, it is answered ``503``
  at once and closed, before anything is read from it;
* request bodies are never decompressed (``Content-Encoding``, and a transfer coding other
  than ``chunked``, are refused by ``/collect``);
* no log line names a client: the access log (off by default) writes method, path, status,
  size and time, and malformed requests are logged without the peer's address.

An app with lane routes (``add_lane_route``: the ingest beacons) is served through the fast
lane (``services/fastlane.py``), which answers the usual requests of those routes itself and
hands every other connection, from its first unusual request on, to the handler above; lane
connections count against the same cap and are closed after ``read_timeout_seconds`` idle.
The lane writes no access log: with ``access_log`` on, aiohttp serves every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import faulthandler
import functools
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, cast

import orjson
import uvloop
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import LineTooLong
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from services import gcpause, metrics, openapi
from services.fastlane import TOO_MANY, LaneHandler, LaneProtocol
from services.settings import QUIET_LOGGERS, CannotStart, Settings, log_level

ReadyCheck = Callable[[], Awaitable[tuple[bool, str]]]
READY_CHECKS = web.AppKey("ready_checks", dict[str, ReadyCheck])
# (method, path) -> handler of the fast lane (see ``add_lane_route``)
LANE_ROUTES = web.AppKey("lane_routes", dict[tuple[bytes, bytes], LaneHandler])
OPENAPI = web.AppKey("openapi", dict[str, bytes])
HIDDEN_METRICS = web.AppKey("hidden_metrics", frozenset[str])

log = logging.getLogger(__name__)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


# The longest one readiness check may take (a ClickHouse server that does not answer): past
# it, /readyz answers 503 saying which; a probe's own timeout must be longer
# (deploy/kubernetes: 6 s), or a slow check is only a probe timing out.
READY_CHECK_SECONDS = 5


async def readyz(request: web.Request) -> web.Response:
    checks = request.app[READY_CHECKS]
    results = {}
    for name, check in checks.items():
        try:
            ok, detail = await asyncio.wait_for(check(), READY_CHECK_SECONDS)
        except TimeoutError:
            ok, detail = False, f"no answer within {READY_CHECK_SECONDS} s"
        except Exception as e:
            ok, detail = False, f"check failed: {e or type(e).__name__}"
        results[name] = {"ok": ok, "detail": detail}
    ready = all(r["ok"] for r in results.values())
    failing = [n for n, r in results.items() if not r["ok"]]
    return web.Response(
        status=200 if ready else 503,
        body=orjson.dumps({"ready": ready, "failing": failing, "checks": results}),
        content_type="application/json",
    )


def _metrics_registry() -> CollectorRegistry:
    """The process's own registry; with several worker processes (``PROMETHEUS_MULTIPROC_DIR``
    set by ``visitorstats`` before ``services.metrics`` was imported), the sum of all of them."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, directory)  # type: ignore[no-untyped-call]
    registry.register(WorkersProcessCollector(directory))
    registry.register(metrics.DISK_ROOM)
    return registry


_PROCESS_FIRST = {"process_start_time_seconds", "process_max_fds"}  # the least over workers


class WorkersProcessCollector(Collector):
    """``process_*`` (CPU seconds, memory, open files) of every live worker process, added up
    (the start time and the open-file limit: the least of them). In multiprocess mode
    prometheus_client has no process metrics at all, and a scrape reaches one worker of the
    port's ``SO_REUSEPORT`` group, not a chosen one. The workers are the processes that write
    into the multiprocess directory (``*_<pid>.db``), those still running."""

    def __init__(self, directory: str) -> None:
        self._directory = directory

    def pids(self) -> list[int]:
        found = set()
        for name in os.listdir(self._directory):
            stem, _, pid = name.removesuffix(".db").rpartition("_")
            if stem and pid.isdigit():
                found.add(int(pid))
        return sorted(p for p in found if os.path.exists(f"/proc/{p}"))

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for pid in self.pids():
            for family in ProcessCollector(
                pid=functools.partial(int, pid), registry=None
            ).collect():
                known = families.get(family.name)
                if known is None:
                    families[family.name] = family
                    continue
                value = family.samples[0].value
                sample = known.samples[0]
                if family.name in _PROCESS_FIRST:
                    value = min(value, sample.value)
                else:
                    value += sample.value
                known.samples[0] = sample._replace(value=value)
        return list(families.values())


class _Without(Collector):
    """``registry``'s families but the ``hidden`` ones (another service's)."""

    def __init__(self, registry: CollectorRegistry, hidden: frozenset[str]) -> None:
        self._registry, self._hidden = registry, hidden

    def collect(self) -> Iterable[Metric]:
        return (f for f in self._registry.collect() if f.name not in self._hidden)


def hide_metrics(app: web.Application, names: frozenset[str]) -> None:
    """``/metrics`` of ``app`` leaves out these families (``metrics.families``)."""
    app[HIDDEN_METRICS] = names


async def metrics_endpoint(request: web.Request) -> web.Response:
    hidden = request.app.get(HIDDEN_METRICS)
    registry = _metrics_registry()
    response = web.Response(
        body=generate_latest(_Without(registry, hidden) if hidden else registry),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )
    response.enable_compression()  # gzip when asked (Prometheus asks), else as it is
    return response


async def openapi_endpoint(request: web.Request) -> web.Response:
    """The OpenAPI document of the operations this app serves (built once, on first use)."""
    cache = request.app[OPENAPI]
    body = cache.get("body")
    if body is None:
        body = cache["body"] = orjson.dumps(openapi.document_for(request.app.router))
    return web.Response(
        body=body, content_type="application/json", headers={"Access-Control-Allow-Origin": "*"}
    )


def _json_error(
    status: int, message: str, headers: Any = None, field: str | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"error": message, "field": field}),
        content_type="application/json",
        headers=headers,
    )


_SERVED_VERSIONS = (HttpVersion10, HttpVersion11)


def _json_expectations(
    handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    """``handler`` (the app's, for the server), whose ``417`` for an ``Expect`` other than
    ``100-continue`` is JSON and readable by any page, like every other refusal: aiohttp asks a
    route's expect handler before any middleware runs, and its own answers in text. A request
    of an HTTP version other than 1.0 and 1.1 (``HTTP/2.0``, ``HTTP/0.9``: aiohttp's parser
    takes any digits) is answered ``505`` in HTTP/1.1, and the connection closed: aiohttp would
    serve it, its status line echoing the version (an outside audit)."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request._version not in _SERVED_VERSIONS:
            # the answer's status line is written in the request's version (``version``, read
            # once and kept: not read before this): 1.1 it is
            request._version = HttpVersion11
            refused = _json_error(
                505,
                "only HTTP/1.0 and HTTP/1.1 are served",
                {"Access-Control-Allow-Origin": "*", "X-Content-Type-Options": "nosniff"},
            )
            refused.headers["Server"] = SERVER  # (no app's signals run for it)
            refused.force_close()
            return refused
        try:
            return await handler(request)
        except web.HTTPExpectationFailed:
            return _json_error(
                417, "only 100-continue is expected", {"Access-Control-Allow-Origin": "*"}, "expect"
            )

    return handle


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own refusals (no such route, method not allowed) as JSON, like ours, and
    readable by a script on any page (a portal's page that asks for a wrong path sees the 404,
    not a CORS error)."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {"Access-Control-Allow-Origin": "*"}
        if "Allow" in e.headers:
            headers["Allow"] = e.headers["Allow"]
        return _json_error(e.status, e.reason.lower(), headers)


def never_ending(request: web.BaseRequest) -> None:
    """Say that the answer to ``request`` never ends (server-sent events): the client's EOF
    then ends it and closes the connection, rather than waiting for it to be answered (a FIN
    cannot tell a half-close from a client gone, and no write would tell before the next
    keep-alive)."""
    handler = request.protocol
    if isinstance(handler, _Handler):
        handler.never_ending()


def add_routes(app: web.Application) -> None:
    app[READY_CHECKS] = {}
    app[OPENAPI] = {}
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/openapi.json", openapi_endpoint)


def add_lane_route(app: web.Application, method: str, path: str, handler: LaneHandler) -> None:
    """Let the server's fast lane (``services/fastlane.py``) answer ``method path`` when the
    request has the usual shape. The route must also be registered with the router: aiohttp
    serves the requests the lane hands over, and the OpenAPI document names it."""
    app.setdefault(LANE_ROUTES, {})[(method.encode(), path.encode())] = handler


def add_ready_check(app: web.Application, name: str, check: ReadyCheck) -> None:
    app[READY_CHECKS][name] = check


def new_app(settings: Settings) -> web.Application:
    metrics.DISK_ROOM.watch("data", settings.data_dir)
    app = web.Application(client_max_size=settings.client_max_size, middlewares=[json_errors])
    app.on_response_prepare.append(_common_headers)
    add_routes(app)
    return app


async def _common_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every answer of aiohttp (the lane's heads carry the same, ``fastlane.reply_head``):
    its type is the one it says (no sniffing), and the server names no versions."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers["Server"] = SERVER  # (aiohttp sets its own before this)


SERVER = "visitorstats"  # the Server header: no versions


class AccessLogger(AbstractAccessLogger):
    """Method, path (no query string), status, size, duration: nothing about the client."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %d %d %.6f",
            request.method,
            request.path,
            response.status,
            response.body_length,
            time,
        )


_Conn = Any  # a connection at the gate: ``_Handler`` or ``LaneProtocol`` (idle(), force_close())


class _Gate:
    """The open connections of one process, oldest first, at most ``limit``.

    At the limit, a new connection takes the place of the oldest idle one (waiting for a
    request: an idle keep-alive connection, or a slow one that has not finished its request
    head); only when all are busy is it answered ``503`` and closed. At most ``_SCAN`` are
    looked at per new connection, busy ones being moved to the back, so the cost stays small."""

    _SCAN = 64

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.conns: dict[_Conn, None] = {}

    def admit(self, handler: _Conn) -> bool:
        conns = self.conns
        if len(conns) >= self.limit and not self._evict_idle():
            metrics.CONNECTIONS_REFUSED.inc()
            return False
        conns[handler] = None
        metrics.CONNECTIONS_OPEN.set(len(conns))
        return True

    def release(self, handler: _Conn) -> None:
        if self.conns.pop(handler, _GONE) is not _GONE:
            metrics.CONNECTIONS_OPEN.set(len(self.conns))

    def close_lane(self) -> None:
        """Stopping: close the fast lane's connections, each once its answer is out."""
        for conn in [c for c in self.conns if isinstance(c, LaneProtocol)]:
            conn.close_when_idle()

    async def sweep(self, timeout: float) -> None:
        """Close the fast lane's connections idle for ``timeout`` seconds (aiohttp's keep their
        own time), and drop any whose client has not read its answers for as long (a
        pipelining client that never reads, a stream nobody reads: each held its place at the
        gate for good)."""
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            now = time.monotonic()
            for conn in list(self.conns):
                if conn.stalled_for(now) >= timeout:
                    conn.abort()
                elif isinstance(conn, LaneProtocol) and conn.idle_for(now) >= timeout:
                    conn.force_close()

    def _evict_idle(self) -> bool:
        conns = self.conns
        for _ in range(min(self._SCAN, len(conns))):
            oldest = next(iter(conns))
            del conns[oldest]
            if oldest.idle():
                metrics.CONNECTIONS_EVICTED.inc()
                oldest.force_close()
                return True
            if oldest.stalled():
                metrics.CONNECTIONS_EVICTED.inc()  # its client does not read what it is sent
                oldest.abort()
                return True
            conns[oldest] = None  # busy: to the back
        return False


_GONE = object()
# The headers of ``_common_headers``, and readable by a script on any page (as ``json_errors``)
_ERROR_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Server": SERVER,
    "Access-Control-Allow-Origin": "*",
}


class _Handler(web.RequestHandler):
    """aiohttp's connection handler with a cap on open connections, and errors for malformed
    requests that are JSON and logged without the client's address."""

    __slots__ = ("_answered", "_eof", "_gate", "_started", "_streaming", "_unread_at")

    def __init__(self, manager: web.Server, *, gate: _Gate, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._gate = gate
        self._started = False
        self._unread_at = 0.0
        self._eof = False  # the client is done sending (a half-close): it still reads
        self._answered = 0  # requests whose answer is written
        self._streaming = False  # the answer under way never ends (``never_ending``)

    def pause_writing(self) -> None:  # a client that does not read its answers
        super().pause_writing()
        self._unread_at = time.monotonic()

    def stalled(self) -> bool:
        return self.writing_paused

    def stalled_for(self, now: float) -> float:
        """How long the client has not read its answers (writing paused), 0 if it reads."""
        return now - self._unread_at if self.writing_paused else 0.0

    def abort(self) -> None:
        """Close without writing what is buffered (a close would wait for the client)."""
        if self.transport is not None:
            self.transport.abort()

    def idle(self) -> bool:
        """Waiting for (the rest of) a request head, nothing being handled."""
        waiter = self._waiter
        return waiter is not None and not waiter.done() and not self._messages

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._gate.admit(self):
            tcp = cast(asyncio.Transport, transport)
            tcp.write(TOO_MANY)
            tcp.close()
            return
        self._started = True
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._started:
            self._started = False
            self._gate.release(self)
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._started:
            super().data_received(data)

    def eof_received(self) -> bool:  # type: ignore[override]  # (asyncio's: keep it open)
        """The client is done sending, maybe still reading (a half-close, RFC 9112 9.6): the
        requests received are answered, in order, then the connection is closed. (aiohttp's own
        handler let the transport close at once, and the requests being answered were
        cancelled.)"""
        if not self._started or self._streaming:
            return False  # (a stream ends: see ``never_ending``)
        self._eof = True
        if self._answered >= self._request_count:
            self.force_close()  # nothing to answer (what is written still goes out first)
        return True

    def never_ending(self) -> None:
        """The answer under way is a stream (``never_ending``)."""
        self._streaming = True
        if self._eof:
            self.force_close()

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        done = await super().finish_response(request, resp, start_time)
        self._answered += 1
        if self._eof and self._answered >= self._request_count:
            self.close()  # the last request received is answered: the connection ends
        return done

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            self.logger.error("error handling %s %s", request.method, request.path, exc_info=exc)
            text = "internal error"
        else:
            # The exception's message quotes the offending bytes (a header, say): not logged.
            self.logger.debug("malformed request refused: %s", type(exc).__name__)
            metrics.MALFORMED_REQUESTS.inc()
            text = (
                "request line or header too long"
                if isinstance(exc, LineTooLong)
                else "too many headers"
                if "Too many headers" in (message or "")
                else "malformed HTTP request"
            )
        if request.writer.output_size > 0:
            raise ConnectionError("the response is under way: no error can be sent")
        # (no route's response hook runs for a request that could not be read: its headers here)
        resp = _json_error(status, text, _ERROR_HEADERS, "request")
        resp.force_close()
        return resp


class _Site(web.BaseSite):
    """A TCP site whose connections are served by ``_Handler``."""

    __slots__ = ("_factory", "_host", "_port", "_reuse_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        factory: Callable[[], asyncio.Protocol],
        reuse_port: bool,
    ) -> None:
        super().__init__(runner)
        self._host, self._port, self._factory, self._reuse_port = host, port, factory, reuse_port

    @property
    def name(self) -> str:
        return address(self._host, self._port)

    async def start(self) -> None:
        await super().start()
        self._server = await asyncio.get_running_loop().create_server(
            self._factory,
            self._host,
            self._port,
            reuse_address=True,
            reuse_port=self._reuse_port or None,
        )


def connection_limit(wanted: int, reserve: int = 512) -> int:
    """``wanted``, within what the process may open: the soft limit on open files is raised
    (up to the hard one) to make room for ``wanted`` connections and ``reserve`` other files
    (Kafka, ClickHouse, logs); if it cannot be, the cap is lowered to fit, and said so."""
    wanted = max(1, wanted)
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        infinite = resource.RLIM_INFINITY
        need = wanted + reserve
        if soft != infinite and soft < need:
            soft = need if hard == infinite else min(need, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        if soft != infinite and soft < need:
            fitted = max(1, soft - reserve)
            log.warning("open-file limit %d: at most %d connections, not %d", soft, fitted, wanted)
            return fitted
    except (ImportError, ValueError, OSError) as e:
        log.warning("cannot check the open-file limit (%s)", e)
    return wanted


def handler_args(settings: Settings) -> dict[str, Any]:
    """The connection handler's limits (see the module's docstring)."""
    return {
        "keepalive_timeout": settings.read_timeout_seconds,
        "max_line_size": settings.max_header_bytes,
        "max_field_size": settings.max_header_bytes,
        "max_headers": settings.max_headers,
        "lingering_time": min(2.0, settings.read_timeout_seconds),
        "auto_decompress": False,
        "access_log_class": AccessLogger,
        "access_log": logging.getLogger("aiohttp.access") if settings.access_log else None,
    }


async def start_server(
    app: web.Application, settings: Settings, *, reuse_port: bool = False, **runner_args: Any
) -> web.AppRunner:
    """Start serving ``app`` with the limits of ``settings``; ``await runner.cleanup()`` stops
    it: no new connections, the requests in flight finish, every cleanup context runs."""
    args = handler_args(settings)
    gate = _Gate(connection_limit(settings.max_connections))
    # the lane writes no access log: with one asked for, every request goes through aiohttp
    lane = None if settings.access_log else app.get(LANE_ROUTES)

    async def sweeping(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(gate.sweep(settings.read_timeout_seconds))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        gate.close_lane()

    app.cleanup_ctx.append(sweeping)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=10, **runner_args)
    await runner.setup()
    server = runner.server
    assert server is not None
    server.request_handler = _json_expectations(server.request_handler)
    loop = asyncio.get_running_loop()

    def handler() -> _Handler:
        return _Handler(server, loop=loop, gate=gate, **args)

    factory: Callable[[], asyncio.Protocol] = handler
    if lane:
        max_line, max_headers = settings.max_header_bytes, settings.max_headers

        def factory() -> asyncio.Protocol:
            return LaneProtocol(lane, handler, gate, max_line, max_headers)

    await _Site(runner, settings.host, settings.port, factory, reuse_port).start()
    return runner


def serve(
    make_app: Callable[[], web.Application], settings: Settings, *, reuse_port: bool = False
) -> None:
    """Run one server process until SIGTERM/SIGINT; then stop taking requests, finish the ones
    in flight, and run every cleanup (flush, drain) before exiting."""
    logging.basicConfig(
        level=log_level(os.environ),
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    # The clients' own words while a ClickHouse server is away (a retry, an "unexpected" driver
    # exception: 4 lines a second, 370,000 a day): ours say it, backed off, naming what fails.
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)

    where = address(settings.host, settings.port)

    async def main() -> None:
        # inside the loop: aiokafka clients must be created with a running loop
        app = make_app()
        try:
            runner = await start_server(app, settings, reuse_port=reuse_port, handle_signals=True)
        except OSError as e:  # the address: taken, not this machine's, not a name that resolves
            raise CannotListen(
                f"cannot listen on {where}: {e.strerror or e} "
                "(VISITORSTATS_HOST, VISITORSTATS_PORT)"
            ) from None
        # Everything made so far (modules, the app, the clients) lives as long as the process:
        # out of the collector's way, so that a full collection walks only what came later.
        gc.freeze()
        # What comes later is mostly the caches of a busy server (visitor keys, addresses,
        # memos), not garbage; walking them took 5-20 ms every few seconds under load, in the
        # middle of answering beacons. One full collection a minute instead (see gcpause).
        undo_full_collections = gcpause.full_collections_every()
        log.info("listening on %s", where)
        # SIGHUP (`systemctl reload`, a closed terminal) ended the process at once, saying
        # nothing: there is nothing to reload in place (sites.toml is read at start)
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _hangup)
        try:
            await asyncio.Event().wait()  # until SIGTERM/SIGINT raise GracefulExit
        finally:
            undo_full_collections()
            await runner.cleanup()

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    task = loop.create_task(main())
    failed: CannotStart | None = None
    try:
        loop.run_until_complete(task)
    except (web.GracefulExit, KeyboardInterrupt):
        log.info("stopping: no new requests; writing what was taken")
        _stop_within(STOP_SECONDS)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)
    except CannotStart as e:  # said in one line, not a traceback
        failed = e
    finally:
        rest = asyncio.all_tasks(loop)
        for t in rest:
            t.cancel()
        loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    if failed is not None:
        raise SystemExit(f"visitorstats: {failed}")


def _hangup(*_: object) -> None:
    log.warning("SIGHUP ignored: sites.toml and the settings are read at start; restart to apply")


# A graceful stop writes the last batch (consume.STOP_WRITE_SECONDS, 30 s at most while
# ClickHouse refuses it) and drains the spool; one that takes longer than this is stuck
STOP_SECONDS = 75.0


def _stop_within(seconds: float) -> None:
    """Make sure the process ends: if the graceful stop has not ended it within ``seconds``,
    print every thread's stack (where it was stuck) and exit. What it had accepted is safe all
    the same: in the spool or the journal on disk, or in Kafka (read again from the last
    commit)."""

    def give_up() -> None:
        log.error("the graceful stop is stuck after %.0f s: exiting; where it was:", seconds)
        faulthandler.dump_traceback(all_threads=True)
        os._exit(70)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()


class CannotListen(CannotStart):
    """The server could not take its address; the message says which, and why."""


def address(host: str, port: int) -> str:
    """``http://host:port``, an IPv6 address in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve_workers(
    make_app: Callable[[], web.Application], settings: Settings, workers: int
) -> None:
    """``workers`` processes share the port with ``SO_REUSEPORT``; the kernel spreads
    connections. SIGTERM to the parent is passed on to every worker, which drains."""
    if workers <= 1:
        serve(make_app, settings)
        return
    fork_workers(lambda: serve(make_app, settings, reuse_port=True), workers)


# A worker that dies sooner than this after its start is not replaced (it would die again: a
# port taken, a broken configuration); one that dies later (killed, out of memory) is.
RESPAWN_AFTER_SECONDS = 5.0


def fork_workers(target: Callable[[], None], workers: int) -> None:
    """Run ``target`` in ``workers`` forked processes; SIGTERM and SIGINT to this process are
    passed on to each of them, and it returns once they have all exited. A worker that dies
    on its own is replaced, and the live values of its metrics (the spool's depth, say) are
    dropped from what ``/metrics`` adds up; its spool is shipped by the others."""
    ctx = multiprocessing.get_context("fork")

    parent = os.getpid()

    def worker() -> None:
        # not this process's handlers (a worker's signal is its own), until the worker's server
        # sets its own
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _stop_with_parent(parent)
        target()

    procs = [ctx.Process(target=worker) for _ in range(workers)]
    started = [time.monotonic()] * workers
    stopping = False

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.pid and p.exitcode is None:
                os.kill(p.pid, signal.SIGTERM)

    # before the first fork: a signal while the workers start stops the ones started, and no
    # more are started (the workers set their own handlers)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, _hangup)
    for i, p in enumerate(procs):
        if stopping:
            del procs[i:]
            break
        p.start()
    gone: set[int] = set()  # the workers seen dead
    while any(p.exitcode is None for p in procs):
        multiprocessing.connection.wait([p.sentinel for p in procs if p.exitcode is None], 1.0)
        for i, p in enumerate(procs):
            pid = p.pid
            if p.exitcode is None or pid is None or pid in gone:
                continue
            gone.add(pid)
            _mark_dead(pid)
            if stopping:
                continue
            if time.monotonic() - started[i] < RESPAWN_AFTER_SECONDS:
                log.error("worker %d exited (%s) right after its start", pid, p.exitcode)
                continue
            log.warning("worker %d died (exit code %s); starting another", pid, p.exitcode)
            procs[i] = ctx.Process(target=worker)
            started[i] = time.monotonic()
            procs[i].start()


def _stop_with_parent(parent: int) -> None:
    """A worker whose parent dies (SIGKILL, out of memory) gets SIGTERM and drains, instead of
    serving on, orphaned, beside the workers of the next start (Linux: ``PR_SET_PDEATHSIG``)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before that was asked
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def _mark_dead(pid: int) -> None:
    """Drop a dead worker's live gauges from the shared metrics (multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
