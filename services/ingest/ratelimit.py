"""Per-client beacon budget: a token bucket per (site, client address).

Memory is bounded: at most ``max_clients`` buckets; the least recently used bucket is evicted
first (a bucket that is evicted was idle, so forgetting it only gives that client a fresh burst).
"""

from __future__ import annotations

from collections import OrderedDict


class RateLimiter:
    def __init__(self, rate_per_second: float, burst: int, max_clients: int = 100_000) -> None:
        self._rate = rate_per_second
        self._burst = float(burst)
        self._max = max_clients
        self._buckets: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()

    def allow(self, site: str, client: str, now: float) -> float:
        """Take one token; return 0 when allowed, else the seconds until a token is free."""
        if self._rate <= 0:
            return 0.0
        key = (site, client)
        tokens, last = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self._rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return wait
