"""HTTP as browsers, caches and Prometheus read it, against a running ``visitorstats run``:
CORS of the beacon endpoint with credentials, validators and ``304``s, compression of the
scripts and the metrics, ``HEAD`` on the pixel, the answers for a site that does not exist, and
the metric series that exist from the start. (Chromium's side of the first:
``tests/browser/test_beacon.py``.)"""

from __future__ import annotations

import gzip
import json
import os
import time
from collections.abc import Iterator

import pytest

from tests.support.procs import CHROME_UA, Service, counter, http, write_sites

pytestmark = pytest.mark.e2e

SITES = """
[sites.open]
timezone = "Asia/Ho_Chi_Minh"

[sites.locked]
origins = ["https://portal.example.vn"]
timezone = "UTC"
"""
PORTAL = "https://portal.example.vn"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("semantics")
    write_sites(workdir, SITES)
    # a client named by the (trusted, loopback) proxy has a small budget; the proxy's own
    # requests (no X-Forwarded-For) have none
    env = {"VISITORSTATS_RATE_LIMIT_PER_SECOND": "1", "VISITORSTATS_RATE_LIMIT_BURST": "2"}
    service = Service("run", workdir, env).start()
    try:
        yield service
    finally:
        assert service.stop() == 0


def beacon(run: Service, site: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    body = json.dumps({"site": site, "url": f"{PORTAL}/tin-tuc/1.html"}).encode()
    status, answer, _ = http(
        "POST",
        f"{run.url}/collect",
        body,
        {"Content-Type": "application/json", "User-Agent": CHROME_UA, **headers},
    )
    return status, answer


def metric_lines(run: Service, name: str) -> dict[str, float]:
    _, _, body = http("GET", f"{run.url}/metrics")
    lines = {}
    for line in body.decode().splitlines():
        if line.startswith(name + "{"):
            series, _, value = line.rpartition(" ")
            lines[series] = float(value)
    return lines


def test_the_disks_it_writes_to_are_watched(run: Service) -> None:
    """The data directory (the journal) and the embedded ClickHouse: the room left on each file
    system, as statvfs says (both are under the working directory here)."""
    room = os.statvfs(run.workdir / "data")
    for d in ("data", "clickhouse"):
        free = metric_lines(run, "visitorstats_disk_free_bytes")[
            f'visitorstats_disk_free_bytes{{dir="{d}"}}'
        ]
        size = metric_lines(run, "visitorstats_disk_size_bytes")[
            f'visitorstats_disk_size_bytes{{dir="{d}"}}'
        ]
        assert size == room.f_blocks * room.f_frsize and 0 < free <= size, (d, free, size)


def test_every_refusal_series_exists_at_zero_from_the_start(run: Service) -> None:
    requests = metric_lines(run, "visitorstats_ingest_requests_total")
    dropped = metric_lines(run, "visitorstats_beacons_dropped_total")
    for endpoint in ("collect", "pixel"):
        for outcome in ("accepted", "invalid", "forbidden", "too_large", "rate_limited"):
            series = (
                f'visitorstats_ingest_requests_total{{endpoint="{endpoint}",outcome="{outcome}"}}'
            )
            assert series in requests, series
    for reason in ("invalid", "too_large", "unsupported_media_type", "timeout", "unknown_site"):
        assert f'visitorstats_beacons_dropped_total{{reason="{reason}"}}' in dropped, reason


def test_a_preflight_and_a_beacon_from_a_page_name_its_origin_and_allow_credentials(
    run: Service,
) -> None:
    status, headers, _ = http(
        "OPTIONS",
        f"{run.url}/collect",
        headers={
            "Origin": PORTAL,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == PORTAL
    assert headers["Access-Control-Allow-Credentials"] == "true"
    assert "Origin" in headers["Vary"]
    assert headers["Access-Control-Allow-Methods"] == "POST, OPTIONS" == headers["Allow"]
    assert "content-type" in headers["Access-Control-Allow-Headers"].lower()

    for site in ("open", "locked"):
        status, headers = beacon(run, site, {"Origin": PORTAL})
        assert status == 202, site
        assert headers["Access-Control-Allow-Origin"] == PORTAL, site
        assert headers["Access-Control-Allow-Credentials"] == "true", site
        assert headers["Vary"] == "Origin", site
    # refused: readable by that page too
    status, headers = beacon(run, "locked", {"Origin": "https://elsewhere.example"})
    assert status == 403
    assert headers["Access-Control-Allow-Origin"] == "https://elsewhere.example"
    assert headers["Access-Control-Allow-Credentials"] == "true"


def test_without_an_origin_or_with_one_of_another_shape_any_origin_is_allowed(
    run: Service,
) -> None:
    for headers in ({}, {"Origin": "null"}, {"Origin": "https://a.example/path"}):
        status, answer = beacon(run, "open", headers)
        assert status == 202, headers
        assert answer["Access-Control-Allow-Origin"] == "*", headers
        assert "Access-Control-Allow-Credentials" not in answer, headers
        status, answer, _ = http("OPTIONS", f"{run.url}/collect", headers=headers)
        assert status == 204 and answer["Access-Control-Allow-Origin"] == "*", headers


def test_head_on_the_pixel_answers_its_headers_and_counts_nothing(run: Service) -> None:
    query = f"site=open&url={PORTAL}/head.html"
    before = metric_lines(run, "visitorstats_ingest_requests_total")
    status, headers, body = http("HEAD", f"{run.url}/collect.gif?{query}")
    assert status == 200 and body == b""
    assert headers["Content-Type"] == "image/gif"
    assert headers["Cache-Control"] == "no-store"
    assert metric_lines(run, "visitorstats_ingest_requests_total") == before


@pytest.mark.parametrize("script", ["beacon.js", "widget.js"])
def test_the_scripts_are_compressed_and_revalidate_with_their_headers(
    run: Service, script: str
) -> None:
    url = f"{run.url}/{script}"
    status, plain_headers, plain = http("GET", url)
    assert status == 200 and "Content-Encoding" not in plain_headers
    status, headers, packed = http("GET", url, headers={"Accept-Encoding": "gzip, br"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(packed) == plain and len(packed) < len(plain) / 2
    assert headers["Vary"] == plain_headers["Vary"] == "Accept-Encoding"
    assert headers["ETag"] != plain_headers["ETag"]  # two representations, two strong tags
    refused = {"Accept-Encoding": "gzip;q=0, *"}
    assert "Content-Encoding" not in http("GET", url, headers=refused)[1]

    for tag, encoding in ((plain_headers["ETag"], "identity"), (headers["ETag"], "gzip")):
        status, again, body = http(
            "GET", url, headers={"If-None-Match": tag, "Accept-Encoding": encoding}
        )
        assert status == 304 and body == b"", tag
        for name in ("ETag", "Cache-Control", "Vary", "Access-Control-Allow-Origin"):
            assert again.get(name) == (headers if encoding == "gzip" else plain_headers)[name]
    assert http("GET", url, headers={"If-None-Match": "*"})[0] == 304


def test_the_counter_tag_is_weak_and_changes_with_the_numbers(run: Service) -> None:
    status, headers, _ = http("GET", f"{run.url}/v1/sites/open/counter")
    assert status == 200 and headers["ETag"].startswith('W/"')
    tag = headers["ETag"]
    assert http("GET", f"{run.url}/v1/sites/open/counter", headers={"If-None-Match": tag})[0] == 304
    views = counter(run.url, "open")["pageviews"]["total"]
    assert beacon(run, "open", {"User-Agent": CHROME_UA + " another"})[0] == 202
    deadline = time.monotonic() + 10
    while counter(run.url, "open")["pageviews"]["total"] == views:
        assert time.monotonic() < deadline, "the page view never showed"
        time.sleep(0.1)
    status, headers, _ = http(
        "GET", f"{run.url}/v1/sites/open/counter", headers={"If-None-Match": tag}
    )
    assert status == 200 and headers["ETag"] != tag


def test_the_svg_revalidates_per_language(run: Service) -> None:
    url = f"{run.url}/v1/sites/open/counter.svg"
    _, vi, _ = http("GET", url + "?lang=vi")
    _, en, _ = http("GET", url + "?lang=en")
    assert vi["ETag"].startswith('W/"') and vi["ETag"] != en["ETag"]
    status, _, body = http("GET", url + "?lang=vi", headers={"If-None-Match": vi["ETag"]})
    assert status == 304 and body == b""


def test_the_svg_and_the_frame_show_the_visits_rows_asked_for(run: Service) -> None:
    url = f"{run.url}/v1/sites/open/counter.svg"
    _, plain, body = http("GET", url + "?lang=vi")
    assert b'data-vs="visits-week"' not in body
    _, rows, body = http("GET", url + "?lang=vi&visits=week,month,total")
    assert rows["ETag"] != plain["ETag"]  # an image of its own
    for name in ("week", "month", "total"):
        assert f'data-vs="visits-{name}"'.encode() in body
    assert b'data-vs="visits-today"' not in body
    status, _, _ = http(
        "GET", url + "?lang=vi&visits=week,month,total", headers={"If-None-Match": rows["ETag"]}
    )
    assert status == 304
    _, _, page = http("GET", f"{run.url}/widget/open?visits=month,bogus")
    assert b'data-visits="month"' in page


def test_an_unknown_site_in_an_image_or_a_frame_says_so_in_its_own_kind(run: Service) -> None:
    status, headers, body = http("GET", f"{run.url}/v1/sites/nosuch/counter.svg?lang=en")
    assert status == 404 and headers["Content-Type"].startswith("image/svg+xml")
    assert "No such site: nosuch" in body.decode()
    status, headers, body = http("GET", f"{run.url}/widget/nosuch")
    assert status == 404 and headers["Content-Type"].startswith("text/html")
    assert "Không có trang: nosuch" in body.decode()
    status, headers, body = http("GET", f"{run.url}/v1/sites/nosuch/counter")  # the API: JSON
    assert status == 404 and json.loads(body) == {"error": "unknown site", "field": "site"}


def test_an_unknown_site_is_named_only_when_it_could_be_a_site_id(run: Service) -> None:
    """The service's own pages and images show no other text of an address."""
    spoof = "/Th%C3%B4ng%20b%C3%A1o%20kh%E1%BA%A9n%3A%20h%C3%A3y%20g%E1%BB%8Di%200900"
    status, _, body = http("GET", f"{run.url}/widget{spoof}")
    assert status == 404 and "Không có trang" in body.decode()
    assert "Thông báo" not in body.decode() and "0900" not in body.decode()
    status, _, body = http("GET", f"{run.url}/v1/sites{spoof}/counter.svg?lang=en")
    assert status == 404 and "No such site" in body.decode() and "0900" not in body.decode()


def test_every_answer_says_its_type_is_final_and_names_no_versions(run: Service) -> None:
    """``nosniff`` on the lane's answers and aiohttp's alike; a Server header without
    versions; the block's own page and image may run and load only what they need."""
    pixel = f"{run.url}/collect.gif?site=open&url=https%3A%2F%2Fa.vn%2F"
    answers = {
        "beacon": beacon(run, "open", {})[1],
        "refused": beacon(run, "nosuch", {})[1],
        "pixel": http("GET", pixel, headers={"User-Agent": CHROME_UA})[1],
    }
    for path in (
        "/v1/sites/open/counter",
        "/v1/sites/nosuch/counter",
        "/v1/sites/open/counter.svg",
        "/widget/open",
        "/widget.js",
        "/beacon.js",
        "/healthz",
        "/metrics",
        "/no/such/path",
    ):
        answers[path] = http("GET", f"{run.url}{path}")[1]
    for what, headers in answers.items():
        assert headers.get("X-Content-Type-Options") == "nosniff", (what, headers)
        assert headers.get("Server", "visitorstats") == "visitorstats", (what, headers)
    page = answers["/widget/open"]["Content-Security-Policy"]
    assert "default-src 'none'" in page and "script-src 'self'" in page, page
    assert "connect-src 'self'" in page and "frame-ancestors" not in page, page  # any portal
    image = answers["/v1/sites/open/counter.svg"]["Content-Security-Policy"]
    assert image.startswith("default-src 'none'") and "script-src" not in image, image


def test_metrics_are_compressed_for_prometheus(run: Service) -> None:
    _, _, plain = http("GET", f"{run.url}/metrics")
    status, headers, packed = http("GET", f"{run.url}/metrics", headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert b"visitorstats_ingest_requests_total" in gzip.decompress(packed)
    assert b"visitorstats_ingest_requests_total" in plain


def test_a_page_can_read_when_to_send_again(run: Service) -> None:
    answers = [
        beacon(run, "open", {"Origin": PORTAL, "X-Forwarded-For": "203.0.113.9"}) for _ in range(5)
    ]
    limited = [headers for status, headers in answers if status == 429]
    assert limited, [status for status, _ in answers]
    for headers in limited:
        assert int(headers["Retry-After"]) >= 1
        assert headers["Access-Control-Expose-Headers"] == "Retry-After"
        assert headers["Access-Control-Allow-Origin"] == PORTAL


def test_an_expectation_that_cannot_be_met_is_a_json_error_a_page_can_read(run: Service) -> None:
    """``Expect`` other than ``100-continue``: ``417`` as JSON naming the header, with the
    headers of every other refusal (an outside audit got aiohttp's text, without CORS)."""
    status, headers, body = http(
        "POST",
        f"{run.url}/collect",
        json.dumps({"site": "open", "url": f"{PORTAL}/a.html"}).encode(),
        {"Content-Type": "text/plain", "Expect": "foo", "Origin": PORTAL, "User-Agent": CHROME_UA},
    )
    assert status == 417, body
    assert json.loads(body)["field"] == "expect"
    assert headers["Content-Type"] == "application/json"
    assert headers["Access-Control-Allow-Origin"] == PORTAL
    assert headers["X-Content-Type-Options"] == "nosniff"
    for path in ("/healthz", "/v1/sites/open/counter", "/collect.gif?site=open", "/no/such"):
        status, headers, body = http("GET", f"{run.url}{path}", headers={"Expect": "foo"})
        assert status == 417, (path, body)
        assert json.loads(body) == {"error": "only 100-continue is expected", "field": "expect"}
        assert headers["Content-Type"] == "application/json", path
        assert headers["Access-Control-Allow-Origin"] == "*", path
        assert headers["X-Content-Type-Options"] == "nosniff", path
        assert headers["Server"] == "visitorstats", path
