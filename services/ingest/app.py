"""The ingest HTTP service: ``POST /collect``, ``GET /collect.gif``, ``GET /beacon.js``.

Only this module touches HTTP; the request becomes a ``Beacon`` (beacon.py) and a
``ClientContext``, and the ``Pipeline`` decides. Every refusal is a JSON
``{"error": ..., "field": ...}`` with a 4xx status from the OpenAPI document (or 503):
``415`` another content type or a compressed body, ``413`` a body over 8 KiB, ``408`` a body
not received within ``read_timeout_seconds``, ``400`` anything malformed or invalid.

The two beacon endpoints are the hot path: they are registered with the router (OpenAPI, HEAD
and other methods, ``Expect``) and also as fast routes (``services.http.FAST_ROUTES``) that the
server calls directly, without routing or middleware; their answers are built from constant
headers, their metric children are bound once.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from importlib import resources
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict

from services import http, metrics
from services.ingest.beacon import MAX_KEYS, BeaconError, parse_beacon
from services.ingest.pipeline import (
    ClientContext,
    Outcome,
    Pipeline,
    client_address,
    is_trusted,
    origin_of,
)
from services.settings import Settings

PIPELINE = web.AppKey("pipeline", Pipeline)
SETTINGS = web.AppKey("settings", Settings)

MAX_BODY = 8 * 1024
_GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
_ACCEPTED_BODY = b'{"status":"accepted"}'
_CORS = {"Access-Control-Allow-Origin": "*"}
# The 202 answers' headers, built once (a Response copies them: the constants stay as they are).
_ACCEPTED_HEADERS: CIMultiDict[str] = CIMultiDict(
    {"Access-Control-Allow-Origin": "*", "Content-Type": "application/json"}
)
_GIF_HEADERS: CIMultiDict[str] = CIMultiDict(
    {"Cache-Control": "no-store", "Access-Control-Allow-Origin": "*", "Content-Type": "image/gif"}
)
_JSON_TYPES = ("text/plain", "application/json")
_JSON_CONTENT_TYPES = frozenset(
    (
        "text/plain",
        "text/plain;charset=UTF-8",  # navigator.sendBeacon with a string
        "text/plain; charset=utf-8",
        "application/json",
        "application/json; charset=utf-8",
    )
)
_BEACON_JS = resources.files("services.ingest").joinpath("static/beacon.js").read_bytes()
_BEACON_JS_ETAG = '"' + hashlib.sha256(_BEACON_JS).hexdigest()[:20] + '"'
# The beacon fields (beacon.py): a pixel may not give one of them twice; others are ignored.
_FIELDS = frozenset(
    ("site", "type", "url", "referrer", "member", "event_id", "visitor", "title", "member_token")
)
_ADDRESS_CACHE_SIZE = 65536

_OUTCOME_LABELS = {
    400: "invalid",
    403: "forbidden",
    408: "timeout",
    413: "too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    503: "unavailable",
}
_ACCEPTED_METRIC = {
    endpoint: metrics.INGEST_REQUESTS.labels(endpoint, "accepted")
    for endpoint in ("collect", "pixel")
}


def error_response(
    status: int, message: str, field: str | None, retry_after: float | None = None
) -> web.Response:
    headers = dict(_CORS)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after + 0.5)))
    return web.Response(
        status=status,
        body=orjson.dumps({"error": message, "field": field}),
        content_type="application/json",
        headers=headers,
    )


def _text(value: str) -> str:
    """A header as text: aiohttp keeps bytes that are not UTF-8 as lone surrogates."""
    if value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class _Refused(Exception):
    def __init__(self, status: int, message: str, field: str | None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def _outcome_label(status: int) -> str:
    return _OUTCOME_LABELS.get(status, "error")


def _refused(endpoint: str, r: _Refused) -> web.Response:
    label = _outcome_label(r.status)
    metrics.BEACONS_DROPPED.labels(label).inc()
    metrics.INGEST_REQUESTS.labels(endpoint, label).inc()
    return error_response(r.status, r.message, r.field)


async def _read_body(request: web.Request, timeout: float) -> bytes:
    """At most 8 KiB, within ``timeout`` seconds (a slow sender is cut off with 408)."""
    length = request.content_length
    if length is not None and length > MAX_BODY:
        raise _Refused(413, "the body is larger than 8 KiB", "body")
    encoding = request.headers.get("Content-Encoding")
    if encoding and encoding.strip().lower() != "identity":
        # Browsers never compress a request body; decompressing one is an amplifier.
        raise _Refused(415, "a compressed body is not accepted", "content-encoding")
    try:
        if request.content.is_eof():  # all of it arrived with the head: nothing to wait for
            body = await request.read()
        else:
            async with asyncio.timeout(timeout):
                body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _Refused(413, "the body is larger than 8 KiB", "body") from None
    except TimeoutError:
        raise _Refused(408, "the body was not received in time", "body") from None
    except RequestPayloadError:
        raise _Refused(400, "the body is malformed", "body") from None
    if len(body) > MAX_BODY:  # client_max_size may be configured above 8 KiB
        raise _Refused(413, "the body is larger than 8 KiB", "body")
    return body


class _Ingest:
    """The beacon endpoints of one app, with what they need bound once."""

    def __init__(self, pipeline: Pipeline, settings: Settings) -> None:
        self.accept = pipeline.accept
        self.trusted = settings.trusted_proxies
        self.read_timeout = settings.read_timeout_seconds
        # (peer, X-Forwarded-For) -> (the client address, whether its rate is limited)
        self._addresses: dict[tuple[str | None, str | None], tuple[str, bool]] = {}

    def context(self, request: web.Request) -> ClientContext:
        headers = request.headers
        origin = headers.get("Origin")
        if not origin or origin == "null":
            origin = origin_of(headers.get("Referer"))
        forwarded = headers.getall("X-Forwarded-For", ())
        # a proxy may add its own header line instead of extending the client's
        fwd = (forwarded[0] if len(forwarded) == 1 else ",".join(forwarded)) if forwarded else None
        peer = request.remote
        key = (peer, fwd)
        known = self._addresses.get(key)
        if known is None:
            address = client_address(peer, fwd, self.trusted)
            # A trusted proxy that names no client is the load balancer (or this host) itself:
            # every reader behind it would share one budget, so it is not rate-limited.
            limited = fwd is not None or not is_trusted(peer, self.trusted)
            if len(self._addresses) >= _ADDRESS_CACHE_SIZE:
                self._addresses.clear()
            known = self._addresses[key] = (address, limited)
        address, limited = known
        return ClientContext(
            address=address,
            rate_limited=limited,
            user_agent=_text(headers.get("User-Agent", "")),
            origin=origin.rstrip("/").lower() if origin else None,
            dnt=headers.get("DNT") == "1",
            gpc=headers.get("Sec-GPC") == "1",
        )

    async def _run(self, request: web.Request, raw: dict[str, Any]) -> Outcome:
        try:
            beacon = parse_beacon(raw)
        except BeaconError as e:
            raise _Refused(400, e.message, e.field) from None
        return await self.accept(beacon, self.context(request))

    async def collect(self, request: web.Request) -> web.Response:
        try:
            # the usual headers as sent, known good without parsing them (aiohttp's parser)
            if (
                request.headers.get("Content-Type") not in _JSON_CONTENT_TYPES
                and request.content_type not in _JSON_TYPES
            ):
                raise _Refused(415, "send text/plain or application/json", "content-type")
            body = await _read_body(request, self.read_timeout)
            if not body.strip():
                raise _Refused(400, "the body is empty", "body")
            try:
                raw = orjson.loads(body)
            except orjson.JSONDecodeError as e:
                if "depth" in str(e) or "recursion" in str(e):
                    raise _Refused(400, "the body is nested too deeply", "body") from None
                raise _Refused(400, "the body is not valid JSON (UTF-8)", "body") from None
            if type(raw) is not dict:
                raise _Refused(400, "the body must be one JSON object", "body")
            outcome = await self._run(request, raw)
        except _Refused as r:
            return _refused("collect", r)
        return _answer("collect", outcome, _ACCEPTED_BODY, _ACCEPTED_HEADERS)

    async def collect_gif(self, request: web.Request) -> web.Response:
        try:
            query = request.rel_url.query
            if len(query) > MAX_KEYS:
                raise _Refused(400, f"a beacon has at most {MAX_KEYS} fields", "query")
            raw: dict[str, Any] = {}
            for name, value in query.items():
                if name in raw:
                    if name in _FIELDS:  # which of two values would count is not for us to guess
                        raise _Refused(400, f"{name} is given more than once", name)
                    continue
                raw[name] = value
            outcome = await self._run(request, raw)
        except _Refused as r:
            return _refused("pixel", r)
        return _answer("pixel", outcome, _GIF, _GIF_HEADERS)


def _answer(
    endpoint: str, outcome: Outcome, body: bytes, headers: CIMultiDict[str]
) -> web.Response:
    """The answer to a beacon the pipeline decided on: ``202`` with the endpoint's ready body,
    or the pipeline's refusal."""
    if outcome.status == 202:
        _ACCEPTED_METRIC[endpoint].inc()
        return web.Response(status=202, body=body, headers=headers)
    metrics.INGEST_REQUESTS.labels(endpoint, _outcome_label(outcome.status)).inc()
    return error_response(outcome.status, outcome.message, outcome.field, outcome.retry_after)


async def collect_preflight(request: web.Request) -> web.Response:
    return web.Response(
        status=204,
        headers={
            **_CORS,
            "Access-Control-Allow-Methods": "POST, GET, OPTIONS",
            "Access-Control-Allow-Headers": "Content-Type",
            "Access-Control-Max-Age": "86400",
        },
    )


async def beacon_js(request: web.Request) -> web.Response:
    if request.headers.get("If-None-Match") == _BEACON_JS_ETAG:
        return web.Response(status=304, headers={"ETag": _BEACON_JS_ETAG})
    return web.Response(
        body=_BEACON_JS,
        content_type="application/javascript",
        charset="utf-8",
        headers={
            "Cache-Control": "public, max-age=3600",
            "ETag": _BEACON_JS_ETAG,
            **_CORS,
        },
    )


def add_routes(app: web.Application, pipeline: Pipeline, settings: Settings) -> None:
    app[PIPELINE] = pipeline
    app[SETTINGS] = settings
    ingest = _Ingest(pipeline, settings)
    app.router.add_post("/collect", ingest.collect)
    app.router.add_route("OPTIONS", "/collect", collect_preflight)
    # no HEAD: a link checker's HEAD request is not a page view
    app.router.add_get("/collect.gif", ingest.collect_gif, allow_head=False)
    app.router.add_get("/beacon.js", beacon_js)
    http.add_fast_route(app, "POST", "/collect", ingest.collect)
    http.add_fast_route(app, "GET", "/collect.gif", ingest.collect_gif)
