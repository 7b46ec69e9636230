"""``If-None-Match`` against an ETag: the weak comparison of RFC 9110 13.1.2."""

from __future__ import annotations

import pytest

from services.static import etag_matches

ETAG = '"abc123"'


@pytest.mark.parametrize(
    ("header", "matches"),
    [
        ('"abc123"', True),
        ('W/"abc123"', True),  # a proxy made it weak
        ('"x", W/"abc123" , "y"', True),
        ("*", True),
        (' "x" , * ', True),
        ('"abc12"', False),
        ('"ABC123"', False),
        ("abc123", False),  # not a quoted tag
        ('"x", "y"', False),
        ("", False),
        (None, False),
    ],
)
def test_if_none_match(header: str | None, matches: bool) -> None:
    assert etag_matches(ETAG, header) is matches
    assert etag_matches("W/" + ETAG, header) is matches  # the counter's own tag is weak
