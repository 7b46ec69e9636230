"""The scripts both services serve (``/beacon.js``, ``/widget.js``): ready bytes, compressed
once for the clients that accept gzip, each representation with its own strong ``ETag``,
``304`` to a matching ``If-None-Match`` with the headers a ``200`` would carry (RFC 9110
15.4.5), and readable from any page."""

from __future__ import annotations

import gzip
import hashlib

from aiohttp import web


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether ``Accept-Encoding`` admits gzip (RFC 9110 12.5.3): named, or ``*``, with a
    quality above 0; an explicit ``gzip;q=0`` refuses it even beside ``*``."""
    if not accept_encoding:
        return False
    star = False
    for item in accept_encoding.split(","):
        name, _, params = item.partition(";")
        name = name.strip().lower()
        quality = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value.strip())
                except ValueError:
                    quality = 0.0
        if name in ("gzip", "x-gzip"):
            return quality > 0
        if name == "*":
            star = quality > 0
    return star


def etag_matches(etag: str, if_none_match: str | None) -> bool:
    """``If-None-Match`` against ``etag`` by the weak comparison (RFC 9110 13.1.2): ``W/`` on
    either side is ignored, and ``*`` matches."""
    if not if_none_match:
        return False
    tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return "*" in tags or etag.removeprefix("W/") in tags


class Script:
    """One script, its gzip form made once."""

    def __init__(self, body: bytes, max_age: int = 3600) -> None:
        digest = hashlib.sha256(body).hexdigest()[:20]
        self._plain = (body, f'"{digest}"', ())
        self._gzip = (
            gzip.compress(body, 9, mtime=0),
            f'"{digest}-gz"',
            (("Content-Encoding", "gzip"),),
        )
        self._cache = f"public, max-age={max_age}"

    @property
    def etag(self) -> str:
        """The uncompressed script's ``ETag``."""
        return self._plain[1]

    async def handle(self, request: web.Request) -> web.Response:
        body, etag, encoding = (
            self._gzip if accepts_gzip(request.headers.get("Accept-Encoding")) else self._plain
        )
        headers = {
            "ETag": etag,
            "Cache-Control": self._cache,
            "Vary": "Accept-Encoding",
            "Access-Control-Allow-Origin": "*",
        }
        if etag_matches(etag, request.headers.get("If-None-Match")):
            return web.Response(status=304, headers=headers)
        headers.update(encoding)
        return web.Response(
            body=body, content_type="application/javascript", charset="utf-8", headers=headers
        )
