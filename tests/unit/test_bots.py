"""Bot recognition (``services/ingest/bots.py``): crawlerdetect's verdict on every User-Agent a
browser or a bot sends, without the patterns that made a long User-Agent take seconds."""

from __future__ import annotations

import re

import pytest
from crawlerdetect import CrawlerDetect
from crawlerdetect import crawlerdetect as lists
from hypothesis import given, settings
from hypothesis import strategies as st

from services.ingest import bots

LIBRARY = CrawlerDetect()

TOKENS = [
    "Mozilla/5.0",
    "(Windows NT 10.0; Win64; x64)",
    "(Linux; Android 13; SM-A536E Build/TP1A.220624.014; wv)",
    "AppleWebKit/537.36",
    "(KHTML, like Gecko)",
    "Chrome/126.0.0.0",
    "Safari/537.36",
    "coc_coc_browser/120.0",
    "Zalo/24.02",
    "[FBAN/FB4A;FBAV/441.0.0.33.113;]",
    "Googlebot/2.1",
    "bingbot/2.0",
    "HeadlessChrome/126.0",
    "curl/8.5.0",
    "python-requests/2.31",
    "Java/1.8.0_292",
    "outbrain",
    "okhttp/4.9.3",
    "facebookexternalhit/1.1",
    "my-crawler",
    "news_reader",
    "uptime",
    "Trident/7.0",
    "; ",
    " ",
    "-",
    "_",
    "x",
]


# At most 8 tokens: 8 of the longest (55 characters), spaces and pads make 451 characters, all
# within what the check reads (``bots.CHECKED_CHARACTERS``, 512). With 14, a User-Agent of 513
# was made once, and the library reads past where the check stops.
@settings(max_examples=3000)
@given(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=8), st.sampled_from(["", " ", "  "]))
def test_the_verdict_is_crawlerdetects(tokens: list[str], pad: str) -> None:
    user_agent = pad + " ".join(tokens) + pad
    assert bots._is_crawler(user_agent) == LIBRARY.isCrawler(user_agent), user_agent


@pytest.mark.parametrize(
    ("user_agent", "bot"),
    [
        ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", True),
        ("Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)", True),
        ("curl/8.5.0", True),
        ("python-requests/2.31.0", True),
        ("", True),
        ("   ", True),
        (
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
            "HeadlessChrome/126.0.0.0 Safari/537.36",
            True,
        ),
        (
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/126.0.0.0 Safari/537.36",
            False,
        ),
        (
            "Mozilla/5.0 (iPhone; CPU iPhone OS 16_5 like Mac OS X) AppleWebKit/605.1.15 "
            "(KHTML, like Gecko) Mobile/15E148 [FBAN/FBIOS;FBDV/iPhone14,5;FBLC/vi_VN]",
            False,
        ),
        (
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
            "coc_coc_browser/120.0.0 Chrome/114.0.0.0 Safari/537.36",
            False,
        ),
    ],
)
def test_browsers_and_bots(user_agent: str, bot: bool) -> None:
    assert bots.is_bot(user_agent) is bot


def test_no_pattern_starts_with_a_class_that_may_match_nothing() -> None:
    """Such a pattern, searched, tries every start of a run of word characters to its end:
    crawlerdetect's ``[a-z0-9\\-_]*(bot|crawl|...)`` took 71 ms on 1,000 ``a`` and 10 s on
    8,000 (one beacon held the whole process). Its keywords are searched on their own."""
    leading = [p for p in lists.crawlers_data if re.match(r"\[[^\]]*\]\*", p)]
    assert leading, "crawlerdetect changed: look again at what this guards"
    alternatives = bots._crawlers.pattern.split("|")
    assert not [a for a in alternatives if re.match(r"\(?\[[^\]]*\]\*", a)]
    assert bots.is_bot("Mozilla/5.0 " + "a" * 2000 + " spider") is False  # past the checked part
    assert bots.is_bot("Mozilla/5.0 " + "a" * 300 + " spider")


def test_only_the_first_characters_are_checked() -> None:
    """Patterns like ``Java.*outbrain`` scan to the end from each start; browsers send a few
    hundred characters, and a bot's name comes first."""
    head = "Mozilla/5.0 (X11; Linux x86_64) Chrome/126.0 Safari/537.36 "
    assert bots.is_bot(head + "Googlebot/2.1")
    padded = head + "x" * (bots.CHECKED_CHARACTERS - len(head)) + " Googlebot/2.1"
    assert not bots.is_bot(padded)
    assert not bots.is_bot("Java" * 2000)  # not "Java/": no pattern of the list
