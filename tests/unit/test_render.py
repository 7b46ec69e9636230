"""The server-side renderings of the counter block, and static checks of the two scripts.

Behaviour in a real browser is proven by the browser tests; here: markup, escaping, formats,
and the properties of beacon.js / widget.js that can be read from their source.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from services.aggregate.render import (
    LABELS,
    STALE_MARK,
    format_number,
    normalize_lang,
    normalize_visits,
    render_demo_page,
    render_svg,
    render_unknown_page,
    render_unknown_svg,
    render_widget_page,
    svg_width,
)

ROOT = Path(__file__).resolve().parents[2]
BEACON_JS = ROOT / "services" / "ingest" / "static" / "beacon.js"
WIDGET_JS = ROOT / "services" / "aggregate" / "static" / "widget.js"
SVG_NS = "{http://www.w3.org/2000/svg}"
HOSTILE = "\"><script>alert(1)</script><x a='&amp;"


def counter(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "site": "dongha",
        "online": {"guests": 833, "members": 0, "total": 833, "bots": 12},
        "visits": {"today": 5120, "yesterday": 6021, "total": 23070412},
        "pageviews": {"today": 9811, "total": 61200311},
        "as_of": "2026-11-27T11:41:43+07:00",
        "stale": False,
    }
    data.update(overrides)
    return data


class Tags(HTMLParser):
    """Every start tag of an HTML page with its attributes, and the page's text."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str | None]]:
        return [
            a
            for t, a in self.tags
            if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]


# --- format_number ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "vi", "en"),
    [
        (0, "0", "0"),
        (999, "999", "999"),
        (1000, "1.000", "1,000"),
        (23070412, "23.070.412", "23,070,412"),
        (1234567890, "1.234.567.890", "1,234,567,890"),
        (-1000, "-1.000", "-1,000"),
    ],
)
def test_format_number(n: int, vi: str, en: str) -> None:
    assert format_number(n, "vi") == vi
    assert format_number(n, "en") == en


def test_format_number_unknown_lang_is_vietnamese() -> None:
    assert format_number(23070412, "fr") == "23.070.412"
    assert format_number(23070412, "") == "23.070.412"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("vi", "vi"),
        ("en", "en"),
        ("EN", "en"),
        ("en-US", "en"),
        ("vi-VN", "vi"),
        ("fr", "vi"),
        ("", "vi"),
        (None, "vi"),
        ("<script>", "vi"),
        ("en_GB", "en"),
        (" En-gb ", "en"),
        ("english", "vi"),
    ],
)
def test_normalize_lang(given: str | None, expected: str) -> None:
    assert normalize_lang(given) == expected


def test_labels_cover_both_languages_alike() -> None:
    assert set(LABELS) == {"vi", "en"}
    assert LABELS["vi"].keys() == LABELS["en"].keys()
    assert LABELS["vi"]["title"] == "Thống kê truy cập"
    assert LABELS["vi"]["online"] == "Người trực tuyến"
    assert (LABELS["vi"]["guests"], LABELS["vi"]["members"]) == ("Khách", "Thành viên")
    assert (LABELS["vi"]["total"], LABELS["vi"]["visits_total"]) == ("Tổng", "Tổng lượt truy cập")
    assert LABELS["en"]["title"] == "Visitor statistics"
    assert (LABELS["en"]["online"], LABELS["en"]["visits_total"]) == ("Online now", "Total visits")
    assert (LABELS["en"]["guests"], LABELS["en"]["members"]) == ("Guests", "Members")


def test_widget_js_shows_the_same_labels() -> None:
    source = WIDGET_JS.read_text(encoding="utf-8")
    for lang in LABELS.values():
        for key, label in lang.items():
            assert f'{key}: "{label}"' in source, (key, label)


# --- SVG --------------------------------------------------------------------------------------


def svg_values(svg: str) -> dict[str, str]:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG_NS}svg"
    return {
        str(el.get("data-vs")): "".join(el.itertext())
        for el in root.iter(f"{SVG_NS}text")
        if el.get("data-vs")
    }


def svg_texts(svg: str) -> list[str]:
    return ["".join(el.itertext()) for el in ET.fromstring(svg).iter(f"{SVG_NS}text")]


@pytest.mark.parametrize("lang", ["vi", "en"])
def test_svg_is_well_formed_and_shows_the_numbers(lang: str) -> None:
    svg = render_svg(counter(), lang)
    values = svg_values(svg)
    assert values == {
        "guests": "833",
        "members": "0",
        "total": "833",
        "visits-today": format_number(5120, lang),
        "visits-total": format_number(23070412, lang),
    }
    texts = svg_texts(svg)
    for key in ("title", "online", "guests", "members", "total", "visits_total"):
        assert LABELS[lang][key] in texts
    root = ET.fromstring(svg)
    assert root.get("role") == "img"
    assert int(str(root.get("width"))) == svg_width(counter(), lang) >= 240
    assert root.get("viewBox") == f"0 0 {root.get('width')} {root.get('height')}"
    # Self-contained: nothing to load, nothing to run.
    assert "<script" not in svg
    assert "href" not in svg
    assert "@import" not in svg


def test_svg_vietnamese_numbers() -> None:
    assert "23.070.412" in render_svg(counter(), "vi")
    assert "23,070,412" in render_svg(counter(), "en")


def test_svg_lang_falls_back_to_vietnamese() -> None:
    svg = render_svg(counter(), "xx")
    assert svg == render_svg(counter(), "vi")
    assert "Thống kê truy cập" in svg_texts(svg)


def test_svg_widens_for_long_numbers() -> None:
    big = counter(visits={"today": 1, "total": 123_456_789_012})
    assert svg_width(big, "vi") > svg_width(counter(), "vi")
    assert ET.fromstring(render_svg(big, "vi")).get("width") == str(svg_width(big, "vi"))


def test_svg_stale_mark() -> None:
    fresh = ET.fromstring(render_svg(counter(stale=False), "vi"))
    assert fresh.find(f".//{SVG_NS}text[@data-vs='stale']") is None
    assert STALE_MARK not in render_svg(counter(stale=False), "vi")

    for lang in ("vi", "en"):
        stale = ET.fromstring(render_svg(counter(stale=True), lang))
        mark = stale.find(f".//{SVG_NS}text[@data-vs='stale']")
        assert mark is not None
        assert STALE_MARK in "".join(mark.itertext())
        title = mark.find(f"{SVG_NS}title")
        assert title is not None and title.text == LABELS[lang]["stale"]
        # The last numbers are still shown.
        assert svg_values(ET.tostring(stale, encoding="unicode"))["guests"] == "833"


def test_svg_stale_must_be_true_not_truthy() -> None:
    assert STALE_MARK not in render_svg(counter(stale="no"), "vi")


def test_svg_escapes_hostile_values() -> None:
    hostile = counter(site=HOSTILE, as_of="\x00\x1b<b>&\ufffe" + HOSTILE)
    svg = render_svg(hostile, "en")
    root = ET.fromstring(svg)  # still well-formed: escaped, control characters dropped
    assert "<script" not in svg
    assert "<b>" not in svg
    desc = root.find(f"{SVG_NS}desc")
    assert desc is not None and desc.text is not None
    assert "<script>alert(1)</script>" in desc.text  # as text, not as markup


@pytest.mark.parametrize(
    "broken",
    [
        {},
        {"online": None, "visits": "many"},
        {"online": {"guests": "833", "members": True, "total": 1.5}, "visits": {"total": None}},
    ],
)
def test_svg_missing_or_malformed_numbers_show_a_dash(broken: dict[str, Any]) -> None:
    values = svg_values(render_svg(broken, "vi"))
    assert set(values.values()) == {"–"}


# --- the iframe page ---------------------------------------------------------------------------


@pytest.mark.parametrize("lang", ["vi", "en"])
def test_widget_page_embeds_the_script_and_the_div(lang: str) -> None:
    page = render_widget_page("dongha", lang)
    assert page.startswith("<!doctype html>")
    assert '<script defer src="/widget.js"></script>' in page
    tags = Tags(page)
    assert tags.find("html", lang=lang)
    [div] = tags.find("div", data_site="dongha")
    assert "data-visitorstats-widget" in div
    assert div["data-lang"] == lang
    assert tags.find("meta", charset="utf-8")
    [img] = tags.find("img")  # in <noscript>: the same block as an image
    assert img["src"] == f"/v1/sites/dongha/counter.svg?lang={lang}"


@pytest.mark.parametrize("lang", ["fr", "", "<script>", '"en'])
def test_widget_page_lang_falls_back_to_vietnamese(lang: str) -> None:
    page = render_widget_page("dongha", lang)
    [div] = Tags(page).find("div", data_site="dongha")
    assert div["data-lang"] == "vi"
    assert "<script>" not in page.replace('<script defer src="/widget.js">', "")


def test_widget_page_is_titled_with_the_site_name_escaped() -> None:
    page = render_widget_page("dongha", "vi", 'Đông Hà </title><script>x</script> & "co"')
    tags = Tags(page)
    assert [t for t, _ in tags.tags if t == "script"] == ["script"]  # only widget.js
    assert (
        "<title>Thống kê truy cập — Đông Hà &lt;/title&gt;&lt;script&gt;x&lt;/script&gt; "
        "&amp; &quot;co&quot;</title>" in page
    )
    assert "<title>Thống kê truy cập — dongha</title>" in render_widget_page("dongha", "vi")


def test_widget_page_escapes_the_site() -> None:
    page = render_widget_page(HOSTILE, "en")
    tags = Tags(page)
    assert [t for t, _ in tags.tags if t == "script"] == ["script"]  # only widget.js
    assert not tags.find("x")
    [div] = tags.find("div", data_site=HOSTILE)  # the attribute round-trips exactly
    assert div["data-lang"] == "en"
    [img] = tags.find("img")
    assert str(img["src"]).startswith("/v1/sites/%22%3E%3Cscript%3E")


# --- the demo page -----------------------------------------------------------------------------


def test_demo_page_embeds_both_snippets() -> None:
    page = render_demo_page("demo")
    tags = Tags(page)
    [beacon] = tags.find("script", src="/beacon.js")
    assert beacon["data-site"] == "demo"
    assert beacon["data-member"] == "0"
    assert "defer" in beacon
    assert tags.find("script", src="/widget.js")
    widgets = tags.find("div", data_site="demo")
    assert sorted(str(w["data-lang"]) for w in widgets) == ["en", "vi"]
    assert all("data-visitorstats-widget" in w for w in widgets)
    assert "visitorstats" in "".join(tags.text)


def test_demo_page_has_the_noscript_pixel() -> None:
    page = render_demo_page("demo", page_url="http://127.0.0.1:8080/")
    match = re.search(r'<noscript><img src="(/collect\.gif\?[^"]+)" alt=""', page)
    assert match, page
    src = match.group(1)
    assert "&amp;type=pageview&amp;" in src
    assert src.startswith("/collect.gif?site=demo&amp;")
    assert "url=http%3A%2F%2F127.0.0.1%3A8080%2F" in src


def test_demo_page_shows_the_snippets_as_code() -> None:
    page = render_demo_page("demo", public_url="https://stats.example/")
    text = "".join(Tags(page).text)
    assert (
        '<script defer src="https://stats.example/beacon.js" data-site="demo" '
        'data-member="0"></script>'
    ) in text
    assert '<div data-visitorstats-widget data-site="demo" data-lang="vi"></div>' in text
    assert '<script defer src="https://stats.example/widget.js"></script>' in text
    assert "<noscript><img src=" in text
    assert "&lt;script defer src=&quot;https://stats.example/beacon.js" in page


def test_demo_page_escapes_the_site() -> None:
    page = render_demo_page(HOSTILE, page_url='http://x/"><script>alert(2)</script>')
    tags = Tags(page)
    assert not tags.find("x")
    scripts = [a.get("src") for t, a in tags.tags if t == "script"]
    assert scripts == ["/beacon.js", "/widget.js", None]  # the last: the demo's own button
    assert page.count("<script>") == 1  # the demo's own, not the site's
    [beacon] = tags.find("script", src="/beacon.js")
    assert beacon["data-site"] == HOSTILE
    assert "<script>alert(2)" not in page


# --- static checks of the scripts --------------------------------------------------------------


def test_beacon_js_is_small() -> None:
    size = len(gzip.compress(BEACON_JS.read_bytes(), compresslevel=9))
    assert size <= 2560, f"beacon.js is {size} bytes gzipped"


def test_beacon_js_uses_the_right_browser_apis() -> None:
    src = BEACON_JS.read_text(encoding="utf-8")
    for needle in (
        "currentScript",
        "sendBeacon",
        "visibilitychange",
        "visibilityState",
        "pagehide",
        "pageshow",
        "pushState",
        "popstate",
        "text/plain",
        "keepalive: true",
        'credentials: "omit"',
        "/collect",
        "/collect.gif?",
        "randomUUID",
        "getRandomValues",
        "data-site",
        "data-member",
        "data-heartbeat",
        "data-visitor",
        '"pageview"',
        '"heartbeat"',
        '"leave"',
        "event_id",
        "referrer",
        "title",
    ):
        assert needle in src, needle
    assert src.lstrip().startswith("/*")
    assert "(function" in src and src.rstrip().endswith(");")  # one IIFE
    assert "import " not in src and "require(" not in src
    assert not re.search(r"\bwindow\.\w+\s*=", src)  # no globals
    assert "application/json" not in src  # would need a CORS preflight


def test_widget_js_uses_the_right_browser_apis() -> None:
    src = WIDGET_JS.read_text(encoding="utf-8")
    for needle in (
        "currentScript",
        "data-visitorstats-widget",
        "EventSource",
        '"/v1/sites/"',
        '"/counter"',
        '"/stream"',
        "If-None-Match",
        "ETag",
        "304",
        "aria-live",
        '"polite"',
        "aria-label",
        "Intl.NumberFormat",
        '"vi-VN"',
        '"en-US"',
        "data-vs-state",
        "data-vs-updates",
        '"data-vs"',
        "--vs-bg",
        "--vs-fg",
        "--vs-accent",
        "--vs-font",
        "--vs-border",
        '"live"',
        '"polling"',
        '"stale"',
        "visits-total",
        "visits-today",
        "⚠",
    ):
        assert needle in src, needle
    assert "innerHTML" not in src  # numbers and labels go in as text only
    assert "eval(" not in src


@pytest.mark.parametrize("script", [BEACON_JS, WIDGET_JS], ids=["beacon.js", "widget.js"])
def test_scripts_parse(script: Path) -> None:
    node = shutil.which("node")  # Debian's nodejs; `make test` installs it when missing
    assert node is not None, "node is needed to check the scripts' syntax"
    subprocess.run([node, "--check", str(script)], check=True, capture_output=True, timeout=60)


def test_an_unknown_site_is_named_only_when_it_could_be_a_site_id() -> None:
    assert "Không có trang: dongah" in render_unknown_page("dongah", "vi")
    assert "No such site: dongah" in render_unknown_svg("dongah", "en")
    for text in ("Thông báo khẩn: gọi 0900", "<b>x</b>", "A" * 80, "dong ha"):
        page, image = render_unknown_page(text, "vi"), render_unknown_svg(text, "en")
        assert "Không có trang</title>" in page and "No such site</text>" in image
        assert "0900" not in page + image and "dong ha" not in page + image


@pytest.mark.parametrize(
    ("raw", "rows"),
    [
        (None, ("today", "total")),
        ("", ("today", "total")),
        ("bogus, <script>", ("today", "total")),
        ("total", ("total",)),
        ("Month, yesterday  week TOTAL,today", ("today", "yesterday", "week", "month", "total")),
        ("week,week,bogus", ("week",)),
    ],
)
def test_the_visits_rows_are_the_known_names_in_the_blocks_order(
    raw: str | None, rows: tuple[str, ...]
) -> None:
    assert normalize_visits(raw) == rows


@pytest.mark.parametrize("lang", ["vi", "en"])
def test_svg_shows_the_visits_rows_asked_for(lang: str) -> None:
    """A portal's legacy block showed yesterday, this week and this month too (an outside
    audit): the rows are asked for by name, shown in one order, the image as tall as they."""
    data = counter(
        visits={
            "today": 5120,
            "yesterday": 6021,
            "this_week": 20112,
            "this_month": 90121,
            "total": 23070412,
        }
    )
    every = normalize_visits("month,week,yesterday,today,total")
    svg = render_svg(data, lang, every)
    values = svg_values(svg)
    assert values == {
        "guests": "833",
        "members": "0",
        "total": "833",
        "visits-today": format_number(5120, lang),
        "visits-yesterday": format_number(6021, lang),
        "visits-week": format_number(20112, lang),
        "visits-month": format_number(90121, lang),
        "visits-total": format_number(23070412, lang),
    }
    texts = svg_texts(svg)
    labels = [LABELS[lang][f"visits_{name}"] for name in every]
    assert [t for t in texts if t in labels] == labels  # in the block's order
    root = ET.fromstring(svg)
    default = ET.fromstring(render_svg(data, lang))
    assert int(str(root.get("height"))) == int(str(default.get("height"))) + 3 * 20
    assert int(str(root.get("width"))) == svg_width(data, lang, every)
    only = svg_values(render_svg(data, lang, ("total",)))
    assert set(only) == {"guests", "members", "total", "visits-total"}


def test_widget_page_passes_the_visits_rows_on() -> None:
    rows = ("yesterday", "total")
    tags = Tags(render_widget_page("dongha", "vi", visits=rows))
    [div] = tags.find("div", data_site="dongha")
    assert div["data-visits"] == "yesterday,total"
    [img] = tags.find("img")
    assert img["src"] == "/v1/sites/dongha/counter.svg?lang=vi&visits=yesterday,total"
    [plain] = Tags(render_widget_page("dongha", "vi")).find("div", data_site="dongha")
    assert "data-visits" not in plain
