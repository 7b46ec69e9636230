"""The ingest HTTP service: ``POST /collect``, ``GET /collect.gif``, ``GET /beacon.js``.

Only this module touches HTTP; the request becomes a ``Beacon`` (beacon.py) and a
``ClientContext``, and the ``Pipeline`` decides. Every refusal is a JSON
``{"error": ..., "field": ...}`` with a 4xx status from the OpenAPI document (or 503):
``415`` another content type or a compressed body (a ``Content-Encoding``, or a transfer
coding other than ``chunked``), ``413`` a body over 8 KiB, ``408`` a body
not received within ``read_timeout_seconds``, ``400`` anything malformed or invalid.

The two beacon endpoints are the hot path. ``_Ingest.collect`` and ``_Ingest.pixel`` decide
for both ways a request can come in: the server's fast lane (``services/fastlane.py``: the
usual request shape, answered from ready bytes) and aiohttp's router (everything the lane hands
over: split heads, ``Expect``, chunked bodies, odd framing). The answers of the accepted
beacons are built once; what an accepted beacon counts for is counted by the publisher, per
batch, once the record is safe.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
from importlib import resources
from typing import Any, NamedTuple

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict

from services import http, metrics
from services.fastlane import LaneProtocol, RawRequest, Reply, header_dict, reply_head
from services.ingest.beacon import BeaconError, parse_beacon, query_fields
from services.ingest.pipeline import (
    ACCEPTED,
    ClientContext,
    Outcome,
    Pipeline,
    client_address,
    is_trusted,
    origin_of,
)
from services.ingest.publish import Unavailable
from services.ingest.publish_types import OutRecord
from services.memo import LONGEST_KEPT, forget_oldest
from services.settings import Settings
from services.sites import normalize_origin
from services.static import Script

PIPELINE = web.AppKey("pipeline", Pipeline)
SETTINGS = web.AppKey("settings", Settings)

MAX_BODY = 8 * 1024
_GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
_CORS_HEADER = ("Access-Control-Allow-Origin", "*")
# An Origin header as browsers send it (scheme://host[:port]), safe to answer with as it is.
_ORIGIN_SHAPE = re.compile(
    r"https?://[A-Za-z0-9.\-]{1,253}(?::[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?"
).fullmatch
_ORIGIN_CACHE_SIZE = 1024
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
_BEACON_JS = Script(resources.files("services.ingest").joinpath("static/beacon.js").read_bytes())
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
    417: "expectation_failed",
    429: "rate_limited",
    503: "unavailable",
}
_ACCEPTED_METRIC = {
    endpoint: metrics.INGEST_REQUESTS.labels(endpoint, "accepted")
    for endpoint in ("collect", "pixel")
}


class Answer(NamedTuple):
    """What a beacon request is answered, for either server path: aiohttp's (``response``) or
    the fast lane's (``reply``: the head as ready bytes)."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=self.body, headers=CIMultiDict(self.headers))

    def reply(self) -> Reply:
        return Reply(reply_head(self.status, self.headers), self.body)

    def for_origin(self, origin: str | None) -> Answer:
        """The answer to a request from ``origin``: ``Access-Control-Allow-Origin: *`` named as
        that origin, with credentials allowed (``cors_for``)."""
        cors = cors_for(origin)
        if len(cors) == 1:  # any origin: as it is
            return self
        return Answer(
            self.status,
            self.body,
            tuple(h for h in self.headers if h[0] != "Access-Control-Allow-Origin") + cors,
        )


def cors_for(origin: str | None) -> tuple[tuple[str, str], ...]:
    """The CORS headers of an answer to ``POST /collect`` (and its preflight) from ``origin``.

    ``navigator.sendBeacon`` sends credentials, always; with a body of another type than
    ``text/plain`` (a portal's own ``Blob`` of ``application/json``) the browser asks first
    (a preflight), and refuses to send the beacon when the answer allows any origin (``*``):
    a request with credentials needs its own origin named, and credentials allowed. This
    service keeps no cookie nor any other state of a browser, so allowing credentials gives a
    page nothing it could not have without them; which origins may count for a site is the
    site's ``origins``, checked on the beacon itself. Without an Origin (or ``null``, or one
    not shaped as an origin): any origin, ``*``."""
    if origin and _ORIGIN_SHAPE(origin):
        return (
            ("Access-Control-Allow-Origin", origin),
            ("Access-Control-Allow-Credentials", "true"),
            ("Vary", "Origin"),
        )
    return (_CORS_HEADER,)


def error_answer(
    status: int, message: str, field: str | None, retry_after: float | None = None
) -> Answer:
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"), _CORS_HEADER)
    if retry_after is not None:
        headers += (
            ("Retry-After", str(max(1, round(retry_after + 0.5)))),
            ("Access-Control-Expose-Headers", "Retry-After"),  # readable by the page
        )
    return Answer(status, orjson.dumps({"error": message, "field": field}), headers)


_ACCEPTED = {
    "collect": Answer(
        202, b'{"status":"accepted"}', (("Content-Type", "application/json"), _CORS_HEADER)
    ),
    "pixel": Answer(
        202, _GIF, (("Content-Type", "image/gif"), ("Cache-Control", "no-store"), _CORS_HEADER)
    ),
}
# the accepted answers as the lane writes them, built once
_ACCEPTED_REPLY = {endpoint: answer.reply() for endpoint, answer in _ACCEPTED.items()}
# Every series of the closed label sets exists from the start, at 0: an alert on the rate of
# refusals then sees the first ones (``increase`` needs a sample before them).
for _endpoint in ("collect", "pixel"):
    for _outcome in ("accepted", "error", *_OUTCOME_LABELS.values()):
        metrics.INGEST_REQUESTS.labels(_endpoint, _outcome)
for _status in (400, 408, 413, 415):  # the statuses of ``_Refused``
    metrics.BEACONS_DROPPED.labels(_OUTCOME_LABELS[_status])


def _text(value: str) -> str:
    """A header as text: header bytes that are not UTF-8 are kept as lone surrogates."""
    if value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class _Refused(Exception):
    def __init__(self, status: int, message: str, field: str | None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]").search


_BOM = b"\xef\xbb\xbf"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    """A JSON number as orjson reads it: one a double cannot hold is refused, not infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def _read_again(body: bytes) -> Any:
    """A body orjson refused, read again: without the UTF-8 byte order mark some server-side
    clients begin it with (RFC 8259 lets a reader ignore it), and when it holds a surrogate
    escape (``\\ud83d``). JavaScript's ``JSON.stringify`` writes half of a character as one,
    for a string cut in the middle of an emoji (a page title cut to its limit by another
    tracker, or by a portal's own script), and orjson refuses a lone one; the standard library
    reads it, and ``clean`` then drops it from the field. Anything else orjson refused stays
    refused."""
    if body.startswith(_BOM):
        body = body[len(_BOM) :]
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    if _SURROGATE_ESCAPE(body) is not None:
        try:
            return json.loads(
                body.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite
            )
        except (ValueError, RecursionError):
            pass
    raise _Refused(400, "the body is not valid JSON (UTF-8)", "body")


def _outcome_label(status: int) -> str:
    return _OUTCOME_LABELS.get(status, "error")


def _refused(endpoint: str, r: _Refused) -> Answer:
    label = _outcome_label(r.status)
    metrics.BEACONS_DROPPED.labels(label).inc()
    metrics.INGEST_REQUESTS.labels(endpoint, label).inc()
    return error_answer(r.status, r.message, r.field)


def _check_body_headers(length: int | None, headers: dict[str, str]) -> None:
    """Refuse a body by what its headers say (``RawRequest.headers``): too large, or coded."""
    if length is not None and length > MAX_BODY:
        raise _Refused(413, "the body is larger than 8 KiB", "body")
    encoding = headers.get("content-encoding")
    if encoding and encoding.strip().lower() != "identity":
        # Browsers never compress a request body; decompressing one is an amplifier.
        raise _Refused(415, "a compressed body is not accepted", "content-encoding")
    transfer = headers.get("transfer-encoding")
    if transfer is not None and transfer.strip().lower() != "chunked":
        # gzip, deflate, compress (before the chunks): a compressed body, never read as plain
        raise _Refused(415, "only the chunked transfer coding is accepted", "transfer-encoding")


async def _read_body(request: web.Request, headers: dict[str, str], timeout: float) -> bytes:
    """At most 8 KiB, within ``timeout`` seconds (a slow sender is cut off with 408)."""
    _check_body_headers(request.content_length, headers)
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
    return body


def _headers_of(request: web.Request) -> dict[str, str]:
    """The request's headers as the lane sees them (``RawRequest.headers``)."""
    return header_dict(request.headers.items())


class _Ingest:
    """The beacon endpoints of one app, with what they need bound once. ``collect`` and
    ``pixel`` decide for both server paths; the aiohttp handlers and the lane handlers only
    translate."""

    def __init__(self, pipeline: Pipeline, settings: Settings) -> None:
        self.pipeline = pipeline
        self.trusted = settings.trusted_proxies
        self.read_timeout = settings.read_timeout_seconds
        # (peer, X-Forwarded-For) -> (the client address, whether its rate is limited)
        self._addresses: dict[tuple[str | None, str | None], tuple[str, bool]] = {}
        # (endpoint, Origin) -> the accepted answer naming it (``cors_for``), built once
        self._accepted_for: dict[tuple[str, str], Reply] = {}

    def context(self, headers: dict[str, str], peer: str | None) -> ClientContext:
        origin = headers.get("origin")
        if not origin or origin == "null":
            origin = origin_of(headers.get("referer"))
        fwd = headers.get("x-forwarded-for")
        key = (peer, fwd)
        known = self._addresses.get(key)
        if known is None:
            address = client_address(peer, fwd, self.trusted)
            # A trusted proxy that names no client is the load balancer (or this host) itself:
            # every reader behind it would share one budget, so it is not rate-limited.
            limited = fwd is not None or not is_trusted(peer, self.trusted)
            known = (address, limited)
            if fwd is None or len(fwd) <= LONGEST_KEPT:
                if len(self._addresses) >= _ADDRESS_CACHE_SIZE:
                    forget_oldest(self._addresses)
                self._addresses[key] = known
        address, limited = known
        return ClientContext(  # (by position: half the cost of by keyword)
            address,
            _text(headers.get("user-agent", "")),  # user_agent
            normalize_origin(origin) if origin else None,
            headers.get("dnt") == "1",
            headers.get("sec-gpc") == "1",  # gpc
            limited,  # rate_limited
        )

    def _run(
        self, endpoint: str, raw: dict[str, Any], headers: dict[str, str], peer: str | None
    ) -> Answer | OutRecord:
        try:
            beacon = parse_beacon(raw)
        except BeaconError as e:
            raise _Refused(400, e.message, e.field) from None
        decided = self.pipeline.decide(beacon, self.context(headers, peer), endpoint)
        if isinstance(decided, Outcome):
            return _answer(endpoint, decided)
        return decided

    def collect(self, headers: dict[str, str], peer: str | None, body: bytes) -> Answer | OutRecord:
        """A refusal, or the record to publish."""
        try:
            # the usual headers as sent, known good without parsing them
            ctype = headers.get("content-type")
            if ctype not in _JSON_CONTENT_TYPES and _media_type(ctype) not in _JSON_TYPES:
                raise _Refused(415, "send text/plain or application/json", "content-type")
            if len(body) > MAX_BODY:  # client_max_size may be configured above 8 KiB
                raise _Refused(413, "the body is larger than 8 KiB", "body")
            _check_body_headers(None, headers)
            if not body.strip():
                raise _Refused(400, "the body is empty", "body")
            try:
                raw = orjson.loads(body)
            except orjson.JSONDecodeError as e:
                if "depth" in str(e) or "recursion" in str(e):
                    raise _Refused(400, "the body is nested too deeply", "body") from None
                raw = _read_again(body)
            if type(raw) is not dict:
                raise _Refused(400, "the body must be one JSON object", "body")
            return self._run("collect", raw, headers, peer)
        except _Refused as r:
            return _refused("collect", r)

    def pixel(self, headers: dict[str, str], peer: str | None, query: str) -> Answer | OutRecord:
        try:
            try:
                pairs = query_fields(query)
            except BeaconError as e:
                raise _Refused(400, e.message, e.field) from None
            raw: dict[str, Any] = {}
            for name, value in pairs:
                if name in raw:
                    if name in _FIELDS:  # which of two values would count is not for us to guess
                        raise _Refused(400, f"{name} is given more than once", name)
                    continue
                raw[name] = value
            return self._run("pixel", raw, headers, peer)
        except _Refused as r:
            return _refused("pixel", r)

    # -- aiohttp's path (requests the lane hands over) ------------------------------------------
    async def collect_request(self, request: web.Request) -> web.Response:
        try:
            headers = _headers_of(request)
            ctype = headers.get("content-type")
            if ctype not in _JSON_CONTENT_TYPES and _media_type(ctype) not in _JSON_TYPES:
                raise _Refused(415, "send text/plain or application/json", "content-type")
            body = await _read_body(request, headers, self.read_timeout)
        except _Refused as r:
            return _refused("collect", r).for_origin(request.headers.get("Origin")).response()
        decided = self.collect(headers, request.remote, body)
        return await self._publish("collect", decided, headers.get("origin"))

    async def pixel_request(self, request: web.Request) -> web.Response:
        query = request.rel_url.raw_query_string
        decided = self.pixel(_headers_of(request), request.remote, query)
        return await self._publish("pixel", decided, None)

    async def _publish(
        self, endpoint: str, decided: Answer | OutRecord, origin: str | None
    ) -> web.Response:
        if isinstance(decided, OutRecord):
            decided = _answer(endpoint, await self.pipeline.publish_and_settle(decided))
        return decided.for_origin(origin).response()

    # -- the lane's path ------------------------------------------------------------------------
    def collect_lane(self, req: RawRequest, conn: LaneProtocol) -> Reply | None:
        decided = self.collect(req.headers, req.peer, req.body)
        return self._lane("collect", decided, conn, req.headers.get("origin"))

    def pixel_lane(self, req: RawRequest, conn: LaneProtocol) -> Reply | None:
        return self._lane("pixel", self.pixel(req.headers, req.peer, req.query), conn, None)

    def _accepted(self, endpoint: str, origin: str | None) -> Reply:
        """The lane's accepted answer of ``endpoint`` to a request from ``origin``."""
        if origin is None:
            return _ACCEPTED_REPLY[endpoint]
        reply = self._accepted_for.get((endpoint, origin))
        if reply is None:
            answer = _ACCEPTED[endpoint]
            named = answer.for_origin(origin)
            reply = _ACCEPTED_REPLY[endpoint] if named is answer else named.reply()
            if len(self._accepted_for) >= _ORIGIN_CACHE_SIZE:
                forget_oldest(self._accepted_for)
            self._accepted_for[endpoint, origin] = reply
        return reply

    def _lane(
        self, endpoint: str, decided: Answer | OutRecord, conn: LaneProtocol, origin: str | None
    ) -> Reply | None:
        if isinstance(decided, Answer):
            return _lane_reply(decided, endpoint, origin)
        pipeline = self.pipeline
        accepted = self._accepted(endpoint, origin)

        def refused(exc: BaseException) -> Reply:
            return _lane_reply(_answer(endpoint, pipeline.settle(exc)), endpoint, origin)

        def done(exc: BaseException | None) -> None:
            # (an accepted record is counted by the publisher)
            conn.answer(accepted if exc is None else refused(exc))

        try:
            pipeline.publisher.submit(decided, done)
        except Unavailable as e:
            return refused(e)
        return None


def _media_type(ctype: str | None) -> str:
    return (ctype or "").partition(";")[0].strip().lower()


def _lane_reply(answer: Answer, endpoint: str, origin: str | None) -> Reply:
    if answer is _ACCEPTED[endpoint] and origin is None:
        return _ACCEPTED_REPLY[endpoint]
    return answer.for_origin(origin).reply()


def _answer(endpoint: str, outcome: Outcome) -> Answer:
    """The answer to a beacon the pipeline decided on: ``202`` with the endpoint's ready body,
    or the pipeline's refusal."""
    if outcome is ACCEPTED:  # counted by the publisher
        return _ACCEPTED[endpoint]
    if outcome.status == 202:
        _ACCEPTED_METRIC[endpoint].inc()
        return _ACCEPTED[endpoint]
    metrics.INGEST_REQUESTS.labels(endpoint, _outcome_label(outcome.status)).inc()
    return error_answer(outcome.status, outcome.message, outcome.field, outcome.retry_after)


async def collect_expect(request: web.Request) -> web.Response | None:
    """``Expect: 100-continue``: a body that would be refused for its size or type is refused
    before the client sends it, without a ``100 Continue`` first (aiohttp's own handler
    answers ``100`` to any)."""
    try:
        if request.headers.get("Expect", "").strip().lower() != "100-continue":
            raise _Refused(417, "only 100-continue is expected", "expect")
        ctype = request.headers.get("Content-Type")
        if ctype not in _JSON_CONTENT_TYPES and _media_type(ctype) not in _JSON_TYPES:
            raise _Refused(415, "send text/plain or application/json", "content-type")
        _check_body_headers(request.content_length, _headers_of(request))
    except _Refused as r:
        return _refused("collect", r).for_origin(request.headers.get("Origin")).response()
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    return None


async def collect_preflight(request: web.Request) -> web.Response:
    """``OPTIONS /collect``: a browser's preflight of a beacon with a JSON body (see
    ``cors_for``), or a plain question of what the resource allows."""
    headers = CIMultiDict(cors_for(request.headers.get("Origin")))
    headers.update(
        {
            "Allow": "POST, OPTIONS",
            "Access-Control-Allow-Methods": "POST, OPTIONS",
            "Access-Control-Allow-Headers": "Content-Type",
            "Access-Control-Max-Age": "86400",
        }
    )
    return web.Response(status=204, headers=headers)


async def pixel_head(request: web.Request) -> web.Response:
    """``HEAD /collect.gif``: the headers of the image, and nothing counted (a link checker's
    request is not a page view)."""
    return web.Response(
        headers={
            "Content-Type": "image/gif",
            "Content-Length": str(len(_GIF)),
            "Cache-Control": "no-store",
            "Access-Control-Allow-Origin": "*",
        }
    )


def add_routes(app: web.Application, pipeline: Pipeline, settings: Settings) -> None:
    app[PIPELINE] = pipeline
    app[SETTINGS] = settings
    ingest = _Ingest(pipeline, settings)
    app.router.add_post("/collect", ingest.collect_request, expect_handler=collect_expect)
    app.router.add_route("OPTIONS", "/collect", collect_preflight)
    app.router.add_get("/collect.gif", ingest.pixel_request, allow_head=False)
    app.router.add_route("HEAD", "/collect.gif", pixel_head)
    app.router.add_get("/beacon.js", _BEACON_JS.handle)
    http.add_lane_route(app, "POST", "/collect", ingest.collect_lane)
    http.add_lane_route(app, "GET", "/collect.gif", ingest.pixel_lane)
