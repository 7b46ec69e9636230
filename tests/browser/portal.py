"""What the browser tests need around the service: a portal on another origin, a reverse proxy
in front of the service (that can break the stream the way real proxies do), Chromium, and
readers of the service's counter, metrics and the widget's DOM.

The portal and the proxy are aiohttp servers on their own loop in a background thread, on their
own ports: for the browser, the portal page, the proxy and the service are three origins.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from aiohttp import ClientSession, ClientTimeout, web
from prometheus_client.parser import text_string_to_metric_families
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService

from tests.support.procs import http

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--window-size=1200,900",
)
# Three people behind one address (an office, a NAT) with three different browsers: the
# ingest tells them apart by their User-Agent, as it would in production. Chromium's own
# headless User-Agent says "HeadlessChrome" and is (rightly) a bot.
USER_AGENTS = {
    "windows-chrome": (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/126.0.0.0 Safari/537.36"
    ),
    "mac-chrome": (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/126.0.0.0 Safari/537.36"
    ),
    "linux-edge": (
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/126.0.0.0 Safari/537.36 Edg/126.0.0.0"
    ),
    "android-chrome": (
        "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/126.0.0.0 Mobile Safari/537.36"
    ),
}
WAIT_SECONDS = 45.0  # generous: a wait returns as soon as its condition holds

# "drops": each stream delivers its first event, then nothing, open (a connection a NAT or a
# proxy dropped without a word)
StreamMode = Literal["pass", "404", "silent", "drops"]


def wait_until(
    probe: Callable[[], T], predicate: Callable[[T], bool], timeout: float = WAIT_SECONDS
) -> T:
    """Call ``probe`` until ``predicate`` holds of its value; return that value, or the last
    one seen when the time is up (the caller's exact assertion then shows the difference)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if predicate(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


# --- the portal and the proxy ---------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    """One request that went through the proxy."""

    method: str
    path: str
    status: int
    if_none_match: str | None
    body: bytes = b""


class Portal:
    """Test pages at ``http://127.0.0.1:<port>/<name>`` and a proxy to the service at
    ``proxy_url`` (which records what it forwards and can refuse or starve the stream)."""

    def __init__(self, service_url: str) -> None:
        self.service_url = service_url
        self.pages: dict[str, str] = {}
        self.stream_mode: StreamMode = "pass"
        self.counter_hangs = False  # the counter's JSON never answered (a hung service)
        self.collect_down = False  # beacons' POSTs cut off unanswered (the service out of reach)
        self.hits: list[Hit] = []
        self.url = self.proxy_url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="portal")
        self._runners: list[web.AppRunner] = []
        self._session: ClientSession | None = None

    # pages

    def page(self, name: str, html: str) -> str:
        self.pages[name] = html
        return f"{self.url}/{name}"

    async def _page(self, request: web.Request) -> web.Response:
        html = self.pages.get(request.match_info["name"])
        if html is None:
            raise web.HTTPNotFound()
        return web.Response(
            text=html, content_type="text/html", headers={"Cache-Control": "no-store"}
        )

    # proxy

    def proxied(self, method: str = "", path_part: str = "") -> list[Hit]:
        return [
            h for h in list(self.hits) if (not method or h.method == method) and path_part in h.path
        ]

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        path = request.rel_url.path_qs
        if request.method == "GET" and request.path.endswith("/counter/stream"):
            if self.stream_mode == "404":
                self._hit(request, 404)
                return web.Response(status=404, text="no streams here")
            if self.stream_mode == "silent":
                # a buffering proxy: the stream opens and never delivers a byte of it
                self._hit(request, 200)
                silent = web.StreamResponse(
                    headers={
                        "Content-Type": "text/event-stream",
                        "Access-Control-Allow-Origin": "*",
                    }
                )
                await silent.prepare(request)
                await asyncio.Event().wait()  # until the browser gives up (handler cancelled)
                return silent
        if request.method == "POST" and request.path.endswith("/collect") and self.collect_down:
            self._hit(request, 0, await request.read())
            assert request.transport is not None
            request.transport.abort()  # a network error for the page's fetch
            return web.Response(status=502)  # (never sent)
        if request.method == "GET" and request.path.endswith("/counter") and self.counter_hangs:
            self._hit(request, 0)
            await asyncio.Event().wait()  # until the browser gives up (handler cancelled)
        assert self._session is not None
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in ("host", "connection", "content-length", "transfer-encoding")
        }
        headers["X-Forwarded-For"] = request.remote or "127.0.0.1"
        body = await request.read()
        async with self._session.request(
            request.method,
            self.service_url + path,
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as upstream:
            self._hit(request, upstream.status, body)
            response = web.StreamResponse(
                status=upstream.status,
                headers={
                    k: v
                    for k, v in upstream.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding", "connection")
                },
            )
            await response.prepare(request)
            drops = self.stream_mode == "drops" and request.path.endswith("/counter/stream")
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
                if drops and b"data:" in chunk:
                    await asyncio.Event().wait()  # the rest never comes (handler cancelled)
            await response.write_eof()
            return response

    def _hit(self, request: web.Request, status: int, body: bytes = b"") -> None:
        self.hits.append(
            Hit(
                request.method,
                request.rel_url.path_qs,
                status,
                request.headers.get("If-None-Match"),
                body,
            )
        )

    # life cycle

    async def _start(self) -> None:
        self._session = ClientSession(auto_decompress=False, timeout=ClientTimeout(total=None))
        pages = web.Application()
        pages.router.add_get("/{name}", self._page)
        proxy = web.Application()
        proxy.router.add_route("*", "/{tail:.*}", self._proxy)
        ports = []
        for app in (pages, proxy):
            runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self._runners.append(runner)
            server = site._server
            assert isinstance(server, asyncio.base_events.Server)
            ports.append(server.sockets[0].getsockname()[1])
        self.url = f"http://127.0.0.1:{ports[0]}"
        self.proxy_url = f"http://127.0.0.1:{ports[1]}"

    async def _stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def start(self) -> Portal:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()


def portal_page(
    service: str,
    *,
    title: str = "Tin tức — Cổng thông tin",
    site: str = "dongha",
    beacon: bool = True,
    member: str = "0",
    heartbeat: str = "2",
    beacon_from: str | None = None,
    widgets: tuple[str, ...] = ("vi",),
    widget_from: str | None = None,
    widget_attrs: str = "",
    extra: str = "",
    head: str = "",
) -> str:
    """A portal page as an editor would paste the two snippets into its template (``head``:
    what comes first in its head, a Content-Security-Policy ``<meta>``)."""
    beacon_tag = (
        f'<script defer src="{beacon_from or service}/beacon.js" data-site="{site}" '
        f'data-member="{member}" data-heartbeat="{heartbeat}"></script>'
        if beacon
        else ""
    )
    divs = "\n".join(
        f'<div data-visitorstats-widget data-site="{site}" data-lang="{lang}" '
        f'id="vs-{lang}" {widget_attrs}></div>'
        for lang in widgets
    )
    widget_tag = (
        f'<script defer src="{widget_from or service}/widget.js"></script>' if widgets else ""
    )
    return f"""<!doctype html>
<html lang="vi">
<head>
<meta charset="utf-8">
{head}
<title>{title}</title>
<link rel="icon" href="data:,">
{beacon_tag}
{widget_tag}
</head>
<body>
<header><h1>Cổng thông tin điện tử</h1></header>
<main><article><h2>Bài viết</h2><p>Nội dung bài viết.</p></article></main>
<aside style="width:20rem">
{divs}
</aside>
{extra}
</body>
</html>
"""


# --- Chromium -------------------------------------------------------------------------------


class Browsers:
    """Headless Chromium sessions, each with its own profile (its own reader)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.drivers: list[webdriver.Chrome] = []

    def open(
        self, user_agent: str | None = USER_AGENTS["windows-chrome"], *, javascript: bool = True
    ) -> webdriver.Chrome:
        n = len(self.drivers)
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        profile = self.workdir / f"chromium-{n}"
        profile.mkdir(parents=True, exist_ok=True)
        options.add_argument(f"--user-data-dir={profile}")
        if user_agent:
            options.add_argument(f"--user-agent={user_agent}")
        if not javascript:
            options.add_experimental_option(
                "prefs", {"profile.managed_default_content_settings.javascript": 2}
            )
        driver = webdriver.Chrome(
            options=options,
            service=DriverService(
                CHROMEDRIVER, log_output=str(self.workdir / f"chromedriver-{n}.log")
            ),
        )
        driver.set_page_load_timeout(60)
        self.drivers.append(driver)
        return driver

    def quit(self) -> None:
        for driver in self.drivers:
            with contextlib.suppress(Exception):
                driver.quit()
        self.drivers.clear()


def open_tab(driver: webdriver.Chrome, url: str) -> str:
    """Open ``url`` in a new foreground tab (the browser's first tab stays open, so that closing
    this one is closing a tab, not quitting the browser); return its handle."""
    driver.switch_to.new_window("tab")
    driver.get(url)
    return driver.current_window_handle


WIDGET_JS = """
const el = document.querySelector(arguments[0]);
if (!el) return null;
const numbers = {};
for (const n of el.querySelectorAll('[data-vs]')) {
  const name = n.getAttribute('data-vs');
  if (name !== 'stale' && name !== 'error') numbers[name] = n.textContent;
}
const mark = el.querySelector('[data-vs=stale]');
const error = el.querySelector('[data-vs=error]');
return {
  state: el.getAttribute('data-vs-state'),
  relay: el.getAttribute('data-vs-relay'),
  updates: Number(el.getAttribute('data-vs-updates') || 0),
  as_of: el.getAttribute('data-vs-as-of'),
  numbers: numbers,
  stale_mark: mark ? !mark.hidden : null,
  error: error && !error.hidden ? error.textContent : null,
};
"""


def widget(driver: webdriver.Chrome, selector: str = "#vs-vi") -> dict[str, Any]:
    """The widget's DOM contract: state, render count, as_of and the numbers as shown."""
    result: dict[str, Any] | None = driver.execute_script(WIDGET_JS, selector)
    return result or {}


def shown(
    guests: int, members: int, visits_today: int, visits_total: int, lang: str = "vi"
) -> dict[str, str]:
    """The numbers a widget must show, formatted as each locale writes them."""
    sep = "." if lang == "vi" else ","

    def fmt(n: int) -> str:
        return f"{n:,}".replace(",", sep)

    return {
        "guests": fmt(guests),
        "members": fmt(members),
        "total": fmt(guests + members),
        "visits-today": fmt(visits_today),
        "visits-total": fmt(visits_total),
    }


# --- the service's side ---------------------------------------------------------------------


def metric(service_url: str, name: str, **labels: str) -> float:
    """One sample of the service's Prometheus metrics (0 when it has not been touched yet)."""
    status, _, body = http("GET", f"{service_url}/metrics")
    assert status == 200
    total = 0.0
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def online(c: dict[str, Any]) -> dict[str, int]:
    return {k: c["online"][k] for k in ("guests", "members", "total", "bots")}


@contextlib.contextmanager
def portal_for(service_url: str) -> Iterator[Portal]:
    portal = Portal(service_url).start()
    try:
        yield portal
    finally:
        portal.stop()
