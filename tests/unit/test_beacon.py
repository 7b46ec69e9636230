"""Property tests of the beacon parser: whatever comes in, a ``Beacon`` or a ``BeaconError``
naming a field comes out; what comes out is clean and within its limits."""

from __future__ import annotations

import re
import unicodedata
import uuid
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlsplit

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from services.ingest.beacon import (
    BOOL_STRINGS,
    MAX_DEPTH,
    MAX_KEYS,
    MAX_TITLE,
    MAX_URL,
    MAX_VISITOR,
    Beacon,
    BeaconError,
    _problem,
    _unquote_plus,
    clean,
    parse_beacon,
    query_fields,
)
from services.record import EVENT_TYPES

KNOWN = ("site", "type", "url", "referrer", "title", "member", "event_id", "visitor")
FIELDS = (*KNOWN, "member_token", "body")

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
# Strings that exercise normalisation: combining marks, white space of every kind, controls,
# bidi overrides, zero-width characters, lone surrogates, Vietnamese.
nasty_text = st.text(
    alphabet=st.characters(codec=None)
    | st.sampled_from(
        [
            *"\u0300\u0301\u0323\u00a0\u2028\u200b\u200d\u202e\ufeff\t\n\r\x00\x7f\x85",
            *("\u1ec7", "\u0110", "e", "\u0302", "\ud800", "\U0001f600"),
        ]
    ),
    max_size=60,
)
site_ids = st.from_regex(r"\A[a-z0-9][a-z0-9-]{0,63}\Z")
hosts = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{2,6}){1,2}\Z")
paths = st.text(
    alphabet=st.characters(categories=["L", "N"]) | st.sampled_from("/-_.~%?=&#"), max_size=50
)
urls = st.builds(
    lambda scheme, host, path: f"{scheme}://{host}/{path}",
    st.sampled_from(["http", "https", "HTTPS"]),
    hosts,
    paths,
)


@st.composite
def valid_beacons(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from([*EVENT_TYPES, "", None]))
    raw: dict[str, Any] = {"site": draw(site_ids)}
    if kind is not None or draw(st.booleans()):
        raw["type"] = kind
    if kind in ("pageview", "", None) or draw(st.booleans()):
        raw["url"] = draw(urls)
    if draw(st.booleans()):
        raw["referrer"] = draw(urls | st.just(""))
    if draw(st.booleans()):
        raw["title"] = draw(nasty_text)
    if draw(st.booleans()):
        raw["member"] = draw(st.sampled_from([True, False, 0, 1, None, *BOOL_STRINGS]))
    if draw(st.booleans()):
        raw["event_id"] = str(draw(st.uuids()))
    if draw(st.booleans()):
        raw["visitor"] = draw(st.text(min_size=1, max_size=MAX_VISITOR))
    return raw


def check_clean(text: str, limit: int) -> None:
    assert len(text) <= limit
    assert text == text.strip()
    assert unicodedata.is_normalized("NFC", text)
    for ch in text:
        assert ch.isprintable() or ch in "\u200c\u200d", repr(ch)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KNOWN) | st.text(max_size=10), json_values, max_size=12))
@example({"site": "dongha", "url": "http://[::1"})
@example({"site": "dongha", "url": "http://a:99999/"})
@example({"site": "dongha", "member_token": "123.\u00e9"})
@example({"site": "dongha", "type": ["pageview"]})
@example({"site": "dongha", "event_id": "\u0660" * 32})
def test_any_object_gives_a_beacon_or_an_error_naming_a_field(raw: dict[str, Any]) -> None:
    try:
        beacon = parse_beacon(raw)
    except BeaconError as e:
        assert e.field in FIELDS or e.field in raw
        assert e.message
        return
    assert isinstance(beacon, Beacon)
    assert beacon.type in EVENT_TYPES
    for text, limit in (
        (beacon.url, MAX_URL),
        (beacon.referrer, MAX_URL),
        (beacon.title, MAX_TITLE),
        (beacon.visitor or "", MAX_VISITOR),
    ):
        check_clean(text, limit)


@settings(max_examples=300)
@given(valid_beacons(), st.dictionaries(st.text(min_size=1, max_size=10), json_values, max_size=6))
def test_valid_beacons_are_accepted_and_unknown_fields_ignored(
    raw: dict[str, Any], extra: dict[str, Any]
) -> None:
    beacon = parse_beacon(raw)
    assert beacon.site == raw["site"]
    assert beacon.type == (raw.get("type") or "pageview")
    if "event_id" in raw:
        assert beacon.event_id == str(uuid.UUID(raw["event_id"]))
    if beacon.url:
        parts = urlsplit(beacon.url)
        assert parts.scheme.lower() in ("http", "https") and parts.hostname
    assert beacon.member == (raw.get("member") in (True, 1, "1", "true", "True", "TRUE"))
    unknown = {k: v for k, v in extra.items() if k not in (*KNOWN, "member_token")}
    try:
        with_extra = parse_beacon({**unknown, **raw})
    except BeaconError as e:  # only for being too deep or too big
        assert e.field in unknown and isinstance(unknown[e.field], dict | list)
        return
    assert with_extra == beacon


@given(nasty_text, st.integers(min_value=1, max_value=80))
def test_clean_is_idempotent_and_leaves_no_invisible_characters(text: str, limit: int) -> None:
    once = clean(text, limit)
    check_clean(once, limit)
    assert clean(once, limit) == once


def test_normalisation_examples() -> None:
    assert clean("  Tin\u00a0tức\u200b \u202eabc\x00 ", 100) == "Tin tức abc"
    assert clean("e\u0302\u0323", 10) == "ệ"  # NFC
    assert clean("x" * 20, 5) == "xxxxx"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({}, "site"),
        ({"site": "Dongha"}, "site"),
        ({"site": "dongha", "type": "click", "url": "https://a.vn/"}, "type"),
        ({"site": "dongha"}, "url"),
        ({"site": "dongha", "url": "   "}, "url"),
        ({"site": "dongha", "url": "javascript:alert(1)"}, "url"),
        ({"site": "dongha", "url": "//a.vn/x"}, "url"),
        ({"site": "dongha", "url": "https://a.vn/a b"}, "url"),
        ({"site": "dongha", "url": "https://a.vn/" + "x" * MAX_URL}, "url"),
        ({"site": "dongha", "url": "https://a.vn/", "referrer": "javascript:alert(1)"}, "referrer"),
        ({"site": "dongha", "url": "https://a.vn/", "referrer": "a.vn/x"}, "referrer"),
        ({"site": "dongha", "url": "https://a.vn/", "referrer": "1a://a.vn/"}, "referrer"),
        ({"site": "dongha", "url": "https://a.vn/", "referrer": "https://a.vn:x/"}, "referrer"),
        ({"site": "dongha", "url": "https://a.vn/", "member": "yes"}, "member"),
        ({"site": "dongha", "url": "https://a.vn/", "member": 2}, "member"),
        ({"site": "dongha", "url": "https://a.vn/", "member": "tRUE"}, "member"),
        ({"site": "dongha", "url": "https://a.vn/", "event_id": "not-a-uuid"}, "event_id"),
        ({"site": "dongha", "url": "https://a.vn/", "title": 5}, "title"),
        ({"site": "dongha", "url": "https://a.vn/", "visitor": "v" * 129}, "visitor"),
        ({"site": "dongha", "url": "https://a.vn/", "x": [[[[[1]]]]]}, "x"),
        ({"site": "dongha", "url": "https://a.vn/", "x": {"a": {"b": {"c": {"d": {}}}}}}, "x"),
        ({"site": "dongha", "url": "https://a.vn/", "x": list(range(MAX_KEYS + 1))}, "x"),
        ({"site": "dongha", **{f"k{i}": i for i in range(MAX_KEYS)}}, "body"),
    ],
)
def test_invalid_beacons_name_their_field(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(BeaconError) as e:
        parse_beacon(raw)
    assert e.value.field == field


@pytest.mark.parametrize(
    ("site", "message"),
    [
        (None, "site is required"),
        ("", "site is required"),
        (123, "site must be a string"),
        (True, "site must be a string"),
        ("Dongha", "site must match [a-z0-9][a-z0-9-]{0,63}"),
    ],
)
def test_a_bad_site_is_told_what_is_wrong(site: Any, message: str) -> None:
    with pytest.raises(BeaconError) as e:
        parse_beacon({"site": site, "url": "https://a.vn/"})
    assert (e.value.field, e.value.message) == ("site", message)


def test_nesting_within_bounds_is_ignored() -> None:
    nested: Any = 1
    for _ in range(MAX_DEPTH - 1):
        nested = [nested]
    beacon = parse_beacon({"site": "dongha", "url": "https://a.vn/", "x": [nested]})
    assert beacon.url == "https://a.vn/"


def test_accepted_forms() -> None:
    b = parse_beacon(
        {
            "site": "dongha",
            "type": None,
            "url": " https://Đông-Hà.vn/tin-tức?a=1#x ",
            "member": "1",
            "event_id": "{12345678-1234-5678-1234-567812345678}",
            "member_token": "",
        }
    )
    assert b.type == "pageview" and b.url == "https://Đông-Hà.vn/tin-tức?a=1"
    assert b.member and b.event_id == "12345678-1234-5678-1234-567812345678"
    assert b.member_token is None
    for referrer in ("android-app://com.google.android.gm/", "ftp://a.vn/x", "HTTPS://a.vn"):
        b = parse_beacon({"site": "dongha", "url": "https://a.vn/", "referrer": referrer})
        assert b.referrer == referrer  # any absolute URL with a host


@pytest.mark.parametrize(
    ("url", "referrer", "kept"),
    [
        # a user:password in an address is not the page
        (
            "https://user:secretpw@example.org/x?q=a@b",
            "https://u:refpw@r.example/@home",
            ("https://example.org/x?q=a@b", "https://r.example/@home"),
        ),
        # an @ after the host is the page's own
        (
            "https://example.org/@user?mail=a@b.vn",
            "",
            ("https://example.org/@user?mail=a@b.vn", ""),
        ),
        # what follows # never reaches a server from a browser, and may be a token
        (
            "https://a.vn/tin?id=7#access_token=tok3n&x=1",
            "https://a.vn/login#otp=999999",
            ("https://a.vn/tin?id=7", "https://a.vn/login"),
        ),
        ("https://u:pw@a.vn/#/route@x", "", ("https://a.vn/", "")),
    ],
)
def test_what_is_not_the_page_is_never_kept(url: str, referrer: str, kept: tuple[str, str]) -> None:
    b = parse_beacon({"site": "dongha", "url": url, "referrer": referrer})
    assert (b.url, b.referrer) == kept


@settings(max_examples=500)
@given(st.text(alphabet="ab=&+%2F0x;é \u00a0", max_size=30))
def test_query_fields_read_as_parse_qsl(query: str) -> None:
    try:
        expected: list[tuple[str, str]] | str = parse_qsl(
            query, keep_blank_values=True, max_num_fields=MAX_KEYS
        )
    except ValueError:
        expected = "too many"
    try:
        got: list[tuple[str, str]] | str = query_fields(query)
    except BeaconError as e:
        assert e.field == "query"
        got = "too many"
    assert got == expected


@settings(max_examples=500)
@given(st.text(alphabet="%+=&0123456789abcdefABCDEFgxyz ~é", max_size=40))
def test_a_fields_escapes_decode_as_unquote_plus(text: str) -> None:
    assert _unquote_plus(text) == unquote_plus(text)


def test_query_fields_refuse_too_many() -> None:
    with pytest.raises(BeaconError) as err:
        query_fields("&".join(f"k{i}=1" for i in range(MAX_KEYS + 1)))
    assert err.value.field == "query"
    assert len(query_fields("&".join(f"k{i}=1" for i in range(MAX_KEYS)))) == MAX_KEYS


def _urlsplit_problem(value: str, web: bool) -> str | None:
    """What ``_problem`` finds, by ``urlsplit`` alone (what it did before its fast path)."""
    if " " in value:
        return "must not contain white space"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018
        host = parts.hostname
    except ValueError:
        return "is not a valid URL"
    if web and (parts.scheme.lower() not in ("http", "https") or not host):
        return "must be an absolute http(s) URL"
    if not web and not (re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", parts.scheme) and host):
        return "must be an absolute URL"
    return None


url_pieces = st.sampled_from(
    [
        *("http", "HTTPS", "hTtP", "ftp", "a+b", "1x", "://", ":", "/", "//", "?", "#", "[", "]"),
        *("@", ".", "-", "%", "+", "a", "Z", "9", "\u00e9", "\t", " ", "\x00", "ex.com", ":80"),
        *(":99999", "[::1]", "\u2100", "\uff41"),
    ]
)


@settings(max_examples=1000)
@given(
    st.sampled_from(["", "http://", "https://", "HTTP://", "android-app://", "ftp://"]),
    st.lists(url_pieces, max_size=8).map("".join),
    st.booleans(),
)
@example("https://", "a.vn:99999/", True)
@example("http://", "[::1]/", False)
def test_url_checks_agree_with_urlsplit(prefix: str, rest: str, web: bool) -> None:
    value = prefix + rest
    assert _problem(value, web=web) == _urlsplit_problem(value, web)
