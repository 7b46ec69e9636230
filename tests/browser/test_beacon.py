"""beacon.js in headless Chromium, on a portal page served from another origin than the service:
what the reader's browser sends, and what the service counts of it (checked exactly, through the
counter JSON, the service's metrics and the widget on the very same page)."""

from __future__ import annotations

import gzip
import json
from typing import Any
from urllib.parse import urlencode

import pytest
from selenium.webdriver.common.by import By

from tests.browser.portal import (
    USER_AGENTS,
    Browsers,
    Portal,
    metric,
    online,
    open_tab,
    portal_page,
    shown,
    wait_until,
    widget,
)
from tests.support.procs import Service, counter, http

pytestmark = pytest.mark.browser
SITE = "dongha"
BASELINE_VISITS = 23070412
BASELINE_PAGEVIEWS = 1000


def totals(service: Service, site: str = SITE) -> dict[str, Any]:
    c = counter(service.url, site)
    return {
        "online": online(c),
        "visits_today": c["visits"]["today"],
        "visits_total": c["visits"]["total"],
        "pageviews_today": c["pageviews"]["today"],
        "pageviews_total": c["pageviews"]["total"],
    }


def expect(guests: int, members: int, visits: int, pageviews: int, bots: int = 0) -> dict[str, Any]:
    return {
        "online": {"guests": guests, "members": members, "total": guests + members, "bots": bots},
        "visits_today": visits,
        "visits_total": BASELINE_VISITS + visits,
        "pageviews_today": pageviews,
        "pageviews_total": BASELINE_PAGEVIEWS + pageviews,
    }


def accepted(service: Service, site: str) -> float:
    return metric(service.url, "visitorstats_beacons_accepted_total", site=site)


def test_a_page_view_shows_in_the_widget_with_the_reader_online(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    url = portal.page("article", portal_page(service.url))
    assert url.split("/")[2] != service.url.split("/")[2]  # another origin than the service
    driver = browsers.open()
    driver.get(url)

    want = expect(guests=1, members=0, visits=1, pageviews=1)
    assert wait_until(lambda: totals(service), lambda t: t == want) == want
    want_shown = shown(guests=1, members=0, visits_today=1, visits_total=BASELINE_VISITS + 1)
    got = wait_until(lambda: widget(driver), lambda w: w.get("numbers") == want_shown)
    assert got["numbers"] == want_shown
    assert got["numbers"]["visits-total"] == "23.070.413"
    assert got["state"] == "live"
    assert got["stale_mark"] is False
    assert got["as_of"]
    # heartbeats (every 2 s on this page) keep the reader online and add no visit or page view
    beats = accepted(service, SITE)
    wait_until(lambda: accepted(service, SITE), lambda n: n >= beats + 2)
    assert accepted(service, SITE) >= beats + 2
    assert totals(service) == want


def test_a_title_cut_at_its_limit_inside_an_emoji_is_still_a_page_view(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    """The 512th UTF-16 unit of this title is the first half of an emoji: cut there, it would
    be a lone surrogate, which JSON.stringify writes as an escape the service once refused (the
    whole page view lost) and encodeURIComponent, the pixel's fallback, throws on. beacon.js
    now cuts before the emoji, and the service drops such a half where another script sent
    one (tests/integration/test_ingest_fuzz.py)."""
    title = "Tin tức ".ljust(511, "x") + "\U0001f600 thêm"
    page = portal.page("emoji", portal_page(service.url, title=title, heartbeat="3600"))
    driver = browsers.open()
    driver.get(page)
    want = expect(guests=1, members=0, visits=1, pageviews=1)
    assert wait_until(lambda: totals(service), lambda t: t == want) == want
    assert metric(service.url, "visitorstats_ingest_requests_total", outcome="invalid") == 0


def test_three_visitors_online_one_closes_a_tab_members_and_bots(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    guest_page = portal.page("guest", portal_page(service.url))
    member_page = portal.page("member", portal_page(service.url, member="1"))
    readers = []
    for ua, page in (
        ("windows-chrome", guest_page),
        ("mac-chrome", guest_page),
        ("linux-edge", member_page),  # logged in to the portal: data-member="1"
    ):
        driver = browsers.open(USER_AGENTS[ua])
        readers.append((driver, open_tab(driver, page)))

    want = expect(guests=2, members=1, visits=3, pageviews=3)
    assert wait_until(lambda: totals(service), lambda t: t == want) == want
    want_shown = shown(guests=2, members=1, visits_today=3, visits_total=BASELINE_VISITS + 3)
    for driver, _ in readers:
        got = wait_until(lambda d=driver: widget(d), lambda w: w.get("numbers") == want_shown)
        assert got["numbers"] == want_shown

    # Chromium as it comes says "HeadlessChrome": a bot, tallied on its own, never a visitor.
    bot = browsers.open(user_agent=None)
    bot.get(guest_page)
    want = expect(guests=2, members=1, visits=3, pageviews=3, bots=1)
    assert wait_until(lambda: totals(service), lambda t: t == want) == want

    # The member closes the tab: a leave through sendBeacon on pagehide takes them off at once,
    # not when their 300 s online window runs out.
    member_driver, member_tab = readers[2]
    member_driver.switch_to.window(member_tab)
    member_driver.close()
    want = expect(guests=2, members=0, visits=3, pageviews=3, bots=1)
    assert wait_until(lambda: totals(service), lambda t: t == want) == want
    # One of the guests too.
    guest_driver, guest_tab = readers[0]
    guest_driver.switch_to.window(guest_tab)
    guest_driver.close()
    want = expect(guests=1, members=0, visits=3, pageviews=3, bots=1)
    assert wait_until(lambda: totals(service), lambda t: t == want) == want
    # The one reader left sees it on their widget, live.
    want_shown = shown(guests=1, members=0, visits_today=3, visits_total=BASELINE_VISITS + 3)
    got = wait_until(lambda: widget(readers[1][0]), lambda w: w.get("numbers") == want_shown)
    assert got["numbers"] == want_shown
    assert got["state"] == "live"


@pytest.mark.parametrize("how", ["background-tab", "minimized-window"])
def test_a_hidden_page_stops_its_heartbeats(
    service: Service, portal: Portal, browsers: Browsers, how: str
) -> None:
    """The reader of ``dongha`` hides the page; a page of another site (``utc``) stays visible
    and keeps beating, which shows time passing with heartbeats due. The service's own
    per-site count of accepted beacons shows that none comes from the hidden page."""
    article = portal.page("article", portal_page(service.url))
    other = portal.page("other", portal_page(service.url, site="utc", widgets=()))
    driver = browsers.open()
    article_tab = open_tab(driver, article)
    one = expect(guests=1, members=0, visits=1, pageviews=1)
    assert wait_until(lambda: totals(service), lambda t: t == one) == one
    visible = accepted(service, SITE)
    assert wait_until(lambda: accepted(service, SITE), lambda n: n >= visible + 2) >= visible + 2

    if how == "background-tab":
        open_tab(driver, other)  # the reader switches to another tab of the same browser
    else:
        browsers.open(USER_AGENTS["mac-chrome"]).get(other)  # someone else's visible page
        driver.minimize_window()
    # Hidden: a leave, so the reader is off the counter at once ...
    gone = expect(guests=0, members=0, visits=1, pageviews=1)
    assert wait_until(lambda: totals(service), lambda t: t == gone) == gone
    hidden_at = accepted(service, SITE)
    beats_at = accepted(service, "utc")
    # ... and no heartbeat while hidden: four heartbeats of the visible page later, not one
    # beacon more from the hidden one.
    wait_until(lambda: accepted(service, "utc"), lambda n: n >= beats_at + 4)
    assert accepted(service, "utc") >= beats_at + 4
    assert accepted(service, SITE) == hidden_at
    assert totals(service) == gone

    # Visible again: a heartbeat at once (the reader is back online, in the same visit) and
    # heartbeats again.
    if how == "background-tab":
        driver.switch_to.window(article_tab)
    else:
        driver.maximize_window()
    assert wait_until(lambda: totals(service), lambda t: t == one) == one
    back = accepted(service, SITE)
    assert wait_until(lambda: accepted(service, SITE), lambda n: n >= back + 2) >= back + 2
    assert totals(service) == one


def test_a_reader_moving_between_two_tabs_of_the_portal_stays_online(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    """Each switch hides one tab (its leave) and shows the other (its heartbeat). The heartbeat
    goes a second late, after the leave: were they to cross, the leave would be the latest
    event and the reader, reading on in the other tab, would show as gone until the next
    heartbeat."""
    # heartbeats minutes apart: a reader shown gone would stay so for minutes
    first = portal.page("article-1", portal_page(service.url, widgets=(), heartbeat="300"))
    second = portal.page("article-2", portal_page(service.url, widgets=(), heartbeat="300"))
    driver = browsers.open()
    tabs = [open_tab(driver, first), open_tab(driver, second)]
    one = expect(guests=1, members=0, visits=1, pageviews=2)
    assert wait_until(lambda: totals(service), lambda t: t == one) == one
    for switch in range(8):
        before = accepted(service, SITE)
        driver.switch_to.window(tabs[switch % 2])
        # the hidden tab's leave and the shown tab's heartbeat, both in ...
        both = before + 2
        assert wait_until(lambda: accepted(service, SITE), lambda n, both=both: n >= both) >= both
        # ... and the reader online (not gone until the next heartbeat, minutes later)
        got = wait_until(lambda: totals(service), lambda t: t == one, timeout=20)
        assert got == one, switch


def test_a_login_without_a_page_load_counts_the_reader_as_a_member(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    """A single-page portal logs the reader in where they are: it sets data-member on the
    script tag and moves on with pushState. The next beacon says member."""
    url = portal.page("spa-login", portal_page(service.url, widgets=()))
    driver = browsers.open()
    driver.get(url)
    guest = expect(guests=1, members=0, visits=1, pageviews=1)
    assert wait_until(lambda: totals(service), lambda t: t == guest) == guest
    driver.execute_script(
        "document.querySelector('script[data-site]').setAttribute('data-member', '1');"
        "history.pushState({}, '', '/spa-login?account=1')"
    )
    member = expect(guests=0, members=1, visits=1, pageviews=2)
    assert wait_until(lambda: totals(service), lambda t: t == member) == member


def test_in_page_navigation_is_one_more_page_view_and_no_new_visit(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    # beacon.js through the proxy, so that every beacon the page sends is seen on its way
    url = portal.page("spa", portal_page(service.url, beacon_from=portal.proxy_url))
    driver = browsers.open()
    driver.get(url)
    want = expect(guests=1, members=0, visits=1, pageviews=1)
    assert wait_until(lambda: totals(service), lambda t: t == want) == want

    # the portal's router moves to another article without loading a page
    driver.execute_script("history.pushState({}, '', '/spa?article=2')")
    want = expect(guests=1, members=0, visits=1, pageviews=2)
    assert wait_until(lambda: totals(service), lambda t: t == want) == want
    # an anchor on the same page is no page view; the back button (popstate) is one
    driver.execute_script("history.pushState({}, '', '/spa?article=2#comments')")
    driver.execute_script("history.back()")
    assert wait_until(lambda: driver.current_url, lambda u: u.endswith("article=2")).endswith(
        "article=2"
    )
    driver.execute_script("history.back()")
    assert wait_until(lambda: driver.current_url, lambda u: u.endswith("/spa")).endswith("/spa")
    want = expect(guests=1, members=0, visits=1, pageviews=3)
    assert wait_until(lambda: totals(service), lambda t: t == want) == want
    # The widget on the page has followed.
    want_shown = shown(guests=1, members=0, visits_today=1, visits_total=BASELINE_VISITS + 1)
    assert (
        wait_until(lambda: widget(driver), lambda w: w.get("numbers") == want_shown)["numbers"]
        == want_shown
    )
    # a fragment (here a token) is no part of a page's address sent on
    driver.execute_script("history.pushState({}, '', '/spa?article=3#access_token=FRAGSECRET')")
    want = expect(guests=1, members=0, visits=1, pageviews=4)
    assert wait_until(lambda: totals(service), lambda t: t == want) == want
    # Only text/plain POSTs (no CORS preflight) went out, none with a fragment.
    posts = portal.proxied("POST", "/collect")
    assert len(posts) >= 3
    assert all(h.status == 202 for h in posts)
    assert [h for h in posts if b"#" in h.body or b"FRAGSECRET" in h.body] == []
    assert portal.proxied("OPTIONS") == []
    assert totals(service) == want


def test_back_to_a_page_from_the_back_forward_cache_is_a_page_view_and_no_new_visit(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    """The back button restores the page as it was (no load, no script run again): beacon.js
    counts that page view (and, having sent a leave when the page was left, the reader is
    online again)."""
    restored = (
        "<script>addEventListener('pageshow', function (e) "
        "{ if (e.persisted) document.title = 'restored'; });</script>"
    )
    first = portal.page("first", portal_page(service.url, widgets=(), extra=restored))
    second = portal.page("second", portal_page(service.url, widgets=()))
    driver = browsers.open()
    driver.get(first)
    want = expect(guests=1, members=0, visits=1, pageviews=1)
    assert wait_until(lambda: totals(service), lambda t: t == want) == want
    driver.get(second)
    want = expect(guests=1, members=0, visits=1, pageviews=2)
    assert wait_until(lambda: totals(service), lambda t: t == want) == want
    driver.back()
    # the page came back from the cache (not loaded again)...
    assert wait_until(lambda: driver.title, lambda t: t == "restored") == "restored"
    # ...and counts as a page view of the same visit, with the reader online
    want = expect(guests=1, members=0, visits=1, pageviews=3)
    assert wait_until(lambda: totals(service), lambda t: t == want) == want


def test_a_page_without_script_is_counted_through_the_pixel(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    page_url = f"{portal.url}/noscript"
    pixel = f"{service.url}/collect.gif?" + urlencode(
        {"site": SITE, "type": "pageview", "url": page_url}
    ).replace("&", "&amp;")
    html = portal_page(
        service.url,
        extra=(
            f'<noscript><img id="pixel" src="{pixel}" alt="" width="1" height="1"></noscript>\n'
            f'<noscript><img id="svg" src="{service.url}/v1/sites/{SITE}/counter.svg?lang=vi" '
            'alt="Thống kê truy cập"></noscript>'
        ),
    )
    portal.page("noscript", html)
    driver = browsers.open(javascript=False)
    driver.get(page_url)
    want = expect(guests=1, members=0, visits=1, pageviews=1)
    assert wait_until(lambda: totals(service), lambda t: t == want) == want
    assert (
        metric(
            service.url, "visitorstats_ingest_requests_total", endpoint="pixel", outcome="accepted"
        )
        == 1
    )
    # No script ran: the widget stayed an empty div, and the SVG image stood in for it.
    assert driver.find_element(By.ID, "vs-vi").text == ""
    svg = driver.find_element(By.ID, "svg")
    assert svg.size["width"] >= 240
    assert svg.size["height"] > 100


def test_beacon_js_as_served_is_small_and_cacheable(service: Service) -> None:
    status, headers, body = http("GET", f"{service.url}/beacon.js")
    assert status == 200
    assert headers["Content-Type"].startswith(("application/javascript", "text/javascript"))
    assert "max-age" in headers.get("Cache-Control", "")
    assert b"sendBeacon" in body
    # as a browser gets it: compressed by the service itself
    status, headers, packed = http(
        "GET", f"{service.url}/beacon.js", headers={"Accept-Encoding": "gzip, deflate, br"}
    )
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(packed) == body
    assert len(packed) <= 2560, f"beacon.js is {len(packed)} bytes gzipped"


def test_a_portals_own_beacon_sent_as_a_json_blob_is_counted(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    """A portal's own script sending beacons with ``navigator.sendBeacon`` and a Blob of
    ``application/json``: the browser sends credentials and asks first (a preflight), and
    sends nothing when the answer allows any origin (``*``). All three count."""
    send = f"""
    <script>
    for (let i = 0; i < 3; i++) {{
      const beacon = {{site: "{SITE}", url: location.href + "?n=" + i, visitor: "reader-1",
                       event_id: crypto.randomUUID()}};
      const type = i ? "application/json" : "application/json; charset=utf-8";
      navigator.sendBeacon("{service.url}/collect",
                           new Blob([JSON.stringify(beacon)], {{type: type}}));
    }}
    </script>"""
    page = portal.page("own-beacon", portal_page(service.url, beacon=False, extra=send))
    driver = browsers.open()
    driver.get(page)
    want = expect(guests=1, members=0, visits=1, pageviews=3)
    assert wait_until(lambda: totals(service), lambda t: t == want) == want
    assert accepted(service, SITE) == 3


def test_the_tag_pasted_twice_counts_a_page_once_and_another_sites_tag_counts_too(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    """A CMS whose header and footer partials both carry the snippet: one page, one beacon of
    the site (it counted each view twice, and beat and left twice). A tag of another site on
    the same page still counts the page for that site."""
    footer = (
        f'<script defer src="{service.url}/beacon.js" data-site="{SITE}" data-member="0" '
        'data-heartbeat="3600"></script>\n'
        f'<script defer src="{service.url}/beacon.js" data-site="utc" '
        'data-heartbeat="3600"></script>'
    )
    url = portal.page("twice", portal_page(service.url, widgets=(), heartbeat="3600", extra=footer))
    driver = browsers.open()
    driver.get(url)
    assert wait_until(lambda: totals(service, "utc")["pageviews_today"], lambda n: n == 1) == 1
    # The page moves on (pushState): one page view more of each site. The other site's, sent
    # with the second one of this site (had it run), is the mark that all of them are in.
    driver.execute_script("history.pushState({}, '', '/twice?article=2')")
    assert wait_until(lambda: totals(service, "utc")["pageviews_today"], lambda n: n == 2) == 2
    assert wait_until(lambda: totals(service)["pageviews_today"], lambda n: n >= 2) == 2
    assert totals(service) == expect(guests=1, members=0, visits=1, pageviews=2)
    assert accepted(service, SITE) == 2


def test_under_a_strict_content_security_policy_the_beacons_go_through_the_pixel(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    """A portal whose CSP lets the service's script and images in, but no connection to it:
    fetch is refused, and so is sendBeacon (which says true all the same). The pixel, allowed
    as an image, carries the page view, the heartbeats and the leave (nothing counted, before)."""
    csp = f"default-src 'none'; script-src {service.url}; connect-src 'self'; img-src {service.url}"
    head = f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
    strict = portal.page("strict", portal_page(service.url, widgets=(), head=head))
    other = portal.page("other", portal_page(service.url, site="utc", widgets=()))
    driver = browsers.open()
    open_tab(driver, strict)
    one = expect(guests=1, members=0, visits=1, pageviews=1)
    assert wait_until(lambda: totals(service), lambda t: t == one) == one

    def pixels() -> float:
        return metric(
            service.url, "visitorstats_ingest_requests_total", endpoint="pixel", outcome="accepted"
        )

    # heartbeats (every 2 s here) through the pixel too
    assert pixels() >= 1
    beats = pixels() + 2
    assert wait_until(pixels, lambda n: n >= beats) >= beats
    # hidden (the reader opens another tab): its leave takes the reader off at once
    open_tab(driver, other)
    gone = expect(guests=0, members=0, visits=1, pageviews=1)
    assert wait_until(lambda: totals(service), lambda t: t == gone) == gone


def test_a_page_whose_beacons_could_not_go_for_a_moment_sends_them_again_once_they_can(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    """The service out of reach for a moment (a restart, a network cut): the beacons refused
    meanwhile try the pixel, and the next ones go by fetch again. Under this CSP (connections
    to the service allowed, its images not) a page that kept to the pixel stopped counting for
    good: an outside audit."""
    csp = f"default-src 'none'; script-src {portal.proxy_url}; connect-src {portal.proxy_url}"
    head = f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
    options: dict[str, Any] = {"widgets": (), "beacon_from": portal.proxy_url, "head": head}
    page = portal.page("cut", portal_page(service.url, **options))
    driver = browsers.open()
    open_tab(driver, page)
    one = expect(guests=1, members=0, visits=1, pageviews=1)
    assert wait_until(lambda: totals(service), lambda t: t == one) == one

    def beats(status: int) -> int:
        return sum(1 for h in portal.proxied("POST", "/collect") if h.status == status)

    portal.collect_down = True
    assert wait_until(lambda: beats(0), lambda n: n >= 2) >= 2  # heartbeats cut off
    through = beats(202)
    portal.collect_down = False
    assert wait_until(lambda: beats(202), lambda n: n >= through + 2) >= through + 2
    driver.execute_script("history.pushState({}, '', '/cut?after')")  # and a page view
    two = expect(guests=1, members=0, visits=1, pageviews=2)
    assert wait_until(lambda: totals(service), lambda t: t == two) == two


def sent_of(portal: Portal, kind: str, url: str) -> int:
    """The beacons of ``kind`` from ``url`` that went through the proxy (beacon.js loaded
    from it)."""
    sent = [json.loads(h.body) for h in portal.proxied("POST", "/collect")]
    return sum(1 for b in sent if b["type"] == kind and b["url"] == url)


def test_a_page_passed_through_within_a_second_of_its_restore_is_no_page_view(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    """Back restores ``first`` from the back/forward cache, and it goes forward at once (as a
    reader pressing Back then Forward). Its page view and heartbeat, a second late, were
    still waiting: they went into the cache with the page and came out at the next restore,
    with that restore's own page view. They are dropped instead: a page shown for less than
    a second was passed through, not read (and its leave was sent when it was left before)."""
    flip = """<script>
    addEventListener('pageshow', function (e) {
      if (!e.persisted) return;
      if (sessionStorage.getItem('flipped')) {
        // after beacon.js's page view of this restore, a second late: the mark
        setTimeout(function () { history.pushState({}, '', '/first?after'); }, 1500);
        return;
      }
      sessionStorage.setItem('flipped', String(performance.now()));
      history.forward();
    });
    addEventListener('pagehide', function () {
      var at = sessionStorage.getItem('flipped');
      if (at && !sessionStorage.getItem('shown-ms'))
        sessionStorage.setItem('shown-ms', String(performance.now() - Number(at)));
    });
    </script>"""
    options: dict[str, Any] = {"widgets": (), "heartbeat": "3600", "beacon_from": portal.proxy_url}
    first = portal.page("first", portal_page(service.url, extra=flip, **options))
    second = portal.page("second", portal_page(service.url, **options))
    driver = browsers.open()
    driver.get(first)
    assert wait_until(lambda: totals(service)["pageviews_today"], lambda n: n == 1) == 1
    driver.get(second)
    assert wait_until(lambda: totals(service)["pageviews_today"], lambda n: n == 2) == 2
    driver.back()  # first, restored, goes forward at once: second again, one page view more
    assert wait_until(lambda: sent_of(portal, "pageview", second), lambda n: n == 2) == 2
    shown_ms = float(driver.execute_script("return sessionStorage.getItem('shown-ms')"))
    # (its page view, a second late, would have gone: the flip must be quicker; ~12 ms here)
    assert shown_ms < 900, f"first was shown {shown_ms:.0f} ms: no flip to tell"
    driver.back()  # first, restored again, and read: one page view, then the mark
    after = first + "?after"
    assert wait_until(lambda: sent_of(portal, "pageview", after), lambda n: n == 1) == 1
    assert sent_of(portal, "pageview", first) == 2  # its load, and this restore
    assert sent_of(portal, "heartbeat", first) == 0  # a page view said it already
    want = expect(guests=1, members=0, visits=1, pageviews=5)
    assert wait_until(lambda: totals(service), lambda t: t == want) == want


def test_a_page_closed_while_another_of_the_reader_is_visible_leaves_the_reader_online(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    """One reader, four pages of the portal in one browser: ``a`` in a minimised window, ``b``,
    ``c`` and ``d`` each in a window of its own. Closing ``d`` sends its leave, the reader's
    latest event: they were off the counter (for up to a heartbeat, minutes here) while
    reading ``b`` and ``c``. Now each visible page says, a second later, that the reader is
    still here: one heartbeat each, and none from the hidden ``a``.

    The marks: each page hears the leaves on the site's channel too (``visitorstats dongha``,
    beacon.js's) and, 2.5 s later, after its own heartbeat would have gone, asks the proxy for
    ``/mark/<page>/<leaves heard>``: those of ``d``'s leave in, all the heartbeats are. (``a``
    hears its own leave too: the channel's other objects in the page get a message.)"""
    mark = f"""<script>
    var heard = 0;
    new BroadcastChannel('visitorstats {SITE}').onmessage = function () {{
      var mark = '{portal.proxy_url}/mark' + location.pathname + '/' + (++heard);
      setTimeout(function () {{ fetch(mark, {{mode: 'no-cors'}}); }}, 2500);
    }};
    </script>"""
    options: dict[str, Any] = {"widgets": (), "heartbeat": "3600", "beacon_from": portal.proxy_url}
    pages = {
        name: portal.page(name, portal_page(service.url, extra=mark, **options)) for name in "abcd"
    }
    driver = browsers.open()
    driver.get(pages["a"])
    assert wait_until(lambda: totals(service)["pageviews_today"], lambda n: n == 1) == 1
    driver.minimize_window()  # hidden: its leave (no other page yet to hear it)
    assert wait_until(lambda: sent_of(portal, "leave", pages["a"]), lambda n: n == 1) == 1
    for name in "bcd":
        driver.switch_to.new_window("window")
        driver.get(pages[name])
    one = expect(guests=1, members=0, visits=1, pageviews=4)
    assert wait_until(lambda: totals(service), lambda t: t == one) == one
    assert sent_of(portal, "heartbeat", pages["b"]) == sent_of(portal, "heartbeat", pages["c"]) == 0

    driver.close()  # d's window
    assert wait_until(lambda: sent_of(portal, "leave", pages["d"]), lambda n: n == 1) == 1
    marks = {"/mark/a/2", "/mark/b/1", "/mark/c/1"}
    seen = wait_until(lambda: {h.path for h in portal.proxied("GET", "/mark/")}, marks.issubset)
    assert marks <= seen
    beats = {name: sent_of(portal, "heartbeat", pages[name]) for name in "abcd"}
    assert beats == {"a": 0, "b": 1, "c": 1, "d": 0}
    assert wait_until(lambda: totals(service), lambda t: t == one) == one


def test_a_framed_page_removed_leaves_the_reader_of_the_page_around_it_online(
    service: Service, portal: Portal, browsers: Browsers
) -> None:
    """A portal page frames another page of its own (with the beacon), then removes the frame:
    the framed page's leave, and the page around it, visible, says the reader is still here."""
    options: dict[str, Any] = {"widgets": (), "heartbeat": "3600", "beacon_from": portal.proxy_url}
    framed = portal.page("framed", portal_page(service.url, **options))
    frame = f'<iframe id="frame" src="{framed}" title="framed" width="300" height="200"></iframe>'
    host = portal.page("host", portal_page(service.url, extra=frame, **options))
    driver = browsers.open()
    driver.get(host)
    one = expect(guests=1, members=0, visits=1, pageviews=2)
    assert wait_until(lambda: totals(service), lambda t: t == one) == one
    driver.execute_script("document.getElementById('frame').remove()")
    assert wait_until(lambda: sent_of(portal, "leave", framed), lambda n: n == 1) == 1
    assert wait_until(lambda: sent_of(portal, "heartbeat", host), lambda n: n == 1) == 1
    assert wait_until(lambda: totals(service), lambda t: t == one) == one
