"""services/record.py: ``decode``'s fast path (msgspec's typed decoder, for records as ingest
writes them) gives exactly what the field-by-field checks give (the same event, or a
RecordError) for any record."""

from __future__ import annotations

import json
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.record import Event, RecordError, _decode_slow, decode, encode

GOOD: dict[str, Any] = {
    "event_id": "892f902b-d23f-4824-928b-2f330c5c7fd0",
    "site": "bench-a",
    "type": "heartbeat",
    "ts": 1_780_000_000_000,
    "ts_us": 1_780_000_000_000_123,
    "visitor": "b56bc3eca7e008c9266649b5a3734fc6",
    "member": False,
    "bot": False,
    "url": "https://bench-a.example.vn/tin-tuc/2/bai-viet-so-0.html",
    "referrer": "",
    "title": "Tin tức — Cổng thông tin",
}

# Values each field may take: valid ones, edge ones, and wrong ones of every JSON type.
ODD = [None, True, False, 0, 1, -1, 2**53 - 1, 2**53, 1.5, "", "x", [], {}, ["a"], {"a": 1}]
CHOICES: dict[str, list[Any]] = {
    "event_id": [
        GOOD["event_id"],
        GOOD["event_id"].upper(),
        GOOD["event_id"].replace("-", ""),
        "{" + GOOD["event_id"] + "}",
        "urn:uuid:" + GOOD["event_id"],
        "not-a-uuid",
        "x" * 65,
    ],
    "site": ["s", "x" * 64, "x" * 65],
    "type": ["pageview", "heartbeat", "leave", "PAGEVIEW", "click"],
    "ts": [1, 1_780_000_000_000, 0, 1000.0, 2**64],
    # (with ts 1: 1000 and 1999 are right; with the usual ts: its first and last microsecond)
    "ts_us": [
        1000,
        1999,
        1_780_000_000_000_000,
        1_780_000_000_000_999,
        1_780_000_000_001_000,
        999,
        1_780_000_000_000_000.0,
        2**70,
    ],
    "visitor": ["v", "x" * 64, "x" * 65],
    "visitor_prev": ["p", "x" * 64, "x" * 65],
    "member": [],
    "bot": [],
    "url": ["u", "x" * 4096, "x" * 4097],
    "referrer": ["r", "x" * 4096, "x" * 4097],
    "title": ["t", "x" * 1024, "x" * 1025],
}
MISSING = object()


def outcome(fn: Any, arg: Any) -> Event | str:
    try:
        return fn(arg)  # type: ignore[no-any-return]
    except RecordError as e:
        return f"error: {e}"


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(sorted(CHOICES)),
        st.one_of(
            st.just(MISSING),
            st.sampled_from(ODD),
        ),
        max_size=4,
    ),
    st.dictionaries(
        st.sampled_from(sorted(CHOICES)), st.integers(min_value=0, max_value=6), max_size=6
    ),
    st.booleans(),
)
def test_decode_matches_the_field_by_field_checks(
    odd: dict[str, Any], picks: dict[str, int], extra: bool
) -> None:
    value = dict(GOOD)
    for name, i in picks.items():
        options = CHOICES[name]
        if options:
            value[name] = options[i % len(options)]
    for name, v in odd.items():
        if v is MISSING:
            value.pop(name, None)
        else:
            value[name] = v
    if extra:
        value["unknown"] = 1
    raw = json.dumps(value, ensure_ascii=False).encode()  # (integers past 64 bits too)
    expected = outcome(_decode_slow, raw)
    got = outcome(decode, raw)
    assert got == expected
    if isinstance(got, Event):
        assert type(got.member) is bool and type(got.bot) is bool


def test_round_trip_of_what_ingest_publishes() -> None:
    event = Event(
        str(uuid.uuid4()), "hcm", "pageview", 1_790_000_000_000, "a" * 32, "b" * 32, True,
        False, "https://x.vn/", "", "Tiêu đề", 417,
    )  # fmt: skip
    assert orjson.loads(encode(event))["ts_us"] == 1_790_000_000_000_417
    assert decode(encode(event)) == event
    assert decode(encode(event._replace(visitor_prev=None))) == event._replace(visitor_prev=None)


@pytest.mark.parametrize(
    "raw", [None, b"", b"not json", b"[1]", b'"x"', b"1", b"{}", b'{"ts": 1}', b"\xff"]
)
def test_malformed_records_raise(raw: bytes | None) -> None:
    with pytest.raises(RecordError):
        decode(raw)


def test_a_record_without_microseconds_has_none_and_a_wrong_one_is_named() -> None:
    """``ts_us`` is optional (a record of an older ingest: its order is the log's), and must be
    the time of ``ts``."""
    without = dict(GOOD)
    del without["ts_us"]
    assert decode(orjson.dumps(without)).micros == 0
    assert decode(orjson.dumps(GOOD)).micros == 123
    for wrong in (GOOD["ts"] * 1000 - 1, GOOD["ts"] * 1000 + 1000, "1", 1.5, None):
        with pytest.raises(RecordError, match="ts_us"):
            decode(orjson.dumps({**GOOD, "ts_us": wrong}))
