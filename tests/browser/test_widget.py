"""widget.js in headless Chromium on a portal page of another origin: live over the stream,
polling where the stream is off, refused, blocked or starved; both languages, screenshots; the
iframe and SVG forms; the demo page of ``visitorstats run``."""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from tests.browser.portal import (
    USER_AGENTS,
    Browsers,
    Portal,
    metric,
    portal_page,
    shown,
    wait_until,
    widget,
)
from tests.support.procs import Service, counter, http, send_beacon, wait_counter, write_sites

pytestmark = pytest.mark.browser
SITE = "dongha"
BASELINE = 23070412


def arrive(service: Service, n: int) -> None:
    """Visitor number ``n`` (their own address) opens a page of the portal."""
    assert send_beacon(service.url, SITE, client=f"203.0.113.{n}") == 202


def online_total(service: Service) -> int:
    total: int = counter(service.url, SITE)["online"]["total"]
    return total


def wait_shown(driver: Any, want: dict[str, str], selector: str = "#vs-vi") -> dict[str, Any]:
    got = wait_until(lambda: widget(driver, selector), lambda w: w.get("numbers") == want)
    assert got["numbers"] == want
    return got


def test_the_widget_updates_itself_over_the_stream_when_a_visitor_arrives(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    # widget.js through the proxy, which shows what the widget asks of the service
    url = portal.page("home", portal_page(service.url, beacon=False, widget_from=portal.proxy_url))
    driver = browsers.open()
    driver.get(url)
    first = wait_shown(driver, shown(0, 0, 0, BASELINE))
    first = wait_until(lambda: widget(driver), lambda w: w["state"] == "live")
    assert first["state"] == "live"
    assert metric(service.url, "visitorstats_stream_subscribers") == 1
    driver.execute_script("window.notReloaded = true")

    for n in (1, 2):
        arrive(service, n)
        got = wait_shown(driver, shown(n, 0, n, BASELINE + n))
        assert got["state"] == "live"
        assert got["updates"] > first["updates"]
        first = got
    # another reader, in a browser of their own
    browsers.open(USER_AGENTS["android-chrome"]).get(
        portal.page("article", portal_page(service.url, widgets=()))
    )
    got = wait_shown(driver, shown(3, 0, 3, BASELINE + 3))
    assert got["state"] == "live"
    assert driver.execute_script("return window.notReloaded") is True
    # Everything came over the one stream: one GET of the counter at start, no polling.
    assert len(portal.proxied("GET", "/counter/stream")) == 1
    assert (
        len(portal.proxied("GET", f"/v1/sites/{SITE}/counter?"))
        + len([h for h in portal.proxied("GET") if h.path == f"/v1/sites/{SITE}/counter"])
        == 1
    )


def test_the_widget_polls_with_etags_when_streams_are_off(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    url = portal.page(
        "home",
        portal_page(
            service.url,
            beacon=False,
            widget_from=portal.proxy_url,
            widget_attrs='data-stream="off" data-poll="1"',
        ),
    )
    driver = browsers.open()
    driver.get(url)
    got = wait_shown(driver, shown(0, 0, 0, BASELINE))
    assert wait_until(lambda: widget(driver), lambda w: w["state"] == "polling")["state"] == (
        "polling"
    )
    # unchanged numbers revalidate: If-None-Match, 304
    polls = wait_until(
        lambda: [h for h in portal.proxied("GET") if h.path == f"/v1/sites/{SITE}/counter"],
        lambda hs: any(h.status == 304 and h.if_none_match for h in hs),
    )
    assert any(h.status == 304 and h.if_none_match for h in polls)
    arrive(service, 1)
    got = wait_shown(driver, shown(1, 0, 1, BASELINE + 1))
    assert got["state"] == "polling"
    assert portal.proxied("GET", "/counter/stream") == []
    assert metric(service.url, "visitorstats_stream_subscribers") == 0


@pytest.mark.parametrize("blocked", ["proxy-404", "browser-blocked", "proxy-buffers"])
def test_the_widget_falls_back_to_polling_when_the_stream_fails(
    service: Service, portal: Portal, browsers: Browsers, blocked: str
) -> None:
    """No data-stream="off" here: the widget finds out by itself that the stream is unusable
    (refused by a proxy, blocked in the browser, or opened by a buffering proxy and never
    delivered) and polls instead."""
    url = portal.page(
        "home",
        portal_page(
            service.url, beacon=False, widget_from=portal.proxy_url, widget_attrs='data-poll="1"'
        ),
    )
    driver = browsers.open()
    if blocked == "proxy-404":
        portal.stream_mode = "404"
    elif blocked == "proxy-buffers":
        portal.stream_mode = "silent"
    else:
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/counter/stream*"]})
    driver.get(url)
    got = wait_until(lambda: widget(driver), lambda w: w.get("state") == "polling", timeout=60)
    assert got["state"] == "polling"
    wait_shown(driver, shown(0, 0, 0, BASELINE))
    arrive(service, 1)
    got = wait_shown(driver, shown(1, 0, 1, BASELINE + 1))
    arrive(service, 2)
    got = wait_shown(driver, shown(2, 0, 2, BASELINE + 2))
    assert got["state"] == "polling"
    assert got["stale_mark"] is False
    assert metric(service.url, "visitorstats_stream_subscribers") == 0


def test_a_stream_lost_without_a_word_is_found_out(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    """A stream that stays open but delivers no more (a NAT or a proxy dropped it unsaid; its
    keep-alives are comments, which the page never sees): after a silence the widget asks the
    counter, shows the newer numbers and opens the stream again; and a counter that does not
    answer either (a hung service) gets the stale mark over the last numbers."""
    url = portal.page(
        "home",
        portal_page(
            service.url, beacon=False, widget_from=portal.proxy_url, widget_attrs='data-poll="1"'
        ),
    )
    portal.stream_mode = "drops"
    driver = browsers.open()
    driver.get(url)
    wait_shown(driver, shown(0, 0, 0, BASELINE))
    got = wait_until(lambda: widget(driver), lambda w: w.get("state") == "live")
    assert got["state"] == "live"
    arrive(service, 1)  # the stream will not say it
    got = wait_shown(driver, shown(1, 0, 1, BASELINE + 1))
    assert got["state"] == "live" and got["stale_mark"] is False
    assert len(portal.proxied("GET", "/counter/stream")) >= 2  # opened again
    portal.counter_hangs = True
    got = wait_until(lambda: widget(driver), lambda w: w.get("state") == "stale", timeout=90)
    assert got["stale_mark"] is True and got["numbers"] == shown(1, 0, 1, BASELINE + 1)


def test_a_widget_added_later_shows_and_a_malformed_site_is_said(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    """A portal's script fills its sidebar after the page has loaded: the widget in it runs
    (and shares the page's stream); a data-site no registry could hold says so, asking nothing."""
    later = (
        '<div id="vs-bad" data-visitorstats-widget data-site="Dong Ha" data-lang="en"></div>\n'
        "<aside id=sidebar></aside><script>setTimeout(function () {"
        "document.getElementById('sidebar').innerHTML = '<div><div id=\"vs-later\" "
        'data-visitorstats-widget data-site="dongha" data-lang="vi"></div></div>\';'
        "}, 1500);</script>"
    )
    url = portal.page(
        "home", portal_page(service.url, beacon=False, widget_from=portal.proxy_url, extra=later)
    )
    driver = browsers.open()
    driver.get(url)
    wait_shown(driver, shown(0, 0, 0, BASELINE))
    wait_shown(driver, shown(0, 0, 0, BASELINE), "#vs-later")
    bad = wait_until(lambda: widget(driver, "#vs-bad"), lambda w: w.get("state") == "error")
    assert bad["error"] == "No such site: Dong Ha" and bad["stale_mark"] is False
    arrive(service, 1)
    got = wait_shown(driver, shown(1, 0, 1, BASELINE + 1), "#vs-later")
    assert got["state"] == "live"
    assert len(portal.proxied("GET", "/counter/stream")) == 1  # one stream for both
    assert portal.proxied("GET", "Dong") == []


def screenshot(driver: Any, element: WebElement, path: Path) -> None:
    """A test artifact: the element, scrolled into view first (so that it is all there)."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    element.screenshot(str(path))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_both_languages_formats_screenshots_iframe_and_svg(
    service: Service, portal: Portal, browsers: Browsers, artifacts: Path
) -> None:
    extra = (
        f'<iframe id="frame" src="{service.url}/widget/{SITE}?lang=en" title="Visitor statistics" '
        'width="300" height="260" style="border:0"></iframe>\n'
        f'<img id="svg-vi" src="{service.url}/v1/sites/{SITE}/counter.svg?lang=vi" alt="">\n'
        f'<img id="svg-en" src="{service.url}/v1/sites/{SITE}/counter.svg?lang=en" alt="">'
    )
    url = portal.page(
        "home", portal_page(service.url, beacon=False, widgets=("vi", "en"), extra=extra)
    )
    driver = browsers.open()
    driver.get(url)
    # Nobody has visited yet: the total is the legacy counter's value, as each locale writes it.
    vi = wait_shown(driver, shown(0, 0, 0, BASELINE, "vi"), "#vs-vi")
    en = wait_shown(driver, shown(0, 0, 0, BASELINE, "en"), "#vs-en")
    assert vi["numbers"]["visits-total"] == "23.070.412"
    assert en["numbers"]["visits-total"] == "23,070,412"
    assert "Thống kê truy cập" in driver.find_element(By.ID, "vs-vi").text
    assert "Tổng lượt truy cập" in driver.find_element(By.ID, "vs-vi").text
    assert "Visitor statistics" in driver.find_element(By.ID, "vs-en").text
    assert "Total visits" in driver.find_element(By.ID, "vs-en").text
    # accessible markup: labelled lists (test_the_numbers_are_labelled_and_not_announced...)
    labels = driver.execute_script(
        "return [...document.querySelectorAll('#vs-en ul')].map(u => u.getAttribute('aria-label'))"
    )
    assert labels == ["Online now", "Visits"]
    for lang in ("vi", "en"):
        path = artifacts / f"widget-{lang}.png"
        path.unlink(missing_ok=True)
        screenshot(driver, driver.find_element(By.ID, f"vs-{lang}"), path)
        width, height = png_size(path)
        assert path.stat().st_size > 1000
        assert width > 100
        assert height > 100

    # A visitor arrives: both widgets (one stream) follow.
    arrive(service, 1)
    wait_shown(driver, shown(1, 0, 1, BASELINE + 1, "vi"), "#vs-vi")
    wait_shown(driver, shown(1, 0, 1, BASELINE + 1, "en"), "#vs-en")
    assert wait_counter(service.url, SITE, lambda c: c["online"]["total"] == 1)["visits"] == {
        "today": 1, "yesterday": 0, "this_week": 1, "this_month": 1, "total": BASELINE + 1
    }  # fmt: skip

    # the SVG images
    for lang in ("vi", "en"):
        img = driver.find_element(By.ID, f"svg-{lang}")
        assert (
            wait_until(
                lambda i=img: driver.execute_script("return arguments[0].naturalWidth", i),
                lambda w: bool(w),
            )
            >= 240
        )
        path = artifacts / f"counter-svg-{lang}.png"
        screenshot(driver, img, path)
        assert png_size(path)[0] >= 240
        assert png_size(path)[1] >= 170

    # the iframe: the block as a page of its own, live too
    frame = driver.find_element(By.ID, "frame")
    path = artifacts / "widget-iframe-en.png"
    driver.switch_to.frame(frame)
    inner = wait_shown(
        driver,
        shown(1, 0, 1, BASELINE + 1, "en"),
        "[data-visitorstats-widget]",
    )
    assert inner["state"] == "live"
    # styled, under the page's Content-Security-Policy (widget.js's own <style>)
    style = "return getComputedStyle(document.querySelector('[data-visitorstats-widget] ul'))"
    assert driver.execute_script(style + ".listStyleType") == "none"
    driver.switch_to.default_content()
    # the page's two widgets share one stream; the iframe, a page of its own, has its own
    assert metric(service.url, "visitorstats_stream_subscribers") == 2
    screenshot(driver, frame, path)
    assert png_size(path)[0] > 100


def test_the_numbers_are_labelled_and_not_announced_at_each_change(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    """The numbers change up to once a second: in a live region, a screen reader read them out
    again and again. They are a labelled group, read when the reader comes to them; only the
    one-off "No such site" is announced."""
    url = portal.page("home", portal_page(service.url, beacon=False, widgets=("vi", "en")))
    driver = browsers.open()
    driver.get(url)
    wait_shown(driver, shown(0, 0, 0, BASELINE, "vi"), "#vs-vi")
    arrive(service, 1)
    wait_shown(driver, shown(1, 0, 1, BASELINE + 1, "vi"), "#vs-vi")
    found = driver.execute_script(
        """return [...document.querySelectorAll('[data-visitorstats-widget]')].map(w => {
          const numbers = [...w.querySelectorAll('.vs-n[data-vs]')];
          return {
            numbers: numbers.length,
            live: numbers.filter(n => n.closest('[aria-live]:not([aria-live=off])')).length,
            groups: numbers.map(n => {
              const g = n.closest('[role=group]');
              return g && g.getAttribute('aria-label');
            }),
            error_live: w.querySelector('[data-vs=error]').getAttribute('aria-live'),
          };
        })"""
    )
    assert found == [
        {"numbers": 5, "live": 0, "groups": ["Thống kê truy cập"] * 5, "error_live": "polite"},
        {"numbers": 5, "live": 0, "groups": ["Visitor statistics"] * 5, "error_live": "polite"},
    ]


@pytest.mark.parametrize("stream", ["on", "off"])
def test_a_widget_of_an_unknown_site_says_so_and_stops_asking(
    service: Service, portal: Portal, browsers: Browsers, stream: str
) -> None:
    """A typo in data-site: the counter answers 404, the widget shows its error state (not the
    stale mark of a service that is away) and asks no more."""
    url = portal.page(
        "typo",
        portal_page(
            service.url,
            site="dongah",
            beacon=False,
            widget_from=portal.proxy_url,
            widget_attrs=f'data-stream="{stream}" data-poll="1"',
        ),
    )
    driver = browsers.open()
    driver.get(url)
    got = wait_until(lambda: widget(driver), lambda w: w.get("state") == "error")
    assert got["state"] == "error" and got["stale_mark"] is False
    assert got["error"] == "Không có trang: dongah"  # said on the page, not only in the console
    assert not driver.find_element(By.CSS_SELECTOR, "#vs-vi .vs-body").is_displayed()
    asked = len(portal.proxied("GET", "/v1/sites/dongah/counter"))
    assert asked >= 1
    time.sleep(3)  # three polls' worth
    assert len(portal.proxied("GET", "/v1/sites/dongah/counter")) == asked
    assert widget(driver)["state"] == "error"


def test_the_demo_page_counts_itself_and_shows_it(
    service: Service, browsers: Browsers, artifacts: Path
) -> None:
    driver = browsers.open()
    driver.get(f"{service.url}/")
    c = wait_counter(service.url, SITE, lambda c: c["online"]["total"] == 1)
    assert c["online"]["guests"] == 1
    assert c["visits"]["total"] == BASELINE + 1
    widgets = driver.find_elements(By.CSS_SELECTOR, "[data-visitorstats-widget]")
    assert [w.get_attribute("data-lang") for w in widgets] == ["vi", "en"]
    wait_shown(driver, shown(1, 0, 1, BASELINE + 1, "vi"), "[data-lang=vi]")
    wait_shown(driver, shown(1, 0, 1, BASELINE + 1, "en"), "[data-lang=en]")
    # The snippets shown are the ones for this service, as the browser reached it.
    code = driver.find_element(By.TAG_NAME, "main").text
    assert f'<script defer src="{service.url}/beacon.js" data-site="{SITE}"' in code
    assert f'<script defer src="{service.url}/widget.js"></script>' in code
    # The in-page navigation button: one more page view, no new visit.
    driver.find_element(By.ID, "demo-nav").click()
    c = wait_counter(service.url, SITE, lambda c: c["pageviews"]["today"] == 2)
    assert (c["pageviews"]["today"], c["visits"]["today"]) == (2, 1)
    driver.save_screenshot(str(artifacts / "demo-page.png"))
    assert png_size(artifacts / "demo-page.png")[0] > 100


def test_the_demo_page_counts_itself_for_a_site_that_takes_its_beacons(
    tmp_path: Path, browsers: Browsers
) -> None:
    """The registry's first site lists only its portal's origin: the demo page once embedded
    its beacon, refused (403), and counted nothing. It takes the first site that allows the
    page's own origin (here by name; an empty list allows it too); with none, it says so."""
    locked = '[sites.portal]\norigins = ["https://portal.example.vn"]\ntimezone = "UTC"\n'
    service = Service("run", tmp_path / "some")
    service.workdir.mkdir()
    write_sites(
        service.workdir,
        locked + f'[sites.own]\norigins = ["{service.url}"]\ntimezone = "UTC"\n[sites.open]\n',
    )
    service.start()
    try:
        driver = browsers.open()
        driver.get(f"{service.url}/")
        c = wait_counter(service.url, "own", lambda c: c["online"]["total"] == 1)
        assert (c["online"]["guests"], c["pageviews"]["today"]) == (1, 1)
        assert metric(service.url, "visitorstats_beacons_dropped_total", reason="origin") == 0
    finally:
        service.stop()

    service = Service("run", tmp_path / "none")
    service.workdir.mkdir()
    write_sites(service.workdir, locked)
    service.start()
    try:
        status, _, body = http("GET", f"{service.url}/")
        assert status == 200
        assert b"beacon.js" not in body
        assert (
            "no site of the registry takes beacons from this page's origin, "
            f"{service.url}: each lists its origins, without it"
        ) in body.decode()
    finally:
        service.stop()


def test_the_widget_keeps_the_last_numbers_with_a_stale_mark_while_the_service_is_away(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    url = portal.page("home", portal_page(service.url, beacon=False, widget_attrs='data-poll="1"'))
    arrive(service, 1)
    driver = browsers.open()
    driver.get(url)
    last = shown(1, 0, 1, BASELINE + 1)
    got = wait_shown(driver, last)
    assert got["stale_mark"] is False
    got = wait_until(lambda: widget(driver), lambda w: w.get("state") == "live")
    assert got["state"] == "live"

    assert service.stop() == 0
    got = wait_until(lambda: widget(driver), lambda w: w.get("state") == "stale", timeout=60)
    assert got["state"] == "stale"
    assert got["stale_mark"] is True
    assert got["numbers"] == last  # the last good numbers, not dashes, not zeros

    # Back (same data, same port): the mark goes, the numbers follow again, over the stream
    # again as soon as the service answers (not after the minute a stream that failed by
    # itself waits before it is tried again)
    service.start()
    got = wait_until(lambda: widget(driver), lambda w: w.get("state") == "live", timeout=30)
    assert got["state"] == "live" and got["stale_mark"] is False
    assert metric(service.url, "visitorstats_stream_subscribers") == 1
    arrive(service, 2)
    wait_shown(driver, shown(2, 0, 2, BASELINE + 2))


TABS = 8  # more than the 6 connections a browser opens to one host over HTTP/1.1


def test_the_tabs_of_a_portal_share_one_stream_and_every_page_view_counts(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    """Eight tabs of the portal, the beacon and the widget both from the service's one host
    (as ``visitorstats run`` serves them, HTTP/1.1): a stream per tab would hold every
    connection the browser allows that host, and the seventh tab's page view would wait for
    one. Here one tab streams and relays to the others: every page view counts, every widget
    is live, the service holds one stream; when the streaming tab closes, another takes over."""
    url = portal.page("home", portal_page(service.url, heartbeat="0"))
    driver = browsers.open()
    driver.get(url)
    for _ in range(TABS - 1):
        driver.switch_to.new_window("tab")
        driver.get(url)
    c = wait_counter(service.url, SITE, lambda c: c["pageviews"]["today"] == TABS, timeout=30)
    assert c["pageviews"]["today"] == TABS
    # one browser, one reader: one visitor online, one visit
    want = shown(1, 0, 1, BASELINE + 1)
    relays = []
    for handle in driver.window_handles:
        driver.switch_to.window(handle)
        got = wait_until(
            lambda: widget(driver), lambda w: w["state"] == "live" and w["numbers"] == want
        )
        assert got["state"] == "live" and got["numbers"] == want, got
        relays.append(got["relay"])
    assert sorted(relays) == ["follower"] * (TABS - 1) + ["leader"]
    assert metric(service.url, "visitorstats_stream_subscribers") == 1

    # the leading tab closes: another tab leads, and every remaining tab stays live
    driver.switch_to.window(driver.window_handles[relays.index("leader")])
    driver.close()
    handles = driver.window_handles
    assert len(handles) == TABS - 1
    arrive(service, 1)
    want = shown(2, 0, 2, BASELINE + 2)
    relays = []
    for handle in handles:
        driver.switch_to.window(handle)
        got = wait_until(
            lambda: widget(driver), lambda w: w["state"] == "live" and w["numbers"] == want
        )
        assert got["state"] == "live" and got["numbers"] == want, got
        relays.append(got["relay"])
    assert relays.count("leader") == 1
    wait_until(lambda: metric(service.url, "visitorstats_stream_subscribers"), lambda n: n == 1)
    assert metric(service.url, "visitorstats_stream_subscribers") == 1


def test_a_page_streams_two_sites_at_most_and_polls_the_others(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    """Widgets of several sites on one page: two streams, the others poll, and the page's own
    page view still goes through."""
    divs = "".join(
        f'<div data-visitorstats-widget data-site="{site}" id="vs-{site}" data-poll="1"></div>'
        for site in ("dongha", "utc", "locked")
    )
    url = portal.page("many", portal_page(service.url, extra=divs, widgets=("vi",)))
    driver = browsers.open()
    driver.get(url)
    states = {}
    for site in ("dongha", "utc", "locked"):
        got = wait_until(
            lambda site=site: widget(driver, f"#vs-{site}"),
            lambda w: w.get("state") in {"live", "polling"},
        )
        states[site] = got["state"]
    assert sorted(states.values()) == ["live", "live", "polling"], states
    assert wait_counter(service.url, SITE, lambda c: c["pageviews"]["today"] == 1)


def test_back_to_a_page_with_the_widget_comes_from_the_back_forward_cache(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    """The widget holds no stream and no channel while its page is in the back/forward cache
    (a BroadcastChannel message would evict it: Back would load the page again), and is live
    again once the page is back."""
    marker = (
        "<script>addEventListener('pageshow', function (e) "
        "{ if (e.persisted) document.title = 'restored'; });</script>"
    )
    first = portal.page("first", portal_page(service.url, beacon=False, extra=marker))
    second = portal.page("second", portal_page(service.url, beacon=False))
    driver = browsers.open()
    driver.get(first)
    wait_until(lambda: widget(driver), lambda w: w.get("state") == "live")
    driver.get(second)
    wait_until(lambda: widget(driver), lambda w: w.get("state") == "live")
    driver.back()
    assert wait_until(lambda: driver.title, lambda t: t == "restored") == "restored"
    arrive(service, 1)
    got = wait_shown(driver, shown(1, 0, 1, BASELINE + 1))
    assert got["state"] == "live"


def test_under_a_nonce_policy_the_widgets_style_carries_the_scripts_nonce(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    """A portal whose CSP allows scripts and styles by nonce gives widget.js its nonce: the
    block's own <style> carries it and applies (an outside audit saw the block unstyled, and
    the refusal in the console)."""
    csp = (
        f"default-src 'none'; script-src 'nonce-abc123'; style-src 'nonce-abc123'; "
        f"connect-src {service.url}; img-src data:"
    )
    head = f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
    html = (
        portal_page(service.url, beacon=False, head=head)
        .replace("<script defer src=", '<script nonce="abc123" defer src=')
        .replace('<aside style="width:20rem">', "<aside>")  # (the page's own, refused too)
    )
    driver = browsers.open()
    driver.get(portal.page("nonce", html))
    wait_shown(driver, shown(0, 0, 0, BASELINE))
    style = "return getComputedStyle(document.querySelector('#vs-vi ul'))"
    assert driver.execute_script(style + ".listStyleType") == "none"
    refused = [e for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]
    assert refused == []


def test_a_quiet_stream_that_is_well_is_not_opened_again(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    """A stream silent for a while is checked with one request; numbers the stream already
    gave are no sign of a lost stream (the check sends the page's first ETag, and a changed
    counter answers 200 with them: the widget reopened its stream after every change)."""
    url = portal.page("home", portal_page(service.url, beacon=False, widget_from=portal.proxy_url))
    driver = browsers.open()
    driver.get(url)
    wait_shown(driver, shown(0, 0, 0, BASELINE))
    got = wait_until(lambda: widget(driver), lambda w: w.get("state") == "live")
    assert got["state"] == "live"
    arrive(service, 1)  # said over the stream
    wait_shown(driver, shown(1, 0, 1, BASELINE + 1))
    changed = time.monotonic()
    checks = len(portal.proxied("GET", "/counter"))  # (the stream's path too)
    # silent for 15 s: checked within 5 s more (the numbers stay: no one else arrives)
    wait_until(lambda: len(portal.proxied("GET", "/counter")), lambda n: n > checks, timeout=40)
    check = [h for h in portal.proxied("GET", "/counter") if not h.path.endswith("/stream")][-1]
    assert check.status == 200 and check.if_none_match  # the first ETag: the numbers since
    assert time.monotonic() - changed >= 14
    time.sleep(1)
    assert len(portal.proxied("GET", "/counter/stream")) == 1  # not opened again
    assert widget(driver)["state"] == "live"


def test_a_block_shows_the_visits_rows_its_portal_asks_for(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    """``data-visits`` names the rows a portal's legacy block had (yesterday, this week, this
    month; an outside audit found no way to show them), in the block's order, live."""
    url = portal.page(
        "home",
        portal_page(
            service.url,
            beacon=False,
            widgets=("vi", "en"),
            widget_attrs='data-visits="month, yesterday week TOTAL"',
        ),
    )
    driver = browsers.open()
    driver.get(url)
    arrive(service, 1)
    want = {
        "guests": "1",
        "members": "0",
        "total": "1",
        "visits-yesterday": "0",
        "visits-week": "1",
        "visits-month": "1",
        "visits-total": f"{BASELINE + 1:,}".replace(",", "."),
    }
    got = wait_until(lambda: widget(driver), lambda w: w.get("numbers") == want)
    assert got["numbers"] == want
    labels = driver.execute_script(
        "return [...document.querySelectorAll('#vs-en .vs-visits .vs-k')].map(e => e.textContent)"
    )
    assert labels == ["Visits yesterday", "Visits this week", "Visits this month", "Total visits"]
