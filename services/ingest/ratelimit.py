"""Per-client beacon budget: a token bucket per (site, client).

A client is its address (the real client behind trusted proxies: see ``client_address``), an
IPv6 client its /64 (``rate_key``); nothing the client writes in a beacon or a header (its
User-Agent, ``visitor``, ``event_id``) enters the key, so varying them gains nothing. Over its
budget a client is answered ``429`` with ``Retry-After``, and nothing it sent is counted.

Memory is bounded: at most ``max_clients`` buckets (about 200 bytes each); the least recently
used bucket is evicted first. An evicted bucket was idle the longest, so forgetting it at worst
gives that client a fresh burst; a flood of made-up clients only evicts made-up clients, and a
client that keeps sending stays most recently used.
"""

from __future__ import annotations

from collections import OrderedDict

# Pacing exactly at the rate must not fail on rounding (1/3 * 3 < 1 in floating point).
_EPSILON = 1e-9


class RateLimiter:
    def __init__(self, rate_per_second: float, burst: int, max_clients: int = 100_000) -> None:
        self._rate = rate_per_second
        self._burst = float(burst)
        self._max = max(1, max_clients)
        self._buckets: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, site: str, client: str, now: float) -> float:
        """Take one token; return 0 when allowed, else the seconds until a token is free.
        A rate of 0 (or less) turns the limit off."""
        if self._rate <= 0:
            return 0.0
        key = (site, client)
        tokens, last = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + max(0.0, now - last) * self._rate)
        wait = 0.0
        if tokens >= 1.0 - _EPSILON:
            tokens = max(0.0, tokens - 1.0)
        else:
            wait = (1.0 - tokens) / self._rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return wait
