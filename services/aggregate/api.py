"""The counter HTTP API and the widget: ``/v1/sites/{site}/counter`` (+ ``/stream``,
``.svg``), ``/widget.js``, ``/widget/{site}``. Every answer is prepared bytes from the
``CounterService``; a site id is checked against the registry before anything else."""

from __future__ import annotations

import asyncio
from importlib import resources

import orjson
from aiohttp import web

from services import http, metrics
from services.aggregate import render
from services.aggregate.counter import KEEPALIVE, SINK_BACKLOG_BYTES, CounterService, Prepared
from services.fastlane import LaneProtocol, RawRequest, Reply, chunk, reply_head
from services.static import Script, etag_matches

COUNTER = web.AppKey("counter", CounterService)

KEEPALIVE_SECONDS = 15.0
_RETRY = b"retry: 3000\n\n"  # reconnect after 3 s when the connection drops
_STREAM_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
_CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "ETag",
}
_CACHE = "public, max-age=1"
# What the block's own page (for an iframe) and its image may do: the page runs widget.js and
# reads the counter from here, styles inline; the image nothing but its inline style. Any
# portal may frame the page.
_PAGE_POLICY = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
}
_SVG_POLICY = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"}
STREAM_WRITE_TIMEOUT_SECONDS = 30.0
_WIDGET_JS = Script(resources.files("services.aggregate").joinpath("static/widget.js").read_bytes())


def _json_error(status: int, message: str, field: str | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"error": message, "field": field}),
        content_type="application/json",
        headers=_CORS,
    )


def _prepared(request: web.Request) -> Prepared | web.Response:
    site = request.match_info["site"]
    service = request.app[COUNTER]
    if service.registry.get(site) is None:
        return _json_error(404, "unknown site", "site")
    prepared = service.prepared.get(site)
    if prepared is None:
        return _json_error(503, "the counter is not available yet")
    return prepared


class _CounterLane:
    """``GET /v1/sites/{site}/counter`` in the server's fast lane (``services/fastlane.py``):
    the prepared bytes with a head built once per refresh; the same answers as ``counter``."""

    _HEADERS = (
        ("Content-Type", "application/json"),
        ("Cache-Control", _CACHE),
        *_CORS.items(),
    )

    def __init__(self, service: CounterService, site: str) -> None:
        self.service, self.site = service, site
        self._for: Prepared | None = None
        self._ok = self._not_modified = b""

    def __call__(self, req: RawRequest, conn: LaneProtocol) -> Reply:
        prepared = self.service.prepared.get(self.site)
        if prepared is None:
            return Reply(_UNAVAILABLE_HEAD, _UNAVAILABLE)
        if prepared is not self._for:
            etag = (("ETag", prepared.etag),)
            self._ok = reply_head(200, etag + self._HEADERS)
            self._not_modified = reply_head(304, etag + self._HEADERS[1:])
            self._for = prepared
        if etag_matches(prepared.etag, req.headers.get("if-none-match")):
            return Reply(self._not_modified, b"")
        return Reply(self._ok, prepared.body)


_UNAVAILABLE = orjson.dumps({"error": "the counter is not available yet", "field": None})
_UNAVAILABLE_HEAD = reply_head(503, (("Content-Type", "application/json"), *_CORS.items()))


class _StreamLane:
    """``GET /v1/sites/{site}/counter/stream`` in the fast lane: the connection becomes a sink
    of the site's ``Fanout`` (written to directly, with the very same bytes for every
    subscriber); the same stream as ``counter_stream``."""

    _HEAD = reply_head(200, (*_STREAM_HEADERS.items(), *_CORS.items()))
    _RETRY_CHUNK = chunk(_RETRY)

    def __init__(self, service: CounterService, site: str) -> None:
        self.service, self.site = service, site

    def __call__(self, req: RawRequest, conn: LaneProtocol) -> Reply | None:
        if self.site not in self.service.prepared or self.service.fanout.closed:
            return Reply(_UNAVAILABLE_HEAD, _UNAVAILABLE)
        fanout, site = self.service.fanout, self.site

        def lost() -> None:
            fanout.detach(site, sub)
            metrics.STREAM_SUBSCRIBERS.dec()

        conn.begin_stream(self._HEAD, lost)
        metrics.STREAM_SUBSCRIBERS.inc()
        conn.send(self._RETRY_CHUNK, SINK_BACKLOG_BYTES)
        sub = fanout.attach(site, conn)
        return None


def _lang(request: web.Request) -> str:
    return render.normalize_lang(request.rel_url.query.get("lang"))


def _visits(request: web.Request) -> tuple[str, ...]:
    return render.normalize_visits(request.rel_url.query.get("visits"))


async def counter(request: web.Request) -> web.Response:
    prepared = _prepared(request)
    if isinstance(prepared, web.Response):
        return prepared
    headers = {"ETag": prepared.etag, "Cache-Control": _CACHE, **_CORS}
    if etag_matches(prepared.etag, request.headers.get("If-None-Match")):
        return web.Response(status=304, headers=headers)
    return web.Response(body=prepared.body, content_type="application/json", headers=headers)


async def counter_preflight(request: web.Request) -> web.Response:
    return web.Response(
        status=204,
        headers={
            **_CORS,
            "Access-Control-Allow-Methods": "GET, OPTIONS",
            "Access-Control-Allow-Headers": "If-None-Match, Cache-Control, Last-Event-ID",
            "Access-Control-Max-Age": "86400",
        },
    )


async def counter_stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the counter at once, then each change (at most once a second),
    ``: keep-alive`` comments in between. Every subscriber of a site writes the same prepared
    bytes; a client that goes away is dropped at once (the server cancels its handler)."""
    prepared = _prepared(request)
    if isinstance(prepared, web.Response):
        return prepared
    if request.method == "HEAD":  # the headers a GET would have, and no stream
        return web.Response(headers={**_STREAM_HEADERS, **_CORS})
    site = request.match_info["site"]
    fanout = request.app[COUNTER].fanout
    response = web.StreamResponse(headers={**_STREAM_HEADERS, **_CORS})
    try:
        await response.prepare(request)
    except ConnectionError:
        return response  # gone already (an outside audit: a traceback logged at ERROR)
    http.never_ending(request)  # the client's close (its EOF) ends it at once
    metrics.STREAM_SUBSCRIBERS.inc()
    try:
        await response.write(_RETRY)
        async for latest in fanout.subscribe(site, min_interval=1.0, keepalive=fanout.keepalive):
            # A subscriber that stops reading would hold its connection forever: a write that
            # cannot drain within the limit ends the stream (the widget reconnects or polls).
            # (asyncio.timeout, not wait_for: on Python 3.11 wait_for loses the cancel of a
            # client gone when the write ends in the same turn, and the stream outlived its
            # client until the next keep-alive failed, 16 s: an outside audit)
            async with asyncio.timeout(STREAM_WRITE_TIMEOUT_SECONDS):
                await response.write(KEEPALIVE if latest is None else latest.event)
    except (ConnectionError, TimeoutError):
        pass  # the client went away, or stopped reading
    finally:
        metrics.STREAM_SUBSCRIBERS.dec()
    return response


async def counter_svg(request: web.Request) -> web.Response:
    site = request.match_info["site"]
    service = request.app[COUNTER]
    lang = _lang(request)
    if service.registry.get(site) is None:
        return web.Response(
            status=404,
            text=render.render_unknown_svg(site, lang),
            content_type="image/svg+xml",
            headers={**_CORS, **_SVG_POLICY},
        )
    prepared = _prepared(request)
    if isinstance(prepared, web.Response):
        return prepared
    # of the numbers, the language and the rows (weak: the image's ``desc`` carries ``as_of``)
    visits = _visits(request)
    rows = "" if visits == render.DEFAULT_VISITS else "-" + ".".join(visits)
    etag = f'W/"{prepared.etag.removeprefix("W/").strip(chr(34))}-{lang}{rows}"'
    headers = {"ETag": etag, "Cache-Control": "public, max-age=10", **_CORS, **_SVG_POLICY}
    if etag_matches(etag, request.headers.get("If-None-Match")):
        return web.Response(status=304, headers=headers)
    return web.Response(
        text=render.render_svg(prepared.payload, lang, visits),
        content_type="image/svg+xml",
        headers=headers,
    )


async def widget_page(request: web.Request) -> web.Response:
    site = request.match_info["site"]
    known = request.app[COUNTER].registry.get(site)
    if known is None:
        return web.Response(
            status=404,
            text=render.render_unknown_page(site, _lang(request)),
            content_type="text/html",
            headers={**_CORS, **_PAGE_POLICY},
        )
    return web.Response(
        text=render.render_widget_page(site, _lang(request), known.name, _visits(request)),
        content_type="text/html",
        headers={"Cache-Control": "public, max-age=300", **_PAGE_POLICY},
    )


def add_routes(
    app: web.Application, service: CounterService, keepalive_seconds: float = KEEPALIVE_SECONDS
) -> None:
    app[COUNTER] = service
    service.fanout.keepalive = keepalive_seconds

    async def end_streams(app: web.Application) -> None:
        # Open streams would hold the shutdown for its whole timeout: end them first (the
        # browsers reconnect, to another replica or to this one once it is back).
        service.fanout.close()

    app.on_shutdown.append(end_streams)
    app.router.add_get("/v1/sites/{site}/counter", counter)
    for site in service.registry:
        http.add_lane_route(
            app, "GET", f"/v1/sites/{site.id}/counter", _CounterLane(service, site.id)
        )
        http.add_lane_route(
            app, "GET", f"/v1/sites/{site.id}/counter/stream", _StreamLane(service, site.id)
        )
    app.router.add_route("OPTIONS", "/v1/sites/{site}/counter", counter_preflight)
    app.router.add_get("/v1/sites/{site}/counter/stream", counter_stream)
    app.router.add_route("OPTIONS", "/v1/sites/{site}/counter/stream", counter_preflight)
    app.router.add_get("/v1/sites/{site}/counter.svg", counter_svg)
    app.router.add_get("/widget.js", _WIDGET_JS.handle)
    app.router.add_get("/widget/{site}", widget_page)
