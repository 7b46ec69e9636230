"""Property-based fuzzing of both ingest endpoints, over HTTP, on the real app factory
(``create_ingest_app``) with the standalone ``LocalPublisher`` (no broker is mocked: the
in-process hand-off is the product's own).

Whatever is sent: never a 5xx; every answer's status is one the OpenAPI document lists for the
operation; every refusal is a JSON ``{"error", "field"}``; a refused beacon publishes nothing
(so it can change no count), an accepted one publishes exactly one record, and no record holds
the client's address or User-Agent.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from services import http, openapi
from services.ingest.publish import LocalPublisher
from services.ingest.publish_types import OutRecord
from services.ingest.service import create_ingest_app
from services.settings import Settings, parse_networks
from services.sites import Registry
from tests.support.tansu import free_port

pytestmark = pytest.mark.integration

SITES = """
[sites.open]
timezone = "UTC"

[sites.locked]
origins = ["https://portal.example.vn"]
timezone = "UTC"
"""
REGISTRY = Registry.parse(SITES)
UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36"
CLIENT = "203.0.113.77"
DOC = openapi.document()


def documented(path: str, method: str) -> set[int]:
    return {int(s) for s in DOC["paths"][path][method]["responses"]}


class Client:
    """An HTTP client of the real server (``services.http.start_server``, as ``serve`` runs it:
    the same connection handler and limits) around the app."""

    def __init__(self, runner: web.AppRunner, base: str) -> None:
        self.runner, self.base = runner, base
        self.session = aiohttp.ClientSession(auto_decompress=False)

    def post(self, path: str, **kw: Any) -> Any:
        return self.session.post(self.base + path, **kw)

    def get(self, path: str, **kw: Any) -> Any:
        return self.session.get(self.base + path, **kw)

    def head(self, path: str, **kw: Any) -> Any:
        return self.session.head(self.base + path, **kw)

    async def close(self) -> None:
        await self.session.close()
        await self.runner.cleanup()


@dataclass
class Ingest:
    client: Client
    records: list[OutRecord] = field(default_factory=list)


async def start(tmp_path: Path, **overrides: Any) -> tuple[Client, list[OutRecord]]:
    records: list[OutRecord] = []
    s = replace(Settings(), secret=b"k", data_dir=tmp_path, port=free_port(), **overrides)
    app = create_ingest_app(s, REGISTRY, LocalPublisher(records.append))
    runner = await http.start_server(app, s)
    return Client(runner, f"http://127.0.0.1:{s.port}"), records


@pytest.fixture
async def ingest(tmp_path: Path) -> AsyncIterator[Ingest]:
    # no rate limit here: the fuzzer is one client sending as fast as it can
    client, records = await start(tmp_path, rate_limit_per_second=0)
    try:
        yield Ingest(client, records)
    finally:
        await client.close()


async def check(
    ingest: Ingest, path: str, method: str, sent: int, resp: Any, body: bytes, fuzz: bool = False
) -> int:
    status: int = resp.status
    if fuzz:
        event(f"{path} {status}" + (f" {json.loads(body)['field']}" if status == 400 else ""))
    assert status < 500, (status, body)
    assert status in documented(path, method), (status, body)
    published = len(ingest.records) - sent
    if status == 202:
        assert published == 1
        value = ingest.records[-1].value + ingest.records[-1].key
        assert CLIENT.encode() not in value and b"Chrome/126" not in value
    else:
        assert published == 0, "a refused beacon was published"
        error = json.loads(body)
        assert set(error) == {"error", "field"} and error["error"]
        if status == 400:
            assert error["field"]
    return status


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
fields = st.sampled_from(
    ["site", "type", "url", "referrer", "title", "member", "event_id", "visitor", "member_token"]
)
good_values: dict[str, st.SearchStrategy[Any]] = {
    "site": st.sampled_from(["open", "locked", "nope", "Open", ""]),
    "type": st.sampled_from(["pageview", "heartbeat", "leave", "", "click"]),
    "url": st.sampled_from(["https://portal.example.vn/a", "http://x.vn/?q=đ", "ftp://x", "x"]),
    "member": st.sampled_from([True, False, 1, "1", "true", "yes"]),
    "event_id": st.uuids().map(str),
}
beacons = st.dictionaries(
    fields | st.text(max_size=8),
    json_values,
    max_size=10,
).flatmap(
    lambda raw: (
        st.fixed_dictionaries(
            {k: v for k, v in good_values.items() if k in raw or k in ("site", "url")}
        ).map(lambda good: {**raw, **good})
        | st.just(raw)
    )
)
bodies = (
    beacons.map(lambda b: json.dumps(b, allow_nan=True).encode())
    | beacons.map(lambda b: json.dumps(b, allow_nan=True).encode())
    | st.binary(max_size=300)
    | st.text(max_size=200).map(str.encode)
    | st.integers(min_value=1, max_value=40).map(lambda n: b"[" * n * 40 + b"]" * n * 40)
    | st.integers(min_value=8000, max_value=9000).map(
        lambda n: b'{"site":"open","url":"https://a.vn/","x":"' + b"a" * n + b'"}'
    )
)
content_types = st.sampled_from(
    ["text/plain"] * 4
    + ["application/json"] * 3
    + ["text/plain; charset=utf-8", "text/html", "a/b"]
)
some_headers = st.fixed_dictionaries(
    {},
    optional={
        "Origin": st.sampled_from(["https://portal.example.vn", "https://evil.example", "null"]),
        "Referer": st.sampled_from(["https://portal.example.vn/x", "https://evil.example/", "::"]),
        "DNT": st.sampled_from(["1", "0"]),
        "Content-Encoding": st.sampled_from(["gzip", "identity", "br"]),
    },
)
headers = st.just({}) | st.just({"Origin": "https://portal.example.vn"}) | some_headers


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=bodies, ctype=content_types, extra=headers)
@example(body=b'{"site":"open","url":"https://a.vn/","a":NaN}', ctype="text/plain", extra={})
@example(body=b'{"site":"open","url":"https://a.vn/","n":1e999}', ctype="text/plain", extra={})
@example(body=b'{"site":"open","url":"https://a.vn/\xff"}', ctype="text/plain", extra={})
@example(
    body=b'{"site":"open","url":"https://a.vn/","member_token":"1.\\u00e9"}',
    ctype="text/plain",
    extra={},
)
@example(body=b"\xef\xbb\xbf{}", ctype="application/json", extra={})
async def test_collect_never_fails_and_publishes_only_what_it_accepts(
    ingest: Ingest, body: bytes, ctype: str, extra: dict[str, str]
) -> None:
    sent = len(ingest.records)
    resp = await ingest.client.post(
        "/collect",
        data=body,
        headers={
            "Content-Type": ctype,
            "User-Agent": UA,
            "X-Forwarded-For": CLIENT,
            **extra,
        },
    )
    await check(ingest, "/collect", "post", sent, resp, await resp.read(), fuzz=True)


query_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
pixel_base = st.fixed_dictionaries(
    {"site": st.sampled_from(["open", "locked", "nope"])},
    optional={
        "url": st.sampled_from(
            ["https://portal.example.vn/", "http://x.vn/đ", "https://a.vn/%FF%ZZ%E1%BB"]
        )
        | query_text
    },
)
raw_pieces = st.sampled_from(["%", "%F", "%FF", "%ZZ", "%00", "%E1%BB", "&", "=", ";", "+", "#"])


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    base=pixel_base
    | pixel_base
    | st.fixed_dictionaries({}, optional={"site": query_text, "url": query_text}),
    params=st.lists(st.tuples(st.text(max_size=6), query_text), max_size=6)
    | st.lists(st.tuples(fields, query_text), max_size=3),
    junk=st.lists(raw_pieces, max_size=3),
    extra=headers,
)
@example(base={}, params=[("site", "open"), ("site", "open")], junk=[], extra={})
@example(base={"site": "open", "url": "https://a.vn/"}, params=[], junk=["%FF"], extra={})
@example(base={"site": "open", "url": "https://a.vn/"}, params=[("x", "1")] * 70, junk=[], extra={})
async def test_the_pixel_never_fails_and_publishes_only_what_it_accepts(
    ingest: Ingest,
    base: dict[str, str],
    params: list[tuple[str, str]],
    junk: list[str],
    extra: dict[str, str],
) -> None:
    pairs = [*base.items(), *params]
    # values are sent percent-encoded, except for the % of made-up (maybe bad) escapes
    query = "".join(junk) + "&"
    query += "&".join(f"{quote(k, safe='')}={quote(v, safe='%')}" for k, v in pairs)
    sent = len(ingest.records)
    resp = await ingest.client.get(
        "/collect.gif?" + query,
        headers={"User-Agent": UA, "X-Forwarded-For": CLIENT, **extra},
        skip_auto_headers=["Content-Type"],
    )
    status = await check(ingest, "/collect.gif", "get", sent, resp, await resp.read(), fuzz=True)
    if status == 202:
        assert resp.content_type == "image/gif"


async def test_hostile_headers_are_text_not_a_crash(ingest: Ingest) -> None:
    """Header bytes that are not UTF-8 reach the handlers as lone surrogates."""
    for name, value in [
        ("User-Agent", "Mozilla/5.0 \udcff\udcfe"),
        ("X-Forwarded-For", "\udcff, 1.2.3.4"),
        ("Referer", "https://\udcff/"),
        ("Origin", "\udcff"),
    ]:
        sent = len(ingest.records)
        resp = await ingest.client.get(
            "/collect.gif?site=open&url=https://a.vn/",
            headers={
                "User-Agent": UA,
                name: value.encode("utf-8", "surrogateescape").decode("latin-1"),
            },
        )
        await check(ingest, "/collect.gif", "get", sent, resp, await resp.read())


async def test_a_lone_surrogate_escape_is_dropped_not_the_beacon(ingest: Ingest) -> None:
    """JSON.stringify writes half of a character cut in two as an escape (``\\ud83d``), which
    orjson refuses: the beacon is read again, and the half is dropped from its field."""
    for title, kept in (
        ("Tin t\\u1ee9c \\ud83d", "Tin tức"),
        ("\\uDE00x", "x"),
        ("\\ud83d\\ude00 ok", "\U0001f600 ok"),
    ):
        sent = len(ingest.records)
        body = f'{{"site":"open","url":"https://a.vn/","title":"{title}"}}'.encode()
        resp = await ingest.client.post(
            "/collect", data=body, headers={"Content-Type": "text/plain", "User-Agent": UA}
        )
        assert await check(ingest, "/collect", "post", sent, resp, await resp.read()) == 202
        assert json.loads(ingest.records[-1].value)["title"] == kept
    for body in (
        b'{"site":"op\\ud800en","url":"https://a.vn/"}',  # the site is not a site id
        b'{"site":"open","url":"https://a.vn/","title":"\\ud83d","n":NaN}',  # still not JSON
        b'{"site":"open","url":"https://a.vn/","title":"\\ud83d","n":1e999}',  # nor this
        b'{"site":"open","url":"https://a.vn/","title":"\\ud83d"',  # nor this
        b"[" * 3000 + b'"\\ud83d"' + b"]" * 3000,  # nor this (too deep)
    ):
        sent = len(ingest.records)
        resp = await ingest.client.post(
            "/collect", data=body, headers={"Content-Type": "text/plain", "User-Agent": UA}
        )
        assert await check(ingest, "/collect", "post", sent, resp, await resp.read()) == 400


async def test_a_byte_order_mark_before_the_json_is_read_past(ingest: Ingest) -> None:
    """Some server-side clients begin UTF-8 with a byte order mark; RFC 8259 lets a reader
    ignore it (an outside audit saw such a beacon refused as not JSON). Only at the start."""
    bom = b"\xef\xbb\xbf"
    for body, status in (
        (bom + b'{"site":"open","url":"https://a.vn/","title":"Tin t\xe1\xbb\xa9c"}', 202),
        (bom + b'{"site":"open","url":"https://a.vn/","title":"\\ud83d x"}', 202),
        (bom, 400),
        (bom + bom + b'{"site":"open","url":"https://a.vn/"}', 400),
        (b'{"site":"open",' + bom + b'"url":"https://a.vn/"}', 400),
    ):
        sent = len(ingest.records)
        resp = await ingest.client.post(
            "/collect", data=body, headers={"Content-Type": "text/plain", "User-Agent": UA}
        )
        assert await check(ingest, "/collect", "post", sent, resp, await resp.read()) == status
        if status == 202:
            assert json.loads(ingest.records[-1].value)["title"] in ("Tin tức", "x")


async def test_expect_100_continue_is_refused_at_once_for_a_body_that_would_be(
    ingest: Ingest,
) -> None:
    port = int(ingest.client.base.rsplit(":", 1)[1])
    body = b'{"site":"open","url":"https://portal.example.vn/"}'
    for head, first in (
        ("Content-Type: text/plain\r\nContent-Length: 9000", b"HTTP/1.1 413 "),
        ("Content-Type: text/html\r\nContent-Length: 10", b"HTTP/1.1 415 "),
        (f"Content-Type: text/plain\r\nContent-Length: {len(body)}", b"HTTP/1.1 100 Continue"),
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"POST /collect HTTP/1.1\r\nHost: x\r\nUser-Agent: {UA}\r\n{head}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        line = await asyncio.wait_for(reader.readline(), 5)
        assert line.startswith(first), (head, line)
        if first.endswith(b"Continue"):  # then the body, and the beacon is taken
            await reader.readline()
            writer.write(body)
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 202 ")
        writer.close()
    assert len(ingest.records) == 1


async def test_a_head_request_is_not_a_page_view(ingest: Ingest) -> None:
    resp = await ingest.client.head("/collect.gif?site=open&url=https://a.vn/")
    assert resp.status == 200 and resp.headers["Content-Type"] == "image/gif"
    assert not ingest.records


async def test_x_forwarded_for_counts_only_from_a_trusted_proxy(tmp_path: Path) -> None:
    """The test client connects from 127.0.0.1. When that is not a trusted proxy, a client that
    makes up a new X-Forwarded-For (and User-Agent, visitor and event id) for every beacon is
    still one client: it gets its burst and then 429 with Retry-After."""
    client, records = await start(
        tmp_path,
        rate_limit_per_second=1,
        rate_limit_burst=5,
        trusted_proxies=parse_networks("192.0.2.1/32"),
    )
    try:
        statuses = []
        retry_after = set()
        for i in range(30):
            resp = await client.post(
                "/collect",
                data=json.dumps(
                    {
                        "site": "open",
                        "url": "https://a.vn/",
                        "visitor": f"v{i}",
                        "event_id": str(uuid.uuid4()),
                    }
                ),
                headers={
                    "Content-Type": "text/plain",
                    "User-Agent": f"Mozilla/5.0 Chrome/{i}",
                    "X-Forwarded-For": f"198.51.100.{i}",
                },
            )
            statuses.append(resp.status)
            if resp.status == 429:
                retry_after.add(resp.headers["Retry-After"])
                assert (await resp.json())["error"]
        # 5 in the burst, at most a few more refilled while the loop ran (1/s)
        assert statuses[:5] == [202] * 5 and statuses.count(429) >= 20
        assert len(records) == statuses.count(202)
        assert retry_after and all(v.isdigit() and int(v) >= 1 for v in retry_after)
    finally:
        await client.close()


async def test_origins_are_checked_for_both_endpoints(ingest: Ingest) -> None:
    body = json.dumps({"site": "locked", "url": "https://portal.example.vn/"})
    cases = [
        ({"Origin": "https://portal.example.vn"}, 202),
        ({"Origin": "https://PORTAL.example.vn/"}, 202),
        ({"Origin": "https://portal.example.vn:443"}, 202),  # the default port: the same origin
        ({"Referer": "https://portal.example.vn:443/tin-tuc"}, 202),
        ({"Origin": "https://portal.example.vn:8443"}, 403),
        ({"Referer": "https://portal.example.vn/tin-tuc?id=1"}, 202),
        ({"Origin": "null", "Referer": "https://portal.example.vn/"}, 202),
        ({"Origin": "https://evil.example"}, 403),
        ({"Origin": "https://evil.example", "Referer": "https://portal.example.vn/"}, 403),
        ({"Referer": "https://portal.example.vn.evil.example/"}, 403),
        ({"Origin": "http://portal.example.vn"}, 403),
        ({}, 403),
    ]
    for extra, want in cases:
        sent = len(ingest.records)
        h = {"User-Agent": UA, "Content-Type": "text/plain", **extra}
        resp = await ingest.client.post("/collect", data=body, headers=h)
        assert resp.status == want, extra
        await check(ingest, "/collect", "post", sent, resp, await resp.read())
        sent = len(ingest.records)
        resp = await ingest.client.get(
            "/collect.gif?site=locked&url=https%3A%2F%2Fportal.example.vn%2F", headers=h
        )
        assert resp.status == want, ("pixel", extra)
        await check(ingest, "/collect.gif", "get", sent, resp, await resp.read())
        if want == 403:
            assert (await resp.json())["field"] == "origin"


async def test_slow_body_gets_408_and_nothing_is_published(tmp_path: Path) -> None:
    client, records = await start(tmp_path, read_timeout_seconds=0.5)

    async def trickle() -> AsyncIterator[bytes]:
        yield b'{"site":"open",'
        await asyncio.sleep(3)
        yield b'"url":"https://a.vn/"}'

    try:
        resp = await client.post(
            "/collect", data=trickle(), headers={"Content-Type": "text/plain", "User-Agent": UA}
        )
        assert resp.status == 408 and (await resp.json())["field"] == "body"
        assert not records
    finally:
        await client.close()
