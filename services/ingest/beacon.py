"""Validation of a beacon at the boundary: raw fields in, a typed ``Beacon`` out, or a
``BeaconError`` that names the offending field. Nothing past this module sees raw input."""

from __future__ import annotations

import unicodedata
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from services.record import EVENT_TYPES
from services.sites import SITE_ID

MAX_URL = 2048
MAX_TITLE = 512
MAX_VISITOR = 128
MAX_KEYS = 64
MAX_TOKEN = 256


class BeaconError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(slots=True, frozen=True)
class Beacon:
    site: str
    type: str
    url: str
    referrer: str
    title: str
    member: bool
    event_id: str | None
    visitor: str | None
    member_token: str | None


def _clean(text: str) -> str:
    """NFC-normalise and drop control characters (they have no place in a URL or a title)."""
    text = unicodedata.normalize("NFC", text)
    if text.isprintable():
        return text.strip()
    return "".join(ch for ch in text if ch.isprintable()).strip()


def _string(raw: Mapping[str, Any], name: str, limit: int) -> str | None:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BeaconError(name, f"{name} must be a string")
    if len(value) > limit:
        raise BeaconError(name, f"{name} is longer than {limit} characters")
    return _clean(value)


def _url(raw: Mapping[str, Any], name: str, *, required: bool) -> str:
    value = _string(raw, name, MAX_URL)
    if not value:
        if required:
            raise BeaconError(name, f"{name} is required for a pageview")
        return ""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise BeaconError(name, f"{name} is not a valid URL") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise BeaconError(name, f"{name} must be an absolute http(s) URL")
    return value


def _bool(raw: Mapping[str, Any], name: str) -> bool:
    value = raw.get(name, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "0", "false", ""):
        return value.lower() in ("1", "true")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise BeaconError(name, f"{name} must be true or false")


def parse_beacon(raw: Mapping[str, Any]) -> Beacon:
    """Check every field of one beacon. Unknown fields are ignored."""
    if len(raw) > MAX_KEYS:
        raise BeaconError("body", f"a beacon has at most {MAX_KEYS} fields")
    site = raw.get("site")
    if not isinstance(site, str) or not site:
        raise BeaconError("site", "site is required")
    if not SITE_ID.fullmatch(site):
        raise BeaconError("site", "site must match [a-z0-9][a-z0-9-]{0,63}")
    kind = raw.get("type", "pageview")
    if kind is None or kind == "":
        kind = "pageview"
    if kind not in EVENT_TYPES:
        raise BeaconError("type", "type must be pageview, heartbeat or leave")
    event_id = _string(raw, "event_id", 64)
    if event_id:
        try:
            event_id = str(uuid.UUID(event_id))
        except ValueError:
            raise BeaconError("event_id", "event_id must be a UUID") from None
    visitor = _string(raw, "visitor", MAX_VISITOR)
    return Beacon(
        site=site,
        type=kind,
        url=_url(raw, "url", required=kind == "pageview"),
        referrer=_url(raw, "referrer", required=False),
        title=_string(raw, "title", MAX_TITLE) or "",
        member=_bool(raw, "member"),
        event_id=event_id or None,
        visitor=visitor or None,
        member_token=_string(raw, "member_token", MAX_TOKEN) or None,
    )
