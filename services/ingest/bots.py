"""Bot recognition from a maintained User-Agent list (crawlerdetect, the Python port of the
widely used CrawlerDetect patterns). Matching a long regex costs ~90 µs, so verdicts are cached
per User-Agent string: portal traffic repeats a small set of User-Agents."""

from __future__ import annotations

from crawlerdetect import CrawlerDetect

from services.memo import memo

_detector = CrawlerDetect()


@memo(16384)
def is_bot(user_agent: str) -> bool:
    # A client that does not say what it is, is not a reader's browser.
    if not user_agent.strip():
        return True
    return bool(_detector.isCrawler(user_agent))
