"""The rate limit charges the client a trusted proxy names, never the proxy itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.procs import CHROME_UA, Service, http, numbers, wait_counter, write_sites

pytestmark = pytest.mark.e2e


def post(base: str, ua: str, forwarded_for: str | None = None) -> int:
    headers = {"Content-Type": "text/plain", "User-Agent": ua}
    if forwarded_for:
        headers["X-Forwarded-For"] = forwarded_for
    body = json.dumps({"site": "dongha", "url": "https://portal.example.vn/"}).encode()
    status, _, _ = http("POST", f"{base}/collect", body, headers)
    return status


def test_a_trusted_proxy_without_forwarded_for_is_not_throttled(tmp_path: Path) -> None:
    write_sites(tmp_path)
    env = {"VISITORSTATS_RATE_LIMIT_PER_SECOND": "0.01", "VISITORSTATS_RATE_LIMIT_BURST": "3"}
    run = Service("run", tmp_path, env).start()
    try:
        # loopback is a trusted proxy: with no X-Forwarded-For it is the balancer itself
        direct = [post(run.url, CHROME_UA.replace("126.0", f"126.0.{i}")) for i in range(12)]
        assert direct == [202] * 12
        # a client it names has its own budget: the burst, then 429
        named = [
            post(run.url, CHROME_UA.replace("126.0", f"127.0.{i}"), "198.51.100.7")
            for i in range(8)
        ]
        assert named[:3] == [202] * 3 and set(named[3:]) == {429}
        want_online = 12 + 3
        got = wait_counter(run.url, "dongha", lambda c: c["online"]["total"] == want_online)
        assert numbers(got)["online"]["total"] == want_online
        assert got["visits"]["today"] == want_online
    finally:
        run.stop()
