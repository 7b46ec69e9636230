"""Validation of a beacon at the boundary: raw fields in, a typed ``Beacon`` out, or a
``BeaconError`` that names the offending field. Nothing past this module sees raw input.

The rules (the OpenAPI document in ``services/openapi.py`` states the same):

* the raw object has at most ``MAX_KEYS`` fields; unknown fields are ignored, but a value that
  is an array or object is bounded too (at most ``MAX_DEPTH`` levels and ``MAX_KEYS`` members
  in all), so no input can make a walk over it expensive;
* every known field has a type, a length limit in characters (checked on the raw value), and
  a format: ``site`` is a site id, ``type`` one of three words, ``url`` an absolute http(s) URL
  and ``referrer`` an absolute URL with a host (``android-app://…`` too), both parsed with
  ``urllib.parse.urlsplit``, ``event_id`` a UUID (kept in canonical
  form), ``member`` a boolean (``true``/``false``, ``1``/``0``, or the strings ``"1"``, ``"0"``,
  ``"true"``, ``"false"``, ``""``);
* in strings every kind of white space becomes a plain space, other control and format
  characters (bidi overrides, zero-width spaces, C0/C1 controls, unassigned, private use, lone
  surrogates) are removed, the rest is NFC-normalised and stripped (and cut to the limit,
  should normalisation have lengthened it).
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from services.memo import memo
from services.record import _CANONICAL_UUID, EVENT_TYPES
from services.sites import SITE_ID

MAX_URL = 2048
MAX_TITLE = 512
MAX_VISITOR = 128
MAX_KEYS = 64
MAX_DEPTH = 4  # of a value under an unknown field: {"x": {"y": [1]}} is 2 levels deep
MAX_TOKEN = 256
MAX_EVENT_ID = 64

# Format characters that carry meaning in real text and cannot be used to disguise it.
_KEEP_FORMAT = frozenset("\u200c\u200d")  # zero-width non-joiner, zero-width joiner
# as pages and templates write them (Python and .NET write True / False)
_TRUE = ("1", "true", "True", "TRUE")
BOOL_STRINGS = ("1", "true", "True", "TRUE", "0", "false", "False", "FALSE", "")
_URL_SCHEMES = ("http", "https")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*").fullmatch  # RFC 3986
# The usual URL: scheme://host[/?#rest], a host of letters, digits, dots and hyphens (no user,
# port or brackets), visible ASCII after it. ``urlsplit`` finds nothing wrong with one (the
# scheme aside): it is known good at a tenth of the cost (``_problem``'s memo misses when the
# readers are spread over many pages).
_PLAIN_URL = re.compile(
    r"([A-Za-z][A-Za-z0-9+.-]*)://[A-Za-z0-9.-]+(?:[/?#][\x21-\x7e]*)?"
).fullmatch


class BeaconError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class Beacon(NamedTuple):
    """(A named tuple: one is made per beacon.)"""

    site: str
    type: str
    url: str
    referrer: str
    title: str
    member: bool
    event_id: str | None
    visitor: str | None
    member_token: str | None


def clean(text: str, limit: int) -> str:
    """Turn white space into spaces, drop other invisible characters, NFC-normalise, strip,
    cut to ``limit`` characters. The common case (printable ASCII) costs two scans."""
    if not text.isprintable():
        text = "".join(
            " " if ch.isspace() else ch
            for ch in text
            if ch.isprintable() or ch.isspace() or ch in _KEEP_FORMAT
        )
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    text = text.strip()
    return text[:limit].rstrip() if len(text) > limit else text


def _string(raw: Mapping[str, Any], name: str, limit: int) -> str | None:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BeaconError(name, f"{name} must be a string")
    if len(value) > limit:
        raise BeaconError(name, f"{name} is longer than {limit} characters")
    return clean(value, limit)


def _url(raw: Mapping[str, Any], name: str, *, required: bool, web: bool = True) -> str:
    """An absolute URL with a host: ``http(s)`` for ``web`` (the page), any scheme otherwise
    (a referrer may be an app's, ``android-app://…``); kept without its fragment and without a
    user and password."""
    value = _string(raw, name, MAX_URL)
    if not value:
        if required:
            raise BeaconError(name, f"{name} is required for a pageview")
        return ""
    problem = _url_problem(value) if web else _referrer_problem(value)
    if problem is not None:
        raise BeaconError(name, f"{name} {problem}")
    if "#" in value:  # never sent to a server by a browser; often a token (#access_token=…)
        value = value.partition("#")[0]
    if "@" in value:
        return _without_userinfo(value)
    return value


def _without_userinfo(url: str) -> str:
    """``url`` without a ``user:password@`` before its host: a password typed into an address
    is not the page, and is never kept."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


# Cached: the readers of one page all send its URL (and referrer), with every event.
@memo(65536)
def _url_problem(value: str) -> str | None:
    """What is wrong with a cleaned page URL, or None."""
    return _problem(value, web=True)


@memo(65536)
def _referrer_problem(value: str) -> str | None:
    """What is wrong with a cleaned referrer, or None."""
    return _problem(value, web=False)


def _problem(value: str, *, web: bool) -> str | None:
    plain = _PLAIN_URL(value)
    if plain is not None and (not web or plain[1].lower() in _URL_SCHEMES):
        return None
    if " " in value:  # clean() made every white space a space; a URL has none
        return "must not contain white space"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
        host = parts.hostname
    except ValueError:
        return "is not a valid URL"
    if web and (parts.scheme.lower() not in _URL_SCHEMES or not host):
        return "must be an absolute http(s) URL"
    if not web and not (_SCHEME(parts.scheme) and host):
        return "must be an absolute URL"
    return None


def query_fields(query: str) -> list[tuple[str, str]]:
    """The fields of a pixel's query string, in order, as ``urllib.parse.parse_qsl`` reads them
    (``&`` between fields, ``+`` and percent-escapes decoded as UTF-8, blank values kept), with
    the common case — nothing to decode — done without decoding. Raises ``BeaconError`` past
    ``MAX_KEYS`` fields."""
    if query.count("&") >= MAX_KEYS:
        raise BeaconError("query", f"a beacon has at most {MAX_KEYS} fields")
    fields = []
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        if "%" in name or "+" in name:
            name = _unquote_plus(name)
        if "%" in value or "+" in value:
            value = _unquote_plus(value)
        fields.append((name, value))
    return fields


# b"%xx" escape -> its byte, both cases of hex digits (as ``urllib.parse`` decodes them)
_HEX_BYTE = {
    f"{a}{b}".encode(): bytes([int(a + b, 16)])
    for a in "0123456789abcdefABCDEF"
    for b in "0123456789abcdefABCDEF"
}


def _unquote_plus(text: str) -> str:
    """``unquote_plus(text)``. Of ASCII text (a query as it arrives) it decodes the escapes
    as ``unquote_to_bytes`` does, here, so that compiled (``make native``) it runs no
    interpreted frame; anything else goes to ``unquote_plus`` itself."""
    if not text.isascii():
        return unquote_plus(text)
    parts = text.replace("+", " ").encode().split(b"%")
    out = [parts[0]]
    for part in parts[1:]:
        byte = _HEX_BYTE.get(part[:2])
        if byte is None:
            out.append(b"%")
            out.append(part)
        else:
            out.append(byte)
            out.append(part[2:])
    return b"".join(out).decode("utf-8", "replace")


def _bool(raw: Mapping[str, Any], name: str) -> bool:
    value = raw.get(name)
    if value is True or value is False:
        return value
    if value is None:  # absent, or null: as for every optional field
        return False
    if type(value) is int and value in (0, 1):
        return value == 1
    if isinstance(value, str) and value in BOOL_STRINGS:
        return value in _TRUE
    raise BeaconError(
        name, f'{name} must be true or false (1, 0, "true", "false", "True", "False" also do)'
    )


def _check_nested(name: str, value: dict[Any, Any] | list[Any]) -> None:
    """An unknown field may hold an array or object, within bounds (iterative: no recursion)."""
    members = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BeaconError(name, f"{name} is nested more than {MAX_DEPTH} levels deep")
        children = item.values() if isinstance(item, dict) else item
        members += len(children)
        if members > MAX_KEYS:
            raise BeaconError(name, f"{name} holds more than {MAX_KEYS} members")
        for child in children:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))


def parse_beacon(raw: Mapping[str, Any]) -> Beacon:
    """Check every field of one beacon. Unknown fields are ignored (within bounds)."""
    if len(raw) > MAX_KEYS:
        raise BeaconError("body", f"a beacon has at most {MAX_KEYS} fields")
    for name, value in raw.items():
        if isinstance(value, dict | list):
            _check_nested(name, value)
    site = raw.get("site")
    if site is None or site == "":
        raise BeaconError("site", "site is required")
    if not isinstance(site, str):
        raise BeaconError("site", "site must be a string")
    if not SITE_ID.fullmatch(site):
        raise BeaconError("site", "site must match [a-z0-9][a-z0-9-]{0,63}")
    kind = raw.get("type", "pageview")
    if kind is None or kind == "":
        kind = "pageview"
    elif not isinstance(kind, str) or kind not in EVENT_TYPES:
        raise BeaconError("type", "type must be pageview, heartbeat or leave")
    event_id = _string(raw, "event_id", MAX_EVENT_ID)
    if event_id and not _CANONICAL_UUID(event_id):  # canonical already: kept as it is
        try:
            event_id = str(uuid.UUID(event_id))
        except ValueError:
            raise BeaconError("event_id", "event_id must be a UUID") from None
    visitor = _string(raw, "visitor", MAX_VISITOR)
    return Beacon(  # (by position: half the cost of by keyword)
        site,
        kind,
        _url(raw, "url", required=kind == "pageview"),
        _url(raw, "referrer", required=False, web=False),
        _string(raw, "title", MAX_TITLE) or "",
        _bool(raw, "member"),
        event_id or None,
        visitor or None,
        _string(raw, "member_token", MAX_TOKEN) or None,
    )
