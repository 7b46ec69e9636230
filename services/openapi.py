"""The OpenAPI 3.1 document of the whole HTTP API (ingest and aggregate), served at
``/openapi.json`` by every service: each serves the operations it registers (``document_for``).

``tests/unit/test_openapi.py`` keeps it true: every route an app registers is documented and
every documented operation is registered; schemathesis checks the running service against it.
Each operation lists every status it answers with. Two refusals can come before any route is
chosen and are documented on every operation: ``400`` for a malformed HTTP request (bad
syntax, a request line or header over the limit, too many headers) and ``503`` when the process
already holds its maximum of open connections. ``HEAD`` is served wherever ``GET`` is; on
``/collect.gif`` it answers the image's headers and counts nothing (a link checker's HEAD
request is not a page view).

The beacon schemas describe what is accepted at least as broadly as the validation in
``services/ingest/beacon.py``: anything outside them is refused with ``400`` (or ``403``,
``413``); a few values inside them are refused too (``url`` must parse as an absolute http(s)
URL with a host, ``event_id`` must be a UUID), as the descriptions say.
"""

from __future__ import annotations

import copy
from typing import Any

from aiohttp import web

from services.ingest.beacon import (
    BOOL_STRINGS,
    MAX_EVENT_ID,
    MAX_KEYS,
    MAX_TITLE,
    MAX_TOKEN,
    MAX_URL,
    MAX_VISITOR,
)

SITE_PATTERN = "^[a-z0-9][a-z0-9-]{0,63}$"
JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {JSON: {"schema": _ref("Error")}},
    }
    if headers:
        response["headers"] = headers
    return response


_RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before sending again",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}
_CORS_ORIGIN = {
    "Access-Control-Allow-Origin": {"schema": {"type": "string"}},
}
_ETAG = {"ETag": {"description": "an entity tag", "schema": {"type": "string"}}}

# Refusals that may come before any route is chosen (see the module docstring).
_PROTOCOL: dict[str, Any] = {
    "400": _error("malformed HTTP request, or a request line or header over the limit"),
    "503": _error(
        "the process holds its maximum of open connections (or the service cannot take more)",
        _RETRY_AFTER,
    ),
    "417": _error("an Expect other than 100-continue"),
}


def _op(
    summary: str,
    responses: dict[str, Any],
    *,
    tags: list[str],
    parameters: list[dict[str, Any]] | None = None,
    request_body: dict[str, Any] | None = None,
    operation_id: str,
    description: str | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "operationId": operation_id,
        "tags": tags,
        "responses": {**_PROTOCOL, **responses},
    }
    if description:
        op["description"] = description
    if parameters:
        op["parameters"] = parameters
    if request_body:
        op["requestBody"] = request_body
    return op


_SITE_PARAM = {
    "name": "site",
    "in": "path",
    "required": True,
    "description": "a site id from the registry; any other value is answered 404",
    "schema": {"type": "string", "minLength": 1},
    "example": "dongha",
}
_IF_NONE_MATCH = {
    "name": "If-None-Match",
    "in": "header",
    "required": False,
    "description": "an ETag from an earlier answer: 304 when it still matches",
    "schema": {"type": "string"},
}
_LANG = {
    "name": "lang",
    "in": "query",
    "required": False,
    "description": "language of the labels: vi (default) or en; anything else means vi",
    "schema": {"type": "string", "default": "vi", "examples": ["vi", "en"]},
}
_VISITS = {
    "name": "visits",
    "in": "query",
    "required": False,
    "description": "the visits rows shown, in this order whatever the order named: today, "
    "yesterday, week, month, total (commas); names not known are left out, none known means "
    "the default (as widget.js's data-visits)",
    "schema": {"type": "string", "default": "today,total", "examples": ["today,yesterday,total"]},
}


def _preflight(operation_id: str, methods: str) -> dict[str, Any]:
    return _op(
        "CORS preflight",
        {
            "204": {
                "description": f"allowed: {methods}",
                "headers": {
                    **_CORS_ORIGIN,
                    "Access-Control-Allow-Methods": {"schema": {"type": "string"}},
                },
            }
        },
        tags=["cors"],
        operation_id=operation_id,
    )


def _static(summary: str, media: str, operation_id: str, tags: list[str]) -> dict[str, Any]:
    return _op(
        summary,
        {
            "200": {
                "description": "the file (cacheable; a strong ETag per representation; gzip "
                "when Accept-Encoding admits it)",
                "headers": {
                    **_ETAG,
                    "Content-Encoding": {"schema": {"const": "gzip"}},
                    "Vary": {"schema": {"const": "Accept-Encoding"}},
                },
                "content": {media: {"schema": {"type": "string"}}},
            },
            "304": {"description": "not modified", "headers": _ETAG},
        },
        tags=tags,
        parameters=[_IF_NONE_MATCH],
        operation_id=operation_id,
    )


def _period() -> dict[str, Any]:
    names = ["today", "yesterday", "this_week", "this_month", "total"]
    return {
        "type": "object",
        "required": names,
        "properties": {n: {"type": "integer", "minimum": 0} for n in names},
    }


_BEACON_PROPERTIES: dict[str, Any] = {
    "site": {
        "type": "string",
        "pattern": SITE_PATTERN,
        "description": "a site id from the registry (403 for an unknown one)",
    },
    "type": {
        "enum": ["pageview", "heartbeat", "leave", "", None],
        "default": "pageview",
        "description": "empty or null means pageview",
    },
    "url": {
        "type": ["string", "null"],
        "maxLength": MAX_URL,
        "description": "absolute http(s) URL of the page, with a host and no white space "
        "(parsed with urllib.parse.urlsplit); required for a pageview",
    },
    "referrer": {
        "type": ["string", "null"],
        "maxLength": MAX_URL,
        "description": "absolute URL with a host, of any scheme (a page's, or an app's "
        "such as android-app://…), no white space; empty means none",
    },
    "title": {"type": ["string", "null"], "maxLength": MAX_TITLE},
    "member": {
        "description": "true when the reader is logged in to the portal; where the site "
        "requires member tokens, it counts only with a valid member_token",
        "anyOf": [
            {"type": "boolean"},
            {"type": "integer", "enum": [0, 1]},
            {"type": "string", "enum": list(BOOL_STRINGS)},
            {"type": "null"},
        ],
        "default": False,
    },
    "event_id": {
        "type": ["string", "null"],
        "maxLength": MAX_EVENT_ID,
        "description": "a UUID made by the client; a beacon sent twice with one id counts once",
    },
    "visitor": {
        "type": ["string", "null"],
        "maxLength": MAX_VISITOR,
        "description": "the portal's own opaque visitor id (hashed before it leaves ingest)",
    },
    "member_token": {
        "type": ["string", "null"],
        "maxLength": MAX_TOKEN,
        "description": "EXPIRY.HEXSIG with HEXSIG = hex(HMAC-SHA256(site secret, "
        "'SITE.EXPIRY')), made by the portal's server; invalid or expired: a guest",
    },
}


def _query_param(name: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema}


_PIXEL_PARAMETERS = [
    _query_param("site", {"type": "string", "pattern": SITE_PATTERN}, required=True),
    _query_param("type", {"type": "string", "enum": ["pageview", "heartbeat", "leave", ""]}),
    _query_param("url", {"type": "string", "maxLength": MAX_URL}),
    _query_param("referrer", {"type": "string", "maxLength": MAX_URL}),
    _query_param("title", {"type": "string", "maxLength": MAX_TITLE}),
    _query_param("member", {"type": "string", "enum": list(BOOL_STRINGS)}),
    _query_param("event_id", {"type": "string", "maxLength": MAX_EVENT_ID}),
    _query_param("visitor", {"type": "string", "maxLength": MAX_VISITOR}),
    _query_param("member_token", {"type": "string", "maxLength": MAX_TOKEN}),
]

_BEACON_REFUSALS: dict[str, Any] = {
    "400": _error("malformed or invalid beacon; `field` names the offending field"),
    "403": _error("unknown site, or an Origin (else Referer) not among the site's origins"),
    "429": _error("this client (address, or IPv6 /64) is over its rate for the site", _RETRY_AFTER),
    "503": _error("the service cannot take more beacons now", _RETRY_AFTER),
}

_HEALTH = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"const": "ok"}},
}
_READY = {
    "type": "object",
    "required": ["ready", "failing", "checks"],
    "properties": {
        "ready": {"type": "boolean"},
        "failing": {"type": "array", "items": {"type": "string"}},
        "checks": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["ok", "detail"],
                "properties": {"ok": {"type": "boolean"}, "detail": {"type": "string"}},
            },
        },
    },
}

_COUNTER_RESPONSES: dict[str, Any] = {
    "404": _error("unknown site"),
    "503": _error("the counter is not available yet (just started)", _RETRY_AFTER),
}


def _paths() -> dict[str, Any]:
    beacon_examples = {
        "pageview": {
            "value": {
                "site": "dongha",
                "type": "pageview",
                "url": "https://dongha.quangtri.gov.vn/tin-tuc",
                "title": "Tin tức",
                "event_id": "5f0c6a4e-8d1b-4c55-9a43-0b6f6f0d2a11",
            }
        },
        "heartbeat": {"value": {"site": "dongha", "type": "heartbeat", "member": True}},
    }
    return {
        "/beacon.js": {
            "get": _static("the tracker script", "application/javascript", "beaconJs", ["ingest"])
        },
        "/collect": {
            "post": _op(
                "send one beacon",
                {
                    "202": {
                        "description": "accepted (and counted, unless the reader asked not "
                        "to be tracked on a site that honours it)",
                        "headers": _CORS_ORIGIN,
                        "content": {
                            JSON: {
                                "schema": {
                                    "type": "object",
                                    "required": ["status"],
                                    "properties": {"status": {"const": "accepted"}},
                                }
                            }
                        },
                    },
                    **_BEACON_REFUSALS,
                    "408": _error("the body was not received within the read timeout"),
                    "413": _error("the body is larger than 8 KiB"),
                    "415": _error(
                        "another content type, or a compressed body (a Content-Encoding, or "
                        "a transfer coding other than chunked)"
                    ),
                },
                tags=["ingest"],
                request_body={
                    "required": True,
                    "description": "one JSON object of at most 8 KiB (UTF-8), at most "
                    f"{MAX_KEYS} fields; unknown fields are ignored but nested at most 4 "
                    "levels deep",
                    "content": {
                        "text/plain": {
                            "schema": {"type": "string", "contentMediaType": JSON},
                            "examples": {
                                "pageview": {
                                    "value": '{"site":"dongha","url":"https://dongha.'
                                    'quangtri.gov.vn/"}'
                                }
                            },
                        },
                        JSON: {"schema": _ref("Beacon"), "examples": beacon_examples},
                    },
                },
                operation_id="collect",
                description="sendBeacon/fetch from beacon.js (text/plain: no CORS preflight). "
                "A request with an Origin is answered with that origin named and credentials "
                "allowed (Access-Control-Allow-Credentials: true, Vary: Origin): "
                "navigator.sendBeacon sends credentials, and with a JSON Blob the browser asks "
                "first and refuses a wildcard.",
            ),
            "options": _preflight("collectPreflight", "POST, OPTIONS"),
        },
        "/collect.gif": {
            "get": _op(
                "send one beacon as a 1×1 image (pages without JavaScript)",
                {
                    "202": {
                        "description": "accepted: a 1×1 transparent GIF",
                        "headers": _CORS_ORIGIN,
                        "content": {"image/gif": {"schema": {"type": "string"}}},
                    },
                    **_BEACON_REFUSALS,
                },
                tags=["ingest"],
                parameters=_PIXEL_PARAMETERS,
                operation_id="collectGif",
                description="the beacon fields as query parameters; a field given twice is "
                f"refused, other parameters are ignored (at most {MAX_KEYS} in all)",
            )
        },
        "/v1/sites/{site}/counter": {
            "parameters": [_SITE_PARAM],
            "get": _op(
                "the counter of a site",
                {
                    "200": {
                        "description": "the numbers",
                        "headers": {**_ETAG, "Cache-Control": {"schema": {"type": "string"}}},
                        "content": {JSON: {"schema": _ref("Counter")}},
                    },
                    "304": {"description": "not modified", "headers": _ETAG},
                    **_COUNTER_RESPONSES,
                },
                tags=["counter"],
                parameters=[_IF_NONE_MATCH],
                operation_id="counter",
            ),
            "options": _preflight("counterPreflight", "GET, OPTIONS"),
        },
        "/v1/sites/{site}/counter/stream": {
            "parameters": [_SITE_PARAM],
            "get": _op(
                "the counter as server-sent events",
                {
                    "200": {
                        "description": "the counter JSON as an event each time it changes (at "
                        "most once a second), keep-alive comments between",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **_COUNTER_RESPONSES,
                },
                tags=["counter"],
                operation_id="counterStream",
            ),
            "options": _preflight("counterStreamPreflight", "GET, OPTIONS"),
        },
        "/v1/sites/{site}/counter.svg": {
            "parameters": [_SITE_PARAM],
            "get": _op(
                "the counter block as an SVG image",
                {
                    "200": {
                        "description": "the image (a weak ETag of the numbers and language)",
                        "headers": _ETAG,
                        "content": {"image/svg+xml": {"schema": {"type": "string"}}},
                    },
                    "304": {"description": "not modified", "headers": _ETAG},
                    **_COUNTER_RESPONSES,
                    "404": {
                        "description": "unknown site: an image that says so",
                        "content": {"image/svg+xml": {"schema": {"type": "string"}}},
                    },
                },
                tags=["counter"],
                parameters=[_LANG, _VISITS, _IF_NONE_MATCH],
                operation_id="counterSvg",
            ),
        },
        "/widget.js": {
            "get": _static("the widget script", "application/javascript", "widgetJs", ["widget"])
        },
        "/widget/{site}": {
            "parameters": [_SITE_PARAM],
            "get": _op(
                "the counter block as a page of its own, for an iframe",
                {
                    "200": {
                        "description": "the page",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                    "404": {
                        "description": "unknown site: a page that says so",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                },
                tags=["widget"],
                parameters=[_LANG, _VISITS],
                operation_id="widgetPage",
            ),
        },
        "/": {
            "get": _op(
                "a demo page with the widget (visitorstats run only)",
                {
                    "200": {
                        "description": "the page",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
                tags=["widget"],
                operation_id="demoPage",
            )
        },
        "/healthz": {
            "get": _op(
                "liveness",
                {"200": {"description": "alive", "content": {JSON: {"schema": _HEALTH}}}},
                tags=["operations"],
                operation_id="healthz",
            )
        },
        "/readyz": {
            "get": _op(
                "readiness",
                {
                    "200": {"description": "ready", "content": {JSON: {"schema": _READY}}},
                    "503": {
                        "description": "not ready (or too many open connections)",
                        "content": {JSON: {"schema": {"anyOf": [_READY, _ref("Error")]}}},
                    },
                },
                tags=["operations"],
                operation_id="readyz",
            )
        },
        "/metrics": {
            "get": _op(
                "Prometheus metrics",
                {
                    "200": {
                        "description": "text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
                tags=["operations"],
                operation_id="metrics",
            )
        },
        "/openapi.json": {
            "get": _op(
                "this document (the operations of the service that serves it)",
                {"200": {"description": "OpenAPI 3.1", "content": {JSON: {"schema": {}}}}},
                tags=["operations"],
                operation_id="openapi",
            )
        },
    }


def _components() -> dict[str, Any]:
    return {
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error", "field"],
                "properties": {
                    "error": {"type": "string"},
                    "field": {
                        "type": ["string", "null"],
                        "description": "the offending field, header or part of the request",
                    },
                },
            },
            "Beacon": {
                "type": "object",
                "required": ["site"],
                "maxProperties": MAX_KEYS,
                "properties": _BEACON_PROPERTIES,
                "additionalProperties": True,
            },
            "Counter": {
                "type": "object",
                "required": [
                    "site",
                    "online",
                    "visits",
                    "pageviews",
                    "online_window_seconds",
                    "timezone",
                    "as_of",
                    "stale",
                ],
                "properties": {
                    "site": {"type": "string", "pattern": SITE_PATTERN},
                    "online": {
                        "type": "object",
                        "required": ["guests", "members", "total", "bots", "peak"],
                        "properties": {
                            "guests": {"type": "integer", "minimum": 0},
                            "members": {"type": "integer", "minimum": 0},
                            "total": {"type": "integer", "minimum": 0},
                            "bots": {"type": "integer", "minimum": 0},
                            "peak": {
                                "type": "object",
                                "required": ["total", "at"],
                                "properties": {
                                    "total": {"type": "integer", "minimum": 0},
                                    "at": {"type": ["string", "null"], "format": "date-time"},
                                },
                            },
                        },
                    },
                    "visits": _period(),
                    "pageviews": _period(),
                    "online_window_seconds": {"type": "integer", "minimum": 1},
                    "timezone": {"type": "string"},
                    "as_of": {"type": "string", "format": "date-time"},
                    "stale": {"type": "boolean"},
                },
            },
        }
    }


def document() -> dict[str, Any]:
    """The whole API: what ``visitorstats run`` serves."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "visitorstats",
            "version": "1",
            "description": __doc__,
        },
        "tags": [
            {"name": "ingest", "description": "beacons in (visitorstats ingest, run)"},
            {"name": "counter", "description": "numbers out (visitorstats aggregate, run)"},
            {"name": "widget", "description": "the portal block (aggregate, run)"},
            {"name": "cors", "description": "preflight answers"},
            {"name": "operations", "description": "health, readiness, metrics, this document"},
        ],
        "paths": _paths(),
        "components": _components(),
    }


def registered(router: web.UrlDispatcher) -> set[tuple[str, str]]:
    """(path, method) of every route of an app, ``HEAD`` left out (it goes with ``GET``)."""
    out = set()
    for route in router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        out.add((route.resource.canonical, route.method.lower()))
    return out


METHODS = frozenset(("get", "put", "post", "delete", "options", "head", "patch", "trace"))


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(p, m) for p, item in doc["paths"].items() for m in item if m in METHODS}


def document_for(router: web.UrlDispatcher) -> dict[str, Any]:
    """The document cut to the operations ``router`` serves."""
    doc = copy.deepcopy(document())
    routes = registered(router)
    paths: dict[str, Any] = {}
    for path, item in doc["paths"].items():
        kept = {k: v for k, v in item.items() if k not in METHODS or (path, k) in routes}
        if METHODS & set(kept):
            paths[path] = kept
    doc["paths"] = paths
    return doc
