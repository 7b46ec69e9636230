"""The beacon record: what ingest publishes and aggregate consumes (one JSON object per record).

It never carries a raw client address or User-Agent: only the keyed visitor hash.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
import orjson

EVENT_TYPES = ("pageview", "heartbeat", "leave")
_TS_LIMIT = 2**53  # ts is a JSON integer a double holds exactly
_new_event = tuple.__new__  # Event(...) without the named tuple's Python-level __new__
# A UUID already in canonical form (what ingest publishes): no need to parse and print it again.
_CANONICAL_UUID = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
).fullmatch


class RecordError(ValueError):
    """A record that cannot be decoded; it goes to the dead-letter topic."""


class Event(NamedTuple):
    """One beacon as published and consumed. Immutable; a named tuple because both services
    make one per beacon and it costs a third of a frozen dataclass to build."""

    event_id: str
    site: str
    type: str
    ts: int  # milliseconds since the epoch, set by ingest at acceptance
    visitor: str  # keyed hash (current salt period), or of the portal's own visitor id
    visitor_prev: str | None  # the same visitor under the previous salt period, near a rotation
    member: bool
    bot: bool
    url: str
    referrer: str
    title: str
    # The microseconds of the time of acceptance past ``ts``'s millisecond (0-999): what orders
    # two events of one visitor within one millisecond, when the processes that accepted them
    # put them in the log out of that order. The record carries it as ``ts_us``, the whole time
    # in microseconds (``ts == ts_us // 1000``); a record without it has 0.
    micros: int = 0
    # The site's time zone as ingest's registry has it: an aggregate whose registry does not
    # have the site yet (a rollout that reached ingest first) counts its events in it, so none
    # is lost; "" in a record from before it was sent.
    tz: str = ""


def record_key(site: str, visitor: str) -> bytes:
    return f"{site}:{visitor}".encode()


def encode(event: Event) -> bytes:
    return encode_fields(*event)


def encode_fields(
    event_id: str,
    site: str,
    type: str,
    ts: int,
    visitor: str,
    visitor_prev: str | None,
    member: bool,
    bot: bool,
    url: str,
    referrer: str,
    title: str,
    micros: int = 0,
    tz: str = "",
) -> bytes:
    """``encode(Event(...))`` without making the ``Event`` (ingest's hot path)."""
    value: dict[str, Any] = {
        "event_id": event_id,
        "site": site,
        "type": type,
        "ts": ts,
        "ts_us": ts * 1000 + micros,
        "visitor": visitor,
        "member": member,
        "bot": bot,
        "url": url,
        "referrer": referrer,
        "title": title,
    }
    if visitor_prev:
        value["visitor_prev"] = visitor_prev
    if tz:
        value["tz"] = tz
    return orjson.dumps(value)


def _str(value: dict[str, Any], name: str, *, required: bool = True, limit: int = 4096) -> str:
    v = value.get(name)
    if v is None and not required:
        return ""
    if not isinstance(v, str) or len(v) > limit or (required and not v):
        raise RecordError(f"field {name!r} missing or invalid")
    return v


_Short = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class _Wire(msgspec.Struct, gc=False):
    """A record's fields with their types and bounds, checked by msgspec's decoder in C as it
    parses (the fast path of ``decode``); defaults where ``_decode_checked`` has them."""

    event_id: Annotated[str, msgspec.Meta(max_length=64)]
    site: _Short
    type: Literal["pageview", "heartbeat", "leave"]
    ts: Annotated[int, msgspec.Meta(gt=0, lt=_TS_LIMIT)]
    visitor: _Short
    member: bool = False
    bot: bool = False
    url: Annotated[str, msgspec.Meta(max_length=4096)] = ""
    referrer: Annotated[str, msgspec.Meta(max_length=4096)] = ""
    title: Annotated[str, msgspec.Meta(max_length=1024)] = ""
    ts_us: int | msgspec.UnsetType = msgspec.UNSET  # absent: the record has no microseconds
    visitor_prev: _Short | None = None
    tz: Annotated[str, msgspec.Meta(max_length=64)] = ""


_decode_wire = msgspec.json.Decoder(_Wire).decode


def decode(raw: bytes | None) -> Event:
    """Decode and check one record value; raises RecordError for anything malformed.

    A record whose fields have their types and bounds (``_Wire``), a canonical ``event_id``
    and a ``ts_us`` within ``ts``'s millisecond is taken as msgspec parsed it; anything else
    takes the slow path (``_decode_checked``), which applies the same checks one by one, says
    what is wrong, and puts a non-canonical ``event_id`` in canonical form. (Both read JSON
    alike: UTF-8 only, no lone surrogates, the last of repeated keys.)"""
    if raw is None:
        raise RecordError("empty record")
    try:
        w = _decode_wire(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return _decode_slow(raw)
    ts, ts_us = w.ts, w.ts_us
    micros = 0 if ts_us is msgspec.UNSET else ts_us - ts * 1000
    if 0 <= micros < 1000 and _CANONICAL_UUID(w.event_id):
        return _new_event(
            Event,
            (
                w.event_id,
                w.site,
                w.type,
                ts,
                w.visitor,
                w.visitor_prev,
                w.member,
                w.bot,
                w.url,
                w.referrer,
                w.title,
                micros,
                w.tz,
            ),
        )
    return _decode_slow(raw)


def _decode_slow(raw: bytes) -> Event:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise RecordError(f"not JSON: {e}") from None
    if type(value) is not dict:
        raise RecordError("not a JSON object")
    return _decode_checked(value)


def _decode_checked(value: dict[str, Any]) -> Event:
    ts = value.get("ts")
    if not isinstance(ts, int) or isinstance(ts, bool) or not 0 < ts < _TS_LIMIT:
        raise RecordError("field 'ts' missing or invalid")
    ts_us = value.get("ts_us", ts * 1000)
    if type(ts_us) is not int or not 0 <= ts_us - ts * 1000 < 1000:
        raise RecordError("field 'ts_us' invalid: the time of 'ts' in microseconds")
    kind = value.get("type")
    if kind not in EVENT_TYPES:
        raise RecordError("field 'type' missing or invalid")
    event_id = _str(value, "event_id", limit=64)
    if not _CANONICAL_UUID(event_id):
        try:
            event_id = str(uuid.UUID(event_id))
        except ValueError:
            raise RecordError("field 'event_id' is not a UUID") from None
    member, bot = value.get("member", False), value.get("bot", False)
    if not isinstance(member, bool) or not isinstance(bot, bool):
        raise RecordError("fields 'member'/'bot' must be booleans")
    prev = value.get("visitor_prev")
    if prev is not None and (not isinstance(prev, str) or not 0 < len(prev) <= 64):
        raise RecordError("field 'visitor_prev' invalid")
    return Event(
        event_id,
        _str(value, "site", limit=64),
        kind,
        ts,
        _str(value, "visitor", limit=64),
        prev,
        member,
        bot,
        _str(value, "url", required=False),
        _str(value, "referrer", required=False),
        _str(value, "title", required=False, limit=1024),
        ts_us - ts * 1000,
        _str(value, "tz", required=False, limit=64),
    )
