"""Slow and oversized clients against a running ``visitorstats run`` (raw sockets): the
header-read timeout against slowloris, the body-read timeout, header and body size limits, and
the cap on open connections. No timing is asserted: every wait is bounded, and the assertions
are about what the server did (closed, refused, answered), not when."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from tests.support.procs import CHROME_UA, Service, http, write_sites

pytestmark = pytest.mark.e2e

READ_TIMEOUT = 2
MAX_HEADER_BYTES = 4096
CAP = 8  # connections of the `capped` service


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("limits")
    write_sites(workdir)
    env = {
        "VISITORSTATS_READ_TIMEOUT_SECONDS": str(READ_TIMEOUT),
        "VISITORSTATS_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
        "VISITORSTATS_MAX_HEADERS": "50",
    }
    service = Service("run", workdir, env).start()
    try:
        yield service
    finally:
        assert service.stop() == 0


def connect(run: Service) -> socket.socket:
    return socket.create_connection(("127.0.0.1", run.port), timeout=30)


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (or resets) the connection; bounded by the socket's
    timeout, which fails the test."""
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def exchange(run: Service, raw: bytes) -> tuple[int, bytes]:
    with connect(run) as s:
        s.sendall(raw)
        response = read_all(s)
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def still_serving(run: Service) -> bool:
    return http("GET", f"{run.url}/healthz")[0] == 200


def test_slowloris_headers_are_cut_off(run: Service) -> None:
    """A client that sends its request head a byte at a time, forever, is disconnected."""
    with connect(run) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        sent = 0
        closed = False
        deadline = time.monotonic() + 60  # a bound for the test, not the behaviour under test
        while time.monotonic() < deadline:
            try:
                s.sendall(b"X-a: b\r\n"[sent % 8 : sent % 8 + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            sent += 1
            s.settimeout(0.25)
            try:
                if s.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed = True
                break
            # meanwhile the service answers everyone else
            if sent % 8 == 0:
                assert still_serving(run)
        assert closed, "the server kept a slowloris connection open"
    assert still_serving(run)


def test_an_idle_connection_is_closed(run: Service) -> None:
    with connect(run) as s:
        assert read_all(s) == b""  # closed by the server, nothing said


def test_a_slow_body_gets_408(run: Service) -> None:
    with connect(run) as s:
        s.sendall(
            b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
            b"User-Agent: " + CHROME_UA.encode() + b"\r\nContent-Length: 100\r\n\r\n"
            b'{"site":"dongha",'
        )
        response = read_all(s)
    assert response.startswith(b"HTTP/1.1 408 "), response
    assert json.loads(response.partition(b"\r\n\r\n")[2])["field"] == "body"


@pytest.mark.parametrize(
    ("raw", "status", "field"),
    [
        # a header line over the limit
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n",
            400,
            "request",
        ),
        # a request line over the limit
        (b"GET /collect.gif?" + b"a=1&" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400, "request"),
        # too many header lines
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-%d: 1\r\n" % i for i in range(200))
            + b"\r\n",
            400,
            "request",
        ),
        # not HTTP at all (TLS on the plain port), a bad header name, smuggling attempts
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, 400, "request"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400, "request"),
        (
            b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            "request",
        ),
        (
            b"POST /collect HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            400,
            "request",
        ),
        # a body over 8 KiB: announced, unannounced (chunked), and after a 202-sized start
        (
            b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 1000000\r\nConnection: close\r\n\r\n" + b"a" * 20_000,
            413,
            "body",
        ),
        (
            b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            + (b"1000\r\n" + b"a" * 4096 + b"\r\n") * 3
            + b"0\r\n\r\n",
            413,
            "body",
        ),
        # a compressed body is never inflated
        (
            b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
            b"Content-Encoding: gzip\r\nContent-Length: 4\r\nConnection: close\r\n\r\nabcd",
            415,
            "content-encoding",
        ),
    ],
    ids=[
        "long-header",
        "long-request-line",
        "many-headers",
        "tls",
        "bad-header",
        "cl-and-te",
        "two-content-lengths",
        "body-8k-announced",
        "body-8k-chunked",
        "gzip",
    ],
)
def test_oversized_and_malformed_requests_get_a_json_4xx(
    run: Service, raw: bytes, status: int, field: str
) -> None:
    got, body = exchange(run, raw)
    assert got == status, body
    assert json.loads(body)["field"] == field
    assert still_serving(run)


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A service with room for few connections, and patience (nothing times out here)."""
    workdir = tmp_path_factory.mktemp("capped")
    write_sites(workdir)
    env = {"VISITORSTATS_MAX_CONNECTIONS": str(CAP), "VISITORSTATS_READ_TIMEOUT_SECONDS": "120"}
    service = Service("run", workdir, env).start()
    try:
        yield service
    finally:
        assert service.stop() == 0


def metric(service: Service, name: str) -> float:
    _, _, text = http("GET", f"{service.url}/metrics")
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def wait_serving(service: Service) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if still_serving(service):
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "the service did not recover"
        time.sleep(0.2)


def test_idle_connections_make_room_for_new_ones(capped: Service) -> None:
    """At the cap, idle connections (here: opened, nothing sent) give way to new requests."""
    closed = metric(capped, "visitorstats_http_idle_connections_closed_total")
    idle = [connect(capped) for _ in range(CAP + 4)]
    try:
        for _ in range(3):
            assert still_serving(capped)
        # the oldest idle ones were closed, without a word, to make room
        assert read_all(idle[0]) == b""
    finally:
        for s in idle:
            s.close()
    assert metric(capped, "visitorstats_http_idle_connections_closed_total") > closed


def test_busy_connections_are_capped(capped: Service) -> None:
    """With every connection busy (counter streams), one more is answered 503 at once and
    closed; once they are gone, new connections are served again."""
    wait_serving(capped)
    streams: list[socket.socket] = []
    try:
        while len(streams) < CAP:
            s = connect(capped)
            s.sendall(b"GET /v1/sites/dongha/counter/stream HTTP/1.1\r\nHost: x\r\n\r\n")
            head = s.recv(65536)
            if not head.startswith(b"HTTP/1.1 200 "):  # a leftover idle connection made room
                s.close()
                continue
            streams.append(s)
        with connect(capped) as extra:
            answer = read_all(extra)
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        # readable by a page: a portal's script sees the 503 and when to come back
        assert b"\r\nAccess-Control-Allow-Origin: *\r\n" in answer
        assert b"\r\nAccess-Control-Expose-Headers: Retry-After\r\n" in answer
        body = json.loads(answer.partition(b"\r\n\r\n")[2])
        assert body == {"error": "too many open connections", "field": None}
    finally:
        for s in streams:
            s.close()
    wait_serving(capped)
    assert metric(capped, "visitorstats_http_connections_refused_total") >= 1


def requests_counted(service: Service, endpoint: str, outcome: str) -> float:
    series = f'visitorstats_ingest_requests_total{{endpoint="{endpoint}",outcome="{outcome}"}} '
    _, _, text = http("GET", f"{service.url}/metrics")
    for line in text.decode().splitlines():
        if line.startswith(series):
            return float(line.split()[-1])
    raise AssertionError(f"no series {series}")


MALFORMED = {
    "nul-in-a-value": b"GET / HTTP/1.1\r\nHost: x\r\nFoo: a\x00b\r\n\r\n",
    "two-content-lengths": b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    "bad-content-length": b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 2x\r\n\r\n{}",
    "cl-and-te": b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "folded": b"GET /collect.gif?site=dongha HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n",
    "many-headers": b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-%d: 1\r\n" % i for i in range(200))
    + b"\r\n",
}


def test_a_request_that_cannot_be_read_is_answered_as_any_refusal_and_counted(
    run: Service,
) -> None:
    """The server's own 400 (the request could not be read: on the lane's routes too) carries
    the headers of every answer (nosniff, a Server without versions, CORS), and is counted in
    visitorstats_ingest_requests_total (an outside audit: aiohttp's Server with its version, no
    nosniff nor CORS, and the metric unmoved)."""
    before = requests_counted(run, "unknown", "malformed")
    for name, raw in MALFORMED.items():
        with connect(run) as s:
            s.sendall(raw)
            head, _, body = read_all(s).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].split(" ")[1] == "400", (name, lines)
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        assert headers["x-content-type-options"] == "nosniff", name
        assert headers["server"] == "visitorstats", name
        assert headers["access-control-allow-origin"] == "*", name
        assert json.loads(body)["field"] == "request", name
    assert requests_counted(run, "unknown", "malformed") == before + len(MALFORMED)
