"""The fast lane (``services/fastlane.py``) in front of the real ingest server: what it answers
itself, what it hands to aiohttp, and that both give the same answers and records.

Raw sockets, because the lane is about bytes on a connection: pipelined requests, heads split
across writes, odd framing. The publisher is the standalone ``LocalPublisher`` (the product's
in-process hand-off), so every record a request produced is in ``records``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY as PROMETHEUS

from services import http
from services.ingest.publish import LocalPublisher
from services.ingest.publish_types import OutRecord
from services.ingest.service import create_ingest_app
from services.settings import Settings
from services.sites import Registry
from services.standalone import create_standalone_app
from tests.support.tansu import Tansu, count_records, create_topic, free_port

pytestmark = pytest.mark.integration

REGISTRY = Registry.parse('[sites.open]\ntimezone = "UTC"\n')
UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36"


@dataclass
class Server:
    runner: web.AppRunner
    port: int
    records: list[OutRecord]

    async def exchange(self, *writes: bytes, pause: float = 0.05, until: int = 1) -> bytes:
        """Send ``writes`` on one connection (``pause`` between them) and read until ``until``
        answers have arrived or the server closes."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            for i, chunk in enumerate(writes):
                if i:
                    await asyncio.sleep(pause)
                writer.write(chunk)
                await writer.drain()
            return await read_answers(reader, until)
        finally:
            writer.close()


async def read_answers(reader: asyncio.StreamReader, count: int, timeout: float = 10) -> bytes:
    data = b""
    async with asyncio.timeout(timeout):
        while len(split_answers(data)) < count:
            chunk = await reader.read(65536)
            if not chunk:
                break
            data += chunk
    return data


def split_answers(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """HTTP/1.1 answers with a Content-Length, in order: (status, headers, body)."""
    answers = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            break
        lines = data[:end].decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        if len(data) < end + 4 + length:
            break
        status = int(lines[0].split(" ")[1])
        if status != 100:
            answers.append((status, headers, data[end + 4 : end + 4 + length]))
        data = data[end + 4 + length :]
    return answers


def by_aiohttp(answer: tuple[int, dict[str, str], bytes]) -> bool:
    """aiohttp's answers carry ``Server`` (naming no versions); the lane's, no such header."""
    return "server" in answer[1]


def beacon_body(**fields: Any) -> bytes:
    return json.dumps(
        {"site": "open", "type": "pageview", "url": "https://a.vn/x", **fields}, ensure_ascii=False
    ).encode()


def post(body: bytes, *extra: str, client: str = "198.51.100.7") -> bytes:
    head = [
        "POST /collect HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: text/plain;charset=UTF-8",
        f"User-Agent: {UA}",
        f"X-Forwarded-For: {client}",
        f"Content-Length: {len(body)}",
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def pixel(query: str, *extra: str, client: str = "198.51.100.7") -> bytes:
    head = [
        f"GET /collect.gif?{query} HTTP/1.1",
        "Host: 127.0.0.1",
        f"User-Agent: {UA}",
        f"X-Forwarded-For: {client}",
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode()


HEALTH = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    return replace(Settings(), secret=b"k", data_dir=tmp_path, port=free_port(), **overrides)


async def start(tmp_path: Path, **overrides: Any) -> Server:
    records: list[OutRecord] = []
    s = settings_for(tmp_path, **{"rate_limit_per_second": 0, **overrides})
    app = create_ingest_app(s, REGISTRY, LocalPublisher(records.append))
    runner = await http.start_server(app, s)
    return Server(runner, s.port, records)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    srv = await start(tmp_path)
    try:
        yield srv
    finally:
        await srv.runner.cleanup()


def event(record: OutRecord) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(record.value)
    return value


async def test_pipelined_beacons_are_answered_in_order(server: Server) -> None:
    bodies = [beacon_body(url=f"https://a.vn/{i}") for i in range(3)]
    data = await server.exchange(b"".join(post(b) for b in bodies), until=3)
    answers = split_answers(data)
    assert [a[0] for a in answers] == [202, 202, 202]
    assert all(a[2] == b'{"status":"accepted"}' for a in answers)
    assert not any(by_aiohttp(a) for a in answers)  # the lane answered all three
    assert [event(r)["url"] for r in server.records] == [f"https://a.vn/{i}" for i in range(3)]


async def test_a_request_the_lane_does_not_take_hands_the_connection_over(
    server: Server,
) -> None:
    # beacon, health check, beacon: all in one write; the last two are aiohttp's
    data = await server.exchange(
        post(beacon_body(url="https://a.vn/1")) + HEALTH + pixel("site=open&url=https://a.vn/2"),
        until=3,
    )
    answers = split_answers(data)
    assert [a[0] for a in answers] == [202, 200, 202]
    assert [by_aiohttp(a) for a in answers] == [False, True, True]
    assert json.loads(answers[1][2]) == {"status": "ok"}
    assert answers[2][1]["content-type"] == "image/gif"
    assert [event(r)["url"] for r in server.records] == ["https://a.vn/1", "https://a.vn/2"]


async def test_split_heads_and_bodies_are_read_by_aiohttp(server: Server) -> None:
    request = post(beacon_body(url="https://a.vn/split"))
    cut_head, cut_body = request.index(b"User-Agent"), len(request) - 5
    for first, second in ((request[:cut_head], request[cut_head:]), (request[:cut_body], b"")):
        chunks = (first, second or request[cut_body:])
        answers = split_answers(await server.exchange(*chunks))
        assert [a[0] for a in answers] == [202]
        assert by_aiohttp(answers[0])
    assert [event(r)["url"] for r in server.records] == ["https://a.vn/split"] * 2


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        # two Content-Lengths, even equal ones: refused, whoever parses it
        (post(beacon_body(), "Content-Length: 45"), 400),
        # a header line folded onto the next (obsolete), a bare LF, a NUL in a value
        (post(beacon_body(), "X-A: 1\r\n folded"), 400),
        (post(beacon_body()).replace(b"Host: 127.0.0.1\r\n", b"Host: 127.0.0.1\n"), 400),
        (post(beacon_body()).replace(b"Host: 127.0.0.1", b"Host: 127.0\x00.0.1"), 400),
        # space before the colon
        (post(beacon_body()).replace(b"Host:", b"Host :"), 400),
        # a header that aiohttp takes once only, twice (an outside audit: the lane took the
        # first, aiohttp refused it)
        (post(beacon_body(), "Content-Type: text/html"), 400),
        (post(beacon_body(), "User-Agent: curl/8"), 400),
        (post(beacon_body(), "Host: elsewhere"), 400),
        (pixel("site=open&url=https%3A%2F%2Fa.vn%2F", "user-agent: curl/8"), 400),
    ],
)
async def test_odd_framing_goes_to_aiohttp_and_counts_nothing(
    server: Server, request_bytes: bytes, status: int
) -> None:
    before = malformed_requests()
    answers = split_answers(await server.exchange(request_bytes))
    assert [a[0] for a in answers] == [status]
    assert server.records == []
    # not a beacon, but a request refused: counted (the endpoint it was for is not known)
    assert malformed_requests() == before + 1
    assert answers[0][1]["x-content-type-options"] == "nosniff"
    assert answers[0][1]["access-control-allow-origin"] == "*"


def test_the_headers_taken_once_are_aiohttps() -> None:
    from aiohttp.http_parser import SINGLETON_HEADERS

    from services.fastlane import SINGLE_HEADERS

    assert {str(h).lower() for h in SINGLETON_HEADERS} - SINGLE_HEADERS == {
        "content-length",
        "transfer-encoding",
    }


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9"])
async def test_a_version_other_than_http_1_gets_505_and_counts_nothing(
    server: Server, version: bytes
) -> None:
    """aiohttp's parser takes these: they are refused, in HTTP/1.1, and the connection closed
    (an outside audit saw them counted, answered ``HTTP/2.0 202``)."""
    request = post(beacon_body()).replace(b" HTTP/1.1\r\n", b" " + version + b"\r\n", 1)
    data = await server.exchange(request, until=2)  # (closed after one)
    assert data.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n"), data[:80]
    answers = split_answers(data)
    assert [a[0] for a in answers] == [505]
    assert json.loads(answers[0][2])["error"] == "only HTTP/1.0 and HTTP/1.1 are served"
    assert answers[0][1]["server"] == "visitorstats"
    assert answers[0][1]["connection"] == "close"
    assert server.records == []


@pytest.mark.parametrize("version", [b"HTTP/1.2", b"HTTP/3.0", b"HTTP/11.1", b"HTTPS/1.1"])
async def test_a_version_the_parser_does_not_know_is_malformed(
    server: Server, version: bytes
) -> None:
    request = post(beacon_body()).replace(b" HTTP/1.1\r\n", b" " + version + b"\r\n", 1)
    answers = split_answers(await server.exchange(request, until=2))
    assert [a[0] for a in answers] == [400]
    assert json.loads(answers[0][2])["field"] == "request"
    assert server.records == []


async def test_http_1_0_is_served(server: Server) -> None:
    request = post(beacon_body()).replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
    answers = split_answers(await server.exchange(request))
    assert [a[0] for a in answers] == [202]
    assert len(server.records) == 1


def malformed_requests() -> float:
    labels = {"endpoint": "unknown", "outcome": "malformed"}
    return PROMETHEUS.get_sample_value("visitorstats_ingest_requests_total", labels) or 0.0


async def test_chunked_and_expect_continue_beacons_are_served_by_aiohttp(server: Server) -> None:
    body = beacon_body(url="https://a.vn/chunked")
    chunked = post(b"", "Transfer-Encoding: chunked").replace(b"Content-Length: 0\r\n", b"")
    chunked += b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    assert [a[0] for a in split_answers(await server.exchange(chunked))] == [202]
    expect = post(beacon_body(url="https://a.vn/expect"), "Expect: 100-continue")
    head, _, rest = expect.partition(b"\r\n\r\n")
    answers = split_answers(await server.exchange(head + b"\r\n\r\n", rest))
    assert [a[0] for a in answers] == [202]
    assert [event(r)["url"] for r in server.records] == [
        "https://a.vn/chunked",
        "https://a.vn/expect",
    ]


async def test_connection_close_is_honoured(server: Server) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(post(beacon_body(), "Connection: close"))
    data = await asyncio.wait_for(reader.read(), 10)  # read() returns at the server's close
    writer.close()
    (answer,) = split_answers(data)
    assert answer[0] == 202
    assert answer[1]["connection"] == "close"


async def test_answers_carry_date_length_and_cors(server: Server) -> None:
    (answer,) = split_answers(await server.exchange(pixel("site=open&url=https://a.vn/")))
    status, headers, body = answer
    assert status == 202 and body.startswith(b"GIF89a")
    assert headers["content-length"] == str(len(body))
    assert headers["cache-control"] == "no-store"
    assert headers["access-control-allow-origin"] == "*"
    assert abs(time.mktime(time.strptime(headers["date"], "%a, %d %b %Y %H:%M:%S GMT"))
               - time.mktime(time.gmtime())) < 5  # fmt: skip


async def test_refusals_in_the_lane_are_json_naming_the_field(server: Server) -> None:
    answers = split_answers(
        await server.exchange(
            post(b'{"site":"open","type":"pageview"}')
            + post(beacon_body(site="nope"))
            + post(beacon_body(), "Content-Encoding: gzip")
            + pixel("site=open&url=https://a.vn/&type=x&type=y"),
            until=4,
        )
    )
    assert [(a[0], json.loads(a[2])["field"]) for a in answers] == [
        (400, "url"),
        (403, "site"),
        (415, "content-encoding"),
        (400, "type"),
    ]
    assert all(a[1]["access-control-allow-origin"] == "*" for a in answers)
    assert server.records == []


async def test_forwarded_for_lines_are_joined(server: Server) -> None:
    # loopback is a trusted proxy by default; two lines = one comma-separated list
    one_line = post(beacon_body(), client="203.0.113.9, 127.0.0.1")
    two_lines = post(beacon_body(), "X-Forwarded-For: 127.0.0.1", client="203.0.113.9")
    direct = post(beacon_body(), client="203.0.113.9")
    await server.exchange(one_line + two_lines + direct, until=3)
    assert len({event(r)["visitor"] for r in server.records}) == 1


async def test_idle_lane_connections_are_closed(tmp_path: Path) -> None:
    srv = await start(tmp_path, read_timeout_seconds=0.6)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(post(beacon_body()))
        await read_answers(reader, 1)
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
        assert time.monotonic() - started < 5
        writer.close()
    finally:
        await srv.runner.cleanup()


async def test_lane_connections_count_at_the_gate(tmp_path: Path) -> None:
    srv = await start(tmp_path, max_connections=2)
    try:
        conns = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(2)]
        for reader, writer in conns:  # both in the lane, idle after their answer
            writer.write(post(beacon_body()))
            assert [a[0] for a in split_answers(await read_answers(reader, 1))] == [202]
        # a third connection takes the place of the oldest idle one
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(post(beacon_body()))
        assert [a[0] for a in split_answers(await read_answers(reader, 1))] == [202]
        assert await asyncio.wait_for(conns[0][0].read(), 10) == b""
        writer.close()
        for _, w in conns:
            w.close()
    finally:
        await srv.runner.cleanup()


# -- the lane and aiohttp answer alike --------------------------------------------------------

_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
_fields = st.fixed_dictionaries(
    {},
    optional={
        "site": st.sampled_from(["open", "nope", "", "OPEN"]),
        "type": st.sampled_from(["pageview", "heartbeat", "leave", "", "other"]),
        "url": st.sampled_from(["https://a.vn/p", "http://a.vn", "ftp://a.vn/", "", "x y"]),
        "referrer": st.sampled_from(["https://b.vn/", "", "nope"]),
        "title": _text,
        "member": st.sampled_from(["1", "0", "true", "", "2"]),
        "event_id": st.sampled_from(["", "nope", "8c1e7a7e-5b4b-4e5e-9b0e-6f1f0c2d3e4f"]),
        "visitor": _text,
        "x": _text,
    },
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    fields=_fields,
    as_pixel=st.booleans(),
    # what a header value can carry (controls make the head malformed: aiohttp's 400 alone)
    ua=st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=40),
)
# accepted, so both ways publish a record (a bot's: no User-Agent), compared field by field
@example(fields={"site": "open", "type": "heartbeat"}, as_pixel=False, ua="")
@example(fields={"site": "open", "url": "https://x.vn/a"}, as_pixel=True, ua=UA)
async def test_the_lane_answers_as_aiohttp_does(
    server: Server, fields: dict[str, str], as_pixel: bool, ua: str
) -> None:
    ua_header = f"User-Agent: {ua}".encode()
    if as_pixel:
        query = "&".join(f"{quote(k)}={quote(v)}" for k, v in fields.items())
        request = pixel(query).replace(f"User-Agent: {UA}".encode(), ua_header)
    else:
        request = post(json.dumps(fields).encode()).replace(f"User-Agent: {UA}".encode(), ua_header)
    # the lane: the whole request in one write; aiohttp: the head cut in two (the lane hands
    # over any request whose head is not complete)
    cut = request.index(b"\r\n") + 2
    lane = split_answers(await server.exchange(request))
    lane_records = [event(r) for r in server.records]
    server.records.clear()
    full = split_answers(await server.exchange(request[:cut], request[cut:]))
    full_records = [event(r) for r in server.records]
    server.records.clear()
    assert [(s, b) for s, _, b in lane] == [(s, b) for s, _, b in full]
    assert not any(map(by_aiohttp, lane)) and all(map(by_aiohttp, full))
    # (the two were accepted at different times, each with an id of its own)
    assert [{**r, "ts": 0, "ts_us": 0, "event_id": ""} for r in lane_records] == [
        {**r, "ts": 0, "ts_us": 0, "event_id": ""} for r in full_records
    ]
    for (_, lane_headers, _), (_, full_headers, _) in zip(lane, full, strict=True):
        for name in ("content-type", "access-control-allow-origin", "cache-control"):
            assert lane_headers.get(name) == full_headers.get(name)


async def test_the_counter_in_the_lane_answers_as_aiohttp_does(tmp_path: Path) -> None:
    """``GET /v1/sites/{site}/counter`` of ``visitorstats run``: lane and aiohttp give the same
    body, ETag, caching and CORS headers, and both honour If-None-Match."""
    s = settings_for(tmp_path)
    app = create_standalone_app(s, REGISTRY)
    runner = await http.start_server(app, s)
    srv = Server(runner, s.port, [])
    try:
        get = b"GET /v1/sites/open/counter HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        async with asyncio.timeout(30):
            while True:  # the first snapshot takes a moment
                (lane,) = split_answers(await srv.exchange(get))
                if lane[0] == 200:
                    break
                assert lane[0] == 503
                await asyncio.sleep(0.2)
        for _ in range(20):  # a refresh between the two (a new as_of, a new ETag): again
            (lane,) = split_answers(await srv.exchange(get))
            (full,) = split_answers(await srv.exchange(get[:10], get[10:]))
            if lane[1]["etag"] == full[1]["etag"]:
                break
        assert not by_aiohttp(lane) and by_aiohttp(full)
        assert lane[0] == full[0] == 200
        # the same numbers (a refresh with the same numbers keeps the ETag, not the as_of)
        assert {**json.loads(lane[2]), "as_of": ""} == {**json.loads(full[2]), "as_of": ""}
        assert json.loads(lane[2])["site"] == "open"
        for name in ("content-type", "etag", "cache-control", "access-control-allow-origin"):
            assert lane[1][name] == full[1][name], name
        # If-None-Match with the current ETag: 304 from both (the very answer if it changed)
        # (the tag is weak: also in a list, and as a strong one, by the weak comparison)
        etag = lane[1]["etag"]
        assert etag.startswith('W/"')
        for tags in (etag, f'"other", {etag}', etag.removeprefix("W/")):
            conditional = get.replace(b"\r\n\r\n", f"\r\nIf-None-Match: {tags}\r\n\r\n".encode())
            (lane304,) = split_answers(await srv.exchange(conditional))
            (full304,) = split_answers(await srv.exchange(conditional[:10], conditional[10:]))
            for answer in (lane304, full304):
                assert answer[0] == 304 or answer[1]["etag"] != etag
                assert answer[0] != 304 or answer[2] == b""
                # RFC 9110 8.6: in a 304, a Content-Length is the 200's or none
                assert answer[0] != 304 or answer[1].get("content-length") in (
                    None,
                    lane[1]["content-length"],
                )
        # an unknown site is not in the lane: aiohttp's 404 names the field
        (unknown,) = split_answers(
            await srv.exchange(get.replace(b"/sites/open/", b"/sites/nope/"))
        )
        assert unknown[0] == 404 and json.loads(unknown[2])["field"] == "site"
    finally:
        await runner.cleanup()


async def read_stream(reader: asyncio.StreamReader, events: int) -> tuple[bytes, list[bytes]]:
    """The head of a chunked event stream and its first ``events`` ``data:`` lines (comments
    and ``retry:`` kept apart, as a browser does)."""
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    body = b""
    data: list[bytes] = []
    while len(data) < events:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        assert size > 0, "the stream ended"
        body += (await reader.readexactly(size + 2))[:-2]
        *blocks, body = body.split(b"\n\n")
        data.extend(line for b in blocks for line in b.split(b"\n") if line.startswith(b"data: "))
    return head, data


def subscribers() -> float:
    return PROMETHEUS.get_sample_value("visitorstats_stream_subscribers") or 0.0


def head_fields(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}


async def first_numbers(port: int, get: bytes) -> None:
    """Wait until the stream ``get`` asks for answers 200: the first snapshot takes a moment
    (503 until then)."""
    async with asyncio.timeout(30):
        while True:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(get)
            first = await r.readuntil(b"\r\n\r\n")
            w.close()
            if first.startswith(b"HTTP/1.1 200"):
                return
            assert first.startswith(b"HTTP/1.1 503"), first
            await asyncio.sleep(0.2)


async def test_the_stream_in_the_lane_is_the_stream_of_aiohttp(tmp_path: Path) -> None:
    """``GET /v1/sites/{site}/counter/stream``: the lane's subscriber (a sink of the fan-out,
    written to directly) gets the head and the events aiohttp's does; it stays open past the
    idle timeout of lane connections, gets keep-alives, counts at the gate, and ends with the
    chunked body's last chunk when the server stops."""
    s = settings_for(tmp_path, read_timeout_seconds=0.5, stream_keepalive_seconds=0.3)
    app = create_standalone_app(s, REGISTRY)
    runner = await http.start_server(app, s)
    get = b"GET /v1/sites/open/counter/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    before = subscribers()
    try:
        await first_numbers(s.port, get)
        lane_r, lane_w = await asyncio.open_connection("127.0.0.1", s.port)
        lane_w.write(get)
        full_r, full_w = await asyncio.open_connection("127.0.0.1", s.port)
        full_w.write(get[:10])  # a split head: aiohttp serves it
        await full_w.drain()
        await asyncio.sleep(0.05)
        full_w.write(get[10:])
        async with asyncio.timeout(30):
            lane_head, lane_data = await read_stream(lane_r, 1)
            full_head, full_data = await read_stream(full_r, 1)
        lane, full = head_fields(lane_head), head_fields(full_head)
        assert "server" not in lane and full["server"] == "visitorstats"
        assert lane_head.startswith(b"HTTP/1.1 200 OK\r\n")
        for name in (
            "content-type",
            "cache-control",
            "x-accel-buffering",
            "access-control-allow-origin",
            "transfer-encoding",
        ):
            assert lane[name] == full[name], name
        numbers = [{**json.loads(d[6:]), "as_of": ""} for d in (lane_data[0], full_data[0])]
        assert numbers[0] == numbers[1] and numbers[0]["site"] == "open"
        # past the lane's idle timeout (0.5 s), keep-alives (every 0.3 s) on an open stream
        await asyncio.sleep(1.5)
        async with asyncio.timeout(10):
            pending = await lane_r.read(65536)
        assert b": keep-alive" in pending
        assert subscribers() == before + 2
    finally:
        await runner.cleanup()
    async with asyncio.timeout(30):
        rest = await lane_r.read()
        while chunk := await lane_r.read():
            rest += chunk
    assert rest.endswith(b"0\r\n\r\n")  # a clean end, not a cut-off body
    lane_w.close()
    full_w.close()


async def test_a_client_that_does_not_read_its_answers_is_dropped(tmp_path: Path) -> None:
    """A client pipelining beacons without ever reading the answers held its connection, and
    its place at the gate, for good (an outside audit: 50 such clients at a cap of 50 shut
    everyone else out). Once the answers wait unread for the read timeout, it is dropped."""
    srv = await start(tmp_path, read_timeout_seconds=1.0)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing: fills soon
    sock.connect(("127.0.0.1", srv.port))
    sock.settimeout(60)  # a send blocks while the server, its answers unread, stops reading
    requests = pixel("site=open&type=pageview&url=https%3A%2F%2Fa.vn%2Fx") * 100

    def send_until_dropped() -> int:
        sent = 0
        while sent < 200_000:
            try:
                sock.sendall(requests)
            except (ConnectionResetError, BrokenPipeError):
                return sent
            sent += 100
        raise AssertionError(f"still open after {sent} requests")

    try:
        sent = await asyncio.to_thread(send_until_dropped)
        assert 0 < len(srv.records) < sent  # served until its answers went unread
    finally:
        sock.close()
        await srv.runner.cleanup()


# -- a half-closed connection (the client is done sending, still reading) ----------------------


async def read_to_close(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes the connection (bounded: the test fails, not hangs)."""
    data = b""
    async with asyncio.timeout(30):
        while chunk := await reader.read(65536):
            data += chunk
    return data


def chunked_post(body: bytes) -> bytes:
    """A beacon with a chunked body: the lane hands it to aiohttp."""
    head = post(b"", "Transfer-Encoding: chunked").replace(b"Content-Length: 0\r\n", b"")
    return head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


async def test_a_half_closed_connection_gets_every_answer_and_counts_only_those(
    tansu: Tansu, tmp_path: Path
) -> None:
    """N pipelined beacons in one write, then ``shutdown(SHUT_WR)``: every one is answered, in
    order, and then the connection is closed (RFC 9112 9.6), on the lane (Content-Length) and
    on aiohttp's path (chunked) alike, by ``visitorstats ingest``'s publisher (spool ack: the
    answer comes after a round of the loop). An outside audit got one answer of 2, 5 or 20,
    while 2 or 3 of them counted."""
    topic = "half-closed"
    await create_topic(tansu.bootstrap, topic, 1)
    s = settings_for(
        tmp_path,
        rate_limit_per_second=0,
        kafka_bootstrap=tansu.bootstrap,
        kafka_topic=topic,
        spool_dir=tmp_path / "spool",
    )
    runner = await http.start_server(create_ingest_app(s, REGISTRY), s)
    sent = 0
    try:
        for make in (post, chunked_post):
            for n in (1, 2, 5, 20):
                reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
                bodies = [beacon_body(url=f"https://a.vn/{n}/{i}") for i in range(n)]
                writer.write(b"".join(make(b) for b in bodies))
                writer.write_eof()
                answers = split_answers(await read_to_close(reader))
                writer.close()
                assert [a[0] for a in answers] == [202] * n, (make.__name__, n)
                assert all(by_aiohttp(a) == (make is chunked_post) for a in answers)
                sent += n
        # a beacon (the lane's), a health check (aiohttp's), and the start of a request that
        # never ends: the two are answered, and the connection closed
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(post(beacon_body()) + HEALTH + post(beacon_body())[:30])
        writer.write_eof()
        answers = split_answers(await read_to_close(reader))
        writer.close()
        assert [(a[0], by_aiohttp(a)) for a in answers] == [(202, False), (200, True)]
        sent += 1
    finally:
        await runner.cleanup()  # ships the spool
    assert await count_records(tansu.bootstrap, topic) == sent


@pytest.mark.parametrize(
    "coding",
    ["gzip, chunked", "deflate, chunked", "compress,chunked", "identity, chunked", "x-y, chunked"],
)
async def test_a_transfer_coding_other_than_chunked_is_refused_and_counts_nothing(
    server: Server, coding: str
) -> None:
    """A body declared compressed (a transfer coding before the chunks) is never read as
    plain, as with ``Content-Encoding`` (an outside audit: ``gzip, chunked`` and a plain JSON
    chunk got 202 and counted). Also with ``Expect: 100-continue``: refused before the body."""
    body = beacon_body()
    request = post(b"", f"Transfer-Encoding: {coding}").replace(b"Content-Length: 0\r\n", b"")
    request += b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    # the head alone: the body would follow a 100 Continue
    expect = post(b"", f"Transfer-Encoding: {coding}", "Expect: 100-continue").replace(
        b"Content-Length: 0\r\n", b""
    )
    for raw in (request, expect):
        answers = split_answers(await server.exchange(raw))
        assert [a[0] for a in answers] == [415], raw
        assert json.loads(answers[0][2])["field"] == "transfer-encoding"
        assert answers[0][1]["access-control-allow-origin"] == "*"
    assert server.records == []


async def test_a_stream_ends_at_its_clients_eof_on_either_path(tmp_path: Path) -> None:
    """A stream's client that closes (its FIN: a half-close cannot be told from a client gone)
    is dropped at once, on the lane and on aiohttp's path, not at the next keep-alive's failed
    write: the answer never ends, so waiting to finish it would hold the subscriber for good."""
    s = settings_for(tmp_path, stream_keepalive_seconds=3600)
    runner = await http.start_server(create_standalone_app(s, REGISTRY), s)
    get = b"GET /v1/sites/open/counter/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    before = subscribers()
    try:
        await first_numbers(s.port, get)
        for writes in ((get,), (get[:10], get[10:])):  # the lane's, aiohttp's (a split head)
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            for i, part in enumerate(writes):
                if i:
                    await writer.drain()
                    await asyncio.sleep(0.05)
                writer.write(part)
            async with asyncio.timeout(30):
                await read_stream(reader, 1)
            writer.write_eof()
            await read_to_close(reader)  # the server closes
            writer.close()
        async with asyncio.timeout(30):
            while True:  # (the handlers see their connection lost in a moment)
                if subscribers() == before:
                    break
                await asyncio.sleep(0.05)
    finally:
        await runner.cleanup()
