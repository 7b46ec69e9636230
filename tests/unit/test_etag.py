"""``If-None-Match`` against the counter's ETag: the weak comparison of RFC 9110 13.1.2."""

from __future__ import annotations

import pytest

from services.aggregate.api import _etag_matches

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
    assert _etag_matches(ETAG, header) is matches
