"""The counter stream on a real ``visitorstats run``: a thousand subscribers at once on one
process (over loopback), keep-alive comments, disconnected clients dropped at once, and the
streams ended when the server stops."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.browser.portal import metric
from tests.support.procs import Service, send_beacon, write_sites

pytestmark = pytest.mark.e2e
SITE = "dongha"
SUBSCRIBERS = 1000
HANG_GUARD = 120.0  # only so that a broken stream fails the test instead of hanging it


@pytest.fixture
def run(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Service]:
    write_sites(tmp_path)
    env: dict[str, str] = getattr(request, "param", {})
    svc = Service("run", tmp_path, env).start()
    try:
        yield svc
    finally:
        svc.stop()


async def next_event(response: aiohttp.ClientResponse, comments: list[str]) -> bytes:
    """The next ``data:`` line of a server-sent event stream (comment lines are collected)."""
    while True:
        line = await response.content.readline()
        if not line:
            raise EOFError("the stream ended")
        if line.startswith(b"data: "):
            return line[len(b"data: ") :].rstrip(b"\n")
        if line.startswith(b":"):
            comments.append(line.decode().strip())


async def wait_metric(url: str, name: str, want: float) -> float:
    loop = asyncio.get_running_loop()
    value = -1.0
    for _ in range(int(HANG_GUARD / 0.2)):
        value = await loop.run_in_executor(None, lambda: metric(url, name))
        if value == want:
            break
        await asyncio.sleep(0.2)
    return value


# The keep-alive is an hour here: a disconnected client that is dropped can only have been
# dropped at once, not on a failed keep-alive write.
@pytest.mark.parametrize("run", [{"VISITORSTATS_STREAM_KEEPALIVE_SECONDS": "3600"}], indirect=True)
async def test_a_thousand_subscribers_all_get_the_update_and_leave_cleanly(run: Service) -> None:
    url = f"{run.url}/v1/sites/{SITE}/counter/stream"
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        responses = await asyncio.wait_for(
            asyncio.gather(*(session.get(url) for _ in range(SUBSCRIBERS))), HANG_GUARD
        )
        try:
            assert {r.status for r in responses} == {200}
            assert {r.headers["Content-Type"] for r in responses} == {"text/event-stream"}
            comments: list[str] = []
            first = await asyncio.wait_for(
                asyncio.gather(*(next_event(r, comments) for r in responses)), HANG_GUARD
            )
            assert {json.loads(b)["online"]["total"] for b in first} == {0}
            assert await wait_metric(run.url, "visitorstats_stream_subscribers", SUBSCRIBERS) == (
                SUBSCRIBERS
            )

            # A visitor arrives: every subscriber gets the new numbers, the very same bytes.
            loop = asyncio.get_running_loop()
            status = await loop.run_in_executor(
                None, lambda: send_beacon(run.url, SITE, client="203.0.113.7")
            )
            assert status == 202

            async def update(r: aiohttp.ClientResponse) -> bytes:
                while True:
                    body = await next_event(r, comments)
                    if json.loads(body)["online"]["total"] == 1:
                        return body

            updates = await asyncio.wait_for(
                asyncio.gather(*(update(r) for r in responses)), HANG_GUARD
            )
            assert len(updates) == SUBSCRIBERS
            # One prepared message per refresh, the very same bytes for everyone: on a busy
            # machine a second refresh can land before a slow subscriber has read the first
            # (it then gets only the latest), so the updates may span two refreshes, with the
            # same numbers.
            by_refresh = {json.loads(u)["as_of"]: u for u in updates}
            assert len(set(updates)) == len(by_refresh) <= 2
            assert len({u.replace(json.loads(u)["as_of"].encode(), b"") for u in updates}) == 1
            got: dict[str, Any] = json.loads(updates[0])
            assert got["online"]["guests"] == 1
            assert got["visits"]["today"] == 1
            assert got["visits"]["total"] == 23070412 + 1
            assert comments == []  # no keep-alive was due
        finally:
            for r in responses:
                r.close()  # drop the connections
    # Every one of them is gone from the server without any further write to it.
    assert await wait_metric(run.url, "visitorstats_stream_subscribers", 0) == 0


@pytest.mark.parametrize("run", [{"VISITORSTATS_STREAM_KEEPALIVE_SECONDS": "0.5"}], indirect=True)
async def test_keep_alive_comments_between_events(run: Service) -> None:
    url = f"{run.url}/v1/sites/{SITE}/counter/stream"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        comments: list[str] = []
        first = json.loads(await next_event(response, comments))
        assert first["site"] == SITE
        while len(comments) < 2:
            line = await asyncio.wait_for(response.content.readline(), HANG_GUARD)
            assert not line.startswith(b"data:"), "nothing changed, yet an event came"
            if line.startswith(b":"):
                comments.append(line.decode().strip())
        assert comments == [": keep-alive", ": keep-alive"]


async def test_unknown_site_stream_is_a_404_with_a_json_error(run: Service) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{run.url}/v1/sites/nope/counter/stream") as response,
    ):
        assert response.status == 404
        assert await response.json() == {"error": "unknown site", "field": "site"}


async def test_a_head_request_of_the_stream_gets_its_headers_and_no_stream(run: Service) -> None:
    """HEAD has no body: the stream's headers, and the connection free for the next request."""
    reader, writer = await asyncio.open_connection("127.0.0.1", run.port)
    try:
        path = f"/v1/sites/{SITE}/counter/stream"
        writer.write(
            f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n"
            f"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head, head
        # the pipelined request is answered next: nothing of a stream came in between
        after = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert after.startswith(b"HTTP/1.1 200"), (head, after)
        assert b"data:" not in head + after and b"retry:" not in head + after
    finally:
        writer.close()


async def test_stopping_the_server_ends_open_streams(run: Service) -> None:
    url = f"{run.url}/v1/sites/{SITE}/counter/stream"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        await next_event(response, [])
        loop = asyncio.get_running_loop()
        stopped = loop.run_in_executor(None, run.stop)
        # The stream ends cleanly (its chunked body terminated; a stream cut off when the
        # shutdown gives up waiting would raise ClientPayloadError here).
        rest = await asyncio.wait_for(response.content.read(), HANG_GUARD)
        assert b"data:" not in rest
        assert await stopped == 0
