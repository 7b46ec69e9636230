"""A bounded memo for pure one-argument functions of the hot paths.

``functools.lru_cache`` keeps each entry in a linked-list node that the cyclic garbage
collector tracks: 65,536 entries are 65,536 more objects that every full collection walks
(measured on an ingest worker: full collections of 30–90 ms, the whole tail of its latency).
Here the entries live in a plain dict, which the collector does not track as long as keys and
values are atomic (strings, numbers, ``None``, tuples of those); when it is full it is emptied
(the functions are cheap to recompute, the working set refills it at once).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


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
                    cache.clear()
                value = cache[arg] = fn(arg)
            return value  # type: ignore[return-value]

        return cached

    return decorate
