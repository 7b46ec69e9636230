"""Server-side rendering of the counter block: an SVG image, the iframe page and the demo page.

Pure functions, no I/O. Every value that reaches the markup is escaped here, so callers may pass
whatever a request carried. The labels are the ones ``static/widget.js`` shows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from html import escape
from typing import Any, Final
from urllib.parse import quote, urlencode

from services.sites import SITE_ID

DEFAULT_LANG: Final = "vi"

LABELS: dict[str, dict[str, str]] = {
    "vi": {
        "title": "Thống kê truy cập",
        "online": "Người trực tuyến",
        "guests": "Khách",
        "members": "Thành viên",
        "total": "Tổng",
        "visits": "Lượt truy cập",
        "visits_today": "Truy cập hôm nay",
        "visits_yesterday": "Truy cập hôm qua",
        "visits_week": "Truy cập tuần này",
        "visits_month": "Truy cập tháng này",
        "visits_total": "Tổng lượt truy cập",
        "stale": "số liệu chưa cập nhật",
        "unknown": "Không có trang",
    },
    "en": {
        "title": "Visitor statistics",
        "online": "Online now",
        "guests": "Guests",
        "members": "Members",
        "total": "Total",
        "visits": "Visits",
        "visits_today": "Visits today",
        "visits_yesterday": "Visits yesterday",
        "visits_week": "Visits this week",
        "visits_month": "Visits this month",
        "visits_total": "Total visits",
        "stale": "numbers not up to date",
        "unknown": "No such site",
    },
}

# The visits rows a block may show (``data-visits``, ``?visits=``), in the order shown, and
# where each number is in the counter JSON; by default the day's and the total.
VISITS: Final = {
    "today": "today",
    "yesterday": "yesterday",
    "week": "this_week",
    "month": "this_month",
    "total": "total",
}
DEFAULT_VISITS: Final = ("today", "total")

STALE_MARK: Final = "⚠"
MISSING: Final = "–"

# Characters XML 1.0 does not allow even when escaped.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


def normalize_lang(lang: str | None) -> str:
    """``vi`` or ``en`` by the tag's primary language (``EN``, ``en-US``, ``vi_VN``); anything
    else (missing, ``fr``, ``english``) is the default."""
    if lang:
        primary = lang.strip().lower().replace("_", "-").partition("-")[0]
        if primary in LABELS:
            return primary
    return DEFAULT_LANG


def normalize_visits(raw: str | None) -> tuple[str, ...]:
    """The visits rows named in ``raw`` (``"yesterday,week"``: commas or blanks, any case), in
    the block's order; names it does not know are left out; none known: the default."""
    named = set(re.split(r"[\s,]+", (raw or "").strip().lower()))
    return tuple(v for v in VISITS if v in named) or DEFAULT_VISITS


def format_number(n: int, lang: str) -> str:
    """Group thousands the way each locale does: vi 23.070.412, en 23,070,412."""
    grouped = f"{int(n):,}"
    return grouped if normalize_lang(lang) == "en" else grouped.replace(",", ".")


def _text(value: object) -> str:
    """Escape for XML/HTML text and attribute values alike."""
    return escape(_NOT_XML.sub("", str(value)), quote=True)


def _count(counter: Mapping[str, Any], section: str, key: str, lang: str) -> str:
    part = counter.get(section)
    value = part.get(key) if isinstance(part, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int):
        return MISSING
    return format_number(value, lang)


# --- SVG ------------------------------------------------------------------------------------

SVG_WIDTH: Final = 240  # the narrowest the image gets; longer labels or numbers widen it
_PAD = 12
_GAP = 12
_SIZE = 12
_FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, Arial, sans-serif"
_FG, _ACCENT, _BORDER, _WARN, _BG = "#1f2937", "#b91c1c", "#d1d5db", "#b45309", "#ffffff"


def _text_width(text: str, size: float, *, bold: bool) -> float:
    """A generous estimate of the rendered width: an image cannot measure its own text, and
    the font is whatever sans-serif the viewer has (DejaVu Sans, one of the widest, included)."""
    em = 0.0
    for ch in text:
        if ch.isdigit():
            em += 0.7
        elif ch in ".,:;!|' ":
            em += 0.36
        else:
            em += 0.66
    return em * size * (1.1 if bold else 1.0)


def svg_width(
    counter: Mapping[str, Any], lang: str, visits: tuple[str, ...] = DEFAULT_VISITS
) -> int:
    """The width :func:`render_svg` gives the image (for an ``<img width>``)."""
    return _svg_layout(counter, normalize_lang(lang), visits)[1]


def _svg_layout(
    counter: Mapping[str, Any], lang: str, visits: tuple[str, ...]
) -> tuple[list[tuple[str, str, str, int, int, bool]], int]:
    labels = LABELS[lang]
    rows = [
        # (data-vs, label, value, baseline y, label x, bold label)
        ("guests", labels["guests"], _count(counter, "online", "guests", lang), 72, 24, False),
        ("members", labels["members"], _count(counter, "online", "members", lang), 92, 24, False),
        ("total", labels["total"], _count(counter, "online", "total", lang), 112, 24, True),
    ]
    for i, name in enumerate(visits):
        value = _count(counter, "visits", VISITS[name], lang)
        rows.append(
            (f"visits-{name}", labels[f"visits_{name}"], value, 142 + 20 * i, _PAD, name == "total")
        )
    needed = max(
        x + _text_width(label, _SIZE, bold=bold) + _GAP + _text_width(value, _SIZE, bold=True)
        for _, label, value, _, x, bold in rows
    )
    title = _PAD + _text_width(labels["title"], 15, bold=True) + _GAP + 15
    width = max(SVG_WIDTH, math.ceil(max(needed, title) + _PAD))
    return rows, width


def render_svg(
    counter: Mapping[str, Any], lang: str, visits: tuple[str, ...] = DEFAULT_VISITS
) -> str:
    """The block as a self-contained SVG image (no scripts, no external resources), with the
    visits rows ``visits`` (``normalize_visits``)."""
    lang = normalize_lang(lang)
    labels = LABELS[lang]
    rows, width = _svg_layout(counter, lang, visits)
    right = width - _PAD
    height = rows[-1][3] + 14
    stale = counter.get("stale") is True
    summary = "; ".join(f"{label} {value}" for _, label, value, *_ in rows)
    desc = f"{counter.get('site', '')} {counter.get('as_of', '')}".strip()

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-labelledby="vs-title" '
        f'xml:lang="{lang}" font-family="{_text(_FONT)}" font-size="{_SIZE}" fill="{_FG}">',
        f'<title id="vs-title">{_text(labels["title"])}: {_text(summary)}</title>',
        f"<desc>{_text(desc)}</desc>",
        f'<rect x="0.5" y="0.5" width="{width - 1}" height="{height - 1}" rx="6" '
        f'fill="{_BG}" stroke="{_BORDER}"/>',
        f'<text x="{_PAD}" y="24" font-size="15" font-weight="700" fill="{_ACCENT}">'
        f"{_text(labels['title'])}</text>",
    ]
    if stale:
        out.append(
            f'<text x="{right}" y="24" text-anchor="end" fill="{_WARN}" data-vs="stale">'
            f"<title>{_text(labels['stale'])}</title>{STALE_MARK}</text>"
        )
    out += [
        f'<line x1="{_PAD}" y1="32.5" x2="{right}" y2="32.5" stroke="{_ACCENT}" stroke-width="2"/>',
        f'<text x="{_PAD}" y="52" font-weight="600">{_text(labels["online"])}</text>',
        f'<line x1="{_PAD}" y1="124.5" x2="{right}" y2="124.5" stroke="{_BORDER}"/>',
    ]
    for key, label, value, y, x, bold in rows:
        weight = ' font-weight="600"' if bold else ""
        out.append(f'<text x="{x}" y="{y}"{weight}>{_text(label)}</text>')
        out.append(
            f'<text x="{right}" y="{y}" text-anchor="end" font-weight="600" '
            f'data-vs="{key}">{_text(value)}</text>'
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _unknown(site: str, lang: str) -> str:
    """ "No such site", naming it when it could be one (a misspelt site id): any other text of
    an address is not shown on the service's own pages and images."""
    unknown = LABELS[lang]["unknown"]
    return f"{unknown}: {site}" if SITE_ID.fullmatch(site) else unknown


def render_unknown_svg(site: str, lang: str) -> str:
    """The image in place of the block for a site the registry does not know (what the
    widget shows in that case): a portal that misspelt its site id sees why."""
    lang = normalize_lang(lang)
    message = _unknown(site, lang)
    width = 240
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="40" '
        f'viewBox="0 0 {width} 40" role="img" xml:lang="{lang}" font-family="{_text(_FONT)}" '
        f'font-size="{_SIZE}" fill="{_FG}">\n'
        f"<title>{_text(message)}</title>\n"
        f'<rect x="0.5" y="0.5" width="{width - 1}" height="39" rx="6" fill="{_BG}" '
        f'stroke="{_BORDER}"/>\n'
        f'<text x="{_PAD}" y="25" fill="{_WARN}">{_text(message)}</text>\n'
        "</svg>\n"
    )


# --- HTML pages -----------------------------------------------------------------------------

_PAGE_STYLE = """\
html,body{margin:0;padding:0;background:transparent}
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Arial,sans-serif}"""


def _svg_url(site: str, lang: str, visits: tuple[str, ...] = DEFAULT_VISITS) -> str:
    url = f"/v1/sites/{quote(site, safe='')}/counter.svg?lang={lang}"
    return url if visits == DEFAULT_VISITS else f"{url}&visits={','.join(visits)}"


def _page(lang: str, title: str, head: str, body: str) -> str:
    """A small page of its own (for an iframe): ``title``, ``head`` and ``body`` are markup,
    escaped by the caller."""
    return f"""\
<!doctype html>
<html lang="{lang}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{title}</title>
<link rel="icon" href="data:,">
<style>
{_PAGE_STYLE}
</style>
{head}</head>
<body>
{body}
</body>
</html>
"""


def render_widget_page(
    site: str, lang: str, name: str = "", visits: tuple[str, ...] = DEFAULT_VISITS
) -> str:
    """A page holding only the block, for ``<iframe src=".../widget/{site}">``; its title names
    the site (its ``name`` in the registry, else its id)."""
    lang = normalize_lang(lang)
    labels = LABELS[lang]
    s = _text(site)
    rows = "" if visits == DEFAULT_VISITS else f' data-visits="{",".join(visits)}"'
    return _page(
        lang,
        f"{_text(labels['title'])} — {_text(name or site)}",
        '<script defer src="/widget.js"></script>\n',
        f'<div data-visitorstats-widget data-site="{s}" data-lang="{lang}"{rows}></div>\n'
        f'<noscript><img src="{_text(_svg_url(site, lang, visits))}" '
        f'alt="{_text(labels["title"])}"></noscript>',
    )


def render_unknown_page(site: str, lang: str) -> str:
    """The iframe page for a site the registry does not know: says so, as the widget does."""
    lang = normalize_lang(lang)
    message = _text(_unknown(site, lang))
    return _page(lang, message, "", f"<p>{message}</p>")


def _code(snippet: str) -> str:
    return f"<pre><code>{_text(snippet)}</code></pre>"


def render_demo_page(
    site: str,
    *,
    page_url: str = "http://127.0.0.1:8080/",
    public_url: str = "https://stats.example",
) -> str:
    """The page ``make run`` serves at ``/``: both snippets live for ``site``, and how to embed.

    ``page_url`` is the absolute address of this page (the no-script pixel reports it);
    ``public_url`` is the service's address as a portal would write it in the snippets shown.
    """
    s = _text(site)
    base = public_url.rstrip("/")
    pixel = "/collect.gif?" + urlencode({"site": site, "type": "pageview", "url": page_url})
    snippet_beacon = (
        f'<script defer src="{base}/beacon.js" data-site="{site}" data-member="0"></script>'
    )
    snippet_widget = (
        f'<div data-visitorstats-widget data-site="{site}" data-lang="vi"></div>\n'
        f'<script defer src="{base}/widget.js"></script>'
    )
    example = urlencode({"site": site, "type": "pageview", "url": "https://portal.example/page"})
    snippet_pixel = (
        f'<noscript><img src="{base}/collect.gif?{example.replace("&", "&amp;")}" '
        'alt="" width="1" height="1"></noscript>'
    )
    snippet_iframe = (
        f'<iframe src="{base}/widget/{quote(site, safe="")}?lang=vi" title="Thống kê truy cập" '
        'width="280" height="240" style="border:0"></iframe>'
    )
    snippet_svg = f'<img src="{base}{_svg_url(site, "vi")}" alt="Thống kê truy cập">'
    return f"""\
<!doctype html>
<html lang="vi">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>visitorstats — {s}</title>
<link rel="icon" href="data:,">
<style>
body{{margin:0 auto;max-width:60rem;padding:1.5rem;line-height:1.5;color:#1f2937;
font-family:system-ui,-apple-system,'Segoe UI',Roboto,Arial,sans-serif}}
.demo-widgets{{display:flex;flex-wrap:wrap;gap:1.5rem;align-items:flex-start}}
.demo-widgets>*{{flex:0 1 18rem}}
pre{{background:#f3f4f6;padding:.75rem;overflow-x:auto;border-radius:6px}}
code{{font-size:.9em}}
</style>
<script defer src="/beacon.js" data-site="{s}" data-member="0"></script>
<script defer src="/widget.js"></script>
</head>
<body>
<noscript><img src="{_text(pixel)}" alt="" width="1" height="1"></noscript>
<header>
<h1>visitorstats</h1>
<p lang="vi">Bộ đếm truy cập cho cổng thông tin: số người đang trực tuyến (khách, thành viên)
và tổng lượt truy cập, cập nhật trực tiếp.</p>
<p lang="en">The visitor counter behind a portal's “Thống kê truy cập” block: readers online
now (guests and members) and total visits, live. This page counts itself: it carries the
<code>beacon.js</code> snippet for the site <code>{s}</code>, and the block below shows the
result. Open it in another browser or a private window and watch the numbers change.</p>
</header>

<main>
<h2>The counter · Bộ đếm</h2>
<div class="demo-widgets">
<div data-visitorstats-widget data-site="{s}" data-lang="vi"></div>
<div data-visitorstats-widget data-site="{s}" data-lang="en"></div>
</div>
<p><button type="button" id="demo-nav">In-page navigation (one more page view)</button></p>
<script>
document.getElementById("demo-nav").addEventListener("click", function () {{
  history.pushState(null, "", "?view=" + Date.now());
}});
</script>

<h2>Embed it · Cách nhúng</h2>
<p>1. On every page, the tracker (a page view on load, heartbeats while the page is visible,
a leave when it is closed):</p>
{_code(snippet_beacon)}
<p>2. Where the block should appear (<code>data-lang</code>: <code>vi</code> or
<code>en</code>):</p>
{_code(snippet_widget)}
<p>Pages without JavaScript can count through a pixel:</p>
{_code(snippet_pixel)}
<p>Or show the block without script on the portal page, as a frame or an image:</p>
{_code(snippet_iframe)}
{_code(snippet_svg)}
<div class="demo-widgets">
<iframe src="/widget/{_text(quote(site, safe=""))}?lang=en" title="Visitor statistics (iframe)"
width="280" height="240" style="border:0" loading="lazy"></iframe>
<img src="{_text(_svg_url(site, "vi"))}" alt="Thống kê truy cập (SVG)">
</div>
<p>The numbers as JSON:
<a href="/v1/sites/{_text(quote(site, safe=""))}/counter"><code>GET
/v1/sites/{s}/counter</code></a>.
Customise the look with the CSS variables <code>--vs-bg</code>, <code>--vs-fg</code>,
<code>--vs-accent</code>, <code>--vs-border</code>, <code>--vs-font</code>.</p>
</main>
</body>
</html>
"""
