"""Hostile input and abuse against a running ``visitorstats run``: schemathesis over the served
OpenAPI document, rejected beacons that must change no count, a flood from one client beside
honest visitors, origins, forged member tokens, Do-Not-Track / GPC, hostile site ids."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from services.ingest.visitor import make_member_token
from tests.support.procs import (
    CHROME_UA,
    Service,
    counter,
    http,
    numbers,
    send_beacon,
    wait_counter,
    write_sites,
)

pytestmark = pytest.mark.e2e

SITES = """
[sites.dongha]
name = "Thành phố Đông Hà"
timezone = "Asia/Ho_Chi_Minh"

[sites.quiet]
timezone = "UTC"

[sites.flood]
timezone = "UTC"

[sites.locked]
origins = ["https://portal.example.vn"]
timezone = "UTC"

[sites.members]
timezone = "UTC"
member_token_secret = "members-secret"

[sites.other]
timezone = "UTC"
member_token_secret = "other-secret"

[sites.private]
timezone = "UTC"
honor_dnt = true
honor_gpc = true
"""
RATE, BURST = 5.0, 20


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("abuse")
    write_sites(workdir, SITES)
    env = {
        "VISITORSTATS_RATE_LIMIT_PER_SECOND": str(RATE),
        "VISITORSTATS_RATE_LIMIT_BURST": str(BURST),
    }
    service = Service("run", workdir, env).start()
    try:
        yield service
    finally:
        assert service.stop() == 0


def post(base: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    h = {"Content-Type": "text/plain", "User-Agent": CHROME_UA, **(headers or {})}
    status, _, data = http("POST", f"{base}/collect", body, h)
    return status, data


def metric(base: str, name: str, labels: str = "") -> float:
    _, _, text = http("GET", f"{base}/metrics")
    pattern = re.escape(name + ("{" + labels + "}" if labels else "")) + r" ([0-9.e+-]+)"
    found = re.search(pattern, text.decode())
    return float(found.group(1)) if found else 0.0


def settled(base: str, site: str, pageviews: int) -> dict[str, Any]:
    """The counter once it shows ``pageviews`` page views today (the barrier beacon counted:
    everything sent before it has been consumed too)."""
    return wait_counter(base, site, lambda c: c["pageviews"]["today"] >= pageviews)


def test_schemathesis_finds_no_server_error_and_every_response_conforms(
    run: Service, tmp_path: Path
) -> None:
    """The served document, fuzzed: positive and negative cases for every operation (the
    never-ending event stream excepted: it is tested below and in the browser tests)."""
    checks = ",".join(
        [
            "not_a_server_error",
            "status_code_conformance",
            "content_type_conformance",
            "response_headers_conformance",
            "response_schema_conformance",
            "negative_data_rejection",
            "unsupported_method",
        ]
    )
    # A body over 8 KiB is refused with 413, a slow one with 408: rejections too.
    (tmp_path / "schemathesis.toml").write_text(
        "[checks.negative_data_rejection]\n"
        'expected-statuses = ["400", "403", "404", "405", "408", "413", "415", "429"]\n'
    )
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("st")),
            "run",
            f"{run.url}/openapi.json",
            "--checks",
            checks,
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "100",
            "--exclude-path-regex",
            "/stream$",
            "--workers",
            "1",
            "--request-timeout",
            "10",
            "--seed",
            "7",
            "--suppress-health-check",
            "all",
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-3000:]
    assert "/collect" in result.stdout


BAD_BODIES: list[tuple[bytes, dict[str, str], int, str]] = [
    (b"", {}, 400, "body"),
    (b"not json", {}, 400, "body"),
    (b"[]", {}, 400, "body"),
    (b'"quiet"', {}, 400, "body"),
    (b"\xff\xfe{}", {}, 400, "body"),
    (b"[" * 3000 + b"]" * 3000, {}, 400, "body"),
    (b'{"site":"quiet"}', {}, 400, "url"),
    (b'{"site":"quiet","url":"javascript:alert(1)"}', {}, 400, "url"),
    (b'{"site":"quiet","url":"https://a.vn/","a":NaN}', {}, 400, "body"),
    (b'{"site":"quiet","url":"https://a.vn/","a":Infinity}', {}, 400, "body"),
    (b'{"site":"quiet","url":"https://a.vn/","n":1e999}', {}, 400, "body"),
    (b'{"site":"quiet","url":"https://a.vn/","x":[[[[[[1]]]]]]}', {}, 400, "x"),
    (b'{"site":"quiet","url":"https://a.vn/","member":"yes"}', {}, 400, "member"),
    (b'{"site":"quiet","url":"https://a.vn/","member":2}', {}, 400, "member"),
    (b'{"site":"quiet","url":"https://a.vn/","event_id":"x"}', {}, 400, "event_id"),
    (b'{"site":"quiet","url":"https://a.vn/","type":"click"}', {}, 400, "type"),
    (b'{"site":"quiet","url":"https://a.vn/","title":5}', {}, 400, "title"),
    (b'{"site":"QUIET","url":"https://a.vn/"}', {}, 400, "site"),
    (b'{"site":["quiet"],"url":"https://a.vn/"}', {}, 400, "site"),
    (b'{"site":"nope","url":"https://a.vn/"}', {}, 403, "site"),
    (
        json.dumps(
            {"site": "quiet", "url": "https://a.vn/", **{f"k{i}": i for i in range(70)}}
        ).encode(),
        {},
        400,
        "body",
    ),
    (
        json.dumps({"site": "quiet", "url": "https://a.vn/", "pad": "x" * 9000}).encode(),
        {},
        413,
        "body",
    ),
    (b'{"site":"quiet","url":"https://a.vn/"}', {"Content-Type": "text/html"}, 415, "content-type"),
    (
        b'{"site":"quiet","url":"https://a.vn/"}',
        {"Content-Encoding": "gzip"},
        415,
        "content-encoding",
    ),
]
BAD_PIXELS: list[tuple[str, int, str | None]] = [
    ("site=quiet&site=quiet&url=https%3A%2F%2Fa.vn%2F", 400, "site"),
    ("site=quiet", 400, "url"),
    ("site=quiet&url=%ZZ%FF", 400, "url"),
    ("site=quiet&url=https%3A%2F%2Fa.vn%2F&type=%00", 400, "type"),
    ("site=quiet&url=https%3A%2F%2Fa.vn%2F&member=maybe", 400, "member"),
    ("site=qu%FFiet&url=https%3A%2F%2Fa.vn%2F", 400, "site"),
    ("%FF=%FF&site=nope&url=https%3A%2F%2Fa.vn%2F", 403, "site"),
]


def test_every_rejected_beacon_leaves_the_counter_unchanged(run: Service) -> None:
    before = numbers(counter(run.url, "quiet"))
    for body, headers, status, field in BAD_BODIES:
        got, data = post(run.url, body, {"X-Forwarded-For": "198.51.100.1", **headers})
        assert got == status, (body[:80], got, data)
        assert json.loads(data)["field"] == field, (body[:80], data)
    for query, status, field in BAD_PIXELS:
        got, _, data = http(
            "GET",
            f"{run.url}/collect.gif?{query}",
            headers={"User-Agent": CHROME_UA, "X-Forwarded-For": "198.51.100.1"},
        )
        assert got == status, (query, got, data)
        assert json.loads(data)["field"] == field, (query, data)
    good = f"{run.url}/collect.gif?site=quiet&url=https%3A%2F%2Fa.vn%2F"
    assert http("HEAD", good, headers={"User-Agent": CHROME_UA})[0] == 200  # headers only
    # the barrier: one good beacon; once it shows, anything sent before it would show too
    assert send_beacon(run.url, "quiet", client="198.51.100.2", url="https://a.vn/") == 202
    after = settled(run.url, "quiet", before["pageviews"]["today"] + 1)
    assert after["pageviews"]["today"] == before["pageviews"]["today"] + 1
    assert after["visits"]["today"] == before["visits"]["today"] + 1
    assert after["online"]["total"] == before["online"]["total"] + 1


def test_a_flood_moves_the_counter_no_more_than_the_limit_and_honest_visitors_all_count(
    run: Service,
) -> None:
    """One client sends far beyond its rate, each beacon with a new User-Agent, visitor id and
    event id, and a made-up X-Forwarded-For hop in front of the one the (trusted) proxy
    appended; at the same time 25 honest visitors read two pages each."""
    attacker, flood_size, honest = "203.0.113.66", 300, 25
    accepted: list[int] = []
    elapsed: list[float] = []

    def flood() -> None:
        started = time.monotonic()
        for i in range(flood_size):
            payload = {
                "site": "flood",
                "url": f"https://portal.example.vn/{i}",
                "visitor": f"fake-{i}-{uuid.uuid4()}",
                "event_id": str(uuid.uuid4()),
            }
            status, _ = post(
                run.url,
                json.dumps(payload).encode(),
                {
                    "User-Agent": CHROME_UA.replace("126.0", f"126.{i}"),
                    "X-Forwarded-For": f"10.{i % 250}.0.1, {attacker}",
                },
            )
            assert status in (202, 429), status
            if status == 202:
                accepted.append(i)
        elapsed.append(time.monotonic() - started)

    thread = threading.Thread(target=flood)
    thread.start()
    try:
        for step in ("pageview", "heartbeat", "pageview"):
            for i in range(honest):
                status = send_beacon(
                    run.url,
                    "flood",
                    client=f"198.51.100.{100 + i}",
                    type=step,
                    url=f"https://portal.example.vn/honest/{i}/{step}",
                    event_id=str(uuid.uuid4()),
                )
                assert status == 202, (step, i, status)
    finally:
        thread.join(timeout=300)
    a = len(accepted)
    print(f"flood: {a} of {flood_size} accepted in {elapsed[0]:.2f}s")
    assert BURST <= a <= BURST + RATE * elapsed[0] + 1, (a, elapsed)
    assert a < flood_size / 2  # the flood was refused for the most part
    want_pageviews = a + 2 * honest
    got = wait_counter(
        run.url, "flood", lambda c: c["pageviews"]["today"] >= want_pageviews, timeout=30
    )
    assert got["pageviews"]["today"] == want_pageviews
    assert got["visits"]["today"] == a + honest
    assert got["online"]["total"] == got["online"]["guests"] == a + honest
    assert got["online"]["bots"] == 0


def test_refused_origins_change_no_count(run: Service) -> None:
    before = numbers(counter(run.url, "locked"))
    body = json.dumps({"site": "locked", "url": "https://portal.example.vn/"}).encode()
    pixel = f"{run.url}/collect.gif?site=locked&url=https%3A%2F%2Fportal.example.vn%2F"
    for headers in (
        {"Origin": "https://evil.example"},
        {"Referer": "https://evil.example/page"},
        {"Origin": "null", "Referer": "https://portal.example.vn.evil.example/"},
        {},
    ):
        h = {"X-Forwarded-For": "198.51.100.30", **headers}
        status, data = post(run.url, body, h)
        assert status == 403 and json.loads(data)["field"] == "origin", (headers, data)
        status, _, data = http("GET", pixel, headers={"User-Agent": CHROME_UA, **h})
        assert status == 403 and json.loads(data)["field"] == "origin", (headers, data)
    ok = {"X-Forwarded-For": "198.51.100.31", "Referer": "https://portal.example.vn/tin"}
    assert http("GET", pixel, headers={"User-Agent": CHROME_UA, **ok})[0] == 202
    after = settled(run.url, "locked", before["pageviews"]["today"] + 1)
    assert after["pageviews"]["today"] == before["pageviews"]["today"] + 1
    assert after["online"]["total"] == before["online"]["total"] + 1


def test_forged_member_tokens_count_as_guests(run: Service) -> None:
    now = int(time.time())
    secret = b"members-secret"
    valid = make_member_token("members", secret, now + 3600)
    forged = {
        "bad signature": valid[:-1] + ("0" if valid[-1] != "0" else "1"),
        "expired": make_member_token("members", secret, now - 5),
        "other site's token": make_member_token("other", b"other-secret", now + 3600),
        "signed for another site": make_member_token("other", secret, now + 3600),
        "no token": None,
        "garbage": "12345.\u00e9\u00e9",
        "far-future made up": "99999999999.deadbeef",
    }
    for i, (_case, token) in enumerate(forged.items()):
        extra = {"member_token": token} if token is not None else {}
        status = send_beacon(
            run.url, "members", client=f"198.51.100.{60 + i}", member=True, **extra
        )
        assert status == 202
    assert (
        send_beacon(run.url, "members", client="198.51.100.59", member=True, member_token=valid)
        == 202
    )
    # logged out: the page still holds a valid token, but says it is no member (an outside
    # audit saw the token alone make a member)
    assert (
        send_beacon(run.url, "members", client="198.51.100.58", member=False, member_token=valid)
        == 202
    )
    want = len(forged) + 2
    got = wait_counter(run.url, "members", lambda c: c["online"]["total"] >= want)
    assert got["online"] | {"peak": None} == {
        "guests": len(forged) + 1,
        "members": 1,
        "total": want,
        "bots": 0,
        "peak": None,
    }


def test_do_not_track_and_gpc_are_honoured_and_counted_by_reason(run: Service) -> None:
    dnt = metric(run.url, "visitorstats_beacons_dropped_total", 'reason="dnt"')
    gpc = metric(run.url, "visitorstats_beacons_dropped_total", 'reason="gpc"')
    body = json.dumps({"site": "private", "url": "https://a.vn/"}).encode()
    assert post(run.url, body, {"DNT": "1", "X-Forwarded-For": "198.51.100.80"})[0] == 202
    assert post(run.url, body, {"Sec-GPC": "1", "X-Forwarded-For": "198.51.100.81"})[0] == 202
    pixel = f"{run.url}/collect.gif?site=private&url=https%3A%2F%2Fa.vn%2F"
    h = {"User-Agent": CHROME_UA, "X-Forwarded-For": "198.51.100.82", "DNT": "1"}
    assert http("GET", pixel, headers=h)[0] == 202
    assert send_beacon(run.url, "private", client="198.51.100.83", url="https://a.vn/") == 202
    got = settled(run.url, "private", 1)
    assert got["pageviews"]["today"] == 1 and got["online"]["total"] == 1
    assert metric(run.url, "visitorstats_beacons_dropped_total", 'reason="dnt"') == dnt + 2
    assert metric(run.url, "visitorstats_beacons_dropped_total", 'reason="gpc"') == gpc + 1


HOSTILE_IDS = [
    "nope",
    "DONGHA",
    "dongha ",
    "dongha'--",
    "x' OR '1'='1",
    "dongha; DROP TABLE events",
    "../../etc/passwd",
    "\x00",
    "%00",
    "{site}",
    "đông-hà",
    "a" * 500,
    "dongha\r\nX-Injected: 1",
    "$(reboot)",
    "<script>alert(1)</script>",
]


def test_hostile_site_ids_get_a_json_404_never_a_server_error(run: Service) -> None:
    for site in HOSTILE_IDS:
        s = quote(site, safe="")
        for path in (
            f"/v1/sites/{s}/counter",
            f"/v1/sites/{s}/counter.svg",
            f"/v1/sites/{s}/counter/stream",
            f"/widget/{s}",
        ):
            status, headers, body = http("GET", run.url + path)
            assert status == 404, (site, path, status, body)
            if headers["Content-Type"].startswith("application/json"):
                assert json.loads(body)["error"], (site, path)
            else:  # an image or a page that says so, for a route that names a site
                assert path.endswith(".svg") or path.startswith("/widget/"), (site, path)
                assert "Không có trang" in body.decode(), (site, path)
                assert "<script>" not in body.decode(), (site, path)
            # a portal's script that asks for it can read the 404 (not a CORS error)
            assert headers.get("Access-Control-Allow-Origin") == "*", (site, path)
    assert http("GET", f"{run.url}/v1/sites/dongha/counter")[0] == 200


def test_paths_no_route_matches_answer_a_json_404_a_page_can_read(run: Service) -> None:
    for path in (
        "/v1/sites/dongha/counter/",
        "/v1/sites//counter",
        "/v1/sites/dongha",
        "/widget/dongha/",
        "/nothing-here",
    ):
        status, headers, body = http("GET", run.url + path)
        assert status == 404, (path, status, body)
        assert json.loads(body) == {"error": "not found", "field": None}, path
        assert headers.get("Access-Control-Allow-Origin") == "*", path
    status, headers, body = http("DELETE", f"{run.url}/v1/sites/dongha/counter")
    assert status == 405 and "GET" in headers.get("Allow", ""), (status, headers)
    assert headers.get("Access-Control-Allow-Origin") == "*"


@pytest.mark.parametrize(
    ("lang", "words"), [("EN", "Guests"), ("en-US", "Guests"), ("vi", "Khách")]
)
def test_a_language_tag_in_any_case_or_with_a_region_picks_the_language(
    run: Service, lang: str, words: str
) -> None:
    status, _, body = http("GET", f"{run.url}/v1/sites/dongha/counter.svg?lang={lang}")
    assert status == 200 and words in body.decode(), lang
    status, _, body = http("GET", f"{run.url}/widget/dongha?lang={lang}")
    page = body.decode()
    assert status == 200 and f'data-lang="{lang[:2].lower()}"' in page, lang
    assert "<title>" in page and "Thành phố Đông Hà</title>" in page  # the site's name
